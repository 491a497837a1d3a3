"""GuidedSampler, the sampling engine: eager runs, the graph path's static buffers, CFG batching, fallbacks.

On the CPU (CI) the engine runs eagerly; its graph path (static inputs refilled per call, churn
noise drawn before the replay, per-sample weights in static slots, the graph cache) runs with
``_emulate_graphs``, where "capture" keeps the run and "replay" runs it again over the static
buffers: a graph replay computes exactly that.  The tests marked ``cuda`` capture real CUDA
graphs and skip without a GPU.

Tolerances: eager vs (emulated or real) graph runs are bitwise equal (the same kernels on the
same values); against the published algorithm (``reference.torch_edm_sampler``) 1e-5 relative
in float32 (the README's sampler tolerance); batched CFG vs two calls 1e-5 (a network's
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
from _util import rel_err

LABEL_DIM = 5
CHURN = dict(S_churn=30.0, S_min=0.05, S_max=50.0)
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device; none is available here")


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
    net, gnet = nets()
    weights = {"w": 2.0}
    engine = GuidedSampler(net, gnet, num_steps=4, cuda_graph=True, max_graphs=2, guidance=lambda s: weights["w"])
    engine._emulate_graphs = True
    noise, labels = inputs(gen, 2)
    first = engine(noise, labels)
    # A float weight is baked into a graph: a new value is a new graph, with the new value's result.
    weights["w"] = 3.0
    second = engine(noise, labels)
    assert len(engine._cache.entries) == 2 and not torch.equal(first, second)
    assert torch.equal(second, ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=4, guidance=3.0))
    noise3, labels3 = inputs(gen, 3)
    engine(noise3, labels3)
    assert len(engine._cache.entries) == 2  # the least recently used graph went
    weights["w"] = 2.0
    assert torch.equal(engine(noise, labels), first)  # captured again, same result
    engine.reset()
    assert not engine._cache.entries


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
    """compile=True (inductor, freezing for modules in eval mode) on the CPU: within 1e-5 of eager.

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
    """A network that synchronizes (reads a value to the host) cannot be captured: warned once, run eagerly."""
    net, gnet = nets("cuda")

    def syncing(x, t, labels):
        if float(t) > 0:  # a host read of the noise level: forbidden under capture
            return net(x, t, labels)
        return net(x, t, labels)

    noise, labels = inputs(gen, 2, "cuda")
    engine = GuidedSampler(syncing, gnet, num_steps=4, guidance=2.0, cuda_graph=True)
    with pytest.warns(UserWarning, match="capture failed"):
        a = engine(noise, labels)
    assert engine.last_mode == "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = engine(noise, labels)
    ref = ag_kernels.edm_sampler(syncing, noise, labels, gnet, num_steps=4, guidance=2.0)
    assert torch.equal(a, ref) and torch.equal(b, ref)


@needs_cuda
def test_cuda_graph_float32_agrees_with_reference(gen):
    net, gnet = nets("cuda")
    noise, labels = inputs(gen, 8, "cuda")
    engine = GuidedSampler(net, gnet, num_steps=32, guidance=2.0, cuda_graph=True)
    out = engine(noise, labels)
    ref = reference.torch_edm_sampler(net, noise, labels, gnet, num_steps=32, guidance=2.0)
    assert rel_err(out, ref) <= 1e-5


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
