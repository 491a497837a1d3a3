"""Exact 2-D toy distributions for autoguidance experiments: two fractal "tree" classes.

Karras et al. (NeurIPS 2024, "Guiding a Diffusion Model with a Bad Version of Itself") study
guidance on a 2-D toy problem whose two classes are thin, branching, tree-like densities built
from Gaussian components.  This module is our own construction in that spirit (not NVlabs code):
every density is a finite mixture of anisotropic 2-D Gaussians, so the density, log-density,
score and ideal denoiser are exact in closed form at every noise level of the heat-diffused
(EDM, variance-exploding) process, where p(x; sigma) = p_data * N(0, sigma^2 I), i.e. each
component's covariance becomes Sigma_k + sigma^2 I.

Construction (fixed: the jitter comes from a seeded generator; see the ``_TREE_*`` constants)
---------------------------------------------------------------------------------------------
The tree is as thin as the one of the paper's published toy (facts from it: 7 levels, 8 round-ish
components per branch, widths from ~0.016 at the trunk to ~0.004 at the finest level, weights
proportional to branch length x 0.5^depth, two classes growing in opposite directions), built
with our own code:

* A recursive binary tree of straight branches, depths 0..6 (``TREE_LEVELS = 7``: 127 branches).
  The trunk of class A starts at the root and leans right (``_TREE_TRUNK_ANGLE`` degrees).  Each
  branch of depth d < 6 has two children starting at its tip, turned by +-34 degrees with
  length factor 0.8; every turn (+-6 degrees) and length factor (+-8%) has a mild random jitter.
* Each branch is a row of ``_TREE_COMPONENTS_PER_BRANCH = 8`` Gaussians centred on 8 equal
  segments.  Across the branch the standard deviation is ``_TREE_WIDTHS[0] = 0.016`` at the trunk,
  shrinking geometrically to ``_TREE_WIDTHS[1] = 0.004`` at depth 6; along it, half the spacing of
  the components (so a branch is a continuous ridge) but never below the width (round-ish at the
  tips).  Widths are in the final data frame.
* A branch's components share weight branch length x 0.5^depth (so a whole level carries about
  0.8^depth of the trunk's mass); weights are normalised to sum to 1.
* Class "B" is A mirrored in the vertical axis x = 0 through the root: the two trees grow from
  one root in opposite directions (A to the right, B to the left), their trunks close near the
  root.  Class "AB" is their union with weight 1/2 each.
* Data scale: one uniform scale and shift (the same for A and B, keeping x = 0 the mirror axis)
  makes the union's component means span 3.2 on their longer side, centred on the origin, so the
  data lie within [-1.7, 1.7]^2.  sigma_max = 5 covers it comfortably.

:func:`tree_depths` gives each component's depth (the tree level it belongs to).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Iterable

import torch

__all__ = ["GaussianMixture", "tree_mixture", "tree_depths", "CLASSES", "TREE_LEVELS"]

CLASSES = ("A", "B", "AB")

TREE_LEVELS = 7                     # depths 0..6 -> 127 branches
_TREE_COMPONENTS_PER_BRANCH = 8
_TREE_TRUNK_ANGLE = 62.0            # degrees; class A leans right, B (its mirror) left
_TREE_TURN = 34.0                   # children turn by +- this (degrees) ...
_TREE_TURN_JITTER = 6.0             # ... plus a uniform jitter in +- this
_TREE_LENGTH_FACTOR = 0.80          # child length / parent length ...
_TREE_LENGTH_JITTER = 0.08          # ... times a uniform factor in 1 +- this
_TREE_WIDTHS = (0.016, 0.004)       # std across a branch at depth 0 and at the deepest level (final frame)
_TREE_ALONG = 0.5                   # std along a branch, in units of the component spacing
_TREE_LEVEL_DECAY = 0.5             # weight factor per level (times branch length)
_TREE_SPAN = 3.2                    # the union's component means span this on their longer side
_TREE_SEED = 20241                  # seed of the jitter

_DT = torch.float64


def _check_x(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape [N, 2], got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"x must have shape [N, 2], got {list(x.shape)}")
    return x.to(_DT)


def _check_sigma(sigma, n: int, device) -> torch.Tensor:
    """sigma -> float64 tensor of shape [] or [n, 1] (ready to broadcast against [n, K])."""
    if isinstance(sigma, torch.Tensor):
        if not (sigma.is_floating_point() or sigma.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"sigma must be a real number or a float tensor, got dtype {sigma.dtype}")
        if sigma.dim() == 0:
            s = sigma.to(device=device, dtype=_DT)
        elif sigma.dim() == 1 and sigma.shape[0] == n:
            s = sigma.to(device=device, dtype=_DT)[:, None]
        else:
            raise ValueError(f"sigma must be a scalar or a tensor of shape [{n}], got {list(sigma.shape)}")
    elif isinstance(sigma, numbers.Real) and not isinstance(sigma, bool):
        s = torch.tensor(float(sigma), dtype=_DT, device=device)
    else:
        raise TypeError(f"sigma must be a real number or a tensor, got {type(sigma).__name__}")
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError("sigma must be finite and >= 0")
    return s


class GaussianMixture:
    """A 2-D Gaussian mixture sum_k w_k N(mu_k, Sigma_k), evaluated under heat diffusion.

    All methods taking ``sigma`` work with the diffused density p(x; sigma) whose components are
    N(mu_k, Sigma_k + sigma^2 I); ``sigma`` is a float >= 0 or a per-point tensor of shape [N].
    Results are float64 on the device of ``x``.
    """

    # Points x components evaluated at once: temporaries of a few MB stay in cache (4M-element
    # chunks made the per-point-sigma path memory-bound, 8x slower).
    _CHUNK_ELEMS = 1 << 18

    def __init__(self, weights: torch.Tensor, means: torch.Tensor, covs: torch.Tensor):
        for name, t in (("weights", weights), ("means", means), ("covs", covs)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        weights = weights.detach().to(_DT)
        means = means.detach().to(device=weights.device, dtype=_DT)
        covs = covs.detach().to(device=weights.device, dtype=_DT)
        if weights.dim() != 1 or weights.shape[0] == 0:
            raise ValueError(f"weights must have shape [K] with K >= 1, got {list(weights.shape)}")
        k = weights.shape[0]
        if means.shape != (k, 2):
            raise ValueError(f"means must have shape [{k}, 2], got {list(means.shape)}")
        if covs.shape != (k, 2, 2):
            raise ValueError(f"covs must have shape [{k}, 2, 2], got {list(covs.shape)}")
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
            raise ValueError("weights must be finite and >= 0")
        if abs(float(weights.sum()) - 1.0) > 1e-9:
            raise ValueError(f"weights must sum to 1, got {float(weights.sum())!r}")
        if not bool(torch.isfinite(means).all()):
            raise ValueError("means must be finite")
        if not bool(torch.isfinite(covs).all()) or not torch.allclose(covs, covs.transpose(1, 2), rtol=0, atol=1e-12):
            raise ValueError("covs must be finite and symmetric")
        det = covs[:, 0, 0] * covs[:, 1, 1] - covs[:, 0, 1] ** 2
        if bool((covs[:, 0, 0] <= 0).any()) or bool((det <= 0).any()):
            raise ValueError("covs must be positive definite")
        self.weights, self.means, self.covs = weights, means, covs

    # ------------------------------------------------------------------ helpers
    def __len__(self) -> int:
        return self.weights.shape[0]

    @property
    def num_components(self) -> int:
        return self.weights.shape[0]

    def __repr__(self) -> str:
        return f"GaussianMixture(K={len(self)})"

    @staticmethod
    def combine(parts: Iterable[tuple["GaussianMixture", float]]) -> "GaussianMixture":
        """The mixture sum_i c_i m_i / sum_i c_i of the given (mixture, weight) pairs."""
        parts = list(parts)
        if not parts:
            raise ValueError("parts must hold at least one (mixture, weight) pair")
        for m, c in parts:
            if not isinstance(m, GaussianMixture):
                raise TypeError(f"parts must hold (GaussianMixture, weight) pairs, got {type(m).__name__}")
            if not isinstance(c, numbers.Real) or isinstance(c, bool) or not math.isfinite(c) or c < 0:
                raise ValueError(f"parts weights must be finite reals >= 0, got {c!r}")
        total = float(sum(c for _, c in parts))
        if total <= 0:
            raise ValueError("parts weights must not all be 0")
        dev = parts[0][0].weights.device
        w = torch.cat([m.weights.to(dev) * (c / total) for m, c in parts])
        w = w / w.sum()
        return GaussianMixture(w, torch.cat([m.means.to(dev) for m, _ in parts]),
                               torch.cat([m.covs.to(dev) for m, _ in parts]))

    def subset(self, index) -> "GaussianMixture":
        """The mixture of the selected components (index: slice, indices or bool mask), renormalised."""
        w = self.weights[index]
        if w.dim() != 1 or w.shape[0] == 0 or float(w.sum()) <= 0:
            raise ValueError("index must select at least one component with positive weight")
        return GaussianMixture(w / w.sum(), self.means[index], self.covs[index])

    def transformed(self, matrix, shift=(0.0, 0.0)) -> "GaussianMixture":
        """The image under x -> A x + b (A: 2x2 invertible, b: 2-vector)."""
        a = torch.as_tensor(matrix, dtype=_DT, device=self.means.device)
        b = torch.as_tensor(shift, dtype=_DT, device=self.means.device)
        if a.shape != (2, 2):
            raise ValueError(f"matrix must have shape [2, 2], got {list(a.shape)}")
        if b.shape != (2,):
            raise ValueError(f"shift must have shape [2], got {list(b.shape)}")
        covs = a @ self.covs @ a.T
        return GaussianMixture(self.weights.clone(), self.means @ a.T + b, 0.5 * (covs + covs.transpose(1, 2)))

    def mean(self) -> torch.Tensor:
        """E[x] ([2]); the same at every sigma."""
        return self.weights @ self.means

    def covariance(self, sigma: float = 0.0) -> torch.Tensor:
        """Cov[x] ([2, 2]) of the diffused mixture: sum w (S + mu mu^T) - m m^T + sigma^2 I."""
        s = _check_sigma(sigma, 1, self.means.device)
        if s.dim() != 0:
            raise ValueError("sigma must be a scalar here")
        m = self.mean()
        second = torch.einsum("k,kij->ij", self.weights, self.covs + self.means[:, :, None] * self.means[:, None, :])
        return second - torch.outer(m, m) + s**2 * torch.eye(2, dtype=_DT, device=m.device)

    # ------------------------------------------------------------------ core
    def _params(self, device):
        if self.weights.device != torch.device(device):
            return self.weights.to(device), self.means.to(device), self.covs.to(device)
        return self.weights, self.means, self.covs

    def _terms(self, x: torch.Tensor, s2: torch.Tensor, log_w, means, covs):
        """Per (point, component), per-point noise levels s2 [n, 1]: log w_k + log N(x; mu_k, Sigma_k + s2 I), and P_k (x - mu_k)."""
        a = covs[:, 0, 0] + s2          # [K] or [n, K]
        c = covs[:, 1, 1] + s2
        b = covs[:, 0, 1].expand_as(a)
        det = a * c - b * b
        d0 = x[:, 0].contiguous()[:, None] - means[:, 0].contiguous()    # [n, K]
        d1 = x[:, 1].contiguous()[:, None] - means[:, 1].contiguous()
        # Precision = [[c, -b], [-b, a]] / det.
        p0 = (c * d0 - b * d1) / det
        p1 = (a * d1 - b * d0) / det
        quad = d0 * p0 + d1 * p1
        logn = log_w - math.log(2 * math.pi) - 0.5 * torch.log(det) - 0.5 * quad
        return logn, p0, p1

    def _coefficients(self, s2: torch.Tensor, log_w, means, covs):
        """For a scalar noise level: C [6, K] with log w_k + log N(x; mu_k, Sigma_k + s2 I) = F(x) @ C,
        F(x) = [x0^2, x0 x1, x1^2, x0, x1, 1]; and Q [K, 5] = [P00, P01, P11, (P mu)_0, (P mu)_1]."""
        a = covs[:, 0, 0] + s2
        c = covs[:, 1, 1] + s2
        b = covs[:, 0, 1]
        det = a * c - b * b
        p00, p01, p11 = c / det, -b / det, a / det
        pm0 = p00 * means[:, 0] + p01 * means[:, 1]
        pm1 = p01 * means[:, 0] + p11 * means[:, 1]
        mpm = means[:, 0] * pm0 + means[:, 1] * pm1
        const = log_w - math.log(2 * math.pi) - 0.5 * torch.log(det) - 0.5 * mpm
        coef = torch.stack([-0.5 * p00, -p01, -0.5 * p11, pm0, pm1, const])
        return coef, torch.stack([p00, p01, p11, pm0, pm1], dim=1)

    def _chunks(self, n: int):
        """Row ranges [i, j) of n points, each at most _CHUNK_ELEMS point-component pairs: the
        [points, components] working arrays stay small whatever n is."""
        step = max(1, self._CHUNK_ELEMS // len(self))
        for i in range(0, n, step):
            yield i, min(n, i + step)

    def _eval(self, x, sigma, want_score: bool, work_dtype: torch.dtype = _DT):
        x = _check_x(x)
        n = x.shape[0]
        s = _check_sigma(sigma, n, x.device)
        w, means, covs = self._params(x.device)
        if work_dtype != _DT:
            # Lower working precision (training targets): per-point terms only, since the expanded
            # quadratic of the shared-sigma path cancels catastrophically in float32.
            w, means, covs = w.to(work_dtype), means.to(work_dtype), covs.to(work_dtype)
            x = x.to(work_dtype)
            s = (s if s.dim() else s.expand(n, 1)).to(work_dtype)
        log_w = torch.log(w)  # -inf for zero weights is fine under logsumexp
        lp = torch.empty(n, dtype=_DT, device=x.device)
        sc = torch.empty(n, 2, dtype=_DT, device=x.device) if want_score else None
        if s.dim() != 0 and n > 0 and work_dtype == _DT and bool((s == s[0]).all()):
            s = s[0, 0]
        if s.dim() == 0:
            # One noise level: the quadratic forms of all components are one small matmul.
            # (Expanding the quadratic costs ~1e-11 absolute accuracy in log p at this data scale.)
            coef, q = self._coefficients(s**2, log_w, means, covs)
        for i, j in self._chunks(n):
            xi = x[i:j]
            x0, x1 = xi[:, 0:1], xi[:, 1:2]
            if s.dim() == 0:
                feats = torch.cat([x0 * x0, x0 * x1, x1 * x1, x0, x1, torch.ones_like(x0)], dim=1)
                logn = feats @ coef
            else:
                logn, p0, p1 = self._terms(xi, s[i:j] ** 2, log_w, means, covs)
            lse = torch.logsumexp(logn, dim=1)
            lp[i:j] = lse
            if want_score:
                r = torch.exp(logn.sub_(lse[:, None]))
                if s.dim() == 0:
                    g = r @ q
                    sc[i:j, 0] = g[:, 3] - g[:, 0] * x0[:, 0] - g[:, 1] * x1[:, 0]
                    sc[i:j, 1] = g[:, 4] - g[:, 1] * x0[:, 0] - g[:, 2] * x1[:, 0]
                else:
                    sc[i:j, 0] = -(r * p0).sum(1)
                    sc[i:j, 1] = -(r * p1).sum(1)
        return lp, sc

    def log_prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """log p(x; sigma), shape [N]."""
        return self._eval(x, sigma, False)[0]

    def prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """p(x; sigma), shape [N]."""
        return torch.exp(self.log_prob(x, sigma))

    def score(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """grad_x log p(x; sigma), shape [N, 2] (closed form, responsibility-weighted)."""
        return self._eval(x, sigma, True)[1]

    def log_prob_and_score(self, x: torch.Tensor, sigma=0.0):
        """(log p, grad log p) in one pass."""
        return self._eval(x, sigma, True)

    def group_posteriors(self, x: torch.Tensor, groups: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """P(group | x; sigma) [N, G]: the posterior responsibilities of the components summed per group.

        ``groups`` [K] holds each component's group index in 0..G-1 (e.g. :func:`tree_depths`).
        Averaged over samples, this is the mass the samples put on each group (soft assignment).
        """
        xd = _check_x(x)
        if not isinstance(groups, torch.Tensor) or groups.dtype != torch.int64 or groups.shape != (len(self),):
            raise ValueError(f"groups must be an int64 tensor of shape [{len(self)}]")
        if len(self) and int(groups.min()) < 0:
            raise ValueError("groups must hold indices >= 0")
        n = xd.shape[0]
        s = _check_sigma(sigma, n, xd.device)
        w, means, covs = self._params(xd.device)
        g = groups.to(xd.device)
        num = int(g.max()) + 1
        out = torch.zeros(n, num, dtype=_DT, device=xd.device)
        s2 = s**2 if s.dim() == 0 else None
        for i, j in self._chunks(n):
            logn, _, _ = self._terms(xd[i:j], s2 if s2 is not None else s[i:j] ** 2, torch.log(w), means, covs)
            r = torch.softmax(logn, dim=1)
            out[i:j].index_add_(1, g, r)
        return out

    def denoise(self, x: torch.Tensor, sigma, *, work_dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Ideal denoiser E[x0 | x] = x + sigma^2 grad log p(x; sigma) (Tweedie), shape [N, 2], float64.

        ``work_dtype=torch.float32`` evaluates the per-component terms in float32 (about 2.5x
        faster; errors ~1e-6 at this data scale, far below a network's): for training targets.
        """
        if work_dtype not in (torch.float32, torch.float64):
            raise TypeError(f"work_dtype must be torch.float32 or torch.float64, got {work_dtype}")
        xd = _check_x(x)
        s = _check_sigma(sigma, xd.shape[0], xd.device)
        score = self._eval(xd, sigma, True, work_dtype)[1]
        return xd + s**2 * score

    def sample(self, n: int, sigma=0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact samples of p(x; sigma), shape [n, 2], float64 (CPU unless the mixture is elsewhere)."""
        if not isinstance(n, numbers.Integral) or isinstance(n, bool):
            raise TypeError(f"n must be an int, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        n = int(n)
        dev = self.weights.device
        s = _check_sigma(sigma, n, dev)
        if n == 0:
            return torch.empty(0, 2, dtype=_DT, device=dev)
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, 2, dtype=_DT, device=dev, generator=generator)
        s2 = s**2 if s.dim() == 0 else s[:, 0] ** 2
        cov = self.covs[idx]
        a = cov[:, 0, 0] + s2
        b = cov[:, 0, 1]
        c = cov[:, 1, 1] + s2
        l00 = torch.sqrt(a)
        l10 = b / l00
        l11 = torch.sqrt(torch.clamp(c - l10 * l10, min=0.0))
        mu = self.means[idx]
        return torch.stack([mu[:, 0] + l00 * z[:, 0], mu[:, 1] + l10 * z[:, 0] + l11 * z[:, 1]], dim=1)


# ---------------------------------------------------------------------- tree construction
def _raw_branches() -> list:
    """Class A's branches in the raw frame: (start, unit direction, length, depth), trunk first."""
    import random

    rng = random.Random(_TREE_SEED)
    branches = []

    def grow(p, angle_deg, length, depth):
        th = math.radians(angle_deg)
        u = (math.cos(th), math.sin(th))
        branches.append((p, u, length, depth))
        if depth + 1 < TREE_LEVELS:
            tip = (p[0] + length * u[0], p[1] + length * u[1])
            for sign in (1.0, -1.0):
                turn = sign * _TREE_TURN + rng.uniform(-_TREE_TURN_JITTER, _TREE_TURN_JITTER)
                factor = _TREE_LENGTH_FACTOR * (1 + rng.uniform(-_TREE_LENGTH_JITTER, _TREE_LENGTH_JITTER))
                grow(tip, angle_deg + turn, length * factor, depth + 1)

    grow((0.0, 0.0), _TREE_TRUNK_ANGLE, 1.0, 0)
    return branches


@functools.lru_cache(maxsize=None)
def _trees() -> dict:
    branches = _raw_branches()
    m = _TREE_COMPONENTS_PER_BRANCH
    # The frame: means of A and of its mirror B, scaled and centred (x = 0 stays the mirror axis).
    raw_means = [(p[0] + (i + 0.5) / m * length * u[0], p[1] + (i + 0.5) / m * length * u[1])
                 for p, u, length, _ in branches for i in range(m)]
    xs = [abs(x) for x, _ in raw_means]
    ys = [y for _, y in raw_means]
    span = max(2 * max(xs), max(ys) - min(ys))
    scale = _TREE_SPAN / span
    shift_y = -scale * 0.5 * (max(ys) + min(ys))
    ws, mus, covs, depths = [], [], [], []
    for p, u, length, depth in branches:
        length_s = length * scale
        across = _TREE_WIDTHS[0] * (_TREE_WIDTHS[1] / _TREE_WIDTHS[0]) ** (depth / (TREE_LEVELS - 1))
        along = max(across, _TREE_ALONG * length_s / m)
        v = (-u[1], u[0])
        cov = [[along**2 * u[i] * u[j] + across**2 * v[i] * v[j] for j in range(2)] for i in range(2)]
        for i in range(m):
            t = (i + 0.5) / m * length
            mus.append((scale * (p[0] + t * u[0]), scale * (p[1] + t * u[1]) + shift_y))
            covs.append(cov)
            # Weight per branch: its length times 0.5 per level, split equally over its components.
            ws.append(length * _TREE_LEVEL_DECAY**depth / m)
            depths.append(depth)
    w = torch.tensor(ws, dtype=_DT)
    cov_t = torch.tensor(covs, dtype=_DT)
    a = GaussianMixture(w / w.sum(), torch.tensor(mus, dtype=_DT), 0.5 * (cov_t + cov_t.transpose(1, 2)))
    b = a.transformed([[-1.0, 0.0], [0.0, 1.0]])
    depth_a = torch.tensor(depths, dtype=torch.int64)
    return {"A": a, "B": b, "AB": GaussianMixture.combine([(a, 0.5), (b, 0.5)])}, depth_a


def tree_mixture(name: str) -> GaussianMixture:
    """The ground-truth mixture of class ``name`` in CLASSES = ("A", "B", "AB") (cached, shared: do not mutate)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, one of {CLASSES}, got {type(name).__name__}")
    if name not in CLASSES:
        raise ValueError(f"name must be one of {CLASSES}, got {name!r}")
    return _trees()[0][name]


def tree_depths(name: str) -> torch.Tensor:
    """The tree level (0 = trunk .. TREE_LEVELS - 1) of each component of ``tree_mixture(name)``, int64 [K]."""
    tree_mixture(name)  # validates the name
    depth_a = _trees()[1]
    return torch.cat([depth_a, depth_a]) if name == "AB" else depth_a.clone()
