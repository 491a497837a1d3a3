"""Command line: ``python -m ag_kernels {demo,toy,generate,verify,selfcheck}``."""

from __future__ import annotations

import argparse
import os
import sys


_EDM2_ENV = "AG_EDM2_PATH"  # ag_kernels.edm2.ENV_VAR, named here without importing torch for --help


def _add_generate_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--shape", help="noise shape C,H,W when the network has no img_channels/img_resolution")
    p.add_argument("--steps", type=int, default=32, help="sampler steps (default 32)")
    p.add_argument("--sigma-min", "--sigma_min", dest="sigma_min", type=float, default=0.002)
    p.add_argument("--sigma-max", "--sigma_max", dest="sigma_max", type=float, default=80.0)
    p.add_argument("--rho", type=float, default=7.0)
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance weight w (default: the preset's, else 1: no guidance)")
    p.add_argument("--guidance-interval", help="lo,hi: guide only for sigma in (lo, hi]")
    p.add_argument("--churn", "--S_churn", dest="churn", type=float, default=0.0, help="S_churn (default 0)")
    p.add_argument("--s-min", "--S_min", dest="s_min", type=float, default=0.0)
    p.add_argument("--s-max", "--S_max", dest="s_max", type=float, default=float("inf"))
    p.add_argument("--s-noise", "--S_noise", dest="s_noise", type=float, default=1.0)
    p.add_argument("--solver", choices=("heun", "euler"), default="heun")
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


def _pair(parser, name, text):
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        parser.error(f"{name} must be two numbers lo,hi; got {text!r}")
    return lo, hi


def _load(path, flag, device, allow_pickle):
    """(network, encoder or None): our formats and TorchScript, else (with allow_pickle) an EDM2 snapshot."""
    from .checkpoint import UnsafeCheckpointError, load_net
    from .edm2 import load_snapshot

    try:
        return load_net(path, device=device), None
    except UnsafeCheckpointError:
        if not allow_pickle:
            raise
    return load_snapshot(path, device=device, allow_pickle=True, flag=flag)


def _run_generate(parser, args) -> int:
    import torch

    from .checkpoint import CheckpointError, UnsafeCheckpointError
    from .edm2 import EDM2Error, find_checkout, prepare_encoder, resolve_preset, use_checkout
    from .generation import generate
    from .seeds import parse_seeds

    try:
        device = torch_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except ValueError as exc:
        parser.error(f"--device: {exc}")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        # Under torchrun each process loads its networks onto its own GPU, where generate samples.
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as exc:
        parser.error(f"--seeds: {exc}")
    shape = None
    if args.shape:
        try:
            shape = tuple(int(v) for v in args.shape.split(","))
        except ValueError:
            parser.error(f"--shape must be integers C,H,W; got {args.shape!r}")
    interval = _pair(parser, "--guidance-interval", args.guidance_interval) if args.guidance_interval else None

    def fail(message) -> int:
        print(f"python -m ag_kernels generate: {message}", file=sys.stderr)
        return 2

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
            return fail("--models is only used with --preset")
        if net_path is None:
            return fail("pass --net PATH or --preset NAME")
        guidance = 1.0 if guidance is None else guidance
        if guidance != 1 and gnet_path is None:
            return fail(f"--guidance {guidance:g} needs a guiding network: pass --gnet PATH")
        net, encoder = _load(net_path, "--net", device, args.allow_pickle)
        # The guiding network is only loaded (and evaluated) where it is used, as the reference does.
        gnet = _load(gnet_path, "--gnet", device, args.allow_pickle)[0] if guidance != 1 else None
        # The main snapshot's encoder decodes (the VAE for latent models), made ready before sampling.
        encoder = prepare_encoder(encoder, device)
    except (FileNotFoundError, UnsafeCheckpointError, CheckpointError, EDM2Error) as exc:
        return fail(exc)
    count = 0
    try:
        for batch in generate(
            net, gnet, seeds=seeds, batch_size=args.batch, class_idx=args.class_idx, encoder=encoder,
            outdir=args.outdir, subdirs=args.subdirs, batch_split="even",
            noise_shape=shape, device=device, progress=not args.no_progress,
            num_steps=args.steps, sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho,
            guidance=guidance, S_churn=args.churn, S_min=args.s_min, S_max=args.s_max, S_noise=args.s_noise,
            dtype=getattr(torch, args.dtype), backend=args.backend, guidance_interval=interval, solver=args.solver,
            cuda_graph={"auto": "auto", "on": True, "off": False}[args.cuda_graph], overlap=not args.no_overlap,
        ):
            count += len(batch.seeds)
    except (TypeError, ValueError) as exc:
        return fail(exc)
    where = f" into {args.outdir}" if args.outdir else " (no --outdir: nothing written)"
    print(f"generated {count} samples{where}")
    return 0


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
    elif device.type not in ("cpu", "meta"):
        backend = getattr(torch, device.type, None)
        available = getattr(backend, "is_available", None)
        if not callable(available) or not available():
            raise ValueError(f"{text!r}: no {device.type} device is available here")
    if device.type == "meta":
        raise ValueError(f"{text!r}: the meta device holds no data; use cpu or cuda")
    return device


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
    for flag, value in (("--batch", args.batch), ("--size", args.size), ("--steps", args.steps)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    for w in args.guidance:
        if not abs(w) < 3.4e38:
            parser.error(f"--guidance must be finite numbers within float32's range, got {w}")
    try:
        device = torch_device(args.device)
    except ValueError as exc:
        parser.error(f"--device: {exc}")
    ok = selfcheck.run_selfcheck(device, args.batch, args.size, args.steps, tuple(args.guidance), args.seed, args.net_dtype)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
