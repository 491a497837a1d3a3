"""A network that kills its process on torchrun rank 1 after a few calls (tests/test_cli_errors.py)."""

import os

import torch

from ag_kernels.models.nets import TinyDenoiser


class DyingNet(torch.nn.Module):
    def __init__(self, calls_before_death: int = 8):
        super().__init__()
        self.inner = TinyDenoiser(img_channels=3, img_resolution=8, channels=8, seed=5)
        self.img_channels, self.img_resolution, self.label_dim = 3, 8, 0
        self.calls_before_death = calls_before_death
        self.calls = 0

    def forward(self, x, sigma, labels=None):
        self.calls += 1
        if os.environ.get("RANK") == "1" and self.calls > self.calls_before_death:
            os._exit(3)  # a crash: no cleanup, no message
        return self.inner(x, sigma, labels)
