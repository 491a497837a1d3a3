"""Bad input gets a TypeError/ValueError naming the argument, on every backend."""

import math
import os
import re
import subprocess
import sys
import textwrap

import numpy as np

import pytest
import torch

import ag_kernels
from _util import BACKENDS, require

S = (2, 3, 5)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _args():
    x = torch.randn(S)
    return dict(
        x=x, x_euler=torch.randn(S), d_main=torch.randn(S).bfloat16(), d_guide=torch.randn(S).half(),
        guidance=2.1, sigma=1.5, sigma_next=0.9,
    )


def _cfg(a):
    # The CFG keywords only when a test sets them: the other cases check the two-output call.
    return {k: a[k] for k in ("d_uncond", "cfg_scale") if k in a}


def _euler(a, **kw):
    return ag_kernels.euler_step(a["x"], a["d_main"], a["d_guide"], a["guidance"], a["sigma"], a["sigma_next"], **kw,
                                 **_cfg(a))


def _heun(a, **kw):
    return ag_kernels.heun_step(
        a["x"], a["x_euler"], a["d_main"], a["d_guide"], a["guidance"], a["sigma"], a["sigma_next"], **kw, **_cfg(a)
    )


def _score(a, **kw):
    return ag_kernels.guided_score(a["x"], a["d_main"], a["d_guide"], a["guidance"], a["sigma"], **kw, **_cfg(a))


def _denoise(a, **kw):
    return ag_kernels.guided_denoise(a["d_main"], a["d_guide"], a["guidance"], **kw, **_cfg(a))


def _multistep(a, **kw):
    history = torch.zeros((2,) + tuple(a["d_main"].shape))
    return ag_kernels.multistep_step(a["x"], a["d_main"], a["d_guide"], a["guidance"], history, 0.5, (1.0, -0.5),
                                     read=(0,), write=1, **kw, **_cfg(a))


OPS = {"euler_step": _euler, "heun_step": _heun, "guided_score": _score, "guided_denoise": _denoise,
       "multistep_step": _multistep}
STEP_OPS = [op for op in OPS if op != "multistep_step"]  # multistep_step's out and backend: its own tests
CFG = {"d_uncond", "cfg_scale"}
USES = {  # which arguments each op reads
    "euler_step": {"x", "d_main", "d_guide", "guidance", "sigma", "sigma_next"} | CFG,
    "heun_step": {"x", "x_euler", "d_main", "d_guide", "guidance", "sigma", "sigma_next"} | CFG,
    "guided_score": {"x", "d_main", "d_guide", "guidance", "sigma"} | CFG,
    "guided_denoise": {"d_main", "d_guide", "guidance"} | CFG,
    "multistep_step": CFG,  # its other arguments: tests/test_multistep_op.py
}

# (case id, argument changed, bad value maker, exception, text the message must contain)
BAD = [
    ("x_not_tensor", "x", lambda a: np.zeros(S, np.float32), TypeError, "x"),
    ("x_int", "x", lambda a: torch.zeros(S, dtype=torch.int32), TypeError, "x"),
    ("x_half", "x", lambda a: a["x"].half(), TypeError, "x"),
    ("x_euler_dtype", "x_euler", lambda a: a["x_euler"].double(), TypeError, "x_euler"),
    ("x_euler_shape", "x_euler", lambda a: torch.randn(2, 3, 6), ValueError, "x_euler"),
    ("x_euler_device", "x_euler", lambda a: a["x_euler"].to("meta"), ValueError, "x_euler"),
    ("d_main_int", "d_main", lambda a: torch.ones(S, dtype=torch.int64), TypeError, "d_main"),
    ("d_main_shape", "d_main", lambda a: torch.randn(2, 3, 4), ValueError, "d_main"),
    ("d_main_device", "d_main", lambda a: a["d_main"].to("meta"), ValueError, "d_main"),
    ("d_guide_shape", "d_guide", lambda a: torch.randn(3, 2, 5), ValueError, "d_guide"),
    ("d_guide_dtype", "d_guide", lambda a: torch.ones(S, dtype=torch.uint8), TypeError, "d_guide"),
    ("d_guide_device", "d_guide", lambda a: a["d_guide"].to("meta"), ValueError, "d_guide"),
    ("d_guide_list", "d_guide", lambda a: [1.0, 2.0], TypeError, "d_guide"),
    ("guidance_nan", "guidance", lambda a: math.nan, ValueError, "guidance"),
    ("guidance_inf", "guidance", lambda a: -math.inf, ValueError, "guidance"),
    ("guidance_str", "guidance", lambda a: "2.1", TypeError, "guidance"),
    ("guidance_bool", "guidance", lambda a: True, TypeError, "guidance"),
    ("guidance_len", "guidance", lambda a: torch.ones(3), ValueError, "guidance"),
    ("guidance_2d", "guidance", lambda a: torch.ones(2, 1), ValueError, "guidance"),
    ("guidance_int_tensor", "guidance", lambda a: torch.ones(2, dtype=torch.int64), TypeError, "guidance"),
    ("guidance_float8_tensor", "guidance", lambda a: torch.ones(2).to(torch.float8_e4m3fn), TypeError, "guidance"),
    ("sigma_complex_tensor", "sigma", lambda a: torch.ones(2, dtype=torch.complex64), TypeError, "sigma"),
    ("guidance_device", "guidance", lambda a: torch.ones(2, device="meta"), ValueError, "guidance"),
    ("guidance_tensor_nan", "guidance", lambda a: torch.tensor([1.0, math.nan]), ValueError, "guidance"),
    ("sigma_zero", "sigma", lambda a: 0.0, ValueError, "sigma"),
    ("sigma_negative", "sigma", lambda a: -1.0, ValueError, "sigma"),
    ("sigma_nan", "sigma", lambda a: math.nan, ValueError, "sigma"),
    ("sigma_tensor_zero", "sigma", lambda a: torch.tensor([1.0, 0.0]), ValueError, "sigma"),
    ("sigma_len", "sigma", lambda a: torch.ones(5), ValueError, "sigma"),
    ("sigma_none", "sigma", lambda a: None, TypeError, "sigma"),
    ("sigma_next_negative", "sigma_next", lambda a: -0.1, ValueError, "sigma_next"),
    ("sigma_next_inf", "sigma_next", lambda a: math.inf, ValueError, "sigma_next"),
    ("sigma_next_len", "sigma_next", lambda a: torch.ones(1), ValueError, "sigma_next"),
    # The third output and its weight (d_guide's and guidance's rules; "d_main" for guided_denoise's shape).
    ("d_uncond_shape", "d_uncond", lambda a: torch.randn(3, 2, 5), ValueError, "d_uncond"),
    ("d_uncond_dtype", "d_uncond", lambda a: torch.ones(S, dtype=torch.int32), TypeError, "d_uncond"),
    ("d_uncond_device", "d_uncond", lambda a: a["d_uncond"].to("meta"), ValueError, "d_uncond"),
    ("d_uncond_array", "d_uncond", lambda a: np.zeros(S, np.float32), TypeError, "d_uncond"),
    ("cfg_scale_nan", "cfg_scale", lambda a: math.nan, ValueError, "cfg_scale"),
    ("cfg_scale_inf", "cfg_scale", lambda a: math.inf, ValueError, "cfg_scale"),
    ("cfg_scale_huge", "cfg_scale", lambda a: 1e39, ValueError, "cfg_scale"),
    ("cfg_scale_str", "cfg_scale", lambda a: "7.5", TypeError, "cfg_scale"),
    ("cfg_scale_bool", "cfg_scale", lambda a: True, TypeError, "cfg_scale"),
    ("cfg_scale_none", "cfg_scale", lambda a: None, TypeError, "cfg_scale"),
    ("cfg_scale_len", "cfg_scale", lambda a: torch.ones(3), ValueError, "cfg_scale"),
    ("cfg_scale_int_tensor", "cfg_scale", lambda a: torch.ones(2, dtype=torch.int64), TypeError, "cfg_scale"),
    ("cfg_scale_device", "cfg_scale", lambda a: torch.ones(2, device="meta"), ValueError, "cfg_scale"),
    ("cfg_scale_tensor_nan", "cfg_scale", lambda a: torch.tensor([7.5, math.nan]), ValueError, "cfg_scale"),
    ("cfg_scale_tensor_inf", "cfg_scale", lambda a: torch.tensor([7.5, -math.inf], dtype=torch.float64), ValueError,
     "cfg_scale"),
]


PAIRS = [(op, case) for op in OPS for case in BAD if case[1] in USES[op]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op,case", PAIRS, ids=[f"{op}-{case[0]}" for op, case in PAIRS])
def test_bad_argument(op, backend, case):
    require(backend, "cpu")
    _, name, make, exc, text = case
    if op == "heun_step" and text == "x":
        text = "x_hat"
    a = _args()
    if name in CFG:  # a good third output and weight, then the bad one
        a.update(d_uncond=torch.randn(S).half(), cfg_scale=7.5)
    a[name] = make(a)
    with pytest.raises(exc, match=rf"\b{text}\b"):
        OPS[op](a, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_heun_sigma_next_zero(backend):
    """heun_step divides by sigma_next, so 0 is refused there (euler_step accepts it: the last step)."""
    require(backend, "cpu")
    a = _args()
    a["sigma_next"] = 0.0
    with pytest.raises(ValueError, match="sigma_next"):
        _heun(a, backend=backend)
    assert torch.isfinite(_euler(a, backend=backend)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", STEP_OPS)
def test_bad_out(op, backend):
    require(backend, "cpu")
    a = _args()
    cases = [
        (torch.empty(2, 3, 4), ValueError),
        (torch.empty(S, dtype=torch.float64), TypeError),
        (torch.empty(S, device="meta"), ValueError),
        (torch.empty(1, 3, 5).expand(S), ValueError),
        ("not a tensor", TypeError),
    ]
    for out, exc in cases:
        with pytest.raises(exc, match=r"\bout\b"):
            OPS[op](a, out=out, backend=backend)


@pytest.mark.parametrize("op", STEP_OPS)
def test_bad_backend(op):
    a = _args()
    with pytest.raises(ValueError, match="backend"):
        OPS[op](a, backend="cuda-magic")
    with pytest.raises(TypeError, match="backend"):
        OPS[op](a, backend=None)


def test_triton_unavailable_message():
    """Without TRITON_INTERPRET, Triton on CPU tensors is refused with the reason, not crashed.

    This suite sets TRITON_INTERPRET=1 (conftest.py), so the check runs in a subprocess without it.
    """
    from ag_kernels.kernels._backends import _triton_module

    if _triton_module().TRITON_IMPORT_ERROR is not None:
        pytest.skip(f"triton is not importable here ({_triton_module().TRITON_IMPORT_ERROR})")
    code = textwrap.dedent("""
        import os, torch, ag_kernels
        assert "TRITON_INTERPRET" not in os.environ
        x = torch.randn(2, 3)
        assert "triton" not in ag_kernels.available_backends("cpu"), ag_kernels.available_backends("cpu")
        try:
            ag_kernels.euler_step(x, x, x, 2.0, 1.5, 0.9, backend="triton")
        except ValueError as exc:
            print(exc)
        else:
            raise SystemExit("backend='triton' on CPU tensors ran without TRITON_INTERPRET")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([REPO] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    message = proc.stdout.strip()
    assert "backend='triton'" in message and "TRITON_INTERPRET=1" in message and "cpu" in message, message


def test_guided_denoise_bad_dtype():
    a = _args()
    for dtype in (torch.float16, torch.int32, "float32"):
        with pytest.raises(TypeError, match="dtype"):
            _denoise(a, dtype=dtype)


def test_available_backends():
    from ag_kernels.kernels._backends import _load_ext

    cpu = ag_kernels.available_backends("cpu")
    # "auto" on the CPU: the compiled extension when it is built, else the reference.
    assert cpu[0] == ("ext" if _load_ext() is not None else "torch")
    assert "torch" in cpu
    assert ag_kernels.available_backends(torch.device("cpu")) == cpu
    if torch.cuda.is_available():
        assert ag_kernels.available_backends("cuda")[0] in ("ext", "triton")


def test_ext_on_cuda_needs_its_cuda_kernels():
    """"ext" counts as available for CUDA tensors only when the build registered CUDA kernels for
    every op (a CPU-only build imports too); the reason says how to get them."""
    from ag_kernels.kernels._backends import EXT_OPS, _load_ext, _unavailable_reason, resolve_backend

    if _load_ext() is None:
        pytest.skip("the extension is not built here")
    built = all(torch._C._dispatch_has_kernel_for_dispatch_key(f"ag_kernels::{n}", "CUDA") for n in EXT_OPS)
    reason = _unavailable_reason("ext", torch.device("cuda"))
    assert (reason is None) == built
    assert ("ext" in ag_kernels.available_backends("cuda")) == built
    if not built:
        assert "built without its CUDA kernels" in reason
        with pytest.raises(ValueError, match="backend='ext' is not available for cuda tensors: .*CUDA kernels"):
            resolve_backend("ext", torch.device("cuda"))


@pytest.mark.parametrize("backend", ag_kernels.available_backends("cpu"))
def test_coefficients_must_be_representable_in_float32(backend):
    """A scalar that rounds to 0 or inf in float32 would give all-NaN or inf output: refused, naming it;
    the same values are fine for float64 data."""
    x, d = torch.randn(2, 5), torch.randn(2, 5)
    cases = [
        (lambda: ag_kernels.euler_step(x, d, None, 1.0, 1e-46, 0.0, backend=backend), "sigma=1e-46"),
        (lambda: ag_kernels.euler_step(x, d, None, 1.0, 1.0, 1e-47, backend=backend), "sigma_next=1e-47"),
        (lambda: ag_kernels.heun_step(x, x, d, None, 1.0, 1.0, 1e-46, backend=backend), "sigma_next=1e-46"),
        (lambda: ag_kernels.guided_score(x, d, None, 1.0, 1e40, backend=backend), "sigma=1e+40"),
        (lambda: ag_kernels.euler_step(x, d, d, 1e39, 1.0, 0.5, backend=backend), "guidance=1e+39"),
        (lambda: ag_kernels.euler_step(x, d, None, 1.0, torch.tensor([1.0, 1e-46], dtype=torch.float64), 0.0,
                                       backend=backend), "sigma must be finite and > 0 in every element (in float32)"),
    ]
    for call, match in cases:
        pattern = re.escape(match) + ("" if "every" in match else ".*not representable")
        with pytest.raises(ValueError, match=pattern):
            call()
    x64, d64 = x.double(), d.double()
    out = ag_kernels.euler_step(x64, d64, None, 1.0, 1e-46, 0.0, backend=backend)
    assert torch.isfinite(out).all()
    ok = ag_kernels.euler_step(x, d, None, 1.0, 1.5e-45, 0.0, backend=backend)  # the smallest subnormal: fine
    assert ok.shape == x.shape
