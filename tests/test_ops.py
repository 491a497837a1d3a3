"""Every backend against the float64 oracle: sizes, dtypes, scalar/per-sample coefficients,
guidance on/off, CFG's third output (d_uncond) on/off, layouts, `out` aliasing, poisoned outputs."""

import pytest
import torch

import ag_kernels
from ag_kernels.commands.selfcheck import karras_sigmas
from _util import (
    BACKENDS, D_DTYPES, DEVICES, OPS, TOL, X_DTYPES, call, make_cfg, make_inputs, make_params, make_uncond, oracle,
    poison, rel_err, require,
)

SMALL_SHAPES = [(1,), (7,), (4099,), (3, 5, 7, 9)]
LARGE_SHAPES = [(1_000_003,), (8, 4, 64, 64), (5, 3, 4099)]
CASES = [  # (coefficient mode, guidance case, CFG case)
    (mode, guide, cfg) for mode in ("scalar", "per_sample", "mixed") for guide in ("guided", "unguided", "w=1")
    for cfg in ("none", "cfg")
] + [(mode, "guided", "cfg=1") for mode in ("scalar", "per_sample")]


def _check(op, backend, device, shape, x_dtype, d_dtype, mode, guide, gen, use_out, strict=False, cfg_case="none"):
    """One call against the oracle.  ``cfg_case``: "none" (no d_uncond), "cfg" (d_uncond with a CFG weight
    drawn like the guidance: a number or per sample), "cfg=1" (a scalar weight 1: d_uncond, all NaN, is not read)."""
    g, s, sn = make_params(mode, shape[0], device, gen)
    x, x_euler, d_main, d_guide = make_inputs(shape, x_dtype, d_dtype, device, gen, s)
    if guide == "unguided":
        d_guide = None
    elif guide == "w=1":
        g = 1.0
    d_uncond, cfg = None, None
    if cfg_case == "cfg":
        d_uncond, cfg = make_uncond(d_main, gen), make_cfg(mode, shape[0], device, gen)
    elif cfg_case == "cfg=1":
        d_uncond, cfg = poison(torch.empty_like(d_main)), 1.0
    out = poison(torch.empty(shape, dtype=x_dtype, device=device)) if use_out else None
    result = call(op, x, x_euler, d_main, d_guide, g, s, sn, backend=backend, out=out, d_uncond=d_uncond, cfg=cfg)
    if use_out:
        assert result is out
    assert result.shape == x.shape and result.dtype == x_dtype and result.device == x.device
    read = d_uncond if cfg_case == "cfg" else None
    expected, scale = oracle(op, x, x_euler, d_main, d_guide, g, s, sn, with_scale=True, d_uncond=read, cfg=cfg)
    err = rel_err(result, expected, None if strict else scale)
    assert err <= TOL[x_dtype], f"{op} {backend} {mode} {guide} {cfg_case}: rel err {err:.3g} > {TOL[x_dtype]:g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
@pytest.mark.parametrize("d_dtype", D_DTYPES, ids=str)
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=str)
def test_matches_oracle(op, backend, device, shape, x_dtype, d_dtype, gen):
    require(backend, device)
    for i, (mode, guide, cfg_case) in enumerate(CASES):
        _check(op, backend, device, shape, x_dtype, d_dtype, mode, guide, gen, use_out=i % 3 == 1, cfg_case=cfg_case)


# In Triton's CPU interpreter the 1-D shape of 10^6 elements (thousands of programs, one code path for
# every op) runs for one op and dtype only: it cost about as much as the rest of this grid.
INTERPRETED_LARGE_1D = ("heun_step", torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=str)
@pytest.mark.parametrize("d_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_large_matches_oracle(op, backend, device, shape, d_dtype, gen):
    """Many programs per launch, tiled per-sample rows with a partial last block, 1-D gathers."""
    require(backend, device)
    if backend == "triton" and device == "cpu" and len(shape) == 1 and (op, d_dtype) != INTERPRETED_LARGE_1D:
        pytest.skip(f"Triton interpreter: the 10^6-element 1-D case runs for {INTERPRETED_LARGE_1D[0]} "
                    f"with {INTERPRETED_LARGE_1D[1]} only (the same kernel path for every op)")
    for mode, cfg_case in (("scalar", "none"), ("per_sample", "none"), ("mixed", "cfg")):
        # strict: the metric, max|out - oracle| / max|oracle|, on large tensors.
        _check(op, backend, device, shape, torch.float32, d_dtype, mode, "guided", gen, use_out=True, strict=True,
               cfg_case=cfg_case)


def _layouts(shape, device):
    """Views of fresh random storage with the given shape and various non-contiguous layouts."""
    n, c, h, w = shape
    return {
        "transposed": lambda t: t.new_empty((n, c, w, h)).copy_(t.transpose(2, 3)).transpose(2, 3),
        "sliced": lambda t: t.new_empty((n, c, h, 2 * w))[..., ::2].copy_(t),
        "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
        "batch_inner": lambda t: t.new_empty((c, h, w, n)).copy_(t.permute(1, 2, 3, 0)).permute(3, 0, 1, 2),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last", "batch_inner", "mixed"])
def test_noncontiguous(op, backend, device, layout, gen):
    require(backend, device)
    shape = (3, 4, 5, 6)
    layouts = _layouts(shape, device)
    for mode, with_cfg in (("scalar", False), ("per_sample", False), ("scalar", True), ("per_sample", True)):
        g, s, sn = make_params(mode, shape[0], device, gen)
        x, x_euler, d_main, d_guide = make_inputs(shape, torch.float32, torch.bfloat16, device, gen, s)
        d_uncond = make_uncond(d_main, gen, torch.float16) if with_cfg else None
        cfg = make_cfg(mode, shape[0], device, gen) if with_cfg else None
        if layout == "mixed":  # every operand in a different layout
            x = layouts["channels_last"](x)
            x_euler = layouts["transposed"](x_euler)
            d_main = layouts["sliced"](d_main)
            d_guide = layouts["batch_inner"](d_guide)
            d_uncond = None if d_uncond is None else layouts["transposed"](d_uncond)
            out = poison(layouts["sliced"](torch.empty(shape, device=device)))
        else:
            x, x_euler, d_main, d_guide = (layouts[layout](t) for t in (x, x_euler, d_main, d_guide))
            d_uncond = None if d_uncond is None else layouts[layout](d_uncond)
            out = poison(layouts[layout](torch.empty(shape, device=device)))
        assert not x.is_contiguous() and not d_main.is_contiguous()
        assert d_uncond is None or not d_uncond.is_contiguous()
        expected = oracle(op, x, x_euler, d_main, d_guide, g, s, sn, with_scale=True, d_uncond=d_uncond, cfg=cfg)
        result = call(op, x, x_euler, d_main, d_guide, g, s, sn, backend=backend, out=out, d_uncond=d_uncond, cfg=cfg)
        assert result is out
        assert rel_err(result, expected) <= TOL[torch.float32]
        fresh = call(op, x, x_euler, d_main, d_guide, g, s, sn, backend=backend, d_uncond=d_uncond, cfg=cfg)
        assert rel_err(fresh, expected) <= TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_expanded_input(op, backend, device, gen):
    """A broadcast (stride-0) network output is read correctly (d_guide, then d_uncond too)."""
    require(backend, device)
    shape = (4, 3, 9)
    g, s, sn = make_params("per_sample", shape[0], device, gen)
    x, x_euler, d_main, _ = make_inputs(shape, torch.float32, torch.float16, device, gen, s)
    d_guide = torch.randn((1, 3, 9), generator=gen).to(device, torch.float16).expand(shape)
    result = call(op, x, x_euler, d_main, d_guide, g, s, sn, backend=backend)
    assert rel_err(result, oracle(op, x, x_euler, d_main, d_guide, g, s, sn, with_scale=True)) <= TOL[torch.float32]
    d_uncond = torch.randn((4, 1, 9), generator=gen).to(device, torch.bfloat16).expand(shape)
    cfg = make_cfg("per_sample", shape[0], device, gen)
    result = call(op, x, x_euler, d_main, d_guide, g, s, sn, backend=backend, d_uncond=d_uncond, cfg=cfg)
    expected = oracle(op, x, x_euler, d_main, d_guide, g, s, sn, with_scale=True, d_uncond=d_uncond, cfg=cfg)
    assert rel_err(result, expected) <= TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["euler_step", "heun_step", "guided_score"])
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=str)
def test_out_aliases_x(op, backend, device, x_dtype, gen):
    """out=x updates in place (and out=x_euler for heun_step)."""
    require(backend, device)
    shape = (5, 3, 33)
    targets = ["x", "x_euler"] if op == "heun_step" else ["x"]
    for target in targets:
        for mode, with_cfg in (("scalar", False), ("per_sample", False), ("mixed", True)):
            g, s, sn = make_params(mode, shape[0], device, gen)
            x, x_euler, d_main, d_guide = make_inputs(shape, x_dtype, torch.bfloat16, device, gen, s)
            d_uncond = make_uncond(d_main, gen) if with_cfg else None
            cfg = make_cfg(mode, shape[0], device, gen) if with_cfg else None
            expected = oracle(op, x, x_euler, d_main, d_guide, g, s, sn, with_scale=True, d_uncond=d_uncond, cfg=cfg)
            out = x if target == "x" else x_euler
            result = call(op, x, x_euler, d_main, d_guide, g, s, sn, backend=backend, out=out, d_uncond=d_uncond,
                          cfg=cfg)
            assert result is out
            assert rel_err(out, expected) <= TOL[x_dtype], f"out={target} {mode} cfg={with_cfg}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["euler_step", "guided_score"])
def test_out_partially_overlaps_x(op, backend, device, gen):
    """out shifted by one element against x in the same storage still gets the right values."""
    require(backend, device)
    n = 1001
    buf = torch.randn(n + 1, generator=gen, dtype=torch.float64).to(device, torch.float32)
    x, out = buf[:-1], buf[1:]
    g, s, sn = make_params("scalar", n, device, gen)
    _, _, d_main, d_guide = make_inputs((n,), torch.float32, torch.float32, device, gen, s)
    expected = oracle(op, x.clone(), None, d_main, d_guide, g, s, sn, with_scale=True)
    result = call(op, x, None, d_main, d_guide, g, s, sn, backend=backend, out=out)
    assert result is out
    assert rel_err(out, expected) <= TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(0,), (0, 4), (2, 0, 3)], ids=str)
def test_empty(op, backend, device, shape, gen):
    require(backend, device)
    g, s, sn = make_params("per_sample", shape[0], device, gen)
    x, x_euler, d_main, d_guide = make_inputs(shape, torch.float32, torch.bfloat16, device, gen, s)
    d_uncond, cfg = make_uncond(d_main, gen), make_cfg("per_sample", shape[0], device, gen)
    for kw in ({}, {"d_uncond": d_uncond, "cfg": cfg}):
        result = call(op, x, x_euler, d_main, d_guide, g, s, sn, backend=backend, **kw)
        assert result.shape == shape and result.dtype == torch.float32 and result.device == x.device
        out = torch.empty(shape, device=device)
        assert call(op, x, x_euler, d_main, d_guide, g, s, sn, backend=backend, out=out, **kw) is out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_guide_not_read_without_guidance(op, backend, device, gen):
    """d_guide=None ignores guidance; scalar guidance 1 never reads d_guide (NaN there stays out).
    The same for d_uncond and cfg_scale, alone and together with the guide."""
    require(backend, device)
    shape = (2, 3, 17)
    g, s, sn = make_params("scalar", shape[0], device, gen)
    x, x_euler, d_main, _ = make_inputs(shape, torch.float32, torch.float16, device, gen, s)
    expected = oracle(op, x, x_euler, d_main, None, 1.0, s, sn, with_scale=True)
    nan_guide = torch.full(shape, float("nan"), dtype=torch.float16, device=device)
    nan_uncond = torch.full(shape, float("nan"), dtype=torch.bfloat16, device=device)
    result = call(op, x, x_euler, d_main, nan_guide, 1.0, s, sn, backend=backend)
    assert rel_err(result, expected) <= TOL[torch.float32]
    result = call(op, x, x_euler, d_main, nan_guide, 1.0, s, sn, backend=backend, d_uncond=nan_uncond, cfg=1)
    assert rel_err(result, expected) <= TOL[torch.float32]
    for ignored in (7.5, None, "ignored"):
        result = call(op, x, x_euler, d_main, None, ignored, s, sn, backend=backend)
        assert rel_err(result, expected) <= TOL[torch.float32]
        result = call(op, x, x_euler, d_main, None, ignored, s, sn, backend=backend, d_uncond=None, cfg=ignored)
        assert rel_err(result, expected) <= TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_d_tensor_coefficients(backend, device, gen):
    """0-d tensors act as per-batch scalars, without reading them on the host."""
    require(backend, device)
    shape = (3, 11)
    s, sn = 1.7, 1.1
    x, x_euler, d_main, d_guide = make_inputs(shape, torch.float32, torch.float32, device, gen, s)
    args = [torch.tensor(v, device=device) for v in (2.1, s, sn)]
    result = ag_kernels.euler_step(x, d_main, d_guide, *args, backend=backend)
    assert rel_err(result, oracle("euler_step", x, x_euler, d_main, d_guide, 2.1, s, sn, with_scale=True)) <= TOL[torch.float32]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_guided_denoise_dtype(backend, device, gen):
    """guided_denoise computes and returns in ``dtype``, whatever the networks' dtype."""
    require(backend, device)
    d_main = torch.randn(257, generator=gen).to(device, torch.bfloat16)
    d_guide = torch.randn(257, generator=gen).to(device, torch.float16)
    for dtype in X_DTYPES:
        result = ag_kernels.guided_denoise(d_main, d_guide, 2.1, dtype=dtype, backend=backend)
        assert result.dtype == dtype
        assert rel_err(result, oracle("guided_denoise", None, None, d_main, d_guide, 2.1, 1.0, 1.0, with_scale=True)) <= TOL[dtype]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=str)
def test_heun_small_sigma(backend, device, x_dtype, gen):
    """Euler then Heun along the EDM schedule down to sigma = 0.002, against a float64 oracle
    that uses the true Euler derivative d_cur = (x_hat - D_w(x_hat)) / t_cur, not the recovered one."""
    require(backend, device)
    steps = 32
    t = karras_sigmas(steps)  # t_0 = 80 ... t_31 = 0.002, t_32 = 0
    shape = (4, 3, 8, 8)
    for k in (0, steps // 2, steps - 3, steps - 2):  # the last pair ends at t = 0.002
        t_cur, t_next = t[k], t[k + 1]
        data = torch.randn(shape, generator=gen, dtype=torch.float64)
        x_hat = (data + t_cur * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device, x_dtype)
        D1, D0 = (data + e * torch.randn(shape, generator=gen, dtype=torch.float64) for e in (0.01, 0.05))
        d_main, d_guide = D1.to(device, torch.bfloat16), D0.to(device, torch.bfloat16)
        x_euler = ag_kernels.euler_step(x_hat, d_main, d_guide, 2.1, t_cur, t_next, backend=backend)
        D1n, D0n = (data + e * torch.randn(shape, generator=gen, dtype=torch.float64) for e in (0.01, 0.05))
        d_main_n, d_guide_n = D1n.to(device, torch.bfloat16), D0n.to(device, torch.bfloat16)
        result = ag_kernels.heun_step(x_hat, x_euler, d_main_n, d_guide_n, 2.1, t_cur, t_next, backend=backend)

        f64 = lambda v: v.to("cpu", torch.float64)  # noqa: E731
        D_w = f64(d_guide) + 2.1 * (f64(d_main) - f64(d_guide))
        d_cur = (f64(x_hat) - D_w) / t_cur
        D_w_n = f64(d_guide_n) + 2.1 * (f64(d_main_n) - f64(d_guide_n))
        d_prime = (f64(x_euler) - D_w_n) / t_next
        expected = f64(x_hat) + (t_next - t_cur) * (d_cur + d_prime) / 2
        err = rel_err(result, expected)
        assert err <= TOL[x_dtype], f"t_cur={t_cur:.4g} t_next={t_next:.4g}: rel err {err:.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_on_cuda_and_cpu(backend, gen):
    """The same inputs on CPU and CUDA give the same result (within tolerance) for each backend."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    require(backend, "cuda")
    shape = (4, 4, 16, 16)
    g, s, sn = make_params("per_sample", shape[0], "cpu", gen)
    x, x_euler, d_main, d_guide = make_inputs(shape, torch.float32, torch.bfloat16, "cpu", gen, s)
    cpu = ag_kernels.euler_step(x, d_main, d_guide, g, s, sn, backend="torch")
    cuda_args = [v.cuda() for v in (x, d_main, d_guide, g, s, sn)]
    gpu = ag_kernels.euler_step(*cuda_args, backend=backend)
    assert rel_err(gpu, cpu) <= 2 * TOL[torch.float32]


@pytest.mark.cuda
def test_64bit_offsets_cuda():
    """A tensor of more than 2**31 elements is processed to its last element (64-bit offsets)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device: on the CPU the Triton interpreter would need > 24 GiB of RAM")
    require("triton", "cuda")
    n = 2**31 + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 20 * 2**30:
        pytest.skip(f"needs 20 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    gen = torch.Generator(device="cuda").manual_seed(torch.initial_seed() % 2**31)  # the test's seed
    x = torch.randn(n, device="cuda", generator=gen)
    d_main = torch.randn(n, device="cuda", generator=gen).to(torch.bfloat16)
    d_guide = torch.randn(n, device="cuda", generator=gen).to(torch.bfloat16)
    windows = [slice(0, 4096), slice(2**31 - 5000, 2**31 + 5000), slice(n - 4096, n)]
    before = [(x[w].clone(), d_main[w].clone(), d_guide[w].clone()) for w in windows]
    ag_kernels.euler_step(x, d_main, d_guide, 2.1, 3.0, 2.0, out=x, backend="triton")
    for w, (xw, dm, dg) in zip(windows, before):
        expected = oracle("euler_step", xw, None, dm, dg, 2.1, 3.0, 2.0)
        assert rel_err(x[w], expected) <= TOL[torch.float32], f"window {w}"
