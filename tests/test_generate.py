"""SeedNoise, parse_seeds and generate: per-seed reproducible sampling, PNG output, sharding over processes."""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from _util import rel_err
from ag_kernels import edm_sampler
from ag_kernels.sampling.generation import GeneratedBatch, generate
from ag_kernels.sampling.seeds import SeedNoise, parse_seeds

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)

# Few steps keep the tests fast; churn on every step (gamma = sqrt(2) - 1) and guidance != 1 so
# that the churn noise source and the guiding network are exercised.
SAMPLER_KW = dict(num_steps=4, guidance=1.7, S_churn=20)


class TinyNet(torch.nn.Module):
    """An EDM-style denoiser on 3x8x8 images: per sample, deterministic, float32, with random weights.

    The channel mix is written out elementwise (no matmul): each output element then takes the
    same arithmetic in any batch size and thread count, which the bitwise comparisons across
    processes rely on.  ``labels @ emb`` with one-hot labels is exact (sums of exact products).
    """

    def __init__(self, seed: int, label_dim: int = 4, scale: float = 1.0):
        super().__init__()
        self.img_channels, self.img_resolution, self.label_dim = 3, 8, label_dim
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.nn.Parameter(scale * torch.randn(3, 3, generator=g), requires_grad=False)
        self.bias = torch.nn.Parameter(0.3 * torch.randn(3, 8, 8, generator=g), requires_grad=False)
        self.emb = torch.nn.Parameter(torch.randn(max(label_dim, 1), 3, generator=g), requires_grad=False)

    def forward(self, x, t, labels):
        assert isinstance(t, torch.Tensor) and t.dim() == 0, "the sampler passes t as a 0-d tensor"
        assert (labels is None) == (self.label_dim == 0)
        c_in, c_skip, c_out = (t ** 2 + 1).rsqrt(), 1 / (t ** 2 + 1), t * (t ** 2 + 1).rsqrt()
        h = c_in * x
        mixed = torch.stack([self.mix[o, 0] * h[:, 0] + self.mix[o, 1] * h[:, 1] + self.mix[o, 2] * h[:, 2]
                             for o in range(3)], dim=1)
        f = mixed + self.bias + 0.25 * t.log()
        if labels is not None:
            assert labels.shape == (x.shape[0], self.label_dim) and labels.dtype == torch.float32
            f = f + (labels @ self.emb)[:, :, None, None]
        return c_skip * x + c_out * torch.tanh(f)


def nets(wseed: int, label_dim: int = 4):
    """(net, gnet): the main network and a worse guiding one."""
    return TinyNet(wseed, label_dim), TinyNet(wseed + 1, label_dim, scale=0.5)


def random_seeds(gen, n, high=2 ** 40):
    """n distinct random seeds below ``high``."""
    out = []
    while len(out) < n:
        s = int(torch.randint(high, (), generator=gen))
        if s not in out:
            out.append(s)
    return out


def by_seed(batches):
    """{seed: (sample, labels row or None)} over all batches, checking each seed comes once."""
    out = {}
    for b in batches:
        assert isinstance(b, GeneratedBatch)
        for k, s in enumerate(b.seeds):
            assert s not in out
            out[s] = (b.samples[k], None if b.labels is None else b.labels[k])
    return out


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    # A WORLD_SIZE left in the environment would make generate try to join a process group.
    monkeypatch.delenv("WORLD_SIZE", raising=False)


# ---------------------------------------------------------------------------------------------
# SeedNoise


def test_seednoise_rows_independent_of_batch(gen):
    seeds = random_seeds(gen, 5)
    shape = (3, 4, 5)

    def draws(rng):
        # A class, then noise, then two churn draws: the order generate uses.
        x = torch.empty((len(rng),) + shape, dtype=torch.float64)
        return rng.randint(10), rng.randn(shape), rng.randn_like(x), rng.randn_like(x.float())

    alone = {s: draws(SeedNoise([s])) for s in seeds}
    for s in seeds:  # row k is generator k's stream, seeded with seed k
        g = torch.Generator().manual_seed(s)
        torch.randint(10, (1,), generator=g)
        assert torch.equal(alone[s][1][0], torch.randn(shape, generator=g))
    perm = torch.randperm(5, generator=gen).tolist()
    batch = [seeds[i] for i in perm]
    together = draws(SeedNoise(batch))
    for k, s in enumerate(batch):
        for a, b in zip(alone[s], together):
            assert torch.equal(a[0], b[k]), f"seed {s} at position {k} of 5"
    noise = together[1]
    for i in range(5):
        for j in range(i):
            assert not torch.equal(noise[i], noise[j])


def test_seednoise_same_seed_twice_in_a_batch(gen):
    s = random_seeds(gen, 1)[0]
    noise = SeedNoise([s, s]).randn((6,))
    assert torch.equal(noise[0], noise[1])


def test_seednoise_randn_like_and_randint(gen):
    seeds = random_seeds(gen, 3)
    rng = SeedNoise(seeds, device=torch.device("cpu"))
    for dtype in (torch.float32, torch.float64, torch.float16):
        x = torch.zeros(3, 2, 7, dtype=dtype)
        y = rng.randn_like(x)
        assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
        assert y.float().std() > 0.3
    r = SeedNoise(list(range(300))).randint(4)
    assert r.dtype == torch.int64 and r.shape == (300,)
    assert set(r.tolist()) == {0, 1, 2, 3}  # 300 draws miss a value with probability ~1e-37
    assert SeedNoise(seeds).randn(()).shape == (3,)


def test_seednoise_errors():
    with pytest.raises(ValueError, match="seeds"):
        SeedNoise([])
    with pytest.raises(ValueError, match=r"seeds\[1\]"):
        SeedNoise([3, -1])
    with pytest.raises(ValueError, match="seeds"):
        SeedNoise([2 ** 63])
    SeedNoise([2 ** 63 - 1])
    for bad in ([1.5], [True], "0-3", 7, [None]):
        with pytest.raises(TypeError, match="seeds"):
            SeedNoise(bad)
    with pytest.raises(TypeError, match="device"):
        SeedNoise([1], device=0.5)
    rng = SeedNoise([1, 2])
    with pytest.raises(ValueError, match="x"):
        rng.randn_like(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="x"):
        rng.randn_like(torch.zeros(()))
    with pytest.raises(TypeError, match="x"):
        rng.randn_like([0.0, 0.0])
    with pytest.raises(TypeError, match="x"):
        rng.randn_like(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="high"):
        rng.randint(0)
    with pytest.raises(TypeError, match="high"):
        rng.randint(2.0)
    with pytest.raises(TypeError, match="shape"):
        rng.randn("abc")
    with pytest.raises(ValueError, match="shape"):
        rng.randn((2, -1))
    with pytest.raises(TypeError, match="dtype"):
        rng.randn((2,), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# parse_seeds


@pytest.mark.parametrize("text, expected", [
    ("0-3", [0, 1, 2, 3]),
    ("1,5,9", [1, 5, 9]),
    ("0-3,10-12", [0, 1, 2, 3, 10, 11, 12]),
    (" 7 ", [7]),
    ("5-5", [5]),
    ("3, 1 - 3", [3, 1, 2, 3]),
    ("999998-1000001", [999998, 999999, 1000000, 1000001]),
])
def test_parse_seeds(text, expected):
    assert parse_seeds(text) == expected


@pytest.mark.parametrize("text", ["", "  ", "-1", "3-1", "abc", "1,,2", "1,", "1-2-3", "1.5", "0x10", "1-", "-",
                                  str(2 ** 63), "٣"])
def test_parse_seeds_errors(text):
    with pytest.raises(ValueError, match="seeds"):
        parse_seeds(text)


def test_parse_seeds_type_error():
    with pytest.raises(TypeError, match="seeds"):
        parse_seeds([1, 2])


# ---------------------------------------------------------------------------------------------
# generate


def test_generate_independent_of_batch_size(gen):
    wseed = int(torch.randint(2 ** 31, (), generator=gen))
    net, gnet = nets(wseed)
    seeds = random_seeds(gen, 7)
    runs = {}
    for bs in (1, 3, 7):
        batches = list(generate(net, gnet, seeds, batch_size=bs, progress=False, **SAMPLER_KW))
        assert [b.seeds for b in batches] == [seeds[i:i + bs] for i in range(0, 7, bs)]
        for b in batches:
            assert b.samples.shape == (len(b.seeds), 3, 8, 8) and b.samples.dtype == torch.float32
            assert b.images.shape == b.samples.shape and b.images.dtype == torch.uint8
            assert b.paths == []
        runs[bs] = by_seed(batches)
    for s in seeds:
        ref, ref_label = runs[7][s]
        assert torch.isfinite(ref).all()
        for bs in (1, 3):
            # Per seed, the noise, class and churn noise are identical in any batch; a network may
            # still round differently for another batch size (other kernels), so the samples
            # are compared to a few float32 ulps rather than bitwise.
            assert rel_err(runs[bs][s][0], ref) <= 1e-6, (s, bs)
            assert torch.equal(runs[bs][s][1], ref_label)
    samples = torch.stack([runs[7][s][0] for s in seeds])
    assert (samples[1:] - samples[:1]).abs().amax() > 1e-2  # different seeds, different samples


def test_generate_follows_the_documented_recipe(gen):
    # Per batch: SeedNoise(seeds) draws the noise, then the classes; churn uses its randn_like.
    wseed = int(torch.randint(2 ** 31, (), generator=gen))
    net, gnet = nets(wseed)
    seeds = random_seeds(gen, 4)
    for class_idx in (None, 2):
        (batch,) = generate(net, gnet, seeds, batch_size=4, class_idx=class_idx, progress=False, **SAMPLER_KW)
        rng = SeedNoise([s % 2 ** 32 for s in seeds])  # EDM2's seeding
        noise = rng.randn((3, 8, 8))
        classes = rng.randint(4)
        if class_idx is not None:
            classes[:] = class_idx
        labels = torch.nn.functional.one_hot(classes, 4).float()
        expected = edm_sampler(net, noise, labels, gnet, randn_like=rng.randn_like, **SAMPLER_KW)
        assert torch.equal(batch.labels, labels) and batch.labels.dtype == torch.float32
        assert torch.equal(batch.samples, expected)
        assert torch.equal(batch.images, (expected * 127.5 + 128).clip(0, 255).to(torch.uint8))


def test_generate_seeds_generators_mod_2_32_as_edm2(tmp_path, monkeypatch):
    # EDM2's generate_images seeds each generator with seed % 2**32; on CUDA a 64-bit seed would
    # give another stream (on the CPU torch uses the low 32 bits anyway).  File names keep the seed.
    import ag_kernels.sampling.generation as generation

    seen = []

    class Recording(SeedNoise):
        def __init__(self, seeds, device="cpu"):
            seen.extend(seeds)
            super().__init__(seeds, device)

    monkeypatch.setattr(generation, "SeedNoise", Recording)
    net, gnet = nets(3)
    seeds = [2 ** 32 + 5, 7, 2 ** 40 + 3]
    (batch,) = generate(net, gnet, seeds, batch_size=3, outdir=tmp_path, subdirs=False, progress=False, num_steps=2)
    assert seen == [5, 7, 3] and batch.seeds == seeds
    assert batch.paths[0] == str(tmp_path / "4294967301.png")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA generators use all 64 bits of a seed")
def test_generate_seed_above_2_32_on_cuda_is_edm2s():
    net, gnet = (n.cuda() for n in nets(3))
    kw = dict(batch_size=1, progress=False, num_steps=3, S_churn=10, device="cuda")
    (big,) = generate(net, gnet, [2 ** 32 + 5], **kw)
    (small,) = generate(net, gnet, [5], **kw)
    assert torch.equal(big.samples, small.samples)


def test_generate_labels_per_seed_and_class_idx(gen):
    wseed = int(torch.randint(2 ** 31, (), generator=gen))
    net, gnet = nets(wseed)
    seeds = random_seeds(gen, 12)
    kw = dict(progress=False, num_steps=3, guidance=2.0)
    drawn = by_seed(generate(net, gnet, seeds, batch_size=5, **kw))
    again = by_seed(generate(net, gnet, seeds[::-1], batch_size=4, **kw))
    classes = {s: int(drawn[s][1].argmax()) for s in seeds}
    for s in seeds:
        assert drawn[s][1].sum() == 1 and torch.equal(again[s][1], drawn[s][1])
    assert len(set(classes.values())) > 1  # 12 seeds all in one of 4 classes: probability 4**-11
    fixed = by_seed(generate(net, gnet, seeds, batch_size=5, class_idx=1, **kw))
    for s in seeds:
        assert torch.equal(fixed[s][1], torch.tensor([0.0, 1.0, 0.0, 0.0]))
        # The class draw happens under class_idx too, so a seed's noise is the same: the sample
        # changes exactly where the class does.
        same = rel_err(fixed[s][0], drawn[s][0]) <= 1e-6
        assert same == (classes[s] == 1), (s, classes[s])


def test_generate_unlabelled_net_and_seed_text(gen):
    wseed = int(torch.randint(2 ** 31, (), generator=gen))
    net, gnet = nets(wseed, label_dim=0)
    batches = list(generate(net, gnet, "3-5,9", batch_size=3, progress=False, num_steps=2, guidance=1.5))
    assert [b.seeds for b in batches] == [[3, 4, 5], [9]]
    assert all(b.labels is None for b in batches)
    with pytest.raises(ValueError, match="class_idx"):
        next(generate(net, gnet, [1], class_idx=0, progress=False))


def test_generate_explicit_randn_like_replaces_seed_churn(gen):
    wseed = int(torch.randint(2 ** 31, (), generator=gen))
    net, gnet = nets(wseed)
    seeds = random_seeds(gen, 3)
    kw = dict(progress=False, num_steps=3, S_churn=10)
    zero_noise = by_seed(generate(net, gnet, seeds, randn_like=torch.zeros_like, **kw))
    no_scale = by_seed(generate(net, gnet, seeds, S_noise=0, **kw))
    seeded = by_seed(generate(net, gnet, seeds, **kw))
    for s in seeds:
        assert torch.equal(zero_noise[s][0], no_scale[s][0])
        assert not torch.equal(zero_noise[s][0], seeded[s][0])


def test_generate_pngs(tmp_path, gen):
    wseed = int(torch.randint(2 ** 31, (), generator=gen))
    net, gnet = nets(wseed)
    seeds = [1234, 5] + random_seeds(gen, 2, high=3000)
    outdir = tmp_path / "out"
    batches = list(generate(net, gnet, seeds, batch_size=3, outdir=outdir, progress=False, **SAMPLER_KW))
    assert batches[0].paths[:2] == [str(outdir / "001000" / "001234.png"), str(outdir / "000000" / "000005.png")]
    for b in batches:
        assert b.paths == [str(outdir / f"{s // 1000 * 1000:06d}" / f"{s:06d}.png") for s in b.seeds]
        for k, path in enumerate(b.paths):
            with Image.open(path) as img:
                assert img.format == "PNG" and img.mode == "RGB" and img.size == (8, 8)
                assert np.array_equal(np.asarray(img), b.images[k].permute(1, 2, 0).numpy())
    assert len(list(outdir.rglob("*.png"))) == len(seeds)
    assert len({tuple(np.asarray(Image.open(p)).ravel()) for b in batches for p in b.paths}) == len(seeds)


class GrayDecoder:
    """A stand-in for an autoencoder: [B, 3, 8, 8] -> grayscale uint8 [B, 1, 16, 16] (or other channels)."""

    def __init__(self, channels=1, dtype=torch.uint8):
        self.channels, self.dtype, self.calls = channels, dtype, 0

    def decode(self, x):
        self.calls += 1
        y = x.mean(1, keepdim=True).repeat_interleave(2, 2).repeat_interleave(2, 3).repeat(1, self.channels, 1, 1)
        return (y * 100 + 128).clip(0, 255).to(self.dtype)


def test_generate_encoder(tmp_path, gen):
    wseed = int(torch.randint(2 ** 31, (), generator=gen))
    net, gnet = nets(wseed)
    seeds = random_seeds(gen, 3, high=2000)
    enc = GrayDecoder()
    batches = list(generate(net, gnet, seeds, batch_size=2, encoder=enc, outdir=tmp_path, progress=False,
                            num_steps=3, guidance=2.0))
    assert enc.calls == 2
    for b in batches:
        assert torch.equal(b.images, GrayDecoder().decode(b.samples)) and b.images.shape[1:] == (1, 16, 16)
        for k, path in enumerate(b.paths):
            with Image.open(path) as img:
                assert img.mode == "L" and img.size == (16, 16)
                assert np.array_equal(np.asarray(img), b.images[k, 0].numpy())
    # A plain callable is used as the decoder too.
    (b,) = generate(net, gnet, seeds[:1], encoder=lambda x: GrayDecoder(3).decode(x), progress=False, num_steps=2)
    assert b.images.shape == (1, 3, 16, 16)
    with pytest.raises(TypeError, match="encoder"):
        next(generate(net, gnet, [1], encoder=GrayDecoder(dtype=torch.float32), progress=False, num_steps=2))
    with pytest.raises(ValueError, match="outdir"):
        next(generate(net, gnet, [1], encoder=GrayDecoder(2), outdir=tmp_path, progress=False, num_steps=2))
    with pytest.raises(TypeError, match="encoder"):
        next(generate(net, gnet, [1], encoder=42, progress=False))


def test_generate_vector_samples(tmp_path, gen):
    # A network without parameters or image attributes: noise_shape must be given, device is the CPU.
    scale = 0.5 + torch.rand((), generator=gen).item()

    def shrink(x, t, labels):
        return x * scale / (1 + t ** 2)

    with pytest.raises(ValueError, match="noise_shape"):
        next(generate(shrink, seeds=[1], progress=False))
    (b,) = generate(shrink, seeds=[1, 2], noise_shape=(5,), progress=False, num_steps=3)
    assert b.samples.shape == (2, 5) and b.images is None and b.labels is None and b.paths == []
    with pytest.raises(ValueError, match="outdir"):
        next(generate(shrink, seeds=[1], noise_shape=(5,), outdir=tmp_path, progress=False, num_steps=2))


def test_generate_progress_bar(capsys):
    net, gnet = nets(0)
    assert len(list(generate(net, gnet, range(4), batch_size=2, progress=True, num_steps=2))) == 2
    assert "generate" in capsys.readouterr().err
    list(generate(net, gnet, range(4), batch_size=2, progress=False, num_steps=2))
    assert "generate" not in capsys.readouterr().err


def test_generate_errors():
    net, gnet = nets(0)

    def run(**kw):
        args = dict(net=net, gnet=gnet, seeds=[1, 2], progress=False, num_steps=2)
        args.update(kw)
        return next(generate(**args))

    for bad, err in ((0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError), ("4", TypeError)):
        with pytest.raises(err, match="batch_size"):
            run(batch_size=bad)
    for bad, err in (([], ValueError), ([-1], ValueError), ("", ValueError), ("9-2", ValueError),
                     ([0.5], TypeError), (None, TypeError)):
        with pytest.raises(err, match="seeds"):
            run(seeds=bad)
    for bad, err in ((4, ValueError), (-1, ValueError), ("1", TypeError), (1.0, TypeError)):
        with pytest.raises(err, match="class_idx"):
            run(class_idx=bad)
    with pytest.raises(TypeError, match="noise"):
        run(noise=torch.zeros(2, 3, 8, 8))
    with pytest.raises(TypeError, match="labels"):
        run(labels=None)
    with pytest.raises(ValueError, match="noise_shape"):
        run(noise_shape=(3, -8, 8))
    with pytest.raises(TypeError, match="device"):
        run(device=1.5)
    with pytest.raises(TypeError, match="outdir"):
        run(outdir=3)
    with pytest.raises(TypeError, match="progress"):
        run(progress="yes")
    with pytest.raises(ValueError, match="gnet"):  # sampler arguments are checked by the sampler
        run(gnet=None, guidance=2.0)


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun, Gloo on the CPU)

WORKER = textwrap.dedent("""
    import sys

    import torch
    import torch.distributed as dist

    from ag_kernels.sampling.generation import _distributed, generate
    from test_generate import SAMPLER_KW, nets

    out, wseed, seeds = sys.argv[1], int(sys.argv[2]), [int(s) for s in sys.argv[3].split(",")]
    net, gnet = nets(wseed)
    assert not dist.is_initialized()
    results = {}
    for b in generate(net, gnet, seeds, batch_size=3, progress=True, **SAMPLER_KW):
        for k, s in enumerate(b.seeds):
            results[s] = (b.samples[k].clone(), b.labels[k].clone())
    # generate made the group (Gloo: CPU tensors); a second call must join it, not make another.
    assert dist.is_initialized() and dist.get_backend() == "gloo"
    assert _distributed(torch.device("cpu")) == (dist.get_rank(), dist.get_world_size())
    again = {s: b.samples[k] for b in generate(net, gnet, seeds, batch_size=3, progress=False, **SAMPLER_KW)
             for k, s in enumerate(b.seeds)}
    assert again.keys() == results.keys() and all(torch.equal(again[s], results[s][0]) for s in again)
    torch.save({"world": dist.get_world_size(), "results": results}, f"{out}/rank{dist.get_rank()}.pt")
""")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_generate_two_processes_match_one(tmp_path, gen):
    dist = torch.distributed
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the Gloo backend is not available in this torch build")
    wseed = int(torch.randint(2 ** 31, (), generator=gen))
    seeds = random_seeds(gen, 10)  # batches of 3: rank 0 runs batches 0 and 2, rank 1 batches 1 and 3
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([REPO, TESTS] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(script), str(tmp_path), str(wseed), ",".join(map(str, seeds))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    net, gnet = nets(wseed)
    single = by_seed(generate(net, gnet, seeds, batch_size=3, progress=False, **SAMPLER_KW))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    batches = [seeds[i:i + 3] for i in range(0, 10, 3)]
    for r in range(2):
        assert sorted(ranks[r]["results"]) == sorted(s for b in batches[r::2] for s in b)
    union = {}
    for r in ranks:
        for s, v in r["results"].items():
            assert s not in union, f"seed {s} generated by two ranks"
            union[s] = v
    assert sorted(union) == sorted(seeds)
    for s in seeds:
        assert torch.equal(union[s][0], single[s][0]), f"seed {s}"
        assert torch.equal(union[s][1], single[s][1])
