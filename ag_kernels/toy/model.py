"""The toy experiment's denoisers: small magnitude-preserving MLPs that model a log-density.

As in the paper's 2-D toy (Karras et al. 2024, Sec. 3 and App.), a network does not output D
directly: it outputs a scalar log-density log p(x; sigma), and the denoiser is Tweedie's formula
D(x; sigma) = x + sigma^2 grad_x log p(x; sigma).  Our parameterization (written for this
project) makes that exact for Gaussian data of variance sigma_data^2 when the network outputs 0:

    log p(x; sigma) = -|x|^2 / (2 (sigma^2 + sigma_data^2)) + (sigma_data / sigma) F(c_in x, c_noise)

so that D = c_skip x + c_out grad_u F(u) at u = c_in x, with EDM's c_skip, c_out, c_in and
c_noise = log(sigma) / 4.  F is a magnitude-preserving MLP (EDM2's design ideas: weights
normalized to unit norm per output feature, a scaled SiLU and scaled sums keep activations at unit
magnitude), so its input gradient is of unit scale at every noise level.

Training (:func:`train`) regresses D onto the exact denoiser of the ground-truth mixture
("exact score matching": the target is known in closed form, no data noise), with the EDM loss
weight and an exponential moving average (EMA) of the weights, the model that is sampled.
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..models.nets import register_arch

__all__ = ["ToyDenoiser", "train", "power_ema_exponent", "SIGMA_DATA"]

SIGMA_DATA = 0.5


def _mp_silu(x: torch.Tensor) -> torch.Tensor:
    # SiLU of a unit-variance normal has RMS 0.596: dividing keeps activations at unit magnitude.
    return nn.functional.silu(x) / 0.596


class _MPLinear(nn.Module):
    """A linear layer whose effective weight rows have unit norm (forced weight normalization)."""

    def __init__(self, in_features: int, out_features: int, generator: torch.Generator):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features, generator=generator, dtype=torch.float64))

    def normalized(self, dtype: torch.dtype) -> torch.Tensor:
        w = self.weight.to(dtype)
        # Unit-norm rows keep the output magnitude equal to the input's (unit-variance inputs stay so).
        return w / (w.norm(dim=1, keepdim=True) + 1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.normalized(x.dtype).t()



@register_arch("toy_mlp")
class ToyDenoiser(nn.Module):
    """EDM-preconditioned denoiser for 2-D points whose output is the gradient of a learned log-density.

    Args:
        hidden: features per hidden layer (64 for the paper's main model, 32 for the small ones).
        layers: hidden layers (4 in the paper's toy).
        seed: initialization seed (deterministic).
        dim: data dimension (2).
        fourier: random Fourier features of x added to the input (0: the paper's plain MLP).  Each
            frequency f (drawn once from the seed, N(0, fourier_scale^2) cycles per unit of x) gives
            sqrt(2) sin/cos(2 pi f.x), damped by exp(-2 pi^2 |f|^2 sigma^2): the factor by which noise
            of level sigma damps that frequency of the data density, so detail finer than sigma
            cannot leak into the noisier levels.
        fourier_scale: the frequencies' standard deviation (cycles per unit of x).

    ``forward(x, sigma, labels=None)`` returns D(x; sigma) [N, dim] (``labels`` is ignored: one model
    per class).  ``log_prob(x, sigma)`` returns the modelled log-density (up to a constant).
    """

    def __init__(self, hidden: int = 64, layers: int = 4, seed: int = 0, dim: int = 2, fourier: int = 0,
                 fourier_scale: float = 16.0):
        super().__init__()
        for name, value, low in (("hidden", hidden, 1), ("layers", layers, 1), ("dim", dim, 1), ("fourier", fourier, 0)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if isinstance(fourier_scale, bool) or not isinstance(fourier_scale, numbers.Real) or not 0 < fourier_scale < 1e4:
            raise ValueError(f"fourier_scale must be a number in (0, 1e4), got {fourier_scale!r}")
        self.init_kwargs = dict(hidden=int(hidden), layers=int(layers), seed=int(seed), dim=int(dim))
        if fourier:
            # Only then: checkpoints of the plain MLP keep their kwargs (and bytes) as before.
            self.init_kwargs.update(fourier=int(fourier), fourier_scale=float(fourier_scale))
        gen = torch.Generator().manual_seed(int(seed))
        self.dim = int(dim)
        self.fourier = int(fourier)
        if self.fourier:
            fgen = torch.Generator().manual_seed(int(seed) + 1_000_003)
            freqs = torch.randn(self.fourier, self.dim, generator=fgen, dtype=torch.float64) * float(fourier_scale)
            self.register_buffer("freqs", freqs)
        # Input: the preconditioned point, the noise embedding, a constant 1 (a bias through the
        # normalized weights) and the Fourier features, if any.
        self.inp = _MPLinear(self.dim + 2 + 2 * self.fourier, hidden, gen)
        self.hidden = nn.ModuleList([_MPLinear(hidden, hidden, gen) for _ in range(layers - 1)])
        self.out = _MPLinear(hidden, 1, gen)
        # A learned output gain starting at 0: the untrained model is the Gaussian N(0, sigma_data^2).
        self.gain = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def _features(self, x: torch.Tensor, s: torch.Tensor):
        """The damped Fourier features' phases z = 2 pi x f^T and damping a [N, F] (see the class doc)."""
        f = self.freqs.to(x.dtype)
        z = (2 * math.pi) * (x @ f.t())
        a = torch.exp((-2 * math.pi**2) * (s**2) * (f**2).sum(1))
        return z, a

    def _fourier_inputs(self, x: torch.Tensor, s: torch.Tensor):
        """The input columns sqrt(2) a sin z and sqrt(2) a cos z, and (a, sin z, cos z) for the chain rule."""
        z, a = self._features(x, s)
        sin_z, cos_z = torch.sin(z), torch.cos(z)
        return [math.sqrt(2) * a * sin_z, math.sqrt(2) * a * cos_z], (a, sin_z, cos_z)

    def _energy(self, u: torch.Tensor, c_noise: torch.Tensor, extra=()) -> torch.Tensor:
        ones = torch.ones_like(c_noise)
        h = self.inp(torch.cat([u, c_noise, ones, *extra], dim=1))
        for layer in self.hidden:
            # Magnitude-preserving residual sum: (a + b) / sqrt(2) for unit-magnitude a and b.
            h = (h + layer(_mp_silu(h))) / math.sqrt(2)
        return self.out(_mp_silu(h))[:, 0] * self.gain.to(u.dtype)

    def _sigma(self, x: torch.Tensor, sigma) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if s.dim() == 0:
            s = s.expand(x.shape[0])
        return s.reshape(x.shape[0], 1)

    def log_prob(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """The modelled log p(x; sigma) [N], up to an additive constant per sigma."""
        s = self._sigma(x, sigma)
        var = s**2 + SIGMA_DATA**2
        u = x / var.sqrt()
        extra = self._fourier_inputs(x, s)[0] if self.fourier else ()
        return -(x**2).sum(dim=1) / (2 * var[:, 0]) + (SIGMA_DATA / s[:, 0]) * self._energy(u, s.log() / 4, extra)

    def forward(self, x: torch.Tensor, sigma, labels=None) -> torch.Tensor:
        """D(x; sigma) = x + sigma^2 grad log p(x; sigma), differentiable when training."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape [N, {self.dim}], got {tuple(x.shape)}")
        s = self._sigma(x, sigma)
        if not torch.is_grad_enabled():
            return self._sample_forward(x, s)
        # The gradient w.r.t. x is needed even under no_grad (sampling); in training it stays in the
        # graph (create_graph) so the loss on D reaches the weights.
        with torch.enable_grad():
            xg = x if x.requires_grad else x.detach().requires_grad_(True)
            logp = self.log_prob(xg, s)
            (grad,) = torch.autograd.grad(logp.sum(), xg, create_graph=self.training)
        return x + s**2 * grad

    def _weights(self, dtype: torch.dtype):
        """What :meth:`_sample_forward` multiplies by, in ``dtype``, kept until a parameter changes
        (its version moves): the normalized weights, transposed, with the hidden layers' constants
        (1/0.596 of the scaled SiLU, 1/sqrt(2) of the residual sum) folded in."""
        # Read through the parameter dicts: nn.Module attribute lookups cost more than the rest.
        layers = [self._modules["inp"], *self._modules["hidden"]._modules.values(), self._modules["out"]]
        params = [layer._parameters["weight"] for layer in layers] + [self._parameters["gain"]]
        if self.fourier:
            params.append(self._buffers["freqs"])
        key = (dtype, tuple((id(p), p.data_ptr(), p._version) for p in params))
        cache = self.__dict__.get("_weight_cache")
        if cache is None or cache[0] != key:
            with torch.no_grad():
                scale = 1 / (0.596 * math.sqrt(2))
                w_in = self.inp.normalized(dtype)
                hidden = [layer.normalized(dtype) * scale for layer in self.hidden]
                w_out = self.out.normalized(dtype)[0] * (self.gain.to(dtype) / 0.596)
                d, f = self.dim, self.fourier
                fourier = None
                if f:
                    # The sin and cos columns of the input layer, and 2 pi sqrt(2) f for the chain rule.
                    fourier = (w_in[:, d + 2: d + 2 + f].contiguous(), w_in[:, d + 2 + f:].contiguous(),
                               (2 * math.pi * math.sqrt(2)) * self.freqs.to(dtype))
                cache = (key, (w_in.t().contiguous(), w_in[:, :d].contiguous(),
                               [w.t().contiguous() for w in hidden], hidden, w_out, fourier))
            self.__dict__["_weight_cache"] = cache
        return cache[1]

    def _sample_forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """D(x; sigma) with grad log p formed by a hand-written backward pass through the MLP.

        Sampling needs no graph: this is the function of the autograd path of :meth:`forward`
        (tested to agree), at a fraction of its cost for small batches, where autograd's per-op
        bookkeeping and the per-call weight normalization dominate.  Per residual stage,
        h' = (h + mp_silu(h) W^T) / sqrt(2), and mp_silu'(h) = sigmoid(h) (1 + h (1 - sigmoid(h))) / 0.596.
        """
        w_in_t, w_in_u, hidden_t, hidden, w_out, fourier = self._weights(x.dtype)
        r2 = 1 / math.sqrt(2)
        var = s**2 + SIGMA_DATA**2
        c_in = var.rsqrt()
        c_noise = s.log() / 4
        inputs = [x * c_in, c_noise, torch.ones_like(c_noise)]
        if fourier is not None:
            columns, (a, sin_z, cos_z) = self._fourier_inputs(x, s)
            inputs += columns
        h = torch.cat(inputs, dim=1) @ w_in_t
        # Forward pass, keeping each stage's SiLU derivative (without its 1/0.596, folded into W).
        slopes = []
        for w_t in hidden_t:
            z = torch.sigmoid(h)
            silu = h * z
            slopes.append(silu.mul(1 - z).add_(z))  # z (1 + h (1 - z))
            h = torch.addmm(h, silu, w_t, beta=r2)
        # Backward pass of F = gain * out(mp_silu(h)) down to the input u = c_in x.
        z = torch.sigmoid(h)
        g = (h * z).mul_(1 - z).add_(z).mul_(w_out)
        for w, slope in zip(reversed(hidden), reversed(slopes)):
            g = torch.addcmul(g, g @ w, slope, value=1 / r2).mul_(r2)
        # grad_x log p = -x / var + (sigma_data / sigma) (c_in grad_u F + the features' chain rule).
        grad_f = c_in * (g @ w_in_u)
        if fourier is not None:
            w_sin, w_cos, f2 = fourier
            # d/dx sqrt(2) a sin(z) = sqrt(2) a cos(z) 2 pi f, d/dx sqrt(2) a cos(z) = -sqrt(2) a sin(z) 2 pi f.
            grad_f = grad_f + (a * ((g @ w_sin) * cos_z - (g @ w_cos) * sin_z)) @ f2
        grad = torch.addcmul(-x / var, SIGMA_DATA / s, grad_f)
        return torch.addcmul(x, s**2, grad)


def power_ema_exponent(std: float) -> float:
    """The exponent gamma of a power-function EMA whose profile has relative standard deviation ``std``.

    EDM2 (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models")
    averages with beta_t = (1 - 1/t)^(gamma + 1), whose weight profile over training has relative
    std sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))); this inverts that (it decreases in gamma).
    """
    if not (isinstance(std, numbers.Real) and 0 < std < 0.2886):
        raise ValueError(f"ema_std must be a number in (0, 0.2886), got {std!r}")

    def rel_std(g):
        return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))

    lo, hi = 0.0, 1e9  # gamma >= 0: where the std falls monotonically from 0.2887
    for _ in range(200):
        mid = math.sqrt((lo + 1) * (hi + 1)) - 1  # bisection in log(gamma + 1)
        if rel_std(mid) > std:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def train(
    model: Union[ToyDenoiser, Sequence[ToyDenoiser]],
    target_denoiser: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
    sample_data: Callable[[int, torch.Generator], torch.Tensor],
    *,
    iterations: int,
    batch_size: int = 4096,
    lr: float = 1e-2,
    lr_ref: int = 512,
    ema_std=0.010,
    p_mean: float = -2.3,
    p_std: float = 1.5,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    log: Optional[Callable[[int, float], None]] = None,
    on_step: Optional[Callable[[int, object], None]] = None,
) -> ToyDenoiser:
    """Fit ``model`` as a denoiser and return its power-function EMA (in eval mode).

    ``sample_data(n, generator)`` draws clean data y.  Each iteration draws sigma log-normally
    (log sigma ~ N(p_mean, p_std^2), EDM's training distribution), noisy points x = y + sigma n, and
    minimizes the EDM-weighted squared error lambda(sigma) |D_theta(x; sigma) - target|^2 with
    lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, which makes every noise level
    contribute at unit scale.  The target is ``target_denoiser(x, sigma)`` (the exact denoiser of
    the ground truth: same optimum as denoising score matching, far less gradient noise), or y
    itself when ``target_denoiser`` is None (denoising score matching).  Adam at ``lr`` up to
    iteration ``lr_ref``, then decaying as 1/sqrt(t / lr_ref); the returned weights are a
    power-function EMA with relative std ``ema_std`` (see :func:`power_ema_exponent`); for a
    sequence of stds, a list of one EMA per std (from the same run).
    The parameters stay float64; the forward pass runs in ``dtype``.  ``on_step(t, ema)``, if
    given, sees the EMA (or the list of them) after each iteration t = 1..iterations: a snapshot
    there is the model a run of t iterations returns (the schedules depend on t only).

    ``model`` may be a sequence of models: they train in lockstep on the same batches and targets
    (drawn and computed once), each with its own optimizer and EMAs, and each ends bitwise equal to
    a run of its own with the same arguments (the exact targets are most of an iteration's cost).
    Then the result, ``log``'s loss and ``on_step``'s EMAs are lists with one entry per model.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if isinstance(lr_ref, bool) or not isinstance(lr_ref, numbers.Integral) or lr_ref < 1:
        raise ValueError(f"lr_ref must be an integer >= 1, got {lr_ref!r}")
    several = isinstance(ema_std, (list, tuple))
    gammas = [power_ema_exponent(v) for v in (ema_std if several else [ema_std])]
    group = isinstance(model, (list, tuple))
    models = list(model) if group else [model]
    if not models or any(not isinstance(m, nn.Module) for m in models):
        raise TypeError("model must be a ToyDenoiser or a non-empty sequence of them")
    if len({id(m) for m in models}) != len(models):
        raise ValueError("model: the same module appears twice; give each run its own model")
    gen = torch.Generator().manual_seed(int(seed))
    emas = [[copy.deepcopy(m).eval() for _ in gammas] for m in models]
    opts = []
    for m in models:
        m.train()
        opts.append(torch.optim.Adam(m.parameters(), lr=lr, betas=(0.9, 0.99)))
    # What log/on_step see and train returns: per model, its EMA or list of EMAs (updated in place).
    views = [e if several else e[0] for e in emas]
    steps = range(iterations)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="train", unit="it")
    for it in steps:
        y = sample_data(batch_size, gen).to(torch.float64)
        sigma = torch.exp(p_mean + p_std * torch.randn(batch_size, generator=gen, dtype=torch.float64))
        x = y + sigma[:, None] * torch.randn(y.shape, generator=gen, dtype=torch.float64)
        if target_denoiser is None:
            target = y.to(dtype)
        else:
            with torch.no_grad():
                target = target_denoiser(x, sigma).to(dtype)
        weight = ((sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2).to(dtype)
        # Data and target are drawn in float64; the network runs in ``dtype`` (float32 is 2.5x faster
        # on a CPU, and the sampler evaluates it in float32 anyway).
        x_in, sigma_in = x.to(dtype), sigma.to(dtype)
        losses = []
        for m, opt, m_emas in zip(models, opts, emas):
            loss = (weight * ((m(x_in, sigma_in) - target) ** 2).sum(dim=1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for param_group in opt.param_groups:
                param_group["lr"] = lr / math.sqrt(max(it / lr_ref, 1))  # constant, then inverse-sqrt decay
            opt.step()
            # Power-function EMA (EDM2): the average's length grows in proportion to training time.
            with torch.no_grad():
                for ema, gamma in zip(m_emas, gammas):
                    beta = (1 - 1 / (it + 1)) ** (gamma + 1)
                    for p_ema, p in zip(ema.parameters(), m.parameters()):
                        p_ema.lerp_(p.detach(), 1 - beta)
            losses.append(float(loss.detach()))
        if log is not None:
            log(it, losses if group else losses[0])
        if on_step is not None:
            on_step(it + 1, views if group else views[0])
    for m in models:
        m.eval()
    return views if group else views[0]
