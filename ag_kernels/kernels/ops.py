"""Public guided-step ops: argument checks, one dispatch point, and the backends behind it.

Every op computes, in one pass over memory for the kernel backends, a function of the
guided denoiser output of autoguidance / CFG (Karras et al. 2024, Eq. 1)::

    D_w = d_guide + guidance * (d_main - d_guide)

``d_main`` is the main (conditional) network's output D_1 and ``d_guide`` the guiding
network's output D_0 (a worse model for autoguidance, the unconditional one for CFG).
Autoguidance and CFG together take a third output, the main network's unconditional one D_u
(``d_uncond``), with the CFG weight w_cfg (``cfg_scale``)::

    D = D_1 + (guidance - 1) (D_1 - D_0) + (cfg_scale - 1) (D_1 - D_u)

(the same D_w as above when ``d_uncond`` is None).

Argument rules shared by every op:

* ``d_guide=None`` means no guidance: only ``d_main`` is read and ``guidance`` is ignored.
  A scalar ``guidance == 1`` gives exactly ``d_main`` as well, so ``d_guide`` is not read then.
  Likewise ``d_uncond=None`` (the default) means no CFG term and ``cfg_scale`` is ignored, and a
  scalar ``cfg_scale == 1`` does not read ``d_uncond``.  Without ``d_uncond`` every op gives bitwise
  the result it gave before ``d_uncond`` existed.
* ``guidance``, ``cfg_scale``, ``sigma``, ``sigma_next``: a Python (or NumPy) real number, or a tensor of
  length B = ``x.shape[0]`` with one value per sample (a 0-d tensor applies to all samples).
  Scalars are checked (finite; sigma > 0; sigma_next >= 0, > 0 where it divides).  Tensor
  values are checked the same way when the tensor is on the CPU; on a GPU they are not, since
  reading them would synchronize the device.
* ``x``: float32 or float64.  ``d_main``/``d_guide``/``d_uncond``: float16, bfloat16, float32 or float64,
  with ``x``'s shape and device; they are converted to ``x``'s dtype in registers.
  The result has ``x``'s dtype and shape.
* ``out=``: write the result into this tensor (``x``'s shape, dtype and device); it may be
  ``x`` itself.  Non-contiguous inputs are accepted (the kernel backends copy them to one
  common layout first, which costs an extra pass); empty tensors give empty results.
* ``backend``: "auto" (the fastest available for the device, see :func:`available_backends`),
  "torch" (the PyTorch reference in :mod:`ag_kernels.kernels.reference`), "triton", or "ext" (the
  C++/CUDA extension, when built).
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Tuple

import torch

from . import reference
from ._backends import EXT_OPS, available_backends, resolve_backend
from ._checks import D_DTYPES, X_DTYPES, _batch, _check_inputs, _check_tensor, _dtype_names, _guidance, _param
from ._launch import _kernel_op, _run_kernel, _shares_storage

__all__ = ["guided_denoise", "euler_step", "heun_step", "guided_score", "multistep_step", "available_backends",
           "PreparedSteps"]


# --------------------------------------------------------------------------- fast path
#
# A sampler calls these ops twice per step with small tensors on a GPU or small problems on a
# CPU, where the checks of :mod:`._checks` (tens of microseconds of Python) would cost more than the kernel.
# The common call (plain contiguous tensors, matching shapes, devices and dtypes, finite Python
# numbers) is recognized with O(1) attribute reads and handed straight to the kernel op; every
# other call, including every bad one, takes the checked path below, which raises the errors.

_EXACT_INT = 2**53
_F32_MAX = 3.4e38       # below float32's largest finite value (3.4028235e38)
_F32_TINY = 1.5e-45     # at or above float32's smallest subnormal (1.4e-45): rounds to a nonzero value
# Lower bounds of (guidance, sigma, sigma_next) per op, as _fast_numbers reads them.
_EULER_BOUNDS = (None, 0, "0=")
_HEUN_BOUNDS = (None, 0, 0)
_SCORE_BOUNDS = (None, 0)
_FAST_KERNELS: Dict[Tuple[str, torch.device], Optional[Dict[str, object]]] = {}
_UNRESOLVED = object()


def _kernel_table(backend, device: torch.device) -> Optional[Dict[str, object]]:
    """The kernel ops (name -> OpOverload) that ``backend`` runs on ``device``; None for "torch".

    Backend availability cannot change once ag_kernels is imported (the extension loads at import;
    TRITON_INTERPRET is read then), so each (backend, device) is resolved once.
    """
    key = (backend, device)
    table = _FAST_KERNELS.get(key, _UNRESOLVED) if type(backend) is str else _UNRESOLVED
    if table is _UNRESOLVED:
        chosen = resolve_backend(backend, device)  # raises, naming the backend, if it cannot run here
        table = None if chosen == "torch" else {name: _bound(_kernel_op(chosen, name).default) for name in EXT_OPS}
        _FAST_KERNELS[key] = table
    return table


def _bound(overload):
    """The callable behind an OpOverload (its __call__ only forwards to it: one Python frame less per call)."""
    op = getattr(overload, "_op", None)
    return op if callable(op) else overload


def _fast_floats(guidance, sigma, sigma_next, next_positive: bool) -> bool:
    """True when guidance, sigma and sigma_next are finite Python floats with sigma > 0 and
    sigma_next > 0 (``next_positive``) or >= 0; ints and other numbers go through _fast_numbers."""
    if type(guidance) is float and type(sigma) is float and type(sigma_next) is float:
        # Chained comparisons are False for NaN, so these also reject it.
        # Also within float32's range (sigma not below its smallest subnormal), so no kernel sees 0 or inf.
        return (-_F32_MAX < guidance < _F32_MAX and _F32_TINY <= sigma < _F32_MAX and sigma_next < _F32_MAX
                and (sigma_next >= _F32_TINY if next_positive else sigma_next >= _F32_TINY or sigma_next == 0.0))
    return _fast_numbers(_HEUN_BOUNDS if next_positive else _EULER_BOUNDS, guidance, sigma, sigma_next)


def _fast_tensors(ref, ref_dtypes, others, out, out_dtype) -> bool:
    """True when the tensors make the common call: not traced; ``ref`` (x, or d_main for
    guided_denoise) a plain contiguous non-empty tensor with its dtype in ``ref_dtypes``;
    ``others`` plain contiguous tensors of ref's shape and device in the four float dtypes; ``out``
    None, or likewise with ``out_dtype``, touching no operand's memory unless it is the very same
    view (an in-place step)."""
    if type(ref) is not torch.Tensor or ref.dtype not in ref_dtypes or not ref.is_contiguous() or _compiling():
        return False
    if _grad_enabled() and (ref.requires_grad or (type(out) is torch.Tensor and out.requires_grad)
                            or any(t.requires_grad for t in others if type(t) is torch.Tensor)):
        return False  # the checked path differentiates, or says why out= cannot be used
    shape, device = ref.shape, ref.device
    for t in others:
        if (type(t) is not torch.Tensor or t.dtype not in D_DTYPES or t.shape != shape
                or t.device != device or not t.is_contiguous()):
            return False
    if out is None:
        return ref.numel() > 0
    if (type(out) is not torch.Tensor or out.dtype is not out_dtype or out.shape != shape
            or out.device != device or not out.is_contiguous()):
        return False
    return out.nbytes > 0 and _spans_apart(out, (ref, *others))


def _spans_apart(out, operands) -> bool:
    """For contiguous tensors, which occupy one span of memory each: True when ``out`` overlaps no
    operand (None: absent) unless it coincides with it (the same view: same start and dtype)."""
    start = out.data_ptr()
    end = start + out.nbytes
    for t in operands:
        if t is None:
            continue
        p = t.data_ptr()
        if p == start:
            if t.dtype is not out.dtype:
                return False
        elif p < end and start < p + t.nbytes:
            return False
    return True


def _fast_numbers(lower_bounds, *values) -> bool:
    """True when every value is a plain Python number within float32's range above its lower
    bound (0: > 0, None: any, "0=": >= 0); anything else goes the checked path."""
    for v, lower in zip(values, lower_bounds):
        t = type(v)
        if t is float:
            # Within float32's range (NaN fails too), and not so small that float32 rounds it to 0.
            if not -_F32_MAX < v < _F32_MAX or (v != 0.0 and -_F32_TINY < v < _F32_TINY):
                return False
        elif t is not int or not -_EXACT_INT < v < _EXACT_INT:  # huge ints: the checked path says why
            return False
        if lower == 0 and not v > 0:
            return False
        if lower == "0=" and not v >= 0:
            return False
    return True


def _fast_cfg(d_uncond, d_main, cfg_scale):
    """The kernel op's trailing CFG arguments (d_uncond, None, c) for the common call with d_uncond: a
    plain-number weight c and d_uncond in d_main's dtype (d_uncond None where c == 1: not read); None for
    any other call, which takes the checked path.  (Callers pass () themselves without d_uncond.)"""
    if (type(d_uncond) is not torch.Tensor or type(d_main) is not torch.Tensor or d_uncond.dtype is not d_main.dtype
            or not _fast_numbers((None,), cfg_scale)):
        return None
    c = float(cfg_scale)
    return (None if c == 1.0 else d_uncond, None, c)


def _outputs(d_guide, d_uncond, lead=()):
    """The operands ``lead`` and the optional network outputs that are present, for _fast_tensors."""
    if d_uncond is None:
        return lead if d_guide is None else lead + (d_guide,)
    return lead + ((d_uncond,) if d_guide is None else (d_guide, d_uncond))


_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled


# --------------------------------------------------------------------------- dispatch


def _needs_grad(tensors, params) -> bool:
    """Grad mode is on and some operand (a tensor or a per-sample coefficient) requires grad."""
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors) or any(
        v is not None and v.requires_grad for _, v in params)


def _dispatch(name, ref, out_dtype, out, tensors, params, backend, reference_fn, lead=(), trail=(), uncond=None):
    """Run op ``name`` on the chosen backend; return ``out`` or a new tensor.

    ``ref``: the tensor giving shape, device and layout (x, or d_main for guided_denoise);
    ``tensors``: the op's tensor operands in kernel order (x, [x_euler], d_main, d_guide);
    ``params``: the normalized (scalar, vector) pairs of guidance[, sigma[, sigma_next]];
    ``reference_fn``: computes the result with the PyTorch reference;
    ``lead``/``trail``: the multistep op's history and its coefficients and slots (see _run_kernel);
    ``uncond``: None, or (d_uncond, (scalar, vector) of cfg_scale) when the CFG term is read.
    """
    grad = _needs_grad(tensors if uncond is None else [*tensors, uncond[0]],
                       params if uncond is None else [*params, uncond[1]])
    if out is not None:
        _check_tensor("out", out, (out_dtype,), ref, "the result")
        if not torch.compiler.is_compiling() and torch._debug_has_internal_overlap(out) == 1:
            raise ValueError("out has overlapping memory (an expanded tensor?); pass a tensor with distinct elements")
        # As torch's own out= ops: no derivatives through out=, on every backend alike.
        if grad:
            raise ValueError("out=: an operand requires grad, and results written into out= are not "
                             "differentiated; call without out= (or under torch.no_grad())")
        if out.requires_grad and torch.is_grad_enabled():
            raise ValueError("out= is a tensor that requires grad; writing into it in place would break "
                             "autograd; pass one that does not, or call under torch.no_grad()")
    chosen = resolve_backend(backend, ref.device)

    if ref.numel() == 0 and not grad:
        return out if out is not None else torch.empty(ref.shape, dtype=out_dtype, device=ref.device)

    if chosen == "torch":
        result = reference_fn()
        if out is None:
            return result
        out.copy_(result)
        return out
    if grad:
        from . import _autograd

        return _autograd.apply(name, chosen, out_dtype, tensors, params, lead, trail, uncond)
    return _run_kernel(name, chosen, ref, out_dtype, out, tensors, params, lead, trail, uncond)


# --------------------------------------------------------------------------- public ops


def guided_denoise(
    d_main: torch.Tensor,
    d_guide: Optional[torch.Tensor],
    guidance,
    *,
    dtype: torch.dtype = torch.float32,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
    d_uncond: Optional[torch.Tensor] = None,
    cfg_scale=1.0,
) -> torch.Tensor:
    """Guided denoiser output D_w = d_guide + guidance * (d_main - d_guide), computed in ``dtype``;
    with ``d_uncond``, D = D_w + (cfg_scale - 1) * (d_main - d_uncond).

    Args:
        d_main: the main network's output D_1 (float16/bfloat16/float32/float64).
        d_guide: the guiding network's output D_0 with d_main's shape, or None for no guidance.
        guidance: the weight w: a number, or a tensor of length d_main.shape[0] (per sample).
        dtype: float32 or float64: the dtype of the computation and of the result.
        d_uncond: the main network's unconditional output D_u (d_main's shape), or None for no CFG.
        cfg_scale: the CFG weight w_cfg (number or per-sample tensor); ignored without d_uncond.
        out: optional result tensor (d_main's shape, ``dtype``).
        backend: "auto", "torch", "triton" or "ext".

    Returns:
        D_w, as a new tensor or in ``out``.

    Raises:
        TypeError: an operand of the wrong type or dtype, or ``dtype`` not float32/float64.
        ValueError: shapes, devices or per-sample lengths that do not match, a non-finite weight, ``out``
            partly overlapping an input, ``out=`` while an operand requires grad, or a backend that is
            unknown or unavailable on the device.
    """
    cfg = () if d_uncond is None else _fast_cfg(d_uncond, d_main, cfg_scale)
    if cfg is not None and dtype in X_DTYPES and _fast_numbers((None,), guidance) \
            and _fast_tensors(d_main, D_DTYPES, _outputs(d_guide, d_uncond), out, dtype):
        kernels = _kernel_table(backend, d_main.device)
        if kernels is not None:
            out = torch.empty(d_main.shape, dtype=dtype, device=d_main.device) if out is None else out
            w = 1.0 if d_guide is None else float(guidance)
            kernels["guided_denoise"](out, d_main, None if w == 1.0 else d_guide, None, w, *cfg)
            return out
    if dtype not in X_DTYPES:
        raise TypeError(f"dtype must be {_dtype_names(X_DTYPES)}, got {dtype}")
    _check_tensor("d_main", d_main, D_DTYPES)
    if d_guide is not None:
        _check_tensor("d_guide", d_guide, D_DTYPES, d_main, "d_main")
    if d_uncond is not None:
        _check_tensor("d_uncond", d_uncond, D_DTYPES, d_main, "d_main")
    batch, device = _batch(d_main), d_main.device
    d_guide, g = _guidance(d_guide, guidance, batch, device, dtype)
    d_uncond, c = _guidance(d_uncond, cfg_scale, batch, device, dtype, "cfg_scale")
    return _dispatch(
        "guided_denoise", d_main, dtype, out, [d_main, d_guide], [g], backend,
        lambda: reference.torch_guided_denoise(d_main, d_guide, _value(g), dtype, **_cfg(d_uncond, c)),
        uncond=_uncond(d_uncond, c),
    )


def euler_step(
    x: torch.Tensor,
    d_main: torch.Tensor,
    d_guide: Optional[torch.Tensor],
    guidance,
    sigma,
    sigma_next,
    *,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
    d_uncond: Optional[torch.Tensor] = None,
    cfg_scale=1.0,
) -> torch.Tensor:
    """One Euler step of the EDM probability-flow ODE with the guided denoiser.

    Computes ``x + (sigma_next - sigma) * (x - D_w) / sigma`` where d_main/d_guide are the two
    networks' outputs at (x, sigma) and D_w = d_guide + guidance * (d_main - d_guide).

    Args:
        x: the current sample x_hat (float32/float64).
        d_main: the main network's output D_1 at (x, sigma), any float dtype, x's shape.
        d_guide: the guiding network's output D_0 at (x, sigma), or None for no guidance.
        guidance: the weight w (number or per-sample tensor [B]).
        sigma: the current noise level t_hat (> 0; number or per-sample tensor).
        sigma_next: the next noise level t_next (>= 0; 0 on the last step of a schedule).
        out: optional result tensor (x's shape and dtype); may be ``x`` itself.
        backend: "auto", "torch", "triton" or "ext".
        d_uncond: the main network's unconditional output D_u at the same point (x's shape), or None
            for no CFG term (the default).
        cfg_scale: the CFG weight w_cfg (number or per-sample tensor [B]); ignored without d_uncond.

    Returns:
        x_next (the Euler prediction x'), as a new tensor or in ``out``.

    Raises:
        TypeError: an operand of the wrong type or dtype.
        ValueError: shapes, devices or per-sample lengths that do not match, sigma not > 0, sigma_next < 0
            or a non-finite coefficient, ``out`` partly overlapping an input, ``out=`` while an operand
            requires grad, or a backend that is unknown or unavailable on the device.
    """
    cfg = () if d_uncond is None else _fast_cfg(d_uncond, d_main, cfg_scale)
    if cfg is not None and _fast_floats(guidance, sigma, sigma_next, False) and _fast_tensors(
            x, X_DTYPES, ((d_main,) if d_guide is None else (d_main, d_guide)) if d_uncond is None
            else _outputs(d_guide, d_uncond, (d_main,)), out, x.dtype):
        kernels = _kernel_table(backend, x.device)
        if kernels is not None:
            out = torch.empty_like(x) if out is None else out
            w = 1.0 if d_guide is None else float(guidance)
            kernels["euler_step"](out, x, d_main, None if w == 1.0 else d_guide, None, None, None, w, sigma,
                                  sigma_next, *cfg)
            return out
    _check_inputs("x", x, d_main, d_guide, d_uncond=d_uncond)
    batch, device = _batch(x), x.device
    d_guide, g = _guidance(d_guide, guidance, batch, device, x.dtype)
    d_uncond, c = _guidance(d_uncond, cfg_scale, batch, device, x.dtype, "cfg_scale")
    s = _param("sigma", sigma, batch, device, lower="positive", dtype=x.dtype)
    sn = _param("sigma_next", sigma_next, batch, device, lower="nonnegative", dtype=x.dtype)
    return _dispatch(
        "euler_step", x, x.dtype, out, [x, d_main, d_guide], [g, s, sn], backend,
        lambda: reference.torch_euler_step(x, d_main, d_guide, _value(g), _value(s), _value(sn),
                                           **_cfg(d_uncond, c)),
        uncond=_uncond(d_uncond, c),
    )


def heun_step(
    x_hat: torch.Tensor,
    x_euler: torch.Tensor,
    d_main: torch.Tensor,
    d_guide: Optional[torch.Tensor],
    guidance,
    sigma,
    sigma_next,
    *,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
    d_uncond: Optional[torch.Tensor] = None,
    cfg_scale=1.0,
) -> torch.Tensor:
    """Heun's 2nd-order correction of the EDM sampler with the guided denoiser.

    ``x_euler`` is what :func:`euler_step` returned from ``x_hat``; d_main/d_guide are the
    networks' outputs at (x_euler, sigma_next).  Computes
    ``x_hat + (sigma_next - sigma) * (d_cur + d_prime) / 2`` with
    ``d_prime = (x_euler - D_w) / sigma_next`` and ``(sigma_next - sigma) * d_cur`` taken as
    ``x_euler - x_hat`` (exact for an Euler step; no division by the step size, so it stays
    accurate down to the smallest sigma of a schedule).

    Args:
        x_hat: the sample at the start of the step (float32/float64).
        x_euler: the Euler prediction at sigma_next (x_hat's shape and dtype).
        d_main: the main network's output D_1 at (x_euler, sigma_next), any float dtype.
        d_guide: the guiding network's output D_0 there, or None for no guidance.
        guidance: the weight w (number or per-sample tensor [B]).
        sigma: the noise level t_hat at x_hat (> 0).
        sigma_next: the noise level t_next at x_euler (> 0: it divides).
        out: optional result tensor (x_hat's shape and dtype); may be x_hat or x_euler.
        backend: "auto", "torch", "triton" or "ext".
        d_uncond: the main network's unconditional output D_u at (x_euler, sigma_next), or None
            for no CFG term (the default).
        cfg_scale: the CFG weight w_cfg (number or per-sample tensor [B]); ignored without d_uncond.

    Returns:
        x_next, as a new tensor or in ``out``.

    Raises:
        TypeError: an operand of the wrong type or dtype.
        ValueError: shapes, devices or per-sample lengths that do not match, sigma or sigma_next not > 0 or
            a non-finite coefficient, ``out`` partly overlapping an input, ``out=`` while an operand
            requires grad, or a backend that is unknown or unavailable on the device.
    """
    cfg = () if d_uncond is None else _fast_cfg(d_uncond, d_main, cfg_scale)
    if cfg is not None and _fast_floats(guidance, sigma, sigma_next, True) and _fast_tensors(
            x_hat, X_DTYPES, ((x_euler, d_main) if d_guide is None else (x_euler, d_main, d_guide)) if d_uncond is None
            else _outputs(d_guide, d_uncond, (x_euler, d_main)), out, x_hat.dtype) \
            and x_euler.dtype is x_hat.dtype:
        kernels = _kernel_table(backend, x_hat.device)
        if kernels is not None:
            out = torch.empty_like(x_hat) if out is None else out
            w = 1.0 if d_guide is None else float(guidance)
            kernels["heun_step"](out, x_hat, x_euler, d_main, None if w == 1.0 else d_guide, None, None, None, w,
                                 sigma, sigma_next, *cfg)
            return out
    _check_inputs("x_hat", x_hat, d_main, d_guide, extra=[("x_euler", x_euler)], d_uncond=d_uncond)
    batch, device = _batch(x_hat), x_hat.device
    d_guide, g = _guidance(d_guide, guidance, batch, device, x_hat.dtype)
    d_uncond, c = _guidance(d_uncond, cfg_scale, batch, device, x_hat.dtype, "cfg_scale")
    s = _param("sigma", sigma, batch, device, lower="positive", dtype=x_hat.dtype)
    sn = _param("sigma_next", sigma_next, batch, device, lower="positive", dtype=x_hat.dtype)
    return _dispatch(
        "heun_step", x_hat, x_hat.dtype, out, [x_hat, x_euler, d_main, d_guide], [g, s, sn], backend,
        lambda: reference.torch_heun_step(x_hat, x_euler, d_main, d_guide, _value(g), _value(s), _value(sn),
                                          **_cfg(d_uncond, c)),
        uncond=_uncond(d_uncond, c),
    )


def guided_score(
    x: torch.Tensor,
    d_main: torch.Tensor,
    d_guide: Optional[torch.Tensor],
    guidance,
    sigma,
    *,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
    d_uncond: Optional[torch.Tensor] = None,
    cfg_scale=1.0,
) -> torch.Tensor:
    """Score of the guided model, (D_w - x) / sigma**2.

    Args:
        x: the noisy sample (float32/float64).
        d_main: the main network's output D_1 at (x, sigma), any float dtype, x's shape.
        d_guide: the guiding network's output D_0 at (x, sigma), or None for no guidance.
        guidance: the weight w (number or per-sample tensor [B]).
        sigma: the noise level (> 0; number or per-sample tensor).
        out: optional result tensor (x's shape and dtype); may be ``x`` itself.
        backend: "auto", "torch", "triton" or "ext".
        d_uncond: the main network's unconditional output D_u at the same point (x's shape), or None
            for no CFG term (the default).
        cfg_scale: the CFG weight w_cfg (number or per-sample tensor [B]); ignored without d_uncond.

    Returns:
        The score, as a new tensor or in ``out``.

    Raises:
        TypeError: an operand of the wrong type or dtype.
        ValueError: shapes, devices or per-sample lengths that do not match, sigma not > 0 or a non-finite
            coefficient, ``out`` partly overlapping an input, ``out=`` while an operand requires grad, or a
            backend that is unknown or unavailable on the device.
    """
    cfg = () if d_uncond is None else _fast_cfg(d_uncond, d_main, cfg_scale)
    if cfg is not None and _fast_numbers(_SCORE_BOUNDS, guidance, sigma) and _fast_tensors(
            x, X_DTYPES, ((d_main,) if d_guide is None else (d_main, d_guide)) if d_uncond is None
            else _outputs(d_guide, d_uncond, (d_main,)), out, x.dtype):
        kernels = _kernel_table(backend, x.device)
        if kernels is not None:
            out = torch.empty_like(x) if out is None else out
            w = 1.0 if d_guide is None else float(guidance)
            kernels["guided_score"](out, x, d_main, None if w == 1.0 else d_guide, None, None, w, sigma, *cfg)
            return out
    _check_inputs("x", x, d_main, d_guide, d_uncond=d_uncond)
    batch, device = _batch(x), x.device
    d_guide, g = _guidance(d_guide, guidance, batch, device, x.dtype)
    d_uncond, c = _guidance(d_uncond, cfg_scale, batch, device, x.dtype, "cfg_scale")
    s = _param("sigma", sigma, batch, device, lower="positive", dtype=x.dtype)
    return _dispatch(
        "guided_score", x, x.dtype, out, [x, d_main, d_guide], [g, s], backend,
        lambda: reference.torch_guided_score(x, d_main, d_guide, _value(g), _value(s), **_cfg(d_uncond, c)),
        uncond=_uncond(d_uncond, c),
    )


def multistep_step(
    x: torch.Tensor,
    d_main: torch.Tensor,
    d_guide: Optional[torch.Tensor],
    guidance,
    history: torch.Tensor,
    a,
    b,
    *,
    read=(),
    write: Optional[int] = None,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
    corrector=None,
    corrected: Optional[torch.Tensor] = None,
    d_uncond: Optional[torch.Tensor] = None,
    cfg_scale=1.0,
) -> torch.Tensor:
    """One step of a linear multistep solver (data-prediction form) with the guided denoiser.

    Computes ``x_next = a x + b[0] D_w + b[1] history[read[0]] + b[2] history[read[1]]`` (summed in
    that order) with D_w = d_guide + guidance * (d_main - d_guide), then stores D_w in
    ``history[write]``: the history the next step reads.  DPM-Solver++(2M)/(3M) (Lu et al. 2022)
    and Euler are of this form; :mod:`ag_kernels.sampling` forms their coefficients per step.
    Every history slot is read before D_w is written, so ``write`` may be one of ``read``.

    Args:
        x: the sample at the step's noise level (float32/float64).
        d_main: the main network's output D_1 at x, any float dtype, x's shape.
        d_guide: the guiding network's output D_0 at x, or None for no guidance.
        guidance: the weight w (number or per-sample tensor [B]).
        history: the earlier denoised outputs, a contiguous tensor [K, *x.shape] in x's dtype, K >= 1,
            updated in place; slots that are not read may hold anything (they are not read).
        a: the coefficient of x (a real number).
        b: 1 to 3 real numbers: the coefficients of D_w and of the slots in ``read``.
        read: len(b) - 1 slot indices into history.
        write: the slot that receives D_w, or None.
        out: optional result tensor (x's shape and dtype); may be ``x`` itself, not history.
        backend: "auto", "torch", "triton" or "ext".
        corrector: None, or ``(a_c, c)`` with c 1 to 3 real numbers: a predictor-corrector step
            (UniPC, Zhao et al. 2023).  ``x`` is then the previous corrected sample; the op first
            forms ``x_c = a_c x + c[0] D_w + c[1] history[read[0]] + c[2] history[read[1]]``, writes it
            into ``corrected``, and predicts ``x_next`` from x_c (in place of x) as above.  b and c are
            zero-padded to the slots read: ``read`` names max(len(b), len(c)) - 1 slots.
        corrected: with ``corrector``, the tensor that receives x_c (x's shape and dtype); may be ``x``
            itself, not ``out`` or history.
        d_uncond: the main network's unconditional output D_u at the same point (x's shape), or None
            for no CFG term (the default).
        cfg_scale: the CFG weight w_cfg (number or per-sample tensor [B]); ignored without d_uncond.

    Returns:
        x_next, as a new tensor or in ``out``.

    Raises:
        TypeError: an operand of the wrong type or dtype, or ``b`` not a tuple of 1 to 3 numbers.
        ValueError: shapes, devices or per-sample lengths that do not match; ``history`` of the wrong shape,
            device or layout, or sharing memory with an operand; ``read``/``write`` not slots of it; a
            non-finite coefficient, ``out`` partly overlapping an input, ``out=`` while an operand requires
            grad, or a backend that is unknown or unavailable on the device.
    """
    _check_inputs("x", x, d_main, d_guide, d_uncond=d_uncond)
    _check_tensor("history", history, (x.dtype,))
    if history.dim() != x.dim() + 1 or history.shape[1:] != x.shape or history.shape[0] < 1:
        raise ValueError(f"history must have shape (K, *x.shape) = (K, {', '.join(map(str, x.shape))}) with K >= 1, "
                         f"got {tuple(history.shape)}")
    if history.device != x.device:
        raise ValueError(f"history is on {history.device} but x is on {x.device}; put them on one device")
    if not history.is_contiguous():
        raise ValueError("history must be contiguous (it is updated in place, one slot per earlier step)")
    for name, t in (("x", x), ("d_main", d_main), ("d_guide", d_guide), ("d_uncond", d_uncond), ("out", out)):
        if isinstance(t, torch.Tensor) and t.numel() and history.numel() and _shares_storage(t, history):
            raise ValueError(f"{name} shares memory with history; pass a separate tensor")
    slots = history.shape[0]
    a = _coefficient("a", a)
    b = _coefficients("b", b)
    terms = len(b)
    if corrector is not None:
        if not isinstance(corrector, (tuple, list)) or len(corrector) != 2:
            raise TypeError(f"corrector must be a pair (a_c, c) or None, got {corrector!r}")
        a_c = _coefficient("corrector[0]", corrector[0])
        c = _coefficients("corrector[1]", corrector[1])
        terms = max(terms, len(c))
        _check_corrected(corrected, x, history, d_main, d_guide, out, d_uncond)
    elif corrected is not None:
        raise ValueError("corrected is given but corrector is None; pass both or neither")
    if not isinstance(read, (tuple, list)) or len(read) != terms - 1:
        what = "len(b) - 1" if corrector is None else "max(len(b), len(corrector[1])) - 1"
        raise ValueError(f"read must name {what} = {terms - 1} history slots, got {read!r}")
    for name, k in [(f"read[{j}]", r) for j, r in enumerate(read)] + ([("write", write)] if write is not None else []):
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k < slots:
            raise ValueError(f"{name} must be a history slot, an int in [0, {slots}), got {k!r}")
    batch, device = _batch(x), x.device
    d_guide, g = _guidance(d_guide, guidance, batch, device, x.dtype)
    d_uncond, cfg = _guidance(d_uncond, cfg_scale, batch, device, x.dtype, "cfg_scale")
    b = b + (0.0,) * (terms - len(b))
    coefficients = (a,) + b + (0.0,) * (3 - len(b))
    slots_used = tuple(int(r) for r in read) + (-1,) * (2 - len(read)) + (-1 if write is None else int(write),)

    if corrector is None:
        def reference_fn():
            x_next, D_w = reference.torch_multistep_step(x, d_main, d_guide, _value(g), a, b,
                                                         [history[r] for r in read], **_cfg(d_uncond, cfg))
            if write is not None:
                history[write].copy_(D_w)
            return x_next

        return _dispatch("multistep_step", x, x.dtype, out, [x, d_main, d_guide], [g], backend, reference_fn,
                         lead=(history,), trail=coefficients + slots_used, uncond=_uncond(d_uncond, cfg))

    c = c + (0.0,) * (terms - len(c))

    def reference_fn():
        x_next, x_c, D_w = reference.torch_unipc_step(x, d_main, d_guide, _value(g), a_c, c, a, b,
                                                      [history[r] for r in read], **_cfg(d_uncond, cfg))
        corrected.copy_(x_c)
        if write is not None:
            history[write].copy_(D_w)
        return x_next

    if _needs_grad([x, d_main, d_guide, d_uncond], [g, cfg]):
        backend = "torch"  # differentiated through the reference (the kernels have no corrector derivative)
    # The kernel writes x_c in place when `corrected` is laid out as the operands are (contiguous, or
    # x itself); otherwise into a scratch tensor copied out after.
    direct = corrected.is_contiguous() and (x.is_contiguous() or not _shares_storage(corrected, x))
    target = corrected if direct else torch.empty(x.shape, dtype=x.dtype, device=device)
    result = _dispatch("multistep_step", x, x.dtype, out, [x, d_main, d_guide], [g], backend, reference_fn,
                       lead=(history,), trail=coefficients + slots_used + (target, a_c) + c + (0.0,) * (3 - len(c)),
                       uncond=_uncond(d_uncond, cfg))
    if target is not corrected and resolve_backend(backend, device) != "torch" and x.numel():
        corrected.copy_(target)
    return result


def _coefficients(name: str, values) -> Tuple[float, ...]:
    if not isinstance(values, (tuple, list)) or not 1 <= len(values) <= 3:
        raise TypeError(f"{name} must be a tuple of 1 to 3 real numbers, got {values!r}")
    return tuple(_coefficient(f"{name}[{k}]", v) for k, v in enumerate(values))


def _check_corrected(corrected, x, history, d_main, d_guide, out, d_uncond=None) -> None:
    """``corrected``: x's shape, dtype and device; x itself (the same view) or apart from every operand."""
    if corrected is None:
        raise ValueError("corrector is given but corrected is None: pass the tensor that receives the corrected "
                         "sample (it may be x itself)")
    _check_tensor("corrected", corrected, (x.dtype,), x, "x")
    if corrected.numel() and torch._debug_has_internal_overlap(corrected) == 1:
        raise ValueError("corrected has overlapping memory (an expanded tensor?); pass a tensor with distinct elements")
    for name, t in (("history", history), ("d_main", d_main), ("d_guide", d_guide), ("d_uncond", d_uncond), ("out", out),
                    ("x", x)):
        if not isinstance(t, torch.Tensor) or not t.numel() or not corrected.numel():
            continue
        if name == "x" and corrected.data_ptr() == x.data_ptr() and corrected.stride() == x.stride():
            continue  # in place: each element of x is read before its corrected value is written
        if _shares_storage(corrected, t):
            raise ValueError(f"corrected shares memory with {name}; pass a separate tensor (or x itself)")


def _coefficient(name: str, value) -> float:
    """A multistep coefficient: a finite real number (the solver forms it on the host, in float64)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _value(param):
    """The (scalar, vector) pair as the reference takes it: the vector if any, else the number."""
    scalar, vec = param
    return scalar if vec is None else vec


def _cfg(d_uncond, c) -> Dict[str, object]:
    """The reference's CFG keywords: none at all without d_uncond (the two-output path, unchanged)."""
    return {} if d_uncond is None else {"d_uncond": d_uncond, "cfg_scale": _value(c)}


def _uncond(d_uncond, c):
    """_dispatch's ``uncond``: (d_uncond, cfg_scale's (scalar, vector)), or None when the CFG term is absent."""
    return None if d_uncond is None else (d_uncond, c)


# --------------------------------------------------------------------------- prepared steps


class PreparedSteps:
    """The Euler and Heun steps of one sampler run, with every check that cannot change within
    the run done once, here.

    A sampler makes one for its sample ``x`` (its shape, dtype and device) and ``backend``, then
    calls :meth:`euler` and :meth:`heun` twice per step.  Those take the run's own buffers, noise
    levels the sampler has checked (t_hat > 0, t_next >= 0, > 0 for Heun) and the networks'
    outputs checked for dtype, shape and device (the sampler does that per call, as they are new
    every step); what remains per call is the layout and aliasing of the networks' outputs.  The
    common step goes straight to the backend's kernel op; any other falls back to the public op,
    which checks and lays out everything.

    Args:
        x: a sample of the run (float32/float64): its dtype and device fix the kernels.
        backend: "auto", "torch", "triton" or "ext".

    Raises:
        TypeError: ``x`` is not a float32/float64 tensor.
        ValueError: a backend that is unknown or unavailable on ``x``'s device.
    """

    def __init__(self, x: torch.Tensor, *, backend: str = "auto"):
        _check_tensor("x", x, X_DTYPES)
        self.backend = backend
        # Kernel ops by name; None for the torch backend, or while torch.compile traces (the
        # public ops are what it traces).
        self._kernels = None if _compiling() else _kernel_table(backend, x.device)

    def _direct(self, out, operands, d_uncond=None, d_main=None) -> bool:
        """The kernel can run on these as they are: contiguous, out overlapping none but as the same view
        (and d_uncond, if any, in d_main's dtype, as every kernel reads it)."""
        if self._kernels is None or not out.is_contiguous():
            return False
        if d_uncond is not None:
            if d_uncond.dtype is not d_main.dtype:
                return False
            operands = (*operands, d_uncond)
        # With autograd in play the public op differentiates, or says why out= cannot be used.
        grad = _grad_enabled()
        if grad and out.requires_grad:
            return False
        for t in operands:
            if t is not None and (not t.is_contiguous() or grad and t.requires_grad):
                return False
        return _spans_apart(out, operands)

    def euler(self, x_hat, d_main, d_guide, w, t_hat: float, t_next: float, out: torch.Tensor, *,
              d_uncond: Optional[torch.Tensor] = None, cfg_scale=1.0) -> torch.Tensor:
        """``out`` = the Euler step from (x_hat, t_hat) to t_next; ``w``: a number or a per-sample tensor
        (ignored when d_guide is None); ``cfg_scale`` likewise for ``d_uncond``."""
        if self._direct(out, (x_hat, d_main, d_guide), d_uncond, d_main):
            g, g_vec = _weight(d_guide, w)
            self._kernels["euler_step"](out, x_hat, d_main, d_guide, g_vec, None, None, g, t_hat, t_next,
                                        *_cfg_weight(d_uncond, cfg_scale))
            return out
        return euler_step(x_hat, d_main, d_guide, w, t_hat, t_next, out=out, backend=self.backend,
                          d_uncond=d_uncond, cfg_scale=cfg_scale)

    def heun(self, x_hat, x_euler, d_main, d_guide, w, t_hat: float, t_next: float, out: torch.Tensor, *,
             d_uncond: Optional[torch.Tensor] = None, cfg_scale=1.0) -> torch.Tensor:
        """``out`` = Heun's correction of the step from (x_hat, t_hat), networks evaluated at (x_euler, t_next)."""
        if self._direct(out, (x_hat, x_euler, d_main, d_guide), d_uncond, d_main):
            g, g_vec = _weight(d_guide, w)
            self._kernels["heun_step"](out, x_hat, x_euler, d_main, d_guide, g_vec, None, None, g, t_hat, t_next,
                                       *_cfg_weight(d_uncond, cfg_scale))
            return out
        return heun_step(x_hat, x_euler, d_main, d_guide, w, t_hat, t_next, out=out, backend=self.backend,
                         d_uncond=d_uncond, cfg_scale=cfg_scale)


    def multistep(self, x, d_main, d_guide, w, history, step, out: torch.Tensor,
                  corrected: Optional[torch.Tensor] = None, *, d_uncond: Optional[torch.Tensor] = None,
                  cfg_scale=1.0) -> torch.Tensor:
        """``out`` = the multistep update ``step`` (a, b, read, write and an optional corrector whose
        x_c goes to ``corrected``: see :func:`multistep_step`) from x."""
        kernel = None if self._kernels is None else self._kernels.get("multistep_step")
        ms = step.corrector
        if kernel is not None and self._direct(out, (x, d_main, d_guide), d_uncond, d_main) and (
                ms is None or corrected is x and self._direct(corrected, (d_main, d_guide, out), d_uncond, d_main)):
            g, g_vec = _weight(d_guide, w)
            b = step.b + (0.0,) * (3 - len(step.b))
            read = step.read + (-1,) * (2 - len(step.read))
            cfg = {} if d_uncond is None else dict(zip(("d_uncond", "c_vec", "c"), _cfg_weight(d_uncond, cfg_scale)))
            if ms is None:
                kernel(out, history, x, d_main, d_guide, g_vec, g, step.a, *b, *read, step.write, **cfg)
            else:
                c = ms[1] + (0.0,) * (3 - len(ms[1]))
                kernel(out, history, x, d_main, d_guide, g_vec, g, step.a, *b, *read, step.write, corrected, ms[0], *c,
                       **cfg)
            return out
        return multistep_step(x, d_main, d_guide, w, history, step.a, step.b, read=step.read, write=step.write,
                              out=out, backend=self.backend, corrector=ms, corrected=corrected, d_uncond=d_uncond,
                              cfg_scale=cfg_scale)


def _weight(d_guide, w):
    """(scalar, per-sample tensor or None) of a checked guidance weight, as the kernel ops take it."""
    if d_guide is None:
        return 1.0, None
    if isinstance(w, torch.Tensor):
        return 1.0, w
    return float(w), None


def _cfg_weight(d_uncond, cfg_scale):
    """The kernel ops' trailing CFG arguments (d_uncond, c_vec, c) of a checked weight; () without d_uncond."""
    if d_uncond is None:
        return ()
    c, c_vec = _weight(d_uncond, cfg_scale)
    return d_uncond, c_vec, c
