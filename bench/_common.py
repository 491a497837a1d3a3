"""Shared pieces of the step-op benchmarks (test_step_ops.py, test_host_overhead.py).

One place for the test tensors, the timed call, the eager formula into preallocated buffers and
``torch.compile`` of the formula, so both files time exactly the same cases.

On a GPU the step ops are timed by :func:`run_rotating`: many launches between two CUDA events
(no synchronize per launch, which would time launch latency), cycling through enough sets of
buffers that one launch does not find the previous launch's data in L2.
"""

import math
import os
import statistics
import time

import pytest
import torch

import ag_kernels
from ag_kernels.kernels import reference
from ag_kernels.kernels._backends import _unavailable_reason

W, T_CUR, T_NEXT = 2.1, 1.25, 0.9

def _dtypes(names: str) -> tuple:
    out = []
    for name in names.split(","):
        dtype = getattr(torch, name.strip(), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"AG_BENCH_D_DTYPES: unknown dtype {name!r} (e.g. float32,bfloat16,float16)")
        out.append(dtype)
    return tuple(out)


#: Network-output dtypes of the step-op configurations; AG_BENCH_D_DTYPES="float32,bfloat16,float16"
#: overrides (the --gpu profile measures all three).
D_DTYPES = _dtypes(os.environ.get("AG_BENCH_D_DTYPES", "float32,bfloat16"))

# The run's device (CUDA when present, as bench/results/<device-slug> is named after it);
# AG_BENCH_DEVICES="cpu,cuda" measures both.
DEVICES = os.environ.get("AG_BENCH_DEVICES", "cuda" if torch.cuda.is_available() else "cpu").split(",")


def sizes(env: str, device: str, cpu: list, gpu: list) -> list:
    """Element counts: ``env`` ("n1,n2,...") if set, else the device's default list."""
    if env in os.environ:
        return [int(v) for v in os.environ[env].split(",")]
    return cpu if device == "cpu" else gpu


def fast_backends(device):
    names = []
    for b in ("ext", "triton"):
        if device == "cpu" and b == "triton":
            continue  # the Triton interpreter is for checking only
        if _unavailable_reason(b, torch.device(device)) is None:
            names.append(b)
    return names


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def params(configs, cases):
    """pytest params (device, n, d_dtype, case) for every configuration and each of ``cases(device, n)``."""
    return [
        pytest.param(dev, n, d, case, id=f"{dev}-{n}-{dtype_name(d)}-{case}")
        for dev, n, d in configs
        for case in cases(dev, n)
    ]


_DATA = {}


def data(device, n, d_dtype):
    key = (device, n, d_dtype)
    if key not in _DATA:
        _DATA.clear()  # one configuration in memory at a time
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(n, generator=gen, device=device)
        d_main = (0.9 * x).to(d_dtype)
        d_guide = (0.8 * x).to(d_dtype)
        x_euler = 0.7 * x
        _DATA[key] = dict(
            x=x, x_euler=x_euler, d_main=d_main, d_guide=d_guide, out=torch.empty_like(x),
            b1=torch.empty_like(x), b2=torch.empty_like(x),
        )
    return _DATA[key]


#: Below this many elements a GPU step op takes a few microseconds: launch latency, not memory
#: bandwidth, sets its time, and the report labels such rows latency-bound.
LATENCY_BOUND_N = 2**22
#: Per timed round on a GPU: at least this many launches, and every buffer set at least twice.
GPU_LAUNCHES = 64
#: Timed rounds per GPU case (each a block of launches between two events), after one warm-up round.
GPU_ROUNDS = 10


def _l2_bytes() -> int:
    # The device's L2 (50 MB on an H100, 60 MB on an H200); 64 MB if torch does not say.
    return int(getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0) or 64 << 20)


def _set_bytes(t) -> int:
    return sum(v.numel() * v.element_size() for v in t.values())


def rotation(device, n, d_dtype) -> list:
    """Buffer sets for one configuration: one on a CPU; on a GPU as many as make up at least four
    times the L2 (at least two, at most 512), so each launch reads its operands from memory."""
    first = data(device, n, d_dtype)
    if device != "cuda":
        return [first]
    count = min(512, max(2, math.ceil(4 * _l2_bytes() / _set_bytes(first))))
    key = (device, n, d_dtype, "rotation")
    if _DATA.get(key) is None or len(_DATA[key]) != count:
        sets = [first]
        for i in range(1, count):
            # Same values in fresh memory: every set computes the same result.
            sets.append({k: v.clone() for k, v in first.items()})
        _DATA[key] = sets
    return _DATA[key]


def run_rotating(benchmark, device, make_fn, sets, nbytes, **info):
    """Time ``make_fn(t)`` (a call on buffer set t): on a CPU as :func:`run`; on a GPU by CUDA events.

    On a GPU each round is ``GPU_LAUNCHES`` or more launches cycling through ``sets``, between two
    events recorded on the stream and read after one synchronize; the per-launch time of each
    round goes into ``extra_info["event_times_s"]`` and their median into ``event_median_s`` (what
    bench/report.py reports); pytest-benchmark's own median is the wall time of a whole round.
    """
    if device != "cuda":
        run(benchmark, device, make_fn(sets[0]), nbytes, **info)
        return
    fns = [make_fn(t) for t in sets]
    start = time.perf_counter()
    fns[0]()
    torch.cuda.synchronize()
    if info.get("case") == "compile":
        info["compile_s"] = time.perf_counter() - start  # the first call compiles
    launches = max(GPU_LAUNCHES, 2 * len(fns))
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []

    def block():
        begin.record()
        for i in range(launches):
            fns[i % len(fns)]()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end) * 1e-3 / launches)

    block()  # warm-up: Triton compiles, allocator, first touch of every set
    samples.clear()
    benchmark.extra_info.update(bytes=nbytes, device=device, timing="cuda-events", launches_per_round=launches,
                                buffer_sets=len(fns), rotating_bytes=len(fns) * _set_bytes(sets[0]),
                                latency_bound=info["n"] < LATENCY_BOUND_N if "n" in info else None, **info)
    benchmark.pedantic(block, rounds=GPU_ROUNDS, iterations=1)
    benchmark.extra_info.update(event_times_s=list(samples), event_median_s=statistics.median(samples))


def setup(benchmark, prefix, op, device, n, d_dtype):
    """The tensors of one configuration; sets the benchmark group (``prefix`` + op, device, n, dtype)."""
    dname = dtype_name(d_dtype)
    benchmark.group = f"{prefix}{op} {device} n={n} d={dname}"
    benchmark.extra_info.update(op=op, n=n, d_dtype=dname)
    return data(device, n, d_dtype)


def step_bytes(op, t):
    """Bytes a step must move: each input read once, the output written once."""
    inputs = [t["x"], t["d_main"], t["d_guide"]] + ([t["x_euler"]] if op == "heun_step" else [])
    out = t["out"]
    return sum(v.numel() * v.element_size() for v in inputs) + out.numel() * out.element_size()


def run(benchmark, device, fn, nbytes, **info):
    """Time ``fn`` with pytest-benchmark (calibrated rounds and iterations), after a few warm-up calls."""
    if device == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn  # no wrapper: it would add to microsecond calls

    start = time.perf_counter()
    timed()
    if info.get("case") == "compile":
        info["compile_s"] = time.perf_counter() - start  # the first call compiles
    for _ in range(2):  # warm-up: Triton compilation, allocator, page faults of fresh outputs
        timed()
    benchmark.extra_info.update(bytes=nbytes, device=device, **info)
    benchmark(timed)


# One compiled function per (op, size, dtype), specialized to its static shapes: raise dynamo's
# recompilation limit so none of them silently falls back to eager.
for _name in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 1024)


def eager_fn(op, t):
    """The formula as an eager sampler writes it: cast, lerp, subtract, divide, multiply, add."""
    return _formula_call(op, t, reference.torch_euler_step if op == "euler_step" else reference.torch_heun_step)


def compiled_fn(op, t, compiled=None):
    """``torch.compile`` (inductor, static shapes) of the eager formula; its first call compiles.

    ``compiled`` (from :func:`compiled_formula`) shares one compiled function between buffer sets.
    """
    return _formula_call(op, t, compiled if compiled is not None else compiled_formula(op))


def compiled_formula(op):
    formula = reference.torch_euler_step if op == "euler_step" else reference.torch_heun_step
    # A fresh wrapper per configuration, so every compile is timed from scratch.
    return torch.compile(lambda *args: formula(*args), dynamic=False, fullgraph=True)


def _formula_call(op, t, formula):
    x, x_euler, d_main, d_guide = t["x"], t["x_euler"], t["d_main"], t["d_guide"]
    if op == "euler_step":
        return lambda: formula(x, d_main, d_guide, W, T_CUR, T_NEXT)
    return lambda: formula(x, x_euler, d_main, d_guide, W, T_CUR, T_NEXT)


def public_fn(op, t, backend, out):
    """The public op ``ag_kernels.<op>(..., out=out, backend=backend)`` (``out=None``: a new tensor)."""
    x, x_euler, d_main, d_guide = t["x"], t["x_euler"], t["d_main"], t["d_guide"]
    if op == "euler_step":
        return lambda: ag_kernels.euler_step(x, d_main, d_guide, W, T_CUR, T_NEXT, out=out, backend=backend)
    return lambda: ag_kernels.heun_step(x, x_euler, d_main, d_guide, W, T_CUR, T_NEXT, out=out, backend=backend)


def raw_fn(op, t, backend):
    """The backend's registered custom op called directly (schemas in csrc/ag_kernels.cpp): no checks, no dispatch."""
    if backend == "triton":
        from ag_kernels.kernels import triton_kernels  # noqa: F401  (registers torch.ops.ag_kernels_triton.*)

        kernel = getattr(torch.ops.ag_kernels_triton, op)
    else:
        kernel = getattr(torch.ops.ag_kernels, op)
    x, x_euler, d_main, d_guide, out = t["x"], t["x_euler"], t["d_main"], t["d_guide"], t["out"]
    if op == "euler_step":
        return lambda: kernel(out, x, d_main, d_guide, None, None, None, W, T_CUR, T_NEXT)
    return lambda: kernel(out, x, x_euler, d_main, d_guide, None, None, None, W, T_CUR, T_NEXT)


def eager_noalloc_fn(op, t):
    """The same eager op sequence into preallocated buffers: what fusion saves, allocator aside."""
    x, x_euler, d_main, d_guide, out, b1, b2 = (t[k] for k in ("x", "x_euler", "d_main", "d_guide", "out", "b1", "b2"))
    cast = d_main.dtype != x.dtype

    def fn():
        D_0 = b1.copy_(d_guide) if cast else d_guide
        D_1 = b2.copy_(d_main) if cast else d_main
        D_w = torch.lerp(D_0, D_1, W, out=b1)
        if op == "euler_step":
            d_cur = torch.sub(x, D_w, out=b1).div_(T_CUR)
            torch.add(x, d_cur.mul_(T_NEXT - T_CUR), out=out)
        else:
            d_prime = torch.sub(x_euler, D_w, out=b1).div_(T_NEXT)
            half_euler = torch.sub(x_euler, x, out=b2).mul_(0.5).add_(x)
            torch.add(half_euler, d_prime.mul_(0.5 * (T_NEXT - T_CUR)), out=out)

    return fn
