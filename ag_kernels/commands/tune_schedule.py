"""``python -m ag_kernels tune-schedule``: fit a schedule to a guided pair and a solver, write it as JSON.

The networks are loaded as ``generate`` loads them; the calibration noise comes from ``--seeds``
as ``generate`` draws it per seed (default: seeds 1000000-1000255, which generate's default
seeds do not overlap: judge the schedule on seeds it was not fitted to).  The file it writes
is read by ``generate --sigmas FILE`` with the same ``--solver``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from .generate import SOLVER_CHOICES, UsageError, _flagify, _load, _number, _seeds_flag, _shape_flag, torch_device

PROG = "python -m ag_kernels tune-schedule"
CALIBRATION_SEEDS = "1000000-1000255"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--net", required=True, help="main network: TorchScript file or ag_kernels checkpoint "
                   "(or, with --allow-pickle, an EDM2 snapshot)")
    p.add_argument("--gnet", help="guiding network (autoguidance: a worse model; CFG: the unconditional one)")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance weight w (default 1)")
    p.add_argument("--steps", type=int, required=True, help="steps of the schedule (the budget)")
    p.add_argument("--solver", choices=SOLVER_CHOICES, default="dpmpp_2m", help="solver (default dpmpp_2m)")
    p.add_argument("--sigma-min", "--sigma_min", dest="sigma_min", type=float, default=0.002)
    p.add_argument("--sigma-max", "--sigma_max", dest="sigma_max", type=float, default=80.0)
    p.add_argument("--seeds", default=CALIBRATION_SEEDS,
                   help=f"seeds of the calibration noise (default {CALIBRATION_SEEDS})")
    p.add_argument("--class", dest="class_idx", type=int, help="class label for every sample (default: random per seed)")
    p.add_argument("--shape", help="noise shape C,H,W when the network has no img_channels/img_resolution")
    p.add_argument("--reference-steps", type=int, default=128, help="Heun steps of the target (default 128)")
    p.add_argument("--max-trials", type=int, default=400, help="sampler runs the search may take (default 400)")
    p.add_argument("--out", required=True, help="the schedule file to write (JSON)")
    p.add_argument("--backend", default="auto", help="auto, torch, triton or ext")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickled EDM2 snapshots")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args) -> int:
    try:
        return _run(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import torch

    from ..models.checkpoint import CheckpointError
    from ..models.edm2 import EDM2Error
    from ..sampling.generation import _draw, _sample_spec
    from ..sampling.tuning import save_schedule, tune_schedule

    if args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    _number("--guidance", args.guidance)
    _number("--sigma-min", args.sigma_min, lo=0, lo_open=True)
    _number("--sigma-max", args.sigma_max, lo=args.sigma_min, lo_open=True)
    if args.reference_steps < 2:
        raise UsageError(f"--reference-steps must be >= 2, got {args.reference_steps}")
    if args.max_trials < 1:
        raise UsageError(f"--max-trials must be >= 1, got {args.max_trials}")
    seeds = _seeds_flag(args.seeds)
    shape = _shape_flag(args.shape) if args.shape else None
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out) or not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
        raise UsageError(f"--out {args.out!r}: cannot write a file there")
    if args.guidance != 1 and args.gnet is None:
        raise UsageError(f"--guidance {args.guidance:g} needs a guiding network: pass --gnet PATH")
    try:
        device = torch_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except ValueError as exc:
        raise UsageError(f"--device: {exc}") from None
    for flag, path in (("--net", args.net), ("--gnet", args.gnet if args.guidance != 1 else None)):
        if path is not None and not os.path.isfile(path):
            raise UsageError(f"{flag}: {'no such file' if not os.path.exists(path) else 'not a file'}: {path!r}")
    try:
        net = _load(args.net, "--net", device, args.allow_pickle)[0]
        gnet = _load(args.gnet, "--gnet", device, args.allow_pickle)[0] if args.guidance != 1 else None
    except (CheckpointError, EDM2Error) as exc:
        raise UsageError(_flagify(exc)) from None
    try:
        noise_shape, label_dim, class_idx = _sample_spec(net, shape, args.class_idx)
        _, noise, labels = _draw(seeds, device, noise_shape, label_dim, class_idx)
        start = time.perf_counter()
        sigmas = tune_schedule(net, noise, labels, gnet, guidance=args.guidance, num_steps=args.steps,
                               solver=args.solver, sigma_min=args.sigma_min, sigma_max=args.sigma_max,
                               reference_steps=args.reference_steps, max_trials=args.max_trials,
                               backend=args.backend, log=None if args.quiet else print)
        seconds = time.perf_counter() - start
    except (TypeError, ValueError) as exc:
        raise UsageError(_flagify(exc)) from None
    save_schedule(args.out, sigmas, solver=args.solver, guidance=args.guidance, sigma_min=args.sigma_min,
                  sigma_max=args.sigma_max, calibration_seeds=args.seeds, reference_steps=args.reference_steps,
                  seconds=round(seconds, 2))
    print(f"wrote {args.out}: {args.solver}, {args.steps} steps, guidance {args.guidance:g}, sigmas "
          + ", ".join(f"{v:.4g}" for v in sigmas.tolist()) + f" ({seconds:.1f} s)")
    return 0
