"""Every backend differentiates the step ops like the PyTorch reference.

The kernel backends run ``torch.ops.ag_kernels_ad.*`` (functional ops with derivatives
registered through ``torch.library.register_autograd``) when an operand requires grad:
checked by ``gradcheck`` (float64, scalar and per-sample coefficients, odd and non-contiguous
shapes), ``gradgradcheck`` (the backward is differentiable), ``opcheck``, and against the torch
backend's gradients for 16-bit network outputs (tolerance 1e-5 relative in float32), each also with
CFG's third output ``d_uncond`` and its weight ``cfg_scale``.  ``out=``
follows torch's own out= ops on every backend: refused when an operand or ``out`` requires grad.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import ag_kernels
from ag_kernels.kernels import _autograd

BACKENDS = ag_kernels.available_backends("cpu")
KERNEL_BACKENDS = [b for b in BACKENDS if b != "torch"]
OPS = ["guided_denoise", "euler_step", "heun_step", "guided_score"]


def _inputs(op, shape, dtype, d_dtype, per_sample, gen, *, guide=True, noncontig=False):
    """(tensor args, coefficient args) of one call; everything that can require grad does."""
    def t(dt=dtype):
        full = shape if not noncontig else shape[:-1] + (shape[-1] * 2,)
        v = torch.randn(full, generator=gen, dtype=torch.float64).to(dt)
        if noncontig:
            v = v[..., ::2]
        return v.requires_grad_()

    b = shape[0]

    def coef(lo):
        if not per_sample:
            return lo + 0.7
        return (lo + torch.rand(b, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_()

    d_main = t(d_dtype)
    d_guide = t(d_dtype) if guide else None
    g = (1.5 + torch.rand(b, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_() if per_sample else 1.8
    if op == "guided_denoise":
        return (d_main, d_guide, g)
    if op == "euler_step":
        return (t(), d_main, d_guide, g, coef(0.5), coef(0.1))
    if op == "heun_step":
        return (t(), t(), d_main, d_guide, g, coef(0.5), coef(0.3))
    return (t(), d_main, d_guide, g, coef(0.5))


def _cfg_inputs(args, dtype, per_sample, gen):
    """The CFG keywords of a call on ``args``: d_uncond like d_main, cfg_scale a number or per sample."""
    d_main = args[{3: 0, 5: 1, 6: 1, 7: 2}[len(args)]]  # guided_denoise, guided_score, euler_step, heun_step
    d_uncond = torch.randn(d_main.shape, generator=gen, dtype=torch.float64).to(d_main.dtype).requires_grad_()
    b = d_main.shape[0]
    cfg = (3.0 + torch.rand(b, generator=gen, dtype=torch.float64)).to(dtype).requires_grad_() if per_sample else 4.5
    return {"d_uncond": d_uncond, "cfg_scale": cfg}


def _call(op, args, backend, **kw):
    fn = getattr(ag_kernels, op)
    if op == "guided_denoise":
        kw.setdefault("dtype", args[0].dtype if args[0].dtype in (torch.float32, torch.float64) else torch.float32)
    return fn(*args, backend=backend, **kw)


def _of_tensors(op, args, backend, kw=None):
    """(f, tensors): the op as a function of its tensor arguments (and keyword ones) only, for gradcheck."""
    kw = kw or {}
    diff = [a for a in args if isinstance(a, torch.Tensor)] + [v for v in kw.values() if isinstance(v, torch.Tensor)]

    def f(*tensors):
        it = iter(tensors)
        pos = [next(it) if isinstance(a, torch.Tensor) else a for a in args]
        return _call(op, pos, backend, **{k: next(it) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})

    return f, diff


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("per_sample", [False, True], ids=["scalar", "per_sample"])
@pytest.mark.parametrize("shape, noncontig", [((3, 5), False), ((2, 3, 7), True), ((1,), False)])
@pytest.mark.parametrize("cfg", [False, True], ids=["two_outputs", "cfg"])
def test_gradcheck(op, backend, per_sample, shape, noncontig, cfg, gen):
    args = _inputs(op, shape, torch.float64, torch.float64, per_sample, gen, noncontig=noncontig)
    kw = _cfg_inputs(args, torch.float64, per_sample, gen) if cfg else None
    f, diff = _of_tensors(op, args, backend, kw)
    assert gradcheck(f, diff, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", ["euler_step", "heun_step"])
@pytest.mark.parametrize("cfg", [False, True], ids=["two_outputs", "cfg"])
def test_gradgradcheck(op, backend, cfg, gen):
    args = _inputs(op, (2, 3), torch.float64, torch.float64, True, gen)
    f, diff = _of_tensors(op, args, backend, _cfg_inputs(args, torch.float64, True, gen) if cfg else None)
    assert gradgradcheck(f, diff, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("d_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("guide", [True, False])
@pytest.mark.parametrize("cfg", [False, True], ids=["two_outputs", "cfg"])
def test_gradients_match_the_torch_backend(op, backend, d_dtype, guide, cfg, gen):
    """float32 x with 16-bit network outputs: every gradient equals the reference's (each cast like the input)."""
    args = _inputs(op, (4, 9), torch.float32, d_dtype, True, gen, guide=guide)
    kw = _cfg_inputs(args, torch.float32, True, gen) if cfg else {}
    weights = torch.randn((4, 9), generator=gen)
    grads = {}
    inputs = list(args) + list(kw.values())
    for b in ("torch", backend):
        for a in inputs:
            if isinstance(a, torch.Tensor):
                a.grad = None
        out = _call(op, args, b, **kw)
        assert out.grad_fn is not None
        (out * weights).sum().backward()
        grads[b] = [None if not isinstance(a, torch.Tensor) else a.grad for a in inputs]
    for ref, ours, a in zip(grads["torch"], grads[backend], inputs):
        if ref is None:
            assert ours is None
            continue
        assert ours.dtype == a.dtype
        scale = ref.double().abs().max().clamp_min(1e-30)
        tol = 1e-5 if a.dtype in (torch.float32, torch.float64) else 1e-2
        assert float((ours.double() - ref.double()).abs().max() / scale) <= tol


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("cfg", [False, True], ids=["two_outputs", "cfg"])
def test_opcheck(op, cfg, gen):
    backend = KERNEL_BACKENDS[0] if KERNEL_BACKENDS else pytest.skip("no kernel backend on the CPU here")
    args = _inputs(op, (3, 4), torch.float64, torch.float32, True, gen)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if op == "guided_denoise":
        d_main, d_guide, g = args
        op_args = (backend, d_main, d_guide, g, 1.0, torch.float64)
    elif op == "guided_score":
        x, d_main, d_guide, g, s = args
        op_args = (backend, x, d_main, d_guide, g, s, 1.0, 1.0)
    else:
        *ts, g, s, sn = args
        op_args = (backend, *ts, g, s, sn, 1.0, 1.0, 1.0)
    if cfg:
        kw = _cfg_inputs(args, torch.float64, True, gen)
        op_args = op_args + (kw["d_uncond"], kw["cfg_scale"], 1.0)
    assert tensors
    torch.library.opcheck(getattr(torch.ops.ag_kernels_ad, op).default, op_args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_follows_torch_out_rules_on_every_backend(backend, gen):
    x = torch.randn(3, 4, generator=gen)
    d = torch.randn(3, 4, generator=gen)
    leaf = torch.zeros(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="out= is a tensor that requires grad"):
        ag_kernels.euler_step(x, d, None, 1.0, 1.0, 0.5, out=leaf, backend=backend)
    with pytest.raises(ValueError, match="an operand requires grad"):
        ag_kernels.euler_step(x.requires_grad_(), d, None, 1.0, 1.0, 0.5, out=torch.empty(3, 4), backend=backend)
    with torch.no_grad():  # no autograd in play: out= is fine, also a leaf that requires grad
        ag_kernels.euler_step(x, d, None, 1.0, 1.0, 0.5, out=leaf, backend=backend)
    assert torch.equal(leaf.detach(), ag_kernels.euler_step(x.detach(), d, None, 1.0, 1.0, 0.5, backend="torch"))


def test_no_grad_results_are_unchanged_and_fast_path_kept(gen, monkeypatch):
    """With nothing requiring grad the kernel ops run as before (bitwise), and the fast path is taken."""
    if not KERNEL_BACKENDS:
        pytest.skip("no kernel backend on the CPU here")
    from ag_kernels.kernels import ops

    x, dm, dg = (torch.randn(2, 8, generator=gen) for _ in range(3))
    a = ag_kernels.euler_step(x, dm, dg, 2.0, 1.0, 0.5)
    b = ag_kernels.euler_step(x.clone().requires_grad_(), dm, dg, 2.0, 1.0, 0.5)
    assert a.grad_fn is None and b.grad_fn is not None
    assert torch.equal(a, b.detach())
    calls = []
    monkeypatch.setattr(ops, "_dispatch", lambda *args, **kw: calls.append(args))
    ag_kernels.euler_step(x, dm, dg, 2.0, 1.0, 0.5)
    assert not calls  # the common call still skips the checked path


def test_registered_ops():
    for name in OPS:
        assert hasattr(torch.ops.ag_kernels_ad, name)
    assert set(_autograd.OPS) == set(OPS)
