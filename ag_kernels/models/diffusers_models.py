"""Diffusers denoisers (UNet2DConditionModel, SD3Transformer2DModel) as EDM denoisers D(x; sigma, cond).

A diffusers network predicts noise (epsilon), velocity (v_prediction), the clean sample (sample) or,
for flow matching, the velocity eps - x0.  :class:`DiffusersDenoiser` turns that into the EDM
denoiser output D, so that the guided step ops of the kernels wing apply unchanged:

* DDPM-style discrete schedules, x = x0 + sigma eps with sigma = sqrt((1 - alpha_bar) / alpha_bar):
  the network sees x / sqrt(sigma^2 + 1), and D = x - sigma eps (epsilon),
  D = x / (sigma^2 + 1) - sigma v / sqrt(sigma^2 + 1) (v_prediction), D = the output (sample).
* Flow matching (SD3 class), x_t = (1 - t) x0 + t eps, velocity v = eps - x0: the state is x_t
  itself and the noise level is t.  D = x_t - t v, so the Euler step x_t + (t' - t) v is exactly
  the EDM Euler step with sigma := t, with no division by the infinite EDM sigma t / (1 - t) at t = 1.

The network is called with the scheduler's own timestep value for each noise level and with the
pipeline's conditioning (a dict: encoder_hidden_states; SDXL's added_cond_kwargs; SD3's
pooled_projections).  This module imports diffusers only where a network is wrapped.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

__all__ = ["DiffusersDenoiser", "PREDICTIONS", "UnsupportedModelError", "require_diffusers", "denoiser_family",
           "check_guide_fits"]

# Parameterizations D is formed from; "flow" is flow matching's velocity in its own time t.
PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")
INSTALL_HINT = 'pip install -e ".[diffusers]"'


class UnsupportedModelError(TypeError, ValueError):
    """A pipeline or network of a class this path does not take: a wrong type and a wrong value
    alike, so ``except TypeError`` and ``except ValueError`` both catch it."""


def require_diffusers():
    """The diffusers module, or an ImportError saying what to install."""
    try:
        import diffusers
    except ImportError as exc:
        raise ImportError(f"the diffusers path needs diffusers and transformers ({exc}); install them with: "
                          f"{INSTALL_HINT}") from None
    return diffusers


def denoiser_family(model) -> str:
    """"unet" (UNet2DConditionModel call convention) or "transformer" (SD3Transformer2DModel); TypeError otherwise."""
    diffusers = require_diffusers()
    if isinstance(model, diffusers.UNet2DConditionModel):
        return "unet"
    if isinstance(model, diffusers.SD3Transformer2DModel):
        return "transformer"
    raise UnsupportedModelError("expected a diffusers UNet2DConditionModel or SD3Transformer2DModel, "
                                f"got {type(model).__name__}")


# Config entries that must agree between a main network and its guide: what the latents and the
# conditioning look like.  (name in the error, config key)
_FITS = {
    "unet": (("latent channels", "in_channels"), ("output channels", "out_channels"),
             ("cross-attention width", "cross_attention_dim"), ("addition embedding", "addition_embed_type"),
             ("addition embedding input width", "projection_class_embeddings_input_dim"),
             ("addition time embedding width", "addition_time_embed_dim"),
             ("timestep conditioning width", "time_cond_proj_dim")),
    "transformer": (("latent channels", "in_channels"), ("output channels", "out_channels"),
                    ("conditioning width", "joint_attention_dim"),
                    ("pooled conditioning width", "pooled_projection_dim")),
}


def check_guide_fits(main, guide, name: str = "guide") -> None:
    """ValueError naming ``name`` unless ``guide`` takes the main network's latents and conditioning."""
    family = denoiser_family(main)
    try:
        guide_family = denoiser_family(guide)
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{name}: {exc}") from None
    if guide_family != family:
        raise UnsupportedModelError(f"{name}: a {type(guide).__name__} cannot guide a {type(main).__name__} (another "
                        "family of network); pass a guide of the main network's class")
    for what, key in _FITS[family]:
        a, b = main.config.get(key), guide.config.get(key)
        if a != b:
            raise ValueError(f"{name}: its {what} ({key}={b!r}) does not fit the main network's ({key}={a!r}); "
                             "the guide must take the same latents and conditioning")


class DiffusersDenoiser:
    """A diffusers network as an EDM denoiser: ``D = denoiser(x, sigma, timestep, cond)``.

    Args:
        model: a UNet2DConditionModel or SD3Transformer2DModel.
        prediction: one of :data:`PREDICTIONS` ("flow" for a flow-matching transformer).
        extra: keyword arguments passed on every call (cross_attention_kwargs, timestep_cond, ...).

    ``x`` is the sampler's state (float32/float64) in the EDM variable (flow: x_t) on the sampling
    device; ``sigma`` a Python float (flow: t); ``timestep`` the scheduler's timestep for it.  The
    network runs on its own device and dtype; D comes back in x's dtype on x's device.
    """

    def __init__(self, model, prediction: str, *, extra: Optional[Dict[str, Any]] = None):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.model = model
        self.family = denoiser_family(model)
        if (self.family == "transformer") != (prediction == "flow"):
            raise ValueError(f"prediction {prediction!r} does not fit a {type(model).__name__}")
        self.prediction = prediction
        self.extra = {k: v for k, v in (extra or {}).items() if v is not None}
        p = next(iter(model.parameters()))
        self.device, self.dtype = p.device, p.dtype
        self._scales: Dict[float, float] = {}

    def model_input(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """What the network sees at noise level sigma: x / sqrt(sigma^2 + 1) (flow: x_t itself)."""
        if self.prediction == "flow":
            return x
        scale = self._scales.get(sigma)
        if scale is None:
            # As the schedulers' scale_model_input: sqrt(sigma^2 + 1) evaluated in float32.
            s = torch.tensor(sigma, dtype=torch.float32)
            scale = self._scales[sigma] = float((s ** 2 + 1) ** 0.5)
        return x / scale

    def raw(self, model_in: torch.Tensor, timestep: torch.Tensor, cond: Dict[str, Any]) -> torch.Tensor:
        """The network's own output for input ``model_in`` (cast to its device and dtype)."""
        inp = model_in.to(self.device, self.dtype)
        t = timestep.to(self.device) if isinstance(timestep, torch.Tensor) else timestep
        if self.family == "unet":
            return self.model(inp, t, return_dict=False, **cond, **self.extra)[0]
        if isinstance(t, torch.Tensor):
            t = t.expand(inp.shape[0])
        return self.model(hidden_states=inp, timestep=t, return_dict=False, **cond, **self.extra)[0]

    def denoised(self, x: torch.Tensor, out: torch.Tensor, sigma: float) -> torch.Tensor:
        """D from the network's output ``out`` at (x, sigma), in x's dtype and device.  ``out`` may
        stack several outputs for x in a leading dimension (k, *x.shape): one pass for all of them."""
        out = out.to(x.device)
        p = self.prediction
        if p == "epsilon" or p == "flow":
            # D = x - sigma eps; flow: D = x_t - t v.
            return torch.add(x, out, alpha=-sigma)
        if p == "v_prediction":
            return torch.add(x * (1.0 / (sigma * sigma + 1.0)), out, alpha=-sigma / math.sqrt(sigma * sigma + 1.0))
        return out.to(x.dtype)

    def __call__(self, x: torch.Tensor, sigma: float, timestep, cond: Dict[str, Any]) -> torch.Tensor:
        return self.denoised(x, self.raw(self.model_input(x, sigma), timestep, cond), sigma)
