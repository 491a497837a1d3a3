"""PyTorch reference for the guided step ops: the fallback backend and the test oracle.

Written in the notation of the EDM sampler (Karras et al. 2022, Algorithm 2) with
autoguidance (Karras et al. 2024, Eq. 1): ``D_w = D_0 + w (D_1 - D_0)``, where ``D_1`` is
the main network's output (``d_main``) and ``D_0`` the guiding network's (``d_guide``).

Every function here evaluates the formula in the dtype of ``x`` (``dtype`` for
``torch_guided_denoise``), after casting the network outputs to it, exactly as the reference
sampler does.  ``guidance``, ``t_cur`` and ``t_next`` are Python floats or 1-D tensors with
one value per sample (dimension 0 of ``x``).  No argument checking happens here: the public
API in :mod:`ag_kernels.kernels.ops` validates before it calls a backend.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "per_sample",
    "torch_guided_denoise",
    "torch_euler_step",
    "torch_heun_step",
    "torch_guided_score",
    "torch_multistep_step",
    "torch_edm_sampler",
    "torch_multistep_sampler",
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


def torch_multistep_step(x, d_main, d_guide, guidance, a, b, previous):
    """A linear multistep update in data-prediction form: (x_next, D_w) with
    x_next = a x + b_0 D_w + b_1 D_{i-1} + b_2 D_{i-2} (``previous`` = [D_{i-1}, D_{i-2}][:len(b) - 1]),
    summed left to right, as every backend does; DPM-Solver++ (Lu et al. 2022) is of this form."""
    D_w = torch_guided_denoise(d_main, d_guide, guidance, x.dtype)
    x_next = a * x + b[0] * D_w
    for b_k, D_k in zip(b[1:], previous):
        x_next = x_next + b_k * D_k
    return x_next, D_w


def _explicit_sigmas(sigmas, dtype, device):
    """An explicit schedule as the sampler's levels: ``dtype`` values on ``device``, a final 0 appended when absent."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).to(dtype=dtype, device=device)
    if sigmas[-1] != 0:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas


def torch_edm_sampler(net, noise, labels=None, gnet=None, num_steps=32, sigma_min=0.002, sigma_max=80, rho=7,
                      guidance=1, S_churn=0, S_min=0, S_max=float("inf"), S_noise=1, dtype=torch.float32,
                      randn_like=torch.randn_like, *, sigmas=None):
    """The EDM Heun sampler with guidance, op by op in plain PyTorch: the eager baseline and oracle.

    Our transcription of the published algorithm (Karras et al. 2022, Algorithm 2, with the
    guided denoiser D_w = D_0 + w (D_1 - D_0) of Karras et al. 2024), with exactly the signature
    of the EDM2 reference ``edm_sampler``; no edm2 code is copied.  Network outputs are cast to
    ``dtype`` before the blend, as the reference does.  :func:`ag_kernels.edm_sampler` is the fast
    drop-in; this one is what the tests and the benchmark compare it with.  ``sigmas``: explicit
    noise levels (unchecked) in place of the Karras schedule, num_steps = their number - 1.
    """

    def guided_denoiser(x, t):
        # D_w = D_0 + w (D_1 - D_0), as a lerp from the guide's output toward the main net's.
        d_main = net(x, t, labels).to(dtype)
        if guidance == 1:
            return d_main
        d_guide = gnet(x, t, labels).to(dtype)
        return d_guide.lerp(d_main, guidance)

    if sigmas is None:
        # Karras et al. (2022), Eq. 5, evaluated in `dtype`, then t_N = 0.
        i = torch.arange(num_steps, dtype=dtype, device=noise.device)
        hi = sigma_max ** (1 / rho)
        lo = sigma_min ** (1 / rho)
        sigmas = (hi + i / (num_steps - 1) * (lo - hi)) ** rho
        sigmas = torch.cat([sigmas, torch.zeros(1, dtype=dtype, device=noise.device)])
    else:
        sigmas = _explicit_sigmas(sigmas, dtype, noise.device)
        num_steps = len(sigmas) - 1

    x = noise.to(dtype) * sigmas[0]
    for step in range(num_steps):
        t_cur = sigmas[step]
        t_next = sigmas[step + 1]

        # Churn: temporarily raise the noise level from t_cur to t_hat.
        if S_churn > 0 and S_min <= t_cur <= S_max:
            gamma = min(S_churn / num_steps, math.sqrt(2) - 1)
            t_hat = t_cur + gamma * t_cur
            x_hat = x + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x)
        else:
            t_hat = t_cur
            x_hat = x

        # Euler step from t_hat to t_next.
        slope = (x_hat - guided_denoiser(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * slope

        # Heun's correction, except on the last step (t_next = 0).
        if step < num_steps - 1:
            slope_next = (x_next - guided_denoiser(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * slope + 0.5 * slope_next)
        x = x_next
    return x


def torch_multistep_sampler(net, noise, labels=None, gnet=None, num_steps=32, sigma_min=0.002, sigma_max=80, rho=7,
                            guidance=1, dtype=torch.float32, solver="dpmpp_2m", *, sigmas=None):
    """DPM-Solver++(2M) or (3M) (Lu et al. 2022) on the guided denoiser, in the paper's notation: the oracle.

    lambda = -log sigma, h = lambda_next - lambda; x_next = (sigma_next / sigma) x - expm1(-h) D', with
    D' = D_w (first order: the first step, and the last one, which lands on sigma = 0: x_next = D_w);
    2M: D' = (1 + 1/(2r)) D_w - D_prev / (2r), r = h_prev / h; 3M: the first-order update plus
    phi_2 d1 - phi_3 d2 from the divided differences of the last three outputs.  One evaluation of
    D_w per schedule point, t_0 > ... > t_{N-1} of Karras et al. (2022, Eq. 5), then t_N = 0, or the
    explicit ``sigmas`` (a final 0 appended when absent).
    """

    def guided_denoiser(x, t):
        d_main = net(x, t, labels).to(dtype)
        if guidance == 1:
            return d_main
        return gnet(x, t, labels).to(dtype).lerp(d_main, guidance)

    i = torch.arange(num_steps, dtype=dtype, device=noise.device)
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    if sigmas is not None:
        sigmas = _explicit_sigmas(sigmas, dtype, noise.device)
        num_steps = len(sigmas) - 1
    else:
        sigmas = (hi + i / max(num_steps - 1, 1) * (lo - hi)) ** rho
        sigmas = torch.cat([sigmas, torch.zeros(1, dtype=dtype, device=noise.device)])

    x = noise.to(dtype) * sigmas[0]
    D_prev = []  # earlier outputs, newest first
    h_prev = []
    for step in range(num_steps):
        t, t_next = float(sigmas[step]), float(sigmas[step + 1])
        D = guided_denoiser(x, sigmas[step])
        if t_next == 0:
            x = D
        else:
            h = math.log(t / t_next)
            x_first = (t_next / t) * x - math.expm1(-h) * D
            if not D_prev:
                x = x_first
            elif solver == "dpmpp_2m":
                r = h_prev[0] / h
                x = (t_next / t) * x - math.expm1(-h) * ((1 + 1 / (2 * r)) * D - (1 / (2 * r)) * D_prev[0])
            else:
                phi_2 = math.expm1(-h) / h + 1
                r0 = h_prev[0] / h
                d1_0 = (D - D_prev[0]) / r0
                if len(D_prev) == 1:
                    x = x_first + phi_2 * d1_0
                else:
                    r1 = h_prev[1] / h
                    d1_1 = (D_prev[0] - D_prev[1]) / r1
                    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                    phi_3 = phi_2 / h - 0.5
                    x = x_first + phi_2 * d1 - phi_3 * d2
            h_prev = [h] + h_prev[:1]
        D_prev = [D] + D_prev[:1]
    return x
