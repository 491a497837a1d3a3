"""Stand-in for NVlabs/edm2's ``generate_images.py``: the test oracle for ag_kernels.edm_sampler.

Only ``edm_sampler`` is provided, with exactly the reference's signature.  It is our own plain,
eager transcription of the published algorithm (EDM Heun sampler, Karras et al. 2022,
Algorithm 2, with the guided denoiser of Karras et al. 2024); no edm2 code is copied.  The
``verify`` command's tests load this folder as if it were an edm2 checkout.

pytest does not collect this file (its name does not start with ``test_``).
"""

import math

import torch


def edm_sampler(net, noise, labels=None, gnet=None, num_steps=32, sigma_min=0.002, sigma_max=80, rho=7,
                guidance=1, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1, dtype=torch.float32,
                randn_like=torch.randn_like):
    def guided_denoiser(x, t):
        # D_w = D_0 + w (D_1 - D_0), as a lerp from the guide's output toward the main net's.
        d_main = net(x, t, labels).to(dtype)
        if guidance == 1:
            return d_main
        d_guide = gnet(x, t, labels).to(dtype)
        return d_guide.lerp(d_main, guidance)

    # Karras et al. (2022), Eq. 5, evaluated in `dtype`, then t_N = 0.
    i = torch.arange(num_steps, dtype=dtype, device=noise.device)
    hi = sigma_max ** (1 / rho)
    lo = sigma_min ** (1 / rho)
    sigmas = (hi + i / (num_steps - 1) * (lo - hi)) ** rho
    sigmas = torch.cat([sigmas, torch.zeros(1, dtype=dtype, device=noise.device)])

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
