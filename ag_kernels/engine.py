"""The guided sampling engine: one EDM Heun run, eager or replayed from a CUDA graph.

:class:`GuidedSampler` holds two networks and the sampler's settings and samples batch after
batch.  It runs the algorithm of :func:`ag_kernels.edm_sampler` (EDM, Karras et al. 2022,
Algorithm 2, on the guided denoiser D_w = D_0 + w (D_1 - D_0) of Karras et al. 2024), which is
built on it, and adds what pays off when the same networks sample many batches on a GPU:

* CUDA graphs: on a GPU a guided run of small batches is bound by kernel launches and host
  work (a U-Net forward is hundreds of small kernels, twice per evaluation, 63 evaluations).  For
  each batch shape the whole run (both networks, the fused steps, the schedule) is captured once
  into a CUDA graph over static buffers and replayed per batch.  Churn noise is drawn before the
  replay, outside the graph, by the same ``randn_like`` calls in the same order as an eager run,
  into static buffers, so graph and eager runs take the same noise.
* Overlap: when both networks are evaluated at a noise level, the guiding network runs on a
  second CUDA stream concurrently with the main one (autoguidance's guide is usually the smaller
  network, and neither fills an H100 at small batches).
* One batched call for CFG with one network for both roles (``gnet is net``): the main and the
  guide inputs are concatenated into one batch (labels, then ``guide_labels``).
* Optional ``torch.compile`` of the networks (inductor with freezing, which folds per-forward
  weight arithmetic such as EDM2's weight normalization into constants).

Everything that holds for the whole run is decided once, per batch shape: the schedule, the
churned steps and their coefficients, the noise level of every network evaluation and the
guidance weight there.  Where a graph cannot be used (CPU tensors, or a network that
synchronizes or allocates in a way capture rejects) the engine says why once and runs eagerly,
with the same results.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .ops import D_DTYPES, PreparedSteps

__all__ = ["GuidedSampler", "NonFiniteError", "karras_schedule"]

SOLVERS = ("heun", "euler")
_SAME = object()  # guide_labels default: the guiding network gets the main network's labels


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


class NonFiniteError(ArithmeticError):
    """The samples became NaN or infinite during a run; the message names the step where it first happened."""


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


# --------------------------------------------------------------------------- guidance weights


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
        if interval is not None:
            if not isinstance(interval, (tuple, list)) or len(interval) != 2:
                raise TypeError(f"guidance_interval must be a pair (lo, hi), got {interval!r}")
            lo = _real("guidance_interval[0]", interval[0], nonnegative=True)
            hi = _real("guidance_interval[1]", interval[1], allow_inf=True)
            if not lo < hi:
                raise ValueError(f"guidance_interval must have lo < hi, got {tuple(interval)}")
            interval = (lo, hi)
        self.interval = interval
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


# --------------------------------------------------------------------------- one run's plan


@dataclass
class _Step:
    """Step i of a run: where it starts (t_hat), where it lands, and its churn, if any."""

    t_cur: torch.Tensor            # 0-d, in the sampler's dtype, on the device
    t_hat: torch.Tensor            # t_cur raised by churn, or t_cur itself
    t_next: torch.Tensor
    t_hat_host: float
    t_next_host: float
    churn: Optional[torch.Tensor]  # sqrt(t_hat^2 - t_cur^2) * S_noise (0-d), where churned
    heun: bool                     # Heun's correction follows the Euler step


@dataclass
class _Plan:
    """Everything fixed for a (device, dtype): the schedule as the networks and the ops see it."""

    t0: torch.Tensor
    steps: List[_Step]
    sigmas: List[float] = field(default_factory=list)  # the noise level of each evaluation, in order
    churned: int = 0


def _evaluate(name: str, network, x: torch.Tensor, t: torch.Tensor, labels) -> torch.Tensor:
    """network(x, t, labels), checked: a floating tensor of x's shape on x's device."""
    out = network(x, t, labels)
    # The usual output passes four attribute checks; anything else gets the detailed ones below.
    if isinstance(out, torch.Tensor) and out.dtype in D_DTYPES and out.shape == x.shape and out.device == x.device:
        return out
    return _check_output(name, out, x.shape, x)


def _check_output(name, out, shape, x):
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}(x, t, labels) must return a torch.Tensor, got {type(out).__name__}")
    if not out.is_floating_point():
        raise TypeError(f"{name}(x, t, labels) must return a floating-point tensor, got {out.dtype}")
    if out.shape != shape:
        raise ValueError(f"{name}(x, t, labels) returned shape {tuple(out.shape)}; expected {tuple(shape)}")
    if out.device != x.device:
        raise ValueError(f"{name}(x, t, labels) returned a tensor on {out.device}; expected {x.device}")
    if out.dtype not in D_DTYPES:
        out = out.to(x.dtype)  # e.g. float8: the ops read the four common float dtypes directly
    return out


@dataclass
class _Static:
    """The buffers a captured graph reads and writes; a replay refills the inputs and reads ``out``."""

    noise: torch.Tensor
    labels: Optional[torch.Tensor]
    guide_labels: Optional[torch.Tensor]
    eps: List[torch.Tensor]
    weights: list                  # per evaluation: None, a float, or a static [B] tensor
    slots: Dict[int, torch.Tensor]  # id of a caller's weight tensor -> its static copy (filled per call)
    flags: Optional[torch.Tensor] = None  # per step: did x become non-finite (check_finite)
    graph: Optional["torch.cuda.CUDAGraph"] = None
    out: Optional[torch.Tensor] = None


class GuidedSampler:
    """A reusable guided EDM sampler: ``GuidedSampler(net, gnet, **settings)(noise, labels)``.

    The settings are those of :func:`ag_kernels.edm_sampler` (same names, defaults and checks);
    calling the engine is ``edm_sampler(net, noise, labels, gnet, **settings)``, with the
    additions below.  The settings are checked once, here; each call checks its batch.

    Args beyond edm_sampler's:
        cuda_graph: True, False or "auto" (default: graphs when the noise is on a CUDA device).
            With graphs, the first call of each batch shape (and labels and per-sample-weight
            layout) runs the whole sampler once eagerly as a warm-up, captures it into a CUDA
            graph and replays it; later calls of that shape only refill the static inputs and
            replay.  At most ``max_graphs`` graphs are kept (least recently used dropped).
            Where graphs cannot be used the engine warns once why (True) or silently (auto) and
            runs eagerly.  The networks' parameters are read where they are at capture time:
            update them in place (``load_state_dict``, ``copy_``), not by replacing tensors.
        overlap: on CUDA, run the guiding network on a second stream concurrently with the main
            one (default True); no effect on the CPU, with one network, or where w = 1.
        batch_guide: evaluate both roles as one call on the concatenated batch: True, False, or
            "auto" (default: when ``gnet is net``).  Needs networks whose output for a sample
            does not depend on the rest of the batch.
        compile: ``torch.compile`` the networks (inductor, static shapes, freezing for modules
            in eval mode), compiled on first use per shape.  Off by default.
        max_graphs: how many captured graphs to keep (each holds its own memory pool).
        check_finite: after every step, note on the device whether the samples are still finite
            (two small kernels a step, no synchronization); at the end of the run raise
            :class:`NonFiniteError` naming the first step where they were not.

    Call:
        ``sampler(noise, labels=None, *, guide_labels=<labels>, randn_like=<the engine's>)``:
        noise [B, ...] standard normal; labels for ``net``; ``guide_labels`` for ``gnet`` (default
        the same labels; e.g. zeros for CFG with one network); ``randn_like`` the churn noise source
        for this call.  Returns the samples in ``dtype`` (a new tensor each call).

    Attributes after a call: ``last_mode`` ("graph" or "eager") and ``fallback_reason`` (None, or
    why graphs were not used).
    """

    def __init__(
        self,
        net,
        gnet=None,
        *,
        num_steps: int = 32,
        sigma_min: float = 0.002,
        sigma_max: float = 80,
        rho: float = 7,
        guidance=1,
        S_churn: float = 0,
        S_min: float = 0,
        S_max: float = float("inf"),
        S_noise: float = 1,
        dtype: torch.dtype = torch.float32,
        randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
        backend: str = "auto",
        guidance_interval: Optional[Tuple[float, float]] = None,
        solver: str = "heun",
        progress: bool = False,
        cuda_graph="auto",
        overlap: bool = True,
        batch_guide="auto",
        compile: bool = False,
        max_graphs: int = 4,
        check_finite: bool = False,
    ):
        if not callable(net):
            raise TypeError(f"net must be callable as net(x, t, labels), got {type(net).__name__}")
        if gnet is not None and not callable(gnet):
            raise TypeError(f"gnet must be callable as gnet(x, t, labels) or None, got {type(gnet).__name__}")
        if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral):
            raise TypeError(f"num_steps must be an integer, got {type(num_steps).__name__}")
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.num_steps = int(num_steps)
        self.sigma_min = _real("sigma_min", sigma_min, positive=True)
        self.sigma_max = _real("sigma_max", sigma_max, positive=True)
        if not self.sigma_min < self.sigma_max:
            raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={self.sigma_min}, sigma_max={self.sigma_max}")
        self.rho = _real("rho", rho, positive=True)
        self.S_churn = _real("S_churn", S_churn, nonnegative=True)
        self.S_min = _real("S_min", S_min, allow_inf=True)
        self.S_max = _real("S_max", S_max, allow_inf=True)
        self.S_noise = _real("S_noise", S_noise)
        if self.S_churn > 0 and not self.S_min <= self.S_max:
            raise ValueError(f"S_min must be <= S_max, got S_min={self.S_min}, S_max={self.S_max}: no step would "
                             f"be churned although S_churn={self.S_churn}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.dtype = dtype
        if not callable(randn_like):
            raise TypeError(f"randn_like must be callable, got {type(randn_like).__name__}")
        self.randn_like = randn_like
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        self.backend = backend
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        self.solver = solver
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
        self.progress = progress
        self.cuda_graph = _flag("cuda_graph", cuda_graph, auto=True)
        self.overlap = _flag("overlap", overlap)
        self.batch_guide = _flag("batch_guide", batch_guide, auto=True)
        self.compile = _flag("compile", compile)
        self.check_finite = _flag("check_finite", check_finite)
        if isinstance(max_graphs, bool) or not isinstance(max_graphs, numbers.Integral) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an integer >= 1, got {max_graphs!r}")
        self.max_graphs = int(max_graphs)
        self.guidance = _Guidance(guidance, gnet, guidance_interval)
        self.net, self.gnet = net, gnet
        self._batched = gnet is not None and (self.batch_guide is True or (self.batch_guide == "auto" and gnet is net))
        self._net_fn, self._gnet_fn = net, gnet
        if self.compile:
            self._net_fn = _compiled(net)
            self._gnet_fn = self._net_fn if gnet is net else (None if gnet is None else _compiled(gnet))
        self._plans: Dict[torch.device, _Plan] = {}
        self._graphs: "OrderedDict[tuple, Optional[_Static]]" = OrderedDict()
        self._streams: Dict[torch.device, "torch.cuda.Stream"] = {}
        self._warned = set()
        self._failed: Dict[tuple, str] = {}
        # Tests only: on the CPU, "capture" keeps the run's closure and "replay" calls it, so the
        # static buffers, their refilling and the graph cache are exercised without a GPU.
        self._emulate_graphs = False
        self.last_mode: Optional[str] = None
        self.fallback_reason: Optional[str] = None

    # ----------------------------------------------------------------------- the plan

    def _plan(self, device: torch.device) -> _Plan:
        plan = self._plans.get(device)
        if plan is not None:
            return plan
        dtype, n = self.dtype, self.num_steps
        # The schedule in the sampler's dtype on the data's device, as the reference computes it;
        # one host copy gives the ops their coefficients and the churn test its noise levels.
        t_steps = karras_schedule(n, self.sigma_min, self.sigma_max, self.rho, dtype=dtype, device=device)
        t_host = t_steps.tolist()
        t_dev = t_steps.unbind(0)
        gamma = min(self.S_churn / n, math.sqrt(2) - 1) if self.S_churn > 0 else 0.0
        # The reference compares t_cur (a `dtype` tensor) with S_min/S_max, which torch rounds to
        # `dtype` first: so does this, and a bound within an ulp of a noise level churns the same steps.
        s_min, s_max = (torch.tensor(v, dtype=dtype).item() for v in (self.S_min, self.S_max))
        steps, sigmas, churned = [], [], 0
        for i in range(n):
            t_cur, t_next = t_dev[i], t_dev[i + 1]
            churn = None
            if gamma > 0 and s_min <= t_host[i] <= s_max:
                # Churn (EDM Algorithm 2): the step starts at t_hat = t_cur (1 + gamma), with fresh noise
                # of std sqrt(t_hat^2 - t_cur^2) added; the same tensor expressions as the reference.
                t_hat = t_cur + gamma * t_cur
                churn = (t_hat ** 2 - t_cur ** 2).sqrt() * self.S_noise
                churned += 1
            else:
                t_hat = t_cur
            heun = self.solver == "heun" and i < n - 1  # the last step lands on t_N = 0: Euler only
            step = _Step(t_cur, t_hat, t_next, float(t_hat), t_host[i + 1], churn, heun)
            steps.append(step)
            sigmas.append(step.t_hat_host)
            if heun:
                sigmas.append(step.t_next_host)
        plan = _Plan(t0=t_dev[0], steps=steps, sigmas=sigmas, churned=churned)
        self._plans[device] = plan
        return plan

    # ----------------------------------------------------------------------- the run

    def _denoise(self, x, t, labels, guide_labels, w, stream):
        """(d_main, d_guide) at (x, t); d_guide is None (gnet not called) where w is None."""
        if w is None:
            return _evaluate("net", self._net_fn, x, t, labels), None
        if self._batched:
            # One call on [x; x] with [labels; guide_labels]: both roles of one network at once.
            both_labels = None if labels is None else torch.cat([labels, guide_labels])
            out = self._net_fn(torch.cat([x, x]), t, both_labels)
            b = x.shape[0]
            out = _check_output("net", out, (2 * b,) + tuple(x.shape[1:]), x)
            return out[:b], out[b:]
        if stream is None:
            d_main = _evaluate("net", self._net_fn, x, t, labels)
            return d_main, _evaluate("gnet", self._gnet_fn, x, t, guide_labels)
        # The guide on a second stream, concurrently with the main network; joined before the step.
        main = torch.cuda.current_stream(x.device)
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            d_guide = _evaluate("gnet", self._gnet_fn, x, t, guide_labels)
        d_main = _evaluate("net", self._net_fn, x, t, labels)
        # Join before the step reads d_guide.  No record_stream is needed: d_guide's memory can only
        # be reused by a later allocation on the side stream, and every later side-stream call
        # first waits for the main stream, so for the step that read d_guide.
        main.wait_stream(stream)
        return d_main, d_guide

    def _run(self, plan: _Plan, noise, labels, guide_labels, weights, eps, overlap: bool, flags=None):
        """One whole run: the sampler's loop.  ``eps(k, x)`` gives churned step k's noise; ``flags``
        (bool [num_steps] on the device, or None) receives, per step, whether x became non-finite."""
        stream = self._stream(noise.device) if overlap else None
        x_next = noise.to(self.dtype) * plan.t0
        # The steps write into two buffers in turn, so the step ops allocate nothing.
        ops = PreparedSteps(x_next, backend=self.backend)
        buffers = (x_next, torch.empty_like(x_next))
        steps = plan.steps
        if self.progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="edm_sampler", unit="step")
        e = k = 0
        for i, step in enumerate(steps):
            if flags is not None and i > 0:
                torch.logical_not(torch.isfinite(x_next).all(), out=flags[i - 1])
            x_cur = x_next
            if step.churn is not None:
                x_hat = x_cur + step.churn * eps(k, x_cur)
                k += 1
            else:
                x_hat = x_cur
            # The step writes into the buffer that x_hat is not (x_cur is no longer needed).
            x_euler = buffers[1] if x_hat is buffers[0] else buffers[0]
            w = weights[e]
            d_main, d_guide = self._denoise(x_hat, step.t_hat, labels, guide_labels, w, stream)
            e += 1
            ops.euler(x_hat, d_main, d_guide, w, step.t_hat_host, step.t_next_host, out=x_euler)
            if not step.heun:
                x_next = x_euler
                continue
            # Heun's correction with D_w at (x_euler, t_next), written over x_euler.
            w = weights[e]
            d_main, d_guide = self._denoise(x_euler, step.t_next, labels, guide_labels, w, stream)
            e += 1
            x_next = ops.heun(x_hat, x_euler, d_main, d_guide, w, step.t_hat_host, step.t_next_host, out=x_euler)
        if flags is not None:
            torch.logical_not(torch.isfinite(x_next).all(), out=flags[len(plan.steps) - 1])
        return x_next

    def _stream(self, device: torch.device):
        if device.type != "cuda":
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    # ----------------------------------------------------------------------- a call

    def _check_call(self, noise, labels, guide_labels, randn_like):
        if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
            raise TypeError(f"noise must be a floating-point torch.Tensor, got "
                            f"{noise.dtype if isinstance(noise, torch.Tensor) else type(noise).__name__}")
        if noise.dim() < 1 or noise.shape[0] < 1:
            raise ValueError(f"noise must have a batch dimension of at least 1, got shape {tuple(noise.shape)}")
        if guide_labels is _SAME:
            guide_labels = labels
        if self._batched and labels is not None:
            for name, v in (("labels", labels), ("guide_labels", guide_labels)):
                if not isinstance(v, torch.Tensor) or v.dim() < 1 or v.shape[0] != noise.shape[0]:
                    raise ValueError(f"batch_guide: {name} must be a tensor with one row per sample "
                                     f"({noise.shape[0]}) to be concatenated, got "
                                     f"{tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__}")
            if labels.shape[1:] != guide_labels.shape[1:] or labels.dtype != guide_labels.dtype:
                raise ValueError("batch_guide: labels and guide_labels must have one shape and dtype to be concatenated")
        elif self._batched and guide_labels is not None:
            raise ValueError("batch_guide: guide_labels given but labels is None; pass both or neither")
        if randn_like is None:
            randn_like = self.randn_like
        elif not callable(randn_like):
            raise TypeError(f"randn_like must be callable, got {type(randn_like).__name__}")
        return guide_labels, randn_like

    def _graph_reason(self, noise, labels, guide_labels) -> Optional[str]:
        """Why this call cannot use a CUDA graph (None: it can)."""
        if self.cuda_graph is False:
            return "cuda_graph=False"
        if noise.device.type != "cuda" and not self._emulate_graphs:
            return f"noise is on {noise.device.type}: CUDA graphs need CUDA tensors"
        for name, t in (("labels", labels), ("guide_labels", guide_labels)):
            if t is not None and not isinstance(t, torch.Tensor):
                return f"{name} is a {type(t).__name__}, not a tensor: a graph reads its inputs from static tensors"
        return None

    def __call__(self, noise: torch.Tensor, labels=None, *, guide_labels=_SAME, randn_like=None) -> torch.Tensor:
        guide_labels, randn_like = self._check_call(noise, labels, guide_labels, randn_like)
        plan = self._plan(noise.device)
        weights = self.guidance.weights(plan.sigmas, noise.shape[0], noise.device)
        overlap = self.overlap and self.gnet is not None and not self._batched and noise.device.type == "cuda"
        reason = self._graph_reason(noise, labels, guide_labels)
        # Outside torch.no_grad the reference tracks no gradients either: sampling never does.
        with torch.no_grad():
            if reason is None:
                out, reason = self._graph_call(plan, noise, labels, guide_labels, weights, randn_like, overlap)
                if out is not None:
                    self.last_mode, self.fallback_reason = "graph", None
                    self._report(self._graphs[self._last_key].flags, plan)
                    return out
            self.last_mode, self.fallback_reason = "eager", reason
            if self.cuda_graph is True and reason not in self._warned:
                self._warned.add(reason)
                warnings.warn(f"GuidedSampler: running eagerly, not from a CUDA graph: {reason}", stacklevel=2)
            eps = _Noise(randn_like, noise.shape, self.dtype, noise.device)
            flags = self._flags(plan, noise.device)
            out = self._run(plan, noise, labels, guide_labels, weights, lambda k, x: eps(x), overlap, flags)
            self._report(flags, plan)
            return out

    def _flags(self, plan: _Plan, device):
        return torch.zeros(len(plan.steps), dtype=torch.bool, device=device) if self.check_finite else None

    def _report(self, flags, plan: _Plan) -> None:
        """Raise NonFiniteError naming the first step after which the samples were not finite."""
        if flags is None or not bool(flags.any()):
            return
        i = int(flags.nonzero()[0])
        step = plan.steps[i]
        raise NonFiniteError(
            f"the samples became NaN or infinite at step {i + 1} of {len(plan.steps)} (sigma {step.t_hat_host:g} "
            f"-> {step.t_next_host:g}): a network returned non-finite values there, or the guidance made them "
            "overflow")

    # ----------------------------------------------------------------------- graphs

    def _key(self, noise, labels, guide_labels, weights):
        def meta(t):
            return None if t is None else (tuple(t.shape), t.dtype, t.device)

        # Floats are baked into the graph's kernel launches; per-sample tensors are read from
        # static buffers, so only their place in the run (and dtype) is part of the key.
        pattern = tuple(w if not isinstance(w, torch.Tensor) else ("tensor", w.dtype) for w in weights)
        return (meta(noise), meta(labels), meta(guide_labels), guide_labels is labels, pattern)

    def _static(self, plan, noise, labels, guide_labels, weights) -> _Static:
        """Static copies of a call's inputs, laid out as the graph will read them."""
        def like(t):
            return None if not isinstance(t, torch.Tensor) else torch.empty_like(t, memory_format=torch.contiguous_format)

        st_labels = labels if not isinstance(labels, torch.Tensor) else like(labels)
        if guide_labels is labels:
            st_guide = st_labels
        else:
            st_guide = guide_labels if not isinstance(guide_labels, torch.Tensor) else like(guide_labels)
        slots: Dict[int, torch.Tensor] = {}
        st_weights = []
        for w in weights:
            if isinstance(w, torch.Tensor):
                if id(w) not in slots:
                    slots[id(w)] = torch.empty(w.shape, dtype=w.dtype, device=w.device)
                st_weights.append(slots[id(w)])
            else:
                st_weights.append(w)
        eps = [torch.empty(noise.shape, dtype=self.dtype, device=noise.device) for _ in range(plan.churned)]
        return _Static(noise=like(noise), labels=st_labels, guide_labels=st_guide, eps=eps,
                       weights=st_weights, slots=slots, flags=self._flags(plan, noise.device))

    def _fill(self, st: _Static, noise, labels, guide_labels, weights, randn_like):
        """Copy a call's inputs into the static buffers; draw its churn noise in the reference's order."""
        st.noise.copy_(noise)
        if isinstance(st.labels, torch.Tensor):
            st.labels.copy_(labels)
        if isinstance(st.guide_labels, torch.Tensor) and st.guide_labels is not st.labels:
            st.guide_labels.copy_(guide_labels)
        # The static slots follow the run's evaluation order; this call's tensors go in the same order.
        done = set()
        for w, slot in zip(weights, st.weights):
            if isinstance(w, torch.Tensor) and id(slot) not in done:
                slot.copy_(w)
                done.add(id(slot))
        draw = _Noise(randn_like, noise.shape, self.dtype, noise.device)
        for buf in st.eps:
            buf.copy_(draw(buf))

    def _replay_fn(self, plan, st: _Static, overlap):
        eps = st.eps

        def run():
            return self._run(plan, st.noise, st.labels, st.guide_labels, st.weights, lambda k, x: eps[k], overlap,
                             st.flags)

        return run

    def _graph_call(self, plan, noise, labels, guide_labels, weights, randn_like, overlap):
        """(samples, None) from a graph replay, or (None, why not)."""
        key = self._key(noise, labels, guide_labels, weights)
        self._last_key = key
        if key in self._graphs:
            self._graphs.move_to_end(key)
            st = self._graphs[key]
            if st is None:
                return None, self._failed[key]
            self._fill(st, noise, labels, guide_labels, weights, randn_like)
            st.graph.replay()
            return st.out.clone(), None
        st = self._static(plan, noise, labels, guide_labels, weights)
        self._fill(st, noise, labels, guide_labels, weights, randn_like)
        run = self._replay_fn(plan, st, overlap)
        device = noise.device
        if device.type != "cuda":  # _emulate_graphs
            st.graph = _Emulated(run, st)
            self._remember(key, st, None)
            st.graph.replay()
            return st.out.clone(), None
        # Warm up on a side stream (lazy initialization, autotuning, Triton compiles and
        # torch.compile happen here, not under capture); a genuine error of the networks is raised
        # here, as in an eager run.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                st.out = run()
        except Exception as exc:  # capture rejected something the networks do: run eagerly from now on
            lines = str(exc).strip().splitlines()
            reason = f"capture failed ({type(exc).__name__}: {lines[0] if lines else 'no message'})"
            try:
                torch.cuda.synchronize(device)
            except Exception:  # pragma: no cover - the eager run will report a broken device
                pass
            self._remember(key, None, reason)
            return None, reason
        st.graph = graph
        self._remember(key, st, None)
        graph.replay()
        return st.out.clone(), None

    def _remember(self, key, st, reason):
        self._graphs[key] = st
        if reason is not None:
            self._failed[key] = reason
        while len(self._graphs) > self.max_graphs:
            old, _ = self._graphs.popitem(last=False)
            self._failed.pop(old, None)

    def reset(self) -> None:
        """Drop every captured graph (and its memory pool); the next call captures anew."""
        self._graphs.clear()
        self._failed.clear()
        self._plans.clear()


class _Emulated:
    """A stand-in for a captured graph (tests, CPU): replaying runs the same closure over the static buffers."""

    def __init__(self, run, st: _Static):
        self.run, self.st = run, st

    def replay(self):
        self.st.out = self.run()


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


def _compiled(net):
    """torch.compile of a network: static shapes; inductor freezing for an nn.Module in eval mode."""
    options = None
    if isinstance(net, torch.nn.Module) and not net.training:
        options = {"freezing": True}
    return torch.compile(net, dynamic=False, options=options)
