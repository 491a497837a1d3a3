"""UniPC (solver="unipc": UniPC-2, the "bh2" predictor with the UniC corrector, Zhao et al. 2023).

* diffusers' ``UniPCMultistepScheduler`` (predict_x0=True, solver_type="bh2", prediction_type="sample",
  lower_order_final, final sigma 0), driven with our sigmas on the same guided denoiser: our
  float64 transcription (``torch_unipc_sampler``, orders 1 to 3) and the engine (every backend,
  float64 and float32), the whole trajectory (every network input, then the result);
* the engine's per-step coefficients (``_plan``) against the transcription's linear solves;
* the fused op with a corrector (``multistep_step(corrector=, corrected=)``) on every backend
  against the torch reference and a float64 oracle: odd sizes, every dtype, per-sample guidance,
  non-contiguous inputs, poisoned outputs, in place (corrected = x), the kernel op itself, errors;
* the CLI's ``--solver unipc``.

The sampler-level checks shared with the other multistep solvers (interval, callable and
per-sample weights, CFG batched, churn refused, emulated graph replay, one evaluation per
schedule point) are in test_solvers.py, parametrized over "unipc".
"""

import math

import pytest
import torch

import ag_kernels
from ag_kernels import edm_sampler, karras_schedule, torch_unipc_sampler
from _util import BACKENDS, D_DTYPES, TOL, X_DTYPES, make_inputs, poison, rel_err, require
from test_solvers import Net

CPU_BACKENDS = ag_kernels.available_backends("cpu")


class Recording:
    """The guided denoiser D_w of (net, gnet) at weight w, recording every input x (in EDM's scaling)."""

    def __init__(self, net, gnet, w):
        self.net, self.gnet, self.w, self.xs = net, gnet, w, []

    def __call__(self, x, t, labels=None):
        self.xs.append(x.detach().clone())
        return self.gnet(x, t, labels).to(x.dtype).lerp(self.net(x, t, labels).to(x.dtype), self.w)


def diffusers_unipc(denoiser, noise, sigmas, *, order=2, dtype=torch.float64):
    """diffusers' UniPC on an EDM denoiser at our sigmas (t_N = 0): its result, in EDM's scaling.

    The scheduler works in variance-preserving scaling, x_vp = x / sqrt(1 + sigma^2) (alpha =
    1/sqrt(1 + sigma^2), sigma_vp = sigma alpha; lambda = -log sigma is the same), and takes the
    denoised sample D(x, sigma) as its model output (prediction_type="sample").  Its sigmas are
    replaced by ours after set_timesteps: the timesteps only index the steps.
    """
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(solver_order=order, prediction_type="sample", predict_x0=True,
                                    solver_type="bh2", lower_order_final=True, final_sigmas_type="zero")
    n = len(sigmas) - 1
    sched.set_timesteps(n)
    sched.sigmas = torch.tensor(sigmas, dtype=dtype)
    sched.set_begin_index(0)
    alpha = [1 / math.sqrt(1 + s * s) for s in sigmas]
    x = noise.to(dtype) * (sigmas[0] * alpha[0])
    for k, step in enumerate(sched.timesteps):
        D = denoiser(x / alpha[k], torch.tensor(sigmas[k], dtype=dtype))
        x = sched.step(D, step, x).prev_sample
    return x


def _nets():
    return Net(0), Net(1)


def _noise(batch=5, seed=3, dtype=torch.float64):
    return torch.randn(batch, 2, 3, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _trajectory_err(a, b):
    """max over the network inputs (and the result) of max|a_i - b_i| / max|b_i|."""
    assert len(a) == len(b)
    return max((u.double() - v.double()).abs().max().item() / v.double().abs().max().item() for u, v in zip(a, b))


def _karras(n, dtype=torch.float64):
    return karras_schedule(n, 0.002, 80.0, 7.0, dtype=dtype).tolist()


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("num_steps", [1, 2, 3, 5, 10, 16])
def test_transcription_equals_diffusers(order, num_steps):
    """float64: the transcription and diffusers evaluate the same formulas; only the order of
    operations differs, so every network input agrees to ~1e-15 (asserted 1e-12)."""
    net, gnet = _nets()
    noise, sigmas = _noise(), _karras(num_steps)
    ours, theirs = Recording(net, gnet, 2.5), Recording(net, gnet, 2.5)
    x = torch_unipc_sampler(ours, noise, num_steps=num_steps, dtype=torch.float64, order=order)
    y = diffusers_unipc(theirs, noise, sigmas, order=order)
    assert _trajectory_err(ours.xs + [x], theirs.xs + [y]) < 1e-12


def test_transcription_takes_sigmas_and_differs_from_2m():
    """An explicit schedule (log-SNR uniform, not Karras) against diffusers; and the corrector matters."""
    net, gnet = _nets()
    noise = _noise()
    sigmas = [math.exp(v) for v in torch.linspace(math.log(80), math.log(0.01), 9, dtype=torch.float64).tolist()]
    sigmas.append(0.0)
    ours, theirs = Recording(net, gnet, 3.0), Recording(net, gnet, 3.0)
    x = torch_unipc_sampler(ours, noise, dtype=torch.float64, sigmas=sigmas)
    y = diffusers_unipc(theirs, noise, sigmas)
    assert _trajectory_err(ours.xs + [x], theirs.xs + [y]) < 1e-12
    assert len(ours.xs) == 9  # one evaluation per schedule point
    m = ag_kernels.torch_multistep_sampler(net, noise, None, gnet, num_steps=9, guidance=3.0, dtype=torch.float64)
    u = torch_unipc_sampler(net, noise, None, gnet, num_steps=9, guidance=3.0, dtype=torch.float64)
    assert (u - m).abs().max().item() > 1e-3 * m.abs().max().item()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("num_steps", [1, 2, 3, 6, 12])
def test_engine_equals_diffusers_float64(backend, num_steps):
    """The engine (autoguidance, one fused op per step) against diffusers, float64, every network input: < 1e-12."""
    net, gnet = _nets()
    noise, labels = _noise(), torch.tensor([0, 1, 2, 1, 0])
    seen = []

    def main(x, t, l):
        seen.append(x.clone())
        return net(x, t, l)

    x = edm_sampler(main, noise, labels, gnet, num_steps=num_steps, guidance=2.5, dtype=torch.float64,
                    solver="unipc", backend=backend)
    rec = Recording(lambda x, t, l: net(x, t, labels), lambda x, t, l: gnet(x, t, labels), 2.5)
    y = diffusers_unipc(rec, noise, _karras(num_steps))
    assert _trajectory_err(seen + [x], rec.xs + [y]) < 1e-12


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_engine_float32_against_diffusers(backend):
    """float32: our error against diffusers' float64 run is of the size of diffusers' own float32
    error (its float32 run against its float64 run): within 5x of it, or 2e-6 of the samples' scale."""
    net, gnet = _nets()
    for n in (4, 10, 24):
        noise = _noise(8, seed=n)
        x64 = diffusers_unipc(Recording(net, gnet, 3.0), noise, _karras(n))
        x32d = diffusers_unipc(Recording(net, gnet, 3.0), noise.float(), _karras(n, torch.float32), dtype=torch.float32)
        ours = edm_sampler(Recording(net, gnet, 3.0), noise.float(), num_steps=n, solver="unipc", backend=backend)
        scale = x64.abs().max().item()
        own = (x32d.double() - x64).abs().max().item() / scale
        err = (ours.double() - x64).abs().max().item() / scale
        assert err <= max(5 * own, 2e-6), (n, err, own)


def test_plan_coefficients_equal_the_solves():
    """The engine's collapsed per-step coefficients (a, b; a_c, c) against the transcription's
    R rho = g solves, applied to random 'outputs' D_0..D_{N-1} (float64)."""
    from ag_kernels.sampling._plan import _multistep

    for n in (2, 3, 7):
        t = _karras(n)
        gen = torch.Generator().manual_seed(n)
        Ds = [torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(n)]
        outputs = iter(Ds)
        rec = []

        def model(x, s, labels=None):
            rec.append(x.clone())
            return next(outputs)

        x0 = torch.randn(4, generator=gen, dtype=torch.float64)
        ref = torch_unipc_sampler(model, x0 / t[0], sigmas=t, dtype=torch.float64)
        x_c, x, hist = x0.clone(), x0.clone(), [None, None]
        for i in range(n):
            assert torch.allclose(x, rec[i], rtol=1e-13, atol=1e-13), (n, i)
            ms = _multistep("unipc", t, i)
            prev = [hist[r] for r in ms.read]
            if ms.corrector is not None:
                a_c, c = ms.corrector
                x_c = a_c * x_c + c[0] * Ds[i] + sum(ck * p for ck, p in zip(c[1:], prev))
            x = ms.a * x_c + ms.b[0] * Ds[i] + sum(bk * p for bk, p in zip(ms.b[1:], prev))
            hist[ms.write] = Ds[i]
        torch.testing.assert_close(x, ref, rtol=1e-13, atol=1e-13)


# ----------------------------------------------------------------------------- the fused op

SHAPES = [(1,), (7,), (4099,), (3, 5, 7, 9)]
# (b, c, read, write, slots): UniPC's first corrected step (order-1 corrector, 2M predictor) and a
# later one (order-2 corrector reading both slots, one of them overwritten), and a generic 3-term pair.
STEPS = [((1.3, -0.3), (0.45, 0.45), (1,), 0, 2), ((1.2, -0.25), (0.5, 0.4, -0.05), (1, 0), 0, 2),
         ((0.9, 0.2, -0.1), (0.3,), (0, 1), None, 2)]


def _oracle(x, d_main, d_guide, g, a_c, c, a, b, hist, read):
    f = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    d_main = f(d_main)
    if d_guide is None:
        D, D_terms = d_main, [d_main]
    else:
        gc = f(g).reshape((-1,) + (1,) * (d_main.dim() - 1)) if isinstance(g, torch.Tensor) else g
        D = f(d_guide) + gc * (d_main - f(d_guide))
        D_terms = [D, f(d_guide), gc * (d_main - f(d_guide))]
    prev = [f(hist[r]) for r in read]
    n = len(read) + 1
    b, c = tuple(b) + (0.0,) * (n - len(b)), tuple(c) + (0.0,) * (n - len(c))
    c_terms = [a_c * f(x), c[0] * D] + [ck * p for ck, p in zip(c[1:], prev)]
    x_c = sum(c_terms[1:], c_terms[0])
    b_terms = [a * x_c, b[0] * D] + [bk * p for bk, p in zip(b[1:], prev)]
    x_next = sum(b_terms[1:], b_terms[0])
    D_scale = max(t.abs().max().item() for t in D_terms)
    c_scale = max([t.abs().max().item() for t in c_terms + [x_c]] + [abs(ck) * D_scale for ck in c[:1]])
    # x_next carries x_c's rounding times a, besides its own.
    n_scale = max([t.abs().max().item() for t in b_terms + [x_next]] + [abs(b[0]) * D_scale, abs(a) * c_scale])
    return x_next, x_c, D, n_scale, c_scale, D_scale


def _case(backend, shape, x_dtype, d_dtype, step, guide, per_sample, gen, *, noncontig=False, in_place=False):
    b, c, read, write, slots = step
    x, _, d_main, d_guide = make_inputs(shape, x_dtype, d_dtype, "cpu", gen, 2.0)
    if noncontig:
        x, d_main, d_guide = (torch.stack([t, t], -1)[..., 0] for t in (x, d_main, d_guide))
    g = (1.0 + 2.0 * torch.rand(shape[0], generator=gen, dtype=torch.float64)) if per_sample else 2.3
    if guide == "unguided":
        d_guide = None
    elif guide == "w=1":
        g = 1.0
    hist = poison(torch.empty((slots,) + shape, dtype=x_dtype))
    for r in read:
        hist[r].copy_(torch.randn(shape, generator=gen, dtype=torch.float64))
    before = hist.clone()
    a_c, a = 0.81, 0.37
    expected, x_c, D, n_scale, c_scale, D_scale = _oracle(x, d_main, None if guide == "w=1" else d_guide, g, a_c, c,
                                                          a, b, before, read)
    out = poison(torch.empty(shape, dtype=x_dtype))
    corrected = x if in_place else poison(torch.empty(shape, dtype=x_dtype))
    result = ag_kernels.multistep_step(x, d_main, d_guide, g, hist, a, b, read=read, write=write, out=out,
                                       corrector=(a_c, c), corrected=corrected, backend=backend)
    assert result is out
    tol = TOL[x_dtype]
    assert rel_err(result, expected, n_scale) <= tol, f"{backend} {step} {guide}: x_next"
    assert rel_err(corrected, x_c, c_scale) <= tol, f"{backend} {step} {guide}: x_c"
    for k in range(slots):
        if k == write:
            assert rel_err(hist[k], D, D_scale) <= tol, f"{backend}: history[{k}] (D_w)"
        else:
            assert torch.equal(hist[k].isnan(), before[k].isnan())
            assert torch.equal(hist[k].nan_to_num(), before[k].nan_to_num())
    return out, corrected, hist


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=str)
def test_corrector_op_matches_oracle(backend, shape, x_dtype, gen):
    require(backend, "cpu")
    k = 0
    for d_dtype in D_DTYPES:
        for step in STEPS:
            for guide in ("guided", "unguided", "w=1"):
                _case(backend, shape, x_dtype, d_dtype, step, guide, k % 2 == 1, gen, in_place=k % 3 == 0)
                k += 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrector_op_noncontiguous_and_large(backend, gen):
    require(backend, "cpu")
    for step in STEPS:
        for in_place in (False, True):
            _case(backend, (3, 5, 7), torch.float32, torch.float16, step, "guided", True, gen, noncontig=True,
                  in_place=in_place)
    _case(backend, (5, 3, 40_009), torch.float32, torch.bfloat16, STEPS[1], "guided", True, gen, in_place=True)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("cfg", [False, True], ids=["two_outputs", "cfg"])
def test_kernels_equal_reference(backend, cfg, gen):
    """The ext and Triton kernels against the torch reference: an ulp or two (torch.lerp may fuse),
    through the public op and through the kernel op as the sampler's fast path calls it; also with
    CFG's third output (d_uncond, a per-sample cfg_scale)."""
    require(backend, "cpu")
    from ag_kernels.kernels._launch import _kernel_op

    x, _, d_main, d_guide = make_inputs((4, 257), torch.float32, torch.float16, "cpu", gen, 5.0)
    hist = torch.randn((2, 4, 257), generator=gen)
    three = {"d_uncond": (d_main.float() + 0.5 * torch.randn((4, 257), generator=gen)).half(),
             "cfg_scale": torch.tensor([1.5, 4.0, 7.5, 1.0])} if cfg else {}
    results = {}
    for be in ("torch", backend):
        xb, hb, out = x.clone(), hist.clone(), torch.empty_like(x)
        ag_kernels.multistep_step(xb, d_main, d_guide, 2.0, hb, 0.5, (1.2, -0.3), read=(0, 1), write=1, out=out,
                                  corrector=(0.8, (0.4, 0.3, -0.1)), corrected=xb, backend=be, **three)
        results[be] = (out, xb, hb)
    for mine, ref in zip(results[backend], results["torch"]):
        torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-6)
    xb, hb, out = x.clone(), hist.clone(), poison(torch.empty_like(x))
    kernel_cfg = {"d_uncond": three["d_uncond"], "c_vec": three["cfg_scale"]} if cfg else {}
    _kernel_op(backend, "multistep_step")(out, hb, xb, d_main, d_guide, None, 2.0, 0.5, 1.2, -0.3, 0.0, 0, 1, 1,
                                          xb, 0.8, 0.4, 0.3, -0.1, **kernel_cfg)
    for mine, ref in zip((out, xb, hb), results["torch"]):
        torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-6)


def test_corrector_gradcheck(gen):
    """With autograd, the corrector step is differentiated (through the reference, on every backend)."""
    from torch.autograd import gradcheck

    def t(*shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_()

    x, dm, dg, h = t(3, 5), t(3, 5), t(3, 5), t(2, 3, 5)
    for backend in CPU_BACKENDS:
        def fn(x, dm, dg, h):
            hist, xc = h.clone(), torch.empty(3, 5, dtype=torch.float64)
            x_next = ag_kernels.multistep_step(x, dm, dg, 1.7, hist, 0.6, (1.3, -0.2), read=(0, 1), write=1,
                                               corrector=(0.7, (0.3, 0.2, 0.1)), corrected=xc, backend=backend)
            return x_next, xc, hist

        assert gradcheck(fn, (x, dm, dg, h))


@pytest.mark.parametrize("case, exc, match", [
    (dict(corrector=(1.0, (0.5,))), ValueError, "corrected is None"),
    (dict(corrected="x_shared"), ValueError, "corrected is given but corrector is None"),
    (dict(corrector=(1.0,), corrected="new"), TypeError, "corrector must be a pair"),
    (dict(corrector=(float("inf"), (0.5,)), corrected="new"), ValueError, r"corrector\[0\] must be finite"),
    (dict(corrector=(1.0, (0.5, 0.1, 0.2, 0.3)), corrected="new"), TypeError, r"corrector\[1\] must be"),
    (dict(corrector=(1.0, (0.5, 0.1, 0.2)), corrected="new"), ValueError, r"read must name max\(len\(b\)"),
    (dict(corrector=(1.0, (0.5,)), corrected="hist"), ValueError, "corrected shares memory with history"),
    (dict(corrector=(1.0, (0.5,)), corrected="out"), ValueError, "corrected shares memory with out"),
    (dict(corrector=(1.0, (0.5,)), corrected="x_shifted"), ValueError, "corrected shares memory with x"),
    (dict(corrector=(1.0, (0.5,)), corrected="f64"), TypeError, "corrected must have dtype"),
    (dict(corrector=(1.0, (0.5,)), corrected="shape"), ValueError, "corrected"),
])
def test_corrector_errors_name_the_argument(case, exc, match):
    base = torch.zeros(4, 4)
    x, hist, out = base[:3], torch.zeros(2, 3, 4), torch.zeros(3, 4)
    tensors = {"new": torch.zeros(3, 4), "x_shared": x, "hist": hist[0], "out": out, "x_shifted": base[1:],
               "f64": torch.zeros(3, 4, dtype=torch.float64), "shape": torch.zeros(4, 3)}
    if "corrected" in case:
        case["corrected"] = tensors[case["corrected"]]
    with pytest.raises(exc, match=match):
        ag_kernels.multistep_step(x, torch.zeros(3, 4), None, 1.0, hist, 1.0, (1.0, 0.5), read=(0,), write=1, out=out,
                                  backend="torch", **case)


def test_existing_multistep_op_unchanged(gen):
    """Without a corrector the op is the 2M/3M update it was: bitwise the reference formula."""
    x, _, d_main, d_guide = make_inputs((3, 65), torch.float32, torch.float16, "cpu", gen, 1.0)
    hist = torch.randn((2, 3, 65), generator=gen)
    for backend in CPU_BACKENDS:
        h = hist.clone()
        y = ag_kernels.multistep_step(x, d_main, d_guide, 2.0, h, 0.5, (1.2, -0.3, 0.1), read=(0, 1), write=1,
                                      backend=backend)
        D = d_guide.float().lerp(d_main.float(), 2.0)
        expected = ((0.5 * x + 1.2 * D) + -0.3 * hist[0]) + 0.1 * hist[1]
        torch.testing.assert_close(y, expected, rtol=2e-7, atol=2e-7)


# ----------------------------------------------------------------------------- sampler, CLI


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_sample_autoguidance_matches_transcription(backend):
    """Per-sample guidance weights, float64, against the transcription of the guided model."""
    net, gnet = _nets()
    noise = _noise()
    w = torch.tensor([1.0, 2.0, 2.5, 3.0, 4.0], dtype=torch.float64)
    ours = edm_sampler(net, noise, None, gnet, num_steps=10, guidance=w, dtype=torch.float64, solver="unipc",
                       backend=backend)
    wc = w.reshape(-1, 1, 1)
    expected = torch_unipc_sampler(lambda x, t, l: gnet(x, t) + wc * (net(x, t) - gnet(x, t)), noise, num_steps=10,
                                   dtype=torch.float64)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_cli_solver_unipc(tmp_path):
    """``generate --solver unipc`` writes what generate(solver="unipc") gives; --churn is refused with it."""
    import numpy as np
    from PIL import Image

    from ag_kernels.commands.main import main as cli
    from ag_kernels.models.checkpoint import save_net
    from ag_kernels.models.nets import TinyDenoiser
    from ag_kernels.sampling.generation import generate

    net = TinyDenoiser(img_channels=3, img_resolution=8, label_dim=0, channels=8, seed=1)
    gnet = TinyDenoiser(img_channels=3, img_resolution=8, label_dim=0, channels=4, seed=2)
    save_net(net, tmp_path / "main.pt")
    save_net(gnet, tmp_path / "guide.pt")
    args = ["generate", "--net", str(tmp_path / "main.pt"), "--gnet", str(tmp_path / "guide.pt"), "--seeds", "0-1",
            "--steps", "5", "--guidance", "2", "--solver", "unipc", "--device", "cpu", "--no-progress"]
    assert cli(args + ["--outdir", str(tmp_path / "out")]) == 0
    batch = next(iter(generate(net, gnet, seeds=[0, 1], progress=False, num_steps=5, guidance=2.0, solver="unipc")))
    for seed, image in zip(batch.seeds, batch.images):
        with Image.open(tmp_path / "out" / f"{seed:06d}.png") as png:
            assert np.array_equal(np.asarray(png), image.permute(1, 2, 0).numpy())
    assert cli(args + ["--outdir", str(tmp_path / "o2"), "--churn", "1"]) == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_dtype", X_DTYPES, ids=str)
@pytest.mark.parametrize("per_sample", [False, True], ids=["scalar", "per-sample"])
def test_corrector_with_cfg_matches_oracle(backend, x_dtype, per_sample, gen):
    """UniPC's corrector and the three-output blend (autoguidance + CFG) in one fused pass, against a
    float64 oracle of D = D_1 + (w - 1)(D_1 - D_0) + (w_cfg - 1)(D_1 - D_u), x_c, x_next."""
    require(backend, "cpu")
    shape = (3, 5, 67)
    for d_dtype in D_DTYPES:
        x, _, d_main, d_guide = make_inputs(shape, x_dtype, d_dtype, "cpu", gen, 2.0)
        d_uncond = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2.0).to(d_dtype)
        g = (1.0 + 2.0 * torch.rand(3, generator=gen, dtype=torch.float64)) if per_sample else 2.3
        w_cfg = (2.0 + 5.0 * torch.rand(3, generator=gen, dtype=torch.float64)) if per_sample else 6.5
        hist = torch.randn((2,) + shape, generator=gen, dtype=torch.float64).to(x_dtype)
        a_c, c, a, b, read, write = 0.81, (0.5, 0.4, -0.05), 0.37, (1.2, -0.25), (1, 0), 0
        f = lambda t: t.to(torch.float64)  # noqa: E731
        col = lambda v: f(v).reshape(-1, 1, 1) if isinstance(v, torch.Tensor) else v  # noqa: E731
        D = f(d_main) + (col(g) - 1) * (f(d_main) - f(d_guide)) + (col(w_cfg) - 1) * (f(d_main) - f(d_uncond))
        x_c = a_c * f(x) + c[0] * D + c[1] * f(hist[1]) + c[2] * f(hist[0])
        x_next = a * x_c + b[0] * D + b[1] * f(hist[1])
        scale = max(t.abs().max().item() for t in (f(d_main), f(d_guide), f(d_uncond), D, x_c, x_next)) * 8
        out, corrected, h = poison(torch.empty_like(x)), poison(torch.empty_like(x)), hist.clone()
        result = ag_kernels.multistep_step(x, d_main, d_guide, g, h, a, b, read=read, write=write, out=out,
                                           corrector=(a_c, c), corrected=corrected, backend=backend,
                                           d_uncond=d_uncond, cfg_scale=w_cfg)
        assert result is out
        tol = TOL[x_dtype]
        assert rel_err(out, x_next, scale) <= tol, f"{backend} {d_dtype}: x_next"
        assert rel_err(corrected, x_c, scale) <= tol, f"{backend} {d_dtype}: x_c"
        assert rel_err(h[0], D, scale) <= tol, f"{backend} {d_dtype}: history[0] (D)"
        assert torch.equal(h[1], hist[1])
        # The CFG term is really read: without it the result moves far beyond the tolerance.
        plain = ag_kernels.multistep_step(x, d_main, d_guide, g, hist.clone(), a, b, read=read, write=write,
                                          corrector=(a_c, c), corrected=torch.empty_like(x), backend=backend)
        assert rel_err(plain, x_next, scale) > 100 * tol
