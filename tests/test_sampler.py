"""ag_kernels.edm_sampler against a direct transcription of the published algorithm.

The oracle is ``tests/edm_standin/generate_images.py``: our own plain eager transcription of the
EDM Heun sampler with the guided denoiser, with the reference's exact signature.  The networks
are small class-conditional TinyDenoisers (float32 outputs); every run draws its noise from
the ``gen`` fixture (seed 0 by default; AG_TEST_SEED explores others), and churned runs give both samplers their own
generator with one seed, so both draw the same churn noise.

Tolerance: max|ours - ref| / max|ref| <= 1e-5.  One exception, measured and explained in
``_tolerance``: with 4 steps, float32 sampling is only accurate to about 1e-5 in the first place.
"""

from __future__ import annotations

import importlib.util
import functools
import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import ag_kernels
from ag_kernels.models.nets import TinyDenoiser
from _util import rel_err

STANDIN = Path(__file__).parent / "edm_standin" / "generate_images.py"


def _load_standin():
    # Under a private name: "generate_images" must not shadow anything else on sys.path.
    spec = importlib.util.spec_from_file_location("_ag_test_edm_standin", STANDIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.edm_sampler


reference_sampler = _load_standin()

BACKENDS = ag_kernels.available_backends("cpu")
TOL = 1e-5
LABEL_DIM = 5
CHURN = dict(S_churn=30.0, S_min=0.05, S_max=50.0)
NO_CHURN = dict(S_churn=0.0)


@pytest.fixture(scope="module")
def nets():
    """(net, gnet): the main net and a narrower, differently seeded guide, in eval mode."""
    net = TinyDenoiser(img_channels=3, img_resolution=8, label_dim=LABEL_DIM, channels=24, seed=11).eval()
    gnet = TinyDenoiser(img_channels=3, img_resolution=8, label_dim=LABEL_DIM, channels=12, seed=22).eval()
    return net, gnet


def make_inputs(gen, batch=3, resolution=8):
    noise = torch.randn(batch, 3, resolution, resolution, generator=gen)
    classes = torch.randint(0, LABEL_DIM, (batch,), generator=gen)
    return noise, torch.nn.functional.one_hot(classes, LABEL_DIM).float()


def seeded_randn_like(seed):
    """Churn noise from a private generator; float32 draws cast to x's dtype (float64 runs see the same noise)."""
    g = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype)


def new_seed(gen) -> int:
    return int(torch.randint(0, 2**31 - 1, (), generator=gen))


class Recorder:
    """Wraps a network and records the noise levels it is called at (optionally raising instead)."""

    def __init__(self, net=None, name="net"):
        self.net, self.name, self.ts = net, name, []

    def __call__(self, x, t, labels=None):
        assert isinstance(t, torch.Tensor) and t.dim() == 0, "networks get t as a 0-d tensor"
        self.ts.append(float(t))
        if self.net is None:
            raise AssertionError(f"{self.name} must not be called here")
        return self.net(x, t, labels)


def manual_sampler(net, gnet, noise, labels, num_steps, weight, *, solver="heun", S_churn=0.0, S_min=0.0,
                   S_max=math.inf, S_noise=1.0, sigma_min=0.002, sigma_max=80.0, rho=7.0, randn_like=torch.randn_like,
                   dtype=torch.float32):
    """Eager EDM sampler with the guidance weight a function of sigma (``weight(float) -> w``) and an Euler option.

    Same algorithm as the stand-in, written again here (schedule included) so that the stand-in,
    which is package code, is itself checked against an independent transcription; w == 1
    evaluates net only.  Also used where the stand-in has no equivalent (callable guidance,
    intervals, Euler).
    """
    i = torch.arange(num_steps, dtype=dtype)  # Karras et al. (2022), Eq. 5, in ``dtype`` as the reference does
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros(1, dtype=dtype)])

    def D(x, s):
        w = weight(float(s))
        d1 = net(x, s, labels).to(dtype)
        if isinstance(w, (int, float)) and w == 1:
            return d1
        d0 = gnet(x, s, labels).to(dtype)
        w = w.to(dtype).reshape(-1, 1, 1, 1) if isinstance(w, torch.Tensor) else w
        return d0 + w * (d1 - d0)

    x = noise.to(dtype) * t[0]
    for i in range(num_steps):
        t_cur, t_next = t[i], t[i + 1]
        if S_churn > 0 and S_min <= float(t_cur) <= S_max:
            t_hat = t_cur + min(S_churn / num_steps, math.sqrt(2) - 1) * t_cur
            x = x + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x)
        else:
            t_hat = t_cur
        d = (x - D(x, t_hat)) / t_hat
        x_next = x + (t_next - t_hat) * d
        if solver == "heun" and i < num_steps - 1:
            d2 = (x_next - D(x_next, t_next)) / t_next
            x_next = x + (t_next - t_hat) * (0.5 * d + 0.5 * d2)
        x = x_next
    return x


def _tolerance(num_steps, ref32, ref64):
    """1e-5, except at 4 steps: max(1e-5, 3 x the stand-in's own float32 error vs its float64 run).

    With 4 steps the first ones go 80 -> 9.7 -> 0.47: the float32 results are sums of terms
    ~|noise| * sigma, far larger than the samples, and the float32 stand-in itself then
    differs from its float64 run by up to ~2e-5 (measured over 40 seeds).  Two correct float32
    implementations differ by about that much; we measured ours within 1.9x of it.  From 7 steps
    on we measured <= 3e-6, so 1e-5 applies as is.  (Float64 runs are compared tightly below.)
    """
    if num_steps >= 7:
        return TOL
    return max(TOL, 3 * rel_err(ref32, ref64))


# --------------------------------------------------------------------------- vs the stand-in


def _cases():
    for backend in BACKENDS:
        for guidance in (1.0, 2.1):
            for churn in (False, True):
                for n in (4, 7, 32):
                    kind = "churn" if churn else "ode"
                    yield pytest.param(backend, guidance, churn, n, id=f"{backend}-w{guidance}-{kind}-{n}")


@pytest.mark.parametrize("backend,guidance,churn,num_steps", list(_cases()))
def test_matches_standin(nets, gen, backend, guidance, churn, num_steps):
    net, gnet = nets
    noise, labels = make_inputs(gen)
    settings = dict(num_steps=num_steps, guidance=guidance, **(CHURN if churn else NO_CHURN))
    seed = new_seed(gen)
    ref = reference_sampler(net, noise, labels, gnet, randn_like=seeded_randn_like(seed), **settings)
    ours = ag_kernels.edm_sampler(net, noise, labels, gnet, randn_like=seeded_randn_like(seed), backend=backend,
                                  **settings)
    assert ours.dtype == torch.float32 and ours.shape == noise.shape
    tol = TOL
    if num_steps < 7:
        ref64 = reference_sampler(net, noise, labels, gnet, randn_like=seeded_randn_like(seed),
                                  dtype=torch.float64, **settings)
        tol = _tolerance(num_steps, ref, ref64)
    assert rel_err(ours, ref) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_steps", [4, 7])
def test_matches_standin_float64(nets, gen, backend, num_steps):
    """In float64 the fused ops and the eager transcription agree to rounding: a sharp check of the algorithm."""
    net, gnet = nets
    noise, labels = make_inputs(gen)
    seed = new_seed(gen)
    settings = dict(num_steps=num_steps, guidance=2.1, dtype=torch.float64, **CHURN)
    ref = reference_sampler(net, noise, labels, gnet, randn_like=seeded_randn_like(seed), **settings)
    ours = ag_kernels.edm_sampler(net, noise, labels, gnet, randn_like=seeded_randn_like(seed), backend=backend,
                                  **settings)
    assert ours.dtype == torch.float64
    assert rel_err(ours, ref) <= 1e-10


# Churn below the cap (gamma = S_churn / N < sqrt(2) - 1), S_noise != 1 and a non-default schedule.
LIGHT_CHURN = {7: 1.4, 32: 4.0}  # gamma = 0.2 and 0.125
SCHEDULE = dict(sigma_min=0.004, sigma_max=60.0, rho=5.0, S_noise=1.007, S_min=0.05, S_max=50.0)


def _light_cases():
    # The churn plan is shared by the backends: the Triton interpreter (slow on a CPU) runs 7 steps only.
    for backend in BACKENDS:
        for n in (7, 32) if backend != "triton" else (7,):
            for dtype in (torch.float32, torch.float64):
                yield pytest.param(backend, n, dtype, id=f"{backend}-{n}-f{str(dtype)[-2:]}")


@pytest.mark.parametrize("backend,num_steps,dtype", list(_light_cases()))
def test_light_churn_noise_and_schedule_match_standin(nets, gen, backend, num_steps, dtype):
    """Gamma below its cap, S_noise = 1.007, sigma in [0.004, 60], rho = 5: ours = the stand-in = a third transcription.

    Each setting is shown to matter at this tolerance: the cap, S_noise = 1 or the default
    schedule move the result by far more than it allows.
    """
    net, gnet = nets
    noise, labels = make_inputs(gen)
    seed = new_seed(gen)
    settings = dict(num_steps=num_steps, guidance=2.1, S_churn=LIGHT_CHURN[num_steps], dtype=dtype, **SCHEDULE)
    assert settings["S_churn"] / num_steps < math.sqrt(2) - 1
    tol = TOL if dtype == torch.float32 else 1e-10

    def run(sampler, **changes):
        return sampler(net, noise, labels, gnet, randn_like=seeded_randn_like(seed), **dict(settings, **changes))

    ref = run(reference_sampler)
    ours = run(functools.partial(ag_kernels.edm_sampler, backend=backend))
    assert ours.dtype == dtype
    assert rel_err(ours, ref) <= tol
    if backend == "torch":
        by_hand = manual_sampler(net, gnet, noise, labels, num_steps, lambda s: 2.1, randn_like=seeded_randn_like(seed),
                                 **{k: v for k, v in settings.items() if k not in ("num_steps", "guidance")})
        assert rel_err(ref, by_hand) <= tol
        for changes in (dict(S_churn=num_steps), dict(S_noise=1.0), dict(rho=7.0), dict(sigma_min=0.002),
                        dict(sigma_max=80.0)):
            assert rel_err(run(reference_sampler, **changes), ref) > 10 * tol, changes


def test_signature_matches_reference():
    """The first 15 parameters: the reference's names, order and defaults."""
    ours = list(inspect.signature(ag_kernels.edm_sampler).parameters.values())
    theirs = list(inspect.signature(reference_sampler).parameters.values())
    assert [(p.name, p.default) for p in ours[: len(theirs)]] == [(p.name, p.default) for p in theirs]
    assert all(p.kind == p.KEYWORD_ONLY for p in ours[len(theirs):])


def test_positional_keyword_and_default_calls(nets, gen):
    net, gnet = nets
    noise, labels = make_inputs(gen)
    seed = new_seed(gen)

    def positional(sampler):
        return sampler(net, noise, labels, gnet, 7, 0.002, 80, 7, 2.1, 30.0, 0.05, 50.0, 1, torch.float32,
                       seeded_randn_like(seed))

    by_position = positional(ag_kernels.edm_sampler)
    by_keyword = ag_kernels.edm_sampler(
        net=net, noise=noise, labels=labels, gnet=gnet, num_steps=7, sigma_min=0.002, sigma_max=80, rho=7,
        guidance=2.1, S_churn=30.0, S_min=0.05, S_max=50.0, S_noise=1, dtype=torch.float32,
        randn_like=seeded_randn_like(seed))
    assert torch.equal(by_position, by_keyword)
    assert rel_err(by_position, positional(reference_sampler)) <= TOL
    # All defaults (32 steps, no guidance, no churn) as the reference's.
    assert rel_err(ag_kernels.edm_sampler(net, noise, labels), reference_sampler(net, noise, labels)) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("churn", [False, True])
def test_one_step_by_hand(nets, gen, backend, churn):
    """num_steps=1: schedule [sigma_max, 0] (the reference's formula divides by zero there), one Euler step."""
    net, gnet = nets
    noise, labels = make_inputs(gen)
    seed, w = new_seed(gen), 2.1
    main, guide = Recorder(net), Recorder(gnet)
    settings = dict(S_churn=0.3, S_min=0.0, S_max=math.inf) if churn else {}
    ours = ag_kernels.edm_sampler(main, noise, labels, guide, num_steps=1, guidance=w,
                                  randn_like=seeded_randn_like(seed), backend=backend, **settings)

    t_cur = torch.tensor(80.0)
    x = noise * t_cur
    if churn:
        t_hat = t_cur + min(0.3, math.sqrt(2) - 1) * t_cur
        x = x + (t_hat ** 2 - t_cur ** 2).sqrt() * seeded_randn_like(seed)(x)
    else:
        t_hat = t_cur
    assert main.ts == guide.ts == [float(t_hat)]
    D = gnet(x, t_hat, labels).double().lerp(net(x, t_hat, labels).double(), w)
    x64, s = x.double(), float(t_hat)
    expected = x64 + (0.0 - s) * (x64 - D) / s
    # The result (about D) is x - (x - D), x ~ 80 |noise|: rounding is relative to max|x|.
    assert (ours.double() - expected).abs().max() <= 4e-7 * x64.abs().max()


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_repeatable(nets, gen, backend):
    net, gnet = nets
    noise, labels = make_inputs(gen)
    seed = new_seed(gen)
    runs = [ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=6, guidance=2.1, backend=backend,
                                   randn_like=seeded_randn_like(seed), **CHURN) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("guidance", [1, 1.0, "ones", "callable"])
def test_guidance_one_never_calls_gnet(nets, gen, guidance):
    net, _ = nets
    noise, labels = make_inputs(gen)
    if guidance == "ones":
        guidance = torch.ones(noise.shape[0])
    elif guidance == "callable":
        guidance = lambda sigma: 1.0  # noqa: E731
    trap = Recorder(None, "gnet")
    out = ag_kernels.edm_sampler(net, noise, labels, trap, num_steps=5, guidance=guidance)
    assert trap.ts == []
    assert rel_err(out, reference_sampler(net, noise, labels, num_steps=5)) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_guidance(nets, gen, backend):
    """A guidance tensor [B] gives each sample what a run of that sample alone with its scalar weight gives."""
    net, gnet = nets
    noise, labels = make_inputs(gen, batch=3)
    w = torch.tensor([1.0, 2.1, 3.0])
    together = ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=10, guidance=w, backend=backend)
    for b in range(3):
        alone = ag_kernels.edm_sampler(net, noise[b:b + 1], labels[b:b + 1], gnet, num_steps=10,
                                       guidance=float(w[b]), backend=backend)
        assert rel_err(together[b:b + 1], alone) <= TOL


def test_guidance_callable(nets, gen):
    net, gnet = nets
    noise, labels = make_inputs(gen)
    seed = new_seed(gen)
    w_vec = torch.tensor([1.5, 2.1, 3.0])
    for weight in (lambda s: 1.0 if s > 5 else 2.1, lambda s: w_vec if s < 2 else 1.7):
        expected = manual_sampler(net, gnet, noise, labels, 10, weight, randn_like=seeded_randn_like(seed), **CHURN)
        runs = {b: ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=10, guidance=weight, backend=b,
                                          randn_like=seeded_randn_like(seed), **CHURN) for b in BACKENDS}
        for out in runs.values():
            assert rel_err(out, expected) <= TOL
            assert rel_err(out, runs["torch"]) <= TOL


def test_guidance_interval(nets, gen):
    """gnet is evaluated exactly at the noise levels in (lo, hi]; elsewhere w = 1."""
    net, gnet = nets
    noise, labels = make_inputs(gen)
    n, w = 12, 2.1
    sigmas = ag_kernels.karras_schedule(n, 0.002, 80, 7).tolist()
    lo, hi = sigmas[8], sigmas[3]  # schedule values themselves: lo is excluded, hi included
    main, guide = Recorder(net), Recorder(gnet)
    ours = ag_kernels.edm_sampler(main, noise, labels, guide, num_steps=n, guidance=w, guidance_interval=(lo, hi))
    assert guide.ts == [t for t in main.ts if lo < t <= hi]
    assert hi in guide.ts and lo not in guide.ts and lo in main.ts
    assert any(t > hi for t in main.ts) and any(t < lo for t in main.ts)

    weight = lambda s: w if lo < s <= hi else 1.0  # noqa: E731
    same = ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=n, guidance=weight)
    assert torch.equal(ours, same)
    assert rel_err(ours, manual_sampler(net, gnet, noise, labels, n, weight)) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_euler_solver(nets, gen, backend):
    net, gnet = nets
    noise, labels = make_inputs(gen)
    seed = new_seed(gen)
    main = Recorder(net)
    ours = ag_kernels.edm_sampler(main, noise, labels, gnet, num_steps=12, guidance=2.1, solver="euler",
                                  backend=backend, randn_like=seeded_randn_like(seed), **CHURN)
    assert len(main.ts) == 12  # one evaluation per step
    expected = manual_sampler(net, gnet, noise, labels, 12, lambda s: 2.1, solver="euler",
                              randn_like=seeded_randn_like(seed), **CHURN)
    assert rel_err(ours, expected) <= TOL


def test_progress_bar(nets, gen, capsys):
    net, _ = nets
    noise, labels = make_inputs(gen)
    quiet = ag_kernels.edm_sampler(net, noise, labels, num_steps=7)
    assert capsys.readouterr().err == ""
    shown = ag_kernels.edm_sampler(net, noise, labels, num_steps=7, progress=True)
    assert "7/7" in capsys.readouterr().err
    assert torch.equal(quiet, shown)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_mode(nets, gen, backend):
    net, gnet = nets
    noise, labels = make_inputs(gen)
    seed = new_seed(gen)
    outside = ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=5, guidance=2.1, backend=backend,
                                     randn_like=seeded_randn_like(seed), **CHURN)
    with torch.inference_mode():
        inside = ag_kernels.edm_sampler(net, noise, labels, gnet, num_steps=5, guidance=2.1, backend=backend,
                                        randn_like=seeded_randn_like(seed), **CHURN)
    assert torch.equal(outside, inside)
    assert not outside.requires_grad


def test_churn_bounds_compared_as_the_reference(nets, gen):
    """S_min/S_max are compared with t_cur in float32, as the reference's tensor comparison does."""
    net, _ = nets
    noise, labels = make_inputs(gen)
    seed = new_seed(gen)
    t3 = ag_kernels.karras_schedule(8, 0.002, 80, 7)[3].item()  # a float32 schedule value
    s_max = t3 - 0.4 * float(np.spacing(np.float32(t3)))  # 0.4 float32 ulps below t3: rounds to t3 in float32
    assert torch.tensor(s_max, dtype=torch.float32).item() == t3 and s_max < t3
    settings = dict(num_steps=8, S_churn=10.0, S_min=0.0, S_max=s_max)
    ref = reference_sampler(net, noise, labels, randn_like=seeded_randn_like(seed), **settings)
    ours = ag_kernels.edm_sampler(net, noise, labels, randn_like=seeded_randn_like(seed), **settings)
    assert rel_err(ours, ref) <= TOL


# --------------------------------------------------------------------------- argument errors


def _bad_net(result):
    return lambda x, t, labels=None: result(x)


ERRORS = [
    (dict(guidance=2.1, gnet=None), ValueError, "gnet"),
    (dict(num_steps=0), ValueError, "num_steps"),
    (dict(num_steps=1.5), TypeError, "num_steps"),
    (dict(num_steps=True), TypeError, "num_steps"),
    (dict(sigma_min=80.0, sigma_max=80.0), ValueError, "sigma_min"),
    (dict(sigma_min=1.0, sigma_max=0.5), ValueError, "sigma_min"),
    (dict(sigma_min=0.0), ValueError, "sigma_min"),
    (dict(rho=0), ValueError, "rho"),
    (dict(rho=-7), ValueError, "rho"),
    (dict(solver="rk4"), ValueError, "solver"),
    (dict(guidance=torch.full((2,), 2.0)), ValueError, "guidance"),
    (dict(guidance=lambda s: torch.full((5,), 2.0)), ValueError, "guidance"),
    (dict(guidance_interval=(1.0,)), TypeError, "guidance_interval"),
    (dict(guidance_interval=(5.0, 1.0)), ValueError, "guidance_interval"),
    (dict(net=_bad_net(lambda x: x[:, :1])), ValueError, "net"),
    (dict(net=_bad_net(lambda x: x.to(torch.int32))), TypeError, "net"),
    (dict(net=_bad_net(lambda x: x.tolist())), TypeError, "net"),
    (dict(guidance=2.0, gnet=_bad_net(lambda x: x[..., :4])), ValueError, "gnet"),
    (dict(noise=torch.zeros(3, 3, 8, 8, dtype=torch.int64)), TypeError, "noise"),
    (dict(dtype=torch.float16), TypeError, "dtype"),
    (dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("kwargs,error,name", ERRORS, ids=[f"{e[2]}-{i}" for i, e in enumerate(ERRORS)])
def test_bad_arguments_name_the_argument(nets, gen, kwargs, error, name):
    net, gnet = nets
    noise, labels = make_inputs(gen)
    call = dict(net=net, noise=noise, labels=labels, gnet=gnet, num_steps=3)
    call.update(kwargs)
    with pytest.raises(error, match=name):
        ag_kernels.edm_sampler(**call)
