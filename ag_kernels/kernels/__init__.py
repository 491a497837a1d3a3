"""Kernels wing: the fused guided-step ops, their checks, the torch reference and the backends.

Layers inside: ``ops`` (public functions, fast path, one dispatch point) -> ``_checks`` (argument
checks), ``_launch`` (operand layout, kernel launch), ``_autograd`` (differentiable versions) ->
``reference`` (the PyTorch fallback and test oracle), ``triton_kernels``, ``_backends`` (which
backend runs where; the guarded load of the compiled ``ag_kernels._C``), ``_fake`` (fake kernels).
Nothing here imports another wing.
"""

from ._backends import _load_ext, available_backends
from .ops import PreparedSteps, euler_step, guided_denoise, guided_score, heun_step, multistep_step
from .reference import torch_edm_sampler, torch_multistep_sampler, torch_unipc_sampler

# Load the compiled ops now (guarded): one warning if they are missing, and the fakes that
# torch.compile needs are registered before any tracing.
_load_ext(warn=True)

__all__ = ["guided_denoise", "euler_step", "heun_step", "guided_score", "multistep_step", "PreparedSteps",
           "available_backends", "torch_edm_sampler", "torch_multistep_sampler", "torch_unipc_sampler"]
