"""A latent-space UNet denoiser of our own, sized like EDM2-XS and EDM2-S, for the sampler benchmark.

Not EDM2's network (no code from it): a conventional conditional UNet (GroupNorm/SiLU residual
blocks with a scale-and-shift noise/class embedding, self-attention at the coarse levels), wrapped
in EDM preconditioning (Karras et al. 2022: c_skip, c_out, c_in, c_noise = log(sigma)/4) so it is
called like an EDM2 network, ``net(x, sigma, class_labels)`` with one-hot labels [B, label_dim].
Its weights are random: the benchmark measures speed and the agreement of two samplers on the
same network, not image quality.

:data:`SIZES` gives the configurations: "xs" (~125M parameters) and "s" (~280M) at 64x64x4
latents for GPUs, as EDM2-XS and EDM2-S; "cpu-xs" and "cpu-s" are shrunk so the suite stays short
on a CPU.  :class:`Autocast` runs a network under ``torch.autocast`` (bf16 by default, or float16 as EDM2's
networks run: the engine benchmark, bench/test_engine.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["UNet", "Autocast", "SIZES", "make_pair"]

#: name -> UNet keyword arguments.
SIZES = {
    "xs": dict(img_resolution=64, img_channels=4, model_channels=128, channel_mult=(1, 2, 3, 4), num_blocks=3),
    "s": dict(img_resolution=64, img_channels=4, model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3),
    "cpu-xs": dict(img_resolution=16, img_channels=4, model_channels=16, channel_mult=(1, 2, 2), num_blocks=1),
    "cpu-s": dict(img_resolution=16, img_channels=4, model_channels=32, channel_mult=(1, 2, 2), num_blocks=1),
}


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int, attention: bool):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.attn = _Attention(cout) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        x = self.skip(x) + h
        return x if self.attn is None else self.attn(x)


class _Attention(nn.Module):
    def __init__(self, channels: int, head_channels: int = 64):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        y = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(y.transpose(-1, -2).reshape(b, c, h, w))


class UNet(nn.Module):
    """EDM-preconditioned conditional UNet: ``forward(x, sigma, class_labels=None) -> D(x; sigma)``."""

    def __init__(self, img_resolution=64, img_channels=4, label_dim=1000, model_channels=128,
                 channel_mult=(1, 2, 3, 4), num_blocks=3, attn_levels=2, sigma_data=0.5, seed=0):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.sigma_data = sigma_data
        emb = 4 * model_channels
        self.freqs = nn.Parameter(torch.randn(model_channels // 2, generator=torch.Generator().manual_seed(seed)),
                                  requires_grad=False)
        self.noise_mlp = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Linear(label_dim, emb, bias=False) if label_dim else None
        self.inp = nn.Conv2d(img_channels + 1, model_channels, 3, padding=1)
        levels = len(channel_mult)
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        skips, c = [model_channels], model_channels
        for level, mult in enumerate(channel_mult):
            attention = level >= levels - attn_levels
            for _ in range(num_blocks):
                self.down.append(_ResBlock(c, model_channels * mult, emb, attention))
                c = model_channels * mult
                skips.append(c)
            if level < levels - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = nn.ModuleList([_ResBlock(c, c, emb, True), _ResBlock(c, c, emb, False)])
        for level, mult in reversed(list(enumerate(channel_mult))):
            attention = level >= levels - attn_levels
            for _ in range(num_blocks + 1):
                self.up.append(_ResBlock(c + skips.pop(), model_channels * mult, emb, attention))
                c = model_channels * mult
            if level > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.out_norm = nn.GroupNorm(_groups(c), c)
        self.out = nn.Conv2d(c, img_channels, 3, padding=1)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                if p.requires_grad and p.dim() > 1:
                    p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))

    def forward(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, 1, 1)
        xf = x.to(torch.float32)
        # EDM preconditioning: unit-variance network input and target at every noise level.
        c_skip = self.sigma_data**2 / (sigma**2 + self.sigma_data**2)
        c_out = sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()
        c_in = 1 / (self.sigma_data**2 + sigma**2).sqrt()
        c_noise = sigma.flatten().log() / 4
        f = c_noise[:, None] * self.freqs[None] * 2 * math.pi
        emb = self.noise_mlp(torch.cat([f.cos(), f.sin()], dim=1))
        if self.label_emb is not None and class_labels is not None:
            emb = emb + self.label_emb(class_labels.to(emb.dtype)) * math.sqrt(1 / self.label_dim) * 30
        emb = F.silu(emb)
        h = self.inp(torch.cat([xf * c_in, torch.ones_like(xf[:, :1])], dim=1))
        hs = [h]
        for layer in self.down:
            h = layer(h, emb) if isinstance(layer, _ResBlock) else layer(h)
            hs.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb) if isinstance(layer, _ResBlock) else layer(h)
        f_x = self.out(F.silu(self.out_norm(h)))
        return c_skip * xf + c_out * f_x.to(torch.float32)


class Autocast(nn.Module):
    """Run ``net`` under ``torch.autocast(dtype)``; D stays float32 (the preconditioning runs outside the 16-bit convs, as in EDM2).

    ``enabled = False`` runs it in plain float32 (the benchmarks' exact agreement checks).
    """

    def __init__(self, net: nn.Module, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.net, self.dtype = net, dtype
        self.enabled = True  # False: plain float32 (the benchmark's exact agreement check)
        self.img_resolution, self.img_channels, self.label_dim = net.img_resolution, net.img_channels, net.label_dim

    def forward(self, x, sigma, class_labels=None):
        with torch.autocast(x.device.type, dtype=self.dtype, enabled=self.enabled):
            return self.net(x, sigma, class_labels)


def make_pair(main: str, guide: str, device, *, autocast: bool = True, dtype: torch.dtype = torch.bfloat16):
    """(main, guide) networks of the named sizes on ``device``, in eval mode, random weights.

    ``autocast``: wrap each in :class:`Autocast` with ``dtype`` (bf16 by default; the engine
    benchmark uses float16, as EDM2's networks run).
    """
    nets = []
    for name, seed in ((main, 1), (guide, 2)):
        net = UNet(**SIZES[name], seed=seed).to(device).eval().requires_grad_(False)
        nets.append(Autocast(net, dtype) if autocast else net)
    return tuple(nets)
