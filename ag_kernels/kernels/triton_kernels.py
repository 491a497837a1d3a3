"""Triton kernels for the guided step ops: blend, derivative and update in one pass over memory.

One kernel, ``_guided_step_kernel``, holds the math of every op; a constexpr ``OP`` picks
the output.  Network outputs (float16/bfloat16/float32/float64) are converted to the compute
dtype (x's dtype) in registers.  The per-sample or scalar coefficients (guidance, step
ratios) are formed in float64 once per program, then rounded once to the compute dtype.

The ops are registered as torch custom ops in the namespace ``ag_kernels_triton`` with
``torch.library.triton_op`` (so ``torch.compile`` sees the kernels), or, when Triton runs in
interpreter mode (``TRITON_INTERPRET=1``, the CPU path used in CI), as opaque
``torch.library.custom_op`` s, because the interpreter cannot run on the fake tensors that
``triton_op`` traces with.

The ops are the layer under :mod:`ag_kernels.kernels.ops`: they require every tensor to share x's
strides and to be non-overlapping and dense (the public API arranges that).
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple, Optional

import torch

from ._fake import noop_fake

try:
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

# Codes of the constexpr OP; the public op names map onto them.
OP_DENOISE, OP_EULER, OP_HEUN, OP_SCORE = 0, 1, 2, 3
# Codes of the constexpr ROWS: how each element finds its sample's per-sample coefficients.
ROWS_NONE, ROWS_TILED, ROWS_GATHER = 0, 1, 2

if triton is not None:
    INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

    @triton.jit
    def _load_coefficient(ptr, stride, row, mask, GATHER: tl.constexpr):
        # A per-sample coefficient is read at its sample's row, in float64 like the scalar path.
        if GATHER:
            c = tl.load(ptr + row * stride, mask=mask, other=1.0).to(tl.float64)
        else:
            c = tl.load(ptr + row * stride).to(tl.float64)
        return c

    @triton.jit
    def _guided(dm_ptr, dg_ptr, du_ptr, offs, mask, w, cfg, dtype, HAS_GUIDE: tl.constexpr,
                HAS_UNCOND: tl.constexpr):
        # D_w = D_0 + w (D_1 - D_0), evaluated as torch.lerp does (two-sided), so that w = 1 gives
        # D_1 exactly (no guidance, Karras et al. 2024 Eq. 1) and both ends stay accurate.
        D_1 = tl.load(dm_ptr + offs, mask=mask).to(dtype)
        if HAS_GUIDE:
            D_0 = tl.load(dg_ptr + offs, mask=mask).to(dtype)
            diff = D_1 - D_0
            lo = D_0 + w.to(dtype) * diff
            hi = D_1 - diff * (1.0 - w).to(dtype)
            D_w = tl.where(w < 0.5, lo, hi)
        else:
            D_w = D_1
        if HAS_UNCOND:
            # CFG's third output on top: D_w + (w_cfg - 1) (D_1 - D_u), w_cfg - 1 formed in float64.
            D_u = tl.load(du_ptr + offs, mask=mask).to(dtype)
            D_w = D_w + (cfg - 1.0).to(dtype) * (D_1 - D_u)
        return D_w

    @triton.jit
    def _slot_offsets(slot, n_elements, offs):
        # A history slot's element offsets in 64 bits.  tl.cast, not slot.to: an int argument equal to 1
        # is specialized by the launcher into a compile-time constant, which has no .to method.
        return tl.cast(slot, tl.int64) * n_elements + offs

    @triton.jit
    def _multistep_kernel(
        out_ptr, hist_ptr, x_ptr, dm_ptr, dg_ptr, g_ptr, g_stride, g_val: tl.float64,
        a_val: tl.float64, b0_val: tl.float64, b1_val: tl.float64, b2_val: tl.float64,
        read1, read2, write, n_elements, row_numel,
        xc_ptr, ac_val: tl.float64, c0_val: tl.float64, c1_val: tl.float64, c2_val: tl.float64,
        du_ptr, c_ptr, c_stride, c_val: tl.float64,
        HAS_GUIDE: tl.constexpr, G_VEC: tl.constexpr, READ1: tl.constexpr, READ2: tl.constexpr,
        WRITE: tl.constexpr, CORRECT: tl.constexpr, BLOCK: tl.constexpr, HAS_UNCOND: tl.constexpr,
        C_VEC: tl.constexpr,
    ):
        # A linear multistep update (DPM-Solver++, Lu et al. 2022): x_next = a x + b0 D_w + b1 H[read1]
        # + b2 H[read2], summed in that order as the torch reference; then H[write] = D_w.  64-bit offsets.
        # CORRECT (UniPC, Zhao et al. 2023): x is first corrected, x_c = ac x + c0 D_w + c1 H[read1] +
        # c2 H[read2], stored at xc_ptr, and the update starts from x_c.
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n_elements
        dtype = out_ptr.dtype.element_ty
        w = tl.full((), g_val, tl.float64)
        if G_VEC:
            w = _load_coefficient(g_ptr, g_stride, offs // row_numel, mask, True)
        cfg = tl.full((), c_val, tl.float64)
        if C_VEC:
            cfg = _load_coefficient(c_ptr, c_stride, offs // row_numel, mask, True)
        D_w = _guided(dm_ptr, dg_ptr, du_ptr, offs, mask, w, cfg, dtype, HAS_GUIDE, HAS_UNCOND)
        x = tl.load(x_ptr + offs, mask=mask)
        # Both slots are read before D_w is written: the write slot may be a read one.
        if READ1:
            h1 = tl.load(hist_ptr + _slot_offsets(read1, n_elements, offs), mask=mask)
        if READ2:
            h2 = tl.load(hist_ptr + _slot_offsets(read2, n_elements, offs), mask=mask)
        if CORRECT:
            x = tl.full((), ac_val, tl.float64).to(dtype) * x + tl.full((), c0_val, tl.float64).to(dtype) * D_w
            if READ1:
                x = x + tl.full((), c1_val, tl.float64).to(dtype) * h1
            if READ2:
                x = x + tl.full((), c2_val, tl.float64).to(dtype) * h2
            x = x.to(dtype)
            tl.store(xc_ptr + offs, x, mask=mask)
        result = tl.full((), a_val, tl.float64).to(dtype) * x + tl.full((), b0_val, tl.float64).to(dtype) * D_w
        if READ1:
            result = result + tl.full((), b1_val, tl.float64).to(dtype) * h1
        if READ2:
            result = result + tl.full((), b2_val, tl.float64).to(dtype) * h2
        tl.store(out_ptr + offs, result.to(dtype), mask=mask)
        if WRITE:
            tl.store(hist_ptr + _slot_offsets(write, n_elements, offs), D_w.to(dtype), mask=mask)

    @triton.jit
    def _guided_step_kernel(
        out_ptr, x_ptr, xe_ptr, dm_ptr, dg_ptr,
        g_ptr, g_stride, s_ptr, s_stride, sn_ptr, sn_stride,
        g_val: tl.float64, s_val: tl.float64, sn_val: tl.float64,
        n_elements, row_numel, blocks_per_row,
        du_ptr, c_ptr, c_stride, c_val: tl.float64,
        OP: tl.constexpr, HAS_GUIDE: tl.constexpr, ROWS: tl.constexpr,
        G_VEC: tl.constexpr, S_VEC: tl.constexpr, SN_VEC: tl.constexpr,
        BLOCK: tl.constexpr, HAS_UNCOND: tl.constexpr, C_VEC: tl.constexpr,
    ):
        # 64-bit offsets throughout: tensors of more than 2**31 elements are expected.
        pid = tl.program_id(0).to(tl.int64)
        lanes = tl.arange(0, BLOCK).to(tl.int64)
        if ROWS == 1:
            # Tiled rows: a program covers one block of one sample, so its coefficients are scalars.
            row = pid // blocks_per_row
            col = (pid - row * blocks_per_row) * BLOCK + lanes
            offs = row * row_numel + col
            mask = col < row_numel
        else:
            offs = pid * BLOCK + lanes
            mask = offs < n_elements
            if ROWS == 2:
                # Gathered rows (samples shorter than a block): each element looks up its own sample.
                row = offs // row_numel
            else:
                row = 0
        dtype = out_ptr.dtype.element_ty
        # tl.full keeps scalar arguments in float64 (a plain assignment would make them float32 in
        # the interpreter).
        w = tl.full((), g_val, tl.float64)
        if G_VEC:
            w = _load_coefficient(g_ptr, g_stride, row, mask, ROWS == 2)
        s = tl.full((), s_val, tl.float64)
        if S_VEC:
            s = _load_coefficient(s_ptr, s_stride, row, mask, ROWS == 2)
        sn = tl.full((), sn_val, tl.float64)
        if SN_VEC:
            sn = _load_coefficient(sn_ptr, sn_stride, row, mask, ROWS == 2)
        cfg = tl.full((), c_val, tl.float64)
        if C_VEC:
            cfg = _load_coefficient(c_ptr, c_stride, row, mask, ROWS == 2)

        D_w = _guided(dm_ptr, dg_ptr, du_ptr, offs, mask, w, cfg, dtype, HAS_GUIDE, HAS_UNCOND)

        if OP == 0:
            result = D_w
        elif OP == 1:
            # Euler: x_hat + (t_next - t_cur) (x_hat - D_w) / t_cur; the ratio is formed in float64.
            x_hat = tl.load(x_ptr + offs, mask=mask)
            ratio = ((sn - s) / s).to(dtype)
            result = x_hat + ratio * (x_hat - D_w)
        elif OP == 2:
            # Heun: x_hat + (x_euler - x_hat)/2 + (t_next - t_cur)/2 * d_prime, d_prime = (x_euler - D_w)/t_next;
            # (t_next - t_cur) d_cur is x_euler - x_hat, so the small step is never divided by.
            x_hat = tl.load(x_ptr + offs, mask=mask)
            x_euler = tl.load(xe_ptr + offs, mask=mask)
            half_ratio = (0.5 * (sn - s) / sn).to(dtype)
            result = x_hat + 0.5 * (x_euler - x_hat) + half_ratio * (x_euler - D_w)
        else:
            # Score: (D_w - x) / sigma^2, with 1/sigma^2 formed in float64.
            x = tl.load(x_ptr + offs, mask=mask)
            inv_var = (1.0 / (s * s)).to(dtype)
            result = (D_w - x) * inv_var
        tl.store(out_ptr + offs, result.to(dtype), mask=mask)
else:  # pragma: no cover
    INTERPRET = False
    _guided_step_kernel = None
    _multistep_kernel = None


#: (BLOCK, num_warps) of every launch on a GPU.
CUDA_BLOCK_CONFIG = (2048, 8)


def _block_config(device: torch.device):
    """(BLOCK, num_warps) for a launch: large blocks for the interpreter (fewer Python-level programs)."""
    if INTERPRET or device.type != "cuda":
        return 4096, 4
    return CUDA_BLOCK_CONFIG


def _device_guard(out):
    # Triton launches on the current device (its stream and context): tensors on another GPU get
    # that device made current for the launch; the usual call, on the current device, skips the guard.
    other_device = out.is_cuda and out.device.index != torch.cuda.current_device()
    return torch.cuda.device(out.device) if other_device else contextlib.nullcontext()


def _step_launch(op, out, x, x_euler, d_main, d_guide, g_vec, s_vec, sn_vec, g, s, sn, block, *,
                 d_uncond=None, c_vec=None, c=1.0):
    """(grid, args, constexprs) of the ``_guided_step_kernel`` launch writing ``out`` with blocks of ``block``.

    The launch and the offline compile table (:func:`compile_table`) both build their arguments here,
    so the table compiles exactly the specializations the launcher produces.  ``d_uncond``, ``c_vec``,
    ``c``: CFG's third output and its weight (per sample, or a number), absent by default.
    """
    any_vec = g_vec is not None or s_vec is not None or sn_vec is not None or c_vec is not None
    n = out.numel()
    rows = out.shape[0] if (any_vec and out.dim() > 0) else 1
    row_numel = n // rows
    if not any_vec:
        mode = ROWS_NONE
    elif row_numel >= block:
        mode = ROWS_TILED
    else:
        mode = ROWS_GATHER
    if mode == ROWS_TILED:
        blocks_per_row = triton.cdiv(row_numel, block)
        grid = (rows * blocks_per_row,)
    else:
        blocks_per_row = 1
        grid = (triton.cdiv(n, block),)
    # Unused pointer arguments get a valid tensor so the launch signature stays the same.
    dummy = out
    args = (
        out,
        x if x is not None else dummy,
        x_euler if x_euler is not None else dummy,
        d_main,
        d_guide if d_guide is not None else dummy,
        g_vec if g_vec is not None else dummy, g_vec.stride(0) if g_vec is not None else 0,
        s_vec if s_vec is not None else dummy, s_vec.stride(0) if s_vec is not None else 0,
        sn_vec if sn_vec is not None else dummy, sn_vec.stride(0) if sn_vec is not None else 0,
        float(g), float(s), float(sn),
        n, row_numel, blocks_per_row,
        *_cfg_args(d_uncond, c_vec, c, dummy),
    )
    constexprs = dict(
        OP=op, HAS_GUIDE=d_guide is not None, ROWS=mode,
        G_VEC=g_vec is not None, S_VEC=s_vec is not None, SN_VEC=sn_vec is not None, BLOCK=block,
        HAS_UNCOND=d_uncond is not None, C_VEC=c_vec is not None,
    )
    return grid, args, constexprs


def _cfg_args(d_uncond, c_vec, c, dummy):
    """The kernels' (du_ptr, c_ptr, c_stride, c_val) arguments; absent tensors get a valid dummy."""
    return (d_uncond if d_uncond is not None else dummy, c_vec if c_vec is not None else dummy,
            c_vec.stride(0) if c_vec is not None else 0, float(c))


def _multistep_launch(out, history, x, d_main, d_guide, g_vec, g, a, b0, b1, b2, read1, read2, write, block,
                      corrected=None, ac=0.0, c0=0.0, c1=0.0, c2=0.0, *, d_uncond=None, c_vec=None, c=1.0):
    """(grid, args, constexprs) of the ``_multistep_kernel`` launch writing ``out`` (see :func:`_step_launch`)."""
    n = out.numel()
    rows = out.shape[0] if ((g_vec is not None or c_vec is not None) and out.dim() > 0) else 1
    args = (
        out, history, x, d_main, d_guide if d_guide is not None else out,
        g_vec if g_vec is not None else out, g_vec.stride(0) if g_vec is not None else 0, float(g),
        float(a), float(b0), float(b1), float(b2), max(read1, 0), max(read2, 0), max(write, 0), n, n // rows,
        corrected if corrected is not None else out, float(ac), float(c0), float(c1), float(c2),
        *_cfg_args(d_uncond, c_vec, c, out),
    )
    constexprs = dict(
        HAS_GUIDE=d_guide is not None, G_VEC=g_vec is not None, READ1=read1 >= 0, READ2=read2 >= 0,
        WRITE=write >= 0, CORRECT=corrected is not None, BLOCK=block, HAS_UNCOND=d_uncond is not None,
        C_VEC=c_vec is not None,
    )
    return (triton.cdiv(n, block),), args, constexprs


def _run(kernel, out, launch):
    """Launches ``kernel`` with the (grid, args, constexprs) that ``launch(block)`` builds for ``out``."""
    if not out.is_cuda and not INTERPRET:
        raise RuntimeError("the Triton backend needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
    block, num_warps = _block_config(out.device)
    grid, args, constexprs = launch(block)
    runner = kernel if INTERPRET else torch.library.wrap_triton(kernel)
    with _device_guard(out):
        runner[grid](*args, **constexprs, num_warps=num_warps)


def _launch(op, out, x, x_euler, d_main, d_guide, g_vec, s_vec, sn_vec, g, s, sn, d_uncond, c_vec, c):
    if out.numel() == 0:
        return
    _run(_guided_step_kernel, out,
         lambda block: _step_launch(op, out, x, x_euler, d_main, d_guide, g_vec, s_vec, sn_vec, g, s, sn, block,
                                    d_uncond=d_uncond, c_vec=c_vec, c=c))


def _register(name, fn, mutates=("out",)):
    """Register ``fn`` (which mutates ``out``) as ``ag_kernels_triton::<name>`` with a no-op fake."""
    qualname = f"ag_kernels_triton::{name}"
    if INTERPRET:
        op = torch.library.custom_op(qualname, fn, mutates_args=set(mutates))
    else:
        op = torch.library.triton_op(qualname, fn, mutates_args=set(mutates))
    op.register_fake(noop_fake)  # the same no-op fake as the extension's ops
    return op


# Every op ends with CFG's third output (as the extension's schemas): d_uncond (None: no CFG term) and its
# weight, per sample (c_vec) or a number (c); D_w below then includes + (w_cfg - 1) (D_1 - D_u).


def triton_guided_denoise(
    out: torch.Tensor, d_main: torch.Tensor, d_guide: Optional[torch.Tensor],
    g_vec: Optional[torch.Tensor], g: float,
    d_uncond: Optional[torch.Tensor] = None, c_vec: Optional[torch.Tensor] = None, c: float = 1.0,
) -> None:
    """out = D_w (guided denoiser output)."""
    _launch(OP_DENOISE, out, None, None, d_main, d_guide, g_vec, None, None, g, 1.0, 1.0, d_uncond, c_vec, c)


def triton_euler_step(
    out: torch.Tensor, x_hat: torch.Tensor, d_main: torch.Tensor, d_guide: Optional[torch.Tensor],
    g_vec: Optional[torch.Tensor], s_vec: Optional[torch.Tensor], sn_vec: Optional[torch.Tensor],
    g: float, s: float, sn: float,
    d_uncond: Optional[torch.Tensor] = None, c_vec: Optional[torch.Tensor] = None, c: float = 1.0,
) -> None:
    """out = x_hat + (sn - s) (x_hat - D_w) / s."""
    _launch(OP_EULER, out, x_hat, None, d_main, d_guide, g_vec, s_vec, sn_vec, g, s, sn, d_uncond, c_vec, c)


def triton_heun_step(
    out: torch.Tensor, x_hat: torch.Tensor, x_euler: torch.Tensor, d_main: torch.Tensor,
    d_guide: Optional[torch.Tensor], g_vec: Optional[torch.Tensor], s_vec: Optional[torch.Tensor],
    sn_vec: Optional[torch.Tensor], g: float, s: float, sn: float,
    d_uncond: Optional[torch.Tensor] = None, c_vec: Optional[torch.Tensor] = None, c: float = 1.0,
) -> None:
    """out = x_hat + (sn - s) (d_cur + d_prime) / 2, D_w evaluated at (x_euler, sn)."""
    _launch(OP_HEUN, out, x_hat, x_euler, d_main, d_guide, g_vec, s_vec, sn_vec, g, s, sn, d_uncond, c_vec, c)


def triton_guided_score(
    out: torch.Tensor, x: torch.Tensor, d_main: torch.Tensor, d_guide: Optional[torch.Tensor],
    g_vec: Optional[torch.Tensor], s_vec: Optional[torch.Tensor], g: float, s: float,
    d_uncond: Optional[torch.Tensor] = None, c_vec: Optional[torch.Tensor] = None, c: float = 1.0,
) -> None:
    """out = (D_w - x) / s^2."""
    _launch(OP_SCORE, out, x, None, d_main, d_guide, g_vec, s_vec, None, g, s, 1.0, d_uncond, c_vec, c)


def triton_multistep_step(
    out: torch.Tensor, history: torch.Tensor, x: torch.Tensor, d_main: torch.Tensor, d_guide: Optional[torch.Tensor],
    g_vec: Optional[torch.Tensor], g: float, a: float, b0: float, b1: float, b2: float, read1: int, read2: int,
    write: int, corrected: Optional[torch.Tensor] = None, ac: float = 0.0, c0: float = 0.0, c1: float = 0.0,
    c2: float = 0.0, d_uncond: Optional[torch.Tensor] = None, c_vec: Optional[torch.Tensor] = None, c: float = 1.0,
) -> None:
    """out = a x + b0 D_w + b1 history[read1] + b2 history[read2]; history[write] = D_w (slot -1: none).

    With ``corrected`` (UniPC's corrector), x is replaced first by x_c = ac x + c0 D_w + c1 history[read1]
    + c2 history[read2], which is also written into ``corrected`` (x itself, or a separate tensor)."""
    _check_history(out, history, read1, read2, write)
    if corrected is not None:
        _check_corrected(out, history, x, d_main, d_guide, corrected, d_uncond)
    if out.numel() == 0:
        return
    _run(_multistep_kernel, out, lambda block: _multistep_launch(
        out, history, x, d_main, d_guide, g_vec, g, a, b0, b1, b2, read1, read2, write, block,
        corrected, ac, c0, c1 if read1 >= 0 else 0.0, c2 if read2 >= 0 else 0.0, d_uncond=d_uncond, c_vec=c_vec, c=c))


def _check_corrected(out, history, x, d_main, d_guide, corrected, d_uncond=None):
    """The extension op's checks of ``corrected`` (csrc/step_args.cpp): the same errors and messages."""
    op = "ag_kernels_triton::multistep_step"
    if corrected.dtype != out.dtype:
        raise TypeError(f"{op}: corrected must have out's dtype {out.dtype}, got {corrected.dtype}")
    if corrected.device != out.device or corrected.shape != out.shape or not corrected.is_contiguous():
        raise RuntimeError(f"{op}: corrected must be contiguous with out's shape {tuple(out.shape)} on {out.device}")
    if not corrected.numel() or torch.compiler.is_compiling():
        return
    for t in (out, history, x, d_main, d_guide, d_uncond):
        if t is None or (t is x and corrected.data_ptr() == x.data_ptr()):
            continue
        if _overlaps(corrected, t):
            raise RuntimeError(f"{op}: corrected overlaps another operand; pass x itself or a separate tensor")


def _check_history(out, history, read1, read2, write):
    """The extension op's checks of the history ring (csrc/step_args.cpp): the same errors and messages."""
    op = "ag_kernels_triton::multistep_step"
    if history.device != out.device:
        raise RuntimeError(f"{op}: history is on {history.device} but out is on {out.device}")
    if history.dtype != out.dtype:
        raise TypeError(f"{op}: history must have out's dtype {out.dtype}, got {history.dtype}")
    if history.dim() != out.dim() + 1 or history.shape[0] < 1 or history.shape[1:] != out.shape:
        raise RuntimeError(f"{op}: history must have shape (K, *out.shape) with K >= 1, got {tuple(history.shape)}")
    if not history.is_contiguous():
        raise RuntimeError(f"{op}: history must be contiguous, got strides {history.stride()}")
    for name, slot in (("read1", read1), ("read2", read2), ("write", write)):
        if not -1 <= slot < history.shape[0]:
            raise RuntimeError(f"{op}: {name} must be a history slot in [0, {history.shape[0]}) or -1 (none), got {slot}")
    # Under torch.compile the tensors are fake (no addresses) and the public API writes a fresh out.
    if out.numel() and not torch.compiler.is_compiling() and _overlaps(out, history):
        raise RuntimeError(f"{op}: out overlaps history; pass a separate tensor")


def _overlaps(a, b):
    """Whether the byte ranges of two dense tensors intersect (same storage only)."""
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()



# ---------------------------------------------------------------------------------------------
# The offline compile table: the launches of every kernel on a GPU, compiled in CI without one.

class CompileCase(NamedTuple):
    """One launch of a kernel as the launcher on a GPU makes it (CPU stand-in tensors carry the dtypes,
    addresses and sizes that Triton specializes on)."""

    name: str            # kernel/op, then dtypes, then geometry and alignment
    kernel: object       # the @triton.jit function
    args: tuple          # positional arguments, as the launcher passes them
    constexprs: dict     # keyword constexprs, as the launcher passes them
    num_warps: int
    vectorized: bool     # the contiguous, 16-byte-aligned launch: its PTX must move memory in 128-bit accesses


_DTYPE_NAMES = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32", torch.float64: "f64"}
_X_DTYPES = (torch.float32, torch.float64)
_D_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Shapes of the launches: (name, shape, whether per-sample coefficients are passed).  They give the int
# arguments every specialization Triton makes: equal to 1 (a compile-time constant), divisible by 16,
# other, and 64-bit (more than 2**31 - 1 elements), and each ROWS mode of the step kernel.
_BIG = 2**30
_GEOMETRIES = [
    ("n=1", (1,), False),
    ("n=16k", (5, 2048), False),          # the contiguous launch: n divisible by 16
    ("n=odd", (3, 4099), False),
    ("n>2^31", (2, _BIG + 3), False),
    ("tiled,row=odd", (3, 4099), True),   # 3 blocks per sample
    ("tiled,row=16k", (2, 3 * 2048), True),
    ("tiled,1 block", (2, 2048), True),   # blocks_per_row == 1
    ("tiled,n>2^31", (3, _BIG), True),
    ("gather,row=7", (3, 7), True),
    ("gather,row=1", (3, 1), True),       # row_numel == 1
    ("gather,n=1", (1,), True),
    ("gather,n>2^31", (2**21 + 1, 1024), True),
]
_GEOMETRY = {name: (shape, vec) for name, shape, vec in _GEOMETRIES}
# The step ops' codes and the per-sample coefficients each takes (guidance g needs d_guide).
_STEP_OPS = {"guided_denoise": (OP_DENOISE, ("g",)), "euler_step": (OP_EULER, ("g", "s", "sn")),
             "heun_step": (OP_HEUN, ("g", "s", "sn")), "guided_score": (OP_SCORE, ("g", "s"))}


def _stand_in(shape, dtype, aligned=True):
    """A CPU tensor of ``shape`` backed by one element (stride 0), at a 16-byte-aligned address or not.

    The launch builders read sizes, dtypes and addresses of the operands (and strides of coefficient
    vectors only), so a launch of 2**31 elements needs no memory.  CPU allocations are 64-byte aligned.
    """
    base = torch.empty(2, dtype=dtype)
    one = base[0:1] if aligned else base[1:2]
    return one.reshape((1,) * len(shape)).expand(shape)


def _coefficient_vector(batch, dtype=torch.float64, stride=1):
    """A per-sample coefficient vector of ``batch`` values with element stride 0 (expanded), 1 or more."""
    if stride == 0:
        return torch.empty(1, dtype=dtype).expand(batch)
    return torch.empty(batch * stride, dtype=dtype)[::stride]


def _short(dtype):
    return _DTYPE_NAMES[dtype] if dtype is not None else "none"


def _cfg_case(du, per_sample, shape, t, vec_dtype=torch.float64, vec_stride=1):
    """(keyword arguments of a launch builder, name suffix) for CFG's third output d_uncond in dtype ``du``
    (None: absent) with a per-sample weight or the number 7.5."""
    if du is None:
        return {}, ""
    c_vec = _coefficient_vector(shape[0], vec_dtype, vec_stride) if per_sample else None
    name = f"/d_uncond={_short(du)}" + (f",c_vec:{_short(vec_dtype)}:stride{vec_stride}" if per_sample else "")
    return dict(d_uncond=t("d_uncond", du), c_vec=c_vec, c=7.5), name


def _step_case(op_name, x_dtype, dm, dg, geometry, vecs=None, vec_dtype=torch.float64, vec_stride=1,
               unaligned=(), vectorized=False, du=None, c_per_sample=None):
    op, allowed = _STEP_OPS[op_name]
    shape, per_sample = _GEOMETRY[geometry]
    if vecs is None:
        vecs = tuple(v for v in allowed if dg is not None or v != "g") if per_sample else ()
    batch = shape[0]

    def t(name, dtype):
        return _stand_in(shape, dtype, aligned=name not in unaligned and "all" not in unaligned)

    coef = {v: _coefficient_vector(batch, vec_dtype, vec_stride) if v in vecs else None for v in ("g", "s", "sn")}
    out = t("out", x_dtype)
    x = t("x", x_dtype) if op != OP_DENOISE else None
    x_euler = t("x_euler", x_dtype) if op == OP_HEUN else None
    block, num_warps = CUDA_BLOCK_CONFIG
    cfg, cfg_name = _cfg_case(du, per_sample if c_per_sample is None else c_per_sample, shape, t, vec_dtype,
                              vec_stride)
    _, args, constexprs = _step_launch(op, out, x, x_euler, t("d_main", dm), None if dg is None else t("d_guide", dg),
                                       coef["g"], coef["s"], coef["sn"], 1.5, 2.0, 1.0, block, **cfg)
    name = (f"{op_name}/x={_short(x_dtype)},d_main={_short(dm)},d_guide={_short(dg)}/{geometry}"
            + (f"/vec={'+'.join(vecs)}:{_short(vec_dtype)}:stride{vec_stride}" if vecs else "") + cfg_name
            + (f"/unaligned={'+'.join(unaligned)}" if unaligned else ""))
    return CompileCase(name, _guided_step_kernel, args, constexprs, num_warps, vectorized)


def _multistep_case(x_dtype, dm, dg, geometry, slots=(1, 0, 1), g_vec=None, vec_dtype=torch.float64,
                    vec_stride=1, unaligned=(), vectorized=False, du=None, c_per_sample=None):
    # Default slots: the 3M ring, which reads slots 1 and 0 and writes slot 1.
    shape, per_sample = _GEOMETRY[geometry]
    if g_vec is None:
        g_vec = per_sample and dg is not None
    read1, read2, write = slots

    def t(name, dtype, shape=shape):
        return _stand_in(shape, dtype, aligned=name not in unaligned and "all" not in unaligned)

    out = t("out", x_dtype)
    history = t("history", x_dtype, (3,) + tuple(shape))
    g = _coefficient_vector(shape[0], vec_dtype, vec_stride) if g_vec else None
    block, num_warps = CUDA_BLOCK_CONFIG
    cfg, cfg_name = _cfg_case(du, per_sample if c_per_sample is None else c_per_sample, shape, t, vec_dtype,
                              vec_stride)
    _, args, constexprs = _multistep_launch(out, history, t("x", x_dtype), t("d_main", dm),
                                            None if dg is None else t("d_guide", dg), g, 1.5, 0.5, 0.25, 0.125,
                                            0.0625, read1, read2, write, block, **cfg)
    name = (f"multistep_step/x={_short(x_dtype)},d_main={_short(dm)},d_guide={_short(dg)}/{geometry}"
            f"/read1={read1},read2={read2},write={write}"
            + (f"/vec=g:{_short(vec_dtype)}:stride{vec_stride}" if g_vec else "") + cfg_name
            + (f"/unaligned={'+'.join(unaligned)}" if unaligned else ""))
    return CompileCase(name, _multistep_kernel, args, constexprs, num_warps, vectorized)


def _dtype_rows(make):
    """Each network-output dtype with each x dtype (guided, both outputs alike), unguided, and guided with
    mixed dtypes, on the contiguous 16-byte-aligned launch (the rows whose PTX is read for 128-bit accesses)."""
    rows = []
    for k, dm in enumerate(_D_DTYPES):
        for x_dtype in _X_DTYPES:
            rows.append(make(x_dtype, dm, dm, "n=16k", vectorized=True))
        rows.append(make(_X_DTYPES[k % 2], dm, None, "n=16k", vectorized=True))
        rows.append(make(_X_DTYPES[(k + 1) % 2], dm, _D_DTYPES[(k + 1) % len(_D_DTYPES)], "n=16k", vectorized=True))
    return rows


def compile_table():
    """The launches of every Triton kernel on a GPU, as :class:`CompileCase` rows (several may share one
    specialization: the compile check deduplicates them).

    Built by the launchers' own argument builders (:func:`_step_launch`, :func:`_multistep_launch`), so
    the table sees what a launch passes.  Axes: every x dtype and network-output dtype (guided with equal
    and mixed dtypes, and unguided), every constexpr branch (ROWS modes, each subset of per-sample
    coefficients, history slots read or not), the int specializations (each geometry above; coefficient
    strides 0, 1, 3; history slots 0, 1, 2) and pointer alignment (16-byte aligned or not).  Each axis is
    swept with the others at a base value.  A new kernel adds its rows here.
    """
    if triton is None:
        return []
    f32, f16 = torch.float32, torch.float16
    rows = []
    for op_name, (_, allowed) in _STEP_OPS.items():
        rows += _dtype_rows(lambda x, dm, dg, geo, **kw: _step_case(op_name, x, dm, dg, geo, **kw))
        for geometry, _, per_sample in _GEOMETRIES:
            rows.append(_step_case(op_name, f32, f16, f16, geometry))
            if per_sample and allowed != ("g",):
                rows.append(_step_case(op_name, f32, f16, None, geometry))  # unguided: s / sn only
        for mask in range(1, 2 ** len(allowed)):  # each subset of per-sample coefficients
            subset = tuple(v for i, v in enumerate(allowed) if mask >> i & 1)
            rows.append(_step_case(op_name, f32, f16, f16, "tiled,row=odd", vecs=subset))
        for vec_dtype in _D_DTYPES:
            rows.append(_step_case(op_name, f32, f16, f16, "gather,row=7", vec_dtype=vec_dtype))
        for stride in (0, 3):
            rows.append(_step_case(op_name, f32, f16, f16, "gather,row=7", vec_stride=stride))
        operand = "x" if op_name != "guided_denoise" else "d_main"
        for unaligned in (("all",), ("out",), ("d_guide",), (operand,)):
            rows.append(_step_case(op_name, f32, f16, f16, "n=16k", unaligned=unaligned))
        rows.append(_step_case(op_name, f32, f16, f16, "tiled,row=16k", unaligned=("all",)))
    rows += _dtype_rows(_multistep_case)
    # The solvers' rings (first order, 2M, 3M, no history), then each slot argument over absent, 0, 1, 2.
    slot_rows = [(-1, -1, 0), (0, -1, 0), (1, 0, 1), (-1, -1, -1)]
    for k in range(3):
        for value in (-1, 0, 1, 2):
            slots = [1, 0, 1]
            slots[k] = value
            slot_rows.append(tuple(slots) if slots[0] >= 0 or slots[1] < 0 else (-1, -1, slots[2]))
    for slots in dict.fromkeys(slot_rows):
        rows.append(_multistep_case(f32, f16, f16, "n=16k", slots=slots))
    for geometry, _, per_sample in _GEOMETRIES:
        rows.append(_multistep_case(f32, f16, f16, geometry))
        if not per_sample:
            rows.append(_multistep_case(f32, f16, None, geometry))
    for vec_dtype in _D_DTYPES:
        rows.append(_multistep_case(f32, f16, f16, "gather,row=7", vec_dtype=vec_dtype))
    for stride in (0, 3):
        rows.append(_multistep_case(f32, f16, f16, "gather,row=7", vec_stride=stride))
    for unaligned in (("all",), ("out",), ("history",), ("d_guide",)):
        rows.append(_multistep_case(f32, f16, f16, "n=16k", unaligned=unaligned))
    rows += _three_output_rows()
    return rows


def _three_output_rows():
    """CFG's third output (d_uncond, a number or per-sample weight) on every kernel: its dtype with each x
    dtype (the contiguous launch, PTX read), with and without the guide, each ROWS mode with a per-sample
    weight alone or with the others, the weight's dtype and stride, and d_uncond unaligned."""
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    rows = []
    cases = [(_multistep_case, None)] + [(_step_case, op_name) for op_name in _STEP_OPS]
    for make, op_name in cases:
        case = make if op_name is None else (lambda *a, _op=op_name, **kw: _step_case(_op, *a, **kw))
        for du in _D_DTYPES:
            for x_dtype in _X_DTYPES:
                rows.append(case(x_dtype, du, du, "n=16k", du=du, vectorized=True))
        rows.append(case(f32, bf16, None, "n=16k", du=bf16, vectorized=True))  # CFG alone
        rows.append(case(f32, f16, f16, "n=16k", du=bf16))  # d_uncond in another dtype than d_main
        for geometry in ("tiled,row=odd", "gather,row=7", "gather,row=1"):
            rows.append(case(f32, f16, f16, geometry, du=f16))  # every coefficient per sample
            rows.append(case(f32, f16, None, geometry, du=f16, c_per_sample=True, g_vec=False)
                        if op_name is None else case(f32, f16, None, geometry, du=f16, vecs=()))
        for vec_dtype in (f32, torch.float64):
            rows.append(case(f32, f16, f16, "gather,row=7", du=f16, vec_dtype=vec_dtype, vec_stride=3))
        rows.append(case(f32, f16, f16, "n=16k", du=f16, unaligned=("d_uncond",)))
    return rows


if triton is not None:
    guided_denoise_op = _register("guided_denoise", triton_guided_denoise)
    euler_step_op = _register("euler_step", triton_euler_step)
    heun_step_op = _register("heun_step", triton_heun_step)
    guided_score_op = _register("guided_score", triton_guided_score)
    multistep_step_op = _register("multistep_step", triton_multistep_step, ("out", "history", "corrected"))
