"""tune_schedule: a schedule fitted to a guided pair, a solver and a budget; its JSON file; its command.

Tiny runs (a few dozen samples of a small denoiser, a few dozen sampler runs): the result is a
valid schedule that ``sigmas=`` takes (t_0 = sigma_max, t_{N-1} = sigma_min, ending in 0), for
every solver; on its calibration noise it is no worse than the log-SNR-uniform start, by the
tuner's objective recomputed here, and better where the search had room; loading a schedule
for another solver or budget is an error naming the argument.
"""

import inspect
import json
import math

import pytest
import torch

import ag_kernels
from ag_kernels import edm_sampler, load_schedule, save_schedule, tune_schedule
from _util import cli
from ag_kernels.models.checkpoint import save_net
from ag_kernels.models.nets import TinyDenoiser
from ag_kernels.sampling._plan import logsnr_schedule
from test_solvers import Counting, Net  # the small EDM-style denoiser and the call recorder of the solver tests

SETTINGS = dict(guidance=2.5, sigma_min=0.01, sigma_max=10.0)


@pytest.fixture(scope="module")
def pair():
    return Net(0), Net(1)


@pytest.fixture(scope="module")
def noise():
    return torch.randn(48, 2, 3, generator=torch.Generator().manual_seed(11))


def _objective(net, gnet, noise, sigmas, solver, eps=1e-4, reference_steps=16):
    """The tuner's objective, recomputed: mean over samples of log(relative RMS distance to Heun + eps)."""
    ref = edm_sampler(net, noise, None, gnet, num_steps=reference_steps, sigma_min=0.01, sigma_max=10.0,
                      guidance=2.5).double()
    x = edm_sampler(net, noise, None, gnet, sigmas=sigmas, solver=solver, guidance=2.5).double()
    scale = ref.square().mean().sqrt()
    per = (x - ref).flatten(1).square().mean(1).sqrt() / scale
    return float((per + eps).log().mean())


def test_signature():
    params = inspect.signature(ag_kernels.tune_schedule).parameters
    names = list(params)
    assert names[:4] == ["net", "noise", "labels", "gnet"]
    assert params["labels"].default is None and params["gnet"].default is None
    expected = {"guidance": 1.0, "num_steps": inspect.Parameter.empty, "solver": "dpmpp_2m", "sigma_min": 0.002,
                "sigma_max": 80.0}
    for name, default in expected.items():
        assert params[name].kind == inspect.Parameter.KEYWORD_ONLY and params[name].default == default, name
    assert names[4:9] == list(expected)


@pytest.mark.parametrize("solver", ag_kernels.SOLVERS)
def test_tuned_schedule_valid_and_no_worse_than_the_start(pair, noise, solver):
    net, gnet = pair
    steps = 3 if solver == "heun" else 5
    sigmas = tune_schedule(net, noise, None, gnet, num_steps=steps, solver=solver, reference_steps=16,
                           max_trials=24, **SETTINGS)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (steps + 1,)
    assert sigmas[0].item() == 10.0 and sigmas[-2].item() == 0.01 and sigmas[-1].item() == 0.0
    assert bool((sigmas[:-1] > sigmas[1:]).all())
    start = logsnr_schedule(steps, 0.01, 10.0, dtype=torch.float64)
    assert _objective(net, gnet, noise, sigmas, solver) <= _objective(net, gnet, noise, start, solver) + 1e-9
    counted = Counting(net)
    edm_sampler(counted, noise, None, gnet, sigmas=sigmas, solver=solver, guidance=2.5)
    assert counted.ts[0] == pytest.approx(10.0) and counted.ts[-1] == pytest.approx(0.01)


def test_tuning_improves_where_it_can(pair, noise):
    net, gnet = pair
    sigmas = tune_schedule(net, noise, None, gnet, num_steps=5, solver="dpmpp_2m", reference_steps=16,
                           max_trials=40, **SETTINGS)
    start = logsnr_schedule(5, 0.01, 10.0, dtype=torch.float64)
    assert not torch.allclose(sigmas, start)
    assert _objective(net, gnet, noise, sigmas, "dpmpp_2m") < _objective(net, gnet, noise, start, "dpmpp_2m") - 1e-3


def test_one_step_and_deterministic(pair, noise):
    net, gnet = pair
    assert tune_schedule(net, noise, None, gnet, num_steps=1, **SETTINGS).tolist() == [10.0, 0.0]
    a = tune_schedule(net, noise, None, gnet, num_steps=4, reference_steps=8, max_trials=10, **SETTINGS)
    b = tune_schedule(net, noise, None, gnet, num_steps=4, reference_steps=8, max_trials=10, **SETTINGS)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_steps=0), "num_steps must be an integer >= 1"),
    (dict(num_steps=2.5), "num_steps must be an integer >= 1"),
    (dict(num_steps=3, solver="rk4"), "solver must be one of"),
    (dict(num_steps=3, sigma_min=1.0, sigma_max=1.0), "sigma_min must be < sigma_max"),
    (dict(num_steps=3, sigma_min=-1.0), "sigma_min must be > 0"),
    (dict(num_steps=3, reference_steps=1), "reference_steps must be an integer >= 2"),
    (dict(num_steps=3, max_trials=0), "max_trials must be an integer >= 1"),
    (dict(num_steps=3, eps=0.0), "eps must be > 0"),
])
def test_bad_arguments(pair, noise, kwargs, match):
    net, gnet = pair
    with pytest.raises(ValueError, match=match):
        tune_schedule(net, noise, None, gnet, guidance=2.0, **kwargs)
    with pytest.raises(TypeError):
        tune_schedule(net, noise, None, gnet)  # num_steps is required
    with pytest.raises(TypeError, match="noise must be"):
        tune_schedule(net, [1.0, 2.0], None, gnet, num_steps=3)


def test_json_round_trip_and_mismatches(tmp_path):
    levels = [10.0, 2.0, 0.3, 0.01, 0.0]
    path = tmp_path / "s.json"
    save_schedule(path, levels, solver="dpmpp_3m", guidance=2.5, note="x")
    record = json.loads(path.read_text())
    assert (record["solver"], record["num_steps"], record["guidance"], record["sigmas"], record["note"]) == (
        "dpmpp_3m", 4, 2.5, levels, "x")
    assert load_schedule(path).tolist() == levels
    assert load_schedule(path, solver="dpmpp_3m", num_steps=4).tolist() == levels
    with pytest.raises(ValueError, match="solver: .* tuned for solver='dpmpp_3m', not 'dpmpp_2m'"):
        load_schedule(path, solver="dpmpp_2m")
    with pytest.raises(ValueError, match="num_steps: .* has 4 steps, not 8"):
        load_schedule(path, num_steps=8)
    (tmp_path / "bad.json").write_text(json.dumps({**record, "sigmas": [1.0, 2.0]}))
    with pytest.raises(ValueError, match="sigmas must be strictly decreasing"):
        load_schedule(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a schedule file"):
        load_schedule(tmp_path / "other.json")
    (tmp_path / "text.json").write_text("{")
    with pytest.raises(ValueError, match="not a JSON schedule file"):
        load_schedule(tmp_path / "text.json")
    with pytest.raises(FileNotFoundError, match="no such schedule file"):
        load_schedule(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="solver must be one of"):
        save_schedule(tmp_path / "x.json", levels, solver="rk4")
    with pytest.raises(ValueError, match="strictly decreasing"):
        save_schedule(tmp_path / "x.json", [1.0, 1.0], solver="heun")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("nets")
    save_net(TinyDenoiser(img_channels=3, img_resolution=8, label_dim=4, channels=12, seed=1), d / "main.pt")
    save_net(TinyDenoiser(img_channels=3, img_resolution=8, label_dim=4, channels=6, seed=2), d / "guide.pt")
    return d


def test_cli_tune_then_generate(files, tmp_path, capsys):
    out = tmp_path / "tuned.json"
    nets = ["--net", str(files / "main.pt"), "--gnet", str(files / "guide.pt"), "--guidance", "2", "--device", "cpu"]
    code, stdout, err = cli(["tune-schedule", *nets, "--steps", "4", "--seeds", "0-7", "--reference-steps", "8",
                              "--max-trials", "8", "--out", str(out), "--quiet"], capsys)
    assert code == 0, err
    record = json.loads(out.read_text())
    assert (record["solver"], record["num_steps"], record["guidance"]) == ("dpmpp_2m", 4, 2.0)
    assert record["calibration_seeds"] == "0-7" and f"wrote {out}" in stdout
    gen = ["generate", *nets, "--seeds", "100-101", "--no-progress"]
    code, _, err = cli(gen + ["--sigmas", str(out), "--solver", "dpmpp_2m", "--outdir", str(tmp_path / "a")], capsys)
    assert code == 0, err
    code, _, err = cli(gen + ["--sigmas", ",".join(map(repr, record["sigmas"])), "--solver", "dpmpp_2m",
                               "--outdir", str(tmp_path / "b")], capsys)
    assert code == 0, err
    pngs = [sorted((tmp_path / k).rglob("*.png")) for k in "ab"]
    assert len(pngs[0]) == 2 and [p.read_bytes() for p in pngs[0]] == [p.read_bytes() for p in pngs[1]]
    # Another solver than the file's, or --steps beside it: one line naming the flags.
    code, _, err = cli(gen + ["--sigmas", str(out), "--solver", "heun"], capsys)
    assert code == 2 and len(err) == 1 and "--sigmas" in err[0] and "--solver dpmpp_2m, not --solver heun" in err[0]
    code, _, err = cli(gen + ["--sigmas", str(out), "--solver", "dpmpp_2m", "--steps", "4"], capsys)
    assert code == 2 and len(err) == 1 and "--sigmas and --steps were both given" in err[0]


@pytest.mark.parametrize("extra,message", [
    (["--steps", "0"], "--steps must be >= 1"),
    (["--steps", "3", "--sigma-min", "0"], "--sigma-min must be > 0"),
    (["--steps", "3", "--guidance", "2"], "--guidance 2 needs a guiding network"),
    (["--steps", "3", "--seeds", "x"], "--seeds"),
    (["--steps", "3", "--reference-steps", "1"], "--reference-steps must be >= 2"),
])
def test_cli_bad_flags(files, tmp_path, capsys, extra, message):
    argv = ["tune-schedule", "--net", str(files / "main.pt"), "--device", "cpu", "--out", str(tmp_path / "t.json"),
            *extra]
    code, _, err = cli(argv, capsys)
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "t.json").exists()


def test_toy_schedule_study_runs(monkeypatch):
    """The schedule study (python -m ag_kernels.toy.solvers --schedules), shrunk: rows for every
    solver x schedule asked, tuned ones with their levels, and both goals judged."""
    from ag_kernels.toy import experiment as ex
    from ag_kernels.toy import solvers as study

    monkeypatch.setattr(study, "CALIBRATION_N", 64)
    monkeypatch.setattr(study, "CONVERGED_STEPS", 16)
    result = study.schedule_study(ex.load_models(), n=256, draws=(0, 1), solvers=("euler", "dpmpp_2m"), budgets=(8,),
                                  schedules=study.SCHEDULES[:2] + study.SCHEDULES[-1:], log=None)
    labels = {(r["solver"], r["schedule"]) for r in result["rows"]}
    assert labels == {("none", "karras"), ("heun", "karras"), ("euler", "karras"), ("euler", "logsnr"),
                      ("dpmpp_2m", "karras"), ("dpmpp_2m", "logsnr"), ("dpmpp_2m", "tuned@0.005")}
    tuned = next(r for r in result["rows"] if r["schedule"] == "tuned@0.005")
    assert len(tuned["sigmas"]) == 9 and tuned["sigmas"][-2] == 0.005 and len(tuned["draws"]) == 2
    assert set(result["goals"]) == {"matches_heun63_within_10_evals", "keeps_75pct_reduction_at_8_evals"}
    assert list(result["tune_seconds"]) == ["dpmpp_2m/8/tuned@0.005"]
