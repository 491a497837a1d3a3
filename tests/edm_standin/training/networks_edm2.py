"""Stand-in for edm2's ``training.networks_edm2`` (tests only; our own small network, no edm2 code).

``Precond`` takes the constructor keywords EDM2's Precond takes (its own, its U-Net's and the blocks'
that a caller may set) and refuses any other, as the real one does, has EDM2's attributes (img_resolution, img_channels,
label_dim) and call convention ``net(x, sigma, class_labels)``, and, like EDM2's networks, zero
scalar gains at initialization and random weights from the global generator.  It works from
float16 weights (EDM2 snapshots are saved in float16).
"""

import math

import torch

from torch_utils import persistence


@persistence.persistent_class
class Precond(torch.nn.Module):
    # The keywords EDM2's Precond accepts (its own, its U-Net's and the U-Net's blocks'); like the real
    # one, any other keyword raises TypeError, so a wrong name in build_snapshots fails here too.
    def __init__(self, img_resolution, img_channels, label_dim, use_fp16=True, sigma_data=0.5, logvar_channels=128,
                 model_channels=16, channel_mult=(1,), channel_mult_noise=None, channel_mult_emb=None, num_blocks=1,
                 attn_resolutions=(), label_balance=0.5, concat_balance=0.5, resample_filter=(1, 1),
                 channels_per_head=64, dropout=0, res_balance=0.3, attn_balance=0.3, clip_act=256):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.sigma_data = use_fp16, sigma_data
        width = model_channels * max(channel_mult)
        self.conv_in = torch.nn.Parameter(torch.randn(width, img_channels, 3, 3))
        self.noise_emb = torch.nn.Parameter(torch.randn(width))
        self.label_emb = torch.nn.Parameter(torch.randn(width, max(label_dim, 1)))
        self.conv_out = torch.nn.Parameter(torch.randn(img_channels, width, 3, 3))
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

    def forward(self, x, sigma, class_labels=None):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sigma ** 2 + sd2).sqrt()
        w_in = self.conv_in.to(torch.float32) / math.sqrt(self.conv_in[0].numel())
        w_out = self.conv_out.to(torch.float32) / math.sqrt(self.conv_out[0].numel())
        h = torch.nn.functional.conv2d(c_in * x, w_in, padding=1)
        emb = sigma.log().reshape(-1, 1) / 4 * self.noise_emb.to(torch.float32)
        if self.label_dim:
            emb = emb + class_labels.to(torch.float32).reshape(-1, self.label_dim) @ self.label_emb.to(torch.float32).T
        h = h * (1 + self.emb_gain.to(torch.float32) * emb[:, :, None, None])
        f = torch.tanh(torch.nn.functional.conv2d(torch.nn.functional.silu(h), w_out, padding=1))
        f = f * self.out_gain.to(torch.float32)
        return c_skip * x + c_out * f
