"""Shared test helpers: devices, backends, fresh random inputs and the float64 oracle."""

from __future__ import annotations

import math

import pytest
import torch

import ag_kernels
from ag_kernels.kernels._backends import _unavailable_reason

OPS = ["guided_denoise", "euler_step", "heun_step", "guided_score"]
X_DTYPES = [torch.float32, torch.float64]
D_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
KERNEL_BACKENDS = ["triton", "ext"]
BACKENDS = ["torch"] + KERNEL_BACKENDS

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")],
    ),
]


def cuda_only(reason: str, devices: int = 1):
    """Mark a test ``cuda`` (``-m cuda`` selects it: the GPU session's tests) and skip it, saying
    ``reason``, on a machine with fewer than ``devices`` CUDA devices."""
    missing = not torch.cuda.is_available() or torch.cuda.device_count() < devices

    def mark(fn):
        return pytest.mark.cuda(pytest.mark.skipif(missing, reason=reason)(fn))

    return mark

# max|out - oracle| / max|oracle| allowed, per x dtype (issue 2's numerics): a few ulps, since the
# result is formed by O(1) operations on values of about its scale.  On 1- and 7-element tensors
# the result can cancel to near zero, so there the denominator is the computation's scale (the
# largest term summed, see `oracle`); tests on large tensors use max|oracle| itself.
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def require(backend: str, device: str) -> None:
    """Skip (saying why) when ``backend`` cannot run on ``device`` here."""
    reason = _unavailable_reason(backend, torch.device(device))
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable on {device}: {reason}")


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that any element the op fails to write shows up."""
    return t.fill_(float("nan"))


def rel_err(out: torch.Tensor, ref, scale=None) -> float:
    """max|out - ref| / max|ref|, or / ``scale`` when given; infinite if anything is not finite.

    ``ref`` may be an (oracle, scale) pair as returned by ``oracle(..., with_scale=True)``.
    """
    if isinstance(ref, tuple):
        ref, scale = ref
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    assert out.shape == ref.shape
    if not torch.isfinite(out).all():
        return math.inf
    if scale is None:
        scale = ref.abs().max().item()
    return (out - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def sigma_pair(gen: torch.Generator):
    """A (sigma, sigma_next) pair from the EDM range [0.002, 80], sigma_next < sigma."""
    s = math.exp(math.log(0.002) + torch.rand((), generator=gen).item() * math.log(80 / 0.002))
    return s, s * (0.3 + 0.65 * torch.rand((), generator=gen).item())


def make_params(mode: str, batch: int, device, gen: torch.Generator):
    """guidance, sigma, sigma_next as scalars ("scalar"), tensors ("per_sample") or a mix ("mixed")."""
    s, sn = sigma_pair(gen)
    g = 1.0 + 2.0 * torch.rand((), generator=gen).item()
    if mode == "scalar":
        return g, s, sn
    gv = (0.5 + 2.5 * torch.rand(batch, generator=gen, dtype=torch.float64)).to(device)
    sv = torch.exp(math.log(0.002) + torch.rand(batch, generator=gen, dtype=torch.float64) * math.log(80 / 0.002))
    snv = sv * (0.3 + 0.65 * torch.rand(batch, generator=gen, dtype=torch.float64))
    sv, snv = sv.to(device), snv.to(device)
    if mode == "per_sample":
        return gv.float(), sv.float(), snv  # per-sample tensors of different float dtypes
    # mixed: scalar sigma, per-sample sigma_next below it (a sampler steps down in noise level)
    return gv, s, (s * (0.3 + 0.65 * torch.rand(batch, generator=gen, dtype=torch.float64))).to(device)


def make_cfg(mode: str, batch: int, device, gen: torch.Generator):
    """A CFG weight (cfg_scale) as make_params forms guidance: a number in [1.5, 8] ("scalar"), or per
    sample in [0.5, 8] (float32 for "per_sample", float64 for "mixed")."""
    if mode == "scalar":
        return 1.5 + 6.5 * torch.rand((), generator=gen).item()
    c = (0.5 + 7.5 * torch.rand(batch, generator=gen, dtype=torch.float64)).to(device)
    return c.float() if mode == "per_sample" else c


def make_uncond(d_main: torch.Tensor, gen: torch.Generator, dtype=None) -> torch.Tensor:
    """An unconditional output D_u near d_main (further from the data than D_1), in ``dtype`` (d_main's)."""
    noise = torch.randn(d_main.shape, generator=gen, dtype=torch.float64)
    return (d_main.detach().to("cpu", torch.float64) + 0.5 * noise).to(d_main.device, dtype or d_main.dtype)


def make_inputs(shape, x_dtype, d_dtype, device, gen, sigma):
    """x around data of unit scale with noise of level sigma; D_1 and D_0 near each other."""
    batch = shape[0] if len(shape) else 1
    sig = sigma if not isinstance(sigma, torch.Tensor) else sigma.cpu().double().reshape((batch,) + (1,) * (len(shape) - 1))
    data = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = (data + sig * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device, x_dtype)
    d_main = (data + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device, d_dtype)
    d_guide = (data + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device, d_dtype)
    x_euler = (data + 0.7 * sig * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device, x_dtype)
    return x, x_euler, d_main, d_guide


def _col(v, like):
    if isinstance(v, torch.Tensor):
        return v.detach().to("cpu", torch.float64).reshape((v.shape[0],) + (1,) * (like.dim() - 1))
    return v


def oracle(op, x, x_euler, d_main, d_guide, g, s, sn, with_scale=False, d_uncond=None, cfg=1.0):
    """The issue's formulas in float64 on the CPU (d_cur of Heun recovered from the Euler step).

    The guided denoiser is D = D_1 + (g - 1) (D_1 - D_0) + (cfg - 1) (D_1 - D_u), each term absent
    when its output (d_guide, d_uncond) is None.

    With ``with_scale``, also returns the scale of the computation: the largest magnitude among
    the result and the terms summed to form it.  Rounding errors of any float evaluation are
    relative to that scale; the result alone can cancel to near zero in a 1- or 7-element tensor.
    """
    f = lambda t: None if t is None else t.detach().to("cpu", torch.float64)  # noqa: E731
    x, x_euler, d_main, d_guide, d_uncond = f(x), f(x_euler), f(d_main), f(d_guide), f(d_uncond)
    like = d_main
    g, s, sn, cfg = _col(g, like), _col(s, like), _col(sn, like), _col(cfg, like)
    D_w = d_main if d_guide is None else d_guide + g * (d_main - d_guide)
    terms = [D_w] if d_guide is None else [D_w, d_guide, g * (d_main - d_guide)]
    if d_uncond is not None:
        # The CFG term's rounding is relative to (cfg - 1) times the outputs it subtracts.
        cfg_term = (cfg - 1) * (d_main - d_uncond)
        D_w = D_w + cfg_term
        terms = terms + [D_w, d_main, cfg_term, (cfg - 1) * d_main, (cfg - 1) * d_uncond]
    if op == "guided_denoise":
        result = D_w
    elif op == "euler_step":
        step = (sn - s) * (x - D_w) / s
        result, terms = x + step, terms + [x, step]
    elif op == "heun_step":
        d_cur = (x_euler - x) / (sn - s)
        d_prime = (x_euler - D_w) / sn
        result = x + (sn - s) * (d_cur + d_prime) / 2
        terms = terms + [x, x_euler, (sn - s) * d_prime / 2]
    elif op == "guided_score":
        result = (D_w - x) / s**2
        terms = [t / s**2 for t in terms + [x]]
    else:
        raise ValueError(op)
    if not with_scale:
        return result
    return result, max(t.abs().max().item() for t in terms + [result])


def call(op, x, x_euler, d_main, d_guide, g, s, sn, *, backend, out=None, dtype=None, d_uncond=None, cfg=None):
    """Call public op ``op`` with the arguments it takes (d_uncond and cfg_scale only when given)."""
    kw = {} if d_uncond is None and cfg is None else {"d_uncond": d_uncond, "cfg_scale": 1.0 if cfg is None else cfg}
    if op == "guided_denoise":
        return ag_kernels.guided_denoise(d_main, d_guide, g, dtype=dtype or x.dtype, out=out, backend=backend, **kw)
    if op == "euler_step":
        return ag_kernels.euler_step(x, d_main, d_guide, g, s, sn, out=out, backend=backend, **kw)
    if op == "heun_step":
        return ag_kernels.heun_step(x, x_euler, d_main, d_guide, g, s, sn, out=out, backend=backend, **kw)
    if op == "guided_score":
        return ag_kernels.guided_score(x, d_main, d_guide, g, s, out=out, backend=backend, **kw)
    raise ValueError(op)


def cli(argv, capsys):
    """``python -m ag_kernels ARGV`` in process: (exit status, stdout, stderr's lines without the
    leading and trailing blank ones)."""
    from ag_kernels.commands.main import main

    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()
