"""ag_kernels: fused guided-sampler ops for autoguidance and classifier-free guidance.

Autoguidance (Karras et al., NeurIPS 2024, "Guiding a Diffusion Model with a Bad Version of
Itself") steers a diffusion model D_1 with a worse version of itself D_0:
D_w = D_0 + w (D_1 - D_0).  The ops below fuse that blend with the EDM sampler's derivative and
step update, reading float16/bfloat16/float32 network outputs directly.
"""

from ._backends import _load_ext, available_backends
from .ops import PreparedSteps, euler_step, guided_denoise, guided_score, heun_step
from .engine import GuidedSampler, NonFiniteError
from .sampler import edm_sampler, karras_schedule
from .seeds import SeedNoise, parse_seeds
from .generation import GeneratedBatch, generate

__version__ = "0.1.0"

# Load the compiled ops now (guarded): one warning if they are missing, and the fakes that
# torch.compile needs are registered before any tracing.
_load_ext(warn=True)

__all__ = [
    "guided_denoise", "euler_step", "heun_step", "guided_score", "available_backends", "PreparedSteps",
    "edm_sampler", "karras_schedule", "GuidedSampler", "NonFiniteError", "generate", "GeneratedBatch", "SeedNoise", "parse_seeds", "__version__",
]
