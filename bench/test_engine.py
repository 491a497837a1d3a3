"""Whole guided sampler on EDM2-shaped networks: the edm2-style eager loop against GuidedSampler's modes.

One group per batch; its cases run side by side in one session on the same networks, noise and
labels, 32 Heun steps, guidance 2.0, sigma_max 80:

* ``edm2_eager``: :func:`ag_kernels.kernels.reference.torch_edm_sampler`, the EDM2 reference loop op by op
  (the baseline of the speed-ups);
* ``eager``: ``GuidedSampler(cuda_graph=False, overlap=False)``, our eager path;
* ``graph``: ``cuda_graph=True, overlap=False``: the whole run captured once, then replayed;
* ``graph_overlap``: ``cuda_graph=True, overlap=True``: the guide on a second stream in the graph;
* ``graph_overlap_compile``: as graph_overlap, with ``compile=True`` (torch.compile of the networks).

Every case's first call is timed on its own (``first_call_s``: capture for the graph cases,
compile and capture for the compile case, lazy initialization for the eager ones) and is not part
of the rounds.  The graph cases need CUDA: on a CPU they are skipped with that reason (the report
lists them).  A graph case that ran eagerly (``last_mode`` not "graph") fails, after its row is
recorded with the engine's ``fallback_reason``.

Agreement, measured in the same run (max |a - b| / max |b|):
* with the 16-bit networks: ``eager`` against ``edm2_eager``, every other case against
  ``eager``.  Only reported: a last-bit difference of x between two samplers can flip a 16-bit
  rounding inside a network, and the trajectories can then part by ~1e-3;
* with float32 networks (autocast off, or EDM2's ``use_fp16 = False``; TF32 off): ``eager``
  against ``edm2_eager``, and ``graph`` and ``graph_overlap`` against ``eager``, asserted within
  1e-5, at the batches of AG_BENCH_ENGINE_FP32_BATCHES (GPU default 1 and 8: float32 sampling at
  batch 64 would take minutes, by our estimate).  The compile case is not checked in float32
  (inductor's fused kernels round differently, and a float32 recompile would add minutes); its
  16-bit difference is reported.

Networks: main "s", guide "xs" on a GPU (4x64x64 latents, 1000 classes, one-hot labels).  By
default bench/unet.py's UNet pair under float16 autocast (random weights).  With AG_EDM2_PATH
(``python -m bench --edm2 PATH``) the real ``training.networks_edm2.Precond`` of that NVlabs/edm2
checkout, random weights: XS ``model_channels=128``, S ``model_channels=192``,
``img_resolution=64, img_channels=4, label_dim=1000, use_fp16=True``, eval mode; its gains, zero
at initialization (which makes an untrained network's output exactly c_skip * x), are set to 1 so
the outputs depend on the whole network (EDM2's one 16-bit mode is float16; AG_BENCH_ENGINE_DTYPE=float32
turns it off).  On a CPU both shrink to "cpu-s" / "cpu-xs" at 16x16 latents, batch 1, and our UNet
runs under bfloat16 autocast (float16 convolutions ran about 20x slower than bfloat16 on our CPU);
these figures say nothing about a GPU, and EDM2's Precond runs float16 only on CUDA.

Rounds: as many as fit in about AG_BENCH_ENGINE_SECONDS (default 2) per case, judged from a timed
second call (skipped when the first call took longer than that), between 3 and 100
(AG_BENCH_ENGINE_SECONDS=0, the smoke profile: one round).

Environment: AG_BENCH_STEPS, AG_BENCH_ENGINE_BATCHES, AG_BENCH_ENGINE_NETS ("main,guide" size
names), AG_BENCH_ENGINE_DTYPE (float16), AG_BENCH_ENGINE_FP32_BATCHES,
AG_BENCH_ENGINE_COMPILE_BATCHES (GPU default 64: compiling two UNets is expected to take a minute
or more per batch shape; not yet measured), AG_BENCH_ENGINE_SECONDS, AG_EDM2_PATH.
"""

from __future__ import annotations

import contextlib
import math
import os
import time

import pytest
import torch

from ag_kernels import GuidedSampler
from ag_kernels.kernels import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = int(os.environ.get("AG_BENCH_STEPS", "32"))
W = 2.0
SIGMA_MAX = 80.0
TOL = 1e-5
LABEL_DIM = 1000


def _ints(name, default):
    return [int(v) for v in os.environ.get(name, default).split(",") if v.strip()]


BATCHES = _ints("AG_BENCH_ENGINE_BATCHES", "1,8,64" if DEVICE == "cuda" else "1")
SIZES = tuple(os.environ.get("AG_BENCH_ENGINE_NETS", "s,xs" if DEVICE == "cuda" else "cpu-s,cpu-xs").split(","))
NET_DTYPE = getattr(torch, os.environ.get("AG_BENCH_ENGINE_DTYPE", "float16" if DEVICE == "cuda" else "bfloat16"))
FP32_BATCHES = _ints("AG_BENCH_ENGINE_FP32_BATCHES", "1,8" if DEVICE == "cuda" else ",".join(map(str, BATCHES)))
COMPILE_BATCHES = _ints("AG_BENCH_ENGINE_COMPILE_BATCHES", "64" if DEVICE == "cuda" else "")
SECONDS = float(os.environ.get("AG_BENCH_ENGINE_SECONDS", "2"))
MIN_ROUNDS, MAX_ROUNDS = (3 if SECONDS > 0 else 1), 100  # SECONDS=0 (smoke): one round after the first call
EDM2_PATH = os.environ.get("AG_EDM2_PATH") or None

#: case -> GuidedSampler settings (edm2_eager is the reference loop).
SETTINGS = {
    "eager": dict(cuda_graph=False, overlap=False),
    "graph": dict(cuda_graph=True, overlap=False),
    "graph_overlap": dict(cuda_graph=True, overlap=True),
    "graph_overlap_compile": dict(cuda_graph=True, overlap=True, compile=True),
}
CASES = ("edm2_eager",) + tuple(SETTINGS)
#: Cases whose float32 agreement is asserted, and what they are compared with.
FP32_REF = {"eager": "edm2_eager", "graph": "eager", "graph_overlap": "eager"}

#: EDM2 Precond keyword arguments per size name (facts of NVlabs/edm2's train_edm2.py presets:
#: XS 128 and S 192 channels; the cpu sizes are ours, for a CPU smoke run).
EDM2_SIZES = {
    "xs": dict(model_channels=128),
    "s": dict(model_channels=192),
    "cpu-xs": dict(model_channels=32, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8]),
    "cpu-s": dict(model_channels=64, channel_mult=[1, 2, 2], num_blocks=1, attn_resolutions=[8]),
}
#: EDM2 initializes these gains to zero (trained from there); 1 makes a random network's output depend on it.
EDM2_GAINS = ("out_gain", "emb_gain")

_NETS = {}
_OUT = {}   # (batch, case) -> output with the 16-bit networks
_FP32 = {}  # (batch, case) -> output with float32 networks


def _resolution(size: str) -> int:
    from bench.unet import SIZES as UNET_SIZES

    return UNET_SIZES[size]["img_resolution"]


def _edm2_pair():
    from ag_kernels.models.edm2 import find_checkout, use_checkout

    folder = find_checkout(EDM2_PATH)
    use_checkout(folder)
    from training.networks_edm2 import Precond

    nets = []
    for size, seed in zip(SIZES, (1, 2)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            # EDM2's one 16-bit mode is float16 (on CUDA only); AG_BENCH_ENGINE_DTYPE=float32 turns it off.
            net = Precond(img_resolution=_resolution(size), img_channels=4, label_dim=LABEL_DIM,
                          use_fp16=NET_DTYPE != torch.float32, **EDM2_SIZES[size])
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.rsplit(".", 1)[-1] in EDM2_GAINS:
                    p.fill_(1.0)
        nets.append(net.to(DEVICE).eval().requires_grad_(False))
    runs16 = DEVICE == "cuda" and nets[0].use_fp16
    desc = (f"edm2 Precond {SIZES[0]} / {SIZES[1]} ({_params(nets[0])} / {_params(nets[1])}), "
            f"{'float16' if runs16 else 'float32'}, checkout {folder}")
    return nets[0], nets[1], desc, "float16" if runs16 else "float32"


def _unet_pair():
    from bench.unet import make_pair

    net, gnet = make_pair(*SIZES, DEVICE, dtype=NET_DTYPE)
    desc = f"unet {SIZES[0]} / {SIZES[1]} ({_params(net)} / {_params(gnet)}), {str(NET_DTYPE)[6:]} autocast"
    return net, gnet, desc, str(NET_DTYPE)[6:]


def _params(net) -> str:
    return f"{sum(p.numel() for p in net.parameters()) / 1e6:.1f}M"


def _nets():
    if not _NETS:
        _NETS["pair"] = _edm2_pair() if EDM2_PATH else _unet_pair()
    return _NETS["pair"]


def _inputs(batch, net):
    gen = torch.Generator().manual_seed(batch)
    noise = torch.randn(batch, net.img_channels, net.img_resolution, net.img_resolution, generator=gen).to(DEVICE)
    labels = torch.eye(net.label_dim)[torch.randint(net.label_dim, (batch,), generator=gen)].to(DEVICE)
    return noise, labels


@contextlib.contextmanager
def float32_networks(*nets):
    """The networks in plain float32 (our Autocast wrapper's ``enabled``, EDM2's ``use_fp16``), TF32 off."""
    saved = []
    for net in nets:
        attr = "enabled" if hasattr(net, "enabled") else "use_fp16" if hasattr(net, "use_fp16") else None
        if attr is None:
            raise TypeError(f"{type(net).__name__}: no 'enabled' or 'use_fp16' attribute to run it in float32")
        saved.append((net, attr, getattr(net, attr)))
        setattr(net, attr, False)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        for net, attr, value in saved:
            setattr(net, attr, value)


def _sampler(net, gnet, case):
    return GuidedSampler(net, gnet, num_steps=STEPS, sigma_max=SIGMA_MAX, guidance=W, **SETTINGS[case])


def _sample(net, gnet, noise, labels, case, sampler=None):
    """One run of ``case`` (a fresh GuidedSampler unless given); returns (output, sampler)."""
    with torch.no_grad():
        if case == "edm2_eager":
            out = reference.torch_edm_sampler(net, noise, labels, gnet, num_steps=STEPS, sigma_max=SIGMA_MAX, guidance=W)
        else:
            sampler = sampler or _sampler(net, gnet, case)
            out = sampler(noise, labels)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return out, sampler


def _rel(out, ref) -> float:
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


def _params_list():
    return [pytest.param(batch, case, id=f"{DEVICE}-b{batch}-{case}") for batch in BATCHES for case in CASES]


@pytest.mark.parametrize("batch, case", _params_list())
def test_engine(benchmark, batch, case):
    if case.startswith("graph") and DEVICE != "cuda":
        pytest.skip(f"CUDA graphs need a CUDA device (this run is on the {DEVICE})")
    if case.endswith("compile") and batch not in COMPILE_BATCHES:
        pytest.skip(f"compile case only at batches {COMPILE_BATCHES or 'none'} (AG_BENCH_ENGINE_COMPILE_BATCHES; "
                    "compiling the networks is expected to take a minute or more per batch shape)")
    net, gnet, desc, net_dtype = _nets()
    noise, labels = _inputs(batch, net)
    sampler = _sampler(net, gnet, case) if case != "edm2_eager" else None

    def timed():
        return _sample(net, gnet, noise, labels, case, sampler)[0]

    benchmark.group = f"engine {DEVICE} batch={batch}"
    benchmark.extra_info.update(case=case, device=DEVICE, batch=batch, steps=STEPS, guidance=W, nets=desc,
                                net_dtype=net_dtype, latent=list(noise.shape[1:]))
    try:
        start = time.perf_counter()
        timed()  # the first call: capture / compile / lazy initialization
        first = time.perf_counter() - start
        rounds = MIN_ROUNDS
        if 0 < SECONDS and first < SECONDS:
            start = time.perf_counter()
            timed()  # timed: how many rounds fit
            rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(SECONDS / (time.perf_counter() - start))))
        out = benchmark.pedantic(timed, rounds=rounds, iterations=1)
        mode = sampler.last_mode if sampler is not None else "eager"
        benchmark.extra_info.update(first_call_s=first, mode=mode,
                                    fallback_reason=sampler.fallback_reason if sampler is not None else None)
        _OUT[batch, case] = out
        ref_case = "edm2_eager" if case == "eager" else "eager"
        if case != "edm2_eager":
            benchmark.extra_info["vs"] = ref_case
            if (batch, ref_case) in _OUT:
                benchmark.extra_info["max_rel_diff"] = _rel(out, _OUT[batch, ref_case])
        if case.startswith("graph"):
            assert mode == "graph", f"{case} ran eagerly, not from a CUDA graph: {sampler.fallback_reason}"
    finally:
        if sampler is not None:
            sampler.reset()
        del sampler
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    if case in FP32_REF and batch in FP32_BATCHES:
        _fp32_check(benchmark, net, gnet, noise, labels, batch, case)


def _fp32_check(benchmark, net, gnet, noise, labels, batch, case):
    """This case and its reference with float32 networks: within 1e-5, asserted."""
    ref_case = FP32_REF[case]
    with float32_networks(net, gnet):
        for c in (ref_case, case):
            if (batch, c) not in _FP32:
                out, sampler = _sample(net, gnet, noise, labels, c)
                if c.startswith("graph"):
                    assert sampler.last_mode == "graph", f"{c} (float32) ran eagerly: {sampler.fallback_reason}"
                if sampler is not None:
                    sampler.reset()
                _FP32[batch, c] = out
    rel = _rel(_FP32[batch, case], _FP32[batch, ref_case])
    benchmark.extra_info["max_rel_diff_fp32"] = rel
    assert rel <= TOL, f"{case} differs from {ref_case} by {rel:.2e} with float32 networks (> {TOL:.0e})"
