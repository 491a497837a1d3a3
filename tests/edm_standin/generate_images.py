"""Stand-in for NVlabs/edm2's ``generate_images.py``: the test oracle for ag_kernels.edm_sampler.

Only ``edm_sampler`` is provided, with exactly the reference's signature: it is
:func:`ag_kernels.reference.torch_edm_sampler`, our own plain, eager transcription of the
published algorithm (EDM Heun sampler, Karras et al. 2022, Algorithm 2, with the guided denoiser
of Karras et al. 2024); no edm2 code is copied.  The ``verify`` command's tests load this folder
as if it were an edm2 checkout.

pytest does not collect this file (its name does not start with ``test_``).
"""

import torch

from ag_kernels.reference import torch_edm_sampler


def edm_sampler(net, noise, labels=None, gnet=None, num_steps=32, sigma_min=0.002, sigma_max=80, rho=7,
                guidance=1, S_churn=0, S_min=0, S_max=float("inf"), S_noise=1, dtype=torch.float32,
                randn_like=torch.randn_like):
    return torch_edm_sampler(net, noise, labels, gnet, num_steps, sigma_min, sigma_max, rho, guidance,
                             S_churn, S_min, S_max, S_noise, dtype, randn_like)
