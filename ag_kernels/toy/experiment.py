"""The paper's 2-D toy experiment: train the three denoisers, sample with guidance, measure.

Karras et al. (NeurIPS 2024), Sec. 3: on a 2-D "tree" distribution of two classes, guiding a
main model D_1 with a smaller, less trained version of itself (autoguidance) keeps samples on the
data while keeping their variety, where classifier-free guidance (CFG, guiding with an
unconditional model) also concentrates them but drops parts of the class.  This module
reproduces that set-up with our own components and turns the pictures into numbers:

* the three models of the paper's toy (:data:`MODELS`), trained by :func:`train_models`
  (``python -m ag_kernels toy train``) and shipped in ``ag_kernels/toy/weights``;
* :func:`sample`: class-A samples through :func:`ag_kernels.edm_sampler` (sigma_max 5, 32 Heun
  steps, as the paper's toy), the same noise for every method;
* :func:`run`: a sweep of the guidance weight w for CFG and autoguidance, each point scored
  against the exact ground truth (:func:`score_samples`), and the best w of each method;
* :func:`plot`: the figure (ground-truth density contours, sample clouds side by side).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch

from ..models.checkpoint import load_net, save_net
from ..sampling.sampler import edm_sampler
from .distribution import tree_depths, tree_mixture
from .metrics import mean_log_prob, outlier_fraction, precision_recall
from .model import ToyDenoiser, train

__all__ = [
    "ModelSpec", "MODELS", "GUIDES", "WEIGHTS_DIR", "NUM_STEPS", "SIGMA_MIN", "SIGMA_MAX", "K", "OUTLIER_QUANTILE",
    "DEFAULT_CFG_WEIGHTS", "DEFAULT_AG_WEIGHTS", "AG_WEIGHT", "CFG_WEIGHT", "GROSS_NATS", "BLUR_SIGMAS",
    "train_models", "load_models", "sample", "outlier_threshold", "blur_nats", "score_samples", "goals", "agreement_bound", "MethodResult", "Experiment", "run", "plot",
]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One toy model: the class it learns, its size, its training run and the EMA that is kept.

    A spec with ``snapshot_of`` is not trained on its own: it is the EMA of that model's run after
    ``iterations`` steps (the same network earlier in its training, a "bad version of itself").
    """

    name: str
    data: str           # "A" or "AB" (the union: CFG's unconditional model)
    hidden: int
    layers: int
    iterations: int
    seed: int
    role: str
    ema_std: float = 0.010
    target: str = "exact"   # "exact": the ground truth's denoiser; "dsm": the clean sample
    snapshot_of: Optional[str] = None
    fourier: int = 0             # Fourier features of the input (ToyDenoiser's ``fourier``; 0: plain MLP)
    fourier_scale: float = 16.0


#: The toy models: D_1, autoguidance's D_0 and CFG's D_0 (see docs/toy.md for how they were chosen).
MODELS: Dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("main", "A", 64, 4, 2048, 1, "D_1: class A, 4 x 64 with 64 damped Fourier features (scale 16), 2048 iterations",
                  fourier=64, fourier_scale=16.0),
        ModelSpec("guide", "A", 64, 4, 896, 1, "autoguidance D_0: main's own run at 896 iterations (7/16)",
                  snapshot_of="main", fourier=64, fourier_scale=16.0),
        ModelSpec("uncond", "AB", 32, 4, 512, 3, "CFG D_0: classes A and B, 4 x 32, 512 iterations"),
    )
}

#: Method -> the model that guides D_1 ("main"), or None for no guidance.
GUIDES: Dict[str, Optional[str]] = {"none": None, "cfg": "uncond", "autoguidance": "guide"}

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
NUM_STEPS = 32
SIGMA_MIN = 0.002
SIGMA_MAX = 5.0
#: Neighbours of the k-NN manifolds of improved precision and recall (Kynkaanniemi et al. 2019).
K = 3
#: A sample is an outlier when its class-A density is below the level that only this fraction of
#: class A's own mass falls below (estimated from :data:`_THRESHOLD_SAMPLES` exact samples).
OUTLIER_QUANTILE = 0.01
_THRESHOLD_SAMPLES = 1 << 18
#: The paper's toy guidance weights: the headline rows and the goals use these.
AG_WEIGHT = 3.0
CFG_WEIGHT = 4.0
DEFAULT_CFG_WEIGHTS = (1.5, 2.0, 3.0, 4.0)
DEFAULT_AG_WEIGHTS = (1.5, 2.0, 2.5, 3.0, 4.0)
#: A gross outlier lies this many nats below the outlier threshold (or further).
GROSS_NATS = 3.0
#: Noise levels of :func:`blur_nats` (how thin the tree is).
BLUR_SIGMAS = (0.01, 0.03, 0.1)


# ------------------------------------------------------------------------------ training


def train_models(
    outdir: Union[str, Path, None] = None,
    *,
    names: Optional[Iterable[str]] = None,
    iterations_scale: float = 1.0,
    batch_size: int = 4096,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Dict[str, Path]:
    """Train the models named (default: all of :data:`MODELS`) and write ``<outdir>/<name>.pt``.

    Each file is an :func:`ag_kernels.models.checkpoint.save_net` checkpoint (architecture name, its
    arguments and the EMA weights; read back with ``weights_only=True``).  A snapshot model is
    saved from its parent's run (which is trained for it if not named itself).  ``iterations_scale``
    shortens every run (for tests); ``train_log.json`` in ``outdir`` records what was run.
    """
    outdir = Path(outdir) if outdir is not None else WEIGHTS_DIR
    names = list(MODELS) if names is None else list(names)
    for name in names:
        if name not in MODELS:
            raise ValueError(f"names: unknown model {name!r}; known: {sorted(MODELS)}")
    if not (isinstance(iterations_scale, (int, float)) and 0 < iterations_scale <= 1e3):
        raise ValueError(f"iterations_scale must be a number in (0, 1000], got {iterations_scale!r}")
    outdir.mkdir(parents=True, exist_ok=True)
    log_path = outdir / "train_log.json"
    record = json.loads(log_path.read_text()) if log_path.exists() else {}
    # One training run per root model; snapshot models are taken from their parent's run.
    runs: Dict[str, List[str]] = {}
    for name in names:
        runs.setdefault(MODELS[name].snapshot_of or name, []).append(name)
    members = {root: [root] + [n for n, s in MODELS.items() if s.snapshot_of == root] for root in runs}
    length = {n: max(1, round(MODELS[n].iterations * iterations_scale)) for ms in members.values() for n in ms}
    stds = {root: sorted({MODELS[n].ema_std for n in members[root]}) for root in runs}
    total = {root: max(length[n] for n in wanted) for root, wanted in runs.items()}
    # Roots that see the same batches (data, seed, target, length) train in lockstep: the exact
    # targets, most of an iteration's cost, are computed once for all of them (bitwise the same runs).
    groups: Dict[tuple, List[str]] = {}
    for root in runs:
        s_ = MODELS[root]
        key = (s_.data, s_.seed, s_.target, total[root], tuple(stds[root]))
        groups.setdefault(key, []).append(root)
    paths = {}
    for (data, seed, target_kind, steps, group_stds), roots in groups.items():
        dist = tree_mixture(data)
        losses: Dict[str, List[float]] = {root: [] for root in roots}
        start = time.perf_counter()
        for root in roots:
            spec = MODELS[root]
            log(f"training {root}: {spec.role}" + (f" (scaled to {steps} iterations)" if steps != spec.iterations else ""))

        def keep(t: int, emas, roots=roots, losses=losses, start=start, stds=list(group_stds)) -> None:
            for root, root_emas in zip(roots, emas):
                for name in runs[root]:
                    if length[name] != t:
                        continue
                    s = MODELS[name]
                    path = outdir / f"{name}.pt"
                    save_net(root_emas[stds.index(s.ema_std)], path)
                    paths[name] = path
                    mine = losses[root]
                    tail = mine[-max(1, len(mine) // 10):]
                    record[name] = {
                        **dataclasses.asdict(s), "iterations": t, "batch_size": batch_size,
                        "first_loss": mine[0], "final_loss_mean_last_10pct": sum(tail) / len(tail),
                        "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
                    }
                    if len(roots) > 1:
                        record[name]["trained_with"] = [r for r in roots if r != root]
                    log(f"  {path}: loss {mine[0]:.3f} -> {record[name]['final_loss_mean_last_10pct']:.3f} "
                        f"after {t} iterations, {record[name]['seconds']:.0f} s")

        def log_losses(it: int, values, roots=roots, losses=losses) -> None:
            for root, value in zip(roots, values):
                losses[root].append(value)

        # Exact targets computed in float32: ~1e-6 from float64's, far below the networks' errors.
        target = None if target_kind == "dsm" else (lambda x, s, d=dist: d.denoise(x, s, work_dtype=torch.float32))
        train(
            [_build(MODELS[r]) for r in roots], target,
            lambda n, g, d=dist: d.sample(n, generator=g), iterations=steps, batch_size=batch_size,
            seed=seed, ema_std=list(group_stds), progress=progress, log=log_losses, on_step=keep,
        )
    log_path.write_text(json.dumps(record, indent=2) + "\n")
    return paths


def _build(spec: ModelSpec) -> ToyDenoiser:
    extra = dict(fourier=spec.fourier, fourier_scale=spec.fourier_scale) if spec.fourier else {}
    return ToyDenoiser(hidden=spec.hidden, layers=spec.layers, seed=spec.seed, **extra)


def load_models(directory: Union[str, Path, None] = None, *, device: Union[str, torch.device] = "cpu") -> Dict[str, ToyDenoiser]:
    """The trained models of :data:`MODELS` from ``directory`` (default: the shipped weights)."""
    directory = Path(directory) if directory is not None else WEIGHTS_DIR
    models = {}
    for name in MODELS:
        path = directory / f"{name}.pt"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no trained toy model {name!r}; train them with `python -m ag_kernels toy train --out {directory}`"
            )
        net = load_net(path, device=device)
        if not isinstance(net, ToyDenoiser):
            raise TypeError(f"{path}: expected a ToyDenoiser checkpoint, got {type(net).__name__}")
        models[name] = net.eval()
    return models


# ------------------------------------------------------------------------------ sampling


def sample(
    net: ToyDenoiser,
    gnet: Optional[ToyDenoiser],
    guidance: float,
    n: int,
    *,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    backend: str = "auto",
    num_steps: int = NUM_STEPS,
    sigma_max: float = SIGMA_MAX,
    nudge: bool = False,
    solver: str = "heun",
) -> torch.Tensor:
    """n class-A samples [n, 2] (float64, CPU) of D_w = D_0 + w (D_1 - D_0) via :func:`edm_sampler`.

    The noise depends on ``seed`` and ``n`` only, so every method starts from the same points.
    ``nudge`` moves every starting coordinate up by one float32 ulp: how far the same sampler's
    result moves under that is its own sensitivity to rounding (thin branches amplify it).
    """
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if nudge:
        noise32 = noise.to(torch.float32)
        noise = torch.nextafter(noise32, torch.full_like(noise32, math.inf)).to(torch.float64)
    out = edm_sampler(
        net, noise.to(device=device, dtype=torch.float32), None, gnet, num_steps=num_steps,
        sigma_min=SIGMA_MIN, sigma_max=sigma_max, guidance=guidance, backend=backend, solver=solver,
    )
    return out.to(device="cpu", dtype=torch.float64)


# ------------------------------------------------------------------------------ metrics


@functools.lru_cache(maxsize=8)
def outlier_threshold(data: str = "A", quantile: float = OUTLIER_QUANTILE, *, samples: int = _THRESHOLD_SAMPLES, seed: int = 0) -> float:
    """The log-density level below which a fraction ``quantile`` of the class's mass lies (cached)."""
    dist = tree_mixture(data)
    points = dist.sample(samples, generator=torch.Generator().manual_seed(seed))
    return float(torch.quantile(dist.log_prob(points), quantile))


def blur_nats(data: str = "A", sigmas: Sequence[float] = BLUR_SIGMAS, *, n: int = 1 << 16, seed: int = 0) -> Dict[str, float]:
    """How thin the tree is: the mean exact log-likelihood that exact data lose when blurred by sigma.

    E[log p(y)] - E[log p(y + sigma e)] over exact samples y and e ~ N(0, I), per sigma (keys as
    written, e.g. "0.01").  A sampler whose points sit sigma off the data pays about this much.
    """
    dist = tree_mixture(data)
    gen = torch.Generator().manual_seed(seed)
    y = dist.sample(n, generator=gen)
    base = float(dist.log_prob(y).mean())
    out = {}
    for sigma in sigmas:
        e = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        out[f"{sigma:g}"] = base - float(dist.log_prob(y + sigma * e).mean())
    return out


def score_samples(samples: torch.Tensor, reference: torch.Tensor, *, threshold: float, data: str = "A", k: int = K,
                  logp: Optional[torch.Tensor] = None) -> Dict[str, object]:
    """Improved precision/recall against ``reference`` (exact samples), mean log p, outliers and mass per tree level.

    ``outlier_frac``: exact log p below ``threshold``; ``gross_outlier_frac``: below it by more than
    :data:`GROSS_NATS` more; ``mass_by_depth``: the samples' mean posterior probability of each
    tree level 0..TREE_LEVELS-1 under the exact mixture (soft assignment to the levels' components).
    ``logp``: the samples' exact log p under ``data``, where the caller already has it.
    """
    dist = tree_mixture(data)
    if logp is None:
        logp = dist.log_prob(samples)
    precision, recall = precision_recall(reference, samples, k=k)
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    mass = dist.group_posteriors(samples, tree_depths(data)).mean(0)
    return {
        "precision": precision, "recall": recall, "f1": f1,
        "mean_logp": mean_log_prob(logp), "outlier_frac": outlier_fraction(logp, threshold),
        "gross_outlier_frac": outlier_fraction(logp, threshold - GROSS_NATS),
        "mass_by_depth": [float(v) for v in mass],
    }


def agreement_bound(ref: torch.Tensor, nudged: torch.Tensor, floor: float = 1e-5):
    """(bound, sensitivity) for comparing two samplers' outputs on the thin tree, relative to max |ref|.

    ``nudged`` is the reference sampler's output from noise moved by one float32 ulp; how far that
    moves it (``sensitivity``) is the yardstick: near thin branches guided trajectories amplify
    last-bit differences (1e-5 held for the old, fat tree; on this one an ulp moves a few samples
    by ~5e-5), so two samplers must agree within ``floor`` or 4x that sensitivity, the larger.
    """
    sensitivity = float((nudged - ref).abs().max()) / float(ref.abs().max())
    return max(floor, 4 * sensitivity), sensitivity


@dataclasses.dataclass
class MethodResult:
    method: str          # "none", "cfg", "autoguidance" (or "exact": exact samples)
    guidance: float
    metrics: Dict[str, object]
    samples: torch.Tensor = dataclasses.field(repr=False)
    logp: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False)  # exact log p of the samples (class A)

    @classmethod
    def scored(cls, method: str, guidance: float, samples: torch.Tensor, reference: torch.Tensor, threshold: float):
        """The samples scored against class A; their exact log p is computed once and kept (the figure reuses it)."""
        logp = tree_mixture("A").log_prob(samples)
        return cls(method, guidance, score_samples(samples, reference, threshold=threshold, logp=logp), samples, logp)

    def row(self) -> Dict[str, object]:
        return {"guidance": self.guidance, **self.metrics}


@dataclasses.dataclass
class Experiment:
    n: int
    seed: int
    threshold: float
    blur: Dict[str, float]           # blur_nats of class A
    reference: MethodResult          # exact class-A samples scored against an independent exact set
    sweep: List[MethodResult]        # every (method, w) sampled, in order
    headline: Dict[str, MethodResult]  # "none", and each method at the paper's weight (AG 3, CFG 4)
    device: str
    seconds: float

    def to_json(self) -> Dict[str, object]:
        """``blur_nats``, then ``exact``, ``none``, ``cfg``, ``autoguidance`` (at the paper's weights),
        each ``{guidance, precision, recall, f1, mean_logp, outlier_frac,
        gross_outlier_frac, mass_by_depth}``, the ``goals`` and the whole ``sweep``."""
        out: Dict[str, object] = {"blur_nats": dict(self.blur), "exact": {**self.reference.row(), "guidance": None}}
        out.update({m: r.row() for m, r in self.headline.items()})
        out["goals"] = goals(self)
        out["sweep"] = [{"method": r.method, **r.row()} for r in self.sweep]
        return out


def goals(experiment: "Experiment") -> Dict[str, Dict[str, object]]:
    """The toy's targets (issue 17): each ``{"value", "target", "met"}``; rows at the paper's weights."""
    e = experiment.reference.metrics
    h = experiment.headline
    none, ag, cfg = h["none"].metrics, h["autoguidance"].metrics, h["cfg"].metrics

    def removed(key):
        excess = none[key] - e[key]
        return (none[key] - ag[key]) / excess if excess > 0 else float("nan")

    rel = [abs(a / x - 1) if x > 0 else float("inf") for a, x in zip(ag["mass_by_depth"], e["mass_by_depth"])]
    ag_loss, cfg_loss = none["recall"] - ag["recall"], none["recall"] - cfg["recall"]
    rows = {
        "blur_0.01_nats": (experiment.blur.get("0.01", float("nan")), ">= 0.5", lambda v: v >= 0.5),
        "blur_0.03_nats": (experiment.blur.get("0.03", float("nan")), ">= 4", lambda v: v >= 4),
        "unguided_outliers_vs_exact": (none["outlier_frac"] / max(e["outlier_frac"], 1e-12), ">= 5x", lambda v: v >= 5),
        "ag_excess_outliers_removed": (removed("outlier_frac"), ">= 0.60", lambda v: v >= 0.6),
        "ag_excess_gross_outliers_removed": (removed("gross_outlier_frac"), ">= 0.50", lambda v: v >= 0.5),
        "ag_precision_gain": (ag["precision"] - none["precision"], ">= 0.03", lambda v: v >= 0.03),
        "ag_recall_loss": (ag_loss, "<= 0.10", lambda v: v <= 0.10),
        "ag_recall_loss_vs_cfg": (ag_loss / cfg_loss if cfg_loss > 0 else float("inf"), "<= 0.25", lambda v: v <= 0.25),
        "ag_mass_by_depth_max_rel_dev": (max(rel), "<= 0.35", lambda v: v <= 0.35),
    }
    return {k: {"value": v, "target": t, "met": bool(ok(v))} for k, (v, t, ok) in rows.items()}


def _check_weights(name: str, weights: Sequence[float]) -> tuple:
    out = tuple(float(w) for w in weights)
    if not out or any(not math.isfinite(w) or w < 1 for w in out):
        raise ValueError(f"{name} must be a non-empty list of finite guidance weights >= 1, got {list(weights)!r}")
    return out


def run(
    models: Dict[str, ToyDenoiser],
    *,
    n: int = 8192,
    cfg_weights: Sequence[float] = DEFAULT_CFG_WEIGHTS,
    ag_weights: Sequence[float] = DEFAULT_AG_WEIGHTS,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    backend: str = "auto",
    num_steps: int = NUM_STEPS,
    log: Optional[Callable[[MethodResult], None]] = None,
) -> Experiment:
    """Sample every method at every w from the same noise and score it against the ground truth.

    "none" is D_1 alone (w = 1).  "cfg" guides D_1 with the unconditional model, "autoguidance"
    with the short-trained class-A model (main's own run at 7/16).  The paper's weights (AG :data:`AG_WEIGHT`, CFG
    :data:`CFG_WEIGHT`) are always sampled and make the headline rows, whatever the sweep holds.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < K + 1:
        raise ValueError(f"n must be an integer > {K}, got {n!r}")
    missing = [m for m in MODELS if m not in models]
    if missing:
        raise ValueError(f"models: missing {missing} (expected {sorted(MODELS)}; see load_models)")
    cfg_weights = _check_weights("cfg_weights", cfg_weights)
    ag_weights = _check_weights("ag_weights", ag_weights)
    start = time.perf_counter()
    threshold = outlier_threshold("A")
    dist = tree_mixture("A")
    # Two independent exact sets: one is the reference manifold, the other scores "data" itself
    # (the best any sampler can do at this n, since k-NN precision and recall are below 1 even there).
    reference = dist.sample(n, generator=torch.Generator().manual_seed(10_000 + seed))
    exact = dist.sample(n, generator=torch.Generator().manual_seed(20_000 + seed))
    data = MethodResult.scored("exact", float("nan"), exact, reference, threshold)
    plan = ([("none", 1.0)] + [("cfg", w) for w in sorted(set(cfg_weights) | {CFG_WEIGHT})]
            + [("autoguidance", w) for w in sorted(set(ag_weights) | {AG_WEIGHT})])
    sweep = []
    for method, w in plan:
        gnet = models[GUIDES[method]] if GUIDES[method] else None
        x = sample(models["main"], gnet, w, n, seed=seed, device=device, backend=backend, num_steps=num_steps)
        result = MethodResult.scored(method, w, x, reference, threshold)
        sweep.append(result)
        if log is not None:
            log(result)
    pick = {"none": 1.0, "cfg": CFG_WEIGHT, "autoguidance": AG_WEIGHT}
    headline = {m: next(r for r in sweep if r.method == m and r.guidance == w) for m, w in pick.items()}
    return Experiment(n, seed, threshold, blur_nats("A"), data, sweep, headline, str(torch.device(device)),
                      time.perf_counter() - start)


# ------------------------------------------------------------------------------ figure


#: The figure's zoomed inset: a patch of class A's finest branches (x0, x1, y0, y1).
INSET_BOX = (0.95, 1.35, -0.2, 0.2)


def plot(experiment: Experiment, path: Union[str, Path], *, max_points: int = 8192) -> Path:
    """A PNG like the paper's toy figure (Fig. 1): ground truth, no guidance, CFG and autoguidance
    at the paper's weights over the class-A density, and below each a zoomed inset of the thin
    branches (the box drawn on the panel above)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    dist = tree_mixture("A")

    def density(x0, x1, y0, y1, nx, ny):
        gx = torch.linspace(x0, x1, nx, dtype=torch.float64)
        gy = torch.linspace(y0, y1, ny, dtype=torch.float64)
        yy, xx = torch.meshgrid(gy, gx, indexing="ij")
        return dist.log_prob(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)).reshape(yy.shape)

    full = (-0.85, 1.7, -1.05, 1.05)
    zoom = INSET_BOX
    views = [(full, density(*full, 640, 528), 1.2), (zoom, density(*zoom, 400, 400), 4.0)]
    titles = {"none": "no guidance", "cfg": "CFG", "autoguidance": "autoguidance"}
    panels = [("ground truth (exact samples)", experiment.reference)]
    panels += [(titles[m], experiment.headline[m]) for m in ("none", "cfg", "autoguidance") if m in experiment.headline]
    fig, axes = plt.subplots(2, len(panels), figsize=(4.4 * len(panels), 8.2), squeeze=False,
                             gridspec_kw={"height_ratios": [1.0, 1.25]})
    for col, (title, result) in enumerate(panels):
        pts = result.samples[:max_points]
        out = (dist.log_prob(pts) if result.logp is None else result.logp[:max_points]) < experiment.threshold
        for row, ((x0, x1, y0, y1), logp, size) in enumerate(views):
            ax = axes[row][col]
            # The class-A density on a log scale (its top 8 nats) under the samples; outliers
            # (exact log p below the level holding 1% of class A's own mass) in red.
            top = float(logp.max())
            ax.imshow(logp.clamp(min=top - 8).numpy(), extent=(x0, x1, y0, y1), origin="lower",
                      cmap="Greys", alpha=0.55, interpolation="bilinear", aspect="equal")
            ax.scatter(pts[~out, 0].numpy(), pts[~out, 1].numpy(), s=size, c="tab:blue", alpha=0.7, linewidths=0)
            ax.scatter(pts[out, 0].numpy(), pts[out, 1].numpy(), s=size, c="tab:red", alpha=0.8, linewidths=0)
            ax.set_xlim(x0, x1)
            ax.set_ylim(y0, y1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.add_patch(Rectangle((zoom[0], zoom[2]), zoom[1] - zoom[0], zoom[3] - zoom[2],
                                       fill=False, edgecolor="black", linewidth=0.8))
        m = result.metrics
        w = "" if math.isnan(result.guidance) else f", w = {result.guidance:g}"
        axes[0][col].set_title(f"{title}{w}\nprecision {m['precision']:.3f}  recall {m['recall']:.3f}  "
                               f"outliers {m['outlier_frac']:.3f}", fontsize=9)
        axes[1][col].set_title("zoom: the boxed finest branches", fontsize=8)
    fig.suptitle(
        f"2-D tree toy, class A: {experiment.n} samples per method ({min(max_points, experiment.n)} drawn), EDM Heun "
        f"{NUM_STEPS} steps; red: outliers (exact log p below class A's {OUTLIER_QUANTILE:.0%} level)", fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
