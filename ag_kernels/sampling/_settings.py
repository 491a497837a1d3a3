"""The engine's argument checks: real numbers, flags, the guidance weight at each noise level, churn noise.

Checked once, when a :class:`~ag_kernels.GuidedSampler` is built or called; the run trusts them.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, List, Optional

import torch

from ..kernels.ops import D_DTYPES

SOLVERS = ("heun", "euler", "dpmpp_2m", "dpmpp_3m", "unipc")
"""The solvers ``solver=`` accepts: EDM's Heun (the reference), Euler, DPM-Solver++(2M) and (3M), and UniPC (bh2 predictor with
the UniC corrector, no extra evaluations)."""
#: Built-in schedules: "karras" (Karras et al. 2022, Eq. 5, with rho) and "logsnr" (uniform in log sigma).
SCHEDULES = ("karras", "logsnr")
_SAME = object()  # guide_labels default: the guiding network gets the main network's labels


class _DefaultInt(int):
    """A default value that equals (and prints as) its number but is known by identity, so that an
    argument left at its default can be told from one given explicitly with the same value."""


class _DefaultFloat(float):
    """As :class:`_DefaultInt`, for a float default."""


class _DefaultStr(str):
    """As :class:`_DefaultInt`, for a str default."""


# The schedule's defaults as the sampler signatures carry them: `sigmas=` may only be combined with these.
DEFAULT_NUM_STEPS = _DefaultInt(32)
DEFAULT_SIGMA_MIN = _DefaultFloat(0.002)
DEFAULT_SIGMA_MAX = _DefaultInt(80)
DEFAULT_RHO = _DefaultInt(7)
DEFAULT_SCHEDULE = _DefaultStr("karras")
_SCHEDULE_DEFAULTS = {"num_steps": DEFAULT_NUM_STEPS, "sigma_min": DEFAULT_SIGMA_MIN, "sigma_max": DEFAULT_SIGMA_MAX,
                      "rho": DEFAULT_RHO, "schedule": DEFAULT_SCHEDULE}


def given_with_sigmas(**values) -> List[str]:
    """The names among num_steps, sigma_min, sigma_max, rho, schedule that were given (not left at their default)."""
    return [k for k, v in values.items() if v is not _SCHEDULE_DEFAULTS[k]]


def check_sigmas(sigmas, name: str = "sigmas") -> List[float]:
    """An explicit schedule checked: a 1-D tensor or sequence of at least 2 finite values, strictly
    decreasing, positive except for an optional final 0 (appended when absent).  Returns the
    noise levels as Python floats, ending in 0."""
    if isinstance(sigmas, torch.Tensor):
        if sigmas.dim() != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(sigmas.shape)}")
        if sigmas.is_complex() or not (sigmas.is_floating_point() or sigmas.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must hold real numbers, got dtype {sigmas.dtype}")
        values = [float(v) for v in sigmas.detach().cpu().double().tolist()]
    elif isinstance(sigmas, (str, bytes)) or not hasattr(sigmas, "__len__") or not hasattr(sigmas, "__iter__"):
        raise TypeError(f"{name} must be a 1-D tensor or a sequence of numbers, got {type(sigmas).__name__}")
    else:
        values = []
        for i, v in enumerate(sigmas):
            if isinstance(v, torch.Tensor) and v.dim() == 0:
                v = v.item()
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise TypeError(f"{name}[{i}] must be a real number, got {type(v).__name__}")
            values.append(float(v))
    if len(values) < 2:
        raise ValueError(f"{name} must have at least 2 noise levels (e.g. [sigma_max, 0]), got {len(values)}")
    for i, v in enumerate(values):
        if not math.isfinite(v):
            raise ValueError(f"{name}[{i}] must be finite, got {v}")
        if v < 0 or (v == 0 and i < len(values) - 1):
            raise ValueError(f"{name}[{i}] must be > 0 (only the last noise level may be 0), got {v}")
    for i in range(len(values) - 1):
        if not values[i] > values[i + 1]:
            raise ValueError(f"{name} must be strictly decreasing, got {name}[{i}]={values[i]:g} <= "
                             f"{name}[{i + 1}]={values[i + 1]:g}")
    if values[-1] != 0:
        values.append(0.0)
    return values


def _real(name: str, value, *, positive=False, nonnegative=False, allow_inf=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if nonnegative and not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _flag(name: str, value, *, auto: bool = False):
    """A bool argument (or "auto" where allowed), checked by identity: 1, 0 and "yes" are refused."""
    if value is True or value is False or (auto and isinstance(value, str) and value == "auto"):
        return value
    allowed = "True, False or 'auto'" if auto else "True or False"
    raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_interval(interval):
    """``guidance_interval`` checked: None, or the pair (lo, hi) as floats with 0 <= lo < hi (hi may be inf)."""
    if interval is None:
        return None
    if not isinstance(interval, (tuple, list)) or len(interval) != 2:
        raise TypeError(f"guidance_interval must be a pair (lo, hi), got {interval!r}")
    lo = _real("guidance_interval[0]", interval[0], nonnegative=True)
    hi = _real("guidance_interval[1]", interval[1], allow_inf=True)
    if not lo < hi:
        raise ValueError(f"guidance_interval must have lo < hi, got {tuple(interval)}")
    return lo, hi


class _Guidance:
    """The guidance weight at a noise level: a number, a per-sample tensor [B], or None (w = 1: net only)."""

    def __init__(self, guidance, gnet, interval):
        self.fn: Optional[Callable] = None
        self.value = None
        if callable(guidance) and not isinstance(guidance, torch.Tensor):
            self.fn = guidance
        elif isinstance(guidance, torch.Tensor):
            if guidance.dtype not in D_DTYPES:
                raise TypeError(f"guidance as a tensor must have a float dtype, got {guidance.dtype}")
            self.value = guidance
        else:
            w = _real("guidance", guidance)
            self.value = None if w == 1.0 else w
        self.interval = check_interval(interval)
        self.gnet = gnet
        if self.value is not None and not isinstance(self.value, torch.Tensor) and gnet is None:
            raise ValueError(
                "gnet is None but guidance != 1: pass the guiding network as gnet "
                "(autoguidance: a worse version of net; CFG: the unconditional model), or use guidance=1"
            )

    @staticmethod
    def _check(value, batch, device, name):
        """None (no guidance) for a weight of exactly 1, else a float or a per-sample tensor [B]."""
        if isinstance(value, torch.Tensor):
            if value.dtype not in D_DTYPES:
                raise TypeError(f"{name} as a tensor must have a float dtype, got {value.dtype}")
            if value.dim() == 0:
                value = value.reshape(1).expand(batch)
            if value.dim() != 1 or value.shape[0] != batch:
                raise ValueError(f"{name} as a tensor must be 0-d or have one value per sample ({batch}), "
                                 f"got shape {tuple(value.shape)}")
            if value.device != device:
                raise ValueError(f"{name} is on {value.device} but noise is on {device}")
            if not torch.isfinite(value).all():
                raise ValueError(f"{name} must be finite in every element")
            if bool((value == 1).all()):
                return None
            return value
        w = _real(name, value)
        return None if w == 1.0 else w

    def weights(self, sigmas: List[float], batch: int, device: torch.device) -> list:
        """The weight of every evaluation at the noise levels ``sigmas``, each checked once."""
        constant = None
        if self.fn is None and self.value is not None:
            constant = self._check(self.value, batch, device, "guidance")
            if constant is not None and self.gnet is None:
                raise ValueError("gnet is None but guidance != 1: pass the guiding network as gnet, or use guidance=1")
        out, seen = [], {}
        for sigma in sigmas:
            if self.interval is not None and not (self.interval[0] < sigma <= self.interval[1]):
                out.append(None)
            elif self.fn is None:
                out.append(constant)
            else:
                if sigma not in seen:  # Heun's t_next is the next step's t_cur: one call per level
                    w = self._check(self.fn(sigma), batch, device, f"guidance({sigma:g})")
                    if w is not None and self.gnet is None:
                        raise ValueError(f"gnet is None but guidance({sigma:g}) != 1: pass the guiding network as gnet")
                    seen[sigma] = w
                out.append(seen[sigma])
        return out


class _Noise:
    """``randn_like`` checked: its noise must have the sample's shape, dtype and device."""

    def __init__(self, randn_like, shape, dtype, device):
        self.fn, self.shape, self.dtype, self.device = randn_like, torch.Size(shape), dtype, device

    def __call__(self, x):
        eps = self.fn(x)
        if not isinstance(eps, torch.Tensor):
            raise TypeError(f"randn_like must return a torch.Tensor, got {type(eps).__name__}")
        if eps.shape != self.shape or eps.dtype != self.dtype or eps.device != self.device:
            raise ValueError(f"randn_like(x) must return noise like x ({tuple(self.shape)}, {self.dtype}, "
                             f"{self.device}), got ({tuple(eps.shape)}, {eps.dtype}, {eps.device})")
        return eps
