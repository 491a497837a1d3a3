"""Worker of tests/test_edm2_real.py, run in a subprocess with a real NVlabs/edm2 checkout at $AG_EDM2_PATH.

Each test runs one subcommand in a fresh process, so the checkout's modules (``dnnlib``,
``torch_utils``, ``training``) never enter the pytest process.  No EDM2 code is copied here: all
of it is imported from the checkout.  Prints one JSON object (the figures) on its last line.

    python tests/_edm2_real_worker.py sampler WORKDIR   # edm_sampler: ours, the stand-in, the checkout's
    python tests/_edm2_real_worker.py latent WORKDIR    # a latent snapshot through a real diffusers VAE
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import sys
from pathlib import Path

import torch

import ag_kernels
from ag_kernels.commands import verify_generate as vg
from ag_kernels.commands._checkout import load_reference_module
from ag_kernels.kernels.reference import torch_edm_sampler
from ag_kernels.models.edm2 import find_checkout, use_checkout

LABEL_DIM = vg.LABEL_DIM


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).abs().max() / b.abs().max())


def seeded_randn_like(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype)


def snapshot_nets(folder: Path, resolution: int):
    """Main and guide built by build_snapshots from the checkout's Precond, read back through its persistence."""
    paths = vg.build_snapshots(folder, resolution=resolution, seed=1)
    raw = Path(paths["net"]).read_bytes()
    nets = []
    for key in ("net", "gnet"):
        with open(paths[key], "rb") as f:
            nets.append(pickle.load(f)["ema"].float().eval())
    return nets, b"_reconstruct_persistent_obj" in raw and b"class Precond" in raw  # class source embedded


# Churn below the cap (gamma = S_churn / N < sqrt(2) - 1), S_noise != 1, a non-default schedule; churn at the
# cap; no churn, unguided; and the first in float64.
SCHEDULE = dict(sigma_min=0.004, sigma_max=60.0, rho=5.0, S_noise=1.007, S_min=0.05, S_max=50.0)
CASES = {
    "light-churn-7": dict(num_steps=7, guidance=2.1, S_churn=1.4, **SCHEDULE),
    "light-churn-32": dict(num_steps=32, guidance=2.1, S_churn=4.0, **SCHEDULE),
    "capped-churn-8": dict(num_steps=8, guidance=2.1, S_churn=30.0, S_min=0.05, S_max=50.0),
    "ode-unguided-8": dict(num_steps=8),
    "light-churn-7-f64": dict(num_steps=7, guidance=2.1, S_churn=1.4, dtype=torch.float64, **SCHEDULE),
}


def sampler(workdir: Path) -> dict:
    root = find_checkout(None)
    reference = load_reference_module(root).edm_sampler
    use_checkout(root)
    (net, gnet), persistent = snapshot_nets(workdir / "snapshots", resolution=8)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(3, 3, 8, 8, generator=g)
    labels = torch.eye(LABEL_DIM)[torch.randint(LABEL_DIM, (3,), generator=g)]
    out = {"persistent_pickle": persistent, "cases": {}}
    with torch.no_grad():
        for name, settings in CASES.items():
            ref = reference(net, noise, labels, gnet, randn_like=seeded_randn_like(7), **settings)
            row = {"standin": rel_err(torch_edm_sampler(net, noise, labels, gnet, randn_like=seeded_randn_like(7),
                                                        **settings), ref)}
            for backend in ag_kernels.available_backends("cpu"):
                if backend == "triton" and settings["num_steps"] > 8:
                    continue  # the Triton interpreter is slow on a CPU; 7 and 8 steps cover it
                ours = ag_kernels.edm_sampler(net, noise, labels, gnet, randn_like=seeded_randn_like(7),
                                              backend=backend, **settings)
                row[backend] = rel_err(ours, ref)
            # The case is not degenerate: guidance and churn change the result far beyond the tolerance.
            plain = reference(net, noise, labels, randn_like=seeded_randn_like(7),
                              **dict(settings, guidance=1, S_churn=0))
            row["vs_unguided_unchurned"] = rel_err(plain, ref)
            out["cases"][name] = row
    return out


def latent(workdir: Path) -> dict:
    """A latent snapshot pair whose StabilityVAEEncoder names a tiny random AutoencoderKL saved in workdir:
    the checkout's generate_images() against our command line, PNG by PNG."""
    import diffusers

    root = find_checkout(None)
    module = load_reference_module(root)
    use_checkout(root)
    encoders = importlib.import_module("training.encoders")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                                  sample_size=16)
    vae_dir = workdir / "tiny-vae"
    vae.save_pretrained(vae_dir)
    channels = vg.IMG_CHANNELS
    vg.IMG_CHANNELS = 4  # latents: 4 channels at 8x8, decoded to 3 x 16 x 16 pixels
    try:
        paths = vg.build_snapshots(workdir / "snapshots", resolution=8, seed=2)
    finally:
        vg.IMG_CHANNELS = channels
    for key in ("net", "gnet"):
        with open(paths[key], "rb") as f:
            data = pickle.load(f)
        data["encoder"] = encoders.StabilityVAEEncoder(vae_name=str(vae_dir))
        with open(paths[key], "wb") as f:
            pickle.dump(data, f)
    seeds = list(range(6)) + [998, 1001]
    ref_dir, our_dir = workdir / "reference", workdir / "ours"
    settings = dict(num_steps=6, guidance=2.0, S_churn=2.0, S_min=0.05, S_max=50.0, S_noise=1.007)
    with vg._process_group(workdir):
        vg._run_reference(module, dict(net=paths["net"], gnet=paths["gnet"], outdir=str(ref_dir), seeds=seeds,
                                       max_batch_size=3, verbose=False, **settings), torch.device("cpu"))
        argv = ["generate", "--net", paths["net"], "--gnet", paths["gnet"], "--allow-pickle", "--edm2", str(root),
                "--seeds", ",".join(map(str, seeds)), "--batch", "3", "--outdir", str(our_dir), "--device", "cpu",
                "--no-progress"]
        for key, value in settings.items():
            argv += [vg.SAMPLER_FLAGS[key], repr(value)]
        _, _, error = vg._run_ours(argv)
    result = vg.compare_outputs(ref_dir, our_dir)
    from PIL import Image

    images = []
    for path in sorted(ref_dir.glob("*.png")):
        with Image.open(path) as im:
            images.append(im.tobytes())
            result["image_size"] = list(im.size) + [len(im.getbands())]
    result["distinct_images"] = len(set(images))
    result["error"] = error
    result["encoder_class"] = type(data["encoder"]).__module__ + "." + type(data["encoder"]).__name__
    return result


if __name__ == "__main__":
    command, workdir = sys.argv[1], Path(sys.argv[2])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the VAE is a local folder
    torch.set_num_threads(1)  # tiny networks: on a busy CPU, threads spin-waiting for each other cost 10x
    print(json.dumps({"sampler": sampler, "latent": latent}[command](workdir)))
