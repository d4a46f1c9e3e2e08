"""Marchenko-Pastur edge fit, SEB weights/masks and SER restore (baselines/marchenko_pastur.py).

The random-matrix tests draw from fixed torch generators, so they are deterministic. Their
tolerances were set from repeated draws with other seeds, not tuned to these seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from baselines import marchenko_pastur as mp
from suite.pruning import masks


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Many small SVDs: one BLAS thread is faster and steadier on a busy CI box.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _noise(shape, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    return sigma * torch.randn(*shape, generator=g, dtype=torch.float64)


def _planted(N, Mi, k, sigma, seed, mult=(2.0, 2.5, 3.0, 3.5, 4.0)):
    """Noise plus k orthogonal rank-one spikes theta_i u_i v_i^T, theta_i = mult_i * noise edge
    sigma (sqrt N + sqrt M), far above the BBP threshold sigma (N M)^(1/4)."""
    g = torch.Generator().manual_seed(seed)
    Z = sigma * torch.randn(N, Mi, generator=g, dtype=torch.float64)
    U, _ = torch.linalg.qr(torch.randn(N, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(Mi, k, generator=g, dtype=torch.float64))
    edge = sigma * (math.sqrt(N) + math.sqrt(Mi))
    theta = torch.tensor([mult[i % len(mult)] * edge for i in range(k)], dtype=torch.float64)
    return Z + (U * theta) @ V.T


def _planted_bbp(N, Mi, k, seed, sigma=1.0, lo=2.0, hi=4.0):
    """Noise N(0, sigma^2) plus k orthogonal rank-one spikes theta_j u_j v_j^T with theta_j
    from lo to hi times the BBP detection threshold sigma (N M)^(1/4) (equally spaced; k = 1
    gets lo). At 2x the threshold a spike's singular value sits 19-25 % above the noise edge
    sigma (sqrt N + sqrt M) for the shapes used here (asymptotically). k = 0 is pure noise."""
    g = torch.Generator().manual_seed(seed)
    Z = sigma * torch.randn(N, Mi, generator=g, dtype=torch.float64)
    if k == 0:
        return Z
    U, _ = torch.linalg.qr(torch.randn(N, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(Mi, k, generator=g, dtype=torch.float64))
    mult = torch.linspace(lo, hi, k, dtype=torch.float64) if k > 1 else torch.tensor([lo], dtype=torch.float64)
    return Z + (U * (mult * sigma * (N * Mi) ** 0.25)) @ V.T


# shapes for the default-count tests (and scripts/mp_fit_check.py): square, both orientations
# of 1:4, the 300 x 1200 of the formula test and a 3x3-conv-like 64 x (64 * 9); k = 10 only
# where the smaller side is >= 128, so the spikes are <= 8 % of the values
COUNT_SHAPES = [(256, 256), (512, 128), (128, 512), (300, 1200), (64, 576)]
COUNT_KS = [1, 3, 10]
COUNT_SEEDS = [0, 1, 2]


def count_cases():
    return [(sh, k) for sh in COUNT_SHAPES for k in COUNT_KS if k < 10 or min(sh) >= 128]


# ----------------------------------------------------------------------------- MP law itself
def test_mp_cdf_matches_closed_form_at_ratio_one():
    # g = 1: lambda = s^2 with s quarter-circle on [0, 2], F(s^2) = (s sqrt(4-s^2)/2 + 2 asin(s/2)) / pi
    s = np.linspace(0.05, 1.95, 39)
    exact = (s * np.sqrt(4 - s * s) / 2 + 2 * np.arcsin(s / 2)) / math.pi
    assert np.max(np.abs(mp.mp_cdf(s * s, 1.0) - exact)) < 1e-5
    assert np.max(np.abs(mp.mp_quantile(exact, 1.0) - s * s)) < 1e-4


@pytest.mark.parametrize("g", [0.05, 0.1, 0.25, 0.5, 1.0])
def test_mp_quantiles_have_unit_mean_and_variance_g(g):
    # unit-variance MP law with ratio g: E x = 1, Var x = g, support [(1-sqrt g)^2, (1+sqrt g)^2]
    u = (np.arange(200000) + 0.5) / 200000
    x = mp.mp_quantile(u, g)
    assert x.mean() == pytest.approx(1.0, abs=1e-4)
    assert x.var() == pytest.approx(g, rel=1e-3)
    assert mp.mp_quantile(np.array([0.0, 1.0]), g) == pytest.approx([(1 - g**0.5) ** 2, (1 + g**0.5) ** 2])


def test_tw1_table_matches_published_values():
    # Johnstone (2001), Table 1, TW_1 percentiles
    published = {
        0.01: -3.90,
        0.05: -3.18,
        0.10: -2.78,
        0.30: -1.91,
        0.50: -1.27,
        0.70: -0.59,
        0.90: 0.45,
        0.95: 0.98,
        0.99: 2.02,
    }
    for p, q in published.items():
        assert mp.tw1_quantile(p) == pytest.approx(q, abs=0.006)
    assert np.all(np.diff(mp._TW1_QUANTILES) > 0)
    assert mp.tw1_quantile(0.2) == pytest.approx(-2.2832)  # the doc's beta = 0.8
    with pytest.raises(ValueError):
        mp.tw1_quantile(0.999)


# ----------------------------------------------------------------------------- edge fit
NOISE_SHAPES = [(200, 2000), (2000, 200), (250, 1000), (1000, 250), (500, 1000), (1000, 500), (800, 800)]


@pytest.mark.parametrize("shape", NOISE_SHAPES)
def test_edge_fit_on_gaussian_noise(shape):
    N, Mi = shape
    g = min(shape) / max(shape)
    for k, sigma in enumerate([0.01, 1.0, 3.0]):
        W = _noise(shape, sigma, seed=100 * N + Mi + k)
        fit = mp.mp_edge_fit(W)
        theory = sigma**2 * (1 + math.sqrt(g)) ** 2
        assert fit.shape == shape and fit.g == pytest.approx(g) and fit.n_total == min(shape)
        assert fit.sigma2 == pytest.approx(sigma**2, rel=0.02)
        assert fit.lambda_plus == pytest.approx(theory, rel=0.03)
        # singular-value edge is sigma (sqrt N + sqrt M) whatever the orientation
        sv_plain = math.sqrt(max(shape) * fit.lambda_plus)
        assert sv_plain == pytest.approx(sigma * (math.sqrt(N) + math.sqrt(Mi)), rel=0.015)
        assert fit.ks < 0.03
        # the default beta = 0.01 puts the edge at the 0.99 quantile of TW_1, just outside
        # the bulk edge: pure noise shows no singular value above it
        assert fit.tw_t == mp.tw1_quantile(0.99) and fit.lambda_plus_corrected > fit.lambda_plus
        assert fit.n_above == 0
        # the public code's edge (beta = 0.8, one fit on all values) sits at the 0.2 quantile
        # of TW_1, inside the bulk edge: a noise matrix shows at most a few singular values
        # above it (usually 1, see test_tracy_widom_calibration)
        f08 = mp.mp_edge_fit(W, beta=0.8, deflate=False)
        assert f08.sigma2 == fit.sigma2 and f08.lambda_plus_corrected < f08.lambda_plus
        assert f08.n_above <= 3


def test_correction_formula_uses_larger_dimension_and_exponent_four_thirds():
    W = _noise((300, 1200), 2.0, seed=3)
    fit = mp.mp_edge_fit(W, beta=0.8)
    g, n, t = 0.25, 1200, mp.tw1_quantile(0.2)
    term = t * n ** (-2 / 3) * g ** (-1 / 6) * (1 + math.sqrt(g)) ** (4 / 3)
    assert fit.tw_t == t == -2.2832
    assert fit.lambda_plus_corrected == pytest.approx(fit.sigma2 * ((1 + math.sqrt(g)) ** 2 + term), rel=1e-12)
    assert fit.sv_edge == pytest.approx(math.sqrt(n * fit.lambda_plus_corrected), rel=1e-12)
    assert fit.n_above == int((torch.linalg.svdvals(W) > fit.sv_edge).sum())


@pytest.mark.parametrize("shape", [(300, 300), (100, 1000), (1000, 100)])
def test_tracy_widom_calibration(shape):
    # beta is the chance that a pure-noise matrix has its top singular value above the
    # corrected edge. Checked over 30 draws: a wrong quantile side (t at beta instead of
    # 1 - beta), n = min(dim) or the public code's (1+sqrt g)**4/3 all push these far out.
    above_08, above_005, count_08 = 0, 0, 0
    for r in range(30):
        W = _noise(shape, 1.0, seed=7000 + r)
        f08, f005 = mp.mp_edge_fit(W, beta=0.8, deflate=False), mp.mp_edge_fit(W, beta=0.05, deflate=False)
        above_08 += f08.n_above >= 1
        above_005 += f005.n_above >= 1
        count_08 += f08.n_above
    assert 0.5 <= above_08 / 30 <= 0.97
    assert above_005 / 30 <= 0.2
    assert count_08 / 30 <= 1.5


@pytest.mark.parametrize("shape", [(200, 2000), (2000, 200), (500, 1000), (300, 300)])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_planted_spikes_are_counted(shape, k):
    N, Mi = shape
    W = _planted(N, Mi, k, sigma=1.0, seed=31 * k + N)
    s = torch.linalg.svdvals(W)
    # the default (beta = 0.01, a conservative edge): exactly the planted spikes
    strict = mp.mp_edge_fit(W)
    assert strict.n_above == k
    # the doc's beta = 0.8 (public code: no deflation): every spike, plus at most a couple
    # of noise values at the edge
    fit = mp.mp_edge_fit(W, beta=0.8, deflate=False)
    assert k <= fit.n_above <= k + 3
    assert float(s[k - 1]) > 2 * fit.sv_edge
    # the spikes stay out of the fit window: the bulk edge is still the noise edge
    assert fit.lambda_plus == pytest.approx((1 + math.sqrt(fit.g)) ** 2, rel=0.04)


def _id(v):
    return "x".join(map(str, v)) if isinstance(v, tuple) else f"k{v}"


@pytest.mark.parametrize("shape,k", count_cases(), ids=_id)
def test_default_counts_exactly_the_planted_spikes(shape, k):
    # the issue: with beta = 0.8 a matrix with k spikes far above the BBP threshold counted
    # k + 1 about half the time. The default must count exactly k. Spikes at 2-4x the BBP
    # threshold (the weakest at 2x, >= 9 % above the default edge); seeds 0, 1, 2 as they come
    # (scripts/mp_fit_check.py measures the rate over 200 other draws per case: 0.975-1,
    # mean 0.996, never fewer than k)
    N, Mi = shape
    for seed in COUNT_SEEDS:
        for sigma in (1.0, 0.02):  # the count does not depend on the scale
            W = _planted_bbp(N, Mi, k, seed=seed, sigma=sigma)
            fit = mp.mp_edge_fit(W)
            assert fit.n_above == k, (shape, k, seed, sigma, fit.n_above)
            assert fit.sigma2 == pytest.approx(sigma**2, rel=0.1)
        s = torch.linalg.svdvals(W)
        assert float(s[k - 1]) > 1.05 * fit.sv_edge  # a margin: the weakest spike is not at the edge


@pytest.mark.parametrize("shape", sorted({x for sh in COUNT_SHAPES for x in (sh, sh[::-1])}), ids=_id)
def test_default_counts_zero_on_pure_noise(shape):
    # the issue: with beta = 0.8 pure noise showed 1-2 "signal" directions in most draws
    # (checked here too, as the contrast). Seeds 0..4 as they come (the measured rate of
    # a zero count over 200 other draws per shape is in the module docstring)
    old_nonzero = 0
    for seed in range(5):
        W = _planted_bbp(*shape, 0, seed=seed)
        fit = mp.mp_edge_fit(W)
        assert fit.n_above == 0, (shape, seed)
        assert fit.to_dict() == mp.mp_edge_fit(W, deflate=False).to_dict()  # nothing to deflate
        old_nonzero += mp.mp_edge_fit(W, beta=0.8, deflate=False).n_above >= 1
    assert old_nonzero >= 1  # it is ~0.75 a draw (test_tracy_widom_calibration has the rate)


def test_default_deflation_counts_many_spikes():
    # Many spikes for the smaller side reach into the fit window and inflate the plain fit's
    # sigma^2. 20 spikes in 48 x 64 at 6-10x the BBP threshold (3-5x the noise edge, as the
    # 20-spike layer of tests/test_rmt_pruners.py): the plain fit puts sigma^2 ~20x too high
    # and counts a few. The default refits on the p - k smallest values until the count k
    # is stable.
    for seed in range(3):
        W = _planted_bbp(48, 64, 20, seed=seed, lo=6.0, hi=10.0)
        plain, fit = mp.mp_edge_fit(W, deflate=False), mp.mp_edge_fit(W)
        assert plain.sigma2 > 5.0 and plain.n_above < 10
        assert fit.n_above == 20
        assert fit.sigma2 == pytest.approx(1.0, rel=0.15)
        s = torch.linalg.svdvals(W).numpy()
        assert fit.sigma2 == mp._bulk_fit(s, 64, 48, 20, mp.DEFAULT_ALPHA)[0]  # the fixed point
        assert mp.mp_edge_fit(W, beta=0.8, deflate=False).n_above < 20  # the public code's edge
    # 10 spikes at 2-4x BBP in the conv-like 64 x 576, both orientations
    for shape in [(64, 576), (576, 64)]:
        for seed in range(3):
            assert mp.mp_edge_fit(_planted_bbp(*shape, 10, seed=seed)).n_above == 10, (shape, seed)


def test_default_matches_rmt_config_and_layer_report():
    from baselines.rmt import RMTConfig

    cfg = RMTConfig()
    assert (cfg.alpha, cfg.beta, cfg.deflate) == (mp.DEFAULT_ALPHA, mp.DEFAULT_BETA, mp.DEFAULT_DEFLATE)
    assert (mp.DEFAULT_ALPHA, mp.DEFAULT_BETA, mp.DEFAULT_DEFLATE) == (0.25, 0.01, True)
    W = _planted_bbp(128, 512, 3, seed=0)
    a, b = mp.mp_edge_fit(W), mp.mp_edge_fit_svals(torch.linalg.svdvals(W).numpy(), (128, 512))
    assert a.to_dict() == b.to_dict()
    assert mp.mp_edge_fit(W, beta=cfg.beta, alpha=cfg.alpha, deflate=cfg.deflate).to_dict() == a.to_dict()
    lin = nn.Linear(512, 128)
    with torch.no_grad():
        lin.weight.copy_(W)
    row = mp.mp_layer_report([("fc", lin)])[0]
    assert row["n_above"] == 3 and row["tw_t"] == mp.tw1_quantile(0.99)


def test_spike_below_bbp_threshold_is_invisible():
    # theta = 0.5 (N M)^(1/4) sigma is under the BBP threshold: no outlier appears
    N, Mi = 300, 1200
    g = torch.Generator().manual_seed(5)
    Z = torch.randn(N, Mi, generator=g, dtype=torch.float64)
    u = torch.nn.functional.normalize(torch.randn(N, 1, generator=g, dtype=torch.float64), dim=0)
    v = torch.nn.functional.normalize(torch.randn(Mi, 1, generator=g, dtype=torch.float64), dim=0)
    W = Z + 0.5 * (N * Mi) ** 0.25 * u @ v.T
    assert mp.mp_edge_fit(W, beta=0.01).n_above == 0
    assert mp.mp_edge_fit(Z + 3 * (N * Mi) ** 0.25 * u @ v.T, beta=0.01).n_above == 1


def test_ks_separates_mp_bulk_from_flat_spectrum():
    noise = mp.mp_edge_fit(_noise((200, 800), 1.0, seed=11))
    Q, _ = torch.linalg.qr(_noise((800, 200), 1.0, seed=12))  # orthonormal columns: all s = 1
    flat = mp.mp_edge_fit(Q.T)
    assert noise.ks < 0.03
    assert flat.ks > 0.2


def test_conv_weight_uses_out_by_in_kh_kw_view():
    g = torch.Generator().manual_seed(0)
    W2 = torch.randn(64, 288, generator=g, dtype=torch.float64)
    u = torch.nn.functional.normalize(torch.randn(64, generator=g, dtype=torch.float64), dim=0)
    v = torch.nn.functional.normalize(torch.randn(288, generator=g, dtype=torch.float64), dim=0)
    W2 = W2 + 3 * (64**0.5 + 288**0.5) * torch.outer(u, v)
    W4 = W2.reshape(64, 32, 3, 3)
    assert torch.equal(mp.matrix_view(W4)[5, 9 * 7 + 3 * 2 + 1], W4[5, 7, 2, 1])
    fit4, fit2 = mp.mp_edge_fit(W4, beta=0.01), mp.mp_edge_fit(W2, beta=0.01)
    assert fit4.shape == (64, 288) and fit4.n_total == 64 and fit4.g == pytest.approx(64 / 288)
    assert fit4.to_dict() == fit2.to_dict()
    assert fit4.n_above == 1
    assert fit4.sigma2 == pytest.approx(1.0, rel=0.1)
    with pytest.raises(ValueError):
        mp.mp_edge_fit(torch.randn(10))


def test_layer_report_reads_the_stored_weight():
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(16, 32, 3), nn.Linear(256, 64)
    p = masks.attach(lin, masks.MaskedWeight(lin.weight.shape))
    p.mask.zero_()  # effective weight all zero; the report must still see the dense weight
    rows = mp.mp_layer_report([("conv", conv), ("fc", lin)])
    assert [r["layer"] for r in rows] == ["conv", "fc"]
    assert rows[0]["shape"] == [32, 144] and rows[1]["shape"] == [64, 256]
    ref = mp.mp_edge_fit(masks.stored_weight(lin))
    assert rows[1]["sigma2"] == pytest.approx(ref.sigma2) and rows[1]["sigma2"] > 0
    # default init is U(-1/sqrt(fan_in), 1/sqrt(fan_in)): entry variance 1 / (3 fan_in)
    assert rows[1]["sigma2"] == pytest.approx(1 / (3 * 256), rel=0.15)
    for r in rows:
        assert r["frac_below"] == pytest.approx(1 - r["n_above"] / r["n_total"])
        assert {"sv_edge", "n_above", "ks", "lambda_plus_corrected"} <= set(r)


# ----------------------------------------------------------------------------- SEB
def _fits_with_edges(edges):
    return [
        mp.MPFit(
            shape=(1, 1),
            g=1.0,
            sigma2=1.0,
            lambda_plus=4.0,
            lambda_plus_corrected=4.0,
            sv_edge=e,
            n_above=0,
            n_total=1,
            ks=0.0,
            tw_t=0.0,
            sv_max=e,
        )
        for e in edges
    ]


def test_seb_layer_weights_formula():
    fits = _fits_with_edges([1.0, 2.0, 3.0])
    z = np.array([-1.0, 0.0, 1.0]) * math.sqrt(1.5)  # population z-scores of 1, 2, 3
    w = mp.seb_layer_weights(fits, s=0.5, b=1.0, s_d=1.0, p=1.0)
    assert w == pytest.approx(list(1 + 0.5 * z))
    w = mp.seb_layer_weights(fits, s=0.2, b=2.0, s_d=0.8, p=2.0)  # d = (1 - 0.25)^2
    assert w == pytest.approx(list(np.maximum(0.1, 1 + 2.0 * 0.5625 * z)))
    assert mp.seb_layer_weights(fits, s=0.0, b=5.0)[0] == 0.1  # floor
    assert mp.seb_layer_weights(fits, s=0.9, s_d=0.7) == [1.0, 1.0, 1.0]  # d = 0 past s_d
    assert mp.seb_layer_weights(_fits_with_edges([2.0, 2.0]), s=0.3) == [1.0, 1.0]


@pytest.mark.parametrize("s", [0.3, 0.5, 0.7])
def test_seb_masks_prune_large_edge_layers_harder(s):
    # same entry distribution, different shapes: edges 16, 24, 32 (z = -1.22, 0, +1.22)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(n, n, generator=g) for n in (64, 144, 256)]
    fits = [mp.mp_edge_fit(w) for w in weights]
    assert fits[0].sv_edge < fits[1].sv_edge < fits[2].sv_edge
    total = sum(w.numel() for w in weights)
    seb = mp.seb_masks(weights, fits, s)
    plain = masks.magnitude_masks(weights, s, "global")

    def zeros(ms):
        return [int((m == 0).sum()) for m in ms]

    assert sum(zeros(seb)) == round(s * total)
    frac_seb = [z / w.numel() for z, w in zip(zeros(seb), weights)]
    frac_plain = [z / w.numel() for z, w in zip(zeros(plain), weights)]
    assert frac_seb[0] < frac_seb[1] < frac_seb[2]
    assert frac_seb[2] > frac_plain[2] + 0.02 and frac_seb[0] < frac_plain[0] - 0.02
    # past s_d the budgeting switches off: exactly plain global magnitude
    off = mp.seb_masks(weights, fits, s, s_d=s)
    assert all(torch.equal(a, b) for a, b in zip(off, plain))


# ----------------------------------------------------------------------------- SER
def test_ser_restore_hits_target_with_top_scores():
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(40, 30, generator=g), torch.randn(20, 10, 3, 3, generator=g)]
    total = sum(w.numel() for w in ws)
    s, rho = 0.6, 1.3
    over = masks.magnitude_masks(ws, rho * s, "global")
    scores = [torch.rand(w.shape, generator=g) for w in ws]
    for sc, m in zip(scores, over):
        sc[m == 1] = 1e9  # kept entries: their scores must be ignored
    new = mp.ser_restore(over, scores, s)
    flat_old = torch.cat([m.reshape(-1) for m in over])
    flat_new = torch.cat([m.reshape(-1) for m in new])
    flat_sc = torch.cat([x.reshape(-1) for x in scores])
    assert int((flat_new == 0).sum()) == round(s * total)
    assert torch.all(flat_new[flat_old == 1] == 1)  # nothing newly pruned
    restored = (flat_old == 0) & (flat_new == 1)
    still_out = flat_new == 0
    n_restore = round(rho * s * total) - round(s * total)
    assert int(restored.sum()) == n_restore
    assert flat_sc[restored].min() > flat_sc[still_out].max()  # exactly the top scores
    assert [m.shape for m in new] == [w.shape for w in ws]
    # helper: score = |dw| * w_l
    assert mp.ser_scores([torch.tensor([-2.0, 1.0])], [1.5])[0].tolist() == [3.0, 1.5]
    # no-op at the over-pruned level, error when the masks are not over-pruned
    same = mp.ser_restore(over, scores, round(rho * s * total) / total)
    assert all(torch.equal(a, b) for a, b in zip(same, over))
    with pytest.raises(ValueError):
        mp.ser_restore(over, scores, 0.9)
