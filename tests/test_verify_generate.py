"""``python -m ag_kernels verify --edm2 PATH --generate``: our generate CLI against a checkout's generate_images().

The "checkout" is tests/edm_standin: our own stand-ins for edm2's generate_images.py (edm_sampler
and generate_images, written from the reference's documented behaviour), dnnlib, torch_utils and
training (a small Precond and the pixel encoder); no edm2 code.  The check must pass on it, and
fail when our generator is broken the ways that matter (label drawn before the noise, no label draw
under --class, file layout, batch split).  The real checkout is run by hand (see docs/verification.md).
"""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import pytest
import torch

from ag_kernels.sampling import generation
from ag_kernels.commands import verify_generate as vg
from ag_kernels.commands._checkout import ReferenceSamplerError
from ag_kernels.models.edm2 import use_checkout
from ag_kernels.sampling.seeds import SeedNoise
from ag_kernels.commands.verify import main

STANDIN = Path(__file__).parent / "edm_standin"
FAST = ["--steps", "6", "--device", "cpu"]


@pytest.fixture(autouse=True)
def clean_imports():
    """Restore sys.path and forget the stand-in checkout's modules after each test.

    The tiny runs use one thread: on a busy CPU, several threads spin-waiting for each other
    make them ten times slower.
    """
    path, threads = list(sys.path), torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    sys.path[:] = path
    for name in list(sys.modules):
        if name.split(".")[0] in ("dnnlib", "torch_utils", "training"):
            del sys.modules[name]
    importlib.invalidate_caches()
    assert not torch.distributed.is_initialized()


def _rows(tmp_path, **kwargs):
    use_checkout(STANDIN.resolve())
    return vg.verify_generate(STANDIN.resolve(), tmp_path / "work", seeds=list(range(0, 6)) + list(range(997, 1004)),
                              batch=5, num_steps=6, **kwargs)


def test_passes_on_standin(capsys):
    assert main(["--edm2", str(STANDIN), "--generate", *FAST]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "reference, 1 process" in line]
    assert [r.split()[0] for r in rows] == ["unguided", "guided", "churned", "class-fixed"]
    for r in rows:
        assert " same " in r and "14/14/14" in r and r.rstrip().endswith("ok"), r
    assert out.strip().splitlines()[-1].startswith("OK: all 4 comparisons")


def test_rows_and_outputs(tmp_path):
    rows = _rows(tmp_path)
    assert [r["config"] for r in rows] == ["unguided", "guided", "churned", "class-fixed"]
    for r in rows:
        assert r["ok"] and r["same_names"] and r["same_batches"] and r["error"] is None, r
        assert r["pixels"] == 13 * 16 * 16 and r["equal_pct"] >= 99.9 and r["max_diff"] <= 1
        # The reference's split of 13 seeds into batches of at most 5: array_split into 3.
        assert r["batches"][0] == [[0, 1, 2, 3, 4], [5, 997, 998, 999], [1000, 1001, 1002, 1003]]
    work = tmp_path / "work"
    # --subdirs for the churned run (seeds across 1000), flat files otherwise; the names of the reference.
    assert sorted(p.relative_to(work / "churned" / "ours").as_posix()
                  for p in (work / "churned" / "ours").rglob("*.png"))[-5:] == [
        "000000/000999.png", "001000/001000.png", "001000/001001.png", "001000/001002.png", "001000/001003.png"]
    assert (work / "guided" / "ours" / "001003.png").is_file()
    # The test problem is not degenerate: seeds give different images, the class and the guide matter.
    import numpy as np
    from PIL import Image

    def img(cfg, name):
        return np.asarray(Image.open(work / cfg / "reference" / name)).astype(int)

    assert np.abs(img("guided", "000000.png") - img("guided", "000001.png")).max() > 50
    assert np.abs(img("unguided", "000000.png") - img("guided", "000000.png")).max() > 20


class _LabelFirst(SeedNoise):
    """Broken order: each seed's class drawn before its noise."""

    def randn(self, shape, dtype=torch.float32):
        if not getattr(self, "_drew", False):
            self._drew = True
            super().randint(10)
        return super().randn(shape, dtype)


class _NoLabelDraw(SeedNoise):
    """Broken: the class draw consumes nothing (as if skipped under --class), so the churn noise shifts."""

    def randint(self, high):
        return torch.zeros(len(self.seeds), dtype=torch.long, device=self.device)


def test_label_before_noise_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(generation, "SeedNoise", _LabelFirst)
    rows = _rows(tmp_path)
    assert not any(r["ok"] for r in rows)
    assert all(r["same_names"] and r["equal_pct"] < 50 for r in rows)


def test_class_draw_skipped_under_class_fails(tmp_path, monkeypatch):
    monkeypatch.setattr(generation, "SeedNoise", _NoLabelDraw)
    rows = {r["config"]: r for r in _rows(tmp_path, only=["class-fixed"])}
    # With --class the labels are right; only the churn noise (drawn after the class) differs.
    assert not rows["class-fixed"]["ok"] and rows["class-fixed"]["equal_pct"] < 99.9


def test_file_layout_and_batch_split_mutations_fail(tmp_path, monkeypatch, capsys):
    def wrong_path(outdir, seed, subdirs=True):
        import os

        return os.path.join(outdir, f"{seed // 1000:06d}", f"{seed:06d}.png") if subdirs else \
            os.path.join(outdir, f"{seed:06d}.png")

    def fixed_split(n, batch_size, world, how):
        return [range(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]

    monkeypatch.setattr(generation, "_png_path", wrong_path)
    monkeypatch.setattr(generation, "_split", fixed_split)
    # 13 seeds in batches of at most 5: the reference's split is 5, 4, 4; a fixed one 5, 5, 3.
    assert main(["--edm2", str(STANDIN), "--generate", *FAST, "--seeds", "0-5,997-1003",
                 "--configs", "guided,churned"]) == 1
    out = capsys.readouterr().out
    churned = next(line for line in out.splitlines() if line.startswith("churned"))
    assert "FAIL" in churned and "missing in ours: 001000/001000.png" in churned
    assert "only in ours: 000001/001000.png" in churned
    guided = next(line for line in out.splitlines() if line.startswith("guided"))
    # Same files and pixels (the stand-in network is batch-independent), but not the reference's batches.
    assert "DIFFER" in guided and "13/13/13" in guided and "batches differ: reference [0-4] [5..999 (4)]" in guided
    assert out.strip().splitlines()[-1].startswith("MISMATCH: 2 of 2")


def test_our_cli_failing_is_a_failed_row(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("ours exploded")
        yield  # noqa: unreachable - a generator function, as generate is

    monkeypatch.setattr(generation, "generate", broken)
    rows = _rows(tmp_path, only=["guided"])
    assert not rows[0]["ok"] and "ours exploded" in rows[0]["error"] and rows[0]["our_files"] == 0
    assert "ours exploded" in vg.format_table(rows)


def test_torchrun_two_processes(capsys):
    assert main(["--edm2", str(STANDIN), "--generate", "--steps", "4", "--device", "cpu", "--seeds", "0-2,998-1001",
                 "--batch", "2", "--torchrun", "--configs", "churned"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("churned torchrun x2")]
    assert len(rows) == 2 and "reference, torchrun x2" in rows[0] and "reference, 1 process" in rows[1]
    assert all("7/7/7" in r and r.rstrip().endswith("ok") for r in rows)


@pytest.mark.parametrize("args,message", [
    (["--edm2", "/nonexistent/edm2"], "--edm2: '/nonexistent/edm2' is not a folder"),
    (["--edm2", str(STANDIN), "--torchrun", "1"], "--torchrun needs N >= 2"),
    (["--edm2", str(STANDIN), "--configs", "guided,nope"], "--configs: unknown nope"),
    (["--edm2", str(STANDIN), "--resolution", "6"], "--resolution must be a multiple of 4"),
    (["--edm2", str(STANDIN), "--seeds", "5-1"], "--seeds: reversed range"),
    (["--edm2", str(STANDIN), "--steps", "1"], "--steps must be >= 2"),
])
def test_bad_options_exit_2(args, message, capsys):
    assert main([*args, "--generate"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1, err


def test_bad_checkouts_exit_2(tmp_path, capsys):
    # A folder holding only generate_images.py (enough for plain verify) is not a checkout here.
    only_file = tmp_path / "only_file"
    only_file.mkdir()
    shutil.copy(STANDIN / "generate_images.py", only_file)
    assert main(["--edm2", str(only_file), "--generate"]) == 2
    assert "is not an NVlabs/edm2 checkout (no training/networks_edm2.py" in capsys.readouterr().err

    no_fn = tmp_path / "no_fn"
    shutil.copytree(STANDIN, no_fn)
    (no_fn / "generate_images.py").write_text("def edm_sampler(*args, **kwargs):\n    pass\n")
    assert main(["--edm2", str(no_fn), "--generate", *FAST]) == 2
    err = capsys.readouterr().err
    assert "has no function generate_images" in err and "Traceback" not in err


def test_keep_must_be_new_or_empty(tmp_path, capsys):
    (tmp_path / "x").write_text("")
    assert main(["--edm2", str(STANDIN), "--generate", "--keep", str(tmp_path)]) == 2
    assert "--keep" in capsys.readouterr().err


def test_build_snapshots_refuses_a_keyword_the_checkout_does_not_take(tmp_path, monkeypatch):
    """The stand-in's Precond refuses unknown keywords as EDM2's does: a misspelled one in MAIN_NET fails here."""
    use_checkout(STANDIN.resolve())
    paths = vg.build_snapshots(tmp_path / "ok")  # today's keywords are all EDM2's
    assert sorted(paths) == ["gnet", "net", "net_noenc"]
    monkeypatch.setattr(vg, "MAIN_NET", dict(vg.MAIN_NET, channels_per_heads=32))
    with pytest.raises(ReferenceSamplerError, match="channels_per_heads"):
        vg.build_snapshots(tmp_path / "bad")
