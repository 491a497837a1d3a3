"""``python -m ag_kernels demo`` (the toy experiment) and ``python -m ag_kernels toy train``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from . import experiment as ex
from .distribution import TREE_LEVELS

def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=8192, help="samples per method and w (default 8192)")
    p.add_argument("--cfg-weights", type=float, nargs="+", default=list(ex.DEFAULT_CFG_WEIGHTS),
                   help=f"CFG guidance weights to sweep (default {' '.join(map(str, ex.DEFAULT_CFG_WEIGHTS))})")
    p.add_argument("--ag-weights", type=float, nargs="+", default=list(ex.DEFAULT_AG_WEIGHTS),
                   help=f"autoguidance weights to sweep (default {' '.join(map(str, ex.DEFAULT_AG_WEIGHTS))})")
    p.add_argument("--seed", type=int, default=0, help="noise and reference-set seed (default 0)")
    p.add_argument("--steps", type=int, default=ex.NUM_STEPS, help=f"Heun steps (default {ex.NUM_STEPS}, as the paper's toy)")
    p.add_argument("--weights", help="folder with main.pt, guide.pt, uncond.pt (default: the shipped models)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--backend", default="auto", help="step-op backend: auto, torch, triton or ext")
    p.add_argument("--png", default="toy_autoguidance.png", help="figure path (default toy_autoguidance.png)")
    p.add_argument("--no-png", action="store_true", help="do not draw the figure")
    p.add_argument("--json", help="write the metrics here: blur_nats, exact, none, cfg, autoguidance (paper's weights), goals, sweep")
    p.add_argument("--no-backend-check", action="store_true",
                   help="skip re-sampling one method on every available backend")


def _fmt_row(label: str, w: float, m: dict) -> str:
    ws = "-" if math.isnan(w) else f"{w:g}"
    mass = " ".join(f"{v:.3f}" for v in m["mass_by_depth"])
    return (f"{label:<13} {ws:>5} {m['precision']:>9.3f} {m['recall']:>7.3f} {m['outlier_frac']:>8.4f} "
            f"{m['gross_outlier_frac']:>8.4f} {m['mean_logp']:>10.3f}  {mass}")


def _backend_check(models, result: ex.MethodResult, n: int, seed: int, device) -> bool:
    """Every available backend samples the same w from the same noise; all must agree with "torch"."""
    from ..kernels._backends import available_backends

    guide = ex.GUIDES[result.method]
    gnet = models[guide] if guide else None
    ref = ex.sample(models["main"], gnet, result.guidance, n, seed=seed, device=device, backend="torch")
    # Backends must agree within 1e-5 or 4x torch's own one-ulp sensitivity (see agreement_bound).
    nudged = ex.sample(models["main"], gnet, result.guidance, n, seed=seed, device=device, backend="torch", nudge=True)
    scale = float(ref.abs().max())
    bound, sensitivity = ex.agreement_bound(ref, nudged)
    worst, parts = 0.0, []
    for b in available_backends(device):
        if b == "torch":
            continue
        out = ex.sample(models["main"], gnet, result.guidance, n, seed=seed, device=device, backend=b)
        diff = float((out - ref).abs().max()) / scale
        worst = max(worst, diff)
        parts.append(f"{b} {diff:.1e}")
    ok = worst <= bound
    print(f"backends vs torch ({result.method}, w = {result.guidance:g}, {n} samples, max rel diff; bound {bound:.1e}, "
          f"from torch's own one-ulp sensitivity {sensitivity:.1e}): "
          f"{', '.join(parts) or 'no other backend available'} -> {'ok' if ok else 'MISMATCH'}")
    return ok


def run_demo(parser: argparse.ArgumentParser, args) -> int:
    if args.n < ex.K + 1:
        parser.error(f"--n must be > {ex.K}")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    for name, ws in (("--cfg-weights", args.cfg_weights), ("--ag-weights", args.ag_weights)):
        if any(not math.isfinite(w) or w < 1 for w in ws):
            parser.error(f"{name} must be finite and >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        models = ex.load_models(args.weights, device=device)
    except (FileNotFoundError, TypeError, ValueError) as exc:
        print(f"python -m ag_kernels demo: {exc}", file=sys.stderr)
        return 2
    print(f"ag_kernels demo: the 2-D tree toy of Karras et al. 2024 (Sec. 3), class A, device {device}")
    for name, spec in ex.MODELS.items():
        print(f"  {name:<7} {spec.role}")
    print(f"  sampler: ag_kernels.edm_sampler, Heun, {args.steps} steps, sigma {ex.SIGMA_MAX:g} -> {ex.SIGMA_MIN:g}, "
          f"backend {args.backend}; {args.n} samples per row, same noise for every row")
    print(f"  metrics vs {args.n} exact class-A samples: improved precision/recall (k = {ex.K}); outliers = exact "
          f"log p below the {ex.OUTLIER_QUANTILE:.0%} quantile of class A, gross = {ex.GROSS_NATS:g} nats further below; "
          f"mass per tree level 0 (trunk) .. {TREE_LEVELS - 1}")
    print()
    header = (f"{'method':<13} {'w':>5} {'precision':>9} {'recall':>7} {'outliers':>8} {'gross':>8} {'mean log p':>10}  "
              f"mass by tree level")
    print(header)
    print("-" * (len(header) + 30))
    try:
        result = ex.run(
            models, n=args.n, cfg_weights=args.cfg_weights, ag_weights=args.ag_weights, seed=args.seed,
            device=device, backend=args.backend, num_steps=args.steps,
            log=lambda r: print(_fmt_row(r.method, r.guidance, r.metrics), flush=True),
        )
    except (TypeError, ValueError) as exc:
        print(f"python -m ag_kernels demo: {exc}", file=sys.stderr)
        return 2
    print(_fmt_row("exact data", float("nan"), result.reference.metrics) + "   (an independent exact set: the ceiling)")
    print()
    blur = ", ".join(f"sigma {k}: {v:.2f}" for k, v in result.blur.items())
    print(f"how thin the tree is (nats of exact log-likelihood lost by blurring exact data): {blur}")
    print(f"at the paper's weights (autoguidance w = {ex.AG_WEIGHT:g}, CFG w = {ex.CFG_WEIGHT:g}):")
    print(_fmt_row("exact data", float("nan"), result.reference.metrics))
    for method, r in result.headline.items():
        print(_fmt_row(method, r.guidance, r.metrics))
    print()
    print("goals:")
    for name, g in ex.goals(result).items():
        print(f"  {name:<34} {g['value']:>8.3f}  target {g['target']:<8} {'met' if g['met'] else 'NOT MET'}")
    ok = True
    if not args.no_backend_check:
        print()
        ok = _backend_check(models, result.headline["autoguidance"], min(args.n, 1024), args.seed, device)
    if not args.no_png:
        path = ex.plot(result, args.png)
        print(f"figure: {path}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2) + "\n")
        print(f"metrics: {args.json}")
    print(f"done in {result.seconds:.1f} s (sampling and metrics)")
    return 0 if ok else 1


def add_toy_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="toy_command", required=True)
    t = sub.add_parser("train", help="train the toy models (main, guide, uncond) and write their weights")
    t.add_argument("--out", default=str(ex.WEIGHTS_DIR), help=f"output folder (default: the package's {ex.WEIGHTS_DIR})")
    t.add_argument("--models", nargs="+", choices=list(ex.MODELS), default=list(ex.MODELS), help="which models (default all)")
    t.add_argument("--iterations-scale", type=float, default=1.0,
                   help="multiply every model's iteration count (default 1: the paper's 4096/512/512)")
    t.add_argument("--batch", type=int, default=4096, help="training batch (default 4096)")
    t.add_argument("--no-progress", action="store_true")


def run_toy(parser: argparse.ArgumentParser, args) -> int:
    if args.batch < 1:
        parser.error("--batch must be >= 1")
    if not (0 < args.iterations_scale <= 1000):
        parser.error("--iterations-scale must be in (0, 1000]")
    ex.train_models(args.out, names=args.models, iterations_scale=args.iterations_scale, batch_size=args.batch,
                    progress=not args.no_progress)
    return 0
