"""The toy experiment's log-density MLP denoiser and its training loop."""

import math

import pytest
import torch

import ag_kernels
from ag_kernels.toy.model import SIGMA_DATA, ToyDenoiser, power_ema_exponent, train

# A two-component elongated mixture whose exact denoiser is written out here (Tweedie's formula with
# per-component posterior responsibilities), so the training test needs no other module.
MUS = torch.tensor([[-1.0, 0.0], [1.0, 0.5]], dtype=torch.float64)
COVS = torch.stack([torch.diag(torch.tensor([0.1, 0.01])), torch.diag(torch.tensor([0.01, 0.2]))]).double()
WEIGHTS = torch.tensor([0.5, 0.5], dtype=torch.float64)


def exact_denoiser(x, sigma):
    cov = COVS[None] + (sigma**2)[:, None, None, None] * torch.eye(2, dtype=torch.float64)
    diff = x[:, None, :] - MUS[None]
    inv = torch.linalg.inv(cov)
    log_n = -0.5 * torch.einsum("nki,nkij,nkj->nk", diff, inv, diff) - 0.5 * torch.logdet(cov) + WEIGHTS.log()
    resp = torch.softmax(log_n, dim=1)
    score = -(resp[..., None] * torch.einsum("nkij,nkj->nki", inv, diff)).sum(1)
    return x + (sigma**2)[:, None] * score


def sample_data(n, generator):
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=generator)
    z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return MUS[k] + torch.einsum("nij,nj->ni", torch.linalg.cholesky(COVS)[k], z)


def test_untrained_model_is_the_gaussian_denoiser(gen):
    """With the output gain at 0 the model is N(0, sigma_data^2): D = c_skip x exactly."""
    model = ToyDenoiser(hidden=16, layers=3, seed=int(torch.randint(1000, (), generator=gen)))
    x = torch.randn(50, 2, generator=gen, dtype=torch.float64)
    for sigma in (0.01, 0.5, 5.0):
        c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
        assert torch.allclose(model(x, sigma), c_skip * x, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("fourier", [0, 6])
def test_denoiser_is_tweedie_of_log_prob(fourier, gen):
    """D(x) - x equals sigma^2 times the finite-difference gradient of log_prob (a model with a nonzero gain)."""
    model = ToyDenoiser(hidden=16, layers=3, seed=3, fourier=fourier, fourier_scale=2.0)
    with torch.no_grad():
        model.gain.fill_(0.7)
    x = torch.randn(20, 2, generator=gen, dtype=torch.float64)
    sigma = torch.exp(torch.randn(20, generator=gen, dtype=torch.float64))
    D = model(x, sigma)
    h = 1e-6
    for j in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[j] = h
        fd = (model.log_prob(x + e, sigma) - model.log_prob(x - e, sigma)) / (2 * h)
        assert torch.allclose((D[:, j] - x[:, j]) / sigma**2, fd, rtol=1e-6, atol=1e-6)
    assert (D - x).abs().max() > 1e-3  # the learned term contributes: the check above is not vacuous


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)], ids=str)
@pytest.mark.parametrize("layers", [1, 2, 4])
@pytest.mark.parametrize("fourier", [0, 5])
def test_sampling_path_matches_autograd(dtype, tol, layers, fourier, gen):
    """Without grad mode, forward runs a hand-written backward pass: it must equal autograd's D,
    also after the weights change in place (its cached normalized weights are refreshed); with
    Fourier features too (their chain rule is written out there)."""
    extra = dict(fourier=fourier, fourier_scale=2.0) if fourier else {}
    model = ToyDenoiser(hidden=24, layers=layers, seed=int(torch.randint(1000, (), generator=gen)), **extra).eval()
    x = (2 * torch.randn(37, 2, generator=gen, dtype=torch.float64)).to(dtype)
    sigma = torch.exp(2 * torch.randn(37, generator=gen, dtype=torch.float64)).to(dtype)
    for gain in (0.7, -1.3):
        with torch.no_grad():
            model.gain.fill_(gain)
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))  # in place: versions move
            fast = model(x, sigma)
            fast_scalar = model(x, sigma[0])
        exact = model(x, sigma)  # grad mode on: the autograd path
        assert fast.dtype == dtype and fast.shape == x.shape
        scale = (exact - x).abs().max()
        assert (fast - exact).abs().max() <= tol * scale, (fast - exact).abs().max() / scale
        assert torch.allclose(fast_scalar, model(x, sigma[0]), rtol=0, atol=tol * float(scale))
    # A state dict loaded into it (as checkpoint loading does) is used, not the cached weights.
    other = ToyDenoiser(hidden=24, layers=layers, seed=999, **extra)
    with torch.no_grad():
        other.gain.fill_(0.5)
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.allclose(model(x, sigma), other(x, sigma), rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)


def test_short_training_lowers_the_loss(gen):
    model = ToyDenoiser(hidden=16, layers=3, seed=int(torch.randint(1000, (), generator=gen)))
    losses = []
    ema = train(model, exact_denoiser, sample_data, iterations=80, batch_size=512,
                seed=int(torch.randint(1000, (), generator=gen)), log=lambda i, loss: losses.append(loss))
    assert len(losses) == 80 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert not ema.training and ema is not model
    # The EMA model denoises better than the untrained one at a mid noise level.
    x = sample_data(2000, gen) + 0.3 * torch.randn(2000, 2, generator=gen, dtype=torch.float64)
    sigma = torch.full((2000,), 0.3, dtype=torch.float64)
    err_trained = ((ema(x, sigma) - exact_denoiser(x, sigma)) ** 2).mean()
    err_untrained = ((ToyDenoiser(hidden=16, layers=3)(x, sigma) - exact_denoiser(x, sigma)) ** 2).mean()
    assert err_trained < 0.5 * err_untrained


def test_power_ema_exponent_inverts_the_profile_std():
    def rel_std(g):
        return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))

    for std in (0.005, 0.010, 0.05, 0.1, 0.2, 0.28):
        assert rel_std(power_ema_exponent(std)) == pytest.approx(std, rel=1e-9)
    # EDM2's figure: std 0.010 is gamma ~ 97, 0.05 ~ 17.
    assert power_ema_exponent(0.010) == pytest.approx(97.0, abs=0.1)
    for bad in (0.0, -0.1, 0.3, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="ema_std"):
            power_ema_exponent(bad)


def test_power_ema_weights_match_the_closed_form(gen):
    """The returned EMA is sum_t w_t theta_t with the power-function profile w_t ~ t^gamma (up to the
    discrete product), checked by recording the raw parameters at every step."""
    model = ToyDenoiser(hidden=4, layers=2, seed=int(torch.randint(1000, (), generator=gen)))
    raw = []

    def record(t, emas):
        raw.append([p.detach().clone() for p in model.parameters()])

    emas = train(model, exact_denoiser, sample_data, iterations=30, batch_size=64, ema_std=[0.05, 0.2],
                 seed=1, on_step=record)
    assert isinstance(emas, list) and len(emas) == 2 and len(raw) == 30
    for ema, std in zip(emas, (0.05, 0.2)):
        gamma = power_ema_exponent(std)
        # beta_t = (1 - 1/t)^(gamma + 1): weight of step t is (1 - beta_t) prod_{s > t} beta_s.
        betas = [(1 - 1 / t) ** (gamma + 1) for t in range(1, 31)]
        weights = []
        for t in range(30):
            w = 1 - betas[t]
            for s_ in range(t + 1, 30):
                w *= betas[s_]
            weights.append(w)
        assert sum(weights) == pytest.approx(1.0)
        for i, p in enumerate(ema.parameters()):
            expect = sum(w * r[i] for w, r in zip(weights, raw))
            assert torch.allclose(p, expect, rtol=1e-9, atol=1e-12)


def test_denoising_score_matching_and_snapshots(gen):
    """target_denoiser=None trains on the clean samples (denoising score matching); on_step sees
    the EMA after every step, and a snapshot at t equals a run of t iterations.

    80 iterations: after 40, err / err0 was 0.48-0.83 over 26 seeds (5 above 0.7); after 80, 0.40-0.56 over 41.
    """
    seed = int(torch.randint(1000, (), generator=gen))
    snaps = {}
    long = train(ToyDenoiser(hidden=8, layers=2, seed=seed), None, sample_data, iterations=80, batch_size=256,
                 seed=seed, on_step=lambda t, ema: snaps.__setitem__(t, [p.clone() for p in ema.parameters()]))
    assert sorted(snaps) == list(range(1, 81))
    short = train(ToyDenoiser(hidden=8, layers=2, seed=seed), None, sample_data, iterations=25, batch_size=256, seed=seed)
    for a, b in zip(short.parameters(), snaps[25]):
        assert torch.equal(a, b)
    for a, b in zip(long.parameters(), snaps[80]):
        assert torch.equal(a, b)
    x = sample_data(2000, gen) + 0.3 * torch.randn(2000, 2, generator=gen, dtype=torch.float64)
    sigma = torch.full((2000,), 0.3, dtype=torch.float64)
    with torch.no_grad():
        err = ((long(x, sigma) - exact_denoiser(x, sigma)) ** 2).mean()
        err0 = ((ToyDenoiser(hidden=8, layers=2)(x, sigma) - exact_denoiser(x, sigma)) ** 2).mean()
    assert err < 0.7 * err0


def test_lockstep_training_equals_separate_runs(gen):
    """Models trained together (one set of batches and targets) end bitwise equal to their own runs,
    with per-model losses and EMAs; the target is computed once per iteration, not once per model."""
    seed = int(torch.randint(1000, (), generator=gen))
    calls = []

    def counted(x, sigma):
        calls.append(1)
        return exact_denoiser(x, sigma)

    shapes = [(8, 2, seed), (4, 3, seed + 1), (8, 2, seed + 2)]
    losses, seen = [], []
    together = train([ToyDenoiser(hidden=h, layers=l, seed=s) for h, l, s in shapes], counted, sample_data,
                     iterations=12, batch_size=128, seed=seed, ema_std=[0.05, 0.1],
                     log=lambda it, loss: losses.append(loss), on_step=lambda t, emas: seen.append(len(emas)))
    assert len(calls) == 12 and seen == [3] * 12 and all(len(v) == 3 for v in losses)
    assert isinstance(together, list) and len(together) == 3 and all(len(e) == 2 for e in together)
    for i, (h, l, s) in enumerate(shapes):
        own_losses = []
        alone = train(ToyDenoiser(hidden=h, layers=l, seed=s), exact_denoiser, sample_data, iterations=12,
                      batch_size=128, seed=seed, ema_std=[0.05, 0.1], log=lambda it, loss: own_losses.append(loss))
        assert own_losses == [v[i] for v in losses]
        for ema_a, ema_t in zip(alone, together[i]):
            for a, b in zip(ema_a.parameters(), ema_t.parameters()):
                assert torch.equal(a, b)
    with pytest.raises(ValueError, match="twice"):
        m = ToyDenoiser(hidden=4, layers=2)
        train([m, m], exact_denoiser, sample_data, iterations=1)
    with pytest.raises(TypeError, match="model"):
        train([], exact_denoiser, sample_data, iterations=1)


def test_samples_through_edm_sampler(gen):
    """The model plugs into edm_sampler (net(x, t, labels), float32 points) and gives finite samples."""
    model = ToyDenoiser(hidden=16, layers=2, seed=0).eval()
    with torch.no_grad():
        model.gain.fill_(0.3)
    noise = torch.randn(64, 2, generator=gen)
    out = ag_kernels.edm_sampler(model, noise, num_steps=8, sigma_max=5.0, backend="torch")
    assert out.shape == (64, 2) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_fourier_features_kwargs_and_checkpoint(tmp_path, gen):
    """The plain MLP's kwargs (and so its checkpoints) carry no Fourier keys; a Fourier model's do,
    and a checkpoint round trip gives the same frequencies (a buffer, not trained) and outputs."""
    from ag_kernels.models.checkpoint import load_net, save_net

    assert set(ToyDenoiser(hidden=8, layers=2).init_kwargs) == {"hidden", "layers", "seed", "dim"}
    model = ToyDenoiser(hidden=8, layers=2, seed=4, fourier=3, fourier_scale=5.0)
    assert model.init_kwargs["fourier"] == 3 and model.init_kwargs["fourier_scale"] == 5.0
    assert "freqs" not in dict(model.named_parameters()) and model.freqs.shape == (3, 2)
    assert torch.equal(model.freqs, ToyDenoiser(hidden=8, layers=2, seed=4, fourier=3, fourier_scale=5.0).freqs)
    with torch.no_grad():
        model.gain.fill_(0.9)
    save_net(model, tmp_path / "f.pt")
    back = load_net(tmp_path / "f.pt").eval()
    x = torch.randn(9, 2, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(back(x, 0.05), model.eval()(x, 0.05))
    # The damping: at a large sigma the features are gone, so the frequencies cannot matter.
    z, a = model._features(x, torch.full((9, 1), 10.0, dtype=torch.float64))
    assert a.max() < 1e-30
    with pytest.raises(ValueError, match="fourier"):
        ToyDenoiser(fourier=-1)
    with pytest.raises(ValueError, match="fourier_scale"):
        ToyDenoiser(fourier=2, fourier_scale=0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="hidden"):
        ToyDenoiser(hidden=0)
    with pytest.raises(ValueError, match="layers"):
        ToyDenoiser(layers=1.5)
    with pytest.raises(ValueError, match="x"):
        ToyDenoiser()(torch.zeros(3, 3), 1.0)
    with pytest.raises(ValueError, match="iterations"):
        train(ToyDenoiser(), exact_denoiser, sample_data, iterations=0)
