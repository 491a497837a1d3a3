"""load_net keeps its contract on hostile files: every malformed file raises CheckpointError (or
loads, for damage that keeps the format valid), nothing in a file is ever executed, and no file
makes the loader allocate far beyond its own size.

A seeded corpus of >= 1000 files (seed 0 by default; AG_TEST_SEED explores others):
truncations, bit flips, overwritten byte ranges and appended garbage of valid checkpoints (our
format, two architectures, and TorchScript) and of a malicious pickle; random bytes, text and
empty files; and well-formed torch.save files with wrong field types, unknown architectures,
mismatched weights and architecture kwargs asking for huge networks.  The corpus runs in a
subprocess, so its peak memory is measured from a clean baseline.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import resource
import struct
import subprocess
import sys
import warnings

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
MIN_FILES = 1000
#: Peak resident memory the corpus may add over the loader's baseline (the largest file is ~40 KB;
#: one huge-kwargs build that got through would need gigabytes).
PEAK_BUDGET_MB = 64


class _Evil:
    """Unpickling this runs os.system-like code: here it only writes a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _seeds(folder, marker):
    """Valid files to mutate: {name: bytes}."""
    from ag_kernels.models.checkpoint import save_net
    from ag_kernels.models.nets import TinyDenoiser
    from ag_kernels.toy.model import ToyDenoiser

    out = {}
    save_net(TinyDenoiser(img_channels=3, img_resolution=8, label_dim=3, channels=8, seed=1), folder / "tiny.pt")
    out["tiny"] = (folder / "tiny.pt").read_bytes()
    toy = _small_toy(ToyDenoiser)
    save_net(toy, folder / "toy.pt")
    out["toy"] = (folder / "toy.pt").read_bytes()
    net = TinyDenoiser(img_channels=1, img_resolution=4, channels=4, seed=2).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in torch >= 2.9; its archives still load
        traced = torch.jit.trace(net, (torch.randn(1, 1, 4, 4), torch.tensor(1.0)))
        traced.save(str(folder / "script.pt"))
    out["script"] = (folder / "script.pt").read_bytes()
    out["evil"] = pickle.dumps({"ema": _Evil(str(marker))})
    torch.save({"ema": _Evil(str(marker))}, folder / "evil_zip.pt")
    out["evil_zip"] = (folder / "evil_zip.pt").read_bytes()
    return out


def _small_toy(cls):
    import inspect

    params = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in dict(hidden=8, depth=2, width=8, layers=2).items() if k in params}
    return cls(**kwargs)


def _structural(folder, rng):
    """Well-formed torch.save files whose content is wrong: (name, path)."""
    from ag_kernels.models.checkpoint import FORMAT, VERSION
    from ag_kernels.models.nets import TinyDenoiser

    good = TinyDenoiser(img_channels=3, img_resolution=8, channels=8, seed=3)
    state = good.state_dict()
    kwargs = dict(good.init_kwargs)
    base = {"format": FORMAT, "version": VERSION, "arch": "tiny_denoiser", "kwargs": kwargs, "state_dict": state}
    variants = []
    for key, values in {
        "channels": [30000, 10**9, -1, 0, "8", None, [8], 8.5, True],
        "img_resolution": [10**12, -5],
        "emb_features": [10**8, 3, 0],
        "img_channels": [4, 10**6],
        "label_dim": [10**9, -1],
        "out_dtype": ["int64", "no_such", 5],
        "seed": ["x", 2**200],
        "unknown_kwarg": [1],
    }.items():
        for v in values:
            variants.append((f"kw_{key}_{str(v)[:12]}", dict(base, kwargs=dict(kwargs, **{key: v}))))
    for key, values in {
        "version": [0, -1, 99, "1", None, 1.0, True, [1]],
        "arch": ["nope", 5, None, ["tiny_denoiser"], ""],
        "kwargs": [None, [], "x", {1: 2}, {"channels": {"nested": object.__name__}}],
        "state_dict": [None, [], {"w": 1}, {1: torch.zeros(1)}, {}],
        "format": ["other", None, 3],
    }.items():
        for v in values:
            variants.append((f"field_{key}_{str(v)[:12]}", dict(base, **{key: v})))
    for key in list(base):
        variants.append((f"missing_{key}", {k: v for k, v in base.items() if k != key}))
    wrong = dict(state)
    name = next(iter(wrong))
    variants += [
        ("shape_mismatch", dict(base, state_dict=dict(wrong, **{name: torch.zeros(3, 3)}))),
        ("dtype_int", dict(base, state_dict=dict(wrong, **{name: wrong[name].to(torch.int64)}))),
        ("extra_tensor", dict(base, state_dict=dict(wrong, extra=torch.zeros(2)))),
        ("bare_state_dict", state),
        ("a_list", [1, 2, 3]),
        ("a_tensor", torch.zeros(3)),
        ("a_string", "hello"),
    ]
    out = []
    for i, (n, payload) in enumerate(variants):
        path = folder / f"struct_{i:03d}.pt"
        torch.save(payload, path)
        out.append((n, path))
    return out


def _mutations(blob: bytes, rng: random.Random, count: int):
    """``count`` damaged copies of ``blob``: (kind, bytes)."""
    out = []
    for _ in range(count):
        kind = rng.choice(["truncate", "flip", "overwrite", "append", "flip_many"])
        b = bytearray(blob)
        if kind == "truncate":
            b = b[:rng.randrange(len(b))]
        elif kind in ("flip", "flip_many"):
            for _ in range(1 if kind == "flip" else rng.randint(2, 64)):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
        elif kind == "overwrite":
            i = rng.randrange(len(b))
            n = rng.randint(1, 256)
            b[i:i + n] = bytes(rng.getrandbits(8) for _ in range(min(n, len(b) - i)))
        else:
            b += bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 512)))
        out.append((kind, bytes(b)))
    return out


def _warm_meta():
    from ag_kernels.models.nets import TinyDenoiser

    with torch.device("meta"):
        TinyDenoiser(channels=8)


def run_corpus(folder: str, seed: int) -> dict:
    """Load every file of the corpus; returns counts, the unexpected exceptions and the peak memory."""
    from pathlib import Path

    from ag_kernels.models.checkpoint import CheckpointError, load_net

    folder = Path(folder)
    rng = random.Random(seed)
    marker = folder / "EXECUTED"
    seeds = _seeds(folder, marker)
    files = []
    for name, blob in seeds.items():
        per_seed = 260 if name in ("tiny", "toy") else 170
        for i, (kind, data) in enumerate(_mutations(blob, rng, per_seed)):
            files.append((f"{name}:{kind}", data))
    for i in range(60):
        files.append(("random", bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 4096)))))
    files += [("text", b"hello world\n"), ("empty", b""), ("zip_magic", b"PK\x03\x04" + b"\x00" * 40),
              ("pickle_proto", b"\x80\x05"), ("json", b'{"format": "ag_kernels.net"}')]
    paths = []
    for i, (kind, data) in enumerate(files):
        path = folder / f"f{i:05d}.pt"
        path.write_bytes(data)
        paths.append((kind, path))
    paths += [(f"struct:{n}", p) for n, p in _structural(folder, rng)]

    # The loader's fixed costs come first (the first build on the meta device initializes ~140 MB
    # of torch machinery once): the budget is for what the files add.
    load_net(folder / "tiny.pt")
    _warm_meta()
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    counts = {"loaded": 0, "checkpoint_error": 0}
    unexpected = []
    largest = 0
    for kind, path in paths:
        largest = max(largest, path.stat().st_size)
        try:
            load_net(path)
            counts["loaded"] += 1
        except CheckpointError:
            counts["checkpoint_error"] += 1
        except Exception as exc:  # the contract is broken: record it
            unexpected.append(f"{kind} {path.name}: {type(exc).__name__}: {str(exc)[:200]}")
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(files=len(paths), unexpected=unexpected, executed=marker.exists(),
                peak_added_mb=(peak_kb - baseline_kb) / 1024, largest_file_kb=largest / 1024, **counts)


def test_mutated_checkpoint_corpus(tmp_path, gen):
    seed = int(torch.randint(2**31, (), generator=gen))
    code = (f"import json, sys; sys.path.insert(0, {HERE!r}); import test_checkpoint_fuzz as t; "
            f"print(json.dumps(t.run_corpus({str(tmp_path)!r}, {seed})))")
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert result["files"] >= MIN_FILES
    assert result["unexpected"] == [], result["unexpected"][:10]
    assert not result["executed"], "a pickle in the corpus was executed"
    assert result["loaded"] + result["checkpoint_error"] == result["files"]
    assert result["checkpoint_error"] > result["files"] // 2 and result["loaded"] > 0
    assert result["peak_added_mb"] < PEAK_BUDGET_MB, result


#: Pickle records that a TorchScript archive's unpickler would read into gigabytes: a string whose 4-byte
#: length prefix says 256 MiB (it is zero-filled before the unpickler finds the record too short), and a
#: memo index of 2**24 (the memo table grows to it, 16 bytes a slot).  {case: (record suffix, pickle bytes)}
_SIZE_HAZARDS = {
    "constants_string": ("/constants.pkl", b"\x80\x02X" + struct.pack("<I", 2**28) + b"abc"),
    "debug_pkl_string": (".debug_pkl", b"\x80\x02X" + struct.pack("<I", 2**28) + b"abc"),
    "constants_memo": ("/constants.pkl", b"\x80\x02Nr" + struct.pack("<I", 2**24) + b"(t."),
}


def load_peak(good: str, path: str) -> dict:
    """Load ``good`` (the loader's fixed costs), then ``path`` and read a TorchScript module's code (torch
    unpickles its debug_pkl only then): the outcome and the peak memory it added."""
    from ag_kernels.models.checkpoint import CheckpointError, load_net

    getattr(load_net(good), "code", None)
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        getattr(load_net(path), "code", None)
        outcome = "loaded"
    except CheckpointError as exc:
        outcome = f"CheckpointError: {exc}"
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(outcome=outcome, peak_added_mb=(peak_kb - baseline_kb) / 1024)


@pytest.mark.parametrize("case", sorted(_SIZE_HAZARDS))
def test_torchscript_pickle_sizes_checked_before_loading(tmp_path, case):
    """A TorchScript archive whose pickle (constants.pkl, or the debug_pkl of its code) declares a 256 MiB string
    or memo index in a few bytes: CheckpointError naming the record, without allocating that much (seed
    167863855's corpus hit this: an overwrite left a BINUNICODE length of 3.8e9 in constants.pkl; a debug_pkl
    is read lazily, when the loaded module's code is shown).  The files load in a fresh subprocess."""
    import zipfile

    from ag_kernels.models.nets import TinyDenoiser

    suffix, payload = _SIZE_HAZARDS[case]
    good, path = tmp_path / "script.pt", tmp_path / f"{case}.pt"
    net = TinyDenoiser(img_channels=1, img_resolution=4, channels=4, seed=2).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in torch >= 2.9; its archives still load
        torch.jit.trace(net, (torch.randn(1, 1, 4, 4), torch.tensor(1.0))).save(str(good))
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(path, "w") as zout:
        replaced = [info.filename for info in zin.infolist() if info.filename.endswith(suffix)]
        for info in zin.infolist():
            data = payload if info.filename in replaced else zin.read(info)
            zout.writestr(info.filename, data, compress_type=info.compress_type)
    assert len(replaced) == 1, replaced
    code = (f"import json, sys; sys.path.insert(0, {HERE!r}); import test_checkpoint_fuzz as t; "
            f"print(json.dumps(t.load_peak({str(good)!r}, {str(path)!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert result["peak_added_mb"] < PEAK_BUDGET_MB, result
    opcode = "LONG_BINPUT" if case.endswith("memo") else "BINUNICODE"
    assert result["outcome"].startswith("CheckpointError: "), result
    assert f"{case}.pt: not a loadable TorchScript archive: {replaced[0]}: {opcode} at byte " in result["outcome"], \
        result


def test_huge_kwargs_refused_before_allocation(tmp_path):
    """channels=30000 in a tiny file: refused by comparing shapes on the meta device, naming the mismatch;
    a text file is a CheckpointError, not a KeyError."""
    import pytest

    from ag_kernels.models.checkpoint import FORMAT, VERSION, CheckpointError, load_net
    from ag_kernels.models.nets import TinyDenoiser

    good = TinyDenoiser(channels=8)
    payload = {"format": FORMAT, "version": VERSION, "arch": "tiny_denoiser",
               "kwargs": dict(good.init_kwargs, channels=30000), "state_dict": good.state_dict()}
    torch.save(payload, tmp_path / "huge.pt")
    # (Its memory is measured in the corpus above, from a clean baseline in a subprocess.)
    with pytest.raises(CheckpointError, match=r"do not match 'tiny_denoiser'.*'conv_in_b' is \[8\] in the file "
                                              r"but \[30000\] for these kwargs"):
        load_net(tmp_path / "huge.pt")
    (tmp_path / "text.pt").write_text("hello world")
    with pytest.raises(CheckpointError, match="text.pt: cannot read the file as a network checkpoint"):
        load_net(tmp_path / "text.pt")
