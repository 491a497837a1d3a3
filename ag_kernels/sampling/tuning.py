"""A noise schedule fitted to a guided pair, a solver and a budget, and its JSON file.

:func:`tune_schedule` follows LD3 (Tong et al. 2024) in what it minimizes: the distance between
what the solver reaches in ``num_steps`` steps and a many-step solution of the same guided ODE
from the same calibration noise (Heun, 128 steps).  The distance is the mean over samples of
log(d_i + eps), d_i a sample's RMS distance to its own target: a squared distance, as LD3 uses,
is smallest for outputs halfway between two modes the target might land on, and on the toy it
tuned schedules with more outliers than the untuned log-SNR-uniform one; the log rewards
landing close.  The guided ODE is that of D_w = D_0 + w (D_1 - D_0), which is
neither network's own, so schedules tuned for either network alone do not carry over.  Unlike
LD3 the search is derivative-free: every trial runs the real sampler (:class:`GuidedSampler`,
any solver of :data:`SOLVERS`, any backend) on the calibration noise, so whatever a solver
computes is what is tuned, and no solver needs a differentiable twin.

The schedule is parametrized so that every trial is valid: t_0 = sigma_max, t_{N-1} = sigma_min
(the last positive level: letting it float up cost the toy recall), t_N = 0, and the log-sigma
span between is split into the N - 1 steps by a softmax of N - 1 logits.  The search is a compass
(pattern) search on the logits from the log-SNR-uniform schedule: each coordinate is moved by
+-step in turn, a move is kept when it lowers the distance, and the step is halved when a whole
sweep kept none.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from typing import Callable, List, Optional, Sequence

import torch

from ._settings import _SAME, SOLVERS, _real, check_sigmas
from .engine import GuidedSampler

__all__ = ["tune_schedule", "save_schedule", "load_schedule", "read_schedule", "SCHEDULE_FORMAT"]

#: The "format" field of a schedule file.
SCHEDULE_FORMAT = "ag_kernels.schedule/1"


def _levels(logits: torch.Tensor, sigma_min: float, sigma_max: float) -> List[float]:
    """The num_steps + 1 noise levels (ending in 0) of the softmax parametrization: t_0 = sigma_max and
    t_{N-1} = sigma_min exactly, the steps between them in log sigma the softmax's parts of the span."""
    log_max, span = math.log(sigma_max), math.log(sigma_max / sigma_min)
    inner = (log_max - span * torch.softmax(logits, 0)[:-1].cumsum(0)).exp().tolist()
    return [sigma_max] + inner + [sigma_min, 0.0]


def _logits_for(levels: Sequence[float]) -> torch.Tensor:
    """The logits whose schedule is ``levels`` (positive levels from sigma_max to sigma_min, then 0)."""
    log_t = torch.tensor([math.log(v) for v in levels[:-1]], dtype=torch.float64)
    return (log_t[:-1] - log_t[1:]).log()


def tune_schedule(net, noise: torch.Tensor, labels=None, gnet=None, *, guidance=1.0, num_steps: int,
                  solver: str = "dpmpp_2m", sigma_min: float = 0.002, sigma_max: float = 80.0,
                  reference_steps: int = 128, eps: float = 1e-4, max_trials: int = 400, min_step: float = 0.02,
                  time_limit: Optional[float] = None, dtype: torch.dtype = torch.float32, backend: str = "auto",
                  guide_labels=_SAME, log: Optional[Callable[[str], None]] = None) -> torch.Tensor:
    """Fit the ``num_steps`` + 1 noise levels (ending in 0) of ``solver`` for the guided pair on ``noise``.

    Args:
        net: the main network D_1, an EDM denoiser ``net(x, sigma, labels)``, as for
            :func:`ag_kernels.edm_sampler`.
        noise: the calibration noise [B, ...], standard normal (e.g. a few hundred to a few thousand
            samples).  Judge the result on other noise: the schedule is fitted to this one.
        labels: class labels for both networks (or None), as for :func:`ag_kernels.edm_sampler`.
        gnet: the guiding network D_0 (None when ``guidance`` is 1).
        guidance: w of the guided denoiser D_w = D_0 + w (D_1 - D_0).
        num_steps: the steps of the schedule (N >= 1); the solver's evaluations follow from it
            (Heun: 2N - 1, the others N).
        solver: any of :data:`ag_kernels.SOLVERS`.
        sigma_min: t_{N-1}, the last positive noise level.
        sigma_max: t_0, the first noise level.
        reference_steps: the target, Heun with this many steps (Karras schedule) from the same noise.
        eps: the distance floor inside the log, relative to the targets' RMS.
        max_trials: the search stops after this many sampler runs.
        min_step: the search stops when its step in the logits falls below this.
        time_limit: the search stops after this many seconds (None: no limit).
        dtype: the sampler's dtype, for every run.
        backend: the sampler's backend, for every run.
        guide_labels: labels for ``gnet`` when they differ from ``labels`` (default: the same).
        log: called with a line per improvement (e.g. ``print``); None: silent.

    Returns:
        The schedule as a float64 CPU tensor [num_steps + 1], t_0 = sigma_max > ... > t_N = 0, for
        ``sigmas=``.  It starts from the log-SNR-uniform schedule and never ends worse than that on
        the calibration noise.

    Raises:
        ValueError: ``num_steps``, ``reference_steps`` or ``max_trials`` not an integer in range; an
            unknown ``solver``; ``sigma_min``, ``sigma_max``, ``eps``, ``min_step`` or
            ``time_limit`` not finite and positive, or ``sigma_min >= sigma_max``; or what
            :class:`ag_kernels.GuidedSampler` refuses (guidance, dtype, backend, labels).
        TypeError: ``noise`` not a floating-point tensor with at least one sample; a number
            argument that is not a real number.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    sigma_min = _real("sigma_min", sigma_min, positive=True)
    sigma_max = _real("sigma_max", sigma_max, positive=True)
    if not sigma_min < sigma_max:
        raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    for name, value, lo in (("reference_steps", reference_steps, 2), ("max_trials", max_trials, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    min_step = _real("min_step", min_step, positive=True)
    eps = _real("eps", eps, positive=True)
    if time_limit is not None:
        time_limit = _real("time_limit", time_limit, positive=True)
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.dim() < 1 or len(noise) < 1:
        raise TypeError("noise must be a floating-point torch.Tensor [B, ...] with B >= 1")
    if num_steps == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    start = time.perf_counter()
    call = {} if guide_labels is _SAME else {"guide_labels": guide_labels}
    common = dict(guidance=guidance, dtype=dtype, backend=backend, cuda_graph=False)
    reference = GuidedSampler(net, gnet, num_steps=reference_steps, sigma_min=sigma_min, sigma_max=sigma_max,
                              solver="heun", **common)(noise, labels, **call).double()
    scale = reference.square().mean().sqrt().item() or 1.0

    def objective(levels: List[float]) -> float:
        x = GuidedSampler(net, gnet, sigmas=levels, solver=solver, **common)(noise, labels, **call).double()
        # Per sample: its RMS distance to its own target, relative to the targets' RMS; the mean
        # of their logs rewards landing close over landing halfway between two modes.
        per_sample = (x - reference).flatten(1).square().mean(1).sqrt() / scale
        d = (per_sample + eps).log().mean().item()
        return d if math.isfinite(d) else math.inf

    # The search starts from the log-SNR-uniform schedule (uniform steps in log sigma).
    best = _logits_for(torch.linspace(math.log(sigma_max), math.log(sigma_min), num_steps, dtype=torch.float64)
                       .exp().tolist() + [0.0])
    best_d, trials = objective(_levels(best, sigma_min, sigma_max)), 1
    if log:
        log(f"tune_schedule: log-SNR-uniform start {best_d:.4f} (mean log distance to Heun-{reference_steps})")
    step = 0.5
    while step >= min_step and trials < max_trials:
        improved = False
        for k in range(len(best)):
            for sign in (1.0, -1.0):
                if trials >= max_trials or (time_limit is not None and time.perf_counter() - start > time_limit):
                    break
                trial = best.clone()
                trial[k] += sign * step
                d = objective(_levels(trial, sigma_min, sigma_max))
                trials += 1
                if d < best_d:
                    best, best_d, improved = trial, d, True
                    break
        if time_limit is not None and time.perf_counter() - start > time_limit:
            break
        if not improved:
            step /= 2
        elif log:
            log(f"tune_schedule: {best_d:.5f} after {trials} trials (step {step:g})")
    if log:
        log(f"tune_schedule: {best_d:.5f}, {trials} trials, {time.perf_counter() - start:.1f} s")
    return torch.tensor(_levels(best, sigma_min, sigma_max), dtype=torch.float64)


def save_schedule(path, sigmas, *, solver: str, guidance: float = 1.0, **info) -> None:
    """Write a schedule as JSON, for :func:`load_schedule` and ``generate --sigmas FILE``.

    The file holds ``format``, ``solver``, ``num_steps``, ``guidance``, ``sigmas`` (ending in 0) and
    the entries of ``info``; it is written to a temporary file first, then moved into place.

    Args:
        path: the file to write.
        sigmas: the schedule, as ``sigmas=`` takes it (a 1-D tensor or sequence, strictly
            decreasing, positive, optionally ending in 0, which is appended when absent).
        solver: the solver it was tuned for, one of :data:`ag_kernels.SOLVERS`.
        guidance: the guidance weight it was tuned for.
        **info: more JSON-serializable entries to record (e.g. ``sigma_min``, ``calibration_seeds``).

    Raises:
        ValueError: ``sigmas`` is not a valid schedule (too short, not strictly decreasing, a
            non-finite or negative level), or ``solver`` is unknown.
        TypeError: ``sigmas`` is not a tensor or sequence of real numbers, or ``guidance`` is not
            a number.
        OSError: the file cannot be written.
    """
    levels = check_sigmas(sigmas)
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if not isinstance(guidance, numbers.Real) or isinstance(guidance, bool):
        raise TypeError(f"guidance must be a number, got {type(guidance).__name__}")
    record = {"format": SCHEDULE_FORMAT, "solver": solver, "num_steps": len(levels) - 1,
              "guidance": float(guidance), "sigmas": levels, **info}
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def read_schedule(path, *, name: str = "path") -> dict:
    """The record of a schedule file (see :func:`save_schedule`), its sigmas checked; ValueError if it is not one."""
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{name}: no such schedule file: {os.fspath(path)!r}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{name}: {os.fspath(path)!r} is not a JSON schedule file: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != SCHEDULE_FORMAT or "sigmas" not in record:
        raise ValueError(f"{name}: {os.fspath(path)!r} is not a schedule file (no format {SCHEDULE_FORMAT!r} "
                         "with sigmas); write one with save_schedule or ag-kernels tune-schedule")
    record["sigmas"] = check_sigmas(record["sigmas"], name=f"{name}: sigmas")
    return record


def load_schedule(path, *, solver: Optional[str] = None, num_steps: Optional[int] = None,
                  name: str = "path") -> torch.Tensor:
    """Read a schedule written by :func:`save_schedule`, as a float64 tensor for ``sigmas=``.

    Args:
        path: the schedule file (JSON).
        solver: where given, the solver it must have been tuned for: a schedule is fitted to one
            solver and budget, and another's is refused.
        num_steps: where given, the steps it must have.
        name: how errors call the file (e.g. ``"--sigmas"``).

    Returns:
        The noise levels as a float64 CPU tensor [num_steps + 1], ending in 0.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not JSON, not a schedule file (no ``format``
            ``"ag_kernels.schedule/1"`` with ``sigmas``), its sigmas are not a valid schedule, or
            it was tuned for another ``solver`` or ``num_steps`` than asked (the message names
            the argument).
        TypeError: the file's sigmas are not numbers.
    """
    record = read_schedule(path, name=name)
    levels = record["sigmas"]
    if solver is not None and record.get("solver") != solver:
        raise ValueError(f"solver: the schedule in {os.fspath(path)!r} was tuned for solver={record.get('solver')!r}, "
                         f"not {solver!r}; tune one for {solver!r}")
    if num_steps is not None and len(levels) - 1 != num_steps:
        raise ValueError(f"num_steps: the schedule in {os.fspath(path)!r} has {len(levels) - 1} steps, "
                         f"not {num_steps}; "
                         f"tune one for num_steps={num_steps}")
    return torch.tensor(levels, dtype=torch.float64)
