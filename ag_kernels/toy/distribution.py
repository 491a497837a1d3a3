"""Exact 2-D toy distributions for autoguidance experiments: two fractal "tree" classes.

Karras et al. (NeurIPS 2024, "Guiding a Diffusion Model with a Bad Version of Itself") study
guidance on a 2-D toy problem whose two classes are thin, branching, tree-like densities built
from Gaussian components.  This module is our own construction in that spirit (not NVlabs code):
every density is a finite mixture of anisotropic 2-D Gaussians, so the density, log-density,
score and ideal denoiser are exact in closed form at every noise level of the heat-diffused
(EDM, variance-exploding) process, where p(x; sigma) = p_data * N(0, sigma^2 I), i.e. each
component's covariance becomes Sigma_k + sigma^2 I.

Construction (fixed; no randomness; see ``_TREE_*`` constants below)
-------------------------------------------------------------------
* A recursive binary tree of straight branches.  The trunk (depth 0) starts at the origin of the
  raw frame and points straight up (90 degrees), raw length 1.
* Each branch of depth d < 5 has two children that start at its tip: a "left" child
  turned by +28 degrees with length factor 0.72 and a "right" child turned by -42 degrees with
  length factor 0.64.  ``_TREE_DEPTH = 5`` gives depths 0..5, i.e. 1+2+4+8+16+32 = 63 branches.
* Each branch is a row of ``_TREE_COMPONENTS_PER_BRANCH = 3`` Gaussians whose means sit at the
  centres of three equal segments of the branch.  Each is elongated along the branch:
  standard deviation 0.2 L along it and 0.06 L across it (L = branch length), an aspect ratio
  of 10/3.  So every class has 63 * 3 = 189 components.
* Weights halve with depth: all branches of depth d together carry mass proportional to 2^-d,
  split equally among the 2^d branches of that depth (so one branch of depth d has weight
  proportional to 4^-d), and equally among the components of a branch.  Weights are then
  normalised to sum to 1.
* Class "A" is this (asymmetric) tree; class "B" is its mirror image in the
  vertical axis x = 0.  The two share the trunk exactly (the trunk is symmetric) and branch
  apart above it, with their inner branches partly overlapping.  Class "AB" is their union
  with weight 1/2 each (378 components).
* Data scale: one common map (uniform scale + shift, applied to A and B alike, keeping the
  mirror axis at x = 0) makes the union's "3-std box" (component means +- 3 marginal stds)
  span [-1.7, 1.7] on its longer (vertical) side, centred on the origin.  The component means
  then lie in x in [-1.60, 1.60], y in [-1.07, 1.60]; at sigma = 0 the mass outside [-2, 2]^2
  is below 1e-6 (it is the bottom tail of the trunk).  Component stds after scaling: trunk
  0.21 along x 0.063 across, thinnest branches 0.023 x 0.0068.  sigma_max = 5 covers the data
  comfortably.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Iterable

import torch

__all__ = ["GaussianMixture", "tree_mixture", "CLASSES"]

CLASSES = ("A", "B", "AB")

_TREE_DEPTH = 5                     # depths 0..5 -> 63 branches
_TREE_COMPONENTS_PER_BRANCH = 3
_TREE_CHILDREN = ((28.0, 0.72), (-42.0, 0.64))   # (turn in degrees, length factor) per child
_TREE_ALONG_STD = 0.2                # along-branch std, as a fraction of branch length
_TREE_ACROSS_STD = 0.06              # across-branch std, as a fraction of branch length
_TREE_BOX_STDS = 3.0                 # the union's "3-std box" (means +- 3 marginal stds) ...
_TREE_HALF_EXTENT = 1.7              # ... is scaled and centred to fill [-1.7, 1.7] on its longer side

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

    _CHUNK_ELEMS = 1 << 22  # points x components evaluated at once

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

    def _eval(self, x, sigma, want_score: bool):
        x = _check_x(x)
        n = x.shape[0]
        s = _check_sigma(sigma, n, x.device)
        w, means, covs = self._params(x.device)
        log_w = torch.log(w)  # -inf for zero weights is fine under logsumexp
        k = w.shape[0]
        step = max(1, self._CHUNK_ELEMS // k)
        lp = torch.empty(n, dtype=_DT, device=x.device)
        sc = torch.empty(n, 2, dtype=_DT, device=x.device) if want_score else None
        if s.dim() != 0 and n > 0 and bool((s == s[0]).all()):
            s = s[0, 0]
        if s.dim() == 0:
            # One noise level: the quadratic forms of all components are one small matmul.
            # (Expanding the quadratic costs ~1e-11 absolute accuracy in log p at this data scale.)
            coef, q = self._coefficients(s**2, log_w, means, covs)
        for i in range(0, n, step):
            j = min(n, i + step)
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

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """Ideal denoiser E[x0 | x] = x + sigma^2 grad log p(x; sigma) (Tweedie), shape [N, 2]."""
        xd = _check_x(x)
        s = _check_sigma(sigma, xd.shape[0], xd.device)
        return xd + s**2 * self.score(xd, sigma)

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
def _raw_tree() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class A in the raw frame: (weights [K], means [K, 2], covs [K, 2, 2]), weights normalised."""
    ws, mus, covs = [], [], []
    m = _TREE_COMPONENTS_PER_BRANCH

    def grow(p: tuple[float, float], angle_deg: float, length: float, depth: int) -> None:
        th = math.radians(angle_deg)
        u = (math.cos(th), math.sin(th))
        v = (-u[1], u[0])
        branch_weight = 0.25**depth  # depth level mass 2^-d split over 2^d branches
        s_along = (_TREE_ALONG_STD * length) ** 2
        s_across = (_TREE_ACROSS_STD * length) ** 2
        cov = [[s_along * u[i] * u[j] + s_across * v[i] * v[j] for j in range(2)] for i in range(2)]
        for i in range(m):
            t = (i + 0.5) / m * length
            mus.append((p[0] + t * u[0], p[1] + t * u[1]))
            covs.append(cov)
            ws.append(branch_weight / m)
        if depth < _TREE_DEPTH:
            tip = (p[0] + length * u[0], p[1] + length * u[1])
            for turn, factor in _TREE_CHILDREN:
                grow(tip, angle_deg + turn, length * factor, depth + 1)

    grow((0.0, 0.0), 90.0, 1.0, 0)
    w = torch.tensor(ws, dtype=_DT)
    return w / w.sum(), torch.tensor(mus, dtype=_DT), torch.tensor(covs, dtype=_DT)


@functools.lru_cache(maxsize=None)
def _trees() -> dict[str, GaussianMixture]:
    w, mu, cov = _raw_tree()
    raw_a = GaussianMixture(w, mu, 0.5 * (cov + cov.transpose(1, 2)))
    raw_b = raw_a.transformed([[-1.0, 0.0], [0.0, 1.0]])
    both_mu = torch.cat([raw_a.means, raw_b.means])
    both_sd = torch.cat([raw_a.covs, raw_b.covs]).diagonal(dim1=1, dim2=2).sqrt()
    lo = (both_mu - _TREE_BOX_STDS * both_sd).min(0).values
    hi = (both_mu + _TREE_BOX_STDS * both_sd).max(0).values
    scale = 2 * _TREE_HALF_EXTENT / float((hi - lo).max())
    centre = 0.5 * (lo + hi)
    centre[0] = 0.0  # the union is symmetric in x; keep the mirror axis at x = 0 exactly
    shift = (-scale * centre).tolist()
    a = raw_a.transformed([[scale, 0.0], [0.0, scale]], shift)
    b = raw_b.transformed([[scale, 0.0], [0.0, scale]], shift)
    return {"A": a, "B": b, "AB": GaussianMixture.combine([(a, 0.5), (b, 0.5)])}


def tree_mixture(name: str) -> GaussianMixture:
    """The ground-truth mixture of class ``name`` in CLASSES = ("A", "B", "AB") (cached, shared: do not mutate)."""
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, one of {CLASSES}, got {type(name).__name__}")
    if name not in CLASSES:
        raise ValueError(f"name must be one of {CLASSES}, got {name!r}")
    return _trees()[name]
