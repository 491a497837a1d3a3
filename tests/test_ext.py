"""The compiled extension (backend "ext"): built when it should be, equal to the reference and to
Triton, safe to call directly, usable without being built, and capturable in a CUDA graph."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ag_kernels
from ag_kernels.kernels._backends import _load_ext
from _util import (
    D_DTYPES, DEVICES, KERNEL_BACKENDS, OPS, TOL, X_DTYPES, call, make_cfg, make_inputs, make_params, make_uncond, oracle,
    poison, rel_err, require,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ext_is_built():
    """With csrc/ in the checkout, an install must have built the CPU extension (a silent skip would
    turn every "ext" test into a skip)."""
    if not os.path.isdir(os.path.join(REPO, "csrc")):
        pytest.skip("no csrc/ beside the tests (installed package without sources)")
    if os.environ.get("AG_KERNELS_NO_EXT") == "1":
        pytest.skip("AG_KERNELS_NO_EXT=1: the extension was deliberately not built")
    from ag_kernels.kernels import _backends

    assert _load_ext() is not None, _backends._EXT_ERROR
    assert ag_kernels.available_backends("cpu")[0] == "ext"  # "auto" uses it on the CPU
    for name in OPS:
        assert hasattr(torch.ops.ag_kernels, name)


def test_package_without_ext():
    """With ag_kernels._C missing the package imports with one warning, drops "ext" from the
    backends, refuses backend="ext" with the reason, and still computes with the others."""
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["ag_kernels._C"] = None  # as if the extension had not been built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import ag_kernels
            import torch
            ag_kernels.available_backends("cpu")  # the first use loads the kernels wing, and the extension
        ext_warnings = [w for w in caught if "'ext'" in str(w.message)]
        assert len(ext_warnings) == 1, [str(w.message) for w in caught]
        assert "ext" not in ag_kernels.available_backends("cpu")
        x = torch.randn(3, 5)
        try:
            ag_kernels.euler_step(x, x, None, 1.0, 1.0, 0.5, backend="ext")
        except ValueError as exc:
            assert "ext" in str(exc) and "not available" in str(exc), exc
        else:
            raise AssertionError("backend='ext' ran without the extension")
        got = ag_kernels.euler_step(x, 0.5 * x, None, 1.0, 1.0, 0.5)
        assert torch.allclose(got, 0.75 * x, rtol=1e-6, atol=0), (got, x)
        print("ok")
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=str)
def test_backends_agree(op, device, x_dtype, gen):
    """Every kernel backend against the reference and against each other on the same inputs,
    including network outputs of two different dtypes."""
    backends = ["torch"] + [b for b in KERNEL_BACKENDS if _reason(b, device) is None]
    if len(backends) < 2:
        pytest.skip(f"only {backends} available on {device}")
    for shape in [(5,), (3, 7, 11), (2, 3, 4099)]:
        for mode in ("scalar", "per_sample", "mixed"):
            # CFG's third output in d_main's dtype, in d_guide's (another), or absent.
            for d_main_dtype, d_guide_dtype, uncond in [(torch.bfloat16, torch.float16, None),
                                                        (torch.float32, torch.float64, None),
                                                        (torch.bfloat16, torch.float16, "main"),
                                                        (torch.float16, torch.float32, "guide")]:
                g, s, sn = make_params(mode, shape[0], device, gen)
                x, x_euler, d_main, _ = make_inputs(shape, x_dtype, d_main_dtype, device, gen, s)
                _, _, _, d_guide = make_inputs(shape, x_dtype, d_guide_dtype, device, gen, s)
                d_uncond = None if uncond is None else make_uncond(d_main, gen, d_main_dtype if uncond == "main"
                                                                   else d_guide_dtype)
                cfg = None if uncond is None else make_cfg(mode, shape[0], device, gen)
                expected = oracle(op, x, x_euler, d_main, d_guide, g, s, sn, with_scale=True, d_uncond=d_uncond,
                                  cfg=1.0 if cfg is None else cfg)
                results = {
                    b: call(op, x, x_euler, d_main, d_guide, g, s, sn, backend=b, d_uncond=d_uncond, cfg=cfg,
                            out=poison(torch.empty(shape, dtype=x_dtype, device=device)))
                    for b in backends
                }
                for b, r in results.items():
                    assert rel_err(r, expected) <= TOL[x_dtype], (b, shape, mode, uncond)
                    # Backends computing one formula agree to the same tolerance, on the oracle's scale.
                    assert rel_err(r, results["torch"], expected[1]) <= TOL[x_dtype], (b, shape, mode, uncond)


def _reason(backend, device):
    from ag_kernels.kernels._backends import _unavailable_reason

    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA"
    return _unavailable_reason(backend, torch.device(device))


def _direct_args(device="cpu"):
    shape = (3, 4, 5)
    out = torch.empty(shape, device=device)
    x = torch.randn(shape, device=device)
    d = torch.randn(shape, device=device, dtype=torch.bfloat16)
    return out, x, d


@pytest.mark.parametrize(
    "case, exc, name",
    [
        ("out_dtype", TypeError, "out"),
        ("out_overlapping", RuntimeError, "out"),
        ("x_shape", RuntimeError, "x_hat"),
        ("x_dtype", TypeError, "x_hat"),
        ("x_strides", RuntimeError, "x_hat"),
        ("d_main_dtype", TypeError, "d_main"),
        ("d_guide_shape", RuntimeError, "d_guide"),
        ("g_vec_length", RuntimeError, "g_vec"),
        ("s_vec_dtype", TypeError, "s_vec"),
        ("sn_vec_2d", RuntimeError, "sn_vec"),
        ("batch_inner", RuntimeError, "batch"),
        ("d_uncond_shape", RuntimeError, "d_uncond"),
        ("d_uncond_dtype", TypeError, "d_uncond"),
        ("d_uncond_strides", RuntimeError, "d_uncond"),
        ("c_vec_length", RuntimeError, "c_vec"),
        ("c_vec_dtype", TypeError, "c_vec"),
    ],
)
def test_direct_op_errors(case, exc, name):
    """A direct call of torch.ops.ag_kernels.* with bad arguments raises, naming the argument."""
    if _load_ext() is None:
        pytest.skip("the extension is not built")
    out, x, d = _direct_args()
    dg, g_vec, s_vec, sn_vec = None, None, None, None
    du, c_vec = d.clone(), None
    if case == "out_dtype":
        out = out.to(torch.float16)
    elif case == "out_overlapping":
        out = torch.empty(1, 4, 5).expand(3, 4, 5)
    elif case == "x_shape":
        x = torch.randn(3, 4, 6)
    elif case == "x_dtype":
        x = x.double()
    elif case == "x_strides":
        x = torch.randn(3, 5, 4).transpose(1, 2)
    elif case == "d_main_dtype":
        d = d.to(torch.int32)
    elif case == "d_guide_shape":
        dg = torch.randn(3, 4)
    elif case == "g_vec_length":
        g_vec = torch.ones(4)
    elif case == "s_vec_dtype":
        s_vec = torch.ones(3, dtype=torch.int64)
    elif case == "sn_vec_2d":
        sn_vec = torch.ones(3, 1)
    elif case == "batch_inner":
        out = torch.empty(4, 5, 3).permute(2, 0, 1)
        x = torch.randn(4, 5, 3).permute(2, 0, 1)
        d = torch.randn(4, 5, 3).permute(2, 0, 1)
        g_vec = torch.ones(3)
    elif case == "d_uncond_shape":
        du = torch.randn(3, 4)
    elif case == "d_uncond_dtype":
        du = du.to(torch.int16)
    elif case == "d_uncond_strides":
        du = torch.randn(3, 5, 4).transpose(1, 2)
    elif case == "c_vec_length":
        c_vec = torch.ones(2)
    elif case == "c_vec_dtype":
        c_vec = torch.ones(3, dtype=torch.int32)
    with pytest.raises(exc, match=name):
        if case.startswith(("d_uncond", "c_vec")):
            torch.ops.ag_kernels.euler_step(out, x, d, dg, g_vec, s_vec, sn_vec, 2.0, 1.0, 0.5, du, c_vec, 3.0)
        else:
            torch.ops.ag_kernels.euler_step(out, x, d, dg, g_vec, s_vec, sn_vec, 2.0, 1.0, 0.5)


@pytest.mark.parametrize("d_dtype", D_DTYPES, ids=str)
def test_direct_op_matches_public(d_dtype, gen):
    """The raw op (what the public API calls) writes every element, per-sample rows included."""
    if _load_ext() is None:
        pytest.skip("the extension is not built")
    shape = (6, 3, 5, 7)
    g, s, sn = make_params("per_sample", shape[0], "cpu", gen)
    x, x_euler, d_main, d_guide = make_inputs(shape, torch.float32, d_dtype, "cpu", gen, s)
    out = poison(torch.empty(shape))
    torch.ops.ag_kernels.heun_step(out, x, x_euler, d_main, d_guide, g, s, sn, 1.0, 1.0, 1.0)
    assert rel_err(out, oracle("heun_step", x, x_euler, d_main, d_guide, g, s, sn, with_scale=True)) <= TOL[torch.float32]
    # With CFG's third output, by keyword (the schema's defaulted trailing arguments).
    d_uncond, cfg = make_uncond(d_main, gen), make_cfg("per_sample", shape[0], "cpu", gen)
    out = poison(torch.empty(shape))
    torch.ops.ag_kernels.heun_step(out, x, x_euler, d_main, d_guide, g, s, sn, 1.0, 1.0, 1.0, d_uncond=d_uncond,
                                   c_vec=cfg)
    expected = oracle("heun_step", x, x_euler, d_main, d_guide, g, s, sn, with_scale=True, d_uncond=d_uncond, cfg=cfg)
    assert rel_err(out, expected) <= TOL[torch.float32]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_cuda_graph_capture(backend, gen):
    """With `out` given, a sampler step captures in a CUDA graph (no host sync, no allocation)
    and replays on new data in the same buffers."""
    require(backend, "cuda")
    shape = (4, 4, 32, 33)
    g, s, sn = make_params("per_sample", shape[0], "cuda", gen)
    x, x_euler, d_main, d_guide = make_inputs(shape, torch.float32, torch.bfloat16, "cuda", gen, s)
    out_e, out_h = torch.empty_like(x), torch.empty_like(x)

    def step():
        ag_kernels.euler_step(x, d_main, d_guide, g, s, sn, out=out_e, backend=backend)
        ag_kernels.heun_step(x, out_e, d_main, d_guide, g, s, sn, out=out_h, backend=backend)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up (compiles the Triton kernel) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    allocations = torch.cuda.memory_stats().get("allocation.all.allocated", 0)
    with torch.cuda.graph(graph):
        step()
    assert torch.cuda.memory_stats().get("allocation.all.allocated", 0) == allocations, "the step allocated"
    for _ in range(2):
        nx, nxe, nd1, nd0 = make_inputs(shape, torch.float32, torch.bfloat16, "cuda", gen, s)
        x.copy_(nx), d_main.copy_(nd1), d_guide.copy_(nd0)
        poison(out_e), poison(out_h)
        graph.replay()
        torch.cuda.synchronize()
        x_e = oracle("euler_step", x, None, d_main, d_guide, g, s, sn)
        assert rel_err(out_e, x_e) <= TOL[torch.float32]
        assert rel_err(out_h, oracle("heun_step", x, out_e, d_main, d_guide, g, s, sn)) <= TOL[torch.float32]
