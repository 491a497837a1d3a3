"""Autoguidance and CFG together: the fused three-output Euler step against the same step op by op in torch.

Group "euler_step 3 outputs": D = D_1 + (w - 1)(D_1 - D_0) + (w_cfg - 1)(D_1 - D_u), then the Euler step,
as ``reference.torch_euler_step(..., d_uncond=, cfg_scale=)`` computes it op by op ("eager"), and as one
pass of ``ag_kernels.euler_step(..., d_uncond=, cfg_scale=)`` into a given ``out`` ("ext", "triton") or a
new tensor ("ext_alloc", ...); "copy" (x into out) gives the memory bandwidth the report compares with.

Group "eps euler_step 3 outputs": the networks predict the noise (diffusers' epsilon models), and D_i =
c_x x + c_out eps_i with the same c_x = 1, c_out = -sigma for all three outputs.  Since the blend's weights
sum to 1, blending the raw predictions and converting once gives the same D.  Cases:

* "eager": each prediction converted to D in torch, then the blend and the step op by op;
* "convert_fused": each prediction converted to D in torch (three passes), then the fused step;
* "blend_convert": the fused blend of the raw predictions (``guided_denoise`` with ``d_uncond``), then the
  Euler step in eps form, x + (sigma_next - sigma) eps, as one torch op;
* "multistep_fold": the conversion folded into the coefficients of the fused multistep op, one pass over
  the raw predictions: x_next = (1 + k - k c_x) x - k c_out eps, k = (sigma_next - sigma) / sigma, is
  the multistep update with a = 1 + k - k c_x, b = (-k c_out,) and no history read or written, called as
  a sampler calls it (``PreparedSteps.multistep``: the kernel directly);
* "fused_bound": the fused Euler op on three outputs: what a kernel fusing the conversion too would at
  best cost (it moves the same bytes), measured to see whether writing one would pay.

Sizes: 2**12 to 2**20 elements on a CPU (AG_BENCH_NUMEL overrides), network outputs float32/bfloat16.
"""

from types import SimpleNamespace

import pytest
import torch

import ag_kernels
from ag_kernels.kernels import reference
from bench._common import D_DTYPES, DEVICES, data, dtype_name, fast_backends, params, run, sizes

W, CFG, T_CUR, T_NEXT = 2.0, 7.5, 1.7, 1.1

CONFIGS = [
    (dev, n, d)
    for dev in DEVICES
    for n in sizes("AG_BENCH_NUMEL", dev, cpu=[2**p for p in range(12, 21, 4)], gpu=[2**p for p in range(16, 27, 2)])
    for d in D_DTYPES
]


def _tensors(device, n, d_dtype):
    t = data(device, n, d_dtype)
    if "d_uncond" not in t:
        t["d_uncond"] = (0.7 * t["x"]).to(d_dtype)
    return t


def _setup(benchmark, op, device, n, d_dtype):
    benchmark.group = f"{op} {device} n={n} d={dtype_name(d_dtype)}"
    benchmark.extra_info.update(op=op, n=n, d_dtype=dtype_name(d_dtype))
    t = _tensors(device, n, d_dtype)
    # Each input read once, the output written once.
    nbytes = sum(t[k].numel() * t[k].element_size() for k in ("x", "d_main", "d_guide", "d_uncond", "out"))
    return t, nbytes


def _cases(device, n):
    fast = fast_backends(device)
    return ["copy", "eager"] + fast + [f"{b}_alloc" for b in fast]


@pytest.mark.parametrize("device, n, d_dtype, case", params(CONFIGS, _cases))
def test_euler_three_outputs(benchmark, device, n, d_dtype, case):
    t, nbytes = _setup(benchmark, "euler_step 3 outputs", device, n, d_dtype)
    x, dm, dg, du, out = (t[k] for k in ("x", "d_main", "d_guide", "d_uncond", "out"))
    if case == "copy":
        run(benchmark, device, lambda: out.copy_(x), 2 * x.numel() * x.element_size(), case=case, n=n)
        return
    if case == "eager":
        fn = lambda: reference.torch_euler_step(x, dm, dg, W, T_CUR, T_NEXT, d_uncond=du, cfg_scale=CFG)  # noqa: E731
    else:
        backend, _, alloc = case.partition("_")
        target = None if alloc else out
        fn = lambda: ag_kernels.euler_step(x, dm, dg, W, T_CUR, T_NEXT, out=target, backend=backend,  # noqa: E731
                                           d_uncond=du, cfg_scale=CFG)
    expected = reference.torch_euler_step(x.double(), dm, dg, W, T_CUR, T_NEXT, d_uncond=du, cfg_scale=CFG)
    got = fn()
    assert float((got.double() - expected).abs().max() / expected.abs().max()) <= 1e-6
    run(benchmark, device, fn, nbytes, case=case, n=n)


def _eps_cases(device, n):
    if "ext" not in fast_backends(device):
        return ["eager"]
    return ["eager", "convert_fused", "blend_convert", "multistep_fold", "fused_bound"]


@pytest.mark.parametrize("device, n, d_dtype, case", params(CONFIGS, _eps_cases))
def test_eps_euler_three_outputs(benchmark, device, n, d_dtype, case):
    t, nbytes = _setup(benchmark, "eps euler_step 3 outputs", device, n, d_dtype)
    x, em, eg, eu, out, b1 = (t[k] for k in ("x", "d_main", "d_guide", "d_uncond", "out", "b1"))
    c_out = -T_CUR  # epsilon prediction in EDM form: D = x - sigma eps (c_x = 1)

    def to_d(eps):
        return torch.add(x, eps, alpha=c_out)

    if case == "eager":
        def fn():
            return reference.torch_euler_step(x, to_d(em), to_d(eg), W, T_CUR, T_NEXT, d_uncond=to_d(eu), cfg_scale=CFG)
    elif case == "convert_fused":
        def fn():
            return ag_kernels.euler_step(x, to_d(em), to_d(eg), W, T_CUR, T_NEXT, out=out, backend="ext",
                                         d_uncond=to_d(eu), cfg_scale=CFG)
    elif case == "blend_convert":
        def fn():
            eps = ag_kernels.guided_denoise(em, eg, W, out=b1, backend="ext", d_uncond=eu, cfg_scale=CFG)
            # x + (t_next - t_cur) (x - D) / t_cur with x - D = t_cur eps.
            return torch.add(x, eps, alpha=T_NEXT - T_CUR, out=out)
    elif case == "multistep_fold":
        k = (T_NEXT - T_CUR) / T_CUR
        unused = torch.empty((1,) + tuple(x.shape), dtype=x.dtype, device=x.device)
        step = SimpleNamespace(a=1 + k - k * 1.0, b=(-k * c_out,), read=(), write=-1, corrector=None)  # slot -1: none written
        steps = ag_kernels.PreparedSteps(x, backend="ext")

        def fn():
            return steps.multistep(x, em, eg, W, unused, step, out, d_uncond=eu, cfg_scale=CFG)
    else:
        def fn():
            return ag_kernels.euler_step(x, em, eg, W, T_CUR, T_NEXT, out=out, backend="ext", d_uncond=eu,
                                         cfg_scale=CFG)
    if case != "fused_bound":  # the bound computes another function on the same bytes
        f64 = lambda v: v.double()  # noqa: E731
        d = [f64(x) + c_out * f64(e) for e in (em, eg, eu)]
        expected = reference.torch_euler_step(f64(x), d[0], d[1], W, T_CUR, T_NEXT, d_uncond=d[2], cfg_scale=CFG)
        got = fn()
        assert float((got.double() - expected).abs().max() / expected.abs().max()) <= 1e-5
    run(benchmark, device, fn, nbytes, case=case, n=n)
