"""The argument parser every command uses: usage errors as one line naming the flag (exit 2)."""

from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the flag (exit 2), not the usage text."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")
