"""``generate --diffusers PIPELINE_DIR``: a diffusers pipeline (SD, SDXL, SD3) with a guide network.

The flags are checked and the folders looked at before anything loads (a missing or wrong folder:
one line, exit 2); then the pipeline and the guide load, and :meth:`AutoguidedPipeline.generate`
makes the images with the per-seed noise, PNG numbering, resume and torchrun sharding of EDM
generation.  diffusers is imported only here.
"""

from __future__ import annotations

import hashlib
import os
import re

# Names in messages from the Python API, as the flags that set them.
_FLAGS = {"autoguidance_scale": "--autoguidance", "guidance_scale": "--cfg", "num_inference_steps": "--steps",
          "guidance_interval": "--guidance-interval", "negative_prompt": "--negative-prompt", "prompt": "--prompt",
          "guide": "--guide", "pipe.scheduler": "--diffusers (its scheduler)", "pipe": "--diffusers", "solver": "--solver",
          "backend": "--backend", "outdir": "--outdir", "seeds": "--seeds", "batch_size": "--batch"}
_FLAG_RE = re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, sorted(_FLAGS, key=len, reverse=True))) + r")\b")
# EDM-only flags and the value that means "not given".
_EDM_ONLY = (("--net", "net", None), ("--gnet", "gnet", None), ("--preset", "preset", None),
             ("--models", "models", None), ("--class", "class_idx", None), ("--shape", "shape", None),
             ("--guidance", "guidance", None), ("--churn", "churn", 0.0), ("--sigma-min", "sigma_min", None),
             ("--sigma-max", "sigma_max", None), ("--rho", "rho", None), ("--schedule", "schedule", None),
             ("--sigmas", "sigmas", None), ("--dtype", "dtype", "float32"))


def flagify(message) -> str:
    text = str(message).strip()
    first = text.splitlines()[0] if text else ""
    return _FLAG_RE.sub(lambda m: _FLAGS[m.group(1)], first)


def _folder(flag, path, markers, what, usage_error):
    """The folder ``path`` checked to exist and to hold one of ``markers``; UsageError (one line) otherwise."""
    if not os.path.exists(path):
        raise usage_error(f"{flag}: no such folder: {path!r}")
    if not os.path.isdir(path):
        raise usage_error(f"{flag}: not a folder: {path!r} (pass the folder of a {what})")
    if not any(os.path.isfile(os.path.join(path, m)) for m in markers):
        raise usage_error(f"{flag}: {path!r} is not a {what} folder (no {' or '.join(markers)} in it)")
    return path


def _folder_id(path):
    """The folder and every file's relative name and size: the same folder gives the same images."""
    if path is None:
        return None
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(f"{os.path.relpath(full, path)}\0{os.path.getsize(full)}\n".encode())
    return {"folder": os.path.abspath(path), "files_sha256": h.hexdigest()}


def refuse_edm_flags(args, usage_error):
    """UsageError naming the first flag of EDM generation given with --diffusers."""
    for flag, attr, unset in _EDM_ONLY:
        if getattr(args, attr) != unset:
            raise usage_error(f"{flag} is not used with --diffusers (EDM networks only)")


def prepare(args, device, seeds, interval, outdir, check_settings, usage_error):
    """(the batches to run, the settings to record) of ``generate --diffusers``."""
    if args.prompt is None:
        raise usage_error("--diffusers needs --prompt TEXT")
    use_guide = args.autoguidance != 1
    if use_guide and args.guide is None:
        raise usage_error(f"--autoguidance {args.autoguidance:g} needs a guide network: pass --guide MODEL_DIR")
    pipe_dir = _folder("--diffusers", args.diffusers, ("model_index.json",), "diffusers pipeline", usage_error)
    guide_dir = None
    if use_guide:
        guide_dir = _folder("--guide", args.guide, ("config.json", "model_index.json"), "diffusers model",
                            usage_error)
    settings = None
    if outdir is not None:
        settings = {"diffusers": _folder_id(pipe_dir), "guide": _folder_id(guide_dir), "prompt": args.prompt,
                    "negative_prompt": args.negative_prompt, "cfg": args.cfg, "autoguidance": args.autoguidance,
                    "steps": args.steps, "solver": args.solver, "guidance_interval": list(interval) if interval else None,
                    "backend": args.backend, "batch": args.batch, "subdirs": args.subdirs, "device": device.type}
        check_settings(outdir, settings, args.force)

    try:
        from ..models.diffusers_models import require_diffusers

        diffusers = require_diffusers()
    except ImportError as exc:
        raise usage_error(f"--diffusers: {exc}") from None
    from ..sampling.pipelines import AutoguidedPipeline

    # The loaders' own progress bars and notes would bury the one line a command prints.
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass

    pipe = _load(lambda: diffusers.DiffusionPipeline.from_pretrained(pipe_dir), "--diffusers", pipe_dir, usage_error)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    guide = None
    if guide_dir is not None:
        if os.path.isfile(os.path.join(guide_dir, "model_index.json")):
            guide = _load(lambda: diffusers.DiffusionPipeline.from_pretrained(guide_dir), "--guide", guide_dir,
                          usage_error)
        else:
            guide = _load(lambda: _model_from_folder(diffusers, guide_dir), "--guide", guide_dir, usage_error)
        guide = guide.to(device)
    try:
        ag = AutoguidedPipeline.from_pipe(pipe, guide=guide)
    except (TypeError, ValueError) as exc:
        raise usage_error(flagify(exc)) from None
    call = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "num_inference_steps": args.steps,
            "autoguidance_scale": args.autoguidance, "solver": args.solver, "backend": args.backend,
            "guidance_interval": interval}
    if args.cfg is not None:
        call["guidance_scale"] = args.cfg
    runs = ag.generate(seeds=seeds, batch_size=args.batch, outdir=None if outdir is None else str(outdir),
                       subdirs=args.subdirs, batch_split="even", skip_existing=args.skip_existing, device=device,
                       progress=not args.no_progress, **call)
    return runs, settings


def _model_from_folder(diffusers, folder):
    """The diffusers model class its config names (a UNet2DConditionModel or SD3Transformer2DModel), loaded."""
    import json

    with open(os.path.join(folder, "config.json")) as f:
        name = json.load(f).get("_class_name")
    if name not in ("UNet2DConditionModel", "SD3Transformer2DModel"):
        raise ValueError(f"its config names {name!r}, not a UNet2DConditionModel or SD3Transformer2DModel")
    return getattr(diffusers, name).from_pretrained(folder)


def _load(load, flag, path, usage_error):
    try:
        return load()
    except Exception as exc:  # noqa: BLE001  (any loader failure is one line naming the flag)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise usage_error(f"{flag}: cannot load {path!r}: {first}") from None
