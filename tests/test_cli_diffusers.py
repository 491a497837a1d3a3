"""``generate --diffusers PIPELINE_DIR``: a tiny SD pipeline saved with save_pretrained, sampled from the command line.

The PNGs equal AutoguidedPipeline.generate's images of the same seeds; --skip-existing redoes only
what is missing; missing or wrong folders and misplaced flags exit 2 with one line naming the flag.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

import _tiny_diffusers as T

# Imported once, at collection: conftest restores the diffusers modules present before each test,
# so the pipelines' modules loaded here are not imported again for every test (seconds each).
T.preload()

import ag_kernels
from _util import cli


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("diffusers")
    T.sd_pipeline(text_encoder=True).save_pretrained(d / "pipe")
    T.tiny_unet(seed=5).save_pretrained(d / "guide")
    ddim = T.sd_pipeline(text_encoder=True)
    import diffusers

    ddim.scheduler = diffusers.DDIMScheduler.from_config(ddim.scheduler.config)
    ddim.save_pretrained(d / "ddim")
    (d / "empty").mkdir()
    (d / "a_file").write_text("x")
    return d


def _args(d, *extra):
    return ["generate", "--diffusers", str(d / "pipe"), "--guide", str(d / "guide"), "--prompt", "a cat",
            "--negative-prompt", "blurry", "--cfg", "3", "--autoguidance", "2", "--steps", "3", "--device", "cpu",
            "--no-progress", *extra]


def test_generate_diffusers_writes_the_api_images_and_resumes(folders, tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, err = cli(_args(folders, "--seeds", "0-4", "--batch", "2", "--outdir", str(out)), capsys)
    assert code == 0, err
    assert "generated 5 samples" in stdout
    names = sorted(os.listdir(out))
    assert names == ["000000.png", "000001.png", "000002.png", "000003.png", "000004.png",
                     "ag_kernels-settings.json"]
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(folders / "pipe")
    pipe.set_progress_bar_config(disable=True)
    ag = ag_kernels.AutoguidedPipeline.from_pipe(pipe, guide=diffusers.UNet2DConditionModel.from_pretrained(
        folders / "guide"))
    # The CLI's batches of 5 seeds at --batch 2 ("even" split): [0, 1, 2], [3, 4]... as generate forms them.
    (batch,) = ag.generate(seeds=[4], batch_size=1, prompt="a cat", negative_prompt="blurry", guidance_scale=3.0,
                           autoguidance_scale=2.0, num_inference_steps=3, progress=False)
    png = np.asarray(Image.open(out / "000004.png"))
    api = batch.images[0].permute(1, 2, 0).numpy()
    assert png.shape == (8, 8, 3) and np.abs(png.astype(int) - api.astype(int)).max() <= 1
    # Resume: only the missing image is made; the others stay as they were.
    os.unlink(out / "000002.png")
    before = {n: os.path.getmtime(out / n) for n in ("000000.png", "000004.png")}
    code, stdout, err = cli(_args(folders, "--seeds", "0-4", "--batch", "2", "--outdir", str(out),
                                   "--skip-existing"), capsys)
    assert code == 0, err
    assert os.path.exists(out / "000002.png")
    assert {n: os.path.getmtime(out / n) for n in before} == before
    # Other settings into the same folder: refused.
    code, _, err = cli(_args(folders, "--seeds", "0-4", "--outdir", str(out), "--autoguidance", "3"), capsys)
    assert code == 2 and len(err) == 1 and "other settings" in err[0]


@pytest.mark.parametrize("change,flag", [
    (lambda d, a: a.__setitem__(2, str(d / "missing")), "--diffusers: no such folder"),
    (lambda d, a: a.__setitem__(2, str(d / "empty")), "--diffusers: "),
    (lambda d, a: a.__setitem__(2, str(d / "a_file")), "--diffusers: not a folder"),
    (lambda d, a: a.__setitem__(2, str(d / "guide")), "--diffusers: "),
    (lambda d, a: a.__setitem__(2, str(d / "ddim")), "--diffusers (its scheduler): DDIMScheduler is not supported"),
    (lambda d, a: a.__setitem__(4, str(d / "missing")), "--guide: no such folder"),
    (lambda d, a: a.__setitem__(4, str(d / "empty")), "--guide: "),
    (lambda d, a: a.__delitem__(slice(3, 5)), "--autoguidance 2 needs a guide"),
    (lambda d, a: a.extend(["--cfg", "nan"]), "--cfg must be a finite number"),
    (lambda d, a: a.extend(["--net", "x.pt"]), "--net is not used with --diffusers"),
    (lambda d, a: a.extend(["--guidance", "2"]), "--guidance is not used with --diffusers"),
    (lambda d, a: a.extend(["--solver", "dpmpp_3m", "--churn", "1"]), "--churn is not used with --diffusers"),
    (lambda d, a: a.extend(["--churn", "1"]), "--churn is not used with --diffusers"),
    (lambda d, a: a.extend(["--sigma-min", "0.01"]), "--sigma-min is not used with --diffusers"),
    (lambda d, a: a.extend(["--sigmas", "80,1,0"]), "--sigmas is not used with --diffusers"),
    (lambda d, a: a.extend(["--schedule", "logsnr"]), "--schedule is not used with --diffusers"),
    (lambda d, a: a.extend(["--steps", "0"]), "--steps must be >= 1"),
    (lambda d, a: a.__delitem__(slice(5, 7)), "--diffusers needs --prompt"),
])
def test_generate_diffusers_bad_input_one_line_exit_2(folders, tmp_path, capsys, change, flag):
    argv = _args(folders, "--seeds", "0", "--outdir", str(tmp_path / "out"))
    change(folders, argv)
    code, _, err = cli(argv, capsys)
    assert code == 2 and len(err) == 1 and flag in err[0], err
    assert not (tmp_path / "out").exists()


def test_diffusers_flags_need_diffusers(capsys, tmp_path):
    for extra in (["--prompt", "a"], ["--autoguidance", "2"], ["--guide", str(tmp_path)]):
        code, _, err = cli(["generate", "--net", "x.pt", "--seeds", "0", *extra], capsys)
        assert code == 2 and len(err) == 1 and "--diffusers" in err[0], err
