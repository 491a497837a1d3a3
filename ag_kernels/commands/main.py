"""Command line: ``python -m ag_kernels {demo,toy,generate,tune-schedule,verify,selfcheck}`` (also ``ag-kernels``)."""

from __future__ import annotations

import os
import signal
import sys

from ._parser import Parser


def main(argv=None) -> int:
    parser = Parser(prog="python -m ag_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    from ..toy import cli as toy_cli
    from . import generate as cli_generate
    from . import selfcheck
    from . import tune_schedule as cli_tune

    p = sub.add_parser("demo", help="the paper's 2-D toy: no guidance vs CFG vs autoguidance, measured and drawn")
    toy_cli.add_demo_arguments(p)
    p = sub.add_parser("toy", help="toy experiment tools (toy train: train the toy models)")
    toy_cli.add_toy_arguments(p)
    p = sub.add_parser("selfcheck", help="closed-form Gaussian sampler on every available backend, checked against the reference")
    selfcheck.add_arguments(p)
    p = sub.add_parser("generate", help="generate samples from saved networks with the guided EDM sampler")
    cli_generate.add_arguments(p)
    p = sub.add_parser("tune-schedule", help="fit a noise schedule to a guided pair, a solver and a budget (JSON "
                       "for generate --sigmas)")
    cli_tune.add_arguments(p)
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
    if args.command == "tune-schedule":
        return cli_tune.run(args)
    if args.command == "demo":
        return toy_cli.run_demo(parser, args)
    if args.command == "toy":
        return toy_cli.run_toy(parser, args)
    return selfcheck.run(parser, args)


def _import_torch() -> None:
    """Import torch and Triton with Ctrl-C held back until done, then raise KeyboardInterrupt if one came.

    Their native modules run Python code while they initialize (pybind11, nanobind); an interrupt
    raised inside it aborts the process (SIGABRT, a page of traceback) instead of unwinding, and
    torch imports Triton lazily in the middle of a run.  So the interrupt is only noted while they
    import (about a second) and acted on right after.
    """
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        import torch  # noqa: F401
        try:
            import triton  # noqa: F401
        except ImportError:  # optional: the CPU backends work without it
            pass
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt


def entry() -> int:
    """The console entry point: :func:`main` on ``sys.argv``, with Ctrl-C at any moment one line and exit 130.

    torch is imported first (seconds), with an interrupt held back until it is done (see
    :func:`_import_torch`), so Ctrl-C while it imports is this one line too, not a traceback.
    """
    try:
        _import_torch()
        code = main()
    except KeyboardInterrupt:  # Ctrl-C outside a command's own handling: one line, no traceback
        print("python -m ag_kernels: interrupted", file=sys.stderr)
        # Exit now with 130: an interrupt that landed inside torch's C++ start-up code leaves the
        # interpreter marked "interrupted", and it would kill itself with SIGINT at exit instead.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    # The work is done (or stopped): a Ctrl-C during interpreter shutdown would only print a
    # traceback from some exit handler, so it is ignored from here on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code
