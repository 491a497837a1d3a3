"""Command line: ``python -m ag_kernels demo``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ag_kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import demo

    p = sub.add_parser("demo", help="sample with the fused ops on every available backend and check them")
    demo.add_arguments(p)
    args = parser.parse_args(argv)  # "demo" is the only command so far
    if args.batch < 1 or args.size < 1 or args.steps < 1:
        parser.error("--batch, --size and --steps must be >= 1")
    ok = demo.run_demo(args.device, args.batch, args.size, args.steps, tuple(args.guidance), args.seed, args.net_dtype)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
