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
* Optional ``torch.compile`` of the networks (inductor, static shapes).  Not frozen: the
  parameters stay inputs of the compiled code, so weights updated in place are seen (inductor's
  freezing would fold them, EDM2's weight normalization included, into constants at the first
  compile and silently ignore later updates).

Everything that holds for the whole run is decided once, per batch shape: the schedule, the
churned steps and their coefficients, the noise level of every network evaluation and the
guidance weight there.  Where a graph cannot be used (CPU tensors, or a network that
synchronizes or allocates in a way capture rejects) the engine says why once and runs eagerly,
with the same results.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch

from ..kernels.ops import D_DTYPES, PreparedSteps
from ._graphs import GraphCache
from ._plan import MULTISTEP, _Plan, karras_schedule, make_plan
from ._settings import _SAME, SOLVERS, _flag, _Guidance, _Noise, _real

__all__ = ["GuidedSampler", "NonFiniteError", "karras_schedule", "SOLVERS"]


class NonFiniteError(ArithmeticError):
    """The samples became NaN or infinite during a run; the message names the step where it first happened."""


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


class GuidedSampler:
    """A reusable guided EDM sampler: ``GuidedSampler(net, gnet, **settings)(noise, labels)``.

    The settings are those of :func:`ag_kernels.edm_sampler` (same names, defaults and checks);
    calling the engine is ``edm_sampler(net, noise, labels, gnet, **settings)``, with the
    additions below.  The settings are checked once, here; each call checks its batch.

    Args:
        net: the main network D_1, called as ``net(x, t, labels)``.
        gnet: the guiding network D_0, or None (then the guidance must be 1); ``gnet is net`` is
            CFG with one network.
        num_steps: as :func:`ag_kernels.edm_sampler`.
        sigma_min: as :func:`ag_kernels.edm_sampler`.
        sigma_max: as :func:`ag_kernels.edm_sampler`.
        rho: as :func:`ag_kernels.edm_sampler`.
        guidance: as :func:`ag_kernels.edm_sampler` (a number, a tensor [B] or a function of sigma).
        S_churn: as :func:`ag_kernels.edm_sampler`.
        S_min: as :func:`ag_kernels.edm_sampler`.
        S_max: as :func:`ag_kernels.edm_sampler`.
        S_noise: as :func:`ag_kernels.edm_sampler`.
        dtype: as :func:`ag_kernels.edm_sampler`.
        randn_like: the default churn noise source (a call may pass its own).
        backend: as :func:`ag_kernels.edm_sampler`.
        guidance_interval: as :func:`ag_kernels.edm_sampler`.
        solver: as :func:`ag_kernels.edm_sampler`.
        progress: as :func:`ag_kernels.edm_sampler`.
        cuda_graph: True, False or "auto" (default: graphs when the noise is on a CUDA device).
            With graphs, the first call of each batch shape (and labels layout, and where
            guidance applies and how its weights alias) runs the whole sampler once eagerly as a
            warm-up, captures it into a CUDA graph and replays it; later calls of that shape only
            refill the static inputs (weights included: one graph serves every value of w) and
            replay.  At most ``max_graphs`` graphs are kept (least recently used dropped).
            Where graphs cannot be used the engine warns once why (True) or silently (auto) and
            runs eagerly.  The networks' parameters are read where they are at capture time:
            update them in place (``load_state_dict``, ``copy_``), not by replacing tensors.
        overlap: on CUDA, run the guiding network on a second stream concurrently with the main
            one (default True); no effect on the CPU, with one network, or where w = 1.
        batch_guide: evaluate both roles as one call on the concatenated batch: True, False, or
            "auto" (default: when ``gnet is net``).  Needs networks whose output for a sample
            does not depend on the rest of the batch.
        compile: ``torch.compile`` the networks (inductor, static shapes), compiled on first use
            per shape.  Parameters are not frozen: in-place weight updates are seen, as in eager
            runs and graphs.  Off by default.
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

    Raises:
        TypeError: a setting of the wrong type.
        ValueError: a setting out of range or inconsistent (as :func:`ag_kernels.edm_sampler`'s
            checks), or max_graphs < 1.
    """

    # Tests only: on the CPU, "capture" warms up, runs the closure once more and keeps it, and
    # "replay" calls it, so the static buffers, their refilling, the graph cache and the capture
    # fallback are exercised without a GPU (set on an instance, or on the class for edm_sampler).
    _emulate_graphs = False

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
        if solver in MULTISTEP and self.S_churn > 0:
            raise ValueError(f"S_churn={self.S_churn} cannot be used with solver={solver!r}: a multistep solver reuses "
                             "earlier denoised outputs, which churn's fresh noise invalidates; use S_churn=0, or "
                             "solver='heun' or 'euler'")
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
        self._cache = GraphCache(self.max_graphs)
        self._streams: Dict[torch.device, "torch.cuda.Stream"] = {}
        self._warned = set()
        self.last_mode: Optional[str] = None
        self.fallback_reason: Optional[str] = None

    # ----------------------------------------------------------------------- the plan

    def _plan(self, device: torch.device) -> _Plan:
        plan = self._plans.get(device)
        if plan is None:
            plan = self._plans[device] = make_plan(
                num_steps=self.num_steps, sigma_min=self.sigma_min, sigma_max=self.sigma_max, rho=self.rho,
                S_churn=self.S_churn, S_min=self.S_min, S_max=self.S_max, S_noise=self.S_noise, solver=self.solver,
                dtype=self.dtype, device=device)
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
        # A multistep solver's earlier denoised outputs, a ring of slots (see _plan._Multistep).
        history = None if self.solver not in MULTISTEP else x_next.new_empty((MULTISTEP[self.solver],) + x_next.shape)
        unipc = self.solver == "unipc"
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
            if step.multistep is not None:
                if unipc:
                    # The networks see x_i (buffers[1] after step 0); the corrected sample x_c lives in
                    # buffers[0] (x_0 itself at step 0) and is corrected there in place.
                    x_next = ops.multistep(buffers[0], d_main, d_guide, w, history, step.multistep, out=buffers[1],
                                           corrected=buffers[0] if step.multistep.corrector else None)
                else:
                    x_next = ops.multistep(x_hat, d_main, d_guide, w, history, step.multistep, out=x_euler)
                continue
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
        """Sample one batch.

        Args:
            noise: standard normal noise [B, ...]; sampling starts at ``noise * sigma_max``.
            labels: the labels ``net`` gets (passed unchanged).
            guide_labels: the labels ``gnet`` gets (default: ``labels``; e.g. zeros for CFG with one network).
            randn_like: the churn noise source for this call (default: the engine's).

        Returns:
            The samples at t_N = 0 in the engine's dtype, a new tensor each call.

        Raises:
            TypeError: noise that is not a floating tensor, or a network output that is not one.
            ValueError: a per-sample guidance of the wrong length, or a network output of the wrong shape.
            NonFiniteError: with ``check_finite``, samples that became NaN or infinite (names the step).
        """
        guide_labels, randn_like = self._check_call(noise, labels, guide_labels, randn_like)
        plan = self._plan(noise.device)
        weights = self.guidance.weights(plan.sigmas, noise.shape[0], noise.device)
        overlap = self.overlap and self.gnet is not None and not self._batched and noise.device.type == "cuda"
        reason = self._graph_reason(noise, labels, guide_labels)
        # Outside torch.no_grad the reference tracks no gradients either: sampling never does.
        with torch.no_grad():
            drawn = None
            if reason is None:
                out, reason, drawn = self._graph_call(plan, noise, labels, guide_labels, weights, randn_like, overlap)
                if out is not None:
                    self.last_mode, self.fallback_reason = "graph", None
                    self._report(self._cache.entries[self._cache.last_key].flags, plan)
                    return out
            self.last_mode, self.fallback_reason = "eager", reason
            if self.cuda_graph is True and reason not in self._warned:
                self._warned.add(reason)
                warnings.warn(f"GuidedSampler: running eagerly, not from a CUDA graph: {reason}", stacklevel=2)
            if drawn is not None:
                # A failed capture already drew this call's churn noise, in the eager order: use it, not fresh draws.
                eps = lambda k, x: drawn[k]  # noqa: E731
            else:
                draw = _Noise(randn_like, noise.shape, self.dtype, noise.device)
                eps = lambda k, x: draw(x)  # noqa: E731
            flags = self._flags(plan, noise.device)
            out = self._run(plan, noise, labels, guide_labels, weights, eps, overlap, flags)
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

    def _graph_call(self, plan, noise, labels, guide_labels, weights, randn_like, overlap):
        """(samples, None, None) from a graph replay, or (None, why not, churn noise drawn or None): see :class:`GraphCache`."""
        def run(noise, labels, guide_labels, weights, eps, flags):
            return self._run(plan, noise, labels, guide_labels, weights, eps, overlap, flags)

        return self._cache.call(run, plan.churned, self.dtype, noise, labels, guide_labels, weights, randn_like,
                                lambda: self._flags(plan, noise.device))

    def reset(self) -> None:
        """Drop every captured graph (and its memory pool); the next call captures anew."""
        self._cache.clear()
        self._plans.clear()


def _compiled(net):
    """torch.compile of a network: static shapes, parameters read at every call (no freezing)."""
    return torch.compile(net, dynamic=False)
