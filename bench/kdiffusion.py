"""Our ``solver="dpmpp_2m"`` against k-diffusion's ``sample_dpmpp_2m``, the reference of issue 26.

    pip download --no-deps k-diffusion==0.1.1 -d /tmp/kd      # the wheel only, nothing installed
    python -m bench.kdiffusion /tmp/kd/k_diffusion-0.1.1-py3-none-any.whl

k-diffusion is not a dependency: importing the package pulls in wandb, clip, kornia, torchsde,
torchdiffeq and more, so this loads only its ``sampling.py`` from the wheel (or an unpacked
``k_diffusion`` folder, or an installed k-diffusion), with the few modules that file imports at
the top and that ``sample_dpmpp_2m`` never uses stood in by empty ones.  Nothing of k-diffusion
is copied here.  tests/test_solvers.py runs the same comparison when $AG_KERNELS_KDIFFUSION names
the wheel (skipped otherwise).

Both samplers get the same guided denoiser (two small random networks, autoguidance w = 2.5, and
a per-sample w), the same noise and our N + 1 Karras sigmas; the script prints the largest
absolute and relative differences of the samples, float32 and float64, and, for scale,
k-diffusion's own float32 rounding error (its float32 run against its float64 run).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
import zipfile
from typing import Optional

import torch

ENV = "AG_KERNELS_KDIFFUSION"


def _sampling_source(path: Optional[str]) -> str:
    """The text of k_diffusion/sampling.py from a wheel, a folder, or the installed package."""
    if path is None:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"k-diffusion not found: pass the wheel's path or set ${ENV}")
        path = list(spec.submodule_search_locations)[0]
    if os.path.isfile(path):
        with zipfile.ZipFile(path) as wheel:
            return wheel.read("k_diffusion/sampling.py").decode()
    for candidate in (os.path.join(path, "sampling.py"), os.path.join(path, "k_diffusion", "sampling.py")):
        if os.path.isfile(candidate):
            with open(candidate) as f:
                return f.read()
    raise FileNotFoundError(f"no k_diffusion/sampling.py under {path}")


def load_sample_dpmpp_2m(path: Optional[str] = None):
    """k-diffusion's ``sample_dpmpp_2m``, from its own source, without importing the rest of the package."""
    source = _sampling_source(path)
    stubs = {}
    # Imported at the top of sampling.py for other samplers only (ODE/SDE solvers, utils).
    for name in ("torchsde", "torchdiffeq", "k_diffusion", "k_diffusion.utils"):
        if name not in sys.modules or name.startswith("k_diffusion"):
            stubs[name] = types.ModuleType(name)
    stubs["torchdiffeq"].odeint = None
    stubs["k_diffusion"].__path__ = []
    stubs["k_diffusion"].utils = stubs["k_diffusion.utils"]
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        module = types.ModuleType("k_diffusion.sampling")
        module.__package__ = "k_diffusion"
        exec(compile(source, "k_diffusion/sampling.py", "exec"), module.__dict__)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return module.sample_dpmpp_2m


def _networks(dtype):
    """Two small random conv denoisers (main and guide) with EDM-style skip scaling."""
    gen = torch.Generator().manual_seed(26)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            with torch.no_grad():
                for p in self.conv.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)

        def forward(self, x, t, labels=None):
            t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
            c_skip = 0.25 / (t ** 2 + 0.25)
            c_in = 1 / (t ** 2 + 0.25).sqrt()
            return c_skip * x + torch.tanh(self.conv(c_in * x)) * 0.5

    return Net().to(dtype), Net().to(dtype)


def _run_both(sample_dpmpp_2m, num_steps, batch, dtype, per_sample):
    import ag_kernels

    net, gnet = _networks(dtype)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(batch, 3, 8, 8, generator=gen).to(dtype)
    w = torch.linspace(1.5, 3.5, batch, dtype=dtype) if per_sample else 2.5
    sigmas = ag_kernels.karras_schedule(num_steps, 0.002, 80.0, 7.0, dtype=dtype)

    def model(x, sigma):
        # k-diffusion calls model(x, sigma * ones[B]); our networks take one sigma per call.
        d_main, d_guide = net(x, sigma[0]), gnet(x, sigma[0])
        return d_guide.lerp(d_main, w.reshape(-1, 1, 1, 1) if per_sample else w)

    with torch.no_grad():
        theirs = sample_dpmpp_2m(model, noise * sigmas[0], sigmas, disable=True)
        ours = ag_kernels.edm_sampler(net, noise, None, gnet, num_steps=num_steps, guidance=w, dtype=dtype,
                                      solver="dpmpp_2m")
    return ours.double(), theirs.double()


def compare(sample_dpmpp_2m, *, num_steps=16, batch=6, dtype=torch.float32, per_sample=False):
    """(max |ours - k-diffusion|, that / max |k-diffusion|, k-diffusion's own rounding error / max |k-diffusion|).

    The last is k-diffusion in ``dtype`` against k-diffusion in float64 (the same networks in float64):
    "within float32 rounding" means our difference from it is of that size.
    """
    ours, theirs = _run_both(sample_dpmpp_2m, num_steps, batch, dtype, per_sample)
    _, exact = _run_both(sample_dpmpp_2m, num_steps, batch, torch.float64, per_sample)
    scale = theirs.abs().max().item()
    diff = (ours - theirs).abs().max().item()
    return diff, diff / scale, (theirs - exact).abs().max().item() / scale


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    fn = load_sample_dpmpp_2m(argv[0] if argv else os.environ.get(ENV))
    print("dtype    N   per-sample w  max abs diff  max rel diff  k-diffusion's own rounding (rel)")
    for dtype in (torch.float32, torch.float64):
        for n in (2, 8, 16, 32, 64):
            for per_sample in (False, True):
                d, r, own = compare(fn, num_steps=n, dtype=dtype, per_sample=per_sample)
                print(f"{str(dtype)[6:]:8} {n:3d} {str(per_sample):13} {d:12.3e}  {r:12.3e}  {own:12.3e}")


if __name__ == "__main__":
    main()
