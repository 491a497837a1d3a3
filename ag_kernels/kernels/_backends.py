"""Which backends exist, which can run on a device, and which one "auto" picks."""

from __future__ import annotations

import importlib
import warnings
from typing import List, Optional, Union

import torch

from ._fake import noop_fake

BACKENDS = ("torch", "triton", "ext")
EXT_OPS = ("guided_denoise", "euler_step", "heun_step", "guided_score", "multistep_step")

_EXT_ERROR: Optional[str] = None
_ext = None


def _register_ext_fakes() -> None:
    """Fake (meta) kernels of torch.ops.ag_kernels.*, so torch.compile and opcheck can trace them.

    They must be registered from this module: the C++ library names it with set_python_module.
    """
    for name in EXT_OPS:
        qualname = f"ag_kernels::{name}"
        if not torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "Meta"):
            torch.library.register_fake(qualname)(noop_fake)


def _load_ext(warn: bool = False):
    """Guarded load of the compiled extension ``ag_kernels._C`` (built by setup.py from csrc/).

    Returns the module, or None with the reason kept for :func:`_unavailable_reason`; with
    ``warn``, says once that the "ext" backend is missing (the package works without it).
    """
    global _ext, _EXT_ERROR
    if _ext is None and _EXT_ERROR is None:
        try:
            _ext = importlib.import_module("ag_kernels._C")
            _register_ext_fakes()
        except (ImportError, OSError, RuntimeError) as exc:
            # OSError/RuntimeError: a library built against another torch (undefined symbols, schema clash).
            _EXT_ERROR = (
                f"the C++/CUDA extension ag_kernels._C is not available ({type(exc).__name__}: {exc}); "
                "build it with `pip install --no-build-isolation -e .` against the installed torch"
            )
            if warn:
                warnings.warn(
                    f"ag_kernels: backend 'ext' disabled: {_EXT_ERROR}. The 'torch' and 'triton' backends still work.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _ext


def _triton_module():
    from . import triton_kernels

    return triton_kernels


def _unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """None when ``backend`` can run on ``device``, else a sentence saying why not."""
    if backend == "torch":
        return None
    if backend == "triton":
        tk = _triton_module()
        if tk.TRITON_IMPORT_ERROR is not None:
            return f"triton could not be imported ({tk.TRITON_IMPORT_ERROR})"
        if device.type == "cuda" or tk.INTERPRET:
            return None
        return (
            f"the Triton kernels run on CUDA tensors, or on any device with TRITON_INTERPRET=1 "
            f"set before ag_kernels is imported; got device {device}"
        )
    if backend == "ext":
        if _load_ext() is None:
            return _EXT_ERROR
        if device.type == "cuda":
            # _C imports on a CPU-only build too: CUDA tensors need the op's CUDA kernels registered.
            missing = [n for n in EXT_OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"ag_kernels::{n}", "CUDA")]
            if missing:
                return (f"the extension ag_kernels._C was built without its CUDA kernels (none registered for "
                        f"{', '.join(missing)}); rebuild it where torch is a CUDA build and nvcc is found "
                        "(setup.py says which part it built)")
        return None
    return f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}"


def _auto_order(device: torch.device) -> List[str]:
    # Fastest first.  On the CPU the compiled extension, then the reference (the Triton
    # interpreter is only a checking aid).  On a GPU, Triton (measured on an H100) before the
    # CUDA extension, whose GPU checks and benchmarks are still owed; the GPU benchmarks decide.
    if device.type == "cuda":
        return ["triton", "ext", "torch"]
    return ["ext", "torch", "triton"]


def available_backends(device: Union[str, torch.device, None] = "cpu") -> List[str]:
    """The backends usable for tensors on ``device``, in the order "auto" prefers them.

    >>> available_backends("cpu")[0]   # what backend="auto" runs on CPU tensors (extension built)
    'ext'

    Args:
        device: a device or its name ("cpu", "cuda", "cuda:1", ...); None means the CPU.

    Returns:
        A list of backend names from "ext", "triton" and "torch"; "torch" is always usable.

    Raises:
        RuntimeError: ``device`` is not a device name torch knows (torch's own error).
    """
    device = torch.device(device if device is not None else "cpu")
    return [b for b in _auto_order(device) if _unavailable_reason(b, device) is None]


def resolve_backend(backend, device: torch.device) -> str:
    """The concrete backend for ``backend`` ("auto" or a name) on ``device``, or a ValueError naming it."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {('auto',) + BACKENDS}; got {type(backend).__name__}")
    if backend == "auto":
        return available_backends(device)[0]
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    reason = _unavailable_reason(backend, device)
    if reason is not None:
        raise ValueError(f"backend={backend!r} is not available for {device} tensors: {reason}")
    return backend
