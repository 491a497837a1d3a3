"""Stand-in for edm2's ``training.encoders`` (tests only): the pixel-space encoder's decoding.

The mapping from [-1, 1] to uint8 is the one documented for EDM2's pixel models:
round down (x * 127.5 + 128) clipped to [0, 255], in float32.
"""

import torch

from torch_utils import persistence


@persistence.persistent_class
class StandardRGBEncoder:
    def init(self, device):
        pass

    def decode(self, x):
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)
