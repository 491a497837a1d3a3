"""The public ops' fast path and the sampler's prepared steps (issue 13).

The common call (plain contiguous tensors, finite Python numbers) must skip the checked path
and give bitwise the result of the checked path; every other call must take the checked path,
so that its layout, aliasing and error handling still apply.  The checked path is
``ops._dispatch``: these tests spy on it or make it fail.
"""

import numpy as np
import pytest
import torch

import ag_kernels
from ag_kernels.kernels import ops
from _util import (
    DEVICES, KERNEL_BACKENDS, OPS, TOL, call, make_cfg, make_inputs, make_uncond, oracle, poison, rel_err, require,
)

G, S, SN = 2.1, 1.25, 0.9


@pytest.fixture
def checked_calls(monkeypatch):
    """A list that records every call of the checked path (which still runs)."""
    calls = []
    real = ops._dispatch

    def spy(name, *args, **kwargs):
        calls.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(ops, "_dispatch", spy)
    return calls


def _inputs(shape, x_dtype, d_dtype, device, gen):
    return make_inputs(shape, x_dtype, d_dtype, device, gen, S)


def _slow(monkeypatch, op, *args, **kwargs):
    """The same call forced through the checked path."""
    with monkeypatch.context() as m:
        m.setattr(ops, "_fast_tensors", lambda *a: False)
        return call(op, *args, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(1,), (7,), (4099,), (3, 5, 7)], ids=str)
@pytest.mark.parametrize("x_dtype, d_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                              (torch.float32, torch.float16), (torch.float64, torch.float32)], ids=str)
@pytest.mark.parametrize("guided", ["guided", "unguided", "w=1", "cfg", "cfg_unguided", "cfg=1"])
def test_common_call_skips_checks_and_matches(monkeypatch, checked_calls, op, backend, device, shape, x_dtype,
                                              d_dtype, guided, gen):
    """Also with CFG's third output (d_uncond in d_main's dtype, a number as cfg_scale; at 1 it is not read)."""
    require(backend, device)
    x, x_euler, d_main, d_guide = _inputs(shape, x_dtype, d_dtype, device, gen)
    g = 1.0 if guided == "w=1" else G
    if guided in ("unguided", "cfg_unguided"):
        d_guide = None
    cfg = {"cfg": 7.5, "cfg_unguided": 4.0, "cfg=1": 1.0}.get(guided)
    d_uncond = None if cfg is None else make_uncond(d_main, gen)
    if cfg == 1.0:
        d_uncond = poison(d_uncond)
    for use_out in (True, False):
        out = poison(torch.empty(shape, dtype=x_dtype, device=device)) if use_out else None
        result = call(op, x, x_euler, d_main, d_guide, g, S, SN, backend=backend, out=out, d_uncond=d_uncond, cfg=cfg)
        assert checked_calls == [], f"the common call took the checked path ({checked_calls})"
        if use_out:
            assert result is out
        assert result.dtype == x_dtype and result.shape == x.shape and result.is_contiguous()
        expected = _slow(monkeypatch, op, x, x_euler, d_main, d_guide, g, S, SN, backend=backend, d_uncond=d_uncond,
                         cfg=cfg)
        assert checked_calls == [op]
        checked_calls.clear()
        assert torch.equal(result, expected), f"{op}: the fast path differs from the checked path"
        read = None if cfg == 1.0 else d_uncond
        err = rel_err(result, oracle(op, x, x_euler, d_main, d_guide, g, S, SN, with_scale=True, d_uncond=read,
                                     cfg=cfg or 1.0))
        assert err <= TOL[x_dtype]


@pytest.mark.parametrize("op", ["euler_step", "heun_step", "guided_score"])
def test_in_place_is_fast_and_right(checked_calls, op, gen):
    """out = x (the same view) is the in-place step a sampler does: allowed on the fast path."""
    x, x_euler, d_main, d_guide = _inputs((5, 9), torch.float32, torch.bfloat16, "cpu", gen)
    expected = oracle(op, x, x_euler, d_main, d_guide, G, S, SN, with_scale=True)
    target = x_euler if op == "heun_step" else x
    result = call(op, x, x_euler, d_main, d_guide, G, S, SN, backend="ext", out=target)
    assert result is target and checked_calls == []
    assert rel_err(result, expected) <= TOL[torch.float32]


def _shared_start_bf16(n):
    """(out float32 [n], d bfloat16 [n]) starting at the same address: overlapping, not the same view."""
    buf = torch.randn(n)
    return buf, buf.view(torch.bfloat16)[:n]


# Calls the fast path must leave to the checked path.
ODD_CALLS = [
    "numpy_scalar", "per_sample", "zero_d_tensor", "noncontiguous_x", "noncontiguous_d", "channels_last",
    "out_noncontiguous", "out_partial_overlap", "out_same_start_other_dtype", "parameter", "torch_backend",
    "empty", "huge_int",
]


@pytest.mark.parametrize("case", ODD_CALLS)
def test_other_calls_take_checked_path(checked_calls, case, gen):
    require("ext", "cpu")
    shape = (4, 3, 5, 6)
    x, x_euler, d_main, d_guide = _inputs(shape, torch.float32, torch.float32, "cpu", gen)
    g, s, sn, out, backend = G, S, SN, None, "ext"
    if case == "numpy_scalar":
        s = np.float64(S)
    elif case == "per_sample":
        g = torch.full((shape[0],), G)
    elif case == "zero_d_tensor":
        sn = torch.tensor(SN)
    elif case == "noncontiguous_x":
        x = x.transpose(1, 3).contiguous().transpose(1, 3)
    elif case == "noncontiguous_d":
        d_main = torch.randn(shape[::-1], generator=gen).permute(3, 2, 1, 0)
    elif case == "channels_last":
        x, x_euler, d_main, d_guide = (t.contiguous(memory_format=torch.channels_last)
                                       for t in (x, x_euler, d_main, d_guide))
    elif case == "out_noncontiguous":
        out = poison(torch.empty(shape[::-1])).permute(3, 2, 1, 0)
    elif case == "out_partial_overlap":
        buf = torch.randn(x.numel() + 3)
        x = buf[3:].view(shape).copy_(x)
        out = buf[:-3].view(shape)
    elif case == "out_same_start_other_dtype":
        out, d16 = _shared_start_bf16(x.numel())
        out = out.view(shape)
        d_main = d16.view(shape).copy_(d_main)
    elif case == "parameter":
        x = torch.nn.Parameter(x, requires_grad=False)
    elif case == "torch_backend":
        backend = "torch"
    elif case == "empty":
        x, x_euler, d_main, d_guide = (t[:0] for t in (x, x_euler, d_main, d_guide))
    elif case == "huge_int":
        g = 10**30
    plain = lambda v: float(v) if not isinstance(v, torch.Tensor) or v.dim() == 0 else v  # noqa: E731
    # Before the call: out may alias an input.
    expected = x.numel() and oracle("euler_step", x, x_euler, d_main, d_guide, plain(g), plain(s), plain(sn),
                                    with_scale=True)
    result = ag_kernels.euler_step(x, d_main, d_guide, g, s, sn, out=out, backend=backend)
    assert checked_calls == ["euler_step"], f"{case}: expected the checked path, got {checked_calls}"
    if out is not None:
        assert result is out
    assert result.shape == x.shape
    if x.numel():
        assert rel_err(result, expected) <= (1e-6 if case != "huge_int" else 1e-3)


def test_int_guidance_is_fast(checked_calls, gen):
    x, _, d_main, d_guide = _inputs((33,), torch.float32, torch.float32, "cpu", gen)
    result = ag_kernels.euler_step(x, d_main, d_guide, 2, 1, 0, backend="ext")
    assert checked_calls == []
    assert rel_err(result, oracle("euler_step", x, None, d_main, d_guide, 2.0, 1.0, 0.0, with_scale=True)) <= 1e-6


@pytest.mark.parametrize("case, error, match", [
    ("bool_guidance", TypeError, "guidance must be a real number"),
    ("nan_sigma", ValueError, "sigma must be finite and > 0"),
    ("zero_sigma", ValueError, "sigma must be finite and > 0"),
    ("negative_sigma_next", ValueError, "sigma_next must be finite and >= 0"),
    ("inf_guidance", ValueError, "guidance must be finite"),
    ("bad_backend", ValueError, "backend: unknown backend"),
    ("backend_not_str", TypeError, "backend must be a string"),
    ("x_int", TypeError, "x must have dtype float32/float64"),
    ("d_shape", ValueError, "d_main must have the shape of x"),
    ("out_dtype", TypeError, "out must have dtype float32"),
    ("out_shape", ValueError, "out must have the shape of the result"),
])
def test_errors_still_name_the_argument(case, error, match, gen):
    """Bad calls that look common at first sight still get the checked path's message."""
    x, _, d_main, d_guide = _inputs((6,), torch.float32, torch.float32, "cpu", gen)
    g, s, sn, out, backend = G, S, SN, None, "ext"
    if case == "bool_guidance":
        g = True
    elif case == "nan_sigma":
        s = float("nan")
    elif case == "zero_sigma":
        s = 0.0
    elif case == "negative_sigma_next":
        sn = -0.5
    elif case == "inf_guidance":
        g = float("inf")
    elif case == "bad_backend":
        backend = "cuda"
    elif case == "backend_not_str":
        backend = ["ext"]
    elif case == "x_int":
        x = torch.ones(6, dtype=torch.int32)
    elif case == "d_shape":
        d_main = d_main[:5]
    elif case == "out_dtype":
        out = torch.empty(6, dtype=torch.float64)
    elif case == "out_shape":
        out = torch.empty(7)
    with pytest.raises(error, match=match):
        ag_kernels.euler_step(x, d_main, d_guide, g, s, sn, out=out, backend=backend)


def test_meta_device_mismatch_is_an_error():
    """A meta tensor next to CPU ones is a device mismatch, named, not a kernel crash."""
    x = torch.randn(8)
    with pytest.raises(ValueError, match="d_main is on meta but x is on cpu"):
        ag_kernels.euler_step(x, torch.empty(8, device="meta"), None, G, S, SN, backend="ext")


# --------------------------------------------------------------------------- prepared steps


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["torch"])
@pytest.mark.parametrize("layout", ["contiguous", "d_noncontiguous", "d_aliases_out_other_dtype"])
@pytest.mark.parametrize("weight", ["scalar", "per_sample", "none"])
@pytest.mark.parametrize("cfg", ["none", "scalar", "per_sample", "other_dtype"])
def test_prepared_steps_match_public_ops(monkeypatch, checked_calls, backend, layout, weight, cfg, gen):
    """The direct kernel call with and without CFG's third output; d_uncond in another dtype than
    d_main's goes through the public op (the CUDA kernels read both in one dtype)."""
    require(backend, "cpu")
    shape = (3, 4, 5)
    x_hat, x_euler, d_main, d_guide = _inputs(shape, torch.float32, torch.bfloat16, "cpu", gen)
    w = {"scalar": G, "per_sample": torch.tensor([1.5, 2.1, 3.0]), "none": 1.0}[weight]
    if weight == "none":
        d_guide = None
    d_uncond = None if cfg == "none" else make_uncond(d_main, gen, torch.float16 if cfg == "other_dtype" else None)
    c = 1.0 if cfg == "none" else make_cfg("per_sample" if cfg == "per_sample" else "scalar", shape[0], "cpu", gen)
    out = poison(torch.empty(shape))
    if layout == "d_noncontiguous":
        d_main = d_main.transpose(0, 2).contiguous().transpose(0, 2)
    elif layout == "d_aliases_out_other_dtype":
        d_main = out.view(torch.bfloat16)[:, :, :5].copy_(d_main)
        snapshot = d_main.clone()
    steps = ag_kernels.PreparedSteps(x_hat, backend=backend)
    for name in ("euler", "heun"):
        if layout == "d_aliases_out_other_dtype":
            d_main = out.view(torch.bfloat16)[:, :, :5].copy_(snapshot)
        kw = {} if cfg == "none" else {"d_uncond": d_uncond, "cfg_scale": c}
        if name == "euler":
            expected = oracle("euler_step", x_hat, None, d_main, d_guide, w, S, SN, d_uncond=d_uncond, cfg=c)
            result = steps.euler(x_hat, d_main, d_guide, w, S, SN, out=out, **kw)
        else:
            expected = oracle("heun_step", x_hat, x_euler, d_main, d_guide, w, S, SN, d_uncond=d_uncond, cfg=c)
            result = steps.heun(x_hat, x_euler, d_main, d_guide, w, S, SN, out=out, **kw)
        assert result is out
        assert rel_err(result, expected) <= TOL[torch.float32], (name, layout)
    direct = backend != "torch" and layout == "contiguous" and cfg != "other_dtype"
    assert (checked_calls == []) == direct, f"checked path calls: {checked_calls}"


class _Affine(torch.nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x, t, labels=None):
        return (self.a * x + self.b * t).to(torch.bfloat16)


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_sampler_steps_without_checked_path(monkeypatch, checked_calls, memory_format):
    """edm_sampler on contiguous data never reaches the ops' checked path; on other layouts it
    falls back to it and still matches the eager reference."""
    require("ext", "cpu")
    noise = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    if memory_format == "channels_last":
        noise = noise.contiguous(memory_format=torch.channels_last)
    net, gnet = _Affine(0.5, 0.01), _Affine(0.4, 0.02)
    kwargs = dict(num_steps=8, sigma_max=5.0, guidance=2.1, S_churn=3, S_min=0.05, S_max=1.0)
    result = ag_kernels.edm_sampler(net, noise, None, gnet, backend="ext",
                                    randn_like=lambda t: torch.full_like(t, 0.25), **kwargs)
    expected = ag_kernels.kernels.reference.torch_edm_sampler(net, noise, None, gnet,
                                                      randn_like=lambda t: torch.full_like(t, 0.25), **kwargs)
    assert rel_err(result, expected) <= 1e-5
    if memory_format == "contiguous":
        assert checked_calls == []
    else:
        assert checked_calls and set(checked_calls) == {"euler_step", "heun_step"}
