"""Explicit schedules (``sigmas=``) and the built-in ones (``schedule="karras"`` / ``"logsnr"``).

* The default path is bitwise today's: the plan's levels are ``karras_schedule``'s, and a run with
  ``sigmas=karras_schedule(...)`` is bitwise the run with num_steps/sigma_min/sigma_max/rho, for
  every solver.
* Any strictly decreasing schedule: every solver evaluates at exactly the given levels; Heun and
  the multistep solvers agree with the float64 transcriptions in kernels/reference.py given the
  same levels, on every backend; churn with explicit levels (S_min/S_max select among them).
* "logsnr": uniform in log sigma (float64 oracle), and bitwise its explicit levels.
* Bad input: a clear error naming the argument, in Python and on the command line.
"""

import json
import math

import pytest
import torch

import ag_kernels
from ag_kernels import GuidedSampler, edm_sampler, karras_schedule, torch_edm_sampler, torch_multistep_sampler
from _util import cli
from ag_kernels.models.checkpoint import save_net
from ag_kernels.models.nets import TinyDenoiser
from ag_kernels.sampling._plan import logsnr_schedule, make_plan
from test_solvers import Counting, Net  # the small EDM-style denoiser and the call recorder of the solver tests

BACKENDS = ag_kernels.available_backends("cpu")
MULTISTEP = [s for s in ag_kernels.SOLVERS if s.startswith("dpmpp")]
# Not Karras-shaped: uneven steps in log sigma, so a solver that ignored them would differ.
ODD = [7.5, 3.1, 2.2, 0.9, 0.31, 0.2, 0.041, 0.0066]


@pytest.fixture
def nets():
    return Net(0), Net(1)


def _noise(batch=5, seed=3, dtype=torch.float32):
    return torch.randn(batch, 2, 3, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _seeded(seed):
    gen = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=gen, dtype=x.dtype)


# ------------------------------------------------------------------------------ the default path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 7, 32])
def test_default_plan_is_karras_schedule_bitwise(n, dtype):
    plan = make_plan(num_steps=n, sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=0, S_min=0, S_max=math.inf,
                     S_noise=1, solver="heun", dtype=dtype, device=torch.device("cpu"))
    expected = karras_schedule(n, 0.002, 80.0, 7.0, dtype=dtype)
    got = torch.stack([plan.t0] + [s.t_next for s in plan.steps])
    assert torch.equal(got, expected)
    # And the reference transcription's own formula (the drop-in's definition) gives the same bits.
    if n > 1:
        i = torch.arange(n, dtype=dtype)
        ref = (80.0 ** (1 / 7) + i / (n - 1) * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
        assert torch.equal(got[:-1], ref)


@pytest.mark.parametrize("solver", ag_kernels.SOLVERS)
def test_explicit_karras_levels_bitwise_equal_default(nets, solver):
    net, gnet = nets
    noise = _noise()
    a = edm_sampler(net, noise, None, gnet, num_steps=6, sigma_max=20, rho=5, guidance=2.5, solver=solver)
    levels = karras_schedule(6, 0.002, 20, 5)
    for sigmas in (levels, levels[:-1], levels.tolist(), tuple(levels[:-1].tolist())):
        assert torch.equal(edm_sampler(net, noise, None, gnet, sigmas=sigmas, guidance=2.5, solver=solver), a)
    # The defaults themselves (32 Karras steps, no arguments) equal the explicit Karras levels too.
    b = edm_sampler(net, noise, None, gnet, guidance=2.5, solver=solver)
    assert torch.equal(edm_sampler(net, noise, None, gnet, sigmas=karras_schedule(32, 0.002, 80, 7), guidance=2.5,
                                   solver=solver), b)
    assert torch.equal(GuidedSampler(net, gnet, guidance=2.5, solver=solver, schedule="karras")(noise), b)


# ------------------------------------------------------------------------------ explicit levels


@pytest.mark.parametrize("solver", ag_kernels.SOLVERS)
def test_every_solver_evaluates_at_the_given_levels(nets, solver):
    net, gnet = nets
    counted = Counting(net)
    edm_sampler(counted, _noise(dtype=torch.float64), None, gnet, sigmas=ODD, guidance=2.0, solver=solver,
                dtype=torch.float64)
    if solver == "heun":  # t_i, then the correction at t_{i+1}, except on the last step (to 0)
        expected = [v for i, t in enumerate(ODD) for v in ((t, ODD[i + 1]) if i + 1 < len(ODD) else (t,))]
    else:
        expected = ODD
    assert counted.ts == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("solver", ["heun"] + MULTISTEP)
def test_explicit_levels_match_the_float64_transcriptions(nets, solver, backend):
    net, gnet = nets
    noise = _noise(dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1, 0])
    got = edm_sampler(net, noise, labels, gnet, sigmas=torch.tensor(ODD, dtype=torch.float64), guidance=2.7,
                      solver=solver,
                      dtype=torch.float64, backend=backend)
    if solver == "heun":
        ref = torch_edm_sampler(net, noise, labels, gnet, guidance=2.7, dtype=torch.float64,
                                sigmas=torch.tensor(ODD, dtype=torch.float64))
    else:
        ref = torch_multistep_sampler(net, noise, labels, gnet, guidance=2.7, dtype=torch.float64, solver=solver,
                                      sigmas=ODD)
    assert (got - ref).abs().max() <= 1e-12 * ref.abs().max()
    # The levels matter: the Karras levels of the same length give another result.
    other = edm_sampler(net, noise, labels, gnet, num_steps=len(ODD), sigma_max=7.5, sigma_min=0.0066,
                        guidance=2.7, solver=solver, dtype=torch.float64, backend=backend)
    assert (other - ref).abs().max() > 1e-4 * ref.abs().max()


def test_churn_with_explicit_levels(nets):
    """gamma = S_churn / (len(sigmas) - 1), and S_min/S_max select among the given levels."""
    net, gnet = nets
    noise = _noise(dtype=torch.float64)
    settings = dict(guidance=2.0, S_churn=4.0, S_min=0.2, S_max=3.0, dtype=torch.float64)
    got = edm_sampler(net, noise, None, gnet, sigmas=ODD, randn_like=_seeded(9), **settings)
    ref = torch_edm_sampler(net, noise, None, gnet, sigmas=ODD, randn_like=_seeded(9), **settings)
    assert (got - ref).abs().max() <= 1e-12 * ref.abs().max()
    counted = Counting(net)
    edm_sampler(counted, noise, None, gnet, sigmas=ODD, randn_like=_seeded(9), **settings)
    gamma = min(4.0 / len(ODD), math.sqrt(2) - 1)
    churned = [t * (1 + gamma) for t in ODD if 0.2 <= t <= 3.0]
    assert len(churned) == 4
    for t in churned:
        assert any(abs(s - t) <= 1e-12 * t for s in counted.ts)


def test_cached_engine_sees_a_schedule_tensor_changed_in_place(nets):
    net, gnet = nets
    noise = _noise()
    levels = torch.tensor(ODD)
    with pytest.warns(UserWarning, match="eagerly"):
        first = edm_sampler(net, noise, None, gnet, sigmas=levels, guidance=2.0, cuda_graph=True)
    levels[1] = 2.9
    second = edm_sampler(net, noise, None, gnet, sigmas=levels, guidance=2.0, cuda_graph=True)
    fresh = edm_sampler(net, noise, None, gnet, sigmas=levels.clone(), guidance=2.0)
    assert torch.equal(second, fresh) and not torch.equal(first, second)


# ------------------------------------------------------------------------------ built-in schedules


@pytest.mark.parametrize("n", [1, 2, 9])
def test_logsnr_schedule_uniform_in_log_sigma(n):
    levels = logsnr_schedule(n, 0.01, 5.0, dtype=torch.float64)
    assert levels.shape == (n + 1,) and levels[-1] == 0 and levels[0] == pytest.approx(5.0, rel=1e-15)
    if n > 1:
        expected = [math.exp(math.log(5.0) + i / (n - 1) * (math.log(0.01) - math.log(5.0))) for i in range(n)]
        assert levels[:-1].tolist() == pytest.approx(expected, rel=1e-14)
        steps = levels[:-1].log().diff()
        assert steps.max() - steps.min() <= 1e-12


@pytest.mark.parametrize("solver", ag_kernels.SOLVERS)
def test_logsnr_equals_its_explicit_levels(nets, solver):
    net, gnet = nets
    noise = _noise()
    got = edm_sampler(net, noise, None, gnet, num_steps=7, sigma_min=0.01, sigma_max=5, schedule="logsnr",
                      guidance=2.0, solver=solver)
    explicit = logsnr_schedule(7, 0.01, 5, dtype=torch.float32)
    assert torch.equal(got, edm_sampler(net, noise, None, gnet, sigmas=explicit, guidance=2.0, solver=solver))
    karras = edm_sampler(net, noise, None, gnet, num_steps=7, sigma_min=0.01, sigma_max=5, guidance=2.0, solver=solver)
    assert not torch.equal(got, karras)


# ------------------------------------------------------------------------------ bad input


BAD_SIGMAS = [
    ([5.0, 1.0, 1.0, 0.0], "strictly decreasing"),
    ([5.0, 6.0, 0.0], "strictly decreasing"),
    ([5.0, float("nan"), 0.1], r"sigmas\[1\] must be finite"),
    ([float("inf"), 1.0, 0.1], r"sigmas\[0\] must be finite"),
    ([5.0, -1.0], r"sigmas\[1\] must be > 0"),
    ([5.0, 0.0, 0.0], r"sigmas\[1\] must be > 0"),
    ([5.0], "at least 2"),
    ([], "at least 2"),
    (torch.ones(2, 2), "1-D"),
    ("5,1,0", "1-D tensor or a sequence"),
    ([5.0, True], r"sigmas\[1\] must be a real number"),
]


@pytest.mark.parametrize("bad,match", BAD_SIGMAS)
def test_bad_sigmas(nets, bad, match):
    net, gnet = nets
    with pytest.raises((ValueError, TypeError), match=match):
        edm_sampler(net, _noise(), None, gnet, sigmas=bad, guidance=2.0)
    with pytest.raises((ValueError, TypeError), match=match):
        GuidedSampler(net, gnet, sigmas=bad, guidance=2.0)


def test_levels_that_collide_in_float32(nets):
    net, _ = nets
    with pytest.raises(ValueError, match="sigmas: .*equal once rounded to torch.float32"):
        edm_sampler(net, _noise(), sigmas=[1.0, 1.0 - 1e-9, 0.5])
    edm_sampler(net, _noise(dtype=torch.float64), sigmas=[1.0, 1.0 - 1e-9, 0.5], dtype=torch.float64)


@pytest.mark.parametrize("extra,names", [
    (dict(num_steps=10), "num_steps"), (dict(num_steps=32), "num_steps"), (dict(sigma_min=0.01), "sigma_min"),
    (dict(sigma_max=80), "sigma_max"), (dict(rho=7), "rho"), (dict(schedule="karras"), "schedule"),
    (dict(num_steps=4, rho=3.0), "num_steps / rho"),
])
def test_sigmas_with_schedule_arguments(nets, extra, names):
    """Giving both is an error naming both, even with the default's value given explicitly."""
    net, _ = nets
    with pytest.raises(ValueError, match=f"sigmas and {names} were both given"):
        edm_sampler(net, _noise(), sigmas=ODD, **extra)
    with pytest.raises(ValueError, match=f"sigmas and {names} were both given"):
        list(ag_kernels.generate(net, seeds=[1], noise_shape=(2, 3), progress=False, sigmas=ODD, **extra))


def test_bad_schedule(nets):
    net, _ = nets
    with pytest.raises(ValueError, match="schedule must be one of"):
        edm_sampler(net, _noise(), schedule="cosine")
    with pytest.raises(ValueError, match="rho=3 was given with schedule='logsnr'"):
        edm_sampler(net, _noise(), schedule="logsnr", rho=3)


def test_generate_takes_sigmas(nets):
    net, gnet = nets
    runs = [b.samples for b in ag_kernels.generate(net, gnet, seeds=[3, 4], noise_shape=(2, 3), progress=False,
                                                  sigmas=ODD, guidance=2.0, solver="dpmpp_2m")]
    noise = torch.stack([torch.randn(2, 3, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    assert torch.equal(runs[0], edm_sampler(net, noise, None, gnet, sigmas=ODD, guidance=2.0, solver="dpmpp_2m"))


# ------------------------------------------------------------------------------ the command line


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("nets")
    save_net(TinyDenoiser(img_channels=3, img_resolution=8, label_dim=4, channels=12, seed=1), d / "main.pt")
    save_net(TinyDenoiser(img_channels=3, img_resolution=8, label_dim=4, channels=6, seed=2), d / "guide.pt")
    (d / "levels.txt").write_text("80 10\n1, 0.1\n")
    return d


def _generate(files, *extra):
    return ["generate", "--net", str(files / "main.pt"), "--gnet", str(files / "guide.pt"), "--guidance", "2",
            "--seeds", "0-1", "--device", "cpu", "--no-progress", *extra]


def test_cli_sigmas_list_and_file_write_the_same_images(files, tmp_path, capsys):
    for i, value in enumerate(("80,10,1,0.1", "80,10,1,0.1,0", str(files / "levels.txt"))):
        code, _, err = cli(_generate(files, "--sigmas", value, "--outdir", str(tmp_path / str(i))), capsys)
        assert code == 0, err
    pngs = [sorted((tmp_path / str(i)).rglob("*.png")) for i in range(3)]
    assert len(pngs[0]) == 2
    for other in pngs[1:]:
        assert [p.read_bytes() for p in other] == [p.read_bytes() for p in pngs[0]]
    settings = json.loads((tmp_path / "0" / "ag_kernels-settings.json").read_text())
    assert settings["sigmas"] == [80.0, 10.0, 1.0, 0.1, 0.0] and settings["steps"] is None


@pytest.mark.parametrize("extra,message", [
    (["--sigmas", "80,10,1", "--steps", "3"], "--sigmas and --steps were both given"),
    (["--sigmas", "80,10,1", "--rho", "7"], "--sigmas and --rho were both given"),
    (["--sigmas", "80,10,1", "--schedule", "logsnr"], "--sigmas and --schedule were both given"),
    (["--sigmas", "80,10,10"], "--sigmas must be strictly decreasing"),
    (["--sigmas", "80,nan,1"], "--sigmas[1] must be finite"),
    (["--sigmas", "80,-1"], "--sigmas[1] must be > 0"),
    (["--sigmas", "80"], "--sigmas must have at least 2"),
    (["--sigmas", "80,ten"], "--sigmas must be a comma list"),
    (["--sigmas", "missing.json"], "--sigmas: no such file"),
    (["--schedule", "logsnr", "--rho", "3"], "--rho shapes only --schedule karras"),
])
def test_cli_bad_sigmas(files, capsys, extra, message):
    code, _, err = cli(_generate(files, *extra), capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_cli_schedule_choices_agree():
    from ag_kernels.commands.generate import SCHEDULE_CHOICES
    from ag_kernels.sampling._settings import SCHEDULES

    assert SCHEDULE_CHOICES == SCHEDULES


def test_cli_logsnr_writes_what_python_samples(files, tmp_path, capsys):
    code, _, err = cli(_generate(files, "--schedule", "logsnr", "--steps", "5", "--sigma-min", "0.01",
                               "--solver", "dpmpp_2m", "--outdir", str(tmp_path / "a")), capsys)
    assert code == 0, err
    code, _, err = cli(_generate(files, "--sigmas", ",".join(repr(v) for v in logsnr_schedule(
        5, 0.01, 80.0, dtype=torch.float64).tolist()), "--solver", "dpmpp_2m", "--outdir", str(tmp_path / "b")),
        capsys)
    assert code == 0, err
    a, b = (sorted((tmp_path / k).rglob("*.png")) for k in "ab")
    assert len(a) == 2 and [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    settings = json.loads((tmp_path / "a" / "ag_kernels-settings.json").read_text())
    assert settings["schedule"] == "logsnr"
