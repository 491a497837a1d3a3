"""Generate samples for a list of seeds: seeds -> batches -> guided EDM sampler -> decode -> PNGs.

Every seed's noise, random class and churn noise come from its own generator
(:class:`ag_kernels.sampling.seeds.SeedNoise`), so a seed gives the same sample whatever batch it is in.
Under ``torchrun`` the batches are dealt out over the processes (rank r runs batches
r, r + W, r + 2W, ...): each batch is the one a single process would run, so the union of the
ranks' outputs is the single-process output, bit for bit.

    torchrun --nproc_per_node 8 my_script.py     # my_script.py iterates ag_kernels.generate(...)
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import torch

from .engine import GuidedSampler
from .seeds import SeedNoise, _check_seeds, _check_shape, parse_seeds

__all__ = ["GeneratedBatch", "generate"]


@dataclass
class GeneratedBatch:
    """One batch of :func:`generate`'s output.

    Attributes:
        seeds: the seeds of the batch, in order; row k of every tensor belongs to seeds[k].
        labels: the one-hot float32 class labels [B, label_dim] given to the networks, or None.
        samples: the sampler's output (float, on the sampling device).
        images: uint8 [B, C, H, W] (decoded by the encoder, or the samples mapped from [-1, 1]
            to [0, 255] when they are 4-D), or None when the samples are not image-like.
        paths: the PNG files written, one per seed (empty without outdir).
    """

    seeds: List[int]
    labels: Optional[torch.Tensor]
    samples: torch.Tensor
    images: Optional[torch.Tensor]
    paths: List[str] = field(default_factory=list)


def _distributed(device: Optional[torch.device] = None) -> Tuple[int, int]:
    """(rank, world_size) of this process.

    An initialized default process group is used as it is.  Otherwise, when launched by torchrun
    (env WORLD_SIZE > 1), the default group is initialized from torchrun's environment (env://)
    with NCCL for a CUDA ``device`` and Gloo otherwise; before NCCL, the process's current CUDA
    device is set from LOCAL_RANK, as NCCL expects one device per process.  Otherwise (0, 1).

    Nothing is ever destroyed here: a group the caller made is the caller's, and a group made
    here stays up for later calls (torch tears it down at exit; the caller may call
    ``torch.distributed.destroy_process_group()`` when done).
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"env WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None
    if world <= 1:
        return 0, 1
    if not dist.is_available():
        # Going on alone would make every process run every seed, each believing it is the only one.
        raise RuntimeError(f"WORLD_SIZE={world} (launched by torchrun?) but torch.distributed is not "
                           "available in this torch build")
    use_nccl = device is not None and torch.device(device).type == "cuda"
    if use_nccl and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend="nccl" if use_nccl else "gloo")
    return dist.get_rank(), dist.get_world_size()


def _default_device(net) -> torch.device:
    """The device of net's first parameter, or the CPU when it has none."""
    params = getattr(net, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def _check_int(name: str, value, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return int(value)


def _decode(encoder, samples: torch.Tensor) -> torch.Tensor:
    """encoder.decode(samples), or encoder(samples): checked to be uint8 [B, C, H, W]."""
    if hasattr(encoder, "decode"):
        images = encoder.decode(samples)
    elif callable(encoder):
        images = encoder(samples)
    else:
        raise TypeError(f"encoder must have a .decode method or be callable, got {type(encoder).__name__}")
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"encoder must return a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"encoder must return a uint8 tensor [B, C, H, W], got dtype {images.dtype}")
    if images.dim() != 4 or images.shape[0] != samples.shape[0]:
        raise ValueError(f"encoder must return a uint8 tensor [B, C, H, W] with B = {samples.shape[0]}, "
                         f"got shape {tuple(images.shape)}")
    return images


def _png_path(outdir: str, seed: int, subdirs: bool = True) -> str:
    # With subdirs, one folder per thousand seeds, as the EDM2 scripts do, so no folder grows huge.
    if not subdirs:
        return os.path.join(outdir, f"{seed:06d}.png")
    return os.path.join(outdir, f"{seed - seed % 1000:06d}", f"{seed:06d}.png")


BATCH_SPLITS = ("fixed", "even")


def _split(n: int, batch_size: int, world: int, how: str) -> List[range]:
    """Index ranges of the batches, in order over all ranks (rank r runs entries r, r + world, ...).

    "fixed": consecutive batches of batch_size (the last one possibly shorter), the same for any
    number of processes.  "even": the EDM2 generator's split: the smallest multiple of ``world``
    batches of at most batch_size per process, sizes differing by at most one, larger ones
    first (empty batches where there are fewer seeds than processes).
    """
    if how == "fixed":
        return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    count = max((n - 1) // (batch_size * world) + 1, 1) * world
    size, extra = divmod(n, count)
    out, start = [], 0
    for k in range(count):
        stop = start + size + (1 if k < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out


def _write_pngs(images: torch.Tensor, seeds: List[int], outdir: str, subdirs: bool = True,
                keep_existing: bool = False) -> List[str]:
    try:
        import numpy as np  # noqa: F401  (Tensor.numpy below needs it)
        from PIL import Image
    except ImportError as exc:
        raise ImportError(f"outdir: writing PNGs needs Pillow and NumPy ({exc}); "
                          "install them or pass outdir=None") from exc
    channels = images.shape[1]
    if channels not in (1, 3):
        raise ValueError(f"outdir: PNGs are written from images with 1 or 3 channels, got {channels} "
                         f"(shape {tuple(images.shape)}); pass an encoder that returns such images, or outdir=None")
    hwc = images.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    paths = []
    for seed, img in zip(seeds, hwc):
        path = _png_path(outdir, seed, subdirs)
        paths.append(path)
        if keep_existing and os.path.exists(path):
            continue
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        # Written under a temporary name, then renamed: an interrupted run never leaves a
        # truncated PNG under a final name (os.replace is atomic on one file system).
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            Image.fromarray(img[:, :, 0] if channels == 1 else img, "L" if channels == 1 else "RGB").save(tmp, "PNG")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return paths


def generate(
    net,
    gnet=None,
    seeds=range(16),
    batch_size: int = 16,
    class_idx: Optional[int] = None,
    encoder=None,
    outdir: Optional[str] = None,
    *,
    subdirs: bool = True,
    batch_split: str = "fixed",
    skip_existing: bool = False,
    noise_shape=None,
    device=None,
    progress: bool = True,
    **sampler_kwargs,
) -> Iterator[GeneratedBatch]:
    """Sample one image per seed with :func:`ag_kernels.edm_sampler`, yielding a :class:`GeneratedBatch` per batch.

    A generator function: nothing runs, and no argument is checked, until it is iterated;
    ``list(generate(...))`` or ``for batch in generate(...)`` runs it.

    Args:
        net: the main network, called as ``net(x, t, labels)``; its attributes ``img_channels`` and
            ``img_resolution`` give the noise shape, ``label_dim`` (0 when absent) the classes.
        gnet: the guiding network (autoguidance or CFG); pass ``guidance=...`` in sampler_kwargs.
        seeds: a sequence of integers in [0, 2**63), or text for :func:`parse_seeds` ("0-63").
        batch_size: at most this many seeds per sampler call; the seeds are split into
            consecutive batches in order, the last one possibly shorter.
        class_idx: the class of every sample (0 <= class_idx < net.label_dim); None draws one per
            seed.  Only for a net with label_dim > 0.
        encoder: turns samples into uint8 images [B, C, H, W]: ``encoder.decode(samples)`` if it
            has ``.decode``, else ``encoder(samples)``.  Without one, 4-D samples in [-1, 1] are
            mapped to [0, 255].
        outdir: if given, one PNG per seed is written to ``outdir/{seed - seed % 1000:06d}/{seed:06d}.png``
            (``subdirs=False``: ``outdir/{seed:06d}.png``, as EDM2's generator without --subdirs).
        subdirs: with outdir, one subfolder per 1000 seeds (default) or all PNGs in outdir itself.
        skip_existing: with outdir, resume an interrupted run: a batch whose PNGs all exist is not
            sampled (and not yielded); a batch with some of them is sampled whole, as before (so a
            batch-size-sensitive network computes the same), and only its missing PNGs are written.
        batch_split: "fixed" (default): consecutive batches of batch_size seeds, the same for any
            number of processes; "even": the EDM2 generator's split (as many batches as needed,
            a multiple of the process count, sizes differing by at most one), so a network whose
            arithmetic depends on the batch size computes what the reference does.
        noise_shape: the shape of one sample's noise; default ``(net.img_channels,
            net.img_resolution, net.img_resolution)``.
        device: where the noise (and labels) are made; default the device of net's first
            parameter, else the CPU.  Under torchrun with CUDA, a device without index becomes
            ``cuda:LOCAL_RANK``; place the networks there too.
        progress: a tqdm bar over the batches (on rank 0 only).
        **sampler_kwargs: the settings of one :class:`ag_kernels.GuidedSampler` that samples every
            batch (those of :func:`ag_kernels.edm_sampler`: num_steps, guidance, S_churn, dtype,
            backend, ...; and cuda_graph, overlap, batch_guide, compile, check_finite).
            ``check_finite`` defaults to True here (non-finite samples raise
            :class:`ag_kernels.NonFiniteError` naming the step) and ``cuda_graph`` to "auto": on a GPU each batch shape is captured once and replayed (the same
            samples as an eager run).  Churn noise defaults to the seeds' own generators
            (``SeedNoise.randn_like``) rather than ``torch.randn_like``, so churned samples are
            reproducible per seed too; a ``randn_like`` given here replaces it.

    Per batch, each seed's generator draws, in this order: its noise (``randn(noise_shape)``), its
    class (``randint(label_dim)``, when label_dim > 0, also when class_idx fixes the class, so that
    the churn noise does not depend on class_idx), then the churn noise, step by step.  The
    generator is seeded with ``seed % 2**32``, as EDM2's generate_images seeds its own: the CPU
    generator only uses the low 32 bits anyway, while a CUDA generator would draw another stream
    for a seed >= 2**32 than the reference does.  (File names keep the whole seed.)

    Distributed: when torch.distributed is initialized, or when launched by torchrun (WORLD_SIZE
    > 1; the default process group is then initialized, NCCL on CUDA, Gloo on the CPU), rank r
    of W runs batches r, r + W, r + 2W, ...  Every batch has the composition it has in a single
    process, so the samples are bitwise the same.  The process group is never destroyed here.

    Yields:
        One :class:`GeneratedBatch` per batch this process sampled, in order.

    Raises:
        TypeError: an argument of the wrong type (seeds, batch_size, an encoder that is not callable, ...).
        ValueError: an argument out of range (no seeds, a seed outside [0, 2**63), batch_size < 1,
            class_idx outside [0, label_dim), an unknown batch_split, a sampler setting the
            engine refuses), or an unusable outdir.
        ag_kernels.NonFiniteError: samples that became NaN or infinite (``check_finite``, on by default).
    """
    seeds, batch_size = _check_options(seeds, batch_size, progress, subdirs, skip_existing, outdir, batch_split,
                                       encoder, sampler_kwargs)
    noise_shape, label_dim, class_idx = _sample_spec(net, noise_shape, class_idx)
    device, rank, world = _place(net, device)
    engine, user_randn_like = _engine(net, gnet, sampler_kwargs)
    for batch_seeds in _my_batches(seeds, batch_size, rank, world, batch_split, progress):
        if skip_existing and all(os.path.exists(_png_path(os.fspath(outdir), seed, subdirs)) for seed in batch_seeds):
            continue  # finished by an earlier run
        rng, noise, labels = _draw(batch_seeds, device, noise_shape, label_dim, class_idx)
        samples = engine(noise, labels, randn_like=user_randn_like or rng.randn_like)
        images = _images(samples, encoder)
        paths: List[str] = []
        if outdir is not None:
            if images is None:
                raise ValueError(f"outdir: samples of shape {tuple(samples.shape)} are not images [B, C, H, W]; "
                                 "pass an encoder that decodes them, or outdir=None")
            paths = _write_pngs(images, batch_seeds, os.fspath(outdir), subdirs, keep_existing=skip_existing)
        yield GeneratedBatch(seeds=list(batch_seeds), labels=labels, samples=samples, images=images, paths=paths)


# --------------------------------------------------------------------------- the steps of generate


def _check_options(seeds, batch_size, progress, subdirs, skip_existing, outdir, batch_split, encoder, sampler_kwargs):
    """generate's own arguments checked; (seeds as a list, batch_size)."""
    if isinstance(seeds, str):
        seeds = parse_seeds(seeds)
    seeds = _check_seeds(seeds, "seeds")
    batch_size = _check_int("batch_size", batch_size, 1)
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
    if subdirs is not True and subdirs is not False:
        raise TypeError(f"subdirs must be True or False, got {subdirs!r}")
    if skip_existing is not True and skip_existing is not False:
        raise TypeError(f"skip_existing must be True or False, got {skip_existing!r}")
    if skip_existing and outdir is None:
        raise ValueError("skip_existing=True needs outdir: it skips the seeds whose PNGs are already there")
    if batch_split not in BATCH_SPLITS:
        raise ValueError(f"batch_split must be one of {BATCH_SPLITS}, got {batch_split!r}")
    if outdir is not None and not isinstance(outdir, (str, os.PathLike)):
        raise TypeError(f"outdir must be a path (str or os.PathLike) or None, got {type(outdir).__name__}")
    if encoder is not None and not (hasattr(encoder, "decode") or callable(encoder)):
        raise TypeError(f"encoder must have a .decode method or be callable, got {type(encoder).__name__}")
    for reserved in ("noise", "labels"):
        if reserved in sampler_kwargs:
            raise TypeError(f"{reserved} is made by generate from the seeds; do not pass it in sampler_kwargs")
    return seeds, batch_size


def _sample_spec(net, noise_shape, class_idx):
    """(noise_shape, label_dim, class_idx): one sample's noise shape and the classes, from the
    network's EDM-style attributes where not given."""
    if noise_shape is None:
        missing = [a for a in ("img_channels", "img_resolution") if not hasattr(net, a)]
        if missing:
            raise ValueError(f"noise_shape: net has no attribute {', '.join(missing)} to derive it from; "
                             "pass noise_shape=(C, H, W) (the shape of one sample)")
        noise_shape = (net.img_channels, net.img_resolution, net.img_resolution)
    noise_shape = _check_shape(noise_shape, "noise_shape")
    label_dim = getattr(net, "label_dim", 0) or 0
    if isinstance(label_dim, bool) or not isinstance(label_dim, numbers.Integral):
        raise TypeError(f"net.label_dim must be an integer, got {type(label_dim).__name__}")
    if label_dim < 0:
        raise ValueError(f"net.label_dim must be >= 0, got {label_dim}")
    label_dim = int(label_dim)
    if class_idx is not None:
        if label_dim == 0:
            raise ValueError(f"class_idx={class_idx!r} given but net has no labels (label_dim is 0 or absent); "
                             "pass class_idx=None")
        class_idx = _check_int("class_idx", class_idx, 0)
        if class_idx >= label_dim:
            raise ValueError(f"class_idx must be < net.label_dim ({label_dim}), got {class_idx}")
    return noise_shape, label_dim, class_idx


def _place(net, device):
    """(device, rank, world): where this process samples, and its place among torchrun's processes."""
    if device is None:
        device = _default_device(net)
    elif not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or torch.device, got {type(device).__name__}")
    device = torch.device(device)
    rank, world = _distributed(device)
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return device, rank, world


def _engine(net, gnet, sampler_kwargs):
    """(engine, the caller's randn_like or None): one engine for every batch, so the settings are
    checked once and on a GPU each batch shape is captured into a CUDA graph once (the last batch
    may be shorter: a second graph)."""
    engine_kwargs = dict(sampler_kwargs)
    user_randn_like = engine_kwargs.pop("randn_like", None)
    engine_kwargs.setdefault("cuda_graph", "auto")
    engine_kwargs.setdefault("check_finite", True)  # NaN samples are an error naming the step, not PNGs
    return GuidedSampler(net, gnet, **engine_kwargs), user_randn_like


def _my_batches(seeds, batch_size, rank, world, batch_split, progress):
    """This rank's batches of seeds.  The batches of the full seed list are dealt round-robin: with
    "fixed", the same batches (and so the same arithmetic for a batch-size-sensitive network) as in
    one process; with "even", the batches EDM2's generator forms for this many processes."""
    batches = [seeds[r.start:r.stop] for r in _split(len(seeds), batch_size, world, batch_split)]
    mine = [b for b in batches[rank::world] if b]
    if progress and rank == 0:
        from tqdm.auto import tqdm

        mine = tqdm(mine, desc="generate", unit="batch")
    return mine


def _draw(batch_seeds, device, noise_shape, label_dim, class_idx):
    """(per-seed generators, noise, one-hot labels or None) of a batch.

    Seeded as EDM2's generate_images seeds (seed mod 2**32), and drawing noise first, then the
    class, as it does: a sample's starting noise is the one the reference draws on the device.
    """
    rng = SeedNoise([s % 2 ** 32 for s in batch_seeds], device)
    noise = rng.randn(noise_shape)
    labels = None
    if label_dim > 0:
        classes = rng.randint(label_dim)  # drawn even under class_idx: later draws stay the same
        if class_idx is not None:
            classes = torch.full_like(classes, class_idx)
        labels = torch.eye(label_dim, dtype=torch.float32, device=device)[classes]
    return rng, noise, labels


def _images(samples, encoder):
    """uint8 images [B, C, H, W] of the samples, or None where they are not images and no encoder decodes them."""
    if encoder is not None:
        with torch.no_grad():
            return _decode(encoder, samples)
    if samples.dim() == 4:
        # EDM2's pixel-space decoding, in float32 as there (a float64 run rounds the same way).
        return (samples.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)
    return None
