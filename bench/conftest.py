"""Benchmark set-up: record the device, torch/triton versions and the bytes each case must move.

Run: ``python -m pytest bench --benchmark-only --benchmark-json=PATH`` then
``python bench/report.py PATH`` for the GB/s table.  Triton on CPU tensors (the interpreter)
is never benchmarked: it is a checking aid, not a backend for speed.
"""

import datetime
import platform

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


def pytest_benchmark_update_machine_info(config, machine_info):
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover
        triton_version = None
    machine_info["ag_kernels"] = {
        "torch": torch.__version__,
        "triton": triton_version,
        "cpu": device_name("cpu"),
        "cuda": device_name("cuda") if torch.cuda.is_available() else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
