"""Benchmark set-up: record the device, torch/triton versions and date with every run.

Run the standard set with ``python -m bench`` (results under bench/results/<device-slug>/), or
any part with ``python -m pytest bench --benchmark-only --benchmark-json=PATH`` and then
``python bench/report.py PATH --out-dir DIR``.  Triton on CPU tensors (the interpreter) is never
benchmarked: it is a checking aid, not a backend for speed.
"""

import datetime
import json
import os
import platform
import re

import torch


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def main_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_slug(device: str) -> str:
    """A folder name for the device: e.g. nvidia-h100-80gb-hbm3, cpu-amd-epyc-2threads."""
    name = device_name(device)
    if device == "cpu":
        name = f"cpu {re.sub(r' [(].*', '', name)} {torch.get_num_threads()}threads"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["ag_kernels"] = _ag_info()


def _ag_info() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover
        triton_version = None
    try:  # which instruction-set build of the ext CPU kernels ran (default/avx2/avx512)
        from ag_kernels import _C

        cpu_isa = _C._cpu_isa()
    except Exception:  # pragma: no cover - extension missing
        cpu_isa = None
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "cpu": device_name("cpu"),
        "cpu_isa": cpu_isa,
        "cuda": device_name("cuda") if torch.cuda.is_available() else None,
        "device": device_name(main_device()),
        "device_slug": device_slug(main_device()),
        "profile": os.environ.get("AG_BENCH_PROFILE", "standard"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


#: Files in this order (pytest's own is alphabetical): the step ops before the host-overhead cases,
#: so the step ops' torch.compile times stay cold compiles; host overhead reuses the compile cache
#: where sizes coincide (its compile times are not reported).  The engine (whole sampler on UNets) last.
#: $AG_BENCH_FILE_ORDER (comma-separated file names) replaces it: the GPU profile runs the engine first.
_FILE_ORDER = ("test_sampler.py", "test_step_ops.py", "test_host_overhead.py", "test_engine.py")


def file_order():
    """The order of the suite's files: $AG_BENCH_FILE_ORDER's, else _FILE_ORDER."""
    names = [n.strip() for n in os.environ.get("AG_BENCH_FILE_ORDER", "").split(",") if n.strip()]
    return tuple(names) or _FILE_ORDER


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(file_order())}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps each file's order


_SKIPPED = []


def _append_row(record: dict) -> None:
    path = os.environ.get("AG_BENCH_ROWS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()


def pytest_sessionstart(session):
    if os.environ.get("AG_BENCH_ROWS"):
        _append_row({"machine_info": {"ag_kernels": _ag_info()}})


def pytest_runtest_teardown(item, nextitem):
    """With $AG_BENCH_ROWS set, append each finished benchmark as one JSON line and flush it, so a
    run killed at a time limit (bench/gpu_session.sh) still leaves the rows that finished; python -m
    bench summarizes them (bench/report.py --rows) when pytest-benchmark's JSON was never written."""
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    if os.environ.get("AG_BENCH_ROWS") and fixture is not None and getattr(fixture, "stats", None) is not None:
        _append_row({"benchmark": fixture.stats.as_dict(include_data=False)})


def pytest_runtest_logreport(report):
    """Remember skipped cases and why, for the report (pytest-benchmark's JSON lists only cases that ran)."""
    if report.skipped and report.when in ("setup", "call"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        _SKIPPED.append({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")})
        _append_row({"skipped": _SKIPPED[-1]})


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["skipped"] = list(_SKIPPED)
