"""The benchmark suite and its runner still work end to end (tiny sizes, one round), so they cannot rot."""

import json
import os
import subprocess
import sys

import pytest
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
    # Host overhead: every op, size and D dtype has public, raw, eager_noalloc and compile side by side.
    host = {(r["op"], r["n"], r["d_dtype"]): r for r in summary["host_overhead"] if r["backend"] == "ext"}
    assert set(host) == {(op, n, d) for op in ("euler_step", "heun_step") for n in (64, 4099) for d in ("float32", "bfloat16")}
    for r in host.values():
        for key in ("public_s", "raw_s", "eager_noalloc_s", "compile_median_s", "compile_s"):
            assert r[key] > 0, key
        assert r["budget_s"] == pytest.approx(1.5 * r["raw_s"] + 3e-6)
        assert r["budget_met"] == (r["public_s"] <= r["budget_s"]) and r["budget_applies"]
        assert r["speedup_vs_eager_noalloc"] == pytest.approx(r["eager_noalloc_s"] / r["public_s"])
    sampler = {(r["pair"], r["case"]): r for r in summary["sampler"]}
    assert set(sampler) == {(pair, case) for pair in ("toy", "cheap", "unet") for case in ("eager", "ag_kernels")}
    # The agreement of edm_sampler with the eager loop is measured in the same run.
    assert sampler["toy", "ag_kernels"]["max_rel_diff_vs_eager"] <= 1e-5
    assert sampler["cheap", "ag_kernels"]["max_rel_diff_vs_eager"] <= 1e-5
    assert sampler["cheap", "ag_kernels"]["speedup_vs_eager"] > 0
    assert sampler["unet", "ag_kernels"]["max_rel_diff_vs_eager"] is not None
    assert sampler["unet", "ag_kernels"]["max_rel_diff_vs_eager_fp32"] <= 1e-5
    md = (out / "results.md").read_text()
    assert "| euler_step |" in md and "## Host overhead" in md and "| heun_step | 2^6 | bfloat16 | ext |" in md
    with Image.open(out / "results.png") as png:
        assert png.format == "PNG"
