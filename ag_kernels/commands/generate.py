"""``python -m ag_kernels generate``: every argument checked before anything loads, one-line errors
naming the flag (exit 2), resumable runs, and no half-written output.

Order of a run: the flags are checked (device, seeds, numbers, the output folder: writable, not a
file), then the EDM2 checkout, preset and network files are resolved and loaded, then the output
folder's settings file is compared with this run's settings (a folder of images made with other
settings is refused unless ``--force``), then the samples are generated.  PNGs are written under
a temporary name and renamed, so an interrupt never leaves a truncated image; ``--skip-existing``
resumes an interrupted run with bitwise the same images.  Ctrl-C exits 130 and SIGTERM (torchrun
stopping the other ranks when one failed) 143, each with one line saying how many images were
finished; non-finite samples exit 1 naming the step where they appeared.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import signal
import sys
from pathlib import Path

PROG = "python -m ag_kernels generate"
SETTINGS_FILE = "ag_kernels-settings.json"
_EDM2_ENV = "AG_EDM2_PATH"  # ag_kernels.models.edm2.ENV_VAR, named here without importing torch for --help
_F32_MAX = 3.4e38


class UsageError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so the run stops cleanly (temporary files removed)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Flag names also in the spelling of EDM2's generate_images.py (--sigma_min, --S_churn, ...),
    # so its command lines work here unchanged.
    p.add_argument("--net", help="main network: TorchScript file, ag_kernels checkpoint, or (with --allow-pickle) "
                                 "an EDM2 snapshot .pkl")
    p.add_argument("--gnet", help="guiding network (autoguidance: a worse model; CFG: the unconditional one)")
    p.add_argument("--preset", help="an EDM2 preset by the reference's name, e.g. edm2-img512-s-autog-fid: main and "
                                    "guiding snapshots and guidance weight (files in --models)")
    p.add_argument("--models", help="folder holding the EDM2 snapshot files that --preset names")
    p.add_argument("--edm2", help=f"an NVlabs/edm2 checkout, for unpickling its snapshots (default: ${_EDM2_ENV})")
    p.add_argument("--seeds", default="0-63", help="seeds, e.g. 0-63 or 1,5,9 or 0-3,10-12 (default 0-63)")
    p.add_argument("--batch", type=int, default=32, help="maximum samples per batch (default 32)")
    p.add_argument("--class", dest="class_idx", type=int, help="class label for every sample (default: random per seed)")
    p.add_argument("--outdir", help="write one PNG per seed, NNNNNN.png, into this folder")
    p.add_argument("--subdirs", action="store_true", help="one subfolder per 1000 seeds (000000/, 001000/, ...)")
    p.add_argument("--skip-existing", action="store_true",
                   help="resume: skip the seeds whose PNGs are already in --outdir (same images as one run)")
    p.add_argument("--force", action="store_true",
                   help="write into an --outdir that holds images made with other settings")
    p.add_argument("--shape", help="noise shape C,H,W when the network has no img_channels/img_resolution")
    # Schedule flags default to None so that --sigmas can tell them given from left out.
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 32)")
    p.add_argument("--sigma-min", "--sigma_min", dest="sigma_min", type=float, default=None, help="(default 0.002)")
    p.add_argument("--sigma-max", "--sigma_max", dest="sigma_max", type=float, default=None, help="(default 80)")
    p.add_argument("--rho", type=float, default=None, help="Karras schedule's rho (default 7)")
    p.add_argument("--schedule", choices=SCHEDULE_CHOICES, default=None,
                   help="built-in schedule: karras (default) or logsnr (uniform in log sigma)")
    p.add_argument("--sigmas", help="explicit noise levels instead of --steps/--sigma-min/--sigma-max/--rho/--schedule: "
                   "a comma list (80,10,1,0.1,0) or a file (a schedule JSON from tune-schedule, or numbers)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance weight w (default: the preset's, else 1: no guidance)")
    p.add_argument("--guidance-interval", help="lo,hi: guide only for sigma in (lo, hi]")
    p.add_argument("--churn", "--S_churn", dest="churn", type=float, default=0.0, help="S_churn (default 0)")
    p.add_argument("--s-min", "--S_min", dest="s_min", type=float, default=0.0)
    p.add_argument("--s-max", "--S_max", dest="s_max", type=float, default=float("inf"))
    p.add_argument("--s-noise", "--S_noise", dest="s_noise", type=float, default=1.0)
    p.add_argument("--solver", choices=SOLVER_CHOICES, default=None,
                   help="heun (default, the reference; 2N-1 evaluations), euler, or the multistep dpmpp_2m / "
                        "dpmpp_3m / unipc (N evaluations, no --churn); with --diffusers the default follows the scheduler")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="sampler dtype")
    p.add_argument("--backend", default="auto", help="auto, torch, triton or ext")
    p.add_argument("--cuda-graph", choices=("auto", "on", "off"), default="auto",
                   help="run each batch shape from a CUDA graph: auto (on a GPU), on (warn if not possible), off")
    p.add_argument("--no-overlap", action="store_true",
                   help="on a GPU, evaluate the guiding network after the main one, not concurrently on a second stream")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load checkpoints that need full unpickling, EDM2 snapshots included (can run arbitrary "
                        "code: trusted files only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("diffusers pipelines (SD, SDXL, SD3; needs pip install -e \".[diffusers]\")")
    g.add_argument("--diffusers", metavar="PIPELINE_DIR",
                   help="a diffusers pipeline folder (save_pretrained / a downloaded snapshot) instead of --net")
    g.add_argument("--guide", metavar="MODEL_DIR",
                   help="the guide network for autoguidance: a UNet/transformer folder, or a pipeline folder")
    g.add_argument("--prompt", help="the text prompt (every seed)")
    g.add_argument("--negative-prompt", dest="negative_prompt", help="the negative prompt (CFG's unconditional branch)")
    g.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale (default: the pipeline's own; CFG only when > 1)")
    g.add_argument("--autoguidance", type=float, default=1.0,
                   help="autoguidance scale (default 1: off); needs --guide")


# --------------------------------------------------------------------------- checks


def torch_device(text):
    """The torch.device named by a --device flag, checked to exist here; ValueError (one line) otherwise."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"{text!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{text!r}: no CUDA device is available here (torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "meta":
        raise ValueError(f"{text!r}: the meta device holds no data; use cpu or cuda")
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        available = getattr(backend, "is_available", None)
        if not callable(available) or not available():
            raise ValueError(f"{text!r}: no {device.type} device is available here")
    return device


def _number(flag, value, *, lo=None, lo_open=False, hi=None, finite=True):
    if math.isnan(value) or (finite and math.isinf(value)):
        raise UsageError(f"{flag} must be a finite number, got {value}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise UsageError(f"{flag} must be {'>' if lo_open else '>='} {lo:g}, got {value:g}")
    if hi is not None and value > hi:
        raise UsageError(f"{flag} must be <= {hi:g}, got {value:g}")
    return value


def _check_outdir(text):
    """The output folder: not empty, not a file, not under a file, and writable (nothing is created yet)."""
    if text is None:
        return None
    if not text.strip():
        raise UsageError("--outdir must name a folder, got an empty string")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--outdir {text!r} is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--outdir {text!r} cannot be created: {str(existing)!r} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--outdir {text!r} is not writable ({str(existing)!r} does not allow writing)")
    return path


def _check_flags(args):
    """Every flag that can be checked before anything is loaded; returns (seeds, shape, interval)."""
    seeds = _seeds_flag(args.seeds)
    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {args.batch}")
    args.sigmas_values = parse_sigmas_flag(args)
    if args.sigmas_values is None:
        for name, value in _SCHEDULE_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    if args.sigmas_values is None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    if args.class_idx is not None and args.class_idx < 0:
        raise UsageError(f"--class must be >= 0, got {args.class_idx}")
    if args.sigmas_values is None:
        _number("--sigma-min", args.sigma_min, lo=0, lo_open=True)
        _number("--sigma-max", args.sigma_max, lo=args.sigma_min, lo_open=True)
        _number("--rho", args.rho, lo=0, lo_open=True)
        if args.schedule != "karras" and args.rho != _SCHEDULE_DEFAULTS["rho"]:
            raise UsageError(f"--rho shapes only --schedule karras, not --schedule {args.schedule}")
    _number("--churn", args.churn, lo=0)
    _number("--s-noise", args.s_noise)
    _number("--s-min", args.s_min, finite=False)
    _number("--s-max", args.s_max, finite=False)
    if args.churn > 0 and args.solver not in ("heun", "euler"):
        raise UsageError(f"--churn must be 0 with --solver {args.solver}: a multistep solver reuses earlier denoised "
                         "outputs, which churn's fresh noise invalidates")
    if args.churn > 0 and args.s_min > args.s_max:
        raise UsageError(f"--s-min ({args.s_min:g}) must be <= --s-max ({args.s_max:g}), or no step is churned")
    if args.guidance is not None:
        _number("--guidance", args.guidance, lo=-_F32_MAX, hi=_F32_MAX)
    interval = None
    if args.guidance_interval:
        try:
            lo, hi = (float(v) for v in args.guidance_interval.split(","))
        except ValueError:
            raise UsageError(f"--guidance-interval must be two numbers lo,hi; got {args.guidance_interval!r}") from None
        _number("--guidance-interval lo", lo, lo=0)
        _number("--guidance-interval hi", hi, lo=lo, lo_open=True, finite=False)
        interval = (lo, hi)
    shape = _shape_flag(args.shape) if args.shape else None
    if args.backend not in ("auto", "torch", "triton", "ext"):
        raise UsageError(f"--backend must be auto, torch, triton or ext; got {args.backend!r}")
    if args.skip_existing and args.outdir is None:
        raise UsageError("--skip-existing needs --outdir (the folder whose PNGs it skips)")
    return seeds, shape, interval


def _seeds_flag(text):
    """--seeds as a list of ints; UsageError naming the flag otherwise."""
    from ..sampling.seeds import parse_seeds

    try:
        return parse_seeds(text)
    except ValueError as exc:
        raise UsageError(f"--seeds: {str(exc).removeprefix('seeds: ')}") from None


def _shape_flag(text):
    """--shape C,H,W as a tuple of positive ints; UsageError naming the flag otherwise."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--shape must be integers C,H,W; got {text!r}") from None
    if not shape or any(v < 1 for v in shape):
        raise UsageError(f"--shape must be positive integers C,H,W; got {text!r}")
    return shape


_SCHEDULE_DEFAULTS = {"steps": 32, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "schedule": "karras"}
_SCHEDULE_FLAGS = {"steps": "--steps", "sigma_min": "--sigma-min", "sigma_max": "--sigma-max", "rho": "--rho",
                   "schedule": "--schedule"}


def parse_sigmas_flag(args):
    """--sigmas as checked noise levels ending in 0 (None without --sigmas): a comma list, a schedule JSON
    (tuned for --solver, else an error), a JSON list, or a text file of numbers."""
    if args.sigmas is None:
        return None
    given = [flag for name, flag in _SCHEDULE_FLAGS.items() if getattr(args, name) is not None]
    if given:
        raise UsageError(f"--sigmas and {' / '.join(given)} were both given: --sigmas replaces --steps, --sigma-min, "
                         "--sigma-max, --rho and --schedule; pass one or the other")
    from ..sampling._settings import check_sigmas
    from ..sampling.tuning import read_schedule

    text = args.sigmas
    if os.path.isfile(text):
        try:
            record = read_schedule(text, name="--sigmas")
        except ValueError:
            record = None
        if record is not None:
            if record.get("solver") != args.solver:
                raise UsageError(f"--sigmas {text!r} was tuned for --solver {record.get('solver')}, not --solver "
                                 f"{args.solver}: pass --solver {record.get('solver')}, or tune a schedule for "
                                 f"{args.solver}")
            values = record["sigmas"]
        else:
            try:
                with open(text) as f:
                    content = f.read()
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(f"--sigmas: cannot read {text!r}: {exc}") from None
            values = _numbers(content.replace("[", " ").replace("]", " "), text)
    elif os.path.exists(text) or text.lower().endswith(".json"):
        raise UsageError(f"--sigmas: {'not a file' if os.path.exists(text) else 'no such file'}: {text!r}")
    else:
        values = _numbers(text, text)
    try:
        return check_sigmas(values, name="--sigmas")
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def _numbers(text, shown):
    try:
        return [float(v) for v in re.split(r"[,\s]+", text.strip()) if v]
    except ValueError:
        raise UsageError(f"--sigmas must be a comma list of numbers (80,10,1,0.1,0) or a schedule file; "
                         f"got {shown!r}") from None


# ag_kernels.SOLVERS, spelled out so that parsing the command line does not import torch (a test checks they agree).
SOLVER_CHOICES = ("heun", "euler", "dpmpp_2m", "dpmpp_3m", "unipc")
# ag_kernels.sampling._settings.SCHEDULES, likewise.
SCHEDULE_CHOICES = ("karras", "logsnr")

# Keyword names in messages from the Python API, as the flags that set them.
_FLAGS = {"batch_size": "--batch", "class_idx": "--class", "num_steps": "--steps", "noise_shape": "--shape",
          "sigma_min": "--sigma-min", "sigma_max": "--sigma-max", "S_churn": "--churn", "S_min": "--s-min",
          "S_max": "--s-max", "S_noise": "--s-noise", "guidance_interval": "--guidance-interval",
          "outdir": "--outdir", "backend": "--backend", "rho": "--rho", "seeds": "--seeds", "sigmas": "--sigmas",
          "schedule": "--schedule"}
_FLAG_RE = re.compile(r"\b(" + "|".join(map(re.escape, _FLAGS)) + r")\b")


def _flagify(message) -> str:
    return _FLAG_RE.sub(lambda m: _FLAGS[m.group(1)], str(message).strip().splitlines()[0] if str(message).strip() else "")


# --------------------------------------------------------------------------- settings file


def _file_id(path):
    """Name, size and SHA-256 of a network file: the same file gives the same images."""
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"file": os.path.basename(path), "size": os.path.getsize(path), "sha256": h.hexdigest()}


def _settings(args, net_path, gnet_path, guidance, interval, shape, device):
    """What decides the images (not the seeds: a later run may add seeds to the folder)."""
    churned = args.churn > 0
    return {
        "net": _file_id(net_path), "gnet": _file_id(gnet_path) if guidance != 1 else None,
        "guidance": guidance, "guidance_interval": list(interval) if interval else None,
        "steps": args.steps, "sigma_min": args.sigma_min, "sigma_max": args.sigma_max, "rho": args.rho,
        "churn": args.churn, "s_min": args.s_min if churned else None, "s_max": args.s_max if churned else None,
        "s_noise": args.s_noise if churned else None, "solver": args.solver, "dtype": args.dtype,
        "backend": args.backend, "class": args.class_idx, "batch": args.batch, "shape": list(shape) if shape else None,
        "subdirs": args.subdirs, "device": device.type,
        # Only where used, so that folders written before these flags existed still resume.
        **({"sigmas": args.sigmas_values} if args.sigmas_values is not None else {}),
        **({"schedule": args.schedule} if args.schedule not in (None, "karras") else {}),
    }


def _jsonable(settings):
    return json.loads(json.dumps(settings, allow_nan=True))


def _check_settings(outdir: Path, settings, force: bool):
    """Refuse an output folder whose images were made with other settings (unless force)."""
    path = outdir / SETTINGS_FILE
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    new = _jsonable(settings)
    if old == new or force:
        return
    if not isinstance(old, dict):
        raise UsageError(f"--outdir {str(outdir)!r}: {SETTINGS_FILE} there is unreadable; choose another --outdir, "
                         "or pass --force to write into it anyway")
    differ = [k for k in new if old.get(k) != new.get(k)]
    shown = "; ".join(f"{k}: {_brief(old.get(k))} there, {_brief(new.get(k))} now" for k in differ[:4])
    raise UsageError(f"--outdir {str(outdir)!r} holds images made with other settings ({shown}); choose another "
                     "--outdir, or pass --force to write into it anyway")


def _brief(v):
    if isinstance(v, dict) and "sha256" in v:
        return f"{v['file']} ({v['sha256'][:8]})"
    return json.dumps(v)


def _write_settings(outdir: Path, settings):
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / SETTINGS_FILE
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(settings, indent=1, allow_nan=True) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# --------------------------------------------------------------------------- the run


def _load(path, flag, device, allow_pickle):
    """(network, encoder or None): our formats and TorchScript, else (with allow_pickle) an EDM2 snapshot."""
    from ..models.checkpoint import UnsafeCheckpointError, load_net
    from ..models.edm2 import load_snapshot

    try:
        return load_net(path, device=device), None
    except UnsafeCheckpointError as exc:
        if not allow_pickle:
            raise UnsafeCheckpointError(f"{flag}: {exc}") from None
    except FileNotFoundError:
        raise UsageError(f"{flag}: file not found: {str(path)!r}") from None
    return load_snapshot(path, device=device, allow_pickle=True, flag=flag)


def main(argv=None) -> int:
    """``python -m ag_kernels generate ARGS`` as a function: parse ``argv`` (default: sys.argv[1:]) and run."""
    from ._parser import Parser

    parser = Parser(prog=PROG)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args) -> int:
    """The generate command; returns the exit status (0 done, 1 non-finite samples, 2 user error,
    130 Ctrl-C, 143 SIGTERM)."""
    try:
        return _run(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import torch

    from ..models.checkpoint import CheckpointError
    from ..models.edm2 import EDM2Error, find_checkout, prepare_encoder, resolve_preset, use_checkout
    from ..sampling.generation import generate

    try:
        device = torch_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except ValueError as exc:
        raise UsageError(f"--device: {exc}") from None
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        # Under torchrun each process loads its networks onto its own GPU, where generate samples.
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if args.diffusers is None:
        for flag, value in (("--guide", args.guide), ("--prompt", args.prompt),
                            ("--negative-prompt", args.negative_prompt), ("--cfg", args.cfg)):
            if value is not None:
                raise UsageError(f"{flag} is used with --diffusers PIPELINE_DIR")
        if args.autoguidance != 1:
            raise UsageError("--autoguidance is used with --diffusers PIPELINE_DIR (EDM networks: --guidance)")
    else:
        from . import _diffusers

        _diffusers.refuse_edm_flags(args, UsageError)
    args.solver = args.solver or ("heun" if args.diffusers is None else None)
    seeds, shape, interval = _check_flags(args)
    outdir = _check_outdir(args.outdir)
    try:
        from ..kernels._backends import resolve_backend

        resolve_backend(args.backend, device)
    except ValueError as exc:
        raise UsageError(f"--backend: {exc}") from None
    if args.diffusers is not None:
        if args.cfg is not None:
            _number("--cfg", args.cfg, lo=-_F32_MAX, hi=_F32_MAX)
        _number("--autoguidance", args.autoguidance, lo=-_F32_MAX, hi=_F32_MAX)

        runs, settings = _diffusers.prepare(args, device, seeds, interval, outdir, _check_settings, UsageError)
        return _drain(args, runs, outdir, settings, seeds, _diffusers.flagify)

    try:
        checkout = find_checkout(args.edm2)
        if checkout is not None:
            use_checkout(checkout)
        net_path, gnet_path, guidance = args.net, args.gnet, args.guidance
        if args.preset is not None:
            # As the reference: the preset fills in what the command line leaves out.
            p_net, p_gnet, p_guidance = resolve_preset(args.preset, args.models)
            net_path = net_path or str(p_net)
            gnet_path = gnet_path or (str(p_gnet) if p_gnet else None)
            guidance = p_guidance if guidance is None else guidance
        elif args.models is not None:
            raise UsageError("--models is only used with --preset")
        if net_path is None:
            raise UsageError("pass --net PATH or --preset NAME")
        guidance = 1.0 if guidance is None else guidance
        if guidance != 1 and gnet_path is None:
            raise UsageError(f"--guidance {guidance:g} needs a guiding network: pass --gnet PATH")
        for flag, path in (("--net", net_path), ("--gnet", gnet_path if guidance != 1 else None)):
            if path is not None and not os.path.isfile(path):
                raise UsageError(f"{flag}: {'no such file' if not os.path.exists(path) else 'not a file'}: {path!r}")
        settings = _settings(args, net_path, gnet_path, guidance, interval, shape, device) if outdir else None
        if outdir is not None:
            _check_settings(outdir, settings, args.force)
        net, encoder = _load(net_path, "--net", device, args.allow_pickle)
        # The guiding network is only loaded (and evaluated) where it is used, as the reference does.
        gnet = _load(gnet_path, "--gnet", device, args.allow_pickle)[0] if guidance != 1 else None
        # The main snapshot's encoder decodes (the VAE for latent models), made ready before sampling.
        encoder = prepare_encoder(encoder, device)
    except (CheckpointError, EDM2Error) as exc:
        raise UsageError(_flagify(exc)) from None

    runs = generate(
        net, gnet, seeds=seeds, batch_size=args.batch, class_idx=args.class_idx, encoder=encoder,
        outdir=None if outdir is None else str(outdir), subdirs=args.subdirs, batch_split="even",
        skip_existing=args.skip_existing, noise_shape=shape, device=device, progress=not args.no_progress,
        **_schedule_kwargs(args), guidance=guidance, S_churn=args.churn, S_min=args.s_min, S_max=args.s_max,
        S_noise=args.s_noise,
        dtype=getattr(torch, args.dtype), backend=args.backend, guidance_interval=interval, solver=args.solver,
        cuda_graph={"auto": "auto", "on": True, "off": False}[args.cuda_graph], overlap=not args.no_overlap,
    )
    return _drain(args, runs, outdir, settings, seeds, _flagify)


def _drain(args, runs, outdir, settings, seeds, flagify) -> int:
    """Run the batches of ``runs``, recording the settings with the first; the exit status."""
    from ..sampling.engine import NonFiniteError

    count = 0
    where = f" in {args.outdir}" if outdir is not None else ""
    previous = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave SIGTERM alone
        previous = None
    try:
        first = True
        for batch in runs:
            if first and outdir is not None:
                _write_settings(outdir, settings)
                first = False
            count += len(batch.seeds)
        if first and outdir is not None and settings is not None:
            _write_settings(outdir, settings)  # nothing left to do (all skipped), still record the settings
    except (TypeError, ValueError) as exc:
        raise UsageError(flagify(exc)) from None
    except NonFiniteError as exc:
        print(f"{PROG}: error: {exc}; {count} images finished{where}", file=sys.stderr)
        return 1
    except _Terminated:
        print(f"{PROG}: terminated (SIGTERM); {count} images finished{where}; rerun with --skip-existing "
              "to finish the rest", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; {count} images finished{where}; rerun with --skip-existing to finish the rest",
              file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    done = f" into {args.outdir}" if outdir is not None else " (no --outdir: nothing written)"
    skipped = len(seeds) - count if args.skip_existing else 0
    extra = f" ({skipped} already there)" if skipped and _is_single_process() else ""
    print(f"generated {count} samples{done}{extra}")
    return 0


def _schedule_kwargs(args):
    if args.sigmas_values is not None:
        return {"sigmas": args.sigmas_values}
    kwargs = dict(num_steps=args.steps, sigma_min=args.sigma_min, sigma_max=args.sigma_max)
    if args.schedule == "karras":
        kwargs["rho"] = args.rho
    else:
        kwargs["schedule"] = args.schedule
    return kwargs


def _is_single_process() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1


def _on_sigterm(signum, frame):
    raise _Terminated()
