"""euler_step / heun_step: every fast backend vs the eager formula, torch.compile of it, and a copy.

Cases of one group run side by side in one session on the same tensors, so their ratios are
meaningful; bytes moved (each input read once, the output written once) go into extra_info for
bench/report.py.  Sizes: 2**12 to 2**26 elements in steps of 4x on a GPU; on a CPU 2**12 to 2**24
in steps of 16x, so the suite stays short there (AG_BENCH_NUMEL="n1,n2,..." overrides both).
Network-output dtypes float32 and bfloat16 (AG_BENCH_D_DTYPES adds float16: ``python -m bench --gpu``
measures 2**16 to 2**26 with float32, bfloat16 and float16 and the cases copy, eager, compile,
triton and ext only, AG_BENCH_STEP_CASES).

The "compile" case is ``torch.compile`` (inductor, static shapes) of the same eager formula; its
first call, the compilation, is timed on its own and recorded as ``compile_s``, and is not part of
the benchmark rounds.  ``python -m bench`` starts with empty inductor/Triton caches, so that is a
cold compile (a plain pytest run uses whatever caches it finds).
"""

import os

import pytest

from bench._common import (
    D_DTYPES, DEVICES, compiled_fn, compiled_formula, eager_fn, eager_noalloc_fn, fast_backends, params, public_fn,
    rotation, run_rotating, setup, sizes, step_bytes,
)

CONFIGS = [
    (dev, n, d)
    for dev in DEVICES
    for n in sizes("AG_BENCH_NUMEL", dev, cpu=[2**p for p in range(12, 25, 4)], gpu=[2**p for p in range(12, 27, 2)])
    for d in D_DTYPES
]


#: AG_BENCH_STEP_CASES="copy,eager,compile,triton,ext" keeps only the cases named (the --gpu profile's set).
_ONLY = [c for c in os.environ.get("AG_BENCH_STEP_CASES", "").split(",") if c]


def _cases(device, n):
    fast = fast_backends(device)
    cases = ["copy", "eager", "compile", "eager_noalloc"] + fast + [f"{b}_alloc" for b in fast]
    return [c for c in cases if c in _ONLY] if _ONLY else cases


def _bench(benchmark, op, device, n, d_dtype, case):
    t = setup(benchmark, "", op, device, n, d_dtype)
    sets = rotation(device, n, d_dtype)
    x = t["x"]
    if case == "copy":
        run_rotating(benchmark, device, lambda b: lambda: b["out"].copy_(b["x"]), sets, 2 * x.numel() * x.element_size(),
                     case=case, n=n)
        return
    if case == "eager":
        make = lambda b: eager_fn(op, b)  # noqa: E731
    elif case == "compile":
        compiled = compiled_formula(op)
        make = lambda b: compiled_fn(op, b, compiled)  # noqa: E731
    elif case == "eager_noalloc":
        make = lambda b: eager_noalloc_fn(op, b)  # noqa: E731
    else:
        backend, _, alloc = case.partition("_")
        make = lambda b: public_fn(op, b, backend, None if alloc else b["out"])  # noqa: E731
    run_rotating(benchmark, device, make, sets, step_bytes(op, t), case=case, n=n)


@pytest.mark.parametrize("device, n, d_dtype, case", params(CONFIGS, _cases))
def test_euler_step(benchmark, device, n, d_dtype, case):
    _bench(benchmark, "euler_step", device, n, d_dtype, case)


@pytest.mark.parametrize("device, n, d_dtype, case", params(CONFIGS, _cases))
def test_heun_step(benchmark, device, n, d_dtype, case):
    _bench(benchmark, "heun_step", device, n, d_dtype, case)
