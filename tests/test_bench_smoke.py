"""The benchmark suite and its runner still work end to end (tiny sizes, one round), so they cannot rot.

Also the GPU profile's parts that a CPU can check: ``python -m bench --gpu`` refuses cleanly
without CUDA, its suites collect with the profile's sizes, dtypes and cases, the engine suite
builds EDM2 networks from an ``--edm2`` checkout with the right arguments (a tiny stand-in
checkout written here, no EDM2 code), and the report's engine section renders GPU rows.
"""

import importlib
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = dict(os.environ, **extra)
    env.pop("TRITON_INTERPRET", None)  # as a user runs it; bench skips Triton on CPU tensors anyway
    return env


def test_bench_smoke_run_writes_results(tmp_path):
    env = _env()
    env.pop("AG_EDM2_PATH", None)  # our own UNet pair here; the EDM2 path has its own test
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
    # The engine suite: the edm2-style loop and our eager path side by side; the graph cases are
    # skipped on a CPU, and the report says so.
    engine = {r["case"]: r for r in summary["engine"]}
    assert set(engine) == {"edm2_eager", "eager"}
    eager = engine["eager"]
    assert eager["speedup_vs_edm2_eager"] == pytest.approx(engine["edm2_eager"]["median_s"] / eager["median_s"])
    assert eager["vs"] == "edm2_eager" and eager["max_rel_diff"] is not None
    assert eager["max_rel_diff_fp32"] <= 1e-5
    assert eager["first_call_s"] > 0 and eager["mode"] == "eager" and eager["batch"] == 2
    assert "unet cpu-xs / cpu-xs" in eager["nets"]
    skipped = {(r["case"], r["batch"]): r["reason"] for r in summary["engine_skipped"]}
    assert set(skipped) == {(c, 2) for c in ("graph", "graph_overlap", "graph_overlap_compile")}
    assert all("CUDA graphs need a CUDA device" in reason for reason in skipped.values())
    md = (out / "results.md").read_text()
    assert "| euler_step |" in md and "## Host overhead" in md and "| heun_step | 2^6 | bfloat16 | ext |" in md
    assert "## Engine: whole guided sampler" in md and "| 2 | eager |" in md
    assert "- `graph`, `graph_overlap`, `graph_overlap_compile` (batch 2): CUDA graphs need a CUDA device" in md
    with Image.open(out / "results.png") as png:
        assert png.format == "PNG"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_bench_gpu_without_cuda_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "--gpu", "--out-dir", str(tmp_path / "out")],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == "bench --gpu: no CUDA device (torch.cuda.is_available() is False)\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["missing", "not_a_checkout"])
def test_bench_edm2_bad_path_exits_2_with_one_line(tmp_path, capsys, monkeypatch, kind):
    from bench.run import main

    monkeypatch.delenv("AG_EDM2_PATH", raising=False)
    path = tmp_path / "nowhere" if kind == "missing" else tmp_path
    assert main(["--edm2", str(path), "--out-dir", str(tmp_path / "out")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith("bench: --edm2: ")
    assert ("is not a folder" if kind == "missing" else "is not an NVlabs/edm2 checkout") in err
    assert not (tmp_path / "out").exists()
    # The environment variable is checked the same way.
    monkeypatch.setenv("AG_EDM2_PATH", str(path))
    assert main(["--out-dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("bench: $AG_EDM2_PATH: ")


def test_bench_gpu_runner_command_and_incomplete_results(tmp_path, monkeypatch, capsys):
    """With CUDA (faked here), --gpu runs the two suites with the profile's environment; when pytest
    fails, the rows that ran are still written, marked incomplete, and pytest's status is returned."""
    from bench import conftest, run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(conftest, "device_name", lambda device: "Fake GPU")
    monkeypatch.setattr(conftest, "device_slug", lambda device: "fake-gpu")
    monkeypatch.delenv("AG_EDM2_PATH", raising=False)
    calls = []

    def fake_run(cmd, cwd, env):
        calls.append((cmd, env))
        raw = next(a for a in cmd if a.startswith("--benchmark-json=")).split("=", 1)[1]
        info = dict(case="edm2_eager", device="cuda", batch=1, steps=32, guidance=2.0, nets="unet s / xs")
        with open(raw, "w") as f:
            json.dump({"benchmarks": [{"group": "engine cuda batch=1", "name": "test_engine[cuda-b1-edm2_eager]",
                                       "stats": {"median": 0.5, "data": [0.5]}, "extra_info": info}]}, f)
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(run.subprocess, "run", fake_run)
    out = tmp_path / "out"
    assert run.main(["--gpu", "--out-dir", str(out)]) == 1
    (cmd, env), = calls
    assert [a for a in cmd if a.endswith(".py")] == [os.path.join(REPO, "bench", f) for f in run.GPU_FILES]
    assert "--benchmark-max-time=0.25" in cmd and env["AG_BENCH_PROFILE"] == "gpu"
    assert {k: env[k] for k in run.GPU_ENV} == run.GPU_ENV and "AG_EDM2_PATH" not in env
    summary = json.loads((out / "results.json").read_text())
    assert summary["incomplete"] == "pytest exited 1" and summary["command"] == "python -m bench --gpu"
    assert [r["case"] for r in summary["engine"]] == ["edm2_eager"]
    assert "**Incomplete: pytest exited 1.**" in (out / "results.md").read_text()
    assert "marked incomplete" in capsys.readouterr().err


def test_bench_gpu_profile_collects_the_issue_configurations():
    """The --gpu profile's suites collect with its sizes, dtypes and cases (collection only: no GPU here)."""
    from bench.run import GPU_ENV

    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/test_step_ops.py", "bench/test_engine.py", "--collect-only", "-q",
         "-p", "no:cacheprovider"],
        capture_output=True, text=True, env=_env(**GPU_ENV), cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ids = re.findall(r"test_(?:euler|heun)_step\[(\w+)-(\d+)-(\w+)-(\w+)\]", proc.stdout)
    assert {int(n) for _, n, _, _ in ids} == {2**p for p in (16, 20, 22, 24, 26)}
    assert {d for _, _, d, _ in ids} == {"float32", "bfloat16"}
    # On this CPU the triton case is left out (the interpreter is never timed); on CUDA it is in.
    assert {c for _, _, _, c in ids} == {"copy", "eager", "compile", "ext"}
    assert "test_engine[" in proc.stdout


# A stand-in for an NVlabs/edm2 checkout (ours, tiny): a Precond with EDM2's constructor
# signature and call convention that logs how it was built and called.
STANDIN_FILES = {
    "dnnlib/__init__.py": "",
    "torch_utils/__init__.py": "",
    "torch_utils/persistence.py": "def persistent_class(cls):\n    return cls\n",
    "training/__init__.py": "",
    "training/networks_edm2.py": '''
        import json
        import os
        import torch
        from torch_utils import persistence

        UNET_KWARGS = {"model_channels", "channel_mult", "channel_mult_noise", "channel_mult_emb", "num_blocks",
                       "attn_resolutions", "label_balance", "concat_balance", "dropout"}

        def _log(record):
            with open(os.environ["STANDIN_LOG"], "a") as f:
                f.write(json.dumps(record) + "\\n")

        @persistence.persistent_class
        class Precond(torch.nn.Module):
            def __init__(self, img_resolution, img_channels, label_dim, use_fp16=True, sigma_data=0.5,
                         logvar_channels=128, **unet_kwargs):
                super().__init__()
                unknown = set(unet_kwargs) - UNET_KWARGS
                if unknown:
                    raise TypeError(f"unexpected arguments {sorted(unknown)}")
                self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
                self.use_fp16, self.sigma_data = use_fp16, sigma_data
                self.conv = torch.nn.Conv2d(img_channels, 8, 3, padding=1)
                self.emb = torch.nn.Linear(label_dim, 8)
                self.out = torch.nn.Conv2d(8, img_channels, 3, padding=1)
                self.out_gain = torch.nn.Parameter(torch.zeros([]))  # zero at initialization, as EDM2's
                self._seen = set()
                _log(dict(init=dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                    use_fp16=use_fp16, **unet_kwargs)))

            def forward(self, x, sigma, class_labels=None):
                state = (self.use_fp16, self.training, x.dtype == torch.float32, class_labels is not None)
                if state not in self._seen:
                    self._seen.add(state)
                    _log(dict(forward=dict(use_fp16=state[0], training=state[1], x_float32=state[2], labels=state[3])))
                x = x.to(torch.float32)
                sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
                c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
                c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
                c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
                h = self.conv(c_in * x) + self.emb(class_labels.to(torch.float32))[:, :, None, None]
                f = self.out(torch.nn.functional.silu(h)) * self.out_gain
                return c_skip * x + c_out * f
    ''',
}


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """A stand-in checkout; its modules are forgotten afterwards."""
    root = tmp_path / "edm2"
    for rel, text in STANDIN_FILES.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(text))
    log = tmp_path / "standin.log"
    monkeypatch.setenv("STANDIN_LOG", str(log))
    path = list(sys.path)
    yield root, log
    sys.path[:] = path
    for name in list(sys.modules):
        if name.split(".")[0] in ("dnnlib", "torch_utils", "training"):
            del sys.modules[name]
    importlib.invalidate_caches()


def _records(log, kind):
    return [r[kind] for r in map(json.loads, log.read_text().splitlines()) if kind in r]


def test_bench_edm2_smoke_runs_the_checkouts_precond(tmp_path, standin):
    """`python -m bench --smoke --edm2 PATH`: the engine suite samples with that checkout's Precond."""
    root, log = standin
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--edm2", str(root), "--out-dir", str(out), "--", "-k", "test_engine"],
        capture_output=True, text=True, env=_env(STANDIN_LOG=str(log)), cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    from bench.test_engine import EDM2_SIZES

    inits = _records(log, "init")
    assert inits == [dict(img_resolution=16, img_channels=4, label_dim=1000, use_fp16=True, **EDM2_SIZES["cpu-xs"])] * 2
    forwards = _records(log, "forward")
    # Eval mode, float32 x, labels; use_fp16 True for the timed runs, False for the float32 check.
    assert {(f["use_fp16"], f["training"], f["x_float32"], f["labels"]) for f in forwards} == {
        (True, False, True, True), (False, False, True, True)}
    summary = json.loads((out / "results.json").read_text())
    assert summary["command"] == f"python -m bench --smoke --edm2 {root} -- -k test_engine"
    engine = {r["case"]: r for r in summary["engine"]}
    assert set(engine) == {"edm2_eager", "eager"}
    assert engine["eager"]["nets"].startswith("edm2 Precond cpu-xs / cpu-xs")
    assert str(root.resolve()) in engine["eager"]["nets"]
    assert engine["eager"]["net_dtype"] == "float32"  # EDM2's Precond runs float16 on CUDA only
    # The gains were set to 1: the network's output is part of D, so the two samplers' agreement means something.
    assert 0 < engine["eager"]["max_rel_diff_fp32"] <= 1e-5


def test_bench_edm2_networks_of_the_gpu_profile(standin, monkeypatch):
    """The GPU profile's EDM2 pair: S main and XS guide at 64x64x4 latents, 1000 classes, float16, gains 1."""
    root, log = standin
    from bench import test_engine

    monkeypatch.setattr(test_engine, "EDM2_PATH", str(root))
    monkeypatch.setattr(test_engine, "SIZES", ("s", "xs"))
    monkeypatch.setattr(test_engine, "NET_DTYPE", torch.float16)
    net, gnet, desc, dtype = test_engine._edm2_pair()
    assert _records(log, "init") == [
        dict(img_resolution=64, img_channels=4, label_dim=1000, use_fp16=True, model_channels=192),
        dict(img_resolution=64, img_channels=4, label_dim=1000, use_fp16=True, model_channels=128),
    ]
    for n in (net, gnet):
        assert not n.training and not any(p.requires_grad for p in n.parameters())
        assert float(n.out_gain) == 1.0
    assert desc.startswith("edm2 Precond s / xs") and dtype == ("float16" if torch.cuda.is_available() else "float32")
    # float32_networks switches EDM2's use_fp16 off and back.
    with test_engine.float32_networks(net, gnet):
        assert not net.use_fp16 and not gnet.use_fp16
    assert net.use_fp16 and gnet.use_fp16


def test_report_engine_section_of_a_gpu_run(tmp_path):
    """The report's engine rows, goals and fallbacks, from a pytest-benchmark JSON shaped like a GPU run's."""
    from bench import report

    def bench(batch, case, median, **extra):
        info = dict(case=case, device="cuda", batch=batch, steps=32, guidance=2.0, nets="unet s / xs", net_dtype="float16",
                    first_call_s=2.0, mode="eager" if case in ("edm2_eager", "eager") else "graph", fallback_reason=None)
        info.update(extra)
        return {"group": f"engine cuda batch={batch}", "name": f"test_engine[cuda-b{batch}-{case}]",
                "stats": {"median": median}, "extra_info": info}

    raw = {"benchmarks": [
        bench(1, "edm2_eager", 0.9), bench(1, "eager", 0.6, vs="edm2_eager", max_rel_diff=1e-3, max_rel_diff_fp32=2e-7),
        bench(1, "graph", 0.3, vs="eager", max_rel_diff=1e-3, max_rel_diff_fp32=0.0),
        bench(1, "graph_overlap", 0.25, vs="eager", max_rel_diff=1e-3, max_rel_diff_fp32=0.0),
        bench(64, "edm2_eager", 3.0), bench(64, "eager", 2.9),
        bench(64, "graph", 2.8, mode="eager", fallback_reason="capture failed (RuntimeError: x)"),
    ], "skipped": [{"test": "bench/test_engine.py::test_engine[cuda-b1-graph_overlap_compile]",
                    "reason": "compile case only at batches [64]"}]}
    summary = report.write(raw, tmp_path, device="H100", profile="gpu", command="python -m bench --gpu")
    rows = {(r["batch"], r["case"]): r for r in summary["engine"]}
    assert rows[1, "graph_overlap"]["speedup_vs_edm2_eager"] == pytest.approx(3.6)
    assert rows[1, "graph_overlap"]["speedup_vs_eager"] == pytest.approx(2.4)
    assert summary["engine_skipped"] == [{"device": "cuda", "batch": 1, "case": "graph_overlap_compile",
                                          "reason": "compile case only at batches [64]"}]
    md = (tmp_path / "results.md").read_text()
    assert "- batch 1: fastest `graph_overlap`, 3.60x the edm2-style eager loop; issue 14's goal on an H100 is >= 3x: met." in md
    assert "- batch 64: fastest `graph`, 1.07x the edm2-style eager loop; issue 14's goal on an H100 is >= 1.2x: **not met**." in md
    assert "**eager: capture failed (RuntimeError: x)**" in md
    assert "- `graph_overlap_compile` (batch 1): compile case only at batches [64]" in md


def test_bench_rows_summarize_a_run_that_was_stopped(tmp_path):
    """Each finished benchmark is appended to $AG_BENCH_ROWS as it finishes; bench/report.py --rows
    turns what a stopped run left (no pytest-benchmark JSON) into results marked incomplete."""
    from bench.run import SMOKE_ARGS, SMOKE_ENV

    rows = tmp_path / "rows.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/test_step_ops.py", "-k", "euler and float32 and (copy or ext)", "-q",
         "-p", "no:cacheprovider", "--benchmark-only", *SMOKE_ARGS],
        capture_output=True, text=True, env=_env(**SMOKE_ENV, AG_BENCH_ROWS=str(rows)), cwd=REPO, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in rows.read_text().splitlines()]
    assert "machine_info" in lines[0] and sum("benchmark" in r for r in lines) == 3  # copy, ext, ext_alloc
    with open(rows, "a") as f:
        f.write('{"benchmark": {"group": "cut sho')  # a row cut short by the kill
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "bench/report.py", "--rows", str(rows), "--out-dir", str(out),
                           "--incomplete", "stopped at its time limit"],
                          capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    assert {r["case"] for r in summary["step_ops"]} == {"copy", "ext", "ext_alloc"}
    assert summary["incomplete"] == "stopped at its time limit" and summary["device"]
    assert "**Incomplete: stopped at its time limit.**" in (out / "results.md").read_text()
