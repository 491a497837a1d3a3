"""Sample-quality metrics for the low-dimensional toy experiment.

Improved precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
Assessing Generative Models"), computed exactly (brute force) in torch on the CPU or GPU:

* The *real manifold* is the union of balls around the real points; the ball of real point ``r_i``
  has radius ``rho_k(r_i)``, the distance from ``r_i`` to its k-th nearest neighbour among the other
  real points (the point itself is excluded; an exact duplicate of ``r_i`` elsewhere in the set counts
  as a neighbour at distance 0).
* ``precision`` = fraction of generated (fake) points that lie in at least one real ball,
  i.e. ``||f - r_i|| <= rho_k(r_i)`` for some ``i``.
* ``recall`` = fraction of real points that lie in at least one fake ball, whose radii are the k-th
  nearest-neighbour distances among the fake points.

A point exactly on a ball's boundary counts as inside.  The paper uses ``k = 3``, the default here.

Implementation: exact, i.e. the same answer as comparing all N x M pairs.  Squared distances are
computed in float64 from coordinate differences (not via the ``|a|^2 + |b|^2 - 2ab`` matrix-product
shortcut, which loses precision for close points) in blocks of at most ``min(chunk, 512)`` points
per side, so memory stays bounded (two float64 buffers of that many squared) for any N.  The points
are first grouped into spatially compact tiles (recursive median splits); a pair of tiles is skipped
only when the distance between their bounding boxes proves that no pair in it can matter (farther
than every current k-th neighbour, or than every ball), which makes 2-D inputs of 20000 points take
about a second on two CPU cores instead of tens of seconds.  Because the same per-pair arithmetic
gives both the radii and the membership tests, and it is symmetric in its two arguments,
``precision_recall(a, b) == precision_recall(b, a)[::-1]`` exactly.

Note: these metrics measure *support*, not density.  With k = 3, tail points of the reference set
have large balls, so a Gaussian shifted by 3 standard deviations still overlaps the reference
manifold substantially (precision/recall around 0.2-0.5 for a shift of 3 std in both coordinates of
a 2-D unit Gaussian, about 0.8 for 3 std along one axis); only far-apart clouds give values near 0.
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = ["knn_radii", "precision_recall", "outlier_fraction", "mean_log_prob"]


# ----------------------------------------------------------------------------------------------
# Validation


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _as_points(name: str, points, k: int) -> torch.Tensor:
    """[N, D] float64 tensor with N > k, D >= 1 and finite values (accepts tensors, arrays, lists)."""
    if isinstance(points, torch.Tensor):
        t = points.detach()
    else:
        try:
            t = torch.as_tensor(points)
        except Exception as exc:  # noqa: BLE001 - re-raised with the argument's name
            raise TypeError(f"{name} must be an [N, D] tensor or array of numbers: {exc}") from None
    if t.is_complex() or not (t.is_floating_point() or t.dtype in _INT_DTYPES):
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape [N, D], got shape {tuple(t.shape)}")
    n, d = t.shape
    if d < 1:
        raise ValueError(f"{name} must have at least one coordinate (D >= 1), got shape {tuple(t.shape)}")
    if n <= k:
        raise ValueError(f"{name} must hold more than k={k} points, got N={n}")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must hold only finite values (found NaN or inf)")
    return t.contiguous()


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------------
# Blocked squared distances with exact bounding-box pruning

_TILE = 512  # points per tile (at most `chunk`): small tiles stay in cache and prune well
_SLACK = 1.0 + 1e-9  # pruning tolerance: a box distance must beat a bound by this factor to skip a tile


class _Blocks:
    """Squared Euclidean distances between two point blocks, reusing two flat buffers.

    Every pair is computed with the same correctly rounded elementwise ops (sub, mul, add; no fused
    multiply-add), summing the coordinates in order, so d2(a, b) == d2(b, a) bit for bit wherever the
    pair sits in a block.
    """

    def __init__(self, tile: int, device: torch.device):
        self._d2 = torch.empty(tile * tile, dtype=torch.float64, device=device)
        self._tmp = torch.empty(tile * tile, dtype=torch.float64, device=device)

    def d2(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[len(a), len(b)] squared distances; the result is a view of an internal buffer."""
        m, n = a.shape[0], b.shape[0]
        d2 = self._d2[: m * n].view(m, n)
        tmp = self._tmp[: m * n].view(m, n)
        for j in range(a.shape[1]):
            torch.sub(a[:, j : j + 1], b[:, j].unsqueeze(0), out=d2 if j == 0 else tmp)
            if j == 0:
                d2.mul_(d2)
            else:
                tmp.mul_(tmp)
                d2.add_(tmp)
        return d2


class _Tiling:
    """Points split into spatially compact tiles (recursive median splits on the widest coordinate).

    Only the grouping of the work depends on it; every pair that could matter is still computed.
    """

    def __init__(self, points: torch.Tensor, tile: int):
        leaves = []
        stack = [torch.arange(points.shape[0], device=points.device)]
        while stack:
            idx = stack.pop()
            if idx.numel() <= tile:
                leaves.append(idx)
                continue
            sub = points[idx]
            dim = int((sub.max(0).values - sub.min(0).values).argmax())
            perm = torch.argsort(sub[:, dim], stable=True)
            half = idx.numel() // 2
            stack.append(idx[perm[half:]])
            stack.append(idx[perm[:half]])
        self.index = leaves
        self.points = [points[i] for i in leaves]
        self.lo = torch.stack([p.min(0).values for p in self.points])
        self.hi = torch.stack([p.max(0).values for p in self.points])

    def box_d2(self, other: "_Tiling") -> torch.Tensor:
        """[len(self), len(other)] squared distances between tile bounding boxes (a lower bound on
        every point-pair squared distance, up to rounding, which _SLACK covers)."""
        gap = torch.clamp(other.lo.unsqueeze(0) - self.hi.unsqueeze(1), min=0) + torch.clamp(
            self.lo.unsqueeze(1) - other.hi.unsqueeze(0), min=0
        )
        return (gap * gap).sum(-1)


def _knn_sq_radii(points: torch.Tensor, k: int, chunk: int, tiling: _Tiling | None = None) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest other point (self excluded by index)."""
    n = points.shape[0]
    tile = min(chunk, _TILE)
    tiling = tiling or _Tiling(points, tile)
    blocks = _Blocks(tile, points.device)
    box = tiling.box_d2(tiling)
    out = torch.empty(n, dtype=torch.float64, device=points.device)
    for r, rows in enumerate(tiling.points):
        best = torch.full((rows.shape[0], k), math.inf, dtype=torch.float64, device=points.device)
        bound = math.inf  # the largest current k-th smallest squared distance in this row tile
        for c in torch.argsort(box[r], stable=True).tolist():  # own tile first (box distance 0)
            if float(box[r, c]) > bound * _SLACK:
                break  # this and all later tiles are too far to change any row's k smallest
            d2 = blocks.d2(rows, tiling.points[c])
            if c == r:
                d2.fill_diagonal_(math.inf)  # a point is not its own neighbour (duplicates are)
            cand = torch.topk(d2, min(k, d2.shape[1]), dim=1, largest=False, sorted=False).values
            best = torch.topk(torch.cat([best, cand], 1), k, dim=1, largest=False, sorted=False).values
            bound = float(best.max())
        out[tiling.index[r]] = best.max(1).values  # N > k: exactly k finite values per row
    return out


def _coverage(queries: _Tiling, centers: _Tiling, sq_radii: torch.Tensor, chunk: int) -> float:
    """Fraction of queries q with ||q - c_i||^2 <= sq_radii[i] for at least one center c_i."""
    tile = min(chunk, _TILE)
    blocks = _Blocks(tile, sq_radii.device)
    box = queries.box_d2(centers)
    radii_t = [sq_radii[i] for i in centers.index]
    max_r = torch.stack([r.max() for r in radii_t]).tolist()
    nq = 0
    covered_total = 0
    for q, rows in enumerate(queries.points):
        nq += rows.shape[0]
        covered = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        for c in torch.argsort(box[q], stable=True).tolist():
            if float(box[q, c]) > max_r[c] * _SLACK:
                continue  # no query of this tile can reach any ball of that tile
            todo = (~covered).nonzero().squeeze(1)
            if todo.numel() == 0:
                break  # every query of this tile is already inside some ball
            sub = rows if todo.numel() == rows.shape[0] else rows[todo]
            d2 = blocks.d2(sub, centers.points[c])
            hit = (d2 <= radii_t[c].unsqueeze(0)).any(dim=1)
            covered[todo[hit]] = True
        covered_total += int(covered.sum())
    return covered_total / nq


# ----------------------------------------------------------------------------------------------
# Public API


def knn_radii(points, k: int = 3, chunk: int = 8192) -> torch.Tensor:
    """k-nearest-neighbour radii: for each point, the distance to its k-th nearest *other* point.

    Args:
        points: [N, D] tensor or array (D >= 1), finite values, N > k.
        k: which neighbour (k >= 1; ``k = 1`` is the nearest other point).  The point itself is
            excluded by index, so an exact duplicate of a point elsewhere in the set is a neighbour at
            distance 0 (with ``k`` or more copies of a point, its radius is 0).
        chunk: block size cap; at most ``chunk x chunk`` distances are held at once (blocks are
            ``min(chunk, 512)`` points per side).

    Returns:
        float64 tensor [N] (on ``points``' device), exact (brute force, float64 distances).
    """
    k = _check_int("k", k, 1)
    chunk = _check_int("chunk", chunk, 1)
    pts = _as_points("points", points, k)
    return _knn_sq_radii(pts, k, chunk).sqrt_()


def precision_recall(real, fake, k: int = 3, chunk: int = 8192) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of ``fake`` samples against ``real``.

    Each real point ``r_i`` gets a ball of radius ``rho_k(r_i)`` = distance to its k-th nearest
    neighbour among the other real points; each fake point likewise among the other fake points.

    * precision = fraction of fake points inside at least one real ball (``||f - r_i|| <= rho_k(r_i)``):
      how many samples are realistic.  Mode-collapsed/too-narrow samples keep precision high.
    * recall = fraction of real points inside at least one fake ball: how much of the real
      distribution is covered.  Over-dispersed samples keep recall high but lose precision.

    Args:
        real: [N_real, D] reference (ground-truth) samples, N_real > k, finite.
        fake: [N_fake, D] generated samples, same D, N_fake > k, finite.
        k: neighbourhood size, k >= 1 (3 as in the paper).
        chunk: block size cap; at most ``chunk x chunk`` distances are held at once (blocks are
            ``min(chunk, 512)`` points per side).

    Returns:
        ``(precision, recall)`` as Python floats in [0, 1].  Exact (brute force);
        ``precision_recall(b, a) == precision_recall(a, b)[::-1]``.
    """
    k = _check_int("k", k, 1)
    chunk = _check_int("chunk", chunk, 1)
    r = _as_points("real", real, k)
    f = _as_points("fake", fake, k)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"real and fake must have the same dimension D, got real {tuple(r.shape)} "
                         f"and fake {tuple(f.shape)}")
    if r.device != f.device:
        raise ValueError(f"real and fake must be on the same device, got {r.device} and {f.device}")
    tile = min(chunk, _TILE)
    r_tiles, f_tiles = _Tiling(r, tile), _Tiling(f, tile)
    real_sq = _knn_sq_radii(r, k, chunk, r_tiles)
    fake_sq = _knn_sq_radii(f, k, chunk, f_tiles)
    precision = _coverage(f_tiles, r_tiles, real_sq, chunk)
    recall = _coverage(r_tiles, f_tiles, fake_sq, chunk)
    return precision, recall


def _as_values(name: str, values) -> torch.Tensor:
    t = values.detach() if isinstance(values, torch.Tensor) else torch.as_tensor(values)
    if t.is_complex() or not (t.is_floating_point() or t.dtype in _INT_DTYPES):
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    t = t.reshape(-1).to(torch.float64)
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty")
    if bool(torch.isnan(t).any()):
        raise ValueError(f"{name} must not contain NaN")
    return t


def outlier_fraction(log_prob_values, threshold: float) -> float:
    """Fraction of ``log_prob_values`` strictly below ``threshold`` (samples in low-density regions).

    ``-inf`` values (zero density) count as outliers; NaN is rejected.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold):
        raise TypeError(f"threshold must be a real number, got {threshold!r}")
    v = _as_values("log_prob_values", log_prob_values)
    return float((v < float(threshold)).to(torch.float64).mean())


def mean_log_prob(values) -> float:
    """Mean of log-probability values (may be ``-inf`` if any value is ``-inf``); NaN is rejected."""
    v = _as_values("values", values)
    return float(v.mean())
