"""Network files: our checkpoint format, TorchScript, and refusing files that need full unpickling.

TorchScript: torch 2.13 marks torch.jit.script/trace/load deprecated (DeprecationWarning) but
they work; these tests make archives with both script and trace.
"""

from __future__ import annotations

import pickle
import warnings
from typing import Optional

import pytest
import torch
from torch import nn

from ag_kernels.models.checkpoint import CheckpointError, UnsafeCheckpointError, load_net, save_net
from ag_kernels.models.nets import ARCHS, TinyDenoiser, get_arch, register_arch


class PickledNet(nn.Module):
    """Saved whole with torch.save(module): at top level so that full unpickling can find the class."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.75))

    def forward(self, x, t, labels=None):
        return x * self.scale


class ScriptableNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        return x * self.scale / (1 + t)


def _make_marker(path):
    """What a malicious pickle would run while loading; here it only creates a file."""
    with open(path, "w") as f:
        f.write("unpickling ran code")
    return "pwned"


class Malicious:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_make_marker, (self.marker,))


def _inputs(net, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, net.img_channels, net.img_resolution, net.img_resolution, generator=g)
    labels = torch.nn.functional.one_hot(torch.arange(batch) % max(net.label_dim, 1), max(net.label_dim, 1)).float()
    return x, labels if net.label_dim else None


def _quiet_jit(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return fn(*args)


# --------------------------------------------------------------------------- our format


@pytest.mark.parametrize("kwargs", [
    dict(), dict(label_dim=10, channels=16, seed=3, img_resolution=4, out_dtype="bfloat16")])
def test_roundtrip_identical_outputs(tmp_path, kwargs):
    net = TinyDenoiser(**kwargs).eval()
    path = tmp_path / "net.pt"
    save_net(net, path)
    loaded = load_net(path)
    assert type(loaded) is TinyDenoiser and not loaded.training
    assert loaded.init_kwargs == net.init_kwargs
    x, labels = _inputs(net)
    for sigma in (0.002, torch.tensor(1.3), torch.tensor([0.5, 40.0])):
        assert torch.equal(loaded(x, sigma, labels), net(x, sigma, labels))
    assert not list(tmp_path.glob("*.tmp"))


def test_saved_file_is_plain_data(tmp_path):
    net = TinyDenoiser(seed=5)
    save_net(net, tmp_path / "net.pt")
    obj = torch.load(tmp_path / "net.pt", weights_only=True)
    assert obj["format"] == "ag_kernels.net" and obj["version"] == 1 and obj["arch"] == "tiny_denoiser"
    assert obj["kwargs"] == net.init_kwargs
    assert obj["state_dict"].keys() == net.state_dict().keys()


def test_same_seed_same_weights_different_seed_different():
    a, b, c = TinyDenoiser(seed=1), TinyDenoiser(seed=1), TinyDenoiser(seed=2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.conv_in_w, c.conv_in_w)


def test_save_refuses_unregistered_nets(tmp_path):
    with pytest.raises(TypeError, match="not a registered architecture"):
        save_net(PickledNet(), tmp_path / "x.pt")

    class Sub(TinyDenoiser):  # inherits arch_name, but the file would rebuild the parent class
        pass

    with pytest.raises(TypeError, match="registered"):
        save_net(Sub(), tmp_path / "x.pt")
    net = TinyDenoiser()
    net.init_kwargs = dict(fn=print)
    with pytest.raises(TypeError, match="JSON-like"):
        save_net(net, tmp_path / "x.pt")
    with pytest.raises(TypeError, match="net must be an nn.Module"):
        save_net(lambda x: x, tmp_path / "x.pt")


def test_unknown_arch_refused(tmp_path):
    net = TinyDenoiser()
    torch.save({"format": "ag_kernels.net", "version": 1, "arch": "no_such_arch", "kwargs": {},
                "state_dict": net.state_dict()}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="no_such_arch.*tiny_denoiser"):
        load_net(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="tiny_denoiser"):
        get_arch("no_such_arch")


def test_mismatched_weights_and_newer_version_refused(tmp_path):
    small, big = TinyDenoiser(channels=8), TinyDenoiser(channels=16)
    torch.save({"format": "ag_kernels.net", "version": 1, "arch": "tiny_denoiser", "kwargs": small.init_kwargs,
                "state_dict": big.state_dict()}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="do not match"):
        load_net(tmp_path / "x.pt")
    torch.save({"format": "ag_kernels.net", "version": 99, "arch": "tiny_denoiser", "kwargs": {},
                "state_dict": {}}, tmp_path / "y.pt")
    with pytest.raises(CheckpointError, match="newer"):
        load_net(tmp_path / "y.pt")


def test_bare_state_dict_and_garbage_refused(tmp_path):
    torch.save(TinyDenoiser().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match="bare state_dict"):
        load_net(tmp_path / "sd.pt")
    (tmp_path / "junk.pt").write_text("garbage, not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a network checkpoint") as info:
        load_net(tmp_path / "junk.pt")
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_tiny_denoiser_sigma_forms_and_preconditioning():
    net = TinyDenoiser(label_dim=3, seed=4)
    x, labels = _inputs(net, batch=2)
    as_float = net(x, 1.7, labels)
    assert as_float.dtype == torch.float32 and as_float.shape == x.shape
    assert torch.equal(net(x, torch.tensor(1.7), labels), as_float)
    assert torch.equal(net(x, torch.tensor([1.7, 1.7]), labels), as_float)
    assert torch.equal(net(x, 1.7, torch.tensor([0, 1])), as_float)  # class indices = one-hot rows
    assert torch.equal(net(x.double(), 1.7, labels), as_float)  # computes in its parameters' dtype
    # EDM preconditioning: D -> x as sigma -> 0 (c_skip -> 1, c_out -> 0); the label matters.
    assert (net(x, 1e-4, labels) - x).abs().max() < 1e-3
    assert not torch.equal(net(x, 1.7, None), as_float)
    assert TinyDenoiser(out_dtype="bfloat16")(x, 1.7).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="out_dtype"):
        TinyDenoiser(out_dtype="int8")
    with pytest.raises(ValueError, match="channels"):
        TinyDenoiser(channels=0)
    with pytest.raises(ValueError, match="x must be"):
        net(x[:, :1], 1.0)


def test_registry():
    assert ARCHS["tiny_denoiser"] is TinyDenoiser and TinyDenoiser.arch_name == "tiny_denoiser"
    with pytest.raises(ValueError, match="already registered"):
        register_arch("tiny_denoiser")(PickledNet)
    assert ARCHS["tiny_denoiser"] is TinyDenoiser


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_net(missing)


# --------------------------------------------------------------------------- TorchScript


def test_torchscript_script_loads(tmp_path):
    module = ScriptableNet()
    path = tmp_path / "scripted.pt"
    _quiet_jit(torch.jit.script, module).save(str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # load_net keeps torch.jit's deprecation quiet
        loaded = load_net(path)
    assert not loaded.training
    x, t = torch.randn(2, 3, 4, 4), torch.tensor(2.0)
    assert torch.equal(loaded(x, t, None), module(x, t))


def test_torchscript_trace_of_tiny_denoiser_loads(tmp_path):
    net = TinyDenoiser(label_dim=4, seed=7).eval()
    x, labels = _inputs(net)
    sigma = torch.tensor(2.5)
    path = tmp_path / "traced.pt"
    _quiet_jit(torch.jit.trace, net, (x, sigma, labels)).save(str(path))
    loaded = load_net(path, allow_pickle=False)
    for s in (0.7, 30.0):  # sigma is an input of the trace, not a constant
        s = torch.tensor(s)
        assert torch.allclose(loaded(x, s, labels), net(x, s, labels), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- unsafe files


def test_pickled_module_refused_then_allowed(tmp_path):
    module = PickledNet()
    path = tmp_path / "whole.pt"
    torch.save(module, path)
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle") as info:
        load_net(path)
    assert isinstance(info.value, ValueError)
    assert "arbitrary code" in str(info.value) and "--allow-pickle" in str(info.value)
    loaded = load_net(path, allow_pickle=True)
    assert isinstance(loaded, PickledNet) and not loaded.training
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(loaded(x, torch.tensor(1.0)), module(x, torch.tensor(1.0)))


def test_our_format_loads_the_same_with_allow_pickle(tmp_path):
    net = TinyDenoiser(seed=9)
    save_net(net, tmp_path / "net.pt")
    assert isinstance(load_net(tmp_path / "net.pt", allow_pickle=True), TinyDenoiser)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_refused_without_running_it(tmp_path, writer):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": Malicious(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(UnsafeCheckpointError, match="allow_pickle"):
        load_net(path)
    assert not marker.exists()
    # The file is really dangerous: full unpickling (only with allow_pickle) runs the payload,
    # and the result, not a network, is still refused.
    with pytest.raises(CheckpointError, match="not a torch.nn.Module"):
        load_net(path, allow_pickle=True)
    assert marker.exists()


def test_allow_pickle_must_be_a_bool(tmp_path):
    save_net(TinyDenoiser(), tmp_path / "net.pt")
    with pytest.raises(TypeError, match="allow_pickle"):
        load_net(tmp_path / "net.pt", allow_pickle="yes")
