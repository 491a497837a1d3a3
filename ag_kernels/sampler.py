"""A drop-in guided EDM sampler built on the fused step ops.

``edm_sampler`` takes the arguments of the reference EDM2 sampler (Karras et al. 2024,
``generate_images.py``), in the same order and with the same defaults, and runs the same
algorithm: the EDM Heun sampler (Karras et al. 2022, Algorithm 2) on the guided denoiser
D_w = D_0 + w (D_1 - D_0) (autoguidance / CFG), with the Karras noise schedule and optional
stochastic churn.  Each step's blend, derivative and update run as one fused op
(:func:`ag_kernels.euler_step`, :func:`ag_kernels.heun_step`) instead of five or six eager ones.

Beyond the reference: per-sample guidance (a tensor [B]), guidance as a function of sigma, a
guidance interval (Kynkäänniemi et al. 2024) outside which the guiding network is not evaluated,
an Euler solver, and a progress bar.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from .ops import D_DTYPES, PreparedSteps

__all__ = ["edm_sampler", "karras_schedule"]

SOLVERS = ("heun", "euler")


def karras_schedule(num_steps: int, sigma_min: float, sigma_max: float, rho: float, *, dtype=torch.float32,
                    device=None) -> torch.Tensor:
    """Noise levels t_0 > ... > t_{N-1} of Karras et al. (2022, Eq. 5), then t_N = 0: N + 1 values in ``dtype``.

    Evaluated with the reference sampler's expression in ``dtype`` on ``device``, so the networks
    see the same noise levels.  With ``num_steps == 1`` the schedule is [sigma_max, 0] (the
    reference's formula divides by num_steps - 1 there).
    """
    step_indices = torch.arange(num_steps, dtype=dtype, device=device)
    if num_steps > 1:
        t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1)
                   * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    else:
        t_steps = torch.full((1,), sigma_max, dtype=dtype, device=device)
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])


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


class _Guidance:
    """The guidance weight to use at a given sigma: a number, a per-sample tensor, or None for no guidance."""

    def __init__(self, guidance, gnet, interval, batch: int, device: torch.device):
        self.fn: Optional[Callable] = None
        self.constant = None
        if callable(guidance) and not isinstance(guidance, torch.Tensor):
            self.fn = guidance
        else:
            self.constant = self._check(guidance, batch, device, "guidance")
        if interval is not None:
            if (not isinstance(interval, (tuple, list)) or len(interval) != 2):
                raise TypeError(f"guidance_interval must be a pair (lo, hi), got {interval!r}")
            lo = _real("guidance_interval[0]", interval[0], nonnegative=True)
            hi = _real("guidance_interval[1]", interval[1], allow_inf=True)
            if not lo < hi:
                raise ValueError(f"guidance_interval must have lo < hi, got {tuple(interval)}")
            interval = (lo, hi)
        self.interval = interval
        self.gnet = gnet
        self.batch, self.device = batch, device
        if self.constant is not None and gnet is None:
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

    def at(self, sigma: float):
        """The weight for an evaluation at noise level sigma; None means: evaluate net only."""
        if self.interval is not None and not (self.interval[0] < sigma <= self.interval[1]):
            return None
        if self.fn is None:
            return self.constant
        w = self._check(self.fn(sigma), self.batch, self.device, f"guidance({sigma:g})")
        if w is not None and self.gnet is None:
            raise ValueError(f"gnet is None but guidance({sigma:g}) != 1: pass the guiding network as gnet")
        return w


def _evaluate(name: str, network, x: torch.Tensor, t: torch.Tensor, labels) -> torch.Tensor:
    """network(x, t, labels), checked: a floating tensor of x's shape on x's device."""
    out = network(x, t, labels)
    # The usual output passes four attribute checks; anything else gets the detailed ones below.
    if isinstance(out, torch.Tensor) and out.dtype in D_DTYPES and out.shape == x.shape and out.device == x.device:
        return out
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}(x, t, labels) must return a torch.Tensor, got {type(out).__name__}")
    if not out.is_floating_point():
        raise TypeError(f"{name}(x, t, labels) must return a floating-point tensor, got {out.dtype}")
    if out.shape != x.shape:
        raise ValueError(f"{name}(x, t, labels) returned shape {tuple(out.shape)}; expected x's shape {tuple(x.shape)}")
    if out.device != x.device:
        raise ValueError(f"{name}(x, t, labels) returned a tensor on {out.device}; expected {x.device}")
    if out.dtype not in D_DTYPES:
        out = out.to(x.dtype)  # e.g. float8: the ops read the four common float dtypes directly
    return out


def _denoised(net, gnet, guidance: _Guidance, x, t_host: float, t_dev, labels):
    """(d_main, d_guide, w) at (x, t): d_guide is None (and gnet not called) where no guidance applies."""
    w = guidance.at(t_host)
    d_main = _evaluate("net", net, x, t_dev, labels)
    if w is None:
        return d_main, None, 1.0
    return d_main, _evaluate("gnet", gnet, x, t_dev, labels), w


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
) -> torch.Tensor:
    """Sample with the guided EDM sampler; a drop-in replacement for the EDM2 reference ``edm_sampler``.

    Args (as the reference):
        net: the main network D_1, called as ``net(x, t, labels)`` with x in ``dtype`` and t a 0-d tensor.
        noise: standard normal noise [B, ...]; sampling starts at ``noise * sigma_max``.
        labels: passed to the networks unchanged.
        gnet: the guiding network D_0 (a worse model for autoguidance, the unconditional one for
            CFG), called as ``gnet(x, t, labels)``; never called where the weight is 1.
        num_steps, sigma_min, sigma_max, rho: the Karras schedule (N >= 1, 0 < sigma_min < sigma_max, rho > 0).
        guidance: the weight w of D_w = D_0 + w (D_1 - D_0).  Also: a per-sample tensor [B], or a
            function of sigma (a Python float) returning a number or a tensor [B].
        S_churn, S_min, S_max, S_noise: stochastic churn (EDM, Algorithm 2); the churn noise is
            drawn with ``randn_like(x)`` once per churned step, in the reference's order.
        dtype: float32 or float64: the sampler's dtype; network outputs are read in it.
        randn_like: the churn noise source.

    Keyword-only extensions:
        backend: "auto", "torch", "triton" or "ext" (see :func:`ag_kernels.available_backends`).
        guidance_interval: (lo, hi): guide only for sigma in (lo, hi]; elsewhere w = 1 and gnet is
            not evaluated (Kynkäänniemi et al. 2024).
        solver: "heun" (the reference: 2nd order, Euler on the last step) or "euler".
        progress: show a tqdm progress bar over the steps.

    Returns:
        The samples at t_N = 0, in ``dtype``, with noise's shape.  Gradients are not tracked.
    """
    if not callable(net):
        raise TypeError(f"net must be callable as net(x, t, labels), got {type(net).__name__}")
    if gnet is not None and not callable(gnet):
        raise TypeError(f"gnet must be callable as gnet(x, t, labels) or None, got {type(gnet).__name__}")
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point torch.Tensor, got "
                        f"{noise.dtype if isinstance(noise, torch.Tensor) else type(noise).__name__}")
    if noise.dim() < 1 or noise.shape[0] < 1:
        raise ValueError(f"noise must have a batch dimension of at least 1, got shape {tuple(noise.shape)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
        raise TypeError(f"num_steps must be an integer, got {type(num_steps).__name__}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigma_min = _real("sigma_min", sigma_min, positive=True)
    sigma_max = _real("sigma_max", sigma_max, positive=True)
    if not sigma_min < sigma_max:
        raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    rho = _real("rho", rho, positive=True)
    S_churn = _real("S_churn", S_churn, nonnegative=True)
    S_min = _real("S_min", S_min, allow_inf=True)
    S_max = _real("S_max", S_max, allow_inf=True)
    S_noise = _real("S_noise", S_noise)
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if not callable(randn_like):
        raise TypeError(f"randn_like must be callable, got {type(randn_like).__name__}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    device = noise.device
    weights = _Guidance(guidance, gnet, guidance_interval, noise.shape[0], device)

    # The schedule in the sampler's dtype on the data's device, as the reference computes it; the
    # host copy (one read) gives the ops their coefficients and the churn test its sigma.
    t_steps = karras_schedule(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=device)
    t_host: List[float] = t_steps.tolist()
    gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_churn > 0 else 0.0
    # The reference compares t_cur (a `dtype` tensor) with S_min/S_max, which torch rounds to `dtype`
    # first: do the same, so that a bound within an ulp of a noise level churns the same steps.
    S_min_t, S_max_t = (torch.tensor(v, dtype=dtype).item() for v in (S_min, S_max))

    x_next = noise.to(dtype) * t_steps[0]
    # Everything that holds for the whole run is decided here, once: the backend's kernel ops, the
    # noise levels as 0-d tensors for the networks and as floats for the ops, and two buffers
    # that the steps write into in turn (the step ops then allocate nothing).
    steps_ops = PreparedSteps(x_next, backend=backend)
    t_dev = t_steps.unbind(0)
    buffers = (x_next, torch.empty_like(x_next))
    steps = range(num_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="edm_sampler", unit="step")
    for i in steps:
        x_cur = x_next
        t_cur, t_next, t_next_host = t_dev[i], t_dev[i + 1], t_host[i + 1]
        if gamma > 0 and S_min_t <= t_host[i] <= S_max_t:
            # Churn (EDM Algorithm 2): raise the noise level to t_hat by adding fresh noise.
            t_hat = t_cur + gamma * t_cur
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
            t_hat_host = float(t_hat)
        else:
            t_hat, x_hat, t_hat_host = t_cur, x_cur, t_host[i]

        # The step writes into the buffer that x_hat is not (x_cur is no longer needed).
        x_euler = buffers[1] if x_hat is buffers[0] else buffers[0]
        d_main, d_guide, w = _denoised(net, gnet, weights, x_hat, t_hat_host, t_hat, labels)
        steps_ops.euler(x_hat, d_main, d_guide, w, t_hat_host, t_next_host, out=x_euler)
        if solver == "euler" or i == num_steps - 1:
            x_next = x_euler  # the last step lands on t_N = 0: Euler only, as the reference
            continue
        # Heun's correction with D_w at (x_euler, t_next), written over x_euler.
        d_main, d_guide, w = _denoised(net, gnet, weights, x_euler, t_next_host, t_next, labels)
        x_next = steps_ops.heun(x_hat, x_euler, d_main, d_guide, w, t_hat_host, t_next_host, out=x_euler)
    return x_next
