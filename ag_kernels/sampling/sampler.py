"""A drop-in guided EDM sampler built on the fused step ops.

``edm_sampler`` takes the arguments of the reference EDM2 sampler (Karras et al. 2024,
``generate_images.py``), in the same order and with the same defaults, and runs the same
algorithm: the EDM Heun sampler (Karras et al. 2022, Algorithm 2) on the guided denoiser
D_w = D_0 + w (D_1 - D_0) (autoguidance / CFG), with the Karras noise schedule and optional
stochastic churn.  Each step's blend, derivative and update run as one fused op
(:func:`ag_kernels.euler_step`, :func:`ag_kernels.heun_step`) instead of five or six eager ones.

Beyond the reference: per-sample guidance (a tensor [B]), guidance as a function of sigma, a
guidance interval (Kynkäänniemi et al. 2024) outside which the guiding network is not evaluated,
an Euler solver, a progress bar, and the engine's options (CUDA graphs, the guide on a second
stream, one batched call for CFG with one network).  The loop itself lives in
:mod:`ag_kernels.sampling.engine` (:class:`ag_kernels.GuidedSampler`), which samples many batches with
one set of networks and settings.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional, Tuple, Union

import torch

from ._settings import _Guidance
from .engine import SOLVERS, GuidedSampler, karras_schedule

__all__ = ["edm_sampler", "karras_schedule", "SOLVERS"]

# Engines that edm_sampler(cuda_graph=True) keeps between calls (and their graphs), keyed by the
# networks and settings but not the guidance: a graph is worth capturing only if it is replayed,
# and it reads the weights from static slots, so a guidance made anew per call (a lambda, a
# tensor, a float of a sweep) must not make a new engine.
_ENGINES: "OrderedDict[tuple, GuidedSampler]" = OrderedDict()
_MAX_ENGINES = 2


def _identity(v):
    """A hashable stand-in for a setting: tensors and callables by identity, the rest by value."""
    if isinstance(v, torch.Tensor) or callable(v):
        return ("id", id(v))
    if isinstance(v, list):
        return tuple(v)
    return v


def _cached_engine(net, gnet, settings: dict) -> GuidedSampler:
    key = (id(net), id(gnet)) + tuple((k, _identity(v)) for k, v in sorted(settings.items()) if k != "guidance")
    engine = _ENGINES.get(key)
    # The engine holds its networks and callables, so the ids in the key cannot be reused while it lives.
    if engine is None:
        engine = GuidedSampler(net, gnet, **settings)
        _ENGINES[key] = engine
        while len(_ENGINES) > _MAX_ENGINES:
            _ENGINES.popitem(last=False)
    else:
        # This call's guidance, checked as the engine's constructor checks it.
        engine.guidance = _Guidance(settings["guidance"], gnet, settings["guidance_interval"])
    _ENGINES.move_to_end(key)
    return engine


@torch.no_grad()
def edm_sampler(
    net,
    noise: torch.Tensor,
    labels=None,
    gnet=None,
    num_steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 80,
    rho: float = 7,
    guidance: Union[float, torch.Tensor, Callable[[float], Union[float, torch.Tensor]]] = 1,
    S_churn: float = 0,
    S_min: float = 0,
    S_max: float = float("inf"),
    S_noise: float = 1,
    dtype: torch.dtype = torch.float32,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
    *,
    backend: str = "auto",
    guidance_interval: Optional[Tuple[float, float]] = None,
    solver: str = "heun",
    progress: bool = False,
    cuda_graph: Union[bool, str] = False,
    overlap: bool = True,
    guide_labels=None,
    batch_guide: Union[bool, str] = "auto",
) -> torch.Tensor:
    """Sample with the guided EDM sampler; a drop-in replacement for the EDM2 reference ``edm_sampler``.

    The arguments up to ``randn_like`` are the reference's, in its order and with its defaults;
    the keyword-only ones from ``backend`` on are extensions.

    Args:
        net: the main network D_1, called as ``net(x, t, labels)`` with x in ``dtype`` and t a 0-d tensor.
        noise: standard normal noise [B, ...]; sampling starts at ``noise * sigma_max``.
        labels: passed to the networks unchanged.
        gnet: the guiding network D_0 (a worse model for autoguidance, the unconditional one for
            CFG), called as ``gnet(x, t, labels)``; never called where the weight is 1.
        num_steps: N >= 1 points of the Karras schedule (then t_N = 0).
        sigma_min: the smallest noise level, 0 < sigma_min < sigma_max.
        sigma_max: the largest noise level.
        rho: the schedule's exponent, > 0.
        guidance: the weight w of D_w = D_0 + w (D_1 - D_0).  Also: a per-sample tensor [B], or a
            function of sigma (a Python float) returning a number or a tensor [B].
        S_churn: stochastic churn (EDM, Algorithm 2), 0 for the deterministic sampler; the churn
            noise is drawn with ``randn_like(x)`` once per churned step, in the reference's order.
        S_min: churn only for t >= S_min.
        S_max: churn only for t <= S_max.
        S_noise: scale of the churn noise.
        dtype: float32 or float64: the sampler's dtype; network outputs are read in it.
        randn_like: the churn noise source.
        backend: "auto", "torch", "triton" or "ext" (see :func:`ag_kernels.available_backends`).
        guidance_interval: (lo, hi): guide only for sigma in (lo, hi]; elsewhere w = 1 and gnet is
            not evaluated (Kynkäänniemi et al. 2024).
        solver: "heun" (the reference: 2nd order, Euler on the last step; 2N - 1 evaluations), "euler",
            or the multistep "dpmpp_2m" / "dpmpp_3m" (DPM-Solver++(2M)/(3M), Lu et al. 2022: one evaluation
            per schedule point, N in all; the earlier denoised outputs give the higher order; no churn), or
            "unipc" (UniPC-2, Zhao et al. 2023: the 2M predictor with the UniC corrector, "bh2", which
            re-does each step with the output just evaluated, no extra evaluation; N in all; no churn).
        progress: show a tqdm progress bar over the steps (eager runs).
        cuda_graph: False (default), True or "auto": run from a CUDA graph (see
            :class:`ag_kernels.GuidedSampler`).  With True/"auto" the engine and its graphs are
            kept for the next call with the same networks and settings (the last two such
            engines are kept), so repeated calls replay; the guidance is not part of that key
            (the graphs read it from static slots), so a lambda, tensor or float made anew per
            call replays too.  True on CPU tensors warns once and runs eagerly.  Results equal the
            eager run's.
        overlap: on CUDA, evaluate gnet on a second stream concurrently with net (same results).
        guide_labels: the labels gnet gets (default: ``labels``), e.g. zeros for CFG with one network.
        batch_guide: True, False or "auto" (when ``gnet is net``): evaluate both roles as one call
            on the concatenated batch [x; x] with labels [labels; guide_labels].

    Returns:
        The samples at t_N = 0, in ``dtype``, with noise's shape.  Gradients are not tracked.

    Raises:
        TypeError: an argument of the wrong type, or a network that returns a non-floating tensor.
        ValueError: guidance other than 1 without ``gnet``, num_steps < 1, sigma_min >= sigma_max,
            rho <= 0, an unknown solver or backend, churn with a multistep solver, a per-sample
            guidance of the wrong length, or a network output of the wrong shape.
    """
    settings = dict(
        num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, guidance=guidance,
        S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, dtype=dtype, backend=backend,
        guidance_interval=guidance_interval, solver=solver, progress=progress, cuda_graph=cuda_graph,
        overlap=overlap, batch_guide=batch_guide,
    )
    gl = {} if guide_labels is None else {"guide_labels": guide_labels}
    if cuda_graph is False:
        # One run: the engine checks the settings and runs the loop eagerly.
        return GuidedSampler(net, gnet, **settings)(noise, labels, randn_like=randn_like, **gl)
    return _cached_engine(net, gnet, settings)(noise, labels, randn_like=randn_like, **gl)
