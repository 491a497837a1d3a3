"""EDM2 snapshots end to end: --edm2 checkouts, snapshot pickles with their encoders, presets, the
reference's batch split and file layout.

No EDM2 code is used: a stand-in checkout is written to a temporary folder (``dnnlib``,
``torch_utils``, ``training`` with a small preconditioned network and two encoders of our own),
snapshots are pickled from its classes, and a fake ``diffusers`` stands in for the VAE of
latent models (in place of an installed one).  conftest.py hides any checkout's modules before
each test and restores ``sys.modules`` and ``sys.path`` after it, so that a test without
``--edm2`` really cannot import them and no test sees another's checkout (tests/test_edm2_real.py
runs the real NVlabs/edm2 when AG_EDM2_PATH names a checkout).
"""

from __future__ import annotations

import importlib
import pickle
import shutil
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ag_kernels.models import edm2
from ag_kernels.commands.main import main
from ag_kernels.sampling.generation import _split, generate

STANDIN_FILES = {
    "dnnlib/__init__.py": '"""Stand-in for EDM2\'s dnnlib (tests only)."""\n',
    "torch_utils/__init__.py": "",
    "torch_utils/persistence.py": "def persistent_class(cls):\n    return cls\n",
    "training/__init__.py": "",
    "training/networks_edm2.py": '''
        import math
        import torch
        from torch_utils import persistence

        @persistence.persistent_class
        class Precond(torch.nn.Module):
            """A small EDM-preconditioned conv denoiser with EDM2's attributes and call convention."""

            def __init__(self, img_resolution, img_channels, label_dim=0, channels=8, seed=0):
                super().__init__()
                self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
                g = torch.Generator().manual_seed(seed)
                self.w1 = torch.nn.Parameter(torch.randn(channels, img_channels, 3, 3, generator=g) / math.sqrt(9 * img_channels))
                self.w2 = torch.nn.Parameter(torch.randn(img_channels, channels, 3, 3, generator=g) / math.sqrt(9 * channels))
                self.emb = torch.nn.Parameter(torch.randn(channels, max(label_dim, 1), generator=g))

            def forward(self, x, sigma, class_labels=None):
                sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
                c_in = 1 / (sigma ** 2 + 0.25).sqrt()
                h = torch.nn.functional.conv2d(x.to(torch.float32) * c_in, self.w1, padding=1)
                if self.label_dim:
                    h = h + (class_labels.to(torch.float32) @ self.emb.T)[:, :, None, None]
                f = torch.tanh(torch.nn.functional.conv2d(torch.nn.functional.silu(h), self.w2, padding=1))
                c_skip = 0.25 / (sigma ** 2 + 0.25)
                c_out = sigma * 0.5 / (sigma ** 2 + 0.25).sqrt()
                return c_skip * x + c_out * f
    ''',
    # The pixel encoder of the static stand-in checkout (tests/edm_standin), plus a VAE encoder.
    "training/encoders.py": (Path(__file__).parent / "edm_standin" / "training" / "encoders.py").read_text()
    + textwrap.dedent('''

        @persistence.persistent_class
        class StabilityVAEEncoder:
            """Latents -> pixels through a VAE that the fake diffusers provides."""

            def __init__(self, vae_name="stand-in/vae", batch_size=8):
                self.vae_name, self.batch_size, self._vae = vae_name, batch_size, None
                self.batch_sizes = []

            def __getstate__(self):
                return dict(self.__dict__, _vae=None)

            def init(self, device):
                if self._vae is None:
                    import diffusers
                    self._vae = diffusers.load_vae(self.vae_name, device)

            def decode(self, x):
                self.init(x.device)
                self.batch_sizes.append(self.batch_size)
                out = torch.cat([self._vae(b) for b in x.to(torch.float32).split(self.batch_size)])
                return out.clamp(0, 1).mul(255).to(torch.uint8)
    '''),
}

FAKE_DIFFUSERS = '''
import torch

def load_vae(name, device):
    if name != "stand-in/vae":
        raise OSError(f"{name} does not appear to have a file named diffusion_pytorch_model.bin")
    g = torch.Generator().manual_seed(7)
    w = torch.randn(3, 4, 1, 1, generator=g).to(device)

    def decode(z):  # 4 latent channels -> 3 colour channels at twice the resolution
        y = torch.nn.functional.conv2d(z, w).sigmoid()
        return torch.nn.functional.interpolate(y, scale_factor=2, mode="nearest")

    return decode
'''

LABELS = 4


@pytest.fixture
def checkout(tmp_path):
    # conftest.py's _isolate_checkouts restores sys.path and sys.modules (checkout and diffusers) after each test.
    root = tmp_path / "edm2"
    for rel, text in STANDIN_FILES.items():
        f = root / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(textwrap.dedent(text))
    return root


def _snapshots(checkout, tmp_path, *, latent=False, vae_name="stand-in/vae"):
    """(main, guide) snapshot pickles built from the stand-in's classes; then the stand-in is forgotten."""
    sys.path.insert(0, str(checkout))
    from training.encoders import StabilityVAEEncoder
    from training.networks_edm2 import Precond

    channels = 4 if latent else 3
    res = 8
    paths = []
    for name, width, seed in (("main.pkl", 12, 1), ("guide.pkl", 6, 2)):
        net = Precond(res, channels, label_dim=LABELS, channels=width, seed=seed)
        data = {"ema": net, "loss_fn": None, "dataset_kwargs": {}}
        if latent:
            data["encoder"] = StabilityVAEEncoder(vae_name=vae_name)
        with open(tmp_path / name, "wb") as f:
            pickle.dump(data, f)
        paths.append(str(tmp_path / name))
    sys.path.remove(str(checkout))
    for mod in [m for m in sys.modules if m.split(".")[0] in ("dnnlib", "torch_utils", "training")]:
        del sys.modules[mod]
    return paths


def _fake_diffusers(tmp_path):
    """A fake ``diffusers`` first on sys.path, in place of any installed one (restored after the test)."""
    d = tmp_path / "fake_site"
    d.mkdir(exist_ok=True)
    (d / "diffusers.py").write_text(FAKE_DIFFUSERS)
    sys.path.insert(0, str(d))
    for name in [n for n in sys.modules if n.split(".")[0] == "diffusers"]:
        del sys.modules[name]
    importlib.invalidate_caches()


def _pngs(outdir):
    return {str(p.relative_to(outdir)): np.asarray(Image.open(p)) for p in sorted(outdir.rglob("*.png"))}


def _cli(*args):
    return main(["generate", "--device", "cpu", "--no-progress", *map(str, args)])


# --------------------------------------------------------------------------- presets and checkouts


def test_preset_table_is_the_reference_table():
    assert len(edm2.PRESETS) == 36
    head = edm2.PRESETS["edm2-img512-s-autog-fid"]  # the paper's headline pair: S guided by XS at 1/16
    assert (head.net, head.gnet, head.guidance) == ("edm2-img512-s-2147483-0.070.pkl",
                                                    "edm2-img512-xs-0134217-0.125.pkl", 2.10)
    assert edm2.PRESETS["edm2-img64-s-fid"].gnet is None and edm2.PRESETS["edm2-img64-s-fid"].guidance == 1
    guided = [p for p in edm2.PRESETS.values() if p.gnet]
    assert len(guided) == 20 and all(p.guidance > 1 for p in guided)
    # Every file name follows EDM2's naming: <dataset>-<size>[-uncond]-<kimg>-<ema std>.pkl
    for p in edm2.PRESETS.values():
        for f in (p.net, p.gnet):
            assert f is None or (f.startswith("edm2-img") and f.endswith(".pkl") and p.name.split("-")[1] in f)


def test_resolve_preset_names_missing_files(tmp_path):
    with pytest.raises(edm2.EDM2Error, match="unknown preset 'nope'.*edm2-img512-s-autog-fid"):
        edm2.resolve_preset("nope", tmp_path)
    with pytest.raises(edm2.EDM2Error, match="needs --models DIR"):
        edm2.resolve_preset("edm2-img512-s-autog-fid", None)
    with pytest.raises(edm2.EDM2Error, match="is not a folder"):
        edm2.resolve_preset("edm2-img512-s-autog-fid", tmp_path / "none")
    (tmp_path / "edm2-img512-s-2147483-0.070.pkl").write_bytes(b"x")
    with pytest.raises(edm2.EDM2Error) as exc:
        edm2.resolve_preset("edm2-img512-s-autog-fid", tmp_path)
    message = str(exc.value)
    assert "missing in" in message and "edm2-img512-xs-0134217-0.125.pkl" in message
    assert "edm2-img512-s-2147483-0.070.pkl" not in message.split("download")[0].split("missing in")[1].split(":", 1)[1]
    (tmp_path / "edm2-img512-xs-0134217-0.125.pkl").write_bytes(b"x")
    net, gnet, w = edm2.resolve_preset("edm2-img512-s-autog-fid", tmp_path)
    assert net.name == "edm2-img512-s-2147483-0.070.pkl" and gnet.name == "edm2-img512-xs-0134217-0.125.pkl"
    assert w == 2.1


def test_find_checkout(tmp_path, checkout, monkeypatch):
    monkeypatch.delenv(edm2.ENV_VAR, raising=False)
    assert edm2.find_checkout(None) is None
    assert edm2.find_checkout(checkout) == checkout.resolve()
    monkeypatch.setenv(edm2.ENV_VAR, str(checkout))
    assert edm2.find_checkout(None) == checkout.resolve()
    with pytest.raises(edm2.EDM2Error, match="--edm2: .* is not a folder"):
        edm2.find_checkout(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    with pytest.raises(edm2.EDM2Error, match="not an NVlabs/edm2 checkout .*training/networks_edm2.py"):
        edm2.find_checkout(tmp_path / "other")
    monkeypatch.setenv(edm2.ENV_VAR, str(tmp_path / "other"))
    with pytest.raises(edm2.EDM2Error, match=r"\$AG_EDM2_PATH"):
        edm2.find_checkout(None)


def test_even_split_is_numpy_array_split():
    for n in (1, 2, 5, 7, 31, 32, 33, 100):
        for bs in (1, 3, 32):
            for world in (1, 2, 3):
                ours = _split(n, bs, world, "even")
                count = max((n - 1) // (bs * world) + 1, 1) * world
                ref = np.array_split(np.arange(n), count)
                assert [list(r) for r in ours] == [list(a) for a in ref], (n, bs, world)
                assert all(len(r) <= bs for r in ours)
    assert [list(r) for r in _split(7, 3, 1, "fixed")] == [[0, 1, 2], [3, 4, 5], [6]]


# --------------------------------------------------------------------------- generate from snapshots


def test_pixel_snapshots_end_to_end(tmp_path, checkout, monkeypatch):
    monkeypatch.delenv(edm2.ENV_VAR, raising=False)
    net_pkl, gnet_pkl = _snapshots(checkout, tmp_path)
    out = tmp_path / "out"
    args = ["--net", net_pkl, "--gnet", gnet_pkl, "--guidance", "2.0", "--seeds", "0-4,1001", "--batch", "4",
            "--steps", "4", "--outdir", out, "--allow-pickle"]
    # Without the EDM2 code the pickle cannot be read: the error says how to provide it.
    assert _cli(*args) == 2
    assert not out.exists()
    # Without --allow-pickle nothing is unpickled.
    assert _cli(*[a for a in args if a != "--allow-pickle"], "--edm2", checkout) == 2
    assert _cli(*args, "--edm2", checkout) == 0
    files = _pngs(out)
    assert sorted(files) == ["000000.png", "000001.png", "000002.png", "000003.png", "000004.png", "001001.png"]
    # The same images as the API with the snapshots' networks, EDM2's split (6 seeds, batch 4: 3 + 3)
    # and EDM2's pixel decoding.
    net, _ = edm2.load_snapshot(net_pkl, allow_pickle=True)
    gnet, _ = edm2.load_snapshot(gnet_pkl, allow_pickle=True)
    batches = list(generate(net, gnet, seeds=[0, 1, 2, 3, 4, 1001], batch_size=4, batch_split="even", progress=False,
                            num_steps=4, guidance=2.0))
    assert [b.seeds for b in batches] == [[0, 1, 2], [3, 4, 1001]]
    for b in batches:
        assert b.labels is not None and b.labels.shape == (3, LABELS)
        for seed, image in zip(b.seeds, b.images):
            assert np.array_equal(files[f"{seed:06d}.png"], image.permute(1, 2, 0).numpy()), seed


def test_cli_messages(tmp_path, checkout, capsys, monkeypatch):
    monkeypatch.delenv(edm2.ENV_VAR, raising=False)
    net_pkl, gnet_pkl = _snapshots(checkout, tmp_path)
    cases = [
        (["--net", net_pkl, "--allow-pickle"], "--edm2 PATH"),
        (["--net", net_pkl, "--edm2", checkout], "--allow-pickle"),
        (["--net", net_pkl, "--edm2", tmp_path / "nope", "--allow-pickle"], "--edm2: "),
        (["--net", net_pkl, "--guidance", "2", "--edm2", checkout, "--allow-pickle"], "needs a guiding network"),
        (["--preset", "edm2-img512-s-autog-fid", "--edm2", checkout, "--allow-pickle"], "needs --models DIR"),
        (["--preset", "edm2-img512-s-autog-fid", "--models", tmp_path, "--allow-pickle"],
         "edm2-img512-s-2147483-0.070.pkl, edm2-img512-xs-0134217-0.125.pkl"),
        (["--preset", "no-such"], "unknown preset"),
        (["--models", tmp_path, "--net", net_pkl], "--models is only used with --preset"),
        ([], "pass --net PATH or --preset NAME"),
    ]
    for args, needle in cases:
        assert _cli(*args, "--seeds", "0", "--steps", "2") == 2, args
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (args, err)


def test_preset_fills_in_networks_and_weight(tmp_path, checkout):
    net_pkl, gnet_pkl = _snapshots(checkout, tmp_path)
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(net_pkl, models / "edm2-img512-s-2147483-0.070.pkl")
    shutil.copy(gnet_pkl, models / "edm2-img512-xs-0134217-0.125.pkl")
    common = ["--seeds", "5-7", "--steps", "3", "--edm2", checkout, "--allow-pickle"]
    assert _cli("--preset", "edm2-img512-s-autog-fid", "--models", models, "--outdir", tmp_path / "a", *common) == 0
    assert _cli("--net", net_pkl, "--gnet", gnet_pkl, "--guidance", "2.1", "--outdir", tmp_path / "b", *common) == 0
    assert _cli("--net", net_pkl, "--gnet", gnet_pkl, "--guidance", "1.5", "--outdir", tmp_path / "c", *common) == 0
    a, b, c = _pngs(tmp_path / "a"), _pngs(tmp_path / "b"), _pngs(tmp_path / "c")
    assert sorted(a) == ["000005.png", "000006.png", "000007.png"]
    assert all(np.array_equal(a[k], b[k]) for k in a)  # the preset's weight is 2.1
    assert not all(np.array_equal(a[k], c[k]) for k in a)  # ... and a different weight changes the images
    # A flag overrides the preset, as in the reference.
    assert _cli("--preset", "edm2-img512-s-autog-fid", "--models", models, "--guidance", "1.5",
                "--outdir", tmp_path / "d", *common) == 0
    d = _pngs(tmp_path / "d")
    assert all(np.array_equal(c[k], d[k]) for k in c)


def test_class_and_churn_flags_in_reference_spelling(tmp_path, checkout):
    net_pkl, gnet_pkl = _snapshots(checkout, tmp_path)
    common = ["--net", net_pkl, "--gnet", gnet_pkl, "--guidance", "1.8", "--seeds", "0-2", "--steps", "4",
              "--edm2", checkout, "--allow-pickle"]
    assert _cli(*common, "--class", "2", "--S_churn", "10", "--S_min", "0.1", "--S_max", "30", "--S_noise", "1.003",
                "--sigma_min", "0.003", "--sigma_max", "60", "--outdir", tmp_path / "ref") == 0
    assert _cli(*common, "--class", "2", "--churn", "10", "--s-min", "0.1", "--s-max", "30", "--s-noise", "1.003",
                "--sigma-min", "0.003", "--sigma-max", "60", "--outdir", tmp_path / "ours") == 0
    ref, ours = _pngs(tmp_path / "ref"), _pngs(tmp_path / "ours")
    assert sorted(ref) == sorted(ours) and all(np.array_equal(ref[k], ours[k]) for k in ref)
    net, _ = edm2.load_snapshot(net_pkl, allow_pickle=True)
    gnet, _ = edm2.load_snapshot(gnet_pkl, allow_pickle=True)
    (batch,) = generate(net, gnet, seeds=[0, 1, 2], class_idx=2, batch_split="even", progress=False, num_steps=4,
                        guidance=1.8, S_churn=10, S_min=0.1, S_max=30, S_noise=1.003, sigma_min=0.003, sigma_max=60)
    assert batch.labels.argmax(1).tolist() == [2, 2, 2]
    for seed, image in zip(batch.seeds, batch.images):
        assert np.array_equal(ref[f"{seed:06d}.png"], image.permute(1, 2, 0).numpy())


def test_latent_snapshot_is_decoded_by_its_encoder(tmp_path, checkout):
    net_pkl, gnet_pkl = _snapshots(checkout, tmp_path, latent=True)
    _fake_diffusers(tmp_path)
    out = tmp_path / "out"
    assert _cli("--net", net_pkl, "--gnet", gnet_pkl, "--guidance", "2.0", "--seeds", "0-5", "--batch", "6",
                "--steps", "3", "--outdir", out, "--edm2", checkout, "--allow-pickle") == 0
    files = _pngs(out)
    assert sorted(files) == [f"{s:06d}.png" for s in range(6)]
    assert all(img.shape == (16, 16, 3) for img in files.values())  # decoded pixels, not 4-channel latents
    net, encoder = edm2.load_snapshot(net_pkl, allow_pickle=True)
    gnet, _ = edm2.load_snapshot(gnet_pkl, allow_pickle=True)
    encoder = edm2.prepare_encoder(encoder, "cpu")
    (batch,) = generate(net, gnet, seeds=range(6), batch_size=6, batch_split="even", encoder=encoder, progress=False,
                        num_steps=3, guidance=2.0)
    assert encoder.batch_sizes == [edm2.ENCODER_BATCH_SIZE]  # the reference decodes 4 at a time
    for seed, image in zip(batch.seeds, batch.images):
        assert np.array_equal(files[f"{seed:06d}.png"], image.permute(1, 2, 0).numpy())


def test_latent_snapshot_without_diffusers_or_weights_writes_nothing(tmp_path, checkout, capsys, monkeypatch):
    net_pkl, gnet_pkl = _snapshots(checkout, tmp_path, latent=True)
    # As if diffusers were not installed, whether it is or not (None in sys.modules: not importable).
    monkeypatch.setitem(sys.modules, "diffusers", None)
    out = tmp_path / "out"
    args = ["--net", net_pkl, "--seeds", "0-1", "--steps", "2", "--outdir", out, "--edm2", checkout, "--allow-pickle"]
    assert _cli(*args) == 2
    err = capsys.readouterr().err
    assert "diffusers" in err and 'pip install ".[edm2]"' in err and "Traceback" not in err
    assert not out.exists()
    (tmp_path / "m").mkdir()
    missing_pkl, _ = _snapshots(checkout, tmp_path / "m", latent=True, vae_name="no/such-vae")
    monkeypatch.delitem(sys.modules, "diffusers")
    _fake_diffusers(tmp_path)
    assert _cli("--net", missing_pkl, "--seeds", "0-1", "--steps", "2", "--outdir", out, "--edm2", checkout,
                "--allow-pickle") == 2
    err = capsys.readouterr().err
    assert "cannot load the VAE 'no/such-vae'" in err and "diffusion_pytorch_model.bin" in err
    assert not out.exists()


def test_load_snapshot_errors(tmp_path, checkout):
    with pytest.raises(FileNotFoundError, match="--gnet: snapshot file not found"):
        edm2.load_snapshot(tmp_path / "none.pkl", allow_pickle=True, flag="--gnet")
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x04junk")
    with pytest.raises(edm2.CheckpointError, match="not a readable EDM2 snapshot"):
        edm2.load_snapshot(tmp_path / "junk.pkl", allow_pickle=True)
    with open(tmp_path / "dict.pkl", "wb") as f:
        pickle.dump({"net": 3}, f)
    with pytest.raises(edm2.CheckpointError, match="without an ema network"):
        edm2.load_snapshot(tmp_path / "dict.pkl", allow_pickle=True)
    with pytest.raises(edm2.UnsafeCheckpointError, match="--allow-pickle"):
        edm2.load_snapshot(tmp_path / "dict.pkl")
