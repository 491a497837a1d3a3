"""Launching a kernel backend's op: operands put into one common layout, ``out`` written in place when safe.

Shared by the public ops (:mod:`.ops`) and their differentiable versions (:mod:`._autograd`),
so neither imports the other for it.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


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


def _run_kernel(name, chosen, ref, out_dtype, out, tensors, params, lead=(), trail=(), uncond=None):
    """The kernel backend ``chosen`` computes op ``name`` into ``out`` (or a new tensor), laying out operands.

    ``lead``: tensors the op takes right after ``out`` as they are (the multistep history, which it
    updates in place: contiguous, so the operands are laid out contiguously too); ``trail``: the
    op's arguments after the coefficients; ``uncond``: None or (d_uncond, (cfg scalar, cfg vector)),
    the CFG arguments every op takes last.
    """
    if ref.numel() == 0:
        return out if out is not None else torch.empty(ref.shape, dtype=out_dtype, device=ref.device)
    per_sample = any(v is not None for _, v in params) or (uncond is not None and uncond[1][1] is not None)
    strides = _contiguous_strides(ref.shape) if lead else _kernel_layout(ref, per_sample)
    operands = [_in_layout(t, strides) for t in tensors]
    cfg_args = {}
    if uncond is not None:
        d_uncond = uncond[0]
        if chosen == "ext" and ref.is_cuda and d_uncond.dtype != operands[-2].dtype:
            # The CUDA kernels read d_uncond in d_main's dtype: both go to the compute dtype first, rounded
            # as the kernels round them in registers (exactly, or once from float64).
            operands[-2] = operands[-2].to(out_dtype)
            d_uncond = d_uncond.to(out_dtype)
        d_uncond = _in_layout(d_uncond, strides)
        operands_read = operands + [d_uncond]
        cfg_args = {"d_uncond": d_uncond, "c_vec": uncond[1][1], "c": 1.0 if uncond[1][0] is None else uncond[1][0]}
    else:
        operands_read = operands
    target = out
    if out is None or torch.compiler.is_compiling():
        # Under torch.compile, aliasing is left to functionalization: write a fresh tensor, then copy.
        target = None
    elif not (_dense(out) and _stride_key(out.shape, out.stride()) == _stride_key(out.shape, strides)):
        target = None
    else:
        for t in operands_read:
            # Reading and writing the same element is safe; a shifted or re-strided alias is not.
            if t is not None and _shares_storage(out, t) and not _same_view(out, t):
                target = None
        if any(_shares_storage(out, t) for t in lead):
            target = None
    if target is None:
        target = torch.empty_strided(ref.shape, strides, dtype=out_dtype, device=ref.device)

    _kernel_op(chosen, name)(target, *lead, *operands, *[v for _, v in params],
                             *[1.0 if s is None else s for s, _ in params], *trail, **cfg_args)

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
