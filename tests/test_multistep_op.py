"""The fused multistep update (issue 26) on every backend against a float64 oracle.

x_next = a x + b0 D_w + b1 H[read1] + b2 H[read2], then H[write] = D_w, with D_w the guided
denoiser: odd sizes, every x and network-output dtype, scalar and per-sample guidance, guidance
on/off/w=1, CFG's third output (d_uncond, cfg_scale) on and off, history slots read and written (the ring of a 2M and a 3M run), non-contiguous
inputs, poisoned outputs and history slots (a slot not read must not be read: NaN there stays
out of the result), out aliasing x, autograd, the direct kernel ops, and argument errors.
"""

import pytest
import torch
from torch.autograd import gradcheck

import ag_kernels
from _util import BACKENDS, D_DTYPES, DEVICES, TOL, X_DTYPES, make_cfg, make_inputs, make_uncond, poison, rel_err, require

SHAPES = [(1,), (7,), (4099,), (3, 5, 7, 9)]
# (b, read, write, slots): first order into an empty ring, 2M's one slot read and overwritten, 3M's two.
RINGS = [((0.7,), (), 0, 1), ((1.3, -0.3), (0,), 0, 1), ((1.4, -0.5, 0.1), (1, 0), 1, 2), ((1.0,), (), None, 2)]


def _oracle(x, d_main, d_guide, g, a, b, hist, read, d_uncond=None, cfg=1.0):
    f = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    col = lambda v: f(v).reshape((-1,) + (1,) * (d_main.dim() - 1)) if isinstance(v, torch.Tensor) else v  # noqa: E731
    d_main = f(d_main)
    if d_guide is None:
        D, D_terms = d_main, [d_main]
    else:
        gc = col(g)
        D = f(d_guide) + gc * (d_main - f(d_guide))
        D_terms = [D, f(d_guide), gc * (d_main - f(d_guide))]
    if d_uncond is not None:  # D_1 + (w - 1)(D_1 - D_0) + (w_cfg - 1)(D_1 - D_u)
        c1 = col(cfg) - 1
        D = D + c1 * (d_main - f(d_uncond))
        D_terms = D_terms + [D, c1 * d_main, c1 * f(d_uncond)]
    terms = [a * f(x), b[0] * D] + [b_k * f(hist[r]) for b_k, r in zip(b[1:], read)]
    result = sum(terms[1:], terms[0])
    # Scales of the computations (the largest term summed): a 1-element result can cancel to near 0.
    scale = max(t.abs().max().item() for t in terms + [result] + [b[0] * t for t in D_terms])
    return result, D, scale, max(t.abs().max().item() for t in D_terms)


def _case(backend, device, shape, x_dtype, d_dtype, ring, guide, per_sample, gen, *, noncontig=False, use_out=True,
          cfg=False):
    b, read, write, slots = ring
    x, _, d_main, d_guide = make_inputs(shape, x_dtype, d_dtype, device, gen, 2.0)
    d_uncond = make_uncond(d_main, gen) if cfg else None
    cfg_scale = make_cfg("per_sample" if per_sample else "scalar", shape[0], device, gen) if cfg else 1.0
    if noncontig:
        x, d_main, d_guide = (torch.stack([t, t], -1)[..., 0] for t in (x, d_main, d_guide))
        d_uncond = None if d_uncond is None else torch.stack([d_uncond, d_uncond], -1)[..., 1]
        assert not x.is_contiguous() or x.numel() == 1
    g = (1.0 + 2.0 * torch.rand(shape[0], generator=gen, dtype=torch.float64)).to(device) if per_sample else 2.3
    if guide == "unguided":
        d_guide = None
    elif guide == "w=1":
        g = 1.0
    hist = poison(torch.empty((slots,) + shape, dtype=x_dtype, device=device))
    for r in read:
        hist[r].copy_(torch.randn(shape, generator=gen, dtype=torch.float64))
    before = hist.clone()
    a = 0.37
    expected, D, scale, D_scale = _oracle(x, d_main, None if guide == "w=1" else d_guide, g, a, b, before, read,
                                          d_uncond, cfg_scale)
    out = poison(torch.empty(shape, dtype=x_dtype, device=device)) if use_out else None
    kw = {"d_uncond": d_uncond, "cfg_scale": cfg_scale} if cfg else {}
    result = ag_kernels.multistep_step(x, d_main, d_guide, g, hist, a, b, read=read, write=write, out=out,
                                       backend=backend, **kw)
    if use_out:
        assert result is out
    assert result.dtype == x_dtype and result.shape == shape
    err = rel_err(result, expected, scale)
    assert err <= TOL[x_dtype], f"{backend} {ring} {guide} cfg={cfg}: x_next rel err {err:.3g}"
    for k in range(slots):
        if k == write:
            err = rel_err(hist[k], D, D_scale)
            assert err <= TOL[x_dtype], f"{backend}: history[{k}] (D_w) rel err {err:.3g}"
        else:  # untouched, NaN poison included
            assert torch.equal(hist[k].isnan(), before[k].isnan())
            assert torch.equal(hist[k].nan_to_num(), before[k].nan_to_num())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("d_dtype", D_DTYPES, ids=str)
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=str)
def test_matches_oracle(backend, device, shape, x_dtype, d_dtype, gen):
    require(backend, device)
    k = 0
    for ring in RINGS:
        for guide in ("guided", "unguided", "w=1"):
            for per_sample in (False, True):
                for cfg in (False, True):
                    _case(backend, device, shape, x_dtype, d_dtype, ring, guide, per_sample, gen, use_out=k % 3 == 0,
                          cfg=cfg)
                    k += 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_and_noncontiguous(backend, device, gen):
    require(backend, device)
    for shape, cfg in [((1_000_003,), False), ((5, 3, 4099), False), ((5, 3, 4099), True)]:
        _case(backend, device, shape, torch.float32, torch.bfloat16, RINGS[2], "guided", True, gen, cfg=cfg)
    for ring in RINGS:
        for cfg in (False, True):
            _case(backend, device, (3, 5, 7), torch.float32, torch.float16, ring, "guided", True, gen, noncontig=True,
                  cfg=cfg)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_is_x_and_backends_agree(backend, gen):
    """In place (out=x), the ext and Triton kernels equal the torch reference to an ulp or two."""
    require(backend, "cpu")
    x, _, d_main, d_guide = make_inputs((4, 257), torch.float32, torch.float16, "cpu", gen, 5.0)
    d_uncond = make_uncond(d_main, gen, torch.bfloat16)
    hist = torch.randn((2, 4, 257), generator=gen)
    for kw in ({}, {"d_uncond": d_uncond, "cfg_scale": 6.5}):
        results = {}
        for be in ("torch", backend):
            xb, hb = x.clone(), hist.clone()
            out = ag_kernels.multistep_step(xb, d_main, d_guide, 2.0, hb, 0.5, (1.2, -0.3, 0.1), read=(0, 1), write=1,
                                            out=xb, backend=be, **kw)
            assert out is xb
            results[be] = (xb, hb)
        torch.testing.assert_close(results[backend][0], results["torch"][0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(results[backend][1], results["torch"][1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    require(backend, "cpu")
    x = torch.empty(0, 3)
    out = ag_kernels.multistep_step(x, x, None, 1.0, torch.empty(1, 0, 3), 1.0, (1.0,), backend=backend)
    assert out.shape == (0, 3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cfg", [False, True], ids=["two_outputs", "cfg"])
def test_gradcheck(backend, cfg, gen):
    """Every backend differentiates like the formula: x, d_main, d_guide, per-sample w and the history
    (and d_uncond with a per-sample cfg_scale)."""
    require(backend, "cpu")

    def t(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_()

    x, dm, dg, h, du = t(3, 5), t(3, 5), t(3, 5), t(2, 3, 5), t(3, 5)
    w = (1.5 + torch.rand(3, generator=gen, dtype=torch.float64)).requires_grad_()
    c = (3.0 + torch.rand(3, generator=gen, dtype=torch.float64)).requires_grad_()

    def fn(x, dm, dg, w, h, du=None, c=1.0):
        hist = h.clone()  # the op writes D_w into slot 1: differentiable through the copy
        x_next = ag_kernels.multistep_step(x, dm, dg, w, hist, 0.6, (1.3, -0.2, 0.05), read=(0, 1), write=1,
                                           backend=backend, d_uncond=du, cfg_scale=c)
        return x_next, hist

    assert gradcheck(fn, (x, dm, dg, w, h, du, c) if cfg else (x, dm, dg, w, h))


@pytest.mark.parametrize("case, exc, match", [
    (dict(history=torch.zeros(2, 4, 3)), ValueError, "history must have shape"),
    (dict(history=torch.zeros(2, 3, 4, dtype=torch.float64)), TypeError, "history must have dtype"),
    (dict(history=torch.zeros(4, 3, 2).permute(2, 1, 0)), ValueError, "history must be contiguous"),
    (dict(b=(1.0, 2.0, 3.0, 4.0)), TypeError, "b must be"),
    (dict(b=(1.0, float("nan"))), ValueError, r"b\[1\] must be finite"),
    (dict(a="1"), TypeError, "a must be a real number"),
    (dict(read=(0, 1)), ValueError, "read must name"),
    (dict(read=(2,)), ValueError, r"read\[0\] must be a history slot"),
    (dict(write=5), ValueError, "write must be a history slot"),
])
def test_errors_name_the_argument(case, exc, match):
    x = torch.zeros(3, 4)
    kw = dict(history=torch.zeros(2, 3, 4), a=1.0, b=(1.0, 0.5), read=(0,), write=1)
    kw.update(case)
    with pytest.raises(exc, match=match):
        ag_kernels.multistep_step(x, x.clone(), None, 1.0, kw.pop("history"), kw.pop("a"), kw.pop("b"), **kw)


def test_out_or_x_sharing_history_is_refused():
    hist = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="out shares memory with history"):
        ag_kernels.multistep_step(torch.zeros(3, 4), torch.zeros(3, 4), None, 1.0, hist, 1.0, (1.0,), out=hist[0])
    with pytest.raises(ValueError, match="x shares memory with history"):
        ag_kernels.multistep_step(hist[1], torch.zeros(3, 4), None, 1.0, hist, 1.0, (1.0,), write=0)
    with pytest.raises(ValueError, match="d_uncond shares memory with history"):
        ag_kernels.multistep_step(torch.zeros(3, 4), torch.zeros(3, 4), None, 1.0, hist, 1.0, (1.0,), write=0,
                                  d_uncond=hist[1], cfg_scale=3.0)


@pytest.mark.parametrize("backend", ["ext", "triton"])
def test_direct_kernel_op(backend, gen):
    """The kernel ops themselves (as the sampler's fast path calls them) equal the public op."""
    require(backend, "cpu")
    from ag_kernels.kernels._launch import _kernel_op

    x, _, d_main, d_guide = make_inputs((3, 33), torch.float32, torch.bfloat16, "cpu", gen, 1.0)
    hist = torch.randn((2, 3, 33), generator=gen)
    h_pub, h_dir = hist.clone(), hist.clone()
    expected = ag_kernels.multistep_step(x, d_main, d_guide, 1.7, h_pub, 0.2, (0.9, 0.3), read=(1,), write=0,
                                         backend="torch")
    out = torch.empty_like(x)
    _kernel_op(backend, "multistep_step")(out, h_dir, x, d_main, d_guide, None, 1.7, 0.2, 0.9, 0.3, 0.0, 1, -1, 0)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h_dir, h_pub, rtol=1e-6, atol=1e-6)  # torch.lerp may fuse: an ulp
    if backend == "ext":
        with pytest.raises(RuntimeError, match="history must have shape"):
            torch.ops.ag_kernels.multistep_step(out, hist[0], x, d_main, None, None, 1.0, 0.0, 1.0, 0.0, 0.0,
                                                -1, -1, 0)
        with pytest.raises(RuntimeError, match="read1 must be a history slot"):
            torch.ops.ag_kernels.multistep_step(out, hist, x, d_main, None, None, 1.0, 0.0, 1.0, 0.0, 0.0,
                                                2, -1, 0)


def _bad_history_calls():
    """(id, exception, message, call(op, x, d_main)): calls the direct kernel ops must refuse."""
    return [
        ("dtype", TypeError, "history must have out's dtype",
         lambda op, x, d: op(torch.empty(3, 33), torch.zeros(2, 3, 33, dtype=torch.float64), x, d, None, None,
                             1.0, 0.0, 1.0, 0.0, 0.0, -1, -1, 0)),
        ("noncontiguous", RuntimeError, "history must be contiguous",
         lambda op, x, d: op(torch.empty(3, 33), torch.zeros(3, 33, 2).permute(2, 0, 1), x, d, None, None,
                             1.0, 0.0, 1.0, 0.0, 0.0, -1, -1, 0)),
        ("shape", RuntimeError, "history must have shape",
         lambda op, x, d: op(torch.empty(3, 33), torch.zeros(3, 33), x, d, None, None,
                             1.0, 0.0, 1.0, 0.0, 0.0, -1, -1, 0)),
        ("slot", RuntimeError, "read1 must be a history slot",
         lambda op, x, d: op(torch.empty(3, 33), torch.zeros(2, 3, 33), x, d, None, None,
                             1.0, 0.0, 1.0, 0.0, 0.0, 2, -1, 0)),
        ("out_is_a_slot", RuntimeError, "out overlaps history",
         lambda op, x, d: (lambda h: op(h[1], h, x, d, None, None, 1.0, 0.0, 1.0, 0.5, 0.0, 1, -1, 0))(
             torch.zeros(2, 3, 33))),
        ("out_straddles_slots", RuntimeError, "out overlaps history",
         lambda op, x, d: (lambda h: op(h.view(-1)[50:149].view(3, 33), h, x, d, None, None,
                                        1.0, 0.0, 1.0, 0.0, 0.0, -1, -1, 0))(torch.zeros(2, 3, 33))),
    ]


@pytest.mark.parametrize("backend", ["ext", "triton"])
@pytest.mark.parametrize("case", _bad_history_calls(), ids=lambda c: c[0])
def test_direct_kernel_op_refuses_bad_history(backend, case, gen):
    """The kernel ops check the history ring themselves (the Triton op as the extension's), out overlap included."""
    require(backend, "cpu")
    from ag_kernels.kernels._launch import _kernel_op

    _, exc, match, call = case
    x, _, d_main, _ = make_inputs((3, 33), torch.float32, torch.float32, "cpu", gen, 1.0)
    with pytest.raises(exc, match=match):
        call(_kernel_op(backend, "multistep_step"), x, d_main)
