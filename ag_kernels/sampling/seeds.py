"""Per-seed reproducible random numbers: each sample of a batch draws from its own generator.

With one shared generator, sample k's noise depends on how many samples were drawn before it,
so the image for a seed changes with the batch size, the batch's position in a run, or the
number of processes a run is split over.  :class:`SeedNoise` keeps one ``torch.Generator`` per
sample, seeded with that sample's seed, and draws row k of every tensor from generator k only:
a seed gives the same noise (and churn noise, and random class) in any batch.

The numbers depend on the device the generators live on (CPU and CUDA generators produce
different streams) and on the dtype asked for, as with ``torch.randn`` itself.
"""

from __future__ import annotations

import numbers
import re
from typing import Iterable, List, Sequence, Tuple, Union

import torch

__all__ = ["SeedNoise", "parse_seeds"]

# torch.Generator.manual_seed takes any 64-bit value; seeds are kept to non-negative int64 so
# that they also fit a LongTensor and print the same everywhere.
SEED_LIMIT = 2 ** 63
#: At most this many seeds in one list (10 million images; EDM2's metrics use 50 thousand): a
#: list of seeds is materialized, and "0-9223372036854775806" must be an error, not a MemoryError.
MAX_SEEDS = 10_000_000


def _check_seeds(seeds, name: str = "seeds") -> List[int]:
    """``seeds`` as a non-empty list of Python ints in [0, 2**63), or a TypeError/ValueError naming ``name``."""
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
        # A string is iterable but its characters are not seeds; parse_seeds reads the text form.
        raise TypeError(f"{name} must be a sequence of integers (use parse_seeds for text such as '0-63'), "
                        f"got {type(seeds).__name__}")
    if hasattr(seeds, "__len__") and len(seeds) > MAX_SEEDS:
        raise ValueError(f"{name}: {len(seeds):,} seeds is more than {MAX_SEEDS:,}; generate in several runs")
    out = []
    for i, s in enumerate(seeds):
        if i >= MAX_SEEDS:
            raise ValueError(f"{name}: more than {MAX_SEEDS:,} seeds; generate in several runs")
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise TypeError(f"{name}[{i}] must be an integer, got {type(s).__name__}")
        s = int(s)
        if not 0 <= s < SEED_LIMIT:
            raise ValueError(f"{name}[{i}] must be in [0, 2**63), got {s}")
        out.append(s)
    if not out:
        raise ValueError(f"{name} must not be empty")
    return out


def _check_shape(shape, name: str = "shape") -> Tuple[int, ...]:
    """``shape`` (an int or a sequence of ints >= 0) as a tuple, or a TypeError/ValueError naming ``name``."""
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)):
        raise TypeError(f"{name} must be a tuple of integers, got {type(shape).__name__}")
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError(f"{name} must be a tuple of integers, got {tuple(shape)!r}")
        if d < 0:
            raise ValueError(f"{name} must have sizes >= 0, got {tuple(shape)}")
    return tuple(int(d) for d in shape)


class SeedNoise:
    """One ``torch.Generator`` per sample, seeded from that sample's seed.

    ``randn``, ``randn_like`` and ``randint`` return tensors whose row k is drawn from generator k
    alone, so it depends on seed k and on the earlier draws of this object, never on the other
    seeds of the batch or on its size.  ``randn_like`` has the signature of ``torch.randn_like``
    and can be passed as the sampler's churn noise source::

        rng = SeedNoise([5, 6, 7], device="cuda")
        noise = rng.randn((3, 64, 64))
        samples = ag_kernels.edm_sampler(net, noise, S_churn=40, randn_like=rng.randn_like)

    Args:
        seeds: one integer in [0, 2**63) per sample (a list, a range, ...); not empty.
        device: the device of the generators and of the tensors drawn.

    Raises:
        TypeError: seeds that are not a sequence of integers, or a device that is not a str or
            torch.device.
        ValueError: no seeds, more than 10 million, or a seed outside [0, 2**63).
    """

    def __init__(self, seeds: Sequence[int], device: Union[str, torch.device] = "cpu"):
        self.seeds: List[int] = _check_seeds(seeds, "seeds")
        if not isinstance(device, (str, torch.device)):
            raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # Pin the index: a generator built for bare "cuda" belongs to whichever device is
            # current now, and would refuse to draw there if the current device changed later.
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.generators = [torch.Generator(self.device).manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def __repr__(self) -> str:
        shown = self.seeds if len(self.seeds) <= 8 else self.seeds[:4] + ["..."] + self.seeds[-2:]
        return f"SeedNoise(seeds={shown}, device={str(self.device)!r})"

    def randn(self, shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise [B, *shape] on this object's device; row k from generator k."""
        shape = _check_shape(shape, "shape")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        return torch.stack([torch.randn(shape, generator=g, dtype=dtype, device=self.device)
                            for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal noise with x's shape, dtype and device; row k from generator k.

        x.shape[0] must be the number of seeds.  The noise is drawn on this object's device and
        then moved to x's device if that is another one.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[0] != len(self.seeds):
            raise ValueError(f"x must have one row per seed ({len(self.seeds)}) in dim 0, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        return self.randn(tuple(x.shape[1:]), dtype=x.dtype).to(x.device)

    def randint(self, high: int) -> torch.Tensor:
        """Integers uniform in [0, high) as a LongTensor [B] on this object's device; entry k from generator k."""
        if isinstance(high, bool) or not isinstance(high, numbers.Integral):
            raise TypeError(f"high must be an integer, got {type(high).__name__}")
        if high < 1:
            raise ValueError(f"high must be >= 1, got {high}")
        return torch.cat([torch.randint(int(high), (1,), generator=g, device=self.device)
                          for g in self.generators])


_PART = re.compile(r"^\s*([0-9]+)\s*(?:-\s*([0-9]+)\s*)?$")  # ASCII digits only


def parse_seeds(text: str) -> List[int]:
    """Seeds from text: comma-separated integers and inclusive ranges, e.g. "0-63", "1,5,9", "0-3,10-12".

    Order is kept and repeats are not removed ("3,1-3" gives [3, 1, 2, 3]).

    Args:
        text: the seeds as text.

    Returns:
        The seeds, a list of ints.

    Raises:
        ValueError: naming ``seeds``, on empty text, empty items, negative numbers, reversed ranges
            or anything else.
    """
    if not isinstance(text, str):
        raise TypeError(f"seeds text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("seeds: empty text; expected e.g. '0-63' or '1,5,9'")
    out: List[int] = []
    count = 0
    for part in text.split(","):
        m = _PART.match(part)
        if m is None:
            raise ValueError(f"seeds: cannot read {part.strip()!r} in {text!r}; expected non-negative "
                             "integers or inclusive ranges lo-hi separated by commas, e.g. '0-3,10-12'")
        lo = int(m.group(1))
        hi = lo if m.group(2) is None else int(m.group(2))
        if hi < lo:
            raise ValueError(f"seeds: reversed range {part.strip()!r} in {text!r}; write lo-hi with lo <= hi")
        if hi >= SEED_LIMIT:
            raise ValueError(f"seeds: {hi} in {text!r} is not below 2**63")
        count += hi - lo + 1
        if count > MAX_SEEDS:  # counted before anything is materialized
            raise ValueError(f"seeds: {text!r} names more than {MAX_SEEDS:,} seeds; generate in several runs")
        out.extend(range(lo, hi + 1))
    return out
