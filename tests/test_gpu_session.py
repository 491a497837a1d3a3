"""bench/gpu_session.sh, the one device call of a lent GPU: its dry run, which CI runs on every machine.

The dry run prints the five stages in priority order with their time limits and checks the
plumbing (timeout, the imports, the ``-m cuda`` selection, the bench and report command lines)
without running any stage or writing anything.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "bench", "gpu_session.sh")


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_session_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)  # as a person runs it
    proc = subprocess.run(["bash", SCRIPT, "--dry-run"], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.rstrip().endswith("dry run ok")
    stages = re.findall(r"^stage (\d) (\w+) +limit:? *(\d+|the time left of (\d+) s \(at least (\d+) s\))", out, re.M)
    assert [(n, name) for n, name, *_ in stages] == [
        ("1", "env"), ("2", "build"), ("3", "cuda_tests"), ("4", "bench"), ("5", "memcheck")]
    fixed = sum(int(limit) for _, _, limit, _, _ in stages[:4])
    _, _, _, budget, least = stages[4]
    assert int(budget) == 480 and fixed + int(least) <= 480
    # Stage 3 runs only the CUDA tests (none of the CPU ones, not the bench smoke test), and selects some.
    selected = re.search(r"stage 3 selects (\d+)/(\d+) tests collected", out)
    assert selected and 0 < int(selected[1]) < int(selected[2]), out
    assert "-m cuda" in out and "test_bench_smoke" not in out
    assert "python -m bench --help ok" in out and "--rows ok" in out
    assert "--report-api-errors no" in out and "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in out
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_session_refuses_unknown_arguments(tmp_path):
    proc = subprocess.run(["bash", SCRIPT, "bench"], capture_output=True, text=True, cwd=REPO, timeout=60,
                          env=dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable))
    assert proc.returncode == 2 and "usage: bash bench/gpu_session.sh [--dry-run]" in proc.stderr
    assert not (tmp_path / "out").exists()
