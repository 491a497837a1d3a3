"""euler_step / heun_step: every fast backend vs the eager formula, torch.compile of it, and a copy.

Cases of one group run side by side in one session on the same tensors, so their ratios are
meaningful; bytes moved (each input read once, the output written once) go into extra_info for
bench/report.py.  Sizes: 2**12 to 2**26 elements in steps of 4x on a GPU; on a CPU 2**12 to 2**24
in steps of 16x, so the suite stays short there (AG_BENCH_NUMEL="n1,n2,..." overrides both).

The "compile" case is ``torch.compile`` (inductor, static shapes) of the same eager formula; its
first call, the compilation, is timed on its own and recorded as ``compile_s``, and is not part of
the benchmark rounds.  ``python -m bench`` starts with empty inductor/Triton caches, so that is a
cold compile (a plain pytest run uses whatever caches it finds).
"""

import os
import time

import pytest
import torch

import ag_kernels
from ag_kernels import reference
from ag_kernels._backends import _unavailable_reason

W, T_CUR, T_NEXT = 2.1, 1.25, 0.9


def _sizes(device):
    if "AG_BENCH_NUMEL" in os.environ:
        return [int(v) for v in os.environ["AG_BENCH_NUMEL"].split(",")]
    return [2**p for p in range(12, 25, 4)] if device == "cpu" else [2**p for p in range(12, 27, 2)]


# The run's device (CUDA when present, as bench/results/<device-slug> is named after it);
# AG_BENCH_DEVICES="cpu,cuda" measures both.
DEVICES = os.environ.get("AG_BENCH_DEVICES", "cuda" if torch.cuda.is_available() else "cpu").split(",")
CONFIGS = [(dev, n, d) for dev in DEVICES for n in _sizes(dev) for d in (torch.float32, torch.bfloat16)]


def _fast_backends(device):
    names = []
    for b in ("ext", "triton"):
        if device == "cpu" and b == "triton":
            continue  # the Triton interpreter is for checking only
        if _unavailable_reason(b, torch.device(device)) is None:
            names.append(b)
    return names


_DATA = {}


def _data(device, n, d_dtype):
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


def _run(benchmark, device, fn, nbytes, **info):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed():
        fn()
        sync()

    start = time.perf_counter()
    timed()
    if info.get("case") == "compile":
        info["compile_s"] = time.perf_counter() - start  # the first call compiles
    for _ in range(2):  # warm-up: Triton compilation, allocator, page faults of fresh outputs
        timed()
    benchmark.extra_info.update(bytes=nbytes, device=device, **info)
    benchmark(timed)


def _cases(op, device):
    fast = _fast_backends(device)
    return ["copy", "eager", "compile", "eager_noalloc"] + fast + [f"{b}_alloc" for b in fast]


# One compiled function per (op, size, dtype), specialized to its static shapes: raise dynamo's
# recompilation limit so none of them silently falls back to eager.
for _name in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 1024)


def _compiled(op):
    formula = reference.torch_euler_step if op == "euler_step" else reference.torch_heun_step
    # A fresh wrapper per configuration, so every compile is timed from scratch.
    return torch.compile(lambda *args: formula(*args), dynamic=False, fullgraph=True)


def _eager_noalloc(op, t):
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


def _params(op):
    return [
        pytest.param(dev, n, d, case, id=f"{dev}-{n}-{str(d).replace('torch.', '')}-{case}")
        for dev, n, d in CONFIGS
        for case in _cases(op, dev)
    ]


def _bench(benchmark, op, device, n, d_dtype, case):
    t = _data(device, n, d_dtype)
    x, x_euler, d_main, d_guide, out = t["x"], t["x_euler"], t["d_main"], t["d_guide"], t["out"]
    dname = str(d_dtype).replace("torch.", "")
    benchmark.group = f"{op} {device} n={n} d={dname}"
    benchmark.extra_info.update(op=op, n=n, d_dtype=dname)
    inputs = [x, d_main, d_guide] + ([x_euler] if op == "heun_step" else [])
    step_bytes = sum(v.numel() * v.element_size() for v in inputs) + out.numel() * out.element_size()
    if case == "copy":
        _run(benchmark, device, lambda: out.copy_(x), 2 * x.numel() * x.element_size(), case=case)
        return
    if case == "eager":
        # The formula as an eager sampler writes it: cast, lerp, subtract, divide, multiply, add.
        if op == "euler_step":
            fn = lambda: reference.torch_euler_step(x, d_main, d_guide, W, T_CUR, T_NEXT)  # noqa: E731
        else:
            fn = lambda: reference.torch_heun_step(x, x_euler, d_main, d_guide, W, T_CUR, T_NEXT)  # noqa: E731
        _run(benchmark, device, fn, step_bytes, case=case)
        return
    if case == "compile":
        fn_c = _compiled(op)
        if op == "euler_step":
            fn = lambda: fn_c(x, d_main, d_guide, W, T_CUR, T_NEXT)  # noqa: E731
        else:
            fn = lambda: fn_c(x, x_euler, d_main, d_guide, W, T_CUR, T_NEXT)  # noqa: E731
        _run(benchmark, device, fn, step_bytes, case=case)
        return
    if case == "eager_noalloc":
        _run(benchmark, device, _eager_noalloc(op, t), step_bytes, case=case)
        return
    backend, _, alloc = case.partition("_")
    target = None if alloc else out
    if op == "euler_step":
        fn = lambda: ag_kernels.euler_step(x, d_main, d_guide, W, T_CUR, T_NEXT, out=target, backend=backend)  # noqa: E731
    else:
        fn = lambda: ag_kernels.heun_step(x, x_euler, d_main, d_guide, W, T_CUR, T_NEXT, out=target, backend=backend)  # noqa: E731
    _run(benchmark, device, fn, step_bytes, case=case)


@pytest.mark.parametrize("device, n, d_dtype, case", _params("euler_step"))
def test_euler_step(benchmark, device, n, d_dtype, case):
    _bench(benchmark, "euler_step", device, n, d_dtype, case)


@pytest.mark.parametrize("device, n, d_dtype, case", _params("heun_step"))
def test_heun_step(benchmark, device, n, d_dtype, case):
    _bench(benchmark, "heun_step", device, n, d_dtype, case)
