"""The toy experiment: shipped models, training command, sampling, scoring, the demo command."""

import json
import math
import zipfile

import pytest
import torch
from PIL import Image

from ag_kernels.commands.main import main
from ag_kernels.models.checkpoint import load_net
from ag_kernels.toy import experiment as ex
from ag_kernels.toy import TREE_LEVELS, tree_depths, tree_mixture
from ag_kernels.toy.model import SIGMA_DATA, ToyDenoiser


@pytest.fixture(scope="module")
def shipped():
    return ex.load_models()


def _weighted_error(net, dist, gen, n=4096):
    """EDM-weighted denoising error of net against the exact denoiser, over the training noise distribution."""
    y = dist.sample(n, generator=gen)
    sigma = torch.exp(-2.3 + 1.5 * torch.randn(n, generator=gen, dtype=torch.float64))
    x = y + sigma[:, None] * torch.randn(y.shape, generator=gen, dtype=torch.float64)
    target = dist.denoise(x, sigma)
    with torch.no_grad():
        d = net(x.float(), sigma.float()).double()
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    return float((weight * ((d - target) ** 2).sum(1)).mean())


def test_shipped_weights_are_weights_only_checkpoints():
    for name, spec in ex.MODELS.items():
        path = ex.WEIGHTS_DIR / f"{name}.pt"
        assert zipfile.is_zipfile(path), path
        obj = torch.load(path, weights_only=True)
        assert obj["arch"] == "toy_mlp"
        assert obj["kwargs"]["hidden"] == spec.hidden and obj["kwargs"]["layers"] == spec.layers
        assert obj["kwargs"].get("fourier", 0) == spec.fourier
        if spec.fourier:
            assert obj["kwargs"]["fourier_scale"] == spec.fourier_scale
        assert path.stat().st_size < 256 * 1024, "the shipped models must stay small"
        assert isinstance(load_net(path), ToyDenoiser)
    log = json.loads((ex.WEIGHTS_DIR / "train_log.json").read_text())
    for name, spec in ex.MODELS.items():
        assert log[name]["iterations"] == spec.iterations, "shipped weights must come from the full training run"


def test_shipped_models_are_trained_and_ordered(shipped, gen):
    """D_1 learned class A well; the guide is a worse model of the same class (the paper's premise);
    the unconditional model learned the union, so it fits class A worse than D_1 does."""
    a, ab = tree_mixture("A"), tree_mixture("AB")
    untrained = ToyDenoiser(hidden=64, layers=4).eval()
    err = {name: _weighted_error(net, a, gen) for name, net in shipped.items()}
    err_untrained = _weighted_error(untrained, a, gen)
    assert err["main"] < 0.5 * err_untrained, (err, err_untrained)
    assert err["main"] < err["guide"], err
    assert err["main"] < err["uncond"], err
    # ... and the unconditional model is a good model of what it was trained on.
    assert _weighted_error(shipped["uncond"], ab, gen) < 0.5 * _weighted_error(untrained, ab, gen)


def test_toy_train_command_writes_loadable_models(tmp_path, capsys):
    code = main(["toy", "train", "--out", str(tmp_path), "--iterations-scale", "0.005", "--batch", "128",
                 "--no-progress"])
    assert code == 0
    log = json.loads((tmp_path / "train_log.json").read_text())
    for name, spec in ex.MODELS.items():
        assert log[name]["iterations"] == max(1, round(spec.iterations * 0.005))
        assert math.isfinite(log[name]["final_loss_mean_last_10pct"])
    models = ex.load_models(tmp_path)
    assert {n: (m.init_kwargs["hidden"], m.init_kwargs["layers"]) for n, m in models.items()} == {
        n: (s.hidden, s.layers) for n, s in ex.MODELS.items()
    }
    assert "training main" in capsys.readouterr().out


def test_train_models_lockstep_groups_equal_separate_runs(tmp_path, monkeypatch):
    """Roots with the same data, seed, target and length train in one loop (targets computed once),
    and every file, snapshots included, is bitwise what training that model alone writes."""
    specs = {
        "big": ex.ModelSpec("big", "A", 8, 3, 6, 5, "big"),
        "small": ex.ModelSpec("small", "A", 4, 2, 6, 5, "small"),
        "early": ex.ModelSpec("early", "A", 8, 3, 3, 5, "big at 3", snapshot_of="big"),
        "other": ex.ModelSpec("other", "AB", 4, 2, 4, 5, "other data"),
    }
    monkeypatch.setattr(ex, "MODELS", specs)
    lines = []
    ex.train_models(tmp_path / "all", batch_size=64, progress=False, log=lines.append)
    log = json.loads((tmp_path / "all" / "train_log.json").read_text())
    assert log["big"]["trained_with"] == ["small"] and log["small"]["trained_with"] == ["big"]
    assert "trained_with" not in log["other"] and log["early"]["iterations"] == 3
    for name in ("big", "small", "other", "early"):
        ex.train_models(tmp_path / name, names=[name], batch_size=64, progress=False, log=lines.append)
        together = torch.load(tmp_path / "all" / f"{name}.pt", weights_only=True)["state_dict"]
        alone = torch.load(tmp_path / name / f"{name}.pt", weights_only=True)["state_dict"]
        assert together.keys() == alone.keys()
        for key in alone:
            assert torch.equal(together[key], alone[key]), (name, key)


def test_train_models_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="names"):
        ex.train_models(tmp_path, names=["nope"], progress=False)
    with pytest.raises(ValueError, match="iterations_scale"):
        ex.train_models(tmp_path, iterations_scale=0, progress=False)


def test_load_models_says_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="toy train"):
        ex.load_models(tmp_path)


def test_outlier_threshold_is_the_stated_quantile(gen):
    threshold = ex.outlier_threshold("A")
    dist = tree_mixture("A")
    fresh = dist.log_prob(dist.sample(100_000, generator=gen))
    frac = float((fresh < threshold).double().mean())
    # Binomial sd at p = 0.01, n = 1e5 is 3.1e-4; the threshold's own estimate (2^18 samples) adds 2e-4.
    assert abs(frac - ex.OUTLIER_QUANTILE) < 2e-3, frac


def test_scores_of_exact_samples_and_of_a_collapsed_cloud(gen):
    dist = tree_mixture("A")
    threshold = ex.outlier_threshold("A")
    ref = dist.sample(4096, generator=gen)
    exact = ex.score_samples(dist.sample(4096, generator=gen), ref, threshold=threshold)
    assert exact["precision"] > 0.85 and exact["recall"] > 0.85, exact
    assert abs(exact["outlier_frac"] - ex.OUTLIER_QUANTILE) < 0.01, exact
    assert exact["gross_outlier_frac"] < 0.005, exact
    assert exact["f1"] == pytest.approx(2 * exact["precision"] * exact["recall"] / (exact["precision"] + exact["recall"]))
    # Exact samples put each level's own weight on it (soft assignment), within sampling error.
    depth = tree_depths("A")
    level = [float(dist.weights[depth == d].sum()) for d in range(TREE_LEVELS)]
    assert exact["mass_by_depth"] == pytest.approx(level, abs=0.03)
    # All samples on the trunk's middle: precise, on the data, but no variety, all mass on level 0.
    trunk = dist.means[dist.weights.argmax()]
    collapsed = trunk + 0.005 * torch.randn(4096, 2, generator=gen, dtype=torch.float64)
    m = ex.score_samples(collapsed, ref, threshold=threshold)
    # Precision here is heavy-tailed over seeds (the tiny cloud can straddle the edge of the
    # reference points' k-NN balls); recall stays tiny.
    assert m["precision"] > 0.6 and m["recall"] < 0.2 and m["outlier_frac"] < 0.01, m
    assert m["mass_by_depth"][0] > 0.95, m
    assert m["mean_logp"] > exact["mean_logp"]
    # A cloud blurred off the branches: mostly outliers, many of them gross.
    blurred = ex.score_samples(dist.sample(4096, generator=gen) + 0.05 * torch.randn(4096, 2, generator=gen, dtype=torch.float64),
                               ref, threshold=threshold)
    assert blurred["outlier_frac"] > 0.5 and blurred["gross_outlier_frac"] > 0.3, blurred


def test_blur_nats_say_the_tree_is_thin():
    blur = ex.blur_nats("A")
    assert list(blur) == ["0.01", "0.03", "0.1"]
    # The thinness targets (the paper's published toy: 0.64 / 4.7 / 30.8).
    assert blur["0.01"] >= 0.5 and blur["0.03"] >= 4, blur
    # Small blurs cost about sigma^2 / width^2: nearly 9x from 0.01 to 0.03, less as branches merge.
    assert 5 < blur["0.03"] / blur["0.01"] < 9.5 and blur["0.1"] > blur["0.03"], blur
    assert ex.blur_nats("A", [0.01], n=4096, seed=1)["0.01"] == pytest.approx(blur["0.01"], rel=0.2)


def _fake_experiment(none, ag, cfg, exact):
    def res(method, w, m):
        full = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "mean_logp": 0.0, "outlier_frac": 0.0,
                "gross_outlier_frac": 0.0, "mass_by_depth": [0.5, 0.5]}
        full.update(m)
        return ex.MethodResult(method, w, full, torch.zeros(4, 2))
    headline = {"none": res("none", 1.0, none), "cfg": res("cfg", 4.0, cfg), "autoguidance": res("autoguidance", 3.0, ag)}
    return ex.Experiment(4, 0, -3.0, {"0.01": 0.6, "0.03": 4.5, "0.1": 30.0}, res("exact", float("nan"), exact),
                         list(headline.values()), headline, "cpu", 0.0)


def test_goals_are_computed_from_the_headline_rows():
    exact = {"precision": 0.97, "recall": 0.97, "outlier_frac": 0.01, "gross_outlier_frac": 0.001, "mass_by_depth": [0.6, 0.4]}
    none = {"precision": 0.90, "recall": 0.96, "outlier_frac": 0.11, "gross_outlier_frac": 0.081, "mass_by_depth": [0.6, 0.4]}
    ag = {"precision": 0.94, "recall": 0.90, "outlier_frac": 0.04, "gross_outlier_frac": 0.041, "mass_by_depth": [0.7, 0.3]}
    cfg = {"precision": 0.95, "recall": 0.56}
    g = ex.goals(_fake_experiment(none, ag, cfg, exact))
    assert g["unguided_outliers_vs_exact"]["value"] == pytest.approx(11.0) and g["unguided_outliers_vs_exact"]["met"]
    assert g["ag_excess_outliers_removed"]["value"] == pytest.approx(0.7) and g["ag_excess_outliers_removed"]["met"]
    assert g["ag_excess_gross_outliers_removed"]["value"] == pytest.approx(0.5) and g["ag_excess_gross_outliers_removed"]["met"]
    assert g["ag_precision_gain"]["value"] == pytest.approx(0.04) and g["ag_precision_gain"]["met"]
    assert g["ag_recall_loss"]["value"] == pytest.approx(0.06) and g["ag_recall_loss"]["met"]
    assert g["ag_recall_loss_vs_cfg"]["value"] == pytest.approx(0.15) and g["ag_recall_loss_vs_cfg"]["met"]
    assert g["ag_mass_by_depth_max_rel_dev"]["value"] == pytest.approx(0.25) and g["ag_mass_by_depth_max_rel_dev"]["met"]
    assert g["blur_0.01_nats"]["met"] and g["blur_0.03_nats"]["met"]
    # Each goal can fail.
    ag_bad = dict(ag, outlier_frac=0.08, gross_outlier_frac=0.07, precision=0.91, recall=0.80, mass_by_depth=[0.9, 0.1])
    bad = ex.goals(_fake_experiment(none, ag_bad, dict(cfg, recall=0.9), exact))
    assert not any(bad[k]["met"] for k in ("ag_excess_outliers_removed", "ag_excess_gross_outliers_removed",
                                           "ag_precision_gain", "ag_recall_loss", "ag_recall_loss_vs_cfg",
                                           "ag_mass_by_depth_max_rel_dev")), bad
    assert not ex.goals(_fake_experiment(dict(none, outlier_frac=0.03), ag, cfg, exact))["unguided_outliers_vs_exact"]["met"]


def test_run_sweeps_every_weight_and_reports_the_papers_weights(shipped):
    result = ex.run(shipped, n=256, cfg_weights=[2.0], ag_weights=[1.5, 2.5], num_steps=6, seed=3)
    # The paper's weights (CFG 4, AG 3) are always sampled: they make the headline rows.
    assert [(r.method, r.guidance) for r in result.sweep] == [
        ("none", 1.0), ("cfg", 2.0), ("cfg", 4.0), ("autoguidance", 1.5), ("autoguidance", 2.5), ("autoguidance", 3.0)
    ]
    assert {m: r.guidance for m, r in result.headline.items()} == {"none": 1.0, "cfg": 4.0, "autoguidance": 3.0}
    # "none" is D_1 alone from the same noise as every other row.
    alone = ex.sample(shipped["main"], None, 1.0, 256, seed=3, num_steps=6)
    assert torch.equal(result.headline["none"].samples, alone)
    out = result.to_json()
    assert {"blur_nats", "exact", "none", "cfg", "autoguidance", "goals", "sweep"} <= set(out)
    assert len(out["sweep"]) == 6 and out["autoguidance"]["guidance"] == 3.0
    json.dumps(out)  # plain JSON


def test_run_rejects_bad_arguments(shipped):
    with pytest.raises(ValueError, match="cfg_weights"):
        ex.run(shipped, n=64, cfg_weights=[0.5])
    with pytest.raises(ValueError, match="ag_weights"):
        ex.run(shipped, n=64, ag_weights=[])
    with pytest.raises(ValueError, match="missing"):
        ex.run({"main": shipped["main"]}, n=64)
    with pytest.raises(ValueError, match="n must be"):
        ex.run(shipped, n=2)


def test_demo_command_writes_json_and_png(tmp_path, capsys):
    out_json, out_png = tmp_path / "m.json", tmp_path / "fig.png"
    code = main(["demo", "--n", "300", "--steps", "6", "--cfg-weights", "2", "3", "--ag-weights", "2",
                 "--device", "cpu", "--json", str(out_json), "--png", str(out_png)])
    text = capsys.readouterr().out
    assert code == 0, text
    metrics = json.loads(out_json.read_text())
    assert {"blur_nats", "exact", "none", "cfg", "autoguidance", "goals", "sweep"} <= set(metrics)
    assert set(metrics["blur_nats"]) == {"0.01", "0.03", "0.1"}
    assert metrics["none"]["guidance"] == 1.0 and metrics["cfg"]["guidance"] == 4.0
    assert metrics["autoguidance"]["guidance"] == 3.0 and metrics["exact"]["guidance"] is None
    for key in ("exact", "none", "cfg", "autoguidance"):
        row = metrics[key]
        assert {"guidance", "precision", "recall", "outlier_frac", "gross_outlier_frac", "mass_by_depth"} <= set(row)
        assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and 0 <= row["outlier_frac"] <= 1
        assert 0 <= row["gross_outlier_frac"] <= row["outlier_frac"]
        assert len(row["mass_by_depth"]) == TREE_LEVELS and sum(row["mass_by_depth"]) == pytest.approx(1.0)
        assert math.isfinite(row["mean_logp"])
    assert [(r["method"], r["guidance"]) for r in metrics["sweep"]] == [
        ("none", 1.0), ("cfg", 2.0), ("cfg", 3.0), ("cfg", 4.0), ("autoguidance", 2.0), ("autoguidance", 3.0)]
    assert "goals:" in text and "ag_recall_loss" in text
    with Image.open(out_png) as png:
        assert png.format == "PNG" and png.size[0] > 4 * png.size[1] / 2
    assert "backends vs torch" in text and "-> ok" in text


@pytest.mark.parametrize("argv, message", [
    (["--n", "2"], "--n"),
    (["--steps", "0"], "--steps"),
    (["--ag-weights", "0.5"], "--ag-weights"),
    (["--cfg-weights", "nan"], "--cfg-weights"),
])
def test_demo_command_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--no-png", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_command_without_weights(tmp_path, capsys):
    assert main(["demo", "--weights", str(tmp_path), "--no-png"]) == 2
    assert "toy train" in capsys.readouterr().err
