"""Differentiable versions of the kernel backends' step ops (``torch.ops.ag_kernels_ad.*``).

The kernel ops write into ``out`` and have no derivative; the "torch" backend differentiates
through PyTorch.  When a public op is called with grad mode on and an operand that requires
grad, it runs one of these functional custom ops instead: the forward is the chosen backend's
kernel, the derivative is registered with ``torch.library.register_autograd``.  Every step is
linear in x, x_euler, d_main, d_guide and d_uncond (Karras et al. 2022, Algorithm 2, with
D_w = D_0 + w (D_1 - D_0), plus (w_cfg - 1) (D_1 - D_u) with CFG's third output); per-sample
coefficient tensors (guidance, cfg_scale, sigma, sigma_next) get their derivatives too, summed
over each sample's elements, so every backend differentiates like the reference.  The backward
formulas are plain PyTorch, so they differentiate again.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._launch import _kernel_layout, _run_kernel


def _forward(name, backend, ref, out_dtype, tensors, params, d_uncond, c_vec, c) -> Tensor:
    return _run_kernel(name, backend, ref, out_dtype, None, tensors, params, uncond=_uncond(d_uncond, c_vec, c))


def _uncond(d_uncond, c_vec, c):
    return None if d_uncond is None else (d_uncond, (c, c_vec))


def _fake(ref, out_dtype, vecs) -> Tensor:
    per_sample = any(v is not None for v in vecs)
    return torch.empty_strided(ref.shape, _kernel_layout(ref, per_sample), dtype=out_dtype, device=ref.device)


# --------------------------------------------------------------------------- the ops


# Every op ends with CFG's third output: d_uncond (None: no CFG term), its per-sample weight c_vec, or the number c.


@torch.library.custom_op("ag_kernels_ad::guided_denoise", mutates_args=())
def guided_denoise(backend: str, d_main: Tensor, d_guide: Optional[Tensor], g_vec: Optional[Tensor], g: float,
                   dtype: torch.dtype, d_uncond: Optional[Tensor] = None, c_vec: Optional[Tensor] = None,
                   c: float = 1.0) -> Tensor:
    return _forward("guided_denoise", backend, d_main, dtype, [d_main, d_guide], [(g, g_vec)], d_uncond, c_vec, c)


@torch.library.custom_op("ag_kernels_ad::euler_step", mutates_args=())
def euler_step(backend: str, x: Tensor, d_main: Tensor, d_guide: Optional[Tensor], g_vec: Optional[Tensor],
               s_vec: Optional[Tensor], sn_vec: Optional[Tensor], g: float, s: float, sn: float,
               d_uncond: Optional[Tensor] = None, c_vec: Optional[Tensor] = None, c: float = 1.0) -> Tensor:
    return _forward("euler_step", backend, x, x.dtype, [x, d_main, d_guide], [(g, g_vec), (s, s_vec), (sn, sn_vec)],
                    d_uncond, c_vec, c)


@torch.library.custom_op("ag_kernels_ad::heun_step", mutates_args=())
def heun_step(backend: str, x_hat: Tensor, x_euler: Tensor, d_main: Tensor, d_guide: Optional[Tensor],
              g_vec: Optional[Tensor], s_vec: Optional[Tensor], sn_vec: Optional[Tensor], g: float, s: float,
              sn: float, d_uncond: Optional[Tensor] = None, c_vec: Optional[Tensor] = None, c: float = 1.0) -> Tensor:
    return _forward("heun_step", backend, x_hat, x_hat.dtype, [x_hat, x_euler, d_main, d_guide],
                    [(g, g_vec), (s, s_vec), (sn, sn_vec)], d_uncond, c_vec, c)


@torch.library.custom_op("ag_kernels_ad::guided_score", mutates_args=())
def guided_score(backend: str, x: Tensor, d_main: Tensor, d_guide: Optional[Tensor], g_vec: Optional[Tensor],
                 s_vec: Optional[Tensor], g: float, s: float, d_uncond: Optional[Tensor] = None,
                 c_vec: Optional[Tensor] = None, c: float = 1.0) -> Tensor:
    return _forward("guided_score", backend, x, x.dtype, [x, d_main, d_guide], [(g, g_vec), (s, s_vec)],
                    d_uncond, c_vec, c)


@torch.library.custom_op("ag_kernels_ad::multistep_step", mutates_args=())
def multistep_step(backend: str, x: Tensor, d_main: Tensor, d_guide: Optional[Tensor], h1: Optional[Tensor],
                   h2: Optional[Tensor], g_vec: Optional[Tensor], g: float, a: float, b0: float, b1: float,
                   b2: float, d_uncond: Optional[Tensor] = None, c_vec: Optional[Tensor] = None,
                   c: float = 1.0) -> Tuple[Tensor, Tensor]:
    # The kernel reads and writes a history: here a fresh one, [D_{i-1}, D_{i-2}, D_w].
    history = torch.empty((3,) + tuple(x.shape), dtype=x.dtype, device=x.device)
    for k, h in enumerate((h1, h2)):
        if h is not None:
            history[k].copy_(h)
    slots = (0 if h1 is not None else -1, 1 if h2 is not None else -1, 2)
    x_next = _run_kernel("multistep_step", backend, x, x.dtype, None, [x, d_main, d_guide], [(g, g_vec)],
                         (history,), (a, b0, b1, b2) + slots, uncond=_uncond(d_uncond, c_vec, c))
    return x_next, history[2].clone()


@guided_denoise.register_fake
def _(backend, d_main, d_guide, g_vec, g, dtype, d_uncond=None, c_vec=None, c=1.0):
    return _fake(d_main, dtype, (g_vec, c_vec))


@euler_step.register_fake
def _(backend, x, d_main, d_guide, g_vec, s_vec, sn_vec, g, s, sn, d_uncond=None, c_vec=None, c=1.0):
    return _fake(x, x.dtype, (g_vec, s_vec, sn_vec, c_vec))


@heun_step.register_fake
def _(backend, x_hat, x_euler, d_main, d_guide, g_vec, s_vec, sn_vec, g, s, sn, d_uncond=None, c_vec=None, c=1.0):
    return _fake(x_hat, x_hat.dtype, (g_vec, s_vec, sn_vec, c_vec))


@guided_score.register_fake
def _(backend, x, d_main, d_guide, g_vec, s_vec, g, s, d_uncond=None, c_vec=None, c=1.0):
    return _fake(x, x.dtype, (g_vec, s_vec, c_vec))


@multistep_step.register_fake
def _(backend, x, d_main, d_guide, h1, h2, g_vec, g, a, b0, b1, b2, d_uncond=None, c_vec=None, c=1.0):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        x, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------- derivatives


def _coef(scalar: float, vec: Optional[Tensor], like: Tensor):
    """A coefficient as the formula uses it: the float, or the per-sample tensor as [B, 1, ..., 1] in like's dtype."""
    if vec is None:
        return scalar
    shape = (vec.shape[0],) + (1,) * (like.dim() - 1) if like.dim() else ()
    return vec.to(like.dtype).reshape(shape)


def _per_sample(term: Tensor, vec: Optional[Tensor], need: bool):
    """d/d(vec) from the elementwise derivative ``term``: summed over each sample's elements."""
    if vec is None or not need:
        return None
    return term.reshape(vec.shape[0], -1).sum(1).to(vec.dtype)


class _Cfg:
    """CFG's part of a backward: d_uncond (None: no CFG term), its weight C and what needs a gradient."""

    def __init__(self, d_uncond, c_vec, c, like, need_u=False, need_c=False):
        self.d_uncond, self.c_vec = d_uncond, c_vec
        self.C = _coef(c, c_vec, like)
        self.need_u, self.need_c = need_u, need_c
        self.grad_u = self.grad_c = None


def _denoised(d_main, d_guide, W, dt, cfg=None):
    D_1 = d_main.to(dt)
    D = D_1 if d_guide is None else d_guide.to(dt).lerp(D_1, W)
    if cfg is not None and cfg.d_uncond is not None:
        D = D + (cfg.C - 1) * (D_1 - cfg.d_uncond.to(dt))
    return D


def _through_denoiser(grad_D, d_main, d_guide, g_vec, W, dt, needs, cfg=None):
    """(d_main, d_guide, g_vec) gradients from the gradient with respect to D; those of d_uncond and its
    weight go into ``cfg`` (D = lerp(D_0, D_1, W) + (C - 1) (D_1 - D_u))."""
    need_main, need_guide, need_g = needs
    uncond = cfg is not None and cfg.d_uncond is not None
    if uncond:
        cfg.grad_u = (grad_D * (1 - cfg.C)).to(cfg.d_uncond.dtype) if cfg.need_u else None
        cfg.grad_c = _per_sample(grad_D * (d_main.to(dt) - cfg.d_uncond.to(dt)), cfg.c_vec, cfg.need_c)
    if d_guide is None:
        if not uncond:
            return (grad_D.to(d_main.dtype) if need_main else None), None, None
        return (grad_D * cfg.C).to(d_main.dtype) if need_main else None, None, None
    W_main = W if not uncond else W + (cfg.C - 1)
    gm = (grad_D * W_main).to(d_main.dtype) if need_main else None
    gg = (grad_D * (1 - W)).to(d_guide.dtype) if need_guide else None
    gw = _per_sample(grad_D * (d_main.to(dt) - d_guide.to(dt)), g_vec, need_g)
    return gm, gg, gw


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*[t if isinstance(t, Tensor) else None for t in inputs])
    ctx.scalars = [None if isinstance(t, Tensor) else t for t in inputs]


def _restore(ctx):
    return [t if t is not None else s for t, s in zip(ctx.saved_tensors, ctx.scalars)]


def _cfg_of(ctx, values, like):
    """The CFG part of the inputs (the op's last three) and the rest of them."""
    *rest, d_uncond, c_vec, c = values
    return _Cfg(d_uncond, c_vec, c, like, *_cfg_needs(ctx, len(rest))), rest


def _cfg_needs(ctx, k):
    """needs_input_grad of d_uncond and c_vec, the op's inputs k and k + 1 (the flags can stop before
    trailing inputs left at their defaults: those need none)."""
    n = ctx.needs_input_grad
    return (len(n) > k and n[k]), (len(n) > k + 1 and n[k + 1])


def _denoise_backward(ctx, grad):
    cfg, (backend, d_main, d_guide, g_vec, g, dtype) = _cfg_of(ctx, _restore(ctx), grad)
    n = ctx.needs_input_grad
    W = _coef(g, g_vec, grad)
    gm, gg, gw = _through_denoiser(grad, d_main, d_guide, g_vec, W, dtype, (n[1], n[2], n[3]), cfg)
    return None, gm, gg, gw, None, None, cfg.grad_u, cfg.grad_c, None


def _euler_backward(ctx, grad):
    cfg, (backend, x, d_main, d_guide, g_vec, s_vec, sn_vec, g, s, sn) = _cfg_of(ctx, _restore(ctx), grad)
    n = ctx.needs_input_grad
    dt = x.dtype
    W, S, SN = _coef(g, g_vec, x), _coef(s, s_vec, x), _coef(sn, sn_vec, x)
    # x_next = x + (SN - S) (x - D) / S
    grad_x = grad * (1 + (SN - S) / S) if n[1] else None
    gm, gg, gw = _through_denoiser(grad * (-(SN - S) / S), d_main, d_guide, g_vec, W, dt, (n[2], n[3], n[4]), cfg)
    gs = gsn = None
    if n[5] or n[6]:
        r = x - _denoised(d_main, d_guide, W, dt, cfg)
        gs = _per_sample(grad * (-r * SN / (S * S)), s_vec, n[5])
        gsn = _per_sample(grad * (r / S), sn_vec, n[6])
    return None, grad_x, gm, gg, gw, gs, gsn, None, None, None, cfg.grad_u, cfg.grad_c, None


def _heun_backward(ctx, grad):
    cfg, (backend, x_hat, x_euler, d_main, d_guide, g_vec, s_vec, sn_vec, g, s, sn) = _cfg_of(
        ctx, _restore(ctx), grad)
    n = ctx.needs_input_grad
    dt = x_hat.dtype
    W, S, SN = _coef(g, g_vec, x_hat), _coef(s, s_vec, x_hat), _coef(sn, sn_vec, x_hat)
    # x_next = x_hat + (x_euler - x_hat) / 2 + (SN - S) (x_euler - D) / (2 SN)
    grad_hat = grad * 0.5 if n[1] else None
    grad_euler = grad * (0.5 + 0.5 * (SN - S) / SN) if n[2] else None
    gm, gg, gw = _through_denoiser(grad * (-0.5 * (SN - S) / SN), d_main, d_guide, g_vec, W, dt, (n[3], n[4], n[5]),
                                   cfg)
    gs = gsn = None
    if n[6] or n[7]:
        r = x_euler - _denoised(d_main, d_guide, W, dt, cfg)
        gs = _per_sample(grad * (-0.5 * r / SN), s_vec, n[6])
        gsn = _per_sample(grad * (0.5 * r * S / (SN * SN)), sn_vec, n[7])
    return None, grad_hat, grad_euler, gm, gg, gw, gs, gsn, None, None, None, cfg.grad_u, cfg.grad_c, None


def _score_backward(ctx, grad):
    cfg, (backend, x, d_main, d_guide, g_vec, s_vec, g, s) = _cfg_of(ctx, _restore(ctx), grad)
    n = ctx.needs_input_grad
    dt = x.dtype
    W, S = _coef(g, g_vec, x), _coef(s, s_vec, x)
    # score = (D - x) / S^2
    grad_x = grad * (-1 / (S * S)) if n[1] else None
    gm, gg, gw = _through_denoiser(grad / (S * S), d_main, d_guide, g_vec, W, dt, (n[2], n[3], n[4]), cfg)
    gs = None
    if n[5]:
        r = _denoised(d_main, d_guide, W, dt, cfg) - x
        gs = _per_sample(grad * (-2 * r / (S * S * S)), s_vec, True)
    return None, grad_x, gm, gg, gw, gs, None, None, cfg.grad_u, cfg.grad_c, None


def _multistep_setup(ctx, inputs, output):
    # Only what the derivative reads: the history slots are overwritten in place by the step itself.
    backend, x, d_main, d_guide, h1, h2, g_vec, g, a, b0, b1, b2, d_uncond, c_vec, c = inputs
    ctx.save_for_backward(d_main, d_guide, g_vec, d_uncond, c_vec)
    ctx.scalars = (x.dtype, g, a, b0, b1, b2, c)


def _multistep_backward(ctx, grad, grad_D):
    d_main, d_guide, g_vec, d_uncond, c_vec = ctx.saved_tensors
    dt, g, a, b0, b1, b2, c = ctx.scalars
    n = ctx.needs_input_grad
    W = _coef(g, g_vec, grad)
    cfg = _Cfg(d_uncond, c_vec, c, grad, *_cfg_needs(ctx, 12))
    # x_next = a x + b0 D + b1 h1 + b2 h2, and D itself is the second output.
    grad_D_total = grad * b0 if grad_D is None else grad * b0 + grad_D
    gm, gg, gw = _through_denoiser(grad_D_total, d_main, d_guide, g_vec, W, dt, (n[2], n[3], n[6]), cfg)
    return (None, grad * a if n[1] else None, gm, gg, grad * b1 if n[4] else None, grad * b2 if n[5] else None, gw,
            None, None, None, None, None, cfg.grad_u, cfg.grad_c, None)


guided_denoise.register_autograd(_denoise_backward, setup_context=_setup)
euler_step.register_autograd(_euler_backward, setup_context=_setup)
heun_step.register_autograd(_heun_backward, setup_context=_setup)
guided_score.register_autograd(_score_backward, setup_context=_setup)

multistep_step.register_autograd(_multistep_backward, setup_context=_multistep_setup)

OPS = {"guided_denoise": guided_denoise, "euler_step": euler_step, "heun_step": heun_step,
       "guided_score": guided_score}


def apply(name: str, backend: str, out_dtype, tensors, params, lead=(), trail=(), uncond=None) -> Tensor:
    """The differentiable op ``name`` on the checked operands of a public op (see ops._dispatch)."""
    vecs = [v for _, v in params]
    scalars = [1.0 if s is None else s for s, _ in params]
    d_uncond, (c, c_vec) = (None, (1.0, None)) if uncond is None else uncond
    cfg = (d_uncond, c_vec, 1.0 if c is None else c)
    if name == "multistep_step":
        # The history update is an in-place copy of the op's second output, which autograd records.
        (history,), (a, b0, b1, b2, read1, read2, write) = lead, trail
        h1, h2 = (None if r < 0 else history[r] for r in (read1, read2))
        x_next, D_w = multistep_step(backend, *tensors, h1, h2, vecs[0], scalars[0], a, b0, b1, b2, *cfg)
        if write >= 0:
            history[write].copy_(D_w)
        return x_next
    if name == "guided_denoise":
        d_main, d_guide = tensors
        return guided_denoise(backend, d_main, d_guide, vecs[0], scalars[0], out_dtype, *cfg)
    return OPS[name](backend, *tensors, *vecs, *scalars, *cfg)
