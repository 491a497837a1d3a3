"""``python -m ag_kernels verify --edm2 PATH --generate``: our ``generate`` against the reference's ``generate_images``.

End to end, files on disk: a small pair of EDM2 snapshots is built from the checkout's own network
class (``training.networks_edm2.Precond``, random weights, pixel space) and pickled as EDM2's
training loop pickles them; then, for each configuration (unguided, guided, churned with
``--subdirs`` and seeds crossing 1000, class-fixed), the reference's ``generate_images()``
(imported from the user's checkout, run in this process) and our command line
(``python -m ag_kernels generate``, run in this process through :func:`ag_kernels.__main__.main`)
write PNGs for the same seeds and options into two folders, which are compared: the same
relative file names, the share of pixels exactly equal and the largest difference of a colour
value.  With ``--torchrun``, both also run under ``torchrun --standalone --nproc_per_node N``
(the reference's batch split depends on the number of processes, so ours under torchrun is
compared with the reference under torchrun, and also with the reference's one-process run).

No EDM2 code is part of ag_kernels: everything EDM2 comes from the checkout the user names.
Latent (VAE) snapshots are not built here: their decoder needs diffusers and the VAE weights.

Exit status: 0 all goals hold, 1 a mismatch, 2 bad input (the checkout or the options).
This module is also the reference's worker under torchrun (``--reference-worker SPEC``, internal).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import os
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ._checkout import ReferenceSamplerError, load_reference_module

__all__ = ["GenConfig", "configs", "build_snapshots", "compare_outputs", "verify_generate", "format_table",
           "add_arguments", "run", "main", "MAIN_NET", "GUIDE_NET"]

#: Keyword arguments of the checkout's Precond for the main and the guiding network (autoguidance:
#: the guide is a smaller model of the same kind).  Attention runs at half resolution with 2 heads.
MAIN_NET = dict(model_channels=32, channel_mult=[1, 2], num_blocks=1, channels_per_head=32)
GUIDE_NET = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, channels_per_head=16)
LABEL_DIM = 10
IMG_CHANNELS = 3
#: The reference command line's flag for each sampler option (also ours: the same spellings).
SAMPLER_FLAGS = {"num_steps": "--steps", "sigma_min": "--sigma_min", "sigma_max": "--sigma_max", "rho": "--rho",
                 "guidance": "--guidance", "S_churn": "--S_churn", "S_min": "--S_min", "S_max": "--S_max",
                 "S_noise": "--S_noise"}


# --------------------------------------------------------------------------- snapshots


def build_snapshots(folder, *, resolution: int = 16, seed: int = 0) -> Dict[str, str]:
    """A main and a guiding EDM2 snapshot built with the checkout's ``training.networks_edm2.Precond``.

    The checkout must be importable (``ag_kernels.models.edm2.use_checkout``).  Random weights from
    ``seed``; the scalar gains, which EDM2 initializes to zero (a network that returns c_skip * x
    and ignores its class), get random values in [0.3, 0.7], so the output depends on the weights,
    the noise level and the class.  As EDM2's training loop saves them: ``ema`` in eval mode,
    without gradients, in float16, with the main snapshot's ``encoder`` (the checkout's
    ``StandardRGBEncoder``).  A copy of the main snapshot without an encoder (the reference then
    falls back to its StandardRGBEncoder, ours to the same formula) is written too.

    Returns {"net": path, "net_noenc": path, "gnet": path}.

    Raises:
        ReferenceSamplerError: the checkout lacks the classes or they do not build.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        networks = importlib.import_module("training.networks_edm2")
        encoders = importlib.import_module("training.encoders")
    except Exception as exc:  # noqa: BLE001 - foreign code: any failure, named
        raise ReferenceSamplerError(f"--edm2: importing training.networks_edm2 / training.encoders from the "
                                    f"checkout failed: {type(exc).__name__}: {exc}") from None
    precond = getattr(networks, "Precond", None)
    rgb = getattr(encoders, "StandardRGBEncoder", None)
    if not callable(precond) or not callable(rgb):
        raise ReferenceSamplerError("--edm2: the checkout has no training.networks_edm2.Precond or "
                                    "training.encoders.StandardRGBEncoder; is this an NVlabs/edm2 checkout?")
    nets = {}
    with torch.random.fork_rng(devices=[]):
        for i, (name, kwargs) in enumerate((("net", MAIN_NET), ("gnet", GUIDE_NET))):
            torch.manual_seed(seed * 1000 + i)
            full = dict(img_resolution=resolution, img_channels=IMG_CHANNELS, label_dim=LABEL_DIM,
                        attn_resolutions=[resolution // 2], **kwargs)
            try:
                net = precond(**full)
            except Exception as exc:  # noqa: BLE001
                raise ReferenceSamplerError(f"--edm2: training.networks_edm2.Precond({_kwargs_text(full)}) raised "
                                            f"{type(exc).__name__}: {exc}") from None
            gen = torch.Generator().manual_seed(seed * 1000 + 100 + i)
            with torch.no_grad():
                for p in net.parameters():
                    if p.dim() == 0:
                        p.copy_(0.3 + 0.4 * torch.rand((), generator=gen))
            nets[name] = net.eval().requires_grad_(False).to(torch.float16)
    paths = {}
    for name, net, encoder in (("net", nets["net"], rgb()), ("net_noenc", nets["net"], None),
                               ("gnet", nets["gnet"], None)):
        paths[name] = str(folder / f"{name}.pkl")
        with open(paths[name], "wb") as f:
            pickle.dump({"ema": net, "encoder": encoder, "dataset_kwargs": {}, "loss_fn": None}, f)
    return paths


def _kwargs_text(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def _params(path: str) -> int:
    with open(path, "rb") as f:
        return sum(p.numel() for p in pickle.load(f)["ema"].parameters())


# --------------------------------------------------------------------------- configurations


@dataclass
class GenConfig:
    """One comparison: the same options for the reference and for our command line."""

    name: str
    net: str                      # key into build_snapshots' paths
    gnet: Optional[str] = None    # idem; None: no guiding network (guidance 1)
    class_idx: Optional[int] = None
    subdirs: bool = False
    sampler: Dict[str, float] = field(default_factory=dict)  # reference names: guidance, S_churn, ...
    summary: str = ""


def configs() -> List[GenConfig]:
    """The configurations compared (the sampler options besides num_steps; the steps come from --steps)."""
    return [
        GenConfig("unguided", "net_noenc", summary="w=1; snapshot without encoder (pixel default)"),
        GenConfig("guided", "net", "gnet", sampler=dict(guidance=2.1), summary="w=2.1, guide = smaller net"),
        GenConfig("churned", "net", "gnet", subdirs=True,
                  sampler=dict(guidance=2.1, S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003,
                               sigma_min=0.003, sigma_max=70.0, rho=6.0),
                  summary="w=2.1, S_churn=40 in [0.05,50], S_noise=1.003, sigma 0.003..70, rho=6, --subdirs"),
        GenConfig("class-fixed", "net", class_idx=3, sampler=dict(S_churn=20.0),
                  summary="--class 3, S_churn=20, w=1"),
    ]


def _seeds_text(seeds: Sequence[int]) -> str:
    return ",".join(str(s) for s in seeds)


def _our_argv(cfg: GenConfig, paths, edm2_root, seeds, batch, num_steps, outdir, device, backend) -> List[str]:
    argv = ["generate", "--net", paths[cfg.net], "--allow-pickle", "--edm2", str(edm2_root),
            "--seeds", _seeds_text(seeds), "--batch", str(batch), "--outdir", str(outdir),
            "--device", str(device), "--backend", backend, "--no-progress"]
    if cfg.gnet is not None:
        argv += ["--gnet", paths[cfg.gnet]]
    if cfg.class_idx is not None:
        argv += ["--class", str(cfg.class_idx)]
    if cfg.subdirs:
        argv.append("--subdirs")
    for key, value in dict(cfg.sampler, num_steps=num_steps).items():
        argv += [SAMPLER_FLAGS[key], repr(value)]
    return argv


def _reference_kwargs(cfg: GenConfig, paths, seeds, batch, num_steps, outdir) -> dict:
    """generate_images() arguments, as the reference command line passes them."""
    guidance = cfg.sampler.get("guidance", 1.0)
    return dict(net=paths[cfg.net], gnet=paths[cfg.gnet] if cfg.gnet is not None and guidance != 1 else None,
                outdir=str(outdir), subdirs=cfg.subdirs, seeds=list(seeds), class_idx=cfg.class_idx,
                max_batch_size=batch, verbose=False, num_steps=num_steps, **cfg.sampler)


# --------------------------------------------------------------------------- comparing outputs


def _files(folder: Path) -> List[str]:
    """The files a run wrote, less our settings record (the reference writes none; it is not an image)."""
    from .generate import SETTINGS_FILE

    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() != SETTINGS_FILE)


def compare_outputs(ref_dir, our_dir) -> dict:
    """The two output folders compared: file names (relative paths) and, for files in both, pixels.

    A pixel is equal when all its colour values are; ``max_diff`` is the largest absolute
    difference of a colour value (255 for images of different shapes).

    Returns a dict: ref_files, our_files (counts), missing (in the reference's output only),
    extra (in ours only), same_names, pixels, equal_pixels, equal_pct, max_diff.
    """
    import numpy as np
    from PIL import Image

    ref_dir, our_dir = Path(ref_dir), Path(our_dir)
    ref = _files(ref_dir) if ref_dir.is_dir() else []
    ours = _files(our_dir) if our_dir.is_dir() else []
    both = sorted(set(ref) & set(ours))
    pixels = equal = max_diff = 0
    for rel in both:
        a = np.asarray(Image.open(ref_dir / rel)).astype(np.int16)
        b = np.asarray(Image.open(our_dir / rel)).astype(np.int16)
        count = a.shape[0] * a.shape[1] if a.ndim >= 2 else a.size
        pixels += count
        if a.shape != b.shape:
            max_diff = 255
            continue
        diff = np.abs(a - b).reshape(count, -1)
        equal += int((diff.max(axis=1) == 0).sum())
        max_diff = max(max_diff, int(diff.max()) if diff.size else 0)
    missing, extra = sorted(set(ref) - set(ours)), sorted(set(ours) - set(ref))
    return dict(ref_files=len(ref), our_files=len(ours), missing=missing, extra=extra,
                same_names=bool(ref) and not missing and not extra, pixels=pixels, equal_pixels=equal,
                equal_pct=100.0 * equal / pixels if pixels else 0.0, max_diff=max_diff)


# --------------------------------------------------------------------------- running


@contextlib.contextmanager
def _process_group(folder: Path):
    """A one-process Gloo group while the reference runs (it calls torch.distributed.barrier)."""
    dist = torch.distributed
    if dist.is_initialized():
        yield
        return
    store = folder / "process_group_store"
    dist.init_process_group("gloo", init_method=store.resolve().as_uri(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _run_reference(module, kwargs: dict, device: torch.device):
    """(seconds, batches): the reference's generate_images() in this process; batches = the seeds of each
    non-empty batch, in order, as it yields them."""
    start = time.perf_counter()
    batches = []
    try:
        for r in module.generate_images(device=device, **kwargs):
            seeds = [int(s) for s in getattr(r, "seeds", None) or []]
            if seeds:
                batches.append(seeds)
    except Exception as exc:  # noqa: BLE001 - foreign code: any failure is a setup problem, named
        raise ReferenceSamplerError(f"the reference generate_images() raised {type(exc).__name__}: {exc} "
                                    f"(outdir {kwargs.get('outdir')})") from None
    return time.perf_counter() - start, batches


@contextlib.contextmanager
def _recording_batches(batches: list):
    """While active, the seeds of every batch that ag_kernels.sampling.generation.generate yields are appended to batches.

    Our command line imports generate when it runs, so it picks up the recording wrapper.
    """
    from ..sampling import generation

    original = generation.generate

    def recording(*args, **kwargs):
        for batch in original(*args, **kwargs):
            batches.append([int(s) for s in batch.seeds])
            yield batch

    generation.generate = recording
    try:
        yield
    finally:
        generation.generate = original


def _run_ours(argv: List[str]):
    """(seconds, batches, error or None): our command line, in this process, its output captured;
    batches as :func:`_run_reference`'s."""
    from .generate import main as cli

    out = io.StringIO()
    batches: list = []
    start = time.perf_counter()
    try:
        with _recording_batches(batches), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            rc = cli(argv[1:])  # argv[0] is the command's name, "generate"
    except SystemExit as exc:
        rc = exc.code
    except Exception as exc:  # noqa: BLE001 - ours failing is a failed row, reported
        return time.perf_counter() - start, batches, f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - start
    if rc != 0:
        lines = [l for l in out.getvalue().strip().splitlines() if l.strip()]
        return seconds, batches, f"exit status {rc}: {lines[-1] if lines else ''}"
    return seconds, batches, None


def _child_env() -> dict:
    """The environment of torchrun's processes: this ag_kernels first on PYTHONPATH."""
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _torchrun(nproc: int, module_args: List[str], timeout: float):
    """(seconds, error or None) of ``torchrun --standalone --nproc_per_node nproc -m module_args``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", *module_args]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=_child_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - start, f"torchrun did not finish within {timeout:g} s"
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        lines = [l for l in (proc.stderr + proc.stdout).strip().splitlines()
                 if l.strip() and not l.startswith(("W", "I")) or "Error" in l]
        return seconds, f"torchrun exit status {proc.returncode}: {lines[-1] if lines else ''}"
    return seconds, None


def _row(name, summary, comparison, ref_s, our_s, error, min_equal, max_diff, against="reference, 1 process",
         batches=None):
    """One comparison; ``batches`` = (reference's, ours) seeds per batch, or None where not recorded."""
    same_batches = None if batches is None else batches[0] == batches[1]
    row = dict(config=name, summary=summary, against=against, ref_s=ref_s, our_s=our_s, error=error,
               same_batches=same_batches, batches=batches, **comparison)
    row["ok"] = (error is None and comparison["same_names"] and comparison["equal_pct"] >= min_equal
                 and comparison["max_diff"] <= max_diff and same_batches is not False)
    return row


def verify_generate(
    edm2_root,
    workdir,
    *,
    seeds: Sequence[int],
    batch: int = 5,
    num_steps: int = 32,
    resolution: int = 16,
    device="cpu",
    backend: str = "auto",
    min_equal: float = 99.9,
    max_diff: int = 1,
    torchrun: int = 0,
    timeout: float = 600.0,
    only: Optional[Sequence[str]] = None,
    seed: int = 0,
) -> List[dict]:
    """Run every configuration through the reference and our CLI into ``workdir``; one row per comparison.

    ``edm2_root`` must already be importable (:func:`ag_kernels.models.edm2.use_checkout`).  With
    ``torchrun`` = N > 1, the "churned" configuration also runs under torchrun with N processes,
    ours and the reference's (rows "torchrun xN").  ``only`` restricts the configurations by name.

    Raises:
        ReferenceSamplerError: the checkout cannot build the snapshots or its generate_images failed.
    """
    workdir = Path(workdir)
    device = torch.device(device)
    module = load_reference_module(edm2_root)
    if not callable(getattr(module, "generate_images", None)):
        raise ReferenceSamplerError(f"--edm2: {module.__file__!r} has no function generate_images; "
                                    "is this an NVlabs/edm2 checkout?")
    paths = build_snapshots(workdir / "snapshots", resolution=resolution, seed=seed)
    chosen = [c for c in configs() if only is None or c.name in only]
    rows = []
    with _process_group(workdir):
        for cfg in chosen:
            ref_dir, our_dir = workdir / cfg.name / "reference", workdir / cfg.name / "ours"
            ref_s, ref_batches = _run_reference(
                module, _reference_kwargs(cfg, paths, seeds, batch, num_steps, ref_dir), device)
            our_s, our_batches, error = _run_ours(
                _our_argv(cfg, paths, edm2_root, seeds, batch, num_steps, our_dir, device, backend))
            rows.append(_row(cfg.name, cfg.summary, compare_outputs(ref_dir, our_dir), ref_s, our_s, error,
                             min_equal, max_diff, batches=(ref_batches, our_batches)))
    if torchrun > 1:
        cfg = next(c for c in configs() if c.name == "churned")
        base = workdir / f"torchrun{torchrun}"
        ref_dir, our_dir = base / "reference", base / "ours"
        spec = base / "reference_spec.json"
        base.mkdir(parents=True, exist_ok=True)
        spec.write_text(json.dumps(dict(edm2=str(edm2_root), device=str(device),
                                        kwargs=_reference_kwargs(cfg, paths, seeds, batch, num_steps, ref_dir))))
        ref_s, ref_error = _torchrun(torchrun, ["ag_kernels.commands.verify_generate", "--reference-worker", str(spec)],
                                     timeout)
        our_argv = _our_argv(cfg, paths, edm2_root, seeds, batch, num_steps, our_dir, device, backend)
        our_s, our_error = _torchrun(torchrun, ["ag_kernels", *our_argv], timeout)
        error = our_error if ref_error is None else f"the reference under torchrun failed: {ref_error}"
        name = f"{cfg.name} torchrun x{torchrun}"
        rows.append(_row(name, cfg.summary, compare_outputs(ref_dir, our_dir), ref_s, our_s, error, min_equal,
                         max_diff, against=f"reference, torchrun x{torchrun}"))
        one = workdir / cfg.name / "reference"
        if one.is_dir():
            rows.append(_row(name, cfg.summary, compare_outputs(one, our_dir), math.nan, our_s, our_error,
                             min_equal, max_diff))
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """The rows of :func:`verify_generate` as a fixed-width text table (the options below it)."""
    header = (f"{'config':<20} {'compared with':<23} {'batches':>7} {'files ref/ours/same':>19} {'equal px':>9} "
              f"{'max diff':>8} {'ref s':>6} {'ours s':>6}  result")
    lines = [header, "-" * len(header)]
    for r in rows:
        same = r["ref_files"] - len(r["missing"])
        files = f"{r['ref_files']}/{r['our_files']}/{same}"
        result = "ok" if r["ok"] else "FAIL"
        why = []
        if r.get("error"):
            why.append(r["error"])
        if r["missing"]:
            why.append(f"missing in ours: {', '.join(r['missing'][:3])}{' ...' if len(r['missing']) > 3 else ''}")
        if r["extra"]:
            why.append(f"only in ours: {', '.join(r['extra'][:3])}{' ...' if len(r['extra']) > 3 else ''}")
        if r["same_batches"] is False:
            ref_b, our_b = (_batches_text(b) for b in r["batches"])
            why.append(f"batches differ: reference {ref_b}, ours {our_b}")
        if why:
            result += f" ({'; '.join(why)})"
        ref_s = "-" if math.isnan(r["ref_s"]) else f"{r['ref_s']:.1f}"
        batches = {None: "-", True: "same", False: "DIFFER"}[r["same_batches"]]
        lines.append(f"{r['config']:<20} {r['against']:<23} {batches:>7} {files:>19} {r['equal_pct']:>8.3f}% "
                     f"{r['max_diff']:>8d} {ref_s:>6} {r['our_s']:>6.1f}  {result}")
    lines.append("")
    seen = set()
    for r in rows:
        base = r["config"].split(" ")[0]
        if base not in seen:
            seen.add(base)
            lines.append(f"  {base}: {r['summary']}")
    return "\n".join(lines)


def _batches_text(batches) -> str:
    """[[0, 1, 2], [3, 4]] as "[0-2] [3-4]" (each batch as its first-last seeds and size when not a run)."""
    def one(b):
        if not b:
            return "[]"
        if b == list(range(b[0], b[0] + len(b))):
            return f"[{b[0]}-{b[-1]}]" if len(b) > 1 else f"[{b[0]}]"
        return f"[{b[0]}..{b[-1]} ({len(b)})]"
    return " ".join(one(b) for b in batches)


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--edm2", required=True, metavar="PATH",
                   help="root of your clone of NVlabs/edm2 (the folder holding generate_images.py)")
    p.add_argument("--generate", action="store_true", required=True,
                   help="compare `python -m ag_kernels generate` with the checkout's generate_images(), file by file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where both generators run: cpu, cuda, cuda:1, ... (default cuda if available)")
    p.add_argument("--backend", default="auto", help="our sampler backend (auto, torch, triton, ext)")
    p.add_argument("--seeds", default="0-5,997-1003,4294967298",
                   help="seeds for every configuration (default 0-5,997-1003,4294967298: across 1000 for "
                        "--subdirs, and one above 2**32, which the reference takes mod 2**32)")
    p.add_argument("--batch", type=int, default=5, help="maximum batch size, --batch of both (default 5)")
    p.add_argument("--steps", type=int, default=32, help="sampler steps (default 32, the reference's default)")
    p.add_argument("--resolution", type=int, default=16, help="image resolution of the test snapshots (default 16)")
    p.add_argument("--configs", default=None, metavar="LIST",
                   help=f"comma-separated subset of: {', '.join(c.name for c in configs())} (default all)")
    p.add_argument("--torchrun", type=int, nargs="?", const=2, default=0, metavar="N",
                   help="also run the 'churned' configuration under torchrun with N processes (default N 2), "
                        "ours and the reference's")
    p.add_argument("--min-equal", type=float, default=99.9, help="goal: percent of pixels exactly equal (99.9)")
    p.add_argument("--max-diff", type=int, default=1, help="goal: largest colour value difference (1)")
    p.add_argument("--keep", metavar="DIR", help="write snapshots and images into DIR (new or empty) and keep them")
    p.add_argument("--seed", type=int, default=0, help="seed of the test snapshots' random weights")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for each torchrun (600)")


def run(args: argparse.Namespace) -> int:
    """0 every comparison meets the goals, 1 one does not, 2 bad input (a one-line error on stderr)."""
    from ..models.edm2 import EDM2Error, find_checkout, use_checkout
    from .generate import torch_device
    from ..sampling.seeds import parse_seeds

    def fail(message: str) -> int:
        print(f"verify --generate: error: {message}", file=sys.stderr)
        return 2

    try:
        device = torch_device(args.device)
    except ValueError as exc:
        return fail(f"--device: {exc}")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as exc:
        return fail(f"--seeds: {str(exc).removeprefix('seeds: ')}")
    if args.batch < 1:
        return fail(f"--batch must be >= 1, got {args.batch}")
    if args.steps < 2:
        return fail(f"--steps must be >= 2 (the reference divides by steps - 1), got {args.steps}")
    if args.resolution < 4 or args.resolution % 4:
        return fail(f"--resolution must be a multiple of 4 (the test U-Net halves it), got {args.resolution}")
    if not 0 <= args.min_equal <= 100:
        return fail(f"--min-equal must be a percentage in [0, 100], got {args.min_equal}")
    if not 0 <= args.max_diff <= 255:
        return fail(f"--max-diff must be in [0, 255], got {args.max_diff}")
    if args.torchrun == 1 or args.torchrun < 0:
        return fail(f"--torchrun needs N >= 2 processes, got {args.torchrun}")
    if args.torchrun and device.type == "cuda" and torch.cuda.device_count() < args.torchrun:
        return fail(f"--torchrun {args.torchrun} on {device} needs {args.torchrun} GPUs (one per process); this "
                    f"machine has {torch.cuda.device_count()}: pass --device cpu or a smaller N")
    names = [c.name for c in configs()]
    only = None
    if args.configs is not None:
        only = [v.strip() for v in args.configs.split(",") if v.strip()]
        unknown = [v for v in only if v not in names]
        if unknown or not only:
            return fail(f"--configs: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(names)}")
        if args.torchrun and "churned" not in only:
            only.append("churned")
    try:
        root = find_checkout(args.edm2)
        if root is None:
            return fail("--edm2: pass the root of your NVlabs/edm2 checkout")
        use_checkout(root)
    except EDM2Error as exc:
        return fail(str(exc))
    keep = Path(args.keep) if args.keep else None
    if keep is not None and keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
        return fail(f"--keep: {str(keep)!r} exists and is not an empty folder")

    print(f"ag_kernels verify --generate: `python -m ag_kernels generate` vs generate_images() of {root}")
    print(f"device {device}, backend {args.backend}; seeds {args.seeds} ({len(seeds)}), --batch {args.batch}, "
          f"--steps {args.steps}; snapshots: checkout's Precond, {IMG_CHANNELS}x{args.resolution}x{args.resolution}, "
          f"{LABEL_DIM} classes, random weights, float16")
    with contextlib.ExitStack() as stack:
        workdir = keep
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ag_verify_gen_")))
        start = time.perf_counter()
        try:
            rows = verify_generate(root, workdir, seeds=seeds, batch=args.batch, num_steps=args.steps,
                                   resolution=args.resolution, device=device, backend=args.backend,
                                   min_equal=args.min_equal, max_diff=args.max_diff, torchrun=args.torchrun,
                                   timeout=args.timeout, only=only, seed=args.seed)
        except ReferenceSamplerError as exc:
            return fail(str(exc))
        total = time.perf_counter() - start
        snaps = workdir / "snapshots"
        print(f"main net {_params(str(snaps / 'net.pkl')):,} parameters ({_kwargs_text(MAIN_NET)}), guide "
              f"{_params(str(snaps / 'gnet.pkl')):,} ({_kwargs_text(GUIDE_NET)})")
    print(format_table(rows))
    bad = [r for r in rows if not r["ok"]]
    goal = f"same file names, >= {args.min_equal:g}% pixels equal, max diff <= {args.max_diff}"
    if bad:
        print(f"MISMATCH: {len(bad)} of {len(rows)} comparisons miss the goals ({goal}); {total:.0f} s")
        return 1
    print(f"OK: all {len(rows)} comparisons meet the goals ({goal}); {total:.0f} s")
    if keep is not None:
        print(f"outputs kept in {keep}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ag_kernels verify --generate",
                                     description="compare `python -m ag_kernels generate` with the reference "
                                                 "generate_images() of an NVlabs/edm2 checkout, file by file")
    add_arguments(parser)
    return run(parser.parse_args(argv))


# --------------------------------------------------------------------------- the reference under torchrun


def _reference_worker(spec_path: str) -> int:
    """One torchrun process running the reference's generate_images() with the spec's arguments."""
    from ..models.edm2 import use_checkout

    spec = json.loads(Path(spec_path).read_text())
    device = torch.device(spec["device"])
    dist = torch.distributed
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        use_checkout(Path(spec["edm2"]))
        module = load_reference_module(spec["edm2"])
        for _ in module.generate_images(device=device, **spec["kwargs"]):
            pass
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--reference-worker":
        sys.exit(_reference_worker(sys.argv[2]))
    sys.exit(main())
