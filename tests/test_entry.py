"""The command line's front door: ``python -m ag_kernels`` and ``ag-kernels``, Ctrl-C while torch imports."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# From 0.3 s on the interrupt lands in our code: before that the interpreter itself is starting
# (about 30 ms unloaded), which no program can catch.  Up to 2.5 s covers torch's and Triton's
# imports (about 1.3 s here) and the first moments of the command's own work.
DELAYS = sorted(random.Random(7).uniform(0.3, 2.5) for _ in range(8))


def test_ctrl_c_at_any_moment_exits_130_with_one_line():
    """Interrupts at random moments (torch's import included) each exit 130 with one line on stderr."""
    for delay in DELAYS:
        p = subprocess.Popen([sys.executable, "-m", "ag_kernels", "demo", "--n", "256", "--no-png"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 130 and err.splitlines() == ["python -m ag_kernels: interrupted"], (
            f"SIGINT after {delay:.2f} s: exit {p.returncode}, stderr:\n{err[-3000:]}")


def test_console_script():
    script = Path(sys.executable).parent / "ag-kernels"
    if not script.exists():
        pytest.skip(f"no ag-kernels next to {sys.executable}: the package is not pip-installed here")
    out = subprocess.run([str(script), "selfcheck", "--steps", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().endswith("--steps must be >= 1, got 0"), out.stderr
