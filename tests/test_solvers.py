"""The multistep solvers ("dpmpp_2m", "dpmpp_3m", "unipc") in GuidedSampler / edm_sampler.

Against the float64 transcriptions in the papers' notation (``torch_multistep_sampler``,
``torch_unipc_sampler``, written independently of the engine's per-step coefficients), on every backend; exact step semantics
(one evaluation per schedule point, at those points, N in all); the guidance semantics of Heun
(interval, callable w(sigma), per-sample w, CFG batched with one network); churn refused; the
graph path's static buffers (emulated on the CPU, and captured for real on a GPU: marked cuda); and
k-diffusion's ``sample_dpmpp_2m`` when $AG_KERNELS_KDIFFUSION names its wheel (see bench/kdiffusion.py;
skipped otherwise).
"""

import math
import os

import pytest
import torch

import ag_kernels
from _util import cuda_only
from ag_kernels import GuidedSampler, edm_sampler, karras_schedule, torch_multistep_sampler, torch_unipc_sampler
from ag_kernels.sampling.engine import SOLVERS

BACKENDS = ag_kernels.available_backends("cpu")
MULTISTEP = ["dpmpp_2m", "dpmpp_3m", "unipc"]


def transcription(*args, solver, **kwargs):
    """The float64-capable transcription of ``solver`` in its paper's notation."""
    if solver == "unipc":
        return torch_unipc_sampler(*args, **kwargs)
    return torch_multistep_sampler(*args, solver=solver, **kwargs)


class Net(torch.nn.Module):
    """A small EDM-style denoiser: skip scaling plus a nonlinear label-dependent residual."""

    def __init__(self, seed, dim=6, classes=3):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(dim, dim, generator=gen, dtype=torch.float64) * 0.4)
        self.emb = torch.nn.Parameter(torch.randn(classes, dim, generator=gen, dtype=torch.float64) * 0.5)

    def forward(self, x, t, labels=None):
        t = torch.as_tensor(t, dtype=torch.float64)
        flat = x.reshape(x.shape[0], -1).double()
        c_skip, c_in = 0.25 / (t ** 2 + 0.25), 1 / (t ** 2 + 0.25).sqrt()
        h = torch.tanh(c_in * flat @ self.w)
        if labels is not None:
            h = h + self.emb[labels]
        return (c_skip * flat + (1 - c_skip) * h).reshape(x.shape).to(x.dtype)


class Counting:
    def __init__(self, net):
        self.net, self.ts = net, []

    def __call__(self, x, t, labels=None):
        self.ts.append(float(t))
        return self.net(x, t, labels)


@pytest.fixture
def nets():
    return Net(0), Net(1)


def _noise(batch=5, seed=3):
    return torch.randn(batch, 2, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _guided_model(net, gnet, labels, weight, interval=None, guide_labels=None):
    """D_w(x, t) as one network (guidance=1 for the transcription): w(sigma), interval, per-sample w."""
    def model(x, t, _labels):
        s = float(t)
        d1 = net(x, t, labels).to(x.dtype)
        if interval is not None and not interval[0] < s <= interval[1]:
            return d1
        w = weight(s)
        d0 = gnet(x, t, labels if guide_labels is None else guide_labels).to(x.dtype)
        if isinstance(w, torch.Tensor):
            w = w.to(x.dtype).reshape((-1,) + (1,) * (x.dim() - 1))
        return d0 + w * (d1 - d0)
    return model


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver", MULTISTEP)
@pytest.mark.parametrize("num_steps", [1, 2, 3, 4, 9, 16])
def test_float64_matches_transcription(nets, solver, num_steps, backend):
    net, gnet = nets
    noise, labels = _noise(), torch.tensor([0, 1, 2, 1, 0])
    ours = edm_sampler(net, noise, labels, gnet, num_steps=num_steps, guidance=2.5, dtype=torch.float64,
                       solver=solver, backend=backend)
    expected = transcription(net, noise, labels, gnet, num_steps=num_steps, guidance=2.5,
                                       dtype=torch.float64, solver=solver)
    err = (ours - expected).abs().max().item() / expected.abs().max().item()
    assert err < 1e-12, err


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver", MULTISTEP)
def test_float32_within_rounding(nets, solver, backend):
    """float32 runs against the float32 transcription, and both near the float64 one."""
    net, gnet = nets
    noise = _noise(8, seed=5)
    for n in (8, 32):
        ours = edm_sampler(net, noise, None, gnet, num_steps=n, guidance=3.0, solver=solver, backend=backend)
        ref32 = transcription(net, noise, None, gnet, num_steps=n, guidance=3.0, solver=solver)
        ref64 = transcription(net, noise, None, gnet, num_steps=n, guidance=3.0, dtype=torch.float64,
                                        solver=solver)
        scale = ref64.abs().max().item()
        assert ours.dtype == torch.float32
        assert (ours.double() - ref32.double()).abs().max().item() / scale < 1e-5
        assert (ours.double() - ref64).abs().max().item() / scale < 1e-5


@pytest.mark.parametrize("solver", MULTISTEP + ["euler"])
def test_one_evaluation_per_schedule_point(nets, solver):
    """N evaluations of each network, at t_0 > ... > t_{N-1} exactly; the samples start at noise * t_0."""
    net, gnet = Counting(nets[0]), Counting(nets[1])
    n = 7
    edm_sampler(net, _noise().float(), None, gnet, num_steps=n, guidance=2.0, solver=solver)
    t = karras_schedule(n, 0.002, 80.0, 7.0).tolist()
    assert net.ts == t[:n] and gnet.ts == t[:n]


@pytest.mark.parametrize("solver", MULTISTEP)
def test_interval_callable_and_per_sample_weight(nets, solver):
    """Outside the guidance interval gnet is not evaluated and D_w = D_1; w(sigma) and w per sample."""
    net, gnet = nets
    counted = Counting(gnet)
    noise, n, interval = _noise(), 12, (0.3, 5.0)
    w_vec = torch.tensor([1.5, 2.0, 2.5, 3.0, 1.0], dtype=torch.float64)

    def weight(s):
        return w_vec * (1 + 0.1 * math.log(s))

    ours = edm_sampler(net, noise, None, counted, num_steps=n, guidance=weight, guidance_interval=interval,
                       dtype=torch.float64, solver=solver)
    expected = transcription(_guided_model(net, gnet, None, weight, interval), noise, num_steps=n,
                                       dtype=torch.float64, solver=solver)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    t = karras_schedule(n, 0.002, 80.0, 7.0, dtype=torch.float64).tolist()[:n]
    assert counted.ts == [s for s in t if interval[0] < s <= interval[1]]


@pytest.mark.parametrize("solver", MULTISTEP)
def test_cfg_batched_one_network(solver):
    """CFG with one network for both roles, evaluated as one batched call per step."""
    net = Net(4)
    calls = Counting(net)
    noise, labels = _noise(), torch.tensor([0, 1, 2, 1, 0])
    uncond = torch.zeros_like(labels)
    ours = edm_sampler(calls, noise, labels, calls, num_steps=10, guidance=4.0, dtype=torch.float64, solver=solver,
                       guide_labels=uncond)
    assert len(calls.ts) == 10  # one batched call per step
    expected = transcription(_guided_model(net, net, labels, lambda s: 4.0, guide_labels=uncond), noise,
                                       num_steps=10, dtype=torch.float64, solver=solver)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("solver", MULTISTEP)
def test_churn_is_refused_naming_both(nets, solver):
    with pytest.raises(ValueError, match=rf"S_churn=0.5 cannot be used with solver='{solver}'") as info:
        GuidedSampler(*nets, S_churn=0.5, solver=solver)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("solver", SOLVERS)
def test_emulated_graph_replay_equals_eager(nets, solver):
    """The graph path (static buffers and their refill, emulated on the CPU) gives the eager samples."""
    net, gnet = nets
    engine = GuidedSampler(net, gnet, num_steps=6, guidance=2.0, solver=solver, cuda_graph=True, dtype=torch.float64)
    engine._emulate_graphs = True
    eager = GuidedSampler(net, gnet, num_steps=6, guidance=2.0, solver=solver, dtype=torch.float64)
    for seed in (1, 2, 3):
        noise = _noise(seed=seed)
        torch.testing.assert_close(engine(noise), eager(noise), rtol=0, atol=0)
    assert engine.last_mode == "graph"


@cuda_only("CUDA graphs need a CUDA device; none is available here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "ext"])
@pytest.mark.parametrize("solver", SOLVERS)
def test_cuda_graph_path_equals_eager(solver, backend, dtype):
    """Each solver captured in a CUDA graph (the multistep history ring included) replays bitwise its
    eager run (the same kernels), call after call, for two batch shapes (two graphs)."""
    if backend not in ag_kernels.available_backends("cuda"):
        pytest.skip(f"backend {backend} is not available on CUDA here")
    net, gnet = Net(0).cuda(), Net(1).cuda()
    settings = dict(num_steps=6, guidance=2.0, solver=solver, backend=backend, dtype=dtype)
    graph = GuidedSampler(net, gnet, cuda_graph=True, **settings)
    eager = GuidedSampler(net, gnet, cuda_graph=False, **settings)
    for call, batch in enumerate((5, 5, 3, 5)):
        noise = _noise(batch, seed=call).to("cuda", dtype)
        out, expected = graph(noise), eager(noise)
        assert graph.last_mode == "graph", graph.fallback_reason
        assert eager.last_mode == "eager"
        assert out.dtype == dtype and out.device.type == "cuda" and bool(out.isfinite().all())
        assert torch.equal(out, expected), f"call {call}, batch {batch}: max diff {(out - expected).abs().max()}"


def test_heun_and_euler_plans_unchanged():
    """The multistep plan fields stay empty for Heun and Euler (their steps are untouched)."""
    from ag_kernels.sampling._plan import make_plan

    for solver in ("heun", "euler"):
        plan = make_plan(num_steps=5, sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=math.inf,
                         S_noise=1, solver=solver, dtype=torch.float32, device=torch.device("cpu"))
        assert all(step.multistep is None for step in plan.steps)


def test_cli_choices_are_the_solvers():
    from ag_kernels.commands.generate import SOLVER_CHOICES

    assert SOLVER_CHOICES == ag_kernels.SOLVERS


@pytest.mark.skipif(not os.environ.get("AG_KERNELS_KDIFFUSION"),
                    reason="set AG_KERNELS_KDIFFUSION to k-diffusion 0.1.1's wheel (pip download --no-deps "
                           "k-diffusion==0.1.1) to compare with its sample_dpmpp_2m")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dpmpp_2m_equals_k_diffusion(dtype):
    from bench.kdiffusion import compare, load_sample_dpmpp_2m

    fn = load_sample_dpmpp_2m(os.environ["AG_KERNELS_KDIFFUSION"])
    for n in (2, 8, 32):
        for per_sample in (False, True):
            # Within float32 rounding: of the size of k-diffusion's own float32 error (its float64 run as truth).
            _, rel, own = compare(fn, num_steps=n, dtype=dtype, per_sample=per_sample)
            assert rel <= (max(5 * own, 2e-6) if dtype == torch.float32 else 1e-13), (n, per_sample, rel, own)
