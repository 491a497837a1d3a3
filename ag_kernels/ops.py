"""Public guided-step ops: argument checks, one dispatch point, and the backends behind it.

Every op computes, in one pass over memory for the kernel backends, a function of the
guided denoiser output of autoguidance / CFG (Karras et al. 2024, Eq. 1)::

    D_w = d_guide + guidance * (d_main - d_guide)

``d_main`` is the main (conditional) network's output D_1 and ``d_guide`` the guiding
network's output D_0 (a worse model for autoguidance, the unconditional one for CFG).

Argument rules shared by every op:

* ``d_guide=None`` means no guidance: only ``d_main`` is read and ``guidance`` is ignored.
  A scalar ``guidance == 1`` gives exactly ``d_main`` as well, so ``d_guide`` is not read then.
* ``guidance``, ``sigma``, ``sigma_next``: a Python (or NumPy) real number, or a tensor of
  length B = ``x.shape[0]`` with one value per sample (a 0-d tensor applies to all samples).
  Scalars are checked (finite; sigma > 0; sigma_next >= 0, > 0 where it divides).  Tensor
  values are checked the same way when the tensor is on the CPU; on a GPU they are not, since
  reading them would synchronize the device.
* ``x``: float32 or float64.  ``d_main``/``d_guide``: float16, bfloat16, float32 or float64,
  with ``x``'s shape and device; they are converted to ``x``'s dtype in registers.
  The result has ``x``'s dtype and shape.
* ``out=``: write the result into this tensor (``x``'s shape, dtype and device); it may be
  ``x`` itself.  Non-contiguous inputs are accepted (the kernel backends copy them to one
  common layout first, which costs an extra pass); empty tensors give empty results.
* ``backend``: "auto" (the fastest available for the device, see :func:`available_backends`),
  "torch" (the PyTorch reference in :mod:`ag_kernels.reference`), "triton", or "ext" (the
  C++/CUDA extension, when built).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch

from . import reference
from ._backends import available_backends, resolve_backend

__all__ = ["guided_denoise", "euler_step", "heun_step", "guided_score", "available_backends"]

X_DTYPES = (torch.float32, torch.float64)
D_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# --------------------------------------------------------------------------- argument checks


def _dtype_names(dtypes) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


def _check_tensor(name: str, t, dtypes, like: Optional[torch.Tensor] = None, like_name: str = "x") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_dtype_names(dtypes)}, got {t.dtype}")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(t.shape)}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}; put them on one device")


def _checking_values() -> bool:
    # Value checks read tensor data; inside torch.compile tracing they would break the graph.
    return not torch.compiler.is_compiling()


def _check_range(name: str, ok, what: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {what}")


def _param(name: str, value, batch: int, device: torch.device, *, lower: Optional[str] = None):
    """Normalize a scalar-or-per-sample argument to (float or None, tensor [B] or None).

    ``lower``: None (any finite value), "positive" (> 0) or "nonnegative" (>= 0).
    """
    what = {None: "finite", "positive": "finite and > 0", "nonnegative": "finite and >= 0"}[lower]
    if isinstance(value, torch.Tensor):
        if value.dtype not in D_DTYPES:
            raise TypeError(f"{name} as a tensor must have dtype {_dtype_names(D_DTYPES)}, got {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the data is on {device}; put them on one device")
        if value.dim() == 0:
            value = value.expand(batch)
        elif value.dim() != 1 or value.shape[0] != batch:
            raise ValueError(
                f"{name} as a tensor must be 0-d or 1-D of length B = x.shape[0] = {batch} "
                f"(one value per sample); got shape {tuple(value.shape)}"
            )
        if value.device.type == "cpu" and value.numel() and _checking_values():
            v = value.detach()
            ok = bool(torch.isfinite(v).all())
            if ok and lower == "positive":
                ok = bool((v > 0).all())
            elif ok and lower == "nonnegative":
                ok = bool((v >= 0).all())
            _check_range(name, ok, f"{what} in every element")
        return None, value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or a per-sample tensor, got {type(value).__name__}")
    value = float(value)
    ok = math.isfinite(value)
    if ok and lower == "positive":
        ok = value > 0
    elif ok and lower == "nonnegative":
        ok = value >= 0
    _check_range(name, ok, f"{what}, got {value}")
    return value, None


def _batch(t: torch.Tensor) -> int:
    return t.shape[0] if t.dim() > 0 else 1


# --------------------------------------------------------------------------- layout for kernels


def _dense(t: torch.Tensor) -> bool:
    """True when t's elements fill its memory span exactly once, in some order of dimensions."""
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def _stride_key(shape, strides) -> Tuple[int, ...]:
    # Strides of size-1 dimensions do not change where elements live.
    return tuple(st for sz, st in zip(shape, strides) if sz != 1)


def _contiguous_strides(shape) -> Tuple[int, ...]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(strides))


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.data_ptr() == b.data_ptr()
        and a.dtype == b.dtype
        and _stride_key(a.shape, a.stride()) == _stride_key(b.shape, b.stride())
    )


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _kernel_layout(ref: torch.Tensor, per_sample: bool):
    """Strides all kernel operands are put into: ref's own if it is dense (batch outermost when
    per-sample coefficients are read by row), else contiguous."""
    strides = ref.stride()
    ok = _dense(ref)
    if ok and per_sample and ref.dim() > 0 and ref.shape[0] > 1:
        ok = strides[0] == ref.numel() // ref.shape[0]
    return strides if ok else _contiguous_strides(ref.shape)


def _in_layout(t: Optional[torch.Tensor], strides) -> Optional[torch.Tensor]:
    if t is None:
        return None
    if _dense(t) and _stride_key(t.shape, t.stride()) == _stride_key(t.shape, strides):
        return t
    # Non-contiguous or differently laid-out input: one copy into the common layout (no dtype change).
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)


# --------------------------------------------------------------------------- dispatch


def _dispatch(name, ref, out_dtype, out, tensors, params, backend, reference_fn):
    """Run op ``name`` on the chosen backend; return ``out`` or a new tensor.

    ``ref``: the tensor giving shape, device and layout (x, or d_main for guided_denoise);
    ``tensors``: the op's tensor operands in kernel order (x, [x_euler], d_main, d_guide);
    ``params``: the normalized (scalar, vector) pairs of guidance[, sigma[, sigma_next]];
    ``reference_fn``: computes the result with the PyTorch reference.
    """
    if out is not None:
        _check_tensor("out", out, (out_dtype,), ref, "the result")
        if not torch.compiler.is_compiling() and torch._debug_has_internal_overlap(out) == 1:
            raise ValueError("out has overlapping memory (an expanded tensor?); pass a tensor with distinct elements")
    chosen = resolve_backend(backend, ref.device)

    if ref.numel() == 0:
        return out if out is not None else torch.empty(ref.shape, dtype=out_dtype, device=ref.device)

    if chosen == "torch":
        result = reference_fn()
        if out is None:
            return result
        out.copy_(result)
        return out

    per_sample = any(v is not None for _, v in params)
    strides = _kernel_layout(ref, per_sample)
    operands = [_in_layout(t, strides) for t in tensors]
    target = out
    if out is None or torch.compiler.is_compiling():
        # Under torch.compile, aliasing is left to functionalization: write a fresh tensor, then copy.
        target = None
    elif not (_dense(out) and _stride_key(out.shape, out.stride()) == _stride_key(out.shape, strides)):
        target = None
    else:
        for t in operands:
            # Reading and writing the same element is safe; a shifted or re-strided alias is not.
            if t is not None and _shares_storage(out, t) and not _same_view(out, t):
                target = None
    if target is None:
        target = torch.empty_strided(ref.shape, strides, dtype=out_dtype, device=ref.device)

    _kernel_op(chosen, name)(target, *operands, *[v for _, v in params], *[1.0 if s is None else s for s, _ in params])

    if out is None:
        return target
    if target is not out:
        out.copy_(target)
    return out


def _kernel_op(backend: str, name: str):
    """The custom op ``name`` of a kernel backend; "ext" ops share the Triton ops' schemas."""
    if backend == "triton":
        from . import triton_kernels  # noqa: F401  (registers torch.ops.ag_kernels_triton.*)

        return getattr(torch.ops.ag_kernels_triton, name)
    return getattr(torch.ops.ag_kernels, name)


def _guidance(d_guide, guidance, batch, device):
    """(d_guide, (scalar, vector)): guidance is ignored without d_guide, and a scalar 1 needs no d_guide."""
    if d_guide is None:
        return None, (1.0, None)
    g = _param("guidance", guidance, batch, device)
    if g[1] is None and g[0] == 1.0:
        return None, g  # D_w = D_1 exactly at w = 1 (lerp's end point): skip reading D_0.
    return d_guide, g


def _check_inputs(x_name, x, d_main, d_guide, extra=()):
    _check_tensor(x_name, x, X_DTYPES)
    for name, t in extra:
        _check_tensor(name, t, (x.dtype,), x, x_name)
    _check_tensor("d_main", d_main, D_DTYPES, x, x_name)
    if d_guide is not None:
        _check_tensor("d_guide", d_guide, D_DTYPES, x, x_name)


# --------------------------------------------------------------------------- public ops


def guided_denoise(
    d_main: torch.Tensor,
    d_guide: Optional[torch.Tensor],
    guidance,
    *,
    dtype: torch.dtype = torch.float32,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Guided denoiser output D_w = d_guide + guidance * (d_main - d_guide), computed in ``dtype``.

    Args:
        d_main: the main network's output D_1 (float16/bfloat16/float32/float64).
        d_guide: the guiding network's output D_0 with d_main's shape, or None for no guidance.
        guidance: the weight w: a number, or a tensor of length d_main.shape[0] (per sample).
        dtype: float32 or float64: the dtype of the computation and of the result.
        out: optional result tensor (d_main's shape, ``dtype``).
        backend: "auto", "torch", "triton" or "ext".

    Returns:
        D_w, as a new tensor or in ``out``.
    """
    if dtype not in X_DTYPES:
        raise TypeError(f"dtype must be {_dtype_names(X_DTYPES)}, got {dtype}")
    _check_tensor("d_main", d_main, D_DTYPES)
    if d_guide is not None:
        _check_tensor("d_guide", d_guide, D_DTYPES, d_main, "d_main")
    d_guide, g = _guidance(d_guide, guidance, _batch(d_main), d_main.device)
    return _dispatch(
        "guided_denoise", d_main, dtype, out, [d_main, d_guide], [g], backend,
        lambda: reference.torch_guided_denoise(d_main, d_guide, _value(g), dtype),
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
) -> torch.Tensor:
    """One Euler step of the EDM probability-flow ODE with the guided denoiser.

    Computes ``x + (sigma_next - sigma) * (x - D_w) / sigma`` where d_main/d_guide are the two
    networks' outputs at (x, sigma) and D_w = d_guide + guidance * (d_main - d_guide).

    Args:
        x: the current sample x_hat (float32/float64).
        d_main, d_guide: the networks' outputs at (x, sigma); d_guide=None for no guidance.
        guidance: the weight w (number or per-sample tensor [B]).
        sigma: the current noise level t_hat (> 0; number or per-sample tensor).
        sigma_next: the next noise level t_next (>= 0; 0 on the last step of a schedule).
        out: optional result tensor (x's shape and dtype); may be ``x`` itself.
        backend: "auto", "torch", "triton" or "ext".

    Returns:
        x_next (the Euler prediction x'), as a new tensor or in ``out``.
    """
    _check_inputs("x", x, d_main, d_guide)
    batch, device = _batch(x), x.device
    d_guide, g = _guidance(d_guide, guidance, batch, device)
    s = _param("sigma", sigma, batch, device, lower="positive")
    sn = _param("sigma_next", sigma_next, batch, device, lower="nonnegative")
    return _dispatch(
        "euler_step", x, x.dtype, out, [x, d_main, d_guide], [g, s, sn], backend,
        lambda: reference.torch_euler_step(x, d_main, d_guide, _value(g), _value(s), _value(sn)),
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
        d_main, d_guide: the networks' outputs at (x_euler, sigma_next); d_guide=None for none.
        guidance: the weight w (number or per-sample tensor [B]).
        sigma: the noise level t_hat at x_hat (> 0).
        sigma_next: the noise level t_next at x_euler (> 0: it divides).
        out: optional result tensor (x_hat's shape and dtype); may be x_hat or x_euler.
        backend: "auto", "torch", "triton" or "ext".

    Returns:
        x_next, as a new tensor or in ``out``.
    """
    _check_inputs("x_hat", x_hat, d_main, d_guide, extra=[("x_euler", x_euler)])
    batch, device = _batch(x_hat), x_hat.device
    d_guide, g = _guidance(d_guide, guidance, batch, device)
    s = _param("sigma", sigma, batch, device, lower="positive")
    sn = _param("sigma_next", sigma_next, batch, device, lower="positive")
    return _dispatch(
        "heun_step", x_hat, x_hat.dtype, out, [x_hat, x_euler, d_main, d_guide], [g, s, sn], backend,
        lambda: reference.torch_heun_step(x_hat, x_euler, d_main, d_guide, _value(g), _value(s), _value(sn)),
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
) -> torch.Tensor:
    """Score of the guided model, (D_w - x) / sigma**2.

    Args:
        x: the noisy sample (float32/float64).
        d_main, d_guide: the networks' outputs at (x, sigma); d_guide=None for no guidance.
        guidance: the weight w (number or per-sample tensor [B]).
        sigma: the noise level (> 0; number or per-sample tensor).
        out: optional result tensor (x's shape and dtype); may be ``x`` itself.
        backend: "auto", "torch", "triton" or "ext".

    Returns:
        The score, as a new tensor or in ``out``.
    """
    _check_inputs("x", x, d_main, d_guide)
    batch, device = _batch(x), x.device
    d_guide, g = _guidance(d_guide, guidance, batch, device)
    s = _param("sigma", sigma, batch, device, lower="positive")
    return _dispatch(
        "guided_score", x, x.dtype, out, [x, d_main, d_guide], [g, s], backend,
        lambda: reference.torch_guided_score(x, d_main, d_guide, _value(g), _value(s)),
    )


def _value(param):
    """The (scalar, vector) pair as the reference takes it: the vector if any, else the number."""
    scalar, vec = param
    return scalar if vec is None else vec
