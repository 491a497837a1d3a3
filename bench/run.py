"""Run the standard benchmark set and write bench/results/<device-slug>/{results.json,results.md,results.png}.

    python -m bench                  # the standard set on this machine's device (CUDA if present)
    python -m bench --smoke          # tiny sizes, minimal rounds: checks the suite end to end (CI)
    python -m bench --gpu            # the GPU figures of issue 14 (needs CUDA; meant to take < 8 min on an H100)
    python -m bench --gpu --edm2 PATH   # ... with NVlabs/edm2's own networks from that checkout
    python -m bench --out-dir DIR    # write somewhere else
    python -m bench -- -k euler      # extra arguments after -- go to pytest

Runs ``pytest bench --benchmark-only`` in a subprocess (pytest-benchmark: warm-up, several rounds,
medians; all cases of a group side by side in one run), keeps pytest-benchmark's raw JSON next to
the results, and summarizes it with bench/report.py.  When pytest fails, what ran is still
summarized, marked incomplete, and the exit status is pytest's.

The GPU profile (``--gpu``, about 4 minutes on an H100/H200) runs two suites, the whole sampler
first (the figures a device session exists for, kept if the session's time runs out in the step
ops): the whole guided sampler (bench/test_engine.py) on EDM2-shaped networks (S main, XS guide,
float16, 4x64x64 latents, batches 1, 8 and 64, 32 Heun steps, guidance 2.0): the edm2-style eager
loop against GuidedSampler eager, graph and graph+overlap (the compile case is left out:
AG_BENCH_ENGINE_COMPILE_BATCHES=64 adds it); then the step ops (bench/test_step_ops.py) at 2^16,
2^20, 2^22, 2^24 and 2^26 elements, float32 x, float32/bfloat16 network outputs, cases copy, eager,
compile, triton and ext, timed by CUDA events over rotating buffers.
The host-overhead and old sampler suites are left out (``python -m bench`` runs them).  Without
CUDA it exits with status 2.  ``--edm2 PATH`` (or $AG_EDM2_PATH) makes the engine suite use
``training.networks_edm2.Precond`` from that checkout (random weights) instead of bench/unet.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

#: Environment of the smoke profile: the smallest sizes that still run every case and code path.
SMOKE_ENV = {
    "AG_BENCH_NUMEL": "4099",
    "AG_BENCH_STEPS": "8",  # fewer steps cancel to ~1e-5 in float32 for any implementation (see docs/verification.md)
    "AG_BENCH_HOST_NUMEL": "64,4099",
    "AG_BENCH_TOY_BATCHES": "3",
    "AG_BENCH_CHEAP_BATCHES": "2",
    "AG_BENCH_UNET_BATCHES": "2",
    "AG_BENCH_UNET": "cpu-xs,cpu-xs",
    "AG_BENCH_SAMPLER_SECONDS": "0",  # the minimum number of rounds
    # A smoke run checks, it does not measure: on a busy 2-core machine OpenMP's spin-waiting
    # threads made one run of the tiny UNet sampler take 37 s instead of under 1 s.
    "OMP_WAIT_POLICY": "PASSIVE",
}
SMOKE_ARGS = ["--benchmark-min-rounds=1", "--benchmark-max-time=0", "--benchmark-warmup=off"]
#: The smoke profile's engine suite (bench/test_engine.py): the tiny UNet, one batch, 8 steps
#: (float32 agreement within 1e-5 needs more than ~4 steps, see docs/verification.md).
SMOKE_ENV.update({
    "AG_BENCH_ENGINE_BATCHES": "2",
    "AG_BENCH_ENGINE_NETS": "cpu-xs,cpu-xs",
    "AG_BENCH_ENGINE_COMPILE_BATCHES": "2",  # the compile case runs where graphs do (CUDA)
    "AG_BENCH_ENGINE_FP32_BATCHES": "2",
    "AG_BENCH_ENGINE_SECONDS": "0",
})

#: The GPU profile (--gpu): issue 14's figures, sized to about 4 minutes on an H100/H200 (the
#: device session's budget, bench/gpu_session.sh).  Left out against issue 14's full set: the
#: step ops at 2^18 (between 2^16 and 2^20, all three latency-bound) and with float16 network
#: outputs (the same bytes and conversion cost as bfloat16), and the engine's compile case
#: (compiling two UNets is expected to take minutes per batch shape; AG_BENCH_ENGINE_COMPILE_BATCHES=64
#: brings it back).
GPU_FILES = ("test_engine.py", "test_step_ops.py")
GPU_ENV = {
    "AG_BENCH_FILE_ORDER": ",".join(GPU_FILES),  # the engine first (bench/conftest.py orders the files)
    "AG_BENCH_NUMEL": ",".join(str(2**p) for p in (16, 20, 22, 24, 26)),
    "AG_BENCH_D_DTYPES": "float32,bfloat16",
    "AG_BENCH_STEP_CASES": "copy,eager,compile,triton,ext",
    "AG_BENCH_ENGINE_COMPILE_BATCHES": "",
    "AG_BENCH_ENGINE_SECONDS": "1",
}
#: Step ops on a GPU take microseconds to a few milliseconds a call: a quarter second of rounds each.
GPU_ARGS = ["--benchmark-max-time=0.25"]
NO_CUDA = "bench --gpu: no CUDA device (torch.cuda.is_available() is False)"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", help="results folder (default bench/results/<device-slug>)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and one round per case (a check, not a measurement)")
    parser.add_argument("--gpu", action="store_true",
                        help="the GPU profile: step ops at 2^16..2^26 and the whole sampler on EDM2-shaped networks (needs CUDA)")
    parser.add_argument("--edm2", metavar="PATH",
                        help="NVlabs/edm2 checkout: the engine suite samples with its Precond networks (default $AG_EDM2_PATH)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    import torch

    if args.gpu and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    from ag_kernels.models.edm2 import EDM2Error, find_checkout

    try:
        edm2 = find_checkout(args.edm2)  # None: neither --edm2 nor $AG_EDM2_PATH
    except EDM2Error as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2

    from bench import report
    from bench.conftest import device_name, device_slug, main_device

    device = main_device()
    out_dir = Path(args.out_dir) if args.out_dir else BENCH / "results" / device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw_path = out_dir / "pytest_benchmark.json"
    raw_path.unlink(missing_ok=True)  # a failed run must not summarize an old file
    rows_path = out_dir / "rows.jsonl"
    rows_path.unlink(missing_ok=True)
    profile = "-".join([p for p, on in (("gpu", args.gpu), ("smoke", args.smoke)) if on]) or "standard"
    env = dict(os.environ, AG_BENCH_PROFILE=profile)
    env.pop("TRITON_INTERPRET", None)  # bench never times the Triton interpreter
    env.pop("AG_EDM2_PATH", None)
    # Each finished benchmark is also appended to rows.jsonl as it finishes: what a killed run leaves.
    env["AG_BENCH_ROWS"] = str(rows_path)
    if edm2 is not None:
        env["AG_EDM2_PATH"] = str(edm2)
    # Empty compile caches, so the reported torch.compile times are a user's first, cold compile
    # (a warm inductor cache made them 0.1 s instead of 1-5 s).
    cache = tempfile.mkdtemp(prefix="ag_bench_cache_")
    env.update(TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"), TRITON_CACHE_DIR=os.path.join(cache, "triton"))
    if args.gpu:
        env.update(GPU_ENV)
    if args.smoke:
        env.update(SMOKE_ENV)
    targets = [str(BENCH / f) for f in GPU_FILES] if args.gpu else [str(BENCH)]
    cmd = [sys.executable, "-m", "pytest", *targets, "-q", "-rs", "-p", "no:cacheprovider", "--benchmark-only",
           f"--benchmark-json={raw_path}", "--benchmark-columns=median,rounds", "--benchmark-sort=name",
           *(GPU_ARGS if args.gpu else []), *(SMOKE_ARGS if args.smoke else []), *extra]
    print(f"bench: {device_name(device)} -> {out_dir}" + (f" (EDM2 networks from {edm2})" if edm2 else ""), flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    minutes = (time.perf_counter() - start) / 60
    if proc.returncode != 0 and not raw_path.is_file():
        raw = report.read_rows(rows_path) if rows_path.is_file() else {"benchmarks": []}
        if not raw["benchmarks"]:
            print(f"bench: pytest failed (exit {proc.returncode}); no results written", file=sys.stderr)
            return proc.returncode
        raw_path.write_text(json.dumps(raw, indent=1) + "\n")  # the rows that finished, as pytest-benchmark's JSON
    raw = json.loads(raw_path.read_text())
    rows_path.unlink(missing_ok=True)  # pytest-benchmark's JSON holds every row
    for b in raw["benchmarks"]:
        b["stats"].pop("data", None)  # every round's time: tens of MB, and the stats keep what matters
    raw_path.write_text(json.dumps(raw, indent=1) + "\n")
    flags = "".join(f" {f}" for f, on in (("--gpu", args.gpu), ("--smoke", args.smoke)) if on)
    if args.edm2:
        flags += f" --edm2 {args.edm2}"
    summary = report.write(
        raw, out_dir, profile=profile, minutes=round(minutes, 1),
        command="python -m bench" + flags + (" -- " + " ".join(extra) if extra else ""),
        incomplete=f"pytest exited {proc.returncode}" if proc.returncode != 0 else None,
    )
    print(f"bench: {len(summary['step_ops'])} step-op rows, {len(summary['host_overhead'])} host-overhead rows, "
          f"{len(summary['sampler'])} sampler rows, {len(summary['engine'])} engine rows in "
          f"{minutes:.1f} min -> {out_dir / 'results.md'}, results.json, results.png")
    if proc.returncode != 0:
        print(f"bench: pytest failed (exit {proc.returncode}); the results of what ran are written, marked incomplete",
              file=sys.stderr)
        return proc.returncode
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
