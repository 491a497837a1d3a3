"""Host overhead of the public step ops: ag_kernels.<op>(..., out=) vs the raw custom op vs eager into buffers.

For small tensors a step op's time is mostly host work: argument checks, dispatch and the call
into the kernel.  Each group (op, size, network-output dtype) times side by side, on the same
tensors:

* ``public``: ``ag_kernels.euler_step`` / ``heun_step`` with ``out=`` and an explicit fast
  backend ("ext"; "triton" too on CUDA), as a sampler loop calls it;
* ``raw``: that backend's registered custom op called directly,
  ``torch.ops.ag_kernels.<op>(out, x, [x_euler,] d_main, d_guide, None, None, None, g, s, sn)``
  (``torch.ops.ag_kernels_triton`` for Triton): the kernel and the op call, nothing else;
* ``eager_noalloc``: the eager formula into preallocated buffers (bench/_common.py);
* ``compile``: ``torch.compile`` of the eager formula (first call, the compile, timed on its own).

bench/report.py turns them into the host-overhead table: the budget ``1.5 * raw + 3 us`` for
``public`` and whether it is met, and ``public``'s speed-up over ``eager_noalloc`` and ``compile``.

Sizes: 2**6 to 2**16 in steps of 4x, then 2**20 and 2**24 on a CPU; 2**6 to 2**26 in steps of 4x
on a GPU (AG_BENCH_HOST_NUMEL="n1,n2,..." overrides both).  Microsecond calls are left to
pytest-benchmark's calibration (many rounds, several calls a round).  On CUDA every call is
followed by a synchronize, as in test_step_ops.py, so the figures there include it.
"""

import pytest

from bench._common import (
    D_DTYPES, DEVICES, compiled_fn, eager_noalloc_fn, fast_backends, params, public_fn, raw_fn, run, setup,
    sizes, step_bytes,
)

CPU_SIZES = [2**p for p in range(6, 17, 2)] + [2**20, 2**24]
GPU_SIZES = [2**p for p in range(6, 27, 2)]
CONFIGS = [
    (dev, n, d)
    for dev in DEVICES
    for n in sizes("AG_BENCH_HOST_NUMEL", dev, cpu=CPU_SIZES, gpu=GPU_SIZES)
    for d in D_DTYPES
]


def _cases(device, n):
    per_backend = [f"{kind}-{b}" for b in fast_backends(device) for kind in ("public", "raw")]
    return per_backend + ["eager_noalloc", "compile"]


@pytest.mark.parametrize("op", ["euler_step", "heun_step"])
@pytest.mark.parametrize("device, n, d_dtype, case", params(CONFIGS, _cases))
def test_host_overhead(benchmark, op, device, n, d_dtype, case):
    t = setup(benchmark, "host ", op, device, n, d_dtype)
    kind, _, backend = case.partition("-")
    if kind == "public":
        fn = public_fn(op, t, backend, t["out"])
    elif kind == "raw":
        fn = raw_fn(op, t, backend)
    elif kind == "eager_noalloc":
        fn = eager_noalloc_fn(op, t)
    else:
        fn = compiled_fn(op, t)
    run(benchmark, device, fn, step_bytes(op, t), case=kind, backend=backend or None)
