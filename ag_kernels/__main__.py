"""``python -m ag_kernels``: the command line of :mod:`ag_kernels.commands.main`."""

import sys

if __name__ == "__main__":
    try:
        from .commands.main import entry
    except KeyboardInterrupt:  # Ctrl-C in the first milliseconds, before entry() catches it itself
        sys.stderr.write("python -m ag_kernels: interrupted\n")
        sys.exit(130)
    sys.exit(entry())
