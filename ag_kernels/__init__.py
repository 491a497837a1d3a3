"""ag_kernels: fused guided-sampler ops for autoguidance and classifier-free guidance.

Autoguidance (Karras et al., NeurIPS 2024, "Guiding a Diffusion Model with a Bad Version of
Itself") steers a diffusion model D_1 with a worse version of itself D_0:
D_w = D_0 + w (D_1 - D_0).  The ops below fuse that blend with the EDM sampler's derivative and
step update, reading float16/bfloat16/float32 network outputs directly.

The package has four wings, imported one way (commands -> sampling -> kernels and models; the
toy -> sampling and models): :mod:`ag_kernels.kernels` (the fused ops), :mod:`ag_kernels.sampling`
(the sampler, the engine, generation), :mod:`ag_kernels.models` (architectures, checkpoints,
EDM2 snapshots) and :mod:`ag_kernels.commands` (the command line).  Every public name is
importable from here; each wing is imported on first use (PEP 562), so ``import ag_kernels``
itself does not import torch.  Where torch is already imported, the kernels wing is loaded at
once, so the custom ops ``torch.ops.ag_kernels.*`` are registered as soon as ``ag_kernels`` is.
"""

import importlib
import sys

__version__ = "0.1.0"

# Public name -> the wing that defines it.
_EXPORTS = {
    **dict.fromkeys(("guided_denoise", "euler_step", "heun_step", "guided_score", "multistep_step", "PreparedSteps",
                     "available_backends", "torch_edm_sampler", "torch_multistep_sampler", "torch_unipc_sampler"),
                    "kernels"),
    **dict.fromkeys(("edm_sampler", "karras_schedule", "SOLVERS", "GuidedSampler", "NonFiniteError", "generate",
                     "GeneratedBatch", "SeedNoise", "parse_seeds"), "sampling"),
    **dict.fromkeys(("load_net", "save_net", "CheckpointError", "UnsafeCheckpointError", "TinyDenoiser",
                     "register_arch", "get_arch", "ARCHS", "load_snapshot", "EDM2Error"), "models"),
}
_WINGS = ("kernels", "sampling", "models", "commands", "toy")

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    wing = _EXPORTS.get(name)
    if wing is None and name not in _WINGS:
        raise AttributeError(f"module 'ag_kernels' has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{wing or name}")
    value = module if wing is None else getattr(module, name)
    globals()[name] = value  # later lookups do not come back here
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_WINGS))


if "torch" in sys.modules:
    from . import kernels  # noqa: E402,F401  (registers torch.ops.ag_kernels.* and their fakes)
