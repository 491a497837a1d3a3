"""Argument checks of the public ops: dtypes, shapes, devices, and scalar-or-per-sample values.

They run once, at the edge (:mod:`.ops`); the kernels and the fast path trust what passed here.
"""

from __future__ import annotations

import math
import numbers
import struct
from typing import Optional

import torch

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


def _in_float32(value: float) -> float:
    """``value`` rounded to float32 (inf where it overflows), as a kernel computing in float32 sees it."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def _param(name: str, value, batch: int, device: torch.device, *, lower: Optional[str] = None,
           dtype: Optional[torch.dtype] = None):
    """Normalize a scalar-or-per-sample argument to (float or None, tensor [B] or None).

    ``lower``: None (any finite value), "positive" (> 0) or "nonnegative" (>= 0).  ``dtype``: the
    dtype the op computes in; in float32 the value must stay finite (and > 0 where positive)
    after rounding to it, or the result would be silently inf or NaN (sigma = 1e-46 is 0 there).
    """
    what = {None: "finite", "positive": "finite and > 0", "nonnegative": "finite and >= 0"}[lower]
    narrow = dtype == torch.float32
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
            if narrow and v.dtype == torch.float64:
                v = v.to(torch.float32)  # the kernels read it in float32: check what they will see
            ok = bool(torch.isfinite(v).all())
            if ok and lower == "positive":
                ok = bool((v > 0).all())
            elif ok and lower == "nonnegative":
                ok = bool((v >= 0).all())
            _check_range(name, ok, f"{what} in every element" + (" (in float32)" if narrow else ""))
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
    if narrow and value != 0:
        rounded = _in_float32(value)
        if rounded == 0 or math.isinf(rounded):
            raise ValueError(f"{name}={value!r} is not representable in float32, the dtype of the computation "
                             f"(it rounds to {rounded}); use float64 data or a value within float32's range")
    return value, None


def _batch(t: torch.Tensor) -> int:
    return t.shape[0] if t.dim() > 0 else 1


def _guidance(d_guide, guidance, batch, device, dtype=None, name="guidance"):
    """(d_guide, (scalar, vector)): guidance is ignored without d_guide, and a scalar 1 needs no d_guide.

    The same rule for the CFG weight (``name="cfg_scale"``) of the unconditional output d_uncond.
    """
    if d_guide is None:
        return None, (1.0, None)
    g = _param(name, guidance, batch, device, dtype=dtype)
    if g[1] is None and g[0] == 1.0:
        return None, g  # w = 1 drops its term exactly (D_w = D_1 at lerp's end point): skip reading that output.
    return d_guide, g


def _check_inputs(x_name, x, d_main, d_guide, extra=(), d_uncond=None):
    _check_tensor(x_name, x, X_DTYPES)
    for name, t in extra:
        _check_tensor(name, t, (x.dtype,), x, x_name)
    _check_tensor("d_main", d_main, D_DTYPES, x, x_name)
    if d_guide is not None:
        _check_tensor("d_guide", d_guide, D_DTYPES, x, x_name)
    if d_uncond is not None:
        _check_tensor("d_uncond", d_uncond, D_DTYPES, x, x_name)
