"""The benchmark suite and its runner still work end to end (tiny sizes, one round), so they cannot rot."""

import json
import os
import subprocess
import sys

from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_smoke_run_writes_results(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # as a user runs it; bench skips Triton on CPU tensors anyway
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out-dir", str(out)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "results.json").read_text())
    for key in ("device", "torch", "triton", "date", "profile"):
        assert summary.get(key), key
    assert summary["profile"] == "smoke"
    cases = {(r["op"], r["case"]) for r in summary["step_ops"]}
    for op in ("euler_step", "heun_step"):
        for case in ("copy", "eager", "compile", "eager_noalloc", "ext", "ext_alloc"):
            assert (op, case) in cases, (op, case)
    compiled = [r for r in summary["step_ops"] if r["case"] == "compile"]
    assert all(r["compile_s"] > 0 for r in compiled)
    fused = [r for r in summary["step_ops"] if r["case"] == "ext"]
    assert all(0 < r["copy_fraction"] and r["speedup_vs_eager"] > 0 for r in fused)
    sampler = {(r["pair"], r["case"]): r for r in summary["sampler"]}
    assert set(sampler) == {("toy", "eager"), ("toy", "ag_kernels"), ("unet", "eager"), ("unet", "ag_kernels")}
    # The agreement of edm_sampler with the eager loop is measured in the same run.
    assert sampler["toy", "ag_kernels"]["max_rel_diff_vs_eager"] <= 1e-5
    assert sampler["unet", "ag_kernels"]["max_rel_diff_vs_eager"] is not None
    assert sampler["unet", "ag_kernels"]["max_rel_diff_vs_eager_fp32"] <= 1e-5
    assert "| euler_step |" in (out / "results.md").read_text()
    with Image.open(out / "results.png") as png:
        assert png.format == "PNG"
