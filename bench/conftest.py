"""Benchmark set-up: record the device, torch/triton versions and date with every run.

Run the standard set with ``python -m bench`` (results under bench/results/<device-slug>/), or
any part with ``python -m pytest bench --benchmark-only --benchmark-json=PATH`` and then
``python bench/report.py PATH --out-dir DIR``.  Triton on CPU tensors (the interpreter) is never
benchmarked: it is a checking aid, not a backend for speed.
"""

import datetime
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
    machine_info["ag_kernels"] = {
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
_FILE_ORDER = ("test_sampler.py", "test_step_ops.py", "test_host_overhead.py", "test_engine.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_FILE_ORDER)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: keeps each file's order


_SKIPPED = []


def pytest_runtest_logreport(report):
    """Remember skipped cases and why, for the report (pytest-benchmark's JSON lists only cases that ran)."""
    if report.skipped and report.when in ("setup", "call"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
        _SKIPPED.append({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")})


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["skipped"] = list(_SKIPPED)
