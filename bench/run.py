"""Run the standard benchmark set and write bench/results/<device-slug>/{results.json,results.md,results.png}.

    python -m bench                  # the standard set on this machine's device (CUDA if present)
    python -m bench --smoke          # tiny sizes, minimal rounds: checks the suite end to end (CI)
    python -m bench --out-dir DIR    # write somewhere else
    python -m bench -- -k euler      # extra arguments after -- go to pytest

Runs ``pytest bench --benchmark-only`` in a subprocess (pytest-benchmark: warm-up, several rounds,
medians; all cases of a group side by side in one run), keeps pytest-benchmark's raw JSON next to
the results, and summarizes it with bench/report.py.
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
    "AG_BENCH_STEPS": "8",  # fewer steps cancel to ~1e-5 in float32 for any implementation (see README)
    "AG_BENCH_HOST_NUMEL": "64,4099",
    "AG_BENCH_TOY_BATCHES": "3",
    "AG_BENCH_CHEAP_BATCHES": "2",
    "AG_BENCH_UNET_BATCHES": "2",
    "AG_BENCH_UNET": "cpu-xs,cpu-xs",
    "AG_BENCH_SAMPLER_SECONDS": "0",  # the minimum number of rounds
}
SMOKE_ARGS = ["--benchmark-min-rounds=1", "--benchmark-max-time=0", "--benchmark-warmup=off"]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", help="results folder (default bench/results/<device-slug>)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and one round per case (a check, not a measurement)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from bench import report
    from bench.conftest import device_name, device_slug, main_device

    device = main_device()
    out_dir = Path(args.out_dir) if args.out_dir else BENCH / "results" / device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw_path = out_dir / "pytest_benchmark.json"
    env = dict(os.environ, AG_BENCH_PROFILE="smoke" if args.smoke else "standard")
    env.pop("TRITON_INTERPRET", None)  # bench never times the Triton interpreter
    # Empty compile caches, so the reported torch.compile times are a user's first, cold compile
    # (a warm inductor cache made them 0.1 s instead of 1-5 s).
    cache = tempfile.mkdtemp(prefix="ag_bench_cache_")
    env.update(TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"), TRITON_CACHE_DIR=os.path.join(cache, "triton"))
    if args.smoke:
        env.update(SMOKE_ENV)
    cmd = [sys.executable, "-m", "pytest", str(BENCH), "-q", "-p", "no:cacheprovider", "--benchmark-only",
           f"--benchmark-json={raw_path}", "--benchmark-columns=median,rounds", "--benchmark-sort=name",
           *(SMOKE_ARGS if args.smoke else []), *extra]
    print(f"bench: {device_name(device)} -> {out_dir}", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    minutes = (time.perf_counter() - start) / 60
    if proc.returncode != 0:
        print(f"bench: pytest failed (exit {proc.returncode}); no results written", file=sys.stderr)
        return proc.returncode
    raw = json.loads(raw_path.read_text())
    for b in raw["benchmarks"]:
        b["stats"].pop("data", None)  # every round's time: tens of MB, and the stats keep what matters
    raw_path.write_text(json.dumps(raw, indent=1) + "\n")
    summary = report.write(
        raw, out_dir, profile=env["AG_BENCH_PROFILE"], minutes=round(minutes, 1),
        command="python -m bench" + (" --smoke" if args.smoke else "") + (" -- " + " ".join(extra) if extra else ""),
    )
    print(f"bench: {len(summary['step_ops'])} step-op rows, {len(summary['host_overhead'])} host-overhead rows, "
          f"{len(summary['sampler'])} sampler rows in "
          f"{minutes:.1f} min -> {out_dir / 'results.md'}, results.json, results.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
