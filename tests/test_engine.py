"""GuidedSampler, the sampling engine: eager runs, the graph path's static buffers, CFG batching, fallbacks.

On the CPU (CI) the engine runs eagerly; its graph path (static inputs refilled per call, churn
noise drawn before the replay, per-sample weights in static slots, the graph cache) runs with
``_emulate_graphs``, where "capture" keeps the run and "replay" runs it again over the static
buffers: a graph replay computes exactly that.  The tests marked ``cuda`` capture real CUDA
graphs and skip without a GPU.

Tolerances: eager vs (emulated or real) graph runs are bitwise equal (the same kernels on the
same values); against the published algorithm (``reference.torch_edm_sampler``) 1e-5 relative
in float32 (the sampler tolerance of docs/sampler.md); batched CFG vs two calls 1e-5 (a network's
arithmetic may depend on the batch size).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import ag_kernels
from ag_kernels import GuidedSampler
from ag_kernels.kernels import reference
from ag_kernels.models.nets import TinyDenoiser
from _util import cuda_only, rel_err

LABEL_DIM = 5
CHURN = dict(S_churn=30.0, S_min=0.05, S_max=50.0)
CUDA = torch.cuda.is_available()
needs_cuda = cuda_only("CUDA graphs need a CUDA device; none is available here")
needs_two_gpus = cuda_only("needs two CUDA devices (tensors on cuda:1 while cuda:0 is current)", devices=2)


def nets(device="cpu", out_dtype="float32"):
    net = TinyDenoiser(img_channels=3, img_resolution=8, label_dim=LABEL_DIM, channels=24, seed=11,
                       out_dtype=out_dtype).eval().to(device)
    gnet = TinyDenoiser(img_channels=3, img_resolution=8, label_dim=LABEL_DIM, channels=12, seed=22,
                        out_dtype=out_dtype).eval().to(device)
    return net, gnet


def inputs(gen, batch=3, device="cpu"):
    noise = torch.randn(batch, 3, 8, 8, generator=gen).to(device)
    classes = torch.randint(0, LABEL_DIM, (batch,), generator=gen)
    return noise, torch.nn.functional.one_hot(classes, LABEL_DIM).float().to(device)


def seeded(seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=x.dtype).to(device)


def _settings(kind, batch, device="cpu"):
    """Sampler settings exercising each way a weight reaches the kernels."""
    if kind == "float":
        return dict(guidance=2.1, **CHURN)
    if kind == "per_sample":
        return dict(guidance=torch.linspace(1.5, 3.0, batch, device=device), **CHURN)
    if kind == "callable_float":
        return dict(guidance=lambda s: 1.0 + 2.0 * s / (1.0 + s), **CHURN)
    if kind == "callable_tensor":
        return dict(guidance=lambda s: torch.full((batch,), 1.0 + s / (2.0 + s), device=device), **CHURN)
    if kind == "interval":
        return dict(guidance=2.5, guidance_interval=(0.3, 5.0), **CHURN)
    raise AssertionError(kind)


KINDS = ["float", "per_sample", "callable_float", "callable_tensor", "interval"]


@pytest.mark.parametrize("churn", [False, True])
def test_eager_matches_the_published_algorithm(churn, gen):
    """Scalar weights (the reference's kind); the other kinds are compared with edm_sampler below."""
    net, gnet = nets()
    noise, labels = inputs(gen)
    settings = dict(guidance=2.1, **(CHURN if churn else {}))
    engine = GuidedSampler(net, gnet, num_steps=7, cuda_graph=False, **settings)
    ours = engine(noise, labels, randn_like=seeded(5))
    ref = reference.torch_edm_sampler(net, noise, labels, gnet, num_steps=7, randn_like=seeded(5), **settings)
    assert rel_err(ours, ref) <= 1e-5
    assert engine.last_mode == "eager" and engine.fallback_reason == "cuda_graph=False"


@pytest.mark.parametrize("backend", ag_kernels.available_backends("cpu"))
@pytest.mark.parametrize("kind", KINDS)
def test_engine_reused_equals_edm_sampler(kind, backend, gen):
    """One engine over several batches of two shapes gives, bitwise, what edm_sampler gives per batch."""
    net, gnet = nets()
    engine = None
    for batch in (3, 2, 3):
        noise, labels = inputs(gen, batch)
        settings = _settings(kind, batch)
        if engine is None or kind in ("per_sample", "callable_tensor"):
            engine = GuidedSampler(net, gnet, num_steps=6, backend=backend, cuda_graph=False, **settings)
        ours = engine(noise, labels, randn_like=seeded(batch))
        ref = ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=6, backend=backend,
                                     randn_like=seeded(batch), **settings)
        assert torch.equal(ours, ref)


@pytest.mark.parametrize("kind", KINDS)
def test_graph_path_refills_every_input(kind, gen):
    """The graph path (emulated on the CPU) equals eager runs while noise, labels, churn noise and
    per-sample weights change from call to call, and across two batch shapes (two graphs)."""
    net, gnet = nets()
    graph = GuidedSampler(net, gnet, num_steps=6, cuda_graph=True, **_settings(kind, 3))
    graph._emulate_graphs = True
    for call, batch in enumerate((3, 3, 2, 3, 2)):
        noise, labels = inputs(gen, batch)
        settings = _settings(kind, batch)
        if kind == "per_sample":  # new values each call, in a new tensor or in place
            w = settings["guidance"] * (1 + 0.1 * call)
            settings["guidance"] = w
            graph.guidance.value = w
        if kind == "callable_tensor":
            graph.guidance.fn = settings["guidance"]
        eager = ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=6, randn_like=seeded(call), **settings)
        out = graph(noise, labels, randn_like=seeded(call))
        assert graph.last_mode == "graph", graph.fallback_reason
        assert torch.equal(out, eager), f"call {call}, batch {batch}"
    assert len(graph._cache.entries) == 2  # one per batch shape


def test_graph_cache_keys_and_eviction(gen):
    """A float weight is read from a static slot: one graph serves every value of w (a sweep does
    not re-capture), with each value's own result; batch shapes are keys, least recently used dropped."""
    net, gnet = nets()
    weights = {"w": 2.0}
    engine = GuidedSampler(net, gnet, num_steps=4, cuda_graph=True, max_graphs=2, guidance=lambda s: weights["w"])
    engine._emulate_graphs = True
    noise, labels = inputs(gen, 2)
    first = engine(noise, labels)
    for w in (3.0, 0.25, -1.5):
        weights["w"] = w
        out = engine(noise, labels)
        assert engine.last_mode == "graph" and len(engine._cache.entries) == 1
        assert torch.equal(out, ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=4, guidance=w))
    # w = 1 does not evaluate gnet at all: a different run, so a different graph.
    weights["w"] = 1.0
    assert torch.equal(engine(noise, labels), ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=4))
    assert len(engine._cache.entries) == 2
    weights["w"] = 2.0
    noise3, labels3 = inputs(gen, 3)
    engine(noise3, labels3)
    assert len(engine._cache.entries) == 2  # the least recently used graph went
    assert torch.equal(engine(noise, labels), first)  # captured again, same result
    engine.reset()
    assert not engine._cache.entries


@pytest.mark.parametrize("backend", ag_kernels.available_backends("cpu"))
def test_float_weight_slots_equal_eager_bitwise(backend, gen):
    """The graph path reads a float w from a static float64 slot; every backend gives the float's result bitwise."""
    net, gnet = nets()
    weights = {"w": 2.1}
    engine = GuidedSampler(net, gnet, num_steps=4, backend=backend, cuda_graph=True, guidance=lambda s: weights["w"],
                           guidance_interval=(0.3, 50.0), **CHURN)
    engine._emulate_graphs = True
    for call, w in enumerate((2.1, 0.4, 3.7)):
        weights["w"] = w
        noise, labels = inputs(gen, 3)
        out = engine(noise, labels, randn_like=seeded(call))
        ref = ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=4, backend=backend, guidance=w,
                                     guidance_interval=(0.3, 50.0), randn_like=seeded(call), **CHURN)
        assert engine.last_mode == "graph" and torch.equal(out, ref), f"w={w}"
    assert len(engine._cache.entries) == 1


def test_weight_aliasing_is_part_of_the_graph_key(gen):
    """A guidance function that returned one tensor for every level at capture and distinct tensors
    later must not have the later call read the first tensor's slot everywhere."""
    net, gnet = nets()
    shared = torch.tensor([2.0, 2.5, 3.0])
    calls = {"mode": "shared"}

    def guidance(sigma):
        if calls["mode"] == "shared":
            return shared
        return torch.full((3,), 1.0 + sigma / (1.0 + sigma))  # a new tensor per noise level

    engine = GuidedSampler(net, gnet, num_steps=5, cuda_graph=True, guidance=guidance)
    engine._emulate_graphs = True
    noise, labels = inputs(gen, 3)
    a = engine(noise, labels)
    assert torch.equal(a, ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=5, guidance=guidance))
    calls["mode"] = "distinct"
    b = engine(noise, labels)
    assert engine.last_mode == "graph"
    assert torch.equal(b, ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=5, guidance=guidance))
    assert len(engine._cache.entries) == 2  # two aliasing patterns, two graphs


def test_capture_failure_reports_the_networks_error_and_reuses_the_churn_noise(gen):
    """A network that capture rejects (emulated: it raises while the run is captured): the reason is
    its own error, and the eager fallback uses the churn noise already drawn for this call, so the
    result equals an eager run of the same seeds, first call and later ones alike."""
    net, gnet = nets()
    engine = None

    def refusing(x, t, lab):
        if engine._cache.capturing:
            raise RuntimeError("host read of a CUDA value while capturing")
        return gnet(x, t, lab)

    engine = GuidedSampler(net, refusing, num_steps=5, guidance=2.0, cuda_graph=True, **CHURN)
    engine._emulate_graphs = True
    for call in range(2):
        noise, labels = inputs(gen, 3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = engine(noise, labels, randn_like=seeded(call))
        assert engine.last_mode == "eager"
        assert engine.fallback_reason == "capture failed (RuntimeError: host read of a CUDA value while capturing)"
        assert len(caught) == (1 if call == 0 else 0)
        ref = GuidedSampler(net, gnet, num_steps=5, guidance=2.0, cuda_graph=False, **CHURN)(
            noise, labels, randn_like=seeded(call))
        assert torch.equal(out, ref), f"call {call}"


def test_generate_after_a_capture_failure_keeps_per_seed_noise(gen):
    """generate with churn and a network that capture rejects: every batch equals the eager run's."""
    net, gnet = nets()
    engines = []
    real_init = GuidedSampler.__init__

    def refusing(x, t, lab):
        if any(e._cache.capturing for e in engines):
            raise RuntimeError("synchronizes")
        return gnet(x, t, lab)

    kw = dict(seeds=range(5), batch_size=3, num_steps=4, guidance=2.0, progress=False, **CHURN)
    eager = list(ag_kernels.generate(net, refusing, cuda_graph=False, **kw))

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self._emulate_graphs = True
        engines.append(self)

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.setattr(GuidedSampler, "__init__", init)
        graphs = list(ag_kernels.generate(net, refusing, cuda_graph=True, **kw))
    assert engines and all(e.last_mode == "eager" for e in engines)
    for a, b in zip(eager, graphs):
        assert torch.equal(a.samples, b.samples)


def test_static_buffers_outlive_the_callers_inference_mode(gen):
    """The first call (which creates the static buffers) under torch.inference_mode, later ones outside it."""
    net, gnet = nets()
    engine = GuidedSampler(net, gnet, num_steps=4, guidance=torch.tensor([2.0, 3.0]), cuda_graph=True,
                           check_finite=True, **CHURN)
    engine._emulate_graphs = True
    noise, labels = inputs(gen, 2)
    with torch.inference_mode():
        a = engine(noise, labels, randn_like=seeded(1))
    b = engine(noise, labels, randn_like=seeded(1))
    with torch.inference_mode():
        c = engine(noise, labels, randn_like=seeded(1))
    assert engine.last_mode == "graph"
    assert torch.equal(a, b) and torch.equal(b, c)


def test_edm_sampler_engines_are_not_keyed_by_per_call_guidance(gen, monkeypatch):
    """edm_sampler(cuda_graph=True) with a guidance lambda, tensor or float made anew per call reuses one
    engine and one graph (emulated here) and gives each call's own result."""
    from ag_kernels.sampling import sampler as sampler_module

    monkeypatch.setattr(GuidedSampler, "_emulate_graphs", True)
    net, gnet = nets()
    noise, labels = inputs(gen, 3)
    sampler_module._ENGINES.clear()
    for w in (2.0, 2.5, 3.0):
        for guidance in (w, lambda s, w=w: w, torch.full((3,), w)):
            out = ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=3, guidance=guidance, cuda_graph=True)
            ref = ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=3, guidance=w)
            assert torch.equal(out, ref), (w, type(guidance).__name__)
    (engine,) = sampler_module._ENGINES.values()
    assert engine.last_mode == "graph"
    assert len(engine._cache.entries) == 2  # float weights (numbers and lambdas) and the per-sample tensor
    sampler_module._ENGINES.clear()


def test_cuda_graph_true_on_cpu_warns_once_and_runs_eagerly(gen):
    net, gnet = nets()
    noise, labels = inputs(gen)
    engine = GuidedSampler(net, gnet, num_steps=4, guidance=2.0, cuda_graph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = engine(noise, labels)
        b = engine(noise, labels)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "noise is on cpu" in messages[0], messages
    assert engine.last_mode == "eager" and "CUDA" in engine.fallback_reason
    assert torch.equal(a, b)
    assert torch.equal(a, ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=4, guidance=2.0))
    auto = GuidedSampler(net, gnet, num_steps=4, guidance=2.0)  # "auto": silent on the CPU
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(auto(noise, labels), a)


def test_non_tensor_labels_run_eagerly_with_a_reason(gen):
    calls = []

    def net(x, t, labels):
        calls.append(labels)
        return x / (1 + t ** 2)

    engine = GuidedSampler(net, None, num_steps=3, cuda_graph=True)
    engine._emulate_graphs = True
    noise, _ = inputs(gen)
    with pytest.warns(UserWarning, match="labels is a str"):
        engine(noise, "class-3")
    assert engine.last_mode == "eager" and calls[0] == "class-3"


def test_batched_cfg_with_one_network(gen):
    """gnet is net: one call on [x; x] with [labels; guide_labels], equal to two calls."""
    net, _ = nets()
    noise, labels = inputs(gen, 4)
    uncond = torch.zeros_like(labels)
    calls = []

    def counting(x, t, lab):
        calls.append(x.shape[0])
        return net(x, t, lab)

    batched = GuidedSampler(counting, counting, num_steps=5, guidance=3.0, cuda_graph=False, **CHURN)
    out = batched(noise, labels, guide_labels=uncond, randn_like=seeded(1))
    assert set(calls) == {8}, "one call on the doubled batch per evaluation"
    assert len(calls) == 9
    separate = GuidedSampler(counting, counting, num_steps=5, guidance=3.0, cuda_graph=False, batch_guide=False,
                             **CHURN)
    calls.clear()
    ref = separate(noise, labels, guide_labels=uncond, randn_like=seeded(1))
    assert set(calls) == {4} and len(calls) == 18
    assert rel_err(out, ref) <= 1e-5
    # The same through edm_sampler, and through the emulated graph path (bitwise the batched eager run).
    via = ag_kernels.edm_sampler(counting, noise, labels, counting, num_steps=5, guidance=3.0, guide_labels=uncond,
                                 randn_like=seeded(1), **CHURN)
    assert torch.equal(via, out)
    batched._emulate_graphs = True
    batched.cuda_graph = True
    assert torch.equal(batched(noise, labels, guide_labels=uncond, randn_like=seeded(1)), out)
    assert batched.last_mode == "graph"
    # Guidance against the same labels is no guidance: D_w = D_1 exactly.
    same = batched(noise, labels, randn_like=seeded(1))
    plain = GuidedSampler(net, None, num_steps=5, cuda_graph=False, **CHURN)(noise, labels, randn_like=seeded(1))
    assert rel_err(same, plain) <= 1e-5


def test_guide_labels_reach_gnet(gen):
    net, gnet = nets()
    noise, labels = inputs(gen)
    seen = []

    def guide(x, t, lab):
        seen.append(lab)
        return gnet(x, t, lab)

    uncond = torch.zeros_like(labels)
    GuidedSampler(net, guide, num_steps=2, guidance=2.0)(noise, labels, guide_labels=uncond)
    assert all(s is uncond for s in seen) and len(seen) == 3
    seen.clear()
    GuidedSampler(net, guide, num_steps=2, guidance=2.0)(noise, labels, guide_labels=None)
    assert seen == [None] * 3


def test_bad_settings_and_calls_name_the_argument(gen):
    net, gnet = nets()
    noise, labels = inputs(gen)
    for kwargs, match in [
        (dict(cuda_graph="yes"), "cuda_graph must be True, False or 'auto'"),
        (dict(cuda_graph=1), "cuda_graph must be"),
        (dict(overlap="auto"), "overlap must be True or False"),
        (dict(compile=None), "compile must be True or False"),
        (dict(batch_guide=0), "batch_guide must be"),
        (dict(max_graphs=0), "max_graphs must be an integer >= 1"),
        (dict(num_steps=0), "num_steps must be >= 1"),
        (dict(guidance=2.0, gnet=None), "gnet is None but guidance != 1"),
        (dict(solver="rk4"), "solver must be one of"),
    ]:
        kw = dict(gnet=gnet)
        kw.update(kwargs)
        with pytest.raises((TypeError, ValueError), match=match):
            GuidedSampler(net, **kw)
    engine = GuidedSampler(net, gnet, num_steps=3, guidance=2.0, **CHURN)
    with pytest.raises(ValueError, match=r"randn_like\(x\) must return noise like x"):
        engine(noise, labels, randn_like=lambda x: torch.randn(x.shape[1:]))
    with pytest.raises(ValueError, match=r"randn_like\(x\) must return noise like x"):
        engine(noise, labels, randn_like=lambda x: torch.randn(x.shape, dtype=torch.float64))
    with pytest.raises(TypeError, match="noise must be a floating-point"):
        engine(torch.zeros(3, 3, 8, 8, dtype=torch.int64), labels)
    cfg = GuidedSampler(net, net, num_steps=3, guidance=2.0)
    with pytest.raises(ValueError, match="batch_guide: guide_labels must be a tensor with one row per sample"):
        cfg(noise, labels, guide_labels=torch.zeros(2, LABEL_DIM))
    with pytest.raises(ValueError, match="guide_labels given but labels is None"):
        cfg(noise, None, guide_labels=torch.zeros(3, LABEL_DIM))
    with pytest.raises(ValueError, match="guidance as a tensor must be 0-d or have one value per sample"):
        GuidedSampler(net, gnet, num_steps=3, guidance=torch.ones(5) * 2)(noise, labels)


def test_compiled_networks_match_eager(gen):
    """compile=True (inductor) on the CPU: within 1e-5 of eager, and weights updated in place are seen.

    7 steps: with 3, float32 sampling itself is only accurate to 1.1-1.5e-5 (eager float32 against
    float64, seeds 0-3 and two random ones), and the compiled networks' other order of float
    operations gave 0.7-1.35e-5 (over 1e-5 at 2 of 6 seeds); at 7 steps, <= 4.6e-6 and <= 1.4e-6.
    """
    net, gnet = nets()
    noise, labels = inputs(gen, 2)
    eager = GuidedSampler(net, gnet, num_steps=7, guidance=2.0, cuda_graph=False)(noise, labels)
    engine = GuidedSampler(net, gnet, num_steps=7, guidance=2.0, cuda_graph=False, compile=True)
    out = engine(noise, labels)
    assert rel_err(out, eager) <= 1e-5
    assert engine._net_fn is not net
    # Weights updated in place (an EMA, load_state_dict) are seen by the compiled networks: no freezing.
    with torch.no_grad():
        for p in gnet.parameters():
            p.mul_(0.5)
    updated = GuidedSampler(net, gnet, num_steps=7, guidance=2.0, cuda_graph=False)(noise, labels)
    assert not torch.equal(updated, eager)
    assert rel_err(engine(noise, labels), updated) <= 1e-5


def test_generate_uses_one_engine(gen, tmp_path):
    """generate captures per batch shape (here: emulated) and its samples equal eager ones; cuda_graph=True
    on the CPU warns once for the whole run, not per batch."""
    net, gnet = nets()
    kw = dict(seeds=range(5), batch_size=2, num_steps=4, guidance=2.0, progress=False, **CHURN)
    eager = list(ag_kernels.generate(net, gnet, cuda_graph=False, **kw))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graphs = list(ag_kernels.generate(net, gnet, cuda_graph=True, **kw))
    assert len([w for w in caught if "GuidedSampler" in str(w.message)]) == 1
    for a, b in zip(eager, graphs):
        assert torch.equal(a.samples, b.samples)


def test_edm_sampler_keeps_graph_engines(gen):
    from ag_kernels.sampling import sampler as sampler_module

    net, gnet = nets()
    noise, labels = inputs(gen)
    sampler_module._ENGINES.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=3, guidance=2.0, cuda_graph=True)
        b = ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=3, guidance=2.0, cuda_graph=True)
        ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=4, guidance=2.0, cuda_graph=True)
        ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=5, guidance=2.0, cuda_graph=True)
    assert torch.equal(a, b)
    assert len(sampler_module._ENGINES) == 2  # bounded
    assert torch.equal(a, ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=3, guidance=2.0))


# --------------------------------------------------------------------------- real CUDA graphs


@needs_cuda
@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "ext"])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_graph_equals_eager(kind, backend, gen):
    """Captured and replayed: bitwise the eager run (same kernels), call after call, two shapes."""
    if backend not in ag_kernels.available_backends("cuda"):
        pytest.skip(f"backend {backend} is not available on CUDA here")
    net, gnet = nets("cuda")
    graph = GuidedSampler(net, gnet, num_steps=6, backend=backend, cuda_graph=True, overlap=False,
                          **_settings(kind, 3, "cuda"))
    overlapped = GuidedSampler(net, gnet, num_steps=6, backend=backend, cuda_graph=True, overlap=True,
                               **_settings(kind, 3, "cuda"))
    for call, batch in enumerate((3, 3, 2, 3)):
        noise, labels = inputs(gen, batch, "cuda")
        settings = _settings(kind, batch, "cuda")
        for engine in (graph, overlapped):
            if kind == "per_sample":
                engine.guidance.value = settings["guidance"]
            if kind == "callable_tensor":
                engine.guidance.fn = settings["guidance"]
        eager = ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=6, backend=backend, overlap=False,
                                       randn_like=seeded(call, "cuda"), **settings)
        out = graph(noise, labels, randn_like=seeded(call, "cuda"))
        assert graph.last_mode == "graph", graph.fallback_reason
        assert torch.equal(out, eager)
        out2 = overlapped(noise, labels, randn_like=seeded(call, "cuda"))
        assert overlapped.last_mode == "graph", overlapped.fallback_reason
        assert torch.equal(out2, eager)


@needs_cuda
def test_cuda_overlap_eager_equals_sequential(gen):
    net, gnet = nets("cuda", out_dtype="bfloat16")
    noise, labels = inputs(gen, 4, "cuda")
    a = GuidedSampler(net, gnet, num_steps=8, guidance=2.0, cuda_graph=False, overlap=True)(noise, labels)
    b = GuidedSampler(net, gnet, num_steps=8, guidance=2.0, cuda_graph=False, overlap=False)(noise, labels)
    assert torch.equal(a, b)


@needs_cuda
def test_cuda_capture_failure_falls_back_once(gen):
    """A network that synchronizes (reads a value to the host) cannot be captured: warned once, run
    eagerly with the churn noise already drawn (equal to an eager run of the same seeds); the caller's
    stream is current again, the reason is the network's own error, and the capture's pool is given back."""
    net, gnet = nets("cuda")

    def syncing(x, t, labels):
        if float(t) > 0:  # a host read of the noise level: forbidden under capture
            return net(x, t, labels)
        return net(x, t, labels)

    noise, labels = inputs(gen, 2, "cuda")
    ref = ag_kernels.edm_sampler(syncing, noise, labels, gnet, num_steps=4, guidance=2.0, randn_like=seeded(3, "cuda"),
                                 **CHURN)
    caller = torch.cuda.current_stream()
    engine = GuidedSampler(syncing, gnet, num_steps=4, guidance=2.0, cuda_graph=True, **CHURN)
    with pytest.warns(UserWarning, match="capture failed"):
        a = engine(noise, labels, randn_like=seeded(3, "cuda"))
    assert torch.cuda.current_stream() == caller, "the capture stream was left current"
    assert not torch.cuda.is_current_stream_capturing()
    assert engine.last_mode == "eager" and "previous error" not in engine.fallback_reason, engine.fallback_reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = engine(noise, labels, randn_like=seeded(3, "cuda"))
    assert torch.equal(a, ref) and torch.equal(b, ref)

    def reserved_after_a_failed_capture():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            GuidedSampler(syncing, gnet, num_steps=4, guidance=2.0, cuda_graph=True)(noise, labels)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return torch.cuda.memory_reserved()

    # A kept pool holds at least one 2 MiB segment per failed capture; two more failures must not add 4 MiB.
    first = reserved_after_a_failed_capture()
    for _ in range(2):
        last = reserved_after_a_failed_capture()
    assert last - first < 4 * 2**20, f"reserved memory grew by {(last - first) / 2**20:.1f} MiB over two failed captures"


@needs_cuda
def test_cuda_graph_float32_agrees_with_reference(gen):
    net, gnet = nets("cuda")
    noise, labels = inputs(gen, 8, "cuda")
    # TF32 convolutions/matmuls would make the two samplers' trajectories part far beyond 1e-5.
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        engine = GuidedSampler(net, gnet, num_steps=32, guidance=2.0, cuda_graph=True)
        out = engine(noise, labels)
        ref = reference.torch_edm_sampler(net, noise, labels, gnet, num_steps=32, guidance=2.0)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    assert engine.last_mode == "graph", engine.fallback_reason
    assert rel_err(out, ref) <= 1e-5


@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "triton", "ext"])
def test_cuda_one_graph_serves_every_float_weight(backend, gen):
    """A sweep over w replays one captured graph; each value's result is bitwise the eager run's."""
    if backend not in ag_kernels.available_backends("cuda"):
        pytest.skip(f"backend {backend} is not available on CUDA here")
    net, gnet = nets("cuda")
    noise, labels = inputs(gen, 3, "cuda")
    weights = {"w": 2.0}
    engine = GuidedSampler(net, gnet, num_steps=5, backend=backend, cuda_graph=True, guidance=lambda s: weights["w"])
    for w in (2.0, 0.3, 4.5):
        weights["w"] = w
        out = engine(noise, labels)
        assert engine.last_mode == "graph", engine.fallback_reason
        assert torch.equal(out, ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=5, backend=backend, guidance=w))
    assert len(engine._cache.entries) == 1


@needs_cuda
def test_cuda_graph_under_inference_mode_then_outside(gen):
    net, gnet = nets("cuda")
    noise, labels = inputs(gen, 2, "cuda")
    engine = GuidedSampler(net, gnet, num_steps=4, guidance=2.0, cuda_graph=True, check_finite=True, **CHURN)
    with torch.inference_mode():
        a = engine(noise, labels, randn_like=seeded(1, "cuda"))
    b = engine(noise, labels, randn_like=seeded(1, "cuda"))
    assert engine.last_mode == "graph", engine.fallback_reason
    assert torch.equal(a, b)


@needs_cuda
def test_cuda_compiled_graph_sees_weights_updated_in_place(gen):
    """compile=True inside a captured graph reads the parameters where they are: an in-place update is seen."""
    net, gnet = nets("cuda")
    noise, labels = inputs(gen, 2, "cuda")
    engine = GuidedSampler(net, gnet, num_steps=3, guidance=2.0, cuda_graph=True, compile=True)
    engine(noise, labels)
    with torch.no_grad():
        for p in gnet.parameters():
            p.mul_(0.5)
    out = engine(noise, labels)
    assert engine.last_mode == "graph", engine.fallback_reason
    eager = GuidedSampler(net, gnet, num_steps=3, guidance=2.0, cuda_graph=False)(noise, labels)
    assert rel_err(out, eager) <= 1e-4  # inductor's fused kernels round differently from eager ones


@needs_two_gpus
@pytest.mark.parametrize("backend", ["triton", "ext"])
def test_cuda_tensors_on_a_device_that_is_not_current(backend, gen):
    """Tensors on cuda:1 while cuda:0 is current: the step ops, the eager engine and graph capture,
    warm-up and replay all run on cuda:1, with the results of a run where cuda:1 is current."""
    if backend not in ag_kernels.available_backends("cuda"):
        pytest.skip(f"backend {backend} is not available on CUDA here")
    net, gnet = nets("cuda:1")
    noise, labels = inputs(gen, 2, "cuda:1")
    kw = dict(num_steps=4, guidance=2.0, backend=backend, **CHURN)
    with torch.cuda.device(1):
        ref = GuidedSampler(net, gnet, cuda_graph=False, **kw)(noise, labels, randn_like=seeded(2, "cuda:1"))
        ref_graph = GuidedSampler(net, gnet, cuda_graph=True, **kw)(noise, labels, randn_like=seeded(2, "cuda:1"))
    torch.cuda.synchronize(1)
    with torch.cuda.device(0):
        eager = GuidedSampler(net, gnet, cuda_graph=False, **kw)(noise, labels, randn_like=seeded(2, "cuda:1"))
        engine = GuidedSampler(net, gnet, cuda_graph=True, **kw)
        graph = engine(noise, labels, randn_like=seeded(2, "cuda:1"))
        again = engine(noise, labels, randn_like=seeded(2, "cuda:1"))
        assert torch.cuda.current_device() == 0
    torch.cuda.synchronize(1)
    assert engine.last_mode == "graph", engine.fallback_reason
    assert torch.equal(eager, ref) and torch.equal(graph, ref_graph) and torch.equal(again, ref_graph)
    x = torch.randn(3, 4099, device="cuda:1")
    with torch.cuda.device(0):
        out = ag_kernels.euler_step(x, 0.9 * x, 0.8 * x, 2.1, 1.25, 0.9, backend=backend)
    assert out.device == x.device
    cpu = x.cpu()
    assert rel_err(out, ag_kernels.euler_step(cpu, 0.9 * cpu, 0.8 * cpu, 2.1, 1.25, 0.9, backend="torch")) <= 2e-6


@pytest.mark.parametrize("emulate", [False, True], ids=["eager", "graph"])
def test_check_finite_names_the_first_bad_step(emulate, gen):
    """A network that returns NaN below some sigma: NonFiniteError naming that step (eager and graph paths);
    without check_finite the run finishes silently, as the reference does."""
    net, gnet = nets()
    noise, labels = inputs(gen)
    plan_sigmas = ag_kernels.karras_schedule(6, 0.002, 80, 7).tolist()
    bad_below = (plan_sigmas[3] + plan_sigmas[4]) / 2  # first evaluated below this: step 4's Heun evaluation

    def broken(x, t, lab):
        out = gnet(x, t, lab)
        return out * float("nan") if float(t) < bad_below else out

    engine = GuidedSampler(net, broken, num_steps=6, guidance=2.0, check_finite=True, cuda_graph=emulate)
    engine._emulate_graphs = emulate
    with pytest.raises(ag_kernels.NonFiniteError, match=r"step 4 of 6 \(sigma [0-9.]+ -> [0-9.]+\)"):
        engine(noise, labels)
    silent = GuidedSampler(net, broken, num_steps=6, guidance=2.0)(noise, labels)
    assert torch.isnan(silent).all()
    fine = GuidedSampler(net, gnet, num_steps=6, guidance=2.0, check_finite=True, cuda_graph=emulate)
    fine._emulate_graphs = emulate
    assert torch.equal(fine(noise, labels), GuidedSampler(net, gnet, num_steps=6, guidance=2.0)(noise, labels))


def test_generate_reports_non_finite_samples(gen):
    net, gnet = nets()

    def broken(x, t, lab):
        return gnet(x, t, lab) * float("inf")

    with pytest.raises(ag_kernels.NonFiniteError, match="step 1 of 3"):
        list(ag_kernels.generate(net, broken, seeds=[1, 2], num_steps=3, guidance=2.0, progress=False))


def test_churn_bounds_that_never_churn_are_refused():
    net, _ = nets()
    with pytest.raises(ValueError, match="S_min must be <= S_max.*S_churn=10"):
        GuidedSampler(net, None, S_churn=10, S_min=5, S_max=1)
    GuidedSampler(net, None, S_churn=0, S_min=5, S_max=1)  # no churn asked: nothing to refuse
