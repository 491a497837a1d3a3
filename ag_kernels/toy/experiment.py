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

from ..checkpoint import load_net, save_net
from ..sampler import edm_sampler
from .distribution import tree_mixture
from .metrics import mean_log_prob, outlier_fraction, precision_recall
from .model import ToyDenoiser, train

__all__ = [
    "ModelSpec", "MODELS", "GUIDES", "WEIGHTS_DIR", "NUM_STEPS", "SIGMA_MIN", "SIGMA_MAX", "K", "OUTLIER_QUANTILE",
    "DEFAULT_CFG_WEIGHTS", "DEFAULT_AG_WEIGHTS", "train_models", "load_models", "sample",
    "outlier_threshold", "score_samples", "MethodResult", "Experiment", "run", "plot",
]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One toy model: the class it learns, its size and its training length."""

    name: str
    data: str           # "A" or "AB" (the union: CFG's unconditional model)
    hidden: int
    layers: int
    iterations: int
    seed: int
    role: str


#: The paper's toy models: D_1, autoguidance's D_0 (smaller and trained 8x shorter), CFG's D_0.
MODELS: Dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("main", "A", 64, 4, 4096, 1, "D_1: class A, 4 x 64, 4096 iterations"),
        ModelSpec("guide", "A", 32, 4, 512, 2, "autoguidance D_0: class A, 4 x 32, 512 iterations"),
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
_THRESHOLD_SAMPLES = 1 << 20
DEFAULT_CFG_WEIGHTS = (1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
DEFAULT_AG_WEIGHTS = (1.25, 1.5, 2.0, 2.5, 3.0, 4.0)


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

    Each file is an :func:`ag_kernels.checkpoint.save_net` checkpoint (architecture name, its
    arguments and the EMA weights; read back with ``weights_only=True``).  ``iterations_scale``
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
    paths = {}
    for name in names:
        spec = MODELS[name]
        dist = tree_mixture(spec.data)
        iterations = max(1, round(spec.iterations * iterations_scale))
        losses: List[float] = []
        model = ToyDenoiser(hidden=spec.hidden, layers=spec.layers, seed=spec.seed)
        log(f"training {name}: {spec.role}" + (f" (scaled to {iterations} iterations)" if iterations != spec.iterations else ""))
        start = time.perf_counter()
        ema = train(
            model, dist.denoise, lambda n, g, d=dist: d.sample(n, generator=g),
            iterations=iterations, batch_size=batch_size, seed=spec.seed, progress=progress,
            log=lambda it, loss: losses.append(loss),
        )
        seconds = time.perf_counter() - start
        path = outdir / f"{name}.pt"
        save_net(ema, path)
        paths[name] = path
        tail = losses[-max(1, len(losses) // 10):]
        record[name] = {
            **dataclasses.asdict(spec), "iterations": iterations, "batch_size": batch_size,
            "first_loss": losses[0], "final_loss_mean_last_10pct": sum(tail) / len(tail),
            "seconds": round(seconds, 1), "torch": torch.__version__,
        }
        log(f"  {path}: loss {losses[0]:.3f} -> {record[name]['final_loss_mean_last_10pct']:.3f} in {seconds:.0f} s")
    log_path.write_text(json.dumps(record, indent=2) + "\n")
    return paths


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
) -> torch.Tensor:
    """n class-A samples [n, 2] (float64, CPU) of D_w = D_0 + w (D_1 - D_0) via :func:`edm_sampler`.

    The noise depends on ``seed`` and ``n`` only, so every method starts from the same points.
    """
    noise = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    out = edm_sampler(
        net, noise.to(device=device, dtype=torch.float32), None, gnet, num_steps=num_steps,
        sigma_min=SIGMA_MIN, sigma_max=sigma_max, guidance=guidance, backend=backend,
    )
    return out.to(device="cpu", dtype=torch.float64)


# ------------------------------------------------------------------------------ metrics


@functools.lru_cache(maxsize=8)
def outlier_threshold(data: str = "A", quantile: float = OUTLIER_QUANTILE, *, samples: int = _THRESHOLD_SAMPLES, seed: int = 0) -> float:
    """The log-density level below which a fraction ``quantile`` of the class's mass lies (cached)."""
    dist = tree_mixture(data)
    points = dist.sample(samples, generator=torch.Generator().manual_seed(seed))
    return float(torch.quantile(dist.log_prob(points), quantile))


def score_samples(samples: torch.Tensor, reference: torch.Tensor, *, threshold: float, data: str = "A", k: int = K) -> Dict[str, float]:
    """Improved precision/recall against ``reference`` (exact samples), mean log p and outlier fraction."""
    dist = tree_mixture(data)
    logp = dist.log_prob(samples)
    precision, recall = precision_recall(reference, samples, k=k)
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {
        "precision": precision, "recall": recall, "f1": f1,
        "mean_logp": mean_log_prob(logp), "outlier_frac": outlier_fraction(logp, threshold),
    }


@dataclasses.dataclass
class MethodResult:
    method: str          # "none", "cfg", "autoguidance" (or "data": exact samples, for reference)
    guidance: float
    metrics: Dict[str, float]
    samples: torch.Tensor = dataclasses.field(repr=False)

    def row(self) -> Dict[str, float]:
        return {"guidance": self.guidance, **self.metrics}


@dataclasses.dataclass
class Experiment:
    n: int
    seed: int
    threshold: float
    reference: MethodResult          # exact class-A samples scored against an independent exact set
    sweep: List[MethodResult]        # every (method, w) sampled, in order
    best: Dict[str, MethodResult]    # per method, the w with the highest F1 of precision and recall
    device: str
    seconds: float

    def to_json(self) -> Dict[str, Dict[str, float]]:
        """``{method: {"guidance", "precision", "recall", "mean_logp", "outlier_frac", "f1"}}`` for the best w."""
        return {m: r.row() for m, r in self.best.items()}


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
    with the small, short-trained class-A model.  The best w of a method maximizes the harmonic
    mean (F1) of precision and recall; ties go to the smaller w.
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
    data = MethodResult("data", float("nan"), score_samples(exact, reference, threshold=threshold), exact)
    plan = [("none", 1.0)] + [("cfg", w) for w in cfg_weights] + [("autoguidance", w) for w in ag_weights]
    sweep = []
    for method, w in plan:
        gnet = models[GUIDES[method]] if GUIDES[method] else None
        x = sample(models["main"], gnet, w, n, seed=seed, device=device, backend=backend, num_steps=num_steps)
        result = MethodResult(method, w, score_samples(x, reference, threshold=threshold), x)
        sweep.append(result)
        if log is not None:
            log(result)
    best: Dict[str, MethodResult] = {}
    for r in sweep:
        cur = best.get(r.method)
        if cur is None or r.metrics["f1"] > cur.metrics["f1"]:
            best[r.method] = r
    return Experiment(n, seed, threshold, data, sweep, best, str(torch.device(device)), time.perf_counter() - start)


# ------------------------------------------------------------------------------ figure


def plot(experiment: Experiment, path: Union[str, Path], *, max_points: int = 4096) -> Path:
    """A PNG like the paper's toy figure: class-A density contours and each method's samples."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    dist = tree_mixture("A")
    lo = torch.tensor([-2.0, -1.6])
    hi = torch.tensor([2.0, 2.0])
    gx = torch.linspace(float(lo[0]), float(hi[0]), 400, dtype=torch.float64)
    gy = torch.linspace(float(lo[1]), float(hi[1]), 360, dtype=torch.float64)
    yy, xx = torch.meshgrid(gy, gx, indexing="ij")
    logp = dist.log_prob(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)).reshape(yy.shape)
    levels = [experiment.threshold + d for d in (0.0, 2.0, 4.0, 6.0)]
    panels = [("ground truth (class A)", experiment.reference)]
    titles = {"none": "no guidance", "cfg": "CFG", "autoguidance": "autoguidance"}
    for method in ("none", "cfg", "autoguidance"):
        if method in experiment.best:
            panels.append((titles[method], experiment.best[method]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4), squeeze=False)
    for ax, (title, result) in zip(axes[0], panels):
        # Shaded ground-truth density (log scale, floored below the outlier level) under the samples.
        ax.contourf(xx.numpy(), yy.numpy(), logp.clamp(min=levels[0] - 2).numpy(), levels=8, cmap="Greys", alpha=0.5)
        ax.contour(xx.numpy(), yy.numpy(), logp.numpy(), levels=levels[:1], colors="tab:red", linewidths=0.5)
        pts = result.samples[:max_points]
        ax.scatter(pts[:, 0].numpy(), pts[:, 1].numpy(), s=1.5, c="tab:blue", alpha=0.6, linewidths=0)
        m = result.metrics
        w = "" if math.isnan(result.guidance) else f", w = {result.guidance:g}"
        ax.set_title(f"{title}{w}\nP {m['precision']:.3f}  R {m['recall']:.3f}  outliers {m['outlier_frac']:.3f}", fontsize=9)
        ax.set_xlim(float(lo[0]), float(hi[0]))
        ax.set_ylim(float(lo[1]), float(hi[1]))
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"2-D tree toy, class A: {experiment.n} samples, EDM Heun {NUM_STEPS} steps, sigma_max {SIGMA_MAX:g} "
        f"(red: outlier threshold, {OUTLIER_QUANTILE:.0%} of class-A mass below it)", fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
