"""bench/gpu_session.sh, the one device call of a lent GPU: its dry run, which CI runs on every machine.

The dry run prints the five stages in priority order with their time limits and checks the
plumbing (timeout, the imports, the ``-m cuda`` selection and the files it runs, the bench and report
command lines) without running any stage or writing anything.
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
    # The files come from the cuda marker: each file with a CUDA test, the graph paths first.
    files = re.findall(r"^  (tests/\S+\.py) \((\d+)\)$", out, re.M)
    counts = {f: int(n) for f, n in files}
    assert [f for f, _ in files[:3]] == ["tests/test_engine.py", "tests/test_solvers.py", "tests/test_multistep_op.py"]
    for f in ("tests/test_multistep_op.py", "tests/test_solvers.py", "tests/test_ops.py", "tests/test_ext.py"):
        assert counts.get(f, 0) > 0, f"{f} is not in stage 3's files: {files}"
    assert sum(counts.values()) == int(selected[1]) and len(counts) == len(files)
    assert "holds no test marked cuda" not in out
    assert "python -m bench --help ok" in out and "--rows ok" in out
    assert "--report-api-errors no" in out and "PYTORCH_NO_CUDA_MEMORY_CACHING=1" in out
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_session_refuses_unknown_arguments(tmp_path):
    proc = subprocess.run(["bash", SCRIPT, "bench"], capture_output=True, text=True, cwd=REPO, timeout=60,
                          env=dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable))
    assert proc.returncode == 2 and "usage: bash bench/gpu_session.sh [--dry-run]" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_bench_profile_runs_the_engine_first(monkeypatch):
    """The GPU profile orders the engine suite (the session's figures) before the step ops."""
    from types import SimpleNamespace

    from bench import conftest, run

    monkeypatch.setenv("AG_BENCH_FILE_ORDER", run.GPU_ENV["AG_BENCH_FILE_ORDER"])
    items = [SimpleNamespace(path=SimpleNamespace(name=n)) for n in ("test_step_ops.py", "test_engine.py",
                                                                       "test_step_ops.py", "test_engine.py")]
    conftest.pytest_collection_modifyitems(None, items)
    assert [i.path.name for i in items] == ["test_engine.py"] * 2 + ["test_step_ops.py"] * 2
    monkeypatch.delenv("AG_BENCH_FILE_ORDER")
    conftest.pytest_collection_modifyitems(None, items)  # the standard profile: the engine last
    assert [i.path.name for i in items] == ["test_step_ops.py"] * 2 + ["test_engine.py"] * 2
