"""Command line: ``python -m ag_kernels {demo,toy,generate,verify,selfcheck}``."""

from __future__ import annotations

import argparse
import sys


def _add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--net", required=True, help="main network: TorchScript file or ag_kernels checkpoint")
    p.add_argument("--gnet", help="guiding network (autoguidance: a worse model; CFG: the unconditional one)")
    p.add_argument("--seeds", default="0-63", help="seeds, e.g. 0-63 or 1,5,9 or 0-3,10-12 (default 0-63)")
    p.add_argument("--batch", type=int, default=32, help="samples per batch (default 32)")
    p.add_argument("--class", dest="class_idx", type=int, help="class label for every sample (default: random per seed)")
    p.add_argument("--outdir", help="write one PNG per seed under this folder")
    p.add_argument("--shape", help="noise shape C,H,W when the network has no img_channels/img_resolution")
    p.add_argument("--steps", type=int, default=32, help="sampler steps (default 32)")
    p.add_argument("--sigma-min", type=float, default=0.002)
    p.add_argument("--sigma-max", type=float, default=80.0)
    p.add_argument("--rho", type=float, default=7.0)
    p.add_argument("--guidance", type=float, default=1.0, help="guidance weight w (default 1: no guidance)")
    p.add_argument("--guidance-interval", help="lo,hi: guide only for sigma in (lo, hi]")
    p.add_argument("--churn", type=float, default=0.0, help="S_churn (default 0)")
    p.add_argument("--s-min", type=float, default=0.0)
    p.add_argument("--s-max", type=float, default=float("inf"))
    p.add_argument("--s-noise", type=float, default=1.0)
    p.add_argument("--solver", choices=("heun", "euler"), default="heun")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="sampler dtype")
    p.add_argument("--backend", default="auto", help="auto, torch, triton or ext")
    p.add_argument("--cuda-graph", choices=("auto", "on", "off"), default="auto",
                   help="run each batch shape from a CUDA graph: auto (on a GPU), on (warn if not possible), off")
    p.add_argument("--no-overlap", action="store_true",
                   help="on a GPU, evaluate the guiding network after the main one, not concurrently on a second stream")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load checkpoints that need full unpickling (can run arbitrary code: trusted files only)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _pair(parser, name, text):
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        parser.error(f"{name} must be two numbers lo,hi; got {text!r}")
    return lo, hi


def _run_generate(parser, args) -> int:
    import torch

    from .checkpoint import UnsafeCheckpointError, load_net
    from .generation import generate
    from .seeds import parse_seeds

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as exc:
        parser.error(str(exc))
    shape = None
    if args.shape:
        try:
            shape = tuple(int(v) for v in args.shape.split(","))
        except ValueError:
            parser.error(f"--shape must be integers C,H,W; got {args.shape!r}")
    try:
        net = load_net(args.net, device=device, allow_pickle=args.allow_pickle)
        gnet = load_net(args.gnet, device=device, allow_pickle=args.allow_pickle) if args.gnet else None
    except (FileNotFoundError, UnsafeCheckpointError, ValueError) as exc:
        print(f"python -m ag_kernels generate: {exc}", file=sys.stderr)
        return 2
    interval = _pair(parser, "--guidance-interval", args.guidance_interval) if args.guidance_interval else None
    count = 0
    try:
        for batch in generate(
            net, gnet, seeds=seeds, batch_size=args.batch, class_idx=args.class_idx, outdir=args.outdir,
            noise_shape=shape, device=device, progress=not args.no_progress,
            num_steps=args.steps, sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho,
            guidance=args.guidance, S_churn=args.churn, S_min=args.s_min, S_max=args.s_max, S_noise=args.s_noise,
            dtype=getattr(torch, args.dtype), backend=args.backend, guidance_interval=interval, solver=args.solver,
            cuda_graph={"auto": "auto", "on": True, "off": False}[args.cuda_graph], overlap=not args.no_overlap,
        ):
            count += len(batch.seeds)
    except (TypeError, ValueError) as exc:
        print(f"python -m ag_kernels generate: {exc}", file=sys.stderr)
        return 2
    where = f" into {args.outdir}" if args.outdir else " (no --outdir: nothing written)"
    print(f"generated {count} samples{where}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ag_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import selfcheck
    from .toy import cli as toy_cli

    p = sub.add_parser("demo", help="the paper's 2-D toy: no guidance vs CFG vs autoguidance, measured and drawn")
    toy_cli.add_demo_arguments(p)
    p = sub.add_parser("toy", help="toy experiment tools (toy train: train the toy models)")
    toy_cli.add_toy_arguments(p)
    p = sub.add_parser("selfcheck", help="closed-form Gaussian sampler on every available backend, checked against the reference")
    selfcheck.add_arguments(p)
    p = sub.add_parser("generate", help="generate samples from saved networks with the guided EDM sampler")
    _add_generate_arguments(p)
    sub.add_parser(
        "verify", add_help=False,
        help="compare edm_sampler with the reference one of an NVlabs/edm2 checkout (--edm2 PATH; see verify -h)",
    )
    args, rest = parser.parse_known_args(argv)
    if args.command == "verify":
        from . import verify

        return verify.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "generate":
        return _run_generate(parser, args)
    if args.command == "demo":
        return toy_cli.run_demo(parser, args)
    if args.command == "toy":
        return toy_cli.run_toy(parser, args)
    if args.batch < 1 or args.size < 1 or args.steps < 1:
        parser.error("--batch, --size and --steps must be >= 1")
    ok = selfcheck.run_selfcheck(args.device, args.batch, args.size, args.steps, tuple(args.guidance), args.seed, args.net_dtype)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
