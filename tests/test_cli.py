"""`python -m ag_kernels generate` and `verify` through the command-line entry point."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from ag_kernels.commands.main import main
from ag_kernels.models.checkpoint import save_net
from ag_kernels.sampling.generation import generate
from ag_kernels.models.nets import TinyDenoiser

STANDIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "edm_standin")


class PickledNet(torch.nn.Module):
    """A whole module saved with torch.save: loading it needs full unpickling."""

    def forward(self, x, t, labels=None):
        return x / (1 + t**2)


def _nets(tmp_path, gen):
    seed = int(torch.randint(2**31, (), generator=gen))
    net = TinyDenoiser(img_channels=3, img_resolution=8, label_dim=4, channels=16, seed=seed)
    gnet = TinyDenoiser(img_channels=3, img_resolution=8, label_dim=4, channels=8, seed=seed + 1)
    paths = tmp_path / "main.pt", tmp_path / "guide.pt"
    save_net(net, paths[0])
    save_net(gnet, paths[1])
    return net, gnet, [str(p) for p in paths]


@pytest.mark.parametrize("subdirs", [False, True])
def test_generate_command_writes_the_api_images(tmp_path, gen, capsys, subdirs):
    """The command writes what generate(batch_split="even") gives, as NNNNNN.png (EDM2's layout:
    flat, or one folder per 1000 seeds with --subdirs)."""
    net, gnet, (net_path, gnet_path) = _nets(tmp_path, gen)
    outdir = tmp_path / "out"
    code = main(["generate", "--net", net_path, "--gnet", gnet_path, "--seeds", "3-5,1000", "--batch", "3",
                 "--steps", "4", "--guidance", "2.1", "--outdir", str(outdir), "--device", "cpu", "--no-progress"]
                + (["--subdirs"] if subdirs else []))
    assert code == 0
    assert "generated 4 samples" in capsys.readouterr().out
    expected = {}
    for batch in generate(net, gnet, seeds=[3, 4, 5, 1000], batch_size=3, progress=False, num_steps=4, guidance=2.1,
                          batch_split="even"):
        assert len(batch.seeds) == 2  # 4 seeds, at most 3 a batch: EDM2 splits them 2 + 2
        for seed, image in zip(batch.seeds, batch.images):
            expected[seed] = image.permute(1, 2, 0).numpy()
    written = sorted(str(p.relative_to(outdir)) for p in outdir.rglob("*.png"))
    if subdirs:
        assert written == ["000000/000003.png", "000000/000004.png", "000000/000005.png", "001000/001000.png"]
    else:
        assert written == ["000003.png", "000004.png", "000005.png", "001000.png"]
    for seed in (3, 4, 5, 1000):
        path = outdir / (f"{seed - seed % 1000:06d}/{seed:06d}.png" if subdirs else f"{seed:06d}.png")
        with Image.open(path) as png:
            assert png.size == (8, 8) and png.mode == "RGB"
            assert np.array_equal(np.asarray(png), expected[seed]), seed


def test_generate_command_refuses_pickles(tmp_path, capsys):
    path = tmp_path / "pickled.pt"
    torch.save(PickledNet(), path)
    code = main(["generate", "--net", str(path), "--seeds", "0", "--shape", "3,8,8", "--steps", "2", "--device", "cpu",
                 "--no-progress"])
    assert code == 2
    assert "allow-pickle" in capsys.readouterr().err.replace("_", "-")


def test_generate_command_bad_arguments(tmp_path, gen, capsys):
    _, _, (net_path, _) = _nets(tmp_path, gen)
    assert main(["generate", "--net", net_path, "--seeds", "5-2"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["generate", "--net", str(tmp_path / "missing.pt"), "--seeds", "0", "--no-progress"]) == 2
    assert "missing.pt" in capsys.readouterr().err
    # guidance != 1 needs --gnet: the sampler's message names it.
    assert main(["generate", "--net", net_path, "--seeds", "0", "--guidance", "2", "--device", "cpu",
                 "--no-progress"]) == 2
    assert "gnet" in capsys.readouterr().err


def test_verify_command_dispatch(capsys):
    assert main(["verify", "--edm2", STANDIN, "--steps", "4", "--backends", "torch"]) == 0
    assert "torch" in capsys.readouterr().out  # the table (its content is checked in test_verify.py)
    assert main(["verify", "--edm2", os.path.join(STANDIN, "does-not-exist")]) == 2


def test_selfcheck_arguments_and_one_step(capsys):
    for args, needle in [(["--device", "bogus"], "--device: 'bogus' is not a device name"),
                         (["--steps", "0"], "--steps must be >= 1"),
                         (["--guidance", "1e300"], "--guidance must be finite"),
                         (["--device", "cuda:99"], "--device: 'cuda:99'")]:
        with pytest.raises(SystemExit) as exc:
            main(["selfcheck", *args])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
    # One step: the schedule is [sigma_max, 0] and the check still runs (with a float64-based tolerance).
    assert main(["selfcheck", "--steps", "1", "--size", "4", "--batch", "2", "--device", "cpu"]) == 0
    assert "agree with the reference" in capsys.readouterr().out


def test_generate_device_checked_before_loading(tmp_path, capsys):
    assert main(["generate", "--net", str(tmp_path / "missing.pt"), "--device", "nonsense"]) == 2
    assert "--device: 'nonsense'" in capsys.readouterr().err
