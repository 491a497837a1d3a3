"""Command line: ``python -m ag_kernels {demo,toy,generate,verify,selfcheck}``."""

from __future__ import annotations

import argparse
import signal
import sys


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the flag (exit 2), not the usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv=None) -> int:
    parser = _Parser(prog="python -m ag_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    from . import cli_generate, selfcheck
    from .toy import cli as toy_cli

    p = sub.add_parser("demo", help="the paper's 2-D toy: no guidance vs CFG vs autoguidance, measured and drawn")
    toy_cli.add_demo_arguments(p)
    p = sub.add_parser("toy", help="toy experiment tools (toy train: train the toy models)")
    toy_cli.add_toy_arguments(p)
    p = sub.add_parser("selfcheck", help="closed-form Gaussian sampler on every available backend, checked against the reference")
    selfcheck.add_arguments(p)
    p = sub.add_parser("generate", help="generate samples from saved networks with the guided EDM sampler")
    cli_generate.add_arguments(p)
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
        return cli_generate.run(args)
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
        device = cli_generate.torch_device(args.device)
    except ValueError as exc:
        parser.error(f"--device: {exc}")
    ok = selfcheck.run_selfcheck(device, args.batch, args.size, args.steps, tuple(args.guidance), args.seed, args.net_dtype)
    return 0 if ok else 1


def _main() -> int:
    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C outside a command's own handling: one line, no traceback
        print("python -m ag_kernels: interrupted", file=sys.stderr)
        code = 130
    # The work is done (or stopped): a Ctrl-C during interpreter shutdown would only print a
    # traceback from some exit handler, so it is ignored from here on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(_main())
