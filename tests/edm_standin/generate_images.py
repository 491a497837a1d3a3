"""Stand-in for NVlabs/edm2's ``generate_images.py``: the test oracle for ag_kernels' sampler and generator.

``edm_sampler`` has exactly the reference's signature: it is
:func:`ag_kernels.kernels.reference.torch_edm_sampler`, our own plain, eager transcription of the
published algorithm (EDM Heun sampler, Karras et al. 2022, Algorithm 2, with the guided denoiser
of Karras et al. 2024).  ``generate_images`` follows the reference generator's documented
behaviour, written here from that description (no edm2 code is copied): snapshot pickles
``{"ema": net, "encoder": ...}`` (no encoder: the pixel encoder), one generator per seed (seed
mod 2**32) drawing that sample's noise and then its class, the batch split of numpy's
array_split into a multiple of the process count, rank r taking every world-th batch, and
``NNNNNN.png`` files, flat or in ``NNN000/`` folders.  The ``verify`` command's tests load
this folder as if it were an edm2 checkout (with dnnlib/, torch_utils/ and training/ here).

pytest does not collect this file (its name does not start with ``test_``).
"""

import torch

from ag_kernels.kernels.reference import torch_edm_sampler


def edm_sampler(net, noise, labels=None, gnet=None, num_steps=32, sigma_min=0.002, sigma_max=80, rho=7,
                guidance=1, S_churn=0, S_min=0, S_max=float("inf"), S_noise=1, dtype=torch.float32,
                randn_like=torch.randn_like):
    return torch_edm_sampler(net, noise, labels, gnet, num_steps, sigma_min, sigma_max, rho, guidance,
                             S_churn, S_min, S_max, S_noise, dtype, randn_like)


def generate_images(net, gnet=None, encoder=None, outdir=None, subdirs=False, seeds=range(16, 24), class_idx=None,
                    max_batch_size=32, encoder_batch_size=4, verbose=True, device=torch.device("cuda"),
                    sampler_fn=edm_sampler, **sampler_kwargs):
    # Imported here, so that importing this file for edm_sampler alone needs none of them.
    import os
    import pickle
    from types import SimpleNamespace

    import numpy as np
    import PIL.Image
    import torch.distributed as dist

    def load(path):
        with open(path, "rb") as f:
            return pickle.load(f)

    if isinstance(net, str):
        data = load(net)
        net = data["ema"].to(device)
        if encoder is None:
            encoder = data.get("encoder")
            if encoder is None:
                from training.encoders import StandardRGBEncoder

                encoder = StandardRGBEncoder()
    if isinstance(gnet, str):
        gnet = load(gnet)["ema"].to(device)
    if gnet is None:
        gnet = net
    encoder.init(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.barrier()

    count = max(-(-len(seeds) // (max_batch_size * world)), 1) * world
    for indices in np.array_split(np.arange(len(seeds)), count)[rank::world]:
        batch = [seeds[i] for i in indices]
        images = None
        if batch:
            gens = [torch.Generator(device).manual_seed(int(s) % (1 << 32)) for s in batch]
            shape = [net.img_channels, net.img_resolution, net.img_resolution]
            noise = torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])
            labels = None
            if net.label_dim > 0:
                classes = torch.stack([torch.randint(net.label_dim, size=[], generator=g, device=device) for g in gens])
                labels = torch.eye(net.label_dim, device=device)[classes]
                if class_idx is not None:
                    labels[:, :] = 0
                    labels[:, class_idx] = 1

            def randn_like(x):
                return torch.stack([torch.randn(x.shape[1:], dtype=x.dtype, device=x.device, generator=g)
                                    for g in gens])

            samples = sampler_fn(net=net, noise=noise, labels=labels, gnet=gnet, randn_like=randn_like,
                                 **sampler_kwargs)
            images = encoder.decode(samples)
            if outdir is not None:
                for seed, image in zip(batch, images.permute(0, 2, 3, 1).cpu().numpy()):
                    folder = os.path.join(outdir, f"{seed - seed % 1000:06d}") if subdirs else outdir
                    os.makedirs(folder, exist_ok=True)
                    PIL.Image.fromarray(image, "RGB").save(os.path.join(folder, f"{seed:06d}.png"))
        dist.barrier()
        yield SimpleNamespace(seeds=batch, images=images)
