"""The exact 2-D toy "tree" mixtures (ag_kernels.toy): density, score, denoiser and sampling."""

import math

import pytest
import torch

from ag_kernels.toy import CLASSES, TREE_LEVELS, GaussianMixture, tree_depths, tree_mixture

F64 = torch.float64


def _grid(half: float, n: int):
    """Cell centres of an n x n grid over [-half, half]^2 and the cell area."""
    g = torch.linspace(-half, half, n + 1, dtype=F64)
    g = 0.5 * (g[:-1] + g[1:])
    xy = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    return xy, (2 * half / n) ** 2


# --------------------------------------------------------------------------- construction
def test_construction_counts_widths_and_level_weights():
    a, b, ab = (tree_mixture(c) for c in CLASSES)
    assert tree_mixture("A") is a  # cached
    assert TREE_LEVELS == 7
    assert len(a) == len(b) == 127 * 8 and len(ab) == 2 * 127 * 8
    for m in (a, b, ab):
        assert m.weights.dtype == m.means.dtype == m.covs.dtype == F64
        assert abs(float(m.weights.sum()) - 1) < 1e-12
        assert bool((torch.linalg.eigvalsh(m.covs) > 0).all())
    depth = tree_depths("A")
    assert depth.dtype == torch.int64 and depth.shape == (len(a),)
    # 8 components per branch, 2^d branches at depth d.
    assert torch.bincount(depth).tolist() == [8 * 2**d for d in range(TREE_LEVELS)]
    assert torch.equal(tree_depths("B"), depth) and torch.equal(tree_depths("AB"), torch.cat([depth, depth]))
    # Widths (smaller std of each component) from 0.016 at the trunk to 0.004 at the finest level.
    across = torch.linalg.eigvalsh(a.covs)[:, 0].sqrt()
    for d in range(TREE_LEVELS):
        expect = 0.016 * (0.25 ** (d / (TREE_LEVELS - 1)))
        assert torch.allclose(across[depth == d], torch.full_like(across[depth == d], expect), rtol=1e-9)
    # Level masses: each level carries (branch length x 0.5^depth), about 0.8x the level above.
    level = torch.stack([a.weights[depth == d].sum() for d in range(TREE_LEVELS)])
    ratio = level[1:] / level[:-1]
    assert bool(((ratio > 0.65) & (ratio < 0.95)).all()), ratio
    assert float(ab.means.abs().max()) <= 1.6 + 1e-9
    # B is A mirrored in x = 0 (the two grow from one root in opposite directions).
    assert torch.allclose(b.means, a.means * torch.tensor([-1.0, 1.0], dtype=F64), atol=1e-12)
    assert float(a.weights @ a.means[:, 0]) > 0.3 > -0.3 > float(b.weights @ b.means[:, 0])


def test_group_posteriors_sum_to_one_and_recover_level_masses(gen):
    a = tree_mixture("A")
    depth = tree_depths("A")
    x = a.sample(20_000, generator=gen)
    post = a.group_posteriors(x, depth)
    assert post.shape == (20_000, TREE_LEVELS)
    assert torch.allclose(post.sum(1), torch.ones(20_000, dtype=F64), atol=1e-12)
    # Averaged over exact samples, the posterior mass of a level estimates that level's weight.
    level = torch.stack([a.weights[depth == d].sum() for d in range(TREE_LEVELS)])
    assert torch.allclose(post.mean(0), level, atol=5 * math.sqrt(0.25 / 20_000)), (post.mean(0), level)
    # Against a direct computation at a per-point sigma.
    sig = torch.rand(50, generator=gen, dtype=F64) * 0.2
    logn = torch.stack([torch.distributions.MultivariateNormal(
        a.means, a.covs + float(s) ** 2 * torch.eye(2, dtype=F64)).log_prob(p) for p, s in zip(x[:50], sig)]) + a.weights.log()
    ref = torch.zeros(50, TREE_LEVELS, dtype=F64).index_add_(1, depth, torch.softmax(logn, 1))
    assert torch.allclose(a.group_posteriors(x[:50], depth, sig), ref, atol=1e-12)
    with pytest.raises(ValueError, match="groups"):
        a.group_posteriors(x, depth[:-1])
    with pytest.raises(ValueError, match="groups"):
        a.group_posteriors(x, depth.to(torch.int32))


# --------------------------------------------------------------------------- density
@pytest.mark.parametrize("name,sigma", [("A", 0.0), *((c, s) for c in CLASSES for s in (0.05, 0.5))])
def test_density_integrates_to_one(name, sigma):
    # (At sigma = 0 only A, the costly fine grid: B is A mirrored and AB their mean, both tested below.)
    # Box: [-1.8, 1.8]^2 (component means within 1.6 of the origin, stds at most ~0.05) widened by
    # 7 sigma.  Grid: the midpoint rule is spectrally accurate for Gaussians wider than ~the
    # spacing, so the thinnest component (std 0.004 at sigma = 0) needs h ~ 0.005 (720 points);
    # wider ones need far fewer.
    half = 1.8 + 7 * sigma
    n = 720 if sigma == 0 else 200
    xy, area = _grid(half, n)
    integral = float(tree_mixture(name).prob(xy, sigma).sum()) * area
    assert abs(integral - 1) < 2e-5, integral


def test_log_prob_matches_reference_and_per_point_sigma(gen):
    m = tree_mixture("AB")
    x = torch.rand(300, 2, generator=gen, dtype=F64) * 4 - 2
    sig = torch.rand(300, generator=gen, dtype=F64) * 0.3
    cov = m.covs[None] + (sig**2)[:, None, None, None] * torch.eye(2, dtype=F64)
    ref = torch.logsumexp(
        torch.distributions.MultivariateNormal(m.means[None], cov).log_prob(x[:, None, :]) + m.weights.log(), 1
    )
    got = m.log_prob(x, sig)  # per-point sigma
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-9)
    per = torch.stack([m.log_prob(x[i : i + 1], float(sig[i]))[0] for i in range(0, 300, 30)])
    assert torch.allclose(per, ref[::30], rtol=1e-10, atol=1e-9)
    assert torch.allclose(m.prob(x, sig), ref.exp(), rtol=1e-9, atol=0)
    # float32 input is accepted; the result is float64.
    assert m.log_prob(x.float(), 0.1).dtype == F64


# --------------------------------------------------------------------------- score / denoiser
@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("sigma", [0.0, 0.02, 0.3, 1.0])
def test_score_matches_autograd(name, sigma, gen):
    m = tree_mixture(name)
    near = m.sample(200, sigma, generator=gen)  # where the density lives
    far = torch.rand(56, 2, generator=gen, dtype=F64) * 5 - 2.5
    x = torch.cat([near, far]).requires_grad_(True)
    (grad,) = torch.autograd.grad(m.log_prob(x, sigma).sum(), x)
    s = m.score(x.detach(), sigma)
    err = (s - grad).norm(dim=1) / grad.norm(dim=1).clamp_min(1e-3)
    assert float(err.max()) < 1e-8


def test_score_per_point_sigma_matches_autograd(gen):
    m = tree_mixture("AB")
    x = m.sample(256, 0.1, generator=gen).requires_grad_(True)
    sig = torch.rand(256, generator=gen, dtype=F64) * 0.5
    (grad,) = torch.autograd.grad(m.log_prob(x, sig).sum(), x)
    s = m.score(x.detach(), sig)
    assert float(((s - grad).norm(dim=1) / grad.norm(dim=1).clamp_min(1e-3)).max()) < 1e-8
    lp, s2 = m.log_prob_and_score(x.detach(), sig)
    assert torch.equal(s2, s) and torch.equal(lp, m.log_prob(x.detach(), sig))


@pytest.mark.parametrize("sigma", [0.01, 0.2, 2.0])
def test_denoise_is_tweedie(sigma, gen):
    m = tree_mixture("A")
    x = m.sample(500, sigma, generator=gen)
    d = m.denoise(x, sigma)
    assert torch.allclose(d, x + sigma**2 * m.score(x, sigma), rtol=0, atol=1e-12)
    # Per-point sigma gives the same as scalar sigma.
    assert torch.allclose(m.denoise(x, torch.full((500,), sigma, dtype=F64)), d, rtol=0, atol=1e-12)
    # float32 working precision (training targets): float64 out, within a small fraction of sigma.
    d32 = m.denoise(x, sigma, work_dtype=torch.float32)
    assert d32.dtype == F64
    assert float((d32 - d).abs().max()) < 5e-3 * sigma + 2e-6
    with pytest.raises(TypeError, match="work_dtype"):
        m.denoise(x, sigma, work_dtype=torch.float16)


def test_denoise_is_posterior_mean_and_tends_to_mixture_mean(gen):
    m = tree_mixture("AB")
    # Small sigma, exactly at the mean of a heavy component: the denoiser stays near the data.
    x = m.means[:3]
    assert float((m.denoise(x, 1e-3) - x).norm(dim=1).max()) < 1e-2
    # Large sigma: D(x; sigma) -> E[x0] = sum w mu; deviation ~ |Cov| |x - mean| / sigma^2.
    mean = m.mean()
    for sigma in (1e2, 1e3):
        x = sigma * torch.randn(1000, 2, generator=gen, dtype=F64)
        dev = (m.denoise(x, sigma) - mean).norm(dim=1).max()
        assert float(dev) < 5.0 / sigma, (sigma, float(dev))
    # ...and it is not trivially the mean at moderate sigma.
    assert float((m.denoise(torch.zeros(1, 2, dtype=F64), 0.05) - mean).norm()) > 0.05


# --------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_sample_moments(name, sigma, gen):
    m = tree_mixture(name)
    n = 200_000
    x = m.sample(n, sigma, generator=gen)
    assert x.shape == (n, 2) and x.dtype == F64
    mean, cov = m.mean(), m.covariance(sigma)
    # Exact moments, independently of the class's own helpers.
    mu_ref = m.weights @ m.means
    cov_ref = torch.einsum("k,kij->ij", m.weights, m.covs + m.means[:, :, None] * m.means[:, None, :])
    cov_ref = cov_ref - torch.outer(mu_ref, mu_ref) + sigma**2 * torch.eye(2, dtype=F64)
    assert torch.allclose(mean, mu_ref, atol=1e-14) and torch.allclose(cov, cov_ref, atol=1e-14)
    se_mean = (cov.diagonal() / n).sqrt()
    assert bool(((x.mean(0) - mean).abs() < 5 * se_mean).all()), (x.mean(0), mean)
    xc = x - x.mean(0)
    prods = xc[:, :, None] * xc[:, None, :]  # [n, 2, 2]
    se_cov = prods.std(0) / math.sqrt(n)
    assert bool(((prods.mean(0) - cov).abs() < 5 * se_cov).all()), (prods.mean(0), cov)


@pytest.mark.parametrize("name,sigma", [("A", 0.05), ("AB", 0.05), ("B", 0.5)])
def test_sample_histogram_matches_density(name, sigma, gen):
    """Chi-square over an 8 x 8 grid of cells on [-2, 2]^2 plus the outside, against integrated density."""
    m = tree_mixture(name)
    n = 200_000
    x = m.sample(n, sigma, generator=gen)
    cells, sub = 8, 25  # 25 x 25 integration points per cell
    xy, area = _grid(2.0, cells * sub)
    p = (m.prob(xy, sigma) * area).reshape(cells, sub, cells, sub).sum((1, 3)).reshape(-1)
    expected = torch.cat([p, (1 - p.sum()).reshape(1)]) * n
    idx = ((x + 2) / 4 * cells).floor().long()
    inside = ((idx >= 0) & (idx < cells)).all(1)
    flat = torch.where(inside, idx[:, 0] * cells + idx[:, 1], torch.full_like(idx[:, 0], cells * cells))
    observed = torch.bincount(flat, minlength=cells * cells + 1).to(F64)
    keep = expected > 5  # pool sparse cells into one
    obs = torch.cat([observed[keep], observed[~keep].sum().reshape(1)])
    exp = torch.cat([expected[keep], expected[~keep].sum().reshape(1)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = obs.numel() - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)
    # A sharper single-region check: the trunk-bottom box (much of the mass).
    region = (xy[:, 0].abs() < 0.3) & (xy[:, 1] < 0.0)
    p_region = float((m.prob(xy, sigma) * area)[region].sum())
    f = float(((x[:, 0].abs() < 0.3) & (x[:, 1] < 0.0) & (x[:, 1] > -2.0)).double().mean())
    assert abs(f - p_region) < 5 * math.sqrt(p_region * (1 - p_region) / n) + 1e-4, (f, p_region)


def test_sample_per_point_sigma_and_edge_cases(gen):
    m = tree_mixture("A")
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    a = m.sample(1000, 0.3, generator=torch.Generator().manual_seed(seed))
    b = m.sample(1000, torch.full((1000,), 0.3, dtype=F64), generator=torch.Generator().manual_seed(seed))
    assert torch.allclose(a, b, rtol=0, atol=1e-14)
    # Per-point sigma: the empirical variance grows with sigma as sigma^2.
    sig = torch.cat([torch.zeros(50_000), torch.full((50_000,), 3.0)]).to(F64)
    x = m.sample(100_000, sig, generator=gen)
    tr0 = float(m.covariance(0.0).trace())
    assert abs(float(x[:50_000].var(0).sum()) / tr0 - 1) < 0.05
    assert abs(float(x[50_000:].var(0).sum()) / (tr0 + 18.0) - 1) < 0.05
    assert m.sample(0).shape == (0, 2)


# --------------------------------------------------------------------------- classes
def test_ab_is_half_a_plus_half_b(gen):
    a, b, ab = (tree_mixture(c) for c in CLASSES)
    x = torch.rand(2000, 2, generator=gen, dtype=F64) * 4.4 - 2.2
    for sigma in (0.0, 0.05, 1.0):
        mix = torch.logaddexp(a.log_prob(x, sigma), b.log_prob(x, sigma)) - math.log(2)
        assert torch.allclose(ab.log_prob(x, sigma), mix, rtol=1e-12, atol=1e-9)
    comb = GaussianMixture.combine([(a, 0.5), (b, 0.5)])
    assert torch.allclose(comb.log_prob(x, 0.1), ab.log_prob(x, 0.1), rtol=1e-12, atol=1e-10)
    # Unequal combination weights are honoured.
    c = GaussianMixture.combine([(a, 3.0), (b, 1.0)])
    ref = torch.logaddexp(a.log_prob(x, 0.1) + math.log(0.75), b.log_prob(x, 0.1) + math.log(0.25))
    assert torch.allclose(c.log_prob(x, 0.1), ref, rtol=1e-12, atol=1e-9)


def test_a_and_b_differ_but_overlap(gen):
    a, b = tree_mixture("A"), tree_mixture("B")
    xa = a.sample(20_000, generator=gen)
    ratio = b.log_prob(xa) - a.log_prob(xa)  # log p_B / p_A on A's samples
    exclusive = float((ratio < math.log(1e-3)).double().mean())
    shared = float((ratio.abs() < math.log(2)).double().mean())
    assert exclusive > 0.8, exclusive  # most of A (~91%) is (nearly) absent from B ...
    assert shared > 0.01, shared  # ... but they share the root and cross in the middle (~2.6%)
    # Symmetry: p_B(x, y) = p_A(-x, y).
    flip = torch.tensor([-1.0, 1.0], dtype=F64)
    assert torch.allclose(b.log_prob(xa * flip, 0.1), a.log_prob(xa, 0.1), rtol=1e-12, atol=1e-9)


# --------------------------------------------------------------------------- errors
def _m():
    return tree_mixture("A")


X = torch.zeros(4, 2)
BAD = [
    ("x_list", lambda: _m().log_prob([[0.0, 0.0]]), TypeError, "x"),
    ("x_int", lambda: _m().score(torch.zeros(4, 2, dtype=torch.int64)), TypeError, "x"),
    ("x_shape3", lambda: _m().log_prob(torch.zeros(4, 3)), ValueError, "x"),
    ("x_1d", lambda: _m().prob(torch.zeros(4)), ValueError, "x"),
    ("sigma_neg", lambda: _m().log_prob(X, -0.1), ValueError, "sigma"),
    ("sigma_nan", lambda: _m().score(X, float("nan")), ValueError, "sigma"),
    ("sigma_inf", lambda: _m().denoise(X, float("inf")), ValueError, "sigma"),
    ("sigma_str", lambda: _m().log_prob(X, "1"), TypeError, "sigma"),
    ("sigma_shape", lambda: _m().log_prob(X, torch.ones(3)), ValueError, "sigma"),
    ("sigma_tensor_neg", lambda: _m().score(X, torch.tensor([0.1, -1.0, 0.1, 0.1])), ValueError, "sigma"),
    ("sample_n_neg", lambda: _m().sample(-1), ValueError, "n"),
    ("sample_n_float", lambda: _m().sample(2.5), TypeError, "n"),
    ("sample_n_bool", lambda: _m().sample(True), TypeError, "n"),
    ("sample_sigma_neg", lambda: _m().sample(3, -1.0), ValueError, "sigma"),
    ("sample_sigma_shape", lambda: _m().sample(3, torch.ones(4)), ValueError, "sigma"),
    ("sample_generator", lambda: _m().sample(3, generator=0), TypeError, "generator"),
    ("name_unknown", lambda: tree_mixture("C"), ValueError, "name"),
    ("name_type", lambda: tree_mixture(1), TypeError, "name"),
    ("weights_sum", lambda: GaussianMixture(torch.tensor([0.5, 0.6]), torch.zeros(2, 2), torch.eye(2).repeat(2, 1, 1)),
     ValueError, "weights"),
    ("means_shape", lambda: GaussianMixture(torch.tensor([1.0]), torch.zeros(2, 2), torch.eye(2)[None]),
     ValueError, "means"),
    ("covs_not_pd", lambda: GaussianMixture(torch.tensor([1.0]), torch.zeros(1, 2), -torch.eye(2)[None]),
     ValueError, "covs"),
    ("combine_empty", lambda: GaussianMixture.combine([]), ValueError, "parts"),
    ("combine_negative", lambda: GaussianMixture.combine([(_m(), -1.0)]), ValueError, "parts"),
]


@pytest.mark.parametrize("case,call,exc,text", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments_name_the_argument(case, call, exc, text):
    with pytest.raises(exc, match=rf"\b{text}\b"):
        call()
