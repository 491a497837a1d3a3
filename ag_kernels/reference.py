"""PyTorch reference for the guided step ops: the fallback backend and the test oracle.

Written in the notation of the EDM sampler (Karras et al. 2022, Algorithm 2) with
autoguidance (Karras et al. 2024, Eq. 1): ``D_w = D_0 + w (D_1 - D_0)``, where ``D_1`` is
the main network's output (``d_main``) and ``D_0`` the guiding network's (``d_guide``).

Every function here evaluates the formula in the dtype of ``x`` (``dtype`` for
``torch_guided_denoise``), after casting the network outputs to it, exactly as the reference
sampler does.  ``guidance``, ``t_cur`` and ``t_next`` are Python floats or 1-D tensors with
one value per sample (dimension 0 of ``x``).  No argument checking happens here: the public
API in :mod:`ag_kernels.ops` validates before it calls a backend.
"""

from __future__ import annotations

import torch

__all__ = [
    "per_sample",
    "torch_guided_denoise",
    "torch_euler_step",
    "torch_heun_step",
    "torch_guided_score",
]


def per_sample(value, like: torch.Tensor):
    """A float stays a float; a per-sample tensor [B] becomes [B, 1, ..., 1] in ``like``'s dtype."""
    if isinstance(value, torch.Tensor):
        shape = (value.shape[0],) + (1,) * max(like.dim() - 1, 0) if like.dim() else ()
        return value.to(device=like.device, dtype=like.dtype).reshape(shape)
    return value


def torch_guided_denoise(d_main, d_guide, guidance, dtype=torch.float32):
    """D_w = D_0 + w (D_1 - D_0), computed with ``torch.lerp`` in ``dtype``."""
    D_1 = d_main.to(dtype)
    if d_guide is None:
        return D_1.clone() if D_1 is d_main else D_1
    D_0 = d_guide.to(dtype)
    return D_0.lerp(D_1, per_sample(guidance, D_1))


def torch_euler_step(x_hat, d_main, d_guide, guidance, t_cur, t_next):
    """Euler step of the probability-flow ODE: x_hat + (t_next - t_cur) d_cur, d_cur = (x_hat - D_w) / t_cur."""
    D_w = torch_guided_denoise(d_main, d_guide, guidance, x_hat.dtype)
    t_cur, t_next = per_sample(t_cur, x_hat), per_sample(t_next, x_hat)
    d_cur = (x_hat - D_w) / t_cur
    return x_hat + (t_next - t_cur) * d_cur


def torch_heun_step(x_hat, x_euler, d_main, d_guide, guidance, t_cur, t_next):
    """Heun's 2nd-order correction, with D_w evaluated at (x_euler, t_next).

    x_next = x_hat + (t_next - t_cur) (d_cur + d_prime) / 2 with d_prime = (x_euler - D_w) / t_next.
    Since x_euler = x_hat + (t_next - t_cur) d_cur, the term (t_next - t_cur) d_cur equals
    x_euler - x_hat; using it directly instead of recovering d_cur avoids dividing by the step
    t_next - t_cur, which is small at the end of the schedule.
    """
    D_w = torch_guided_denoise(d_main, d_guide, guidance, x_hat.dtype)
    t_cur, t_next = per_sample(t_cur, x_hat), per_sample(t_next, x_hat)
    d_prime = (x_euler - D_w) / t_next
    return x_hat + 0.5 * (x_euler - x_hat) + 0.5 * (t_next - t_cur) * d_prime


def torch_guided_score(x, d_main, d_guide, guidance, sigma):
    """Score of the guided model: (D_w - x) / sigma^2."""
    D_w = torch_guided_denoise(d_main, d_guide, guidance, x.dtype)
    sigma = per_sample(sigma, x)
    return (D_w - x) / (sigma * sigma)
