"""Network architectures that our checkpoint format (:mod:`ag_kernels.models.checkpoint`) may build.

A checkpoint stores an architecture *name* and its constructor keyword arguments, never code;
loading looks the name up here.  So only classes registered with :func:`register_arch` can be
instantiated from a file, and a file cannot make the loader run anything else.

:class:`TinyDenoiser` is a small EDM-preconditioned denoiser (Karras et al. 2022, Table 1):
enough of a network for tests, the ``verify`` command and examples, where a "main" and a
"guide" net are made as differently sized or seeded versions of it.
"""

from __future__ import annotations

import importlib

import math
from typing import Callable, Dict, Optional, Type, Union

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["ARCHS", "register_arch", "get_arch", "TinyDenoiser"]

#: Registered architectures: name -> nn.Module subclass.
ARCHS: Dict[str, Type[nn.Module]] = {}
"""Registered architectures by name (see :func:`register_arch`): what :func:`load_net` may build."""


def register_arch(name: str) -> Callable[[Type[nn.Module]], Type[nn.Module]]:
    """Class decorator: make ``cls`` loadable from our checkpoints under ``name``.

    The class must store its constructor keyword arguments (JSON-like values: str, int, float,
    bool, None, or lists/dicts of those) as ``self.init_kwargs``, so that :func:`save_net` can
    write them and :func:`load_net` can call ``cls(**init_kwargs)`` again.

    Args:
        name: the name checkpoints record for the class; unique.

    Returns:
        The decorator, which registers the class in :data:`ARCHS` and returns it unchanged.

    Raises:
        TypeError: ``name`` is not a non-empty string, or the decorated object is not an
            ``nn.Module`` subclass.
        ValueError: ``name`` is already registered to another class.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register_arch: name must be a non-empty string, got {name!r}")

    def decorator(cls):
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"register_arch({name!r}) decorates nn.Module subclasses, got {cls!r}")
        existing = ARCHS.get(name)
        # Re-registering the same class (a module reloaded) is harmless; a different class under
        # a taken name would silently change what old checkpoints load as.
        if existing is not None and _qualified(existing) != _qualified(cls):
            raise ValueError(f"register_arch: name {name!r} is already registered to {_qualified(existing)}")
        ARCHS[name] = cls
        cls.arch_name = name
        return cls

    return decorator


def _qualified(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# Architectures defined in submodules that ``import ag_kernels`` does not load; get_arch imports
# them on first use so their checkpoints load without the caller importing the module.
_LAZY_ARCHS = {"toy_mlp": "ag_kernels.toy.model"}


def get_arch(name: str) -> Type[nn.Module]:
    """The class registered as ``name``.

    Args:
        name: a name given to :func:`register_arch`.

    Returns:
        The registered ``nn.Module`` subclass.

    Raises:
        ValueError: no class is registered as ``name`` (the message lists the registered names).
    """
    if isinstance(name, str) and name not in ARCHS and name in _LAZY_ARCHS:
        importlib.import_module(_LAZY_ARCHS[name])
    try:
        return ARCHS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown network architecture {name!r}; registered: {sorted(set(ARCHS) | set(_LAZY_ARCHS))} "
            "(register new ones with ag_kernels.models.nets.register_arch)"
        ) from None


def _normal(gen: torch.Generator, *shape: int, std: float) -> nn.Parameter:
    return nn.Parameter(torch.randn(shape, generator=gen) * std)


@register_arch("tiny_denoiser")
class TinyDenoiser(nn.Module):
    """A small EDM-preconditioned denoiser D(x; sigma, labels) for images [B, C, H, W].

    D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, labels) with sigma_data = 0.5 and
    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4 (EDM, Table 1).
    F is three 3x3 convolutions with SiLU and a final tanh, the hidden features modulated
    (scale and shift) by an embedding of c_noise (sinusoidal features through a linear layer)
    plus, with ``label_dim > 0``, one of the label.

    The weights are random (not trained) but deterministic: drawn from a torch.Generator
    seeded with ``seed``, so the same kwargs always give the same network.

    Args:
        img_channels: the channels of the images it takes.
        img_resolution: their height and width.
        label_dim: number of classes (0: unconditional).  Labels are one-hot (or soft) [B, label_dim]
            or integer class indices [B]; None means all zeros (no class).
        channels: hidden width (a "guide" net can be a narrower one).
        emb_features: number of sinusoidal noise features.
        seed: the weights' random seed.
        out_dtype: dtype name of the returned tensor ("float32", "bfloat16", ...): the network
            computes in its parameters' dtype and casts the result, as a mixed-precision model would.

    Raises:
        ValueError: a size that is not an int of at least 1 (label_dim: 0), an odd emb_features, a
            seed that is not an int, or an out_dtype that names no torch float dtype.
    """

    def __init__(self, img_channels: int = 3, img_resolution: int = 8, label_dim: int = 0, channels: int = 32,
                 emb_features: int = 16, seed: int = 0, out_dtype: str = "float32"):
        super().__init__()
        for key, value, low in (("img_channels", img_channels, 1), ("img_resolution", img_resolution, 1),
                                ("label_dim", label_dim, 0), ("channels", channels, 1),
                                ("emb_features", emb_features, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TinyDenoiser: {key} must be an int >= {low}, got {value!r}")
        if emb_features % 2:
            raise ValueError(f"TinyDenoiser: emb_features must be even, got {emb_features}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"TinyDenoiser: seed must be an int, got {seed!r}")
        dtype = getattr(torch, out_dtype, None) if isinstance(out_dtype, str) else None
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"TinyDenoiser: out_dtype must name a torch float dtype, e.g. 'float32', "
                             f"got {out_dtype!r}")
        # Stored in checkpoints and used to rebuild the net: only JSON-like values.
        self.init_kwargs = dict(img_channels=img_channels, img_resolution=img_resolution, label_dim=label_dim,
                                channels=channels, emb_features=emb_features, seed=seed, out_dtype=out_dtype)
        self.img_channels, self.img_resolution, self.label_dim = img_channels, img_resolution, label_dim
        self.sigma_data = 0.5
        self.out_dtype = dtype

        gen = torch.Generator().manual_seed(seed)
        c, h = img_channels, channels
        # He-like scales keep activations O(1) through the SiLUs; the output layer is not zeroed
        # (as a trained net's would not be), so F really depends on x, sigma and the label.
        self.conv_in_w = _normal(gen, h, c, 3, 3, std=math.sqrt(2 / (9 * c)))
        self.conv_in_b = nn.Parameter(torch.zeros(h))
        self.conv_mid_w = _normal(gen, h, h, 3, 3, std=math.sqrt(2 / (9 * h)))
        self.conv_mid_b = nn.Parameter(torch.zeros(h))
        self.conv_out_w = _normal(gen, c, h, 3, 3, std=math.sqrt(1 / (9 * h)))
        self.conv_out_b = nn.Parameter(torch.zeros(c))
        self.emb_w = _normal(gen, 2 * h, emb_features, std=math.sqrt(1 / emb_features))
        self.emb_b = nn.Parameter(torch.zeros(2 * h))
        self.label_w = _normal(gen, 2 * h, label_dim, std=math.sqrt(1 / max(label_dim, 1))) if label_dim else None
        # Fixed frequencies of the sinusoidal embedding: a buffer, so it is saved and moves with .to().
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(64), emb_features // 2)))

    def _labels(self, labels, batch: int, device, dtype) -> Optional[torch.Tensor]:
        if self.label_dim == 0:
            return None
        if labels is None:
            return torch.zeros(batch, self.label_dim, device=device, dtype=dtype)
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"TinyDenoiser: labels must be a tensor or None, got {type(labels).__name__}")
        if labels.dim() == 1 and not labels.is_floating_point():
            labels = F.one_hot(labels.long(), self.label_dim)
        labels = labels.to(device=device, dtype=dtype).reshape(-1, self.label_dim)
        if not torch.jit.is_tracing() and labels.shape[0] not in (1, batch):
            raise ValueError(f"TinyDenoiser: labels has {labels.shape[0]} rows for a batch of {batch}")
        return labels.expand(batch, self.label_dim)

    def forward(self, x: torch.Tensor, sigma: Union[float, torch.Tensor], labels: Optional[torch.Tensor] = None):
        """D(x; sigma, labels): x [B, C, H, W] (any float dtype), sigma a number, a 0-d or a [B] tensor."""
        # Shape checks are skipped while tracing (torch.jit.trace): they would be frozen into the trace.
        checking = not torch.jit.is_tracing()
        if checking and (x.dim() != 4 or x.shape[1] != self.img_channels):
            raise ValueError(f"TinyDenoiser: x must be [B, {self.img_channels}, H, W], got {tuple(x.shape)}")
        dtype = self.conv_in_w.dtype
        batch = x.shape[0]
        x = x.to(dtype)
        if isinstance(sigma, torch.Tensor):
            sigma = sigma.to(device=x.device, dtype=dtype).reshape(-1)
        else:
            sigma = torch.full((1,), float(sigma), dtype=dtype, device=x.device)
        if checking and sigma.shape[0] not in (1, batch):
            raise ValueError(f"TinyDenoiser: sigma must be a number, 0-d or [B] (B = {batch}), "
                             f"got {sigma.shape[0]} values")
        sigma = sigma.expand(batch)
        s = sigma.reshape(batch, 1, 1, 1)
        sd = self.sigma_data
        c_skip = sd ** 2 / (s ** 2 + sd ** 2)
        c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
        c_in = 1 / (s ** 2 + sd ** 2).sqrt()
        c_noise = sigma.log() / 4

        phase = c_noise[:, None] * self.freqs[None, :]
        emb = F.linear(torch.cat([phase.cos(), phase.sin()], dim=1), self.emb_w, self.emb_b)
        lab = self._labels(labels, batch, x.device, dtype)
        if lab is not None:
            emb = emb + F.linear(lab, self.label_w)
        scale, shift = emb[:, :, None, None].chunk(2, dim=1)

        h = F.silu(F.conv2d(c_in * x, self.conv_in_w, self.conv_in_b, padding=1))
        h = h * (1 + scale) + shift
        h = F.silu(F.conv2d(h, self.conv_mid_w, self.conv_mid_b, padding=1))
        f = F.conv2d(h, self.conv_out_w, self.conv_out_b, padding=1)
        # tanh bounds F, as a trained denoiser's estimate of the clean image is bounded; with an
        # unbounded random F the sampler's trajectories feed back through it and blow up.
        f = torch.tanh(f)
        return (c_skip * x + c_out * f).to(self.out_dtype)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.init_kwargs.items())
