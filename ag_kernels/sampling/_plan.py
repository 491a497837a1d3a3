"""The plan of a run: the Karras schedule, churn and the noise level of every network evaluation.

Everything that holds for a whole run is decided once per (device, dtype), before the first step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

# History length (earlier denoised outputs kept) of each multistep solver: the most it reads at once.
# UniPC-2's corrector reads D_{i-1} and D_{i-2} (its predictor only D_{i-1}).
MULTISTEP = {"dpmpp_2m": 1, "dpmpp_3m": 2, "unipc": 2}


def karras_schedule(num_steps: int, sigma_min: float, sigma_max: float, rho: float, *, dtype=torch.float32,
                    device=None) -> torch.Tensor:
    """Noise levels t_0 > ... > t_{N-1} of Karras et al. (2022, Eq. 5), then t_N = 0: N + 1 values in ``dtype``.

    Evaluated with the reference sampler's expression in ``dtype`` on ``device``, so the networks
    see the same noise levels.  With ``num_steps == 1`` the schedule is [sigma_max, 0] (the
    reference's formula divides by num_steps - 1 there).

    Args:
        num_steps: N >= 1, the number of noise levels before the final 0.
        sigma_min: t_{N-1}, the smallest positive level.
        sigma_max: t_0, the largest level.
        rho: the exponent (7 in EDM): larger values spend more steps near sigma_min.
        dtype: the dtype the expression is evaluated in.
        device: where the result lives (default: the CPU).

    Returns:
        A tensor of N + 1 noise levels, decreasing, ending with 0.

    Raises:
        RuntimeError: from torch, for a negative ``num_steps``.  The values are not otherwise
            checked here; the samplers check them once, naming the argument.
    """
    step_indices = torch.arange(num_steps, dtype=dtype, device=device)
    if num_steps > 1:
        t_steps = (sigma_max ** (1 / rho) + step_indices / (num_steps - 1)
                   * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    else:
        t_steps = torch.full((1,), sigma_max, dtype=dtype, device=device)
    return torch.cat([t_steps, torch.zeros_like(t_steps[:1])])


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
    multistep: Optional["_Multistep"] = None  # a multistep solver's update, else None


@dataclass
class _Multistep:
    """A multistep update x_next = a x + b[0] D_w + b[1] H[read[0]] + b[2] H[read[1]], then H[write] = D_w.

    H is the run's history of earlier denoised outputs, a ring of ``len`` slots: the output of step
    i lives in slot i % len, so no step moves the history, it only overwrites its oldest entry.
    With a ``corrector`` (a_c, c) (UniPC), x is the previous corrected sample: the step first
    corrects it, x_c = a_c x + c[0] D_w + c[1] H[read[0]] + c[2] H[read[1]], keeps x_c, and
    predicts from it; b and c are zero-padded to the slots read.
    """

    a: float
    b: Tuple[float, ...]
    read: Tuple[int, ...]
    write: int
    corrector: Optional[Tuple[float, Tuple[float, ...]]] = None


def _dpmpp_coefficients(solver: str, t: List[float], i: int) -> Tuple[float, Tuple[float, ...]]:
    """(a, b) of step i (t[i] -> t[i + 1]) of DPM-Solver++ (Lu et al. 2022), in float64.

    With lambda = -log sigma and h = lambda_{i+1} - lambda_i, the first-order update is
    x_next = (t_{i+1} / t_i) x + (1 - t_{i+1} / t_i) D_i (1 - t_{i+1}/t_i = -expm1(-h)); 2M replaces
    D_i by (1 + 1/(2r)) D_i - D_{i-1}/(2r), r = h_{i-1}/h; 3M adds the divided differences of
    D_i, D_{i-1}, D_{i-2} weighted by phi_2 = 1 - (1 - e^{-h})/h and phi_3 = phi_2/h - 1/2.  The last
    step (t_{i+1} = 0, h infinite) lands on D_i: x_next = D_i.  Lower orders start the run, as the
    history fills.  Returned as coefficients of x and of D_i, D_{i-1}, D_{i-2}.
    """
    s, s_next = t[i], t[i + 1]
    if s_next == 0:
        return 0.0, (1.0,)
    h = math.log(s / s_next)
    phi_1 = -math.expm1(-h)
    a = s_next / s
    order = min(i, MULTISTEP[solver]) + 1
    if order == 1:
        return a, (phi_1,)
    r0 = math.log(t[i - 1] / s) / h
    if solver == "dpmpp_2m":
        c = phi_1 / (2 * r0)
        return a, (phi_1 + c, -c)
    phi_2 = 1 - phi_1 / h
    if order == 2:
        # phi_2 (D_i - D_{i-1}) / r0
        return a, (phi_1 + phi_2 / r0, -phi_2 / r0)
    r1 = math.log(t[i - 2] / t[i - 1]) / h
    phi_3 = phi_2 / h - 0.5
    # x += phi_2 d1 - phi_3 d2 with d1_0 = (D_i - D_{i-1})/r0, d1_1 = (D_{i-1} - D_{i-2})/r1,
    # d1 = d1_0 + (d1_0 - d1_1) r0/(r0 + r1), d2 = (d1_0 - d1_1)/(r0 + r1): linear in d1_0 and d1_1.
    c0 = phi_2 * (1 + r0 / (r0 + r1)) - phi_3 / (r0 + r1)
    c1 = -phi_2 * r0 / (r0 + r1) + phi_3 / (r0 + r1)
    return a, (phi_1 + c0 / r0, -c0 / r0 + c1 / r1, -c1 / r1)


def _unipc_coefficients(t: List[float], i: int):
    """(a, b), (a_c, c) of step i of UniPC-2 with B(h) = e^h - 1 ("bh2"; Zhao et al. 2023), in float64.

    In data prediction with lambda = -log sigma (EDM: alpha = 1), phi_1 = 1 - e^{-h}:
    UniP (predictor, t[i] -> t[i + 1]) is DPM-Solver++(2M)'s update,
    x_next = (t_{i+1}/t_i) x_c + phi_1 D_i + phi_1 (D_i - D_{i-1}) / (2 r), r = h_{i-1}/h,
    first order on the first step, and x_next = D_i on the last (t_{i+1} = 0).  UniC (corrector,
    t[i-1] -> t[i]) re-does the previous step from x_c(i-1) with the output D_i the step just got,
    at no extra evaluation: order 1 (after a first-order predictor) is the trapezoid
    x_c = (t_i/t_{i-1}) x_c(i-1) + phi_1 (D_{i-1} + D_i)/2; order 2 solves the 2x2 system
    [[1, 1], [r_1, 1]] rho = [B_1, B_2] with r_1 = (lambda_{i-2} - lambda_{i-1})/h and
    B_k = k! h phi_{k+1}(-h)/(e^{-h} - 1) (the "bh2" right-hand side), and adds
    phi_1 (rho_1 (D_{i-2} - D_{i-1})/r_1 + rho_2 (D_i - D_{i-1})).  None: no corrector (the first
    step, and the last, whose prediction D_i does not depend on x_c).  Coefficients of
    D_i, D_{i-1}, D_{i-2}.
    """
    a, b = _dpmpp_coefficients("dpmpp_2m", t, i)
    if i == 0 or t[i + 1] == 0:
        return (a, b), None
    s, s_cur = t[i - 1], t[i]
    h = math.log(s / s_cur)
    phi_1 = -math.expm1(-h)
    a_c = s_cur / s
    if i == 1:
        return (a, b), (a_c, (0.5 * phi_1, 0.5 * phi_1))
    r1 = -math.log(t[i - 2] / s) / h
    # h phi_k(-h) for k = 2, 3 via the recursion phi_{k+1} = (phi_k - 1/k!)/(-h), divided by B(h) = -phi_1.
    hphi_2 = -phi_1 / -h - 1
    hphi_3 = hphi_2 / -h - 0.5
    B_1, B_2 = hphi_2 / -phi_1, 2 * hphi_3 / -phi_1
    rho_1 = (B_1 - B_2) / (1 - r1)
    rho_2 = B_1 - rho_1
    c_prev2 = phi_1 * rho_1 / r1
    return (a, b), (a_c, (phi_1 * rho_2, phi_1 - c_prev2 - phi_1 * rho_2, c_prev2))


def _multistep(solver: str, t: List[float], i: int) -> _Multistep:
    corrector = None
    if solver == "unipc":
        (a, b), corrector = _unipc_coefficients(t, i)
    else:
        a, b = _dpmpp_coefficients(solver, t, i)
    slots = MULTISTEP[solver]
    terms = max(len(b), len(corrector[1]) if corrector else 0)
    read = tuple((i - k) % slots for k in range(1, terms))
    b = b + (0.0,) * (terms - len(b))
    if corrector is not None:
        corrector = (corrector[0], corrector[1] + (0.0,) * (terms - len(corrector[1])))
    return _Multistep(a, b, read, i % slots, corrector)


@dataclass
class _Plan:
    """Everything fixed for a (device, dtype): the schedule as the networks and the ops see it."""

    t0: torch.Tensor
    steps: List[_Step]
    sigmas: List[float] = field(default_factory=list)  # the noise level of each evaluation, in order
    churned: int = 0


def make_plan(*, num_steps: int, sigma_min: float, sigma_max: float, rho: float, S_churn: float, S_min: float,
              S_max: float, S_noise: float, solver: str, dtype: torch.dtype, device: torch.device) -> _Plan:
    """The plan of a run on ``device`` in ``dtype``: the checked settings of a GuidedSampler, laid out per step."""
    n = num_steps
    # The schedule in the sampler's dtype on the data's device, as the reference computes it;
    # one host copy gives the ops their coefficients and the churn test its noise levels.
    t_steps = karras_schedule(n, sigma_min, sigma_max, rho, dtype=dtype, device=device)
    t_host = t_steps.tolist()
    t_dev = t_steps.unbind(0)
    gamma = min(S_churn / n, math.sqrt(2) - 1) if S_churn > 0 else 0.0
    # The reference compares t_cur (a `dtype` tensor) with S_min/S_max, which torch rounds to
    # `dtype` first: so does this, and a bound within an ulp of a noise level churns the same steps.
    s_min, s_max = (torch.tensor(v, dtype=dtype).item() for v in (S_min, S_max))
    steps, sigmas, churned = [], [], 0
    for i in range(n):
        t_cur, t_next = t_dev[i], t_dev[i + 1]
        churn = None
        if gamma > 0 and s_min <= t_host[i] <= s_max:
            # Churn (EDM Algorithm 2): the step starts at t_hat = t_cur (1 + gamma), with fresh noise
            # of std sqrt(t_hat^2 - t_cur^2) added; the same tensor expressions as the reference.
            t_hat = t_cur + gamma * t_cur
            churn = (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise
            churned += 1
        else:
            t_hat = t_cur
        heun = solver == "heun" and i < n - 1  # the last step lands on t_N = 0: Euler only
        step = _Step(t_cur, t_hat, t_next, float(t_hat), t_host[i + 1], churn, heun,
                     _multistep(solver, t_host, i) if solver in MULTISTEP else None)
        steps.append(step)
        sigmas.append(step.t_hat_host)
        if heun:
            sigmas.append(step.t_next_host)
    return _Plan(t0=t_dev[0], steps=steps, sigmas=sigmas, churned=churned)
