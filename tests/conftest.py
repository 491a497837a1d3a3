"""Test set-up: without a GPU, Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton compiles (decorates) any kernel, that is before
ag_kernels is imported, so it is set here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import secrets  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def gen():
    """A generator with a fresh seed each run (AG_TEST_SEED=N repeats one); the seed is printed."""
    seed = int(os.environ.get("AG_TEST_SEED", secrets.randbits(31)))
    print(f"AG_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)
