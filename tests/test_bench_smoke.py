"""The benchmark suite still runs (tiny sizes, timing off), so it cannot rot between benchmark runs."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_suite_runs(tmp_path):
    env = dict(os.environ, AG_BENCH_NUMEL="4099")
    env.pop("TRITON_INTERPRET", None)  # as a user runs it; bench skips Triton on CPU tensors anyway
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", os.path.join(REPO, "bench"), "-q", "-p", "no:cacheprovider",
         "--benchmark-disable", f"--basetemp={tmp_path / 'bt'}"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-2000:]
