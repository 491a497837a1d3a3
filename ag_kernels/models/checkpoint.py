"""Saving and loading networks without running code from the file.

Two formats load by default:

* TorchScript archives (``torch.jit.script(net).save(path)`` / ``torch.jit.trace``): a zip whose
  code is TorchScript, read by TorchScript's own loader, not by Python's pickle.
* Our format, written by :func:`save_net`: a ``torch.save`` of a plain dict ::

      {"format": "ag_kernels.net", "version": 1, "arch": name, "kwargs": {...}, "state_dict": {...}}

  read with ``torch.load(..., weights_only=True)``, which only rebuilds tensors and plain
  containers.  The network is then built from a class registered in :mod:`ag_kernels.models.nets`
  under ``arch``, so the file names an architecture but carries no code.

Anything else that needs full unpickling, such as ``torch.save(model)`` or an EDM2 snapshot
``.pkl``, can execute arbitrary code while loading; :func:`load_net` refuses it with
:class:`UnsafeCheckpointError` unless the caller passes ``allow_pickle=True`` (CLI:
``--allow-pickle``) for a file they trust.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Union

import torch
from torch import nn

from .nets import ARCHS, get_arch

__all__ = ["FORMAT", "VERSION", "CheckpointError", "UnsafeCheckpointError", "save_net", "load_net"]

FORMAT = "ag_kernels.net"
VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A file that is not a network checkpoint load_net can read, or one that does not match its architecture."""


class UnsafeCheckpointError(CheckpointError):
    """A file that only full unpickling can read, which may run arbitrary code; load_net refused it."""


# --------------------------------------------------------------------------- saving


def _json_like(value) -> bool:
    if value is None or isinstance(value, (str, bool, int, float)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_json_like(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_like(v) for k, v in value.items())
    return False


def save_net(net: nn.Module, path: PathLike) -> None:
    """Write ``net`` in our checkpoint format (see the module docstring) to ``path``.

    ``net`` must be an instance of a class registered with :func:`ag_kernels.models.nets.register_arch`
    (exactly that class, not a subclass, since the file records the registered name) that keeps
    its constructor keyword arguments, JSON-like values only, in ``net.init_kwargs``.
    The file is written to a temporary name first and then renamed, so an interrupted save never
    leaves a truncated checkpoint at ``path``.

    Args:
        net: the network to save.
        path: the file to write (replaced if it exists).

    Raises:
        TypeError: ``net`` is not an ``nn.Module``, is TorchScript (save that with ``net.save``),
            is not of a registered class, or lacks JSON-like ``init_kwargs``.
        OSError: the file cannot be written.
    """
    if isinstance(net, torch.jit.ScriptModule):
        raise TypeError("net is a TorchScript module: save it with net.save(path); load_net reads that format too")
    if not isinstance(net, nn.Module):
        raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
    name = getattr(type(net), "arch_name", None)
    if name is None or ARCHS.get(name) is not type(net):
        raise TypeError(
            f"net is a {type(net).__qualname__}, which is not a registered architecture; registered: "
            f"{sorted(ARCHS)}.  Decorate the class with @ag_kernels.models.nets.register_arch(name) (and store its "
            "constructor kwargs in self.init_kwargs), or save it as TorchScript with torch.jit.script(net).save(path)"
        )
    kwargs = getattr(net, "init_kwargs", None)
    if not isinstance(kwargs, dict):
        raise TypeError(f"net ({name}) must expose its constructor keyword arguments as a dict net.init_kwargs")
    if not _json_like(kwargs):
        raise TypeError(f"net.init_kwargs must hold JSON-like values only (str, int, float, bool, None, lists, "
                        f"dicts with str keys), since they are stored in the checkpoint; got {kwargs!r}")
    path = Path(path)
    payload = {"format": FORMAT, "version": VERSION, "arch": name, "kwargs": dict(kwargs),
               "state_dict": net.state_dict()}
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------- loading


def _is_torchscript(path: Path) -> bool:
    """True for a TorchScript archive: a zip with a ``code/`` folder or ``constants.pkl`` (torch.save zips have
    neither)."""
    try:
        if not zipfile.is_zipfile(path):
            return False
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except Exception:  # a damaged zip fails in many ways (BadZipFile, UnicodeDecodeError, ...): not TorchScript
        return False
    return any(n == "constants.pkl" or n.endswith("/constants.pkl") or n.startswith("code/") or "/code/" in n
               for n in names)


#: Length-prefixed pickle arguments (pickletools' argument kinds): (prefix width, struct format).
_PICKLE_LENGTH_PREFIXES = {
    pickletools.TAKEN_FROM_ARGUMENT1: (1, "<B"),
    pickletools.TAKEN_FROM_ARGUMENT4: (4, "<i"),
    pickletools.TAKEN_FROM_ARGUMENT4U: (4, "<I"),
    pickletools.TAKEN_FROM_ARGUMENT8U: (8, "<Q"),
}
_PICKLE_OPS = {op.code.encode("latin-1"): op for op in pickletools.opcodes}


def _pickle_size_hazard(data: bytes):
    """Why reading the pickle ``data`` could allocate far more than ``len(data)``, or None.

    TorchScript's C++ unpickler trusts two numbers in a pickle: it allocates (and zero-fills) a
    string as long as a BINUNICODE's 4-byte length prefix before reading it, and grows its memo
    table up to a LONG_BINPUT's 4-byte index; one damaged byte in a 10 KB archive can ask for
    gigabytes.  This walks the opcodes (decoding only, as pickletools does) and reports a length
    prefix larger than the bytes that follow it, or a memo index larger than the pickle (a pickler
    numbers its memo entries from 0, one per PUT, so no real index comes near the byte count).
    Any other damage (unknown opcode, cut-off argument, no STOP) returns None: the loader itself
    reports it, as before.
    """
    pos, end = 0, len(data)
    while pos < end:
        op = _PICKLE_OPS.get(data[pos:pos + 1])
        if op is None:
            return None
        start, pos = pos, pos + 1
        if op.name == "STOP":
            return None
        if op.arg is None:
            continue
        n = op.arg.n
        if n >= 0:
            if pos + n > end:
                return None
            if op.name == "LONG_BINPUT":
                (index,) = struct.unpack_from("<I", data, pos)
                if index > end:
                    return f"LONG_BINPUT at byte {start} of a {end}-byte pickle sets memo index {index}"
            pos += n
        elif n == pickletools.UP_TO_NEWLINE:
            # GLOBAL and INST take two newline-terminated strings ("module\nname\n"), the others one
            for _ in range(2 if op.arg is pickletools.stringnl_noescape_pair else 1):
                newline = data.find(b"\n", pos)
                if newline < 0:
                    return None
                pos = newline + 1
        else:
            width, fmt = _PICKLE_LENGTH_PREFIXES[n]
            if pos + width > end:
                return None
            (length,) = struct.unpack_from(fmt, data, pos)
            pos += width
            if length < 0:
                return None
            if length > end - pos:
                return (f"{op.name} at byte {start} declares {length} bytes, but only {end - pos} bytes of the "
                        "pickle follow")
            pos += length
    return None


def _raw_record(f, info: zipfile.ZipInfo):
    """The bytes of one zip record as torch's reader sees them (no CRC check, which torch does not do either);
    None when the record cannot be read (torch.jit.load then reports the damage itself)."""
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        return None
    name_len, extra_len = struct.unpack_from("<HH", header, 26)
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.compress_size > os.fstat(f.fileno()).st_size:  # a damaged size: never read past the file
        return None
    f.seek(start)
    raw = f.read(info.compress_size)
    if info.compress_type == zipfile.ZIP_STORED:
        return raw
    if info.compress_type == zipfile.ZIP_DEFLATED:
        try:
            # (max_length 0 would mean no limit)
            return zlib.decompressobj(-zlib.MAX_WBITS).decompress(raw, max(info.file_size, 1))
        except zlib.error:
            return None
    return None


def _torchscript_size_hazard(path: Path):
    """The first pickle record of a TorchScript archive that would make torch.jit.load allocate far beyond the
    file's size (see :func:`_pickle_size_hazard`), as "record: reason"; None if there is none."""
    try:
        with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
            for info in zf.infolist():
                if not info.filename.endswith((".pkl", ".debug_pkl")):
                    continue
                data = _raw_record(f, info)
                reason = None if data is None else _pickle_size_hazard(data)
                if reason:
                    return f"{info.filename}: {reason}"
    except Exception:  # a damaged zip fails in many ways; torch.jit.load then reports the damage itself
        return None
    return None


def _looks_pickled(path: Path) -> bool:
    """True when the file is a torch.save zip or starts with a well-formed pickle (parsed, never executed)."""
    try:
        if zipfile.is_zipfile(path):
            return True
    except Exception:  # a damaged zip: fall through to the pickle check
        pass
    try:
        with open(path, "rb") as f:
            # genops only decodes opcodes; it imports and calls nothing.
            for _ in pickletools.genops(f):
                pass
        return True
    except Exception:  # any decoding failure: not a pickle
        return False


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else "no message"


def _torch_reason(exc: BaseException) -> str:
    """The line of torch's weights-only refusal that says what was refused (e.g. the unsupported global)."""
    match = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
    reason = match.group(1).strip() if match else ""
    return f" (torch: {reason})" if reason else ""


def _full_unpickle(path: Path, device):
    """Load with full unpickling (the caller allowed it): torch.save files, else plain pickles (EDM2 snapshots)."""
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except RuntimeError as exc:
        if "magic number" not in str(exc):
            raise
    with open(path, "rb") as f:  # a plain pickle.dump, not torch.save
        return pickle.load(f)


def _build(obj: dict, path: Path, device) -> nn.Module:
    """The network described by one of our checkpoints (already loaded weights-only).

    Everything the file says is checked before anything is allocated: the fields' types, the
    architecture kwargs (JSON-like values), and the shapes of the network those kwargs build,
    which is first built on the meta device (no memory) and must match the file's own tensors
    exactly; so a small file cannot make the loader build a huge network.
    """
    version = obj.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: bad format version {version!r}")
    if version > VERSION:
        raise CheckpointError(f"{path}: format version {version} was written by a newer ag_kernels "
                              f"(this one reads up to {VERSION}); upgrade ag_kernels")
    arch, kwargs, state = obj.get("arch"), obj.get("kwargs"), obj.get("state_dict")
    if not isinstance(kwargs, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{path}: corrupt checkpoint: 'kwargs' and 'state_dict' must be dicts")
    if not all(isinstance(k, str) for k in kwargs) or not _json_like(kwargs):
        raise CheckpointError(f"{path}: corrupt checkpoint: 'kwargs' must map names to JSON-like values")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: corrupt checkpoint: 'state_dict' entry {bad[0]!r} is not a named tensor")
    try:
        cls = get_arch(arch)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    try:
        with torch.device("meta"):
            skeleton = cls(**kwargs)
    except Exception as exc:  # any failure of the constructor on these kwargs is the file's fault
        raise CheckpointError(f"{path}: cannot build {arch!r} from the stored kwargs {_short(kwargs)}: "
                              f"{type(exc).__name__}: {exc}") from None
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        detail = "; ".join(part for part in (
            f"missing {missing[:3]}" if missing else "", f"unexpected {extra[:3]}" if extra else "",
            f"{wrong[0]!r} is {list(found[wrong[0]])} in the file but {list(expected[wrong[0]])} for these kwargs"
            if wrong else "") if part)
        raise CheckpointError(f"{path}: the stored weights do not match {arch!r} built with {_short(kwargs)}: {detail}")
    del skeleton
    try:
        net = cls(**kwargs)
        net.load_state_dict(state, strict=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot build {arch!r} from the stored kwargs {_short(kwargs)}: "
                              f"{type(exc).__name__}: {exc}") from None
    return net.to(device)


def _short(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...}"


def load_net(path: PathLike, *, device: Union[str, torch.device] = "cpu", allow_pickle: bool = False) -> nn.Module:
    """Load a network saved as TorchScript or with :func:`save_net`; returned in eval mode on ``device``.

    Loading never unpickles arbitrary objects unless ``allow_pickle=True``: a file that needs
    that (a pickled ``nn.Module`` from ``torch.save(model)``, an EDM2 ``.pkl`` snapshot) raises
    :class:`UnsafeCheckpointError`.  With ``allow_pickle=True`` such a file is loaded with
    ``weights_only=False`` (plain pickles with ``pickle.load``), which runs whatever code the file
    names: only for trusted files.  The result must then be an ``nn.Module``, or a dict holding
    one under ``"ema"`` (the EDM2 snapshot layout).

    Args:
        path: the checkpoint file.
        device: where the network's parameters go.
        allow_pickle: allow full unpickling (runs code the file names: trusted files only).

    Returns:
        The network, in eval mode on ``device``.

    Raises:
        FileNotFoundError: no file at ``path``.
        UnsafeCheckpointError: the file needs full unpickling and ``allow_pickle`` is False.
        CheckpointError: the file is not a network checkpoint, names an unregistered architecture,
            or its weights do not fit the architecture.
    """
    if not isinstance(allow_pickle, bool):
        raise TypeError(f"allow_pickle must be True or False, got {allow_pickle!r}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"network file not found: {str(path)!r}")
    if not path.is_file():
        raise CheckpointError(f"network path {str(path)!r} is not a file")
    device = torch.device(device)

    if _is_torchscript(path):
        # torch.jit.load's unpickler would allocate what a damaged length or memo index asks for before it
        # finds the archive too short (a code .debug_pkl is unpickled later, when the module's code is shown):
        # refuse such a file before it gets there.
        hazard = _torchscript_size_hazard(path)
        if hazard:
            raise CheckpointError(f"{path}: not a loadable TorchScript archive: {hazard}")
        with warnings.catch_warnings():
            # torch >= 2.9 flags all of torch.jit as deprecated; loading an archive the user
            # chose is still supported, and the warning is not something they can act on here.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.* is deprecated",
                                    category=DeprecationWarning)
            try:
                net = torch.jit.load(str(path), map_location=device)
            except Exception as exc:  # a damaged archive fails in many ways; each is the file's fault
                raise CheckpointError(f"{path}: not a loadable TorchScript archive: "
                                      f"{type(exc).__name__}: {_first_line(exc)}") from None
        if not isinstance(net, nn.Module):
            raise CheckpointError(f"{path}: the TorchScript archive holds a {type(net).__name__}, not a module")
        return net.eval()

    try:
        with warnings.catch_warnings():
            # Plain pickles (protocol 4+) make the weights-only unpickler warn before it refuses them.
            warnings.filterwarnings("ignore", message=r"Detected pickle protocol", category=UserWarning)
            obj = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _looks_pickled(path):
            raise CheckpointError(f"{path}: not a network checkpoint (neither TorchScript, nor a torch.save file, "
                                  "nor a pickle)") from None
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{path}: refusing to load: this file stores Python objects (e.g. a pickled nn.Module from "
                f"torch.save(model), or an EDM2 .pkl snapshot) that only full unpickling can rebuild, and "
                f"unpickling can run arbitrary code{_torch_reason(exc)}.  If you trust the file, load it with "
                "allow_pickle=True (CLI: --allow-pickle); better, convert it once with "
                "ag_kernels.models.checkpoint.save_net or torch.jit.script(net).save(path)."
            ) from None
        try:
            obj = _full_unpickle(path, device)
        except (ImportError, AttributeError) as exc:
            # The pickle names a class that is not importable here (e.g. EDM2's dnnlib/torch_utils).
            raise CheckpointError(f"{path}: unpickling needs code that is not importable here: {exc}") from exc
        except Exception as exc:  # (raised in this handler, the clauses below would not see it)
            raise CheckpointError(f"{path}: cannot unpickle the file ({type(exc).__name__}: "
                                  f"{_first_line(exc)})") from None
        if isinstance(obj, dict) and isinstance(obj.get("ema"), nn.Module):
            obj = obj["ema"]  # EDM2 snapshots: {"ema": network, ...}
        if not isinstance(obj, nn.Module):
            raise CheckpointError(f"{path}: unpickled a {type(obj).__name__}, not a torch.nn.Module network")
        return obj.to(device).eval()
    except CheckpointError:
        raise
    except Exception as exc:
        # A damaged or foreign file makes torch.load fail in many ways (KeyError, IndexError,
        # UnicodeDecodeError, RuntimeError, ...): all of them mean "not a checkpoint we can read".
        raise CheckpointError(f"{path}: cannot read the file as a network checkpoint "
                              f"({type(exc).__name__}: {_first_line(exc)})") from None

    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return _build(obj, path, device).eval()
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: holds a bare state_dict without its architecture; save the network with "
                              "ag_kernels.models.checkpoint.save_net(net, path) or as TorchScript")
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a network checkpoint "
                          f"(expected TorchScript or a {FORMAT!r} dict written by save_net)")
