"""Random-matrix (Marchenko-Pastur) building blocks for the RMT pruning baselines.

This module holds only the reusable math; the Pruner classes that use it live elsewhere.
See docs/baselines.md, "Marchenko-Pastur (random-matrix) pruning" (arXiv 2503.01922,
2606.02608). Contents:

- `mp_edge_fit(W)`       per-layer fit of the MP bulk and its upper edge (BEMA-style);
                         `mp_edge_fit_svals()` the same from given singular values
- `mp_layer_report()`    a per-layer diagnostic table built from those fits
- `seb_layer_weights()`  spectral-edge budgeting (SEB) layer weights w_l(s)
- `seb_scores()`, `seb_masks()`   global magnitude pruning on |W| / w_l
- `ser_scores()`, `ser_restore()` the restore step of prune-then-restore (SER)

Conventions (the doc leaves some of these open; they are fixed here)
--------------------------------------------------------------------
Matrix view. A Linear weight is used as it is, N = out rows by M = in columns; a Conv
weight (out, in, kh, kw) becomes out x (in * kh * kw) by a row-major reshape, so row r is
output channel r and column (c, i, j) is input channel c at kernel offset (i, j).

Normalisation. With n = max(N, M), p = min(N, M) and g = p / n (<= 1) the eigenvalues are
lambda_i = s_i^2 / n for the p singular values s_i. If W has i.i.d. entries of variance
sigma^2, these p eigenvalues follow the MP law with ratio g and scale sigma^2, whose
support is [sigma^2 (1 - sqrt g)^2, sigma^2 (1 + sqrt g)^2], in *both* orientations.
The doc divides by M (the input dimension) instead. That is the same thing when out <= in.
When out > in, s^2 / M has its edge at sigma^2 (1 + sqrt g)^2 / g. The textbook formula
then holds only if the fitted "sigma^2" takes up the 1/g factor, so it would no longer be
the entry variance. Dividing by max(N, M) keeps sigma2 equal to the entry variance for
every layer. The singular-value edge sv_edge = sqrt(n * lambda_plus_corrected) and the
count above it do not depend on this choice: both conventions give sv_edge =
sigma (sqrt N + sqrt M) before the finite-size correction. So the choice only changes the
reported sigma2 and lambda values.

Scale fit. Sort the eigenvalues ascending. The i-th one (0-based) sits at the plotting
position (i + 0.5) / p. The window is i in [floor(alpha p), floor((1 - alpha) p)).
sigma^2 minimises sum_i (lambda_i - sigma^2 q_i)^2 over the window, where q_i is the unit
MP quantile at the same position. That is sigma^2 = <q, lambda> / <q, q>. The MP
quantiles come from the density evaluated numerically. We substitute
x = a + (b - a)(1 - cos t) / 2, t in [0, pi], which turns the density into a smooth
function of t (also at g = 1, where it has a 1/sqrt(x) pole in x), and integrate it with a
cumulative trapezoid on a 4097-point grid t = pi u^2 (u uniform), which also resolves the
narrow peak near t = 0 when g is just below 1. The CDF is within ~1e-6 of the exact one.

Deflation (deflate=True, the default; rmt.deflate). Spikes that reach into the window
inflate sigma^2, and a higher sigma^2 raises the edge over spikes: 20 spikes in a 48 x 64
layer put the plain fit's sigma^2 ~20x too high. So once k values lie above the edge,
sigma^2 is refitted on the p - k smallest singular values alone. They are taken as the
singular values of an (n - k) x (p - k) noise matrix, which is what the bulk is once
strong spikes are projected out: eigenvalues s^2 / (n - k), the MP law with ratio
(p - k) / (n - k), the same window rule on p - k values. Then the count is redone. This
repeats until the count is stable; k is at most p / 2, and a count met before ends it. The
edge keeps the full shape (n, g), because the largest bulk value of a spiked matrix sticks
to the largest singular value of its noise part. ks is that of the final (bulk) fit. When
nothing lies above the edge (pure noise, typically) the fit is the plain one. deflate=False
is the one fit on all p values of the doc and the public code.

Tracy-Widom correction (Johnstone 2001; Ke, Ma & Lin's BEMA):
    lambda_plus           = sigma^2 (1 + sqrt g)^2
    lambda_plus_corrected = sigma^2 [(1 + sqrt g)^2 + t * n^(-2/3) g^(-1/6) (1 + sqrt g)^(4/3)]
The correction is multiplied by sigma^2 because the fluctuation scale of the top eigenvalue
grows with the noise variance, as the public code also does. The exponent is 4/3, not the
public code's `(1+sqrt g)**4/3`. Here n is the *larger* dimension, the one the
eigenvalues are divided by. Johnstone's scale for the top eigenvalue of
X^T X is (sqrt N + sqrt M)(1/sqrt N + 1/sqrt M)^(1/3). Divided by n that gives exactly
n^(-2/3) g^(-1/6) (1 + sqrt g)^(4/3). Taking the smaller dimension here would inflate
the correction by (n / p)^(2/3).
t is the (1 - beta) quantile of the GOE Tracy-Widom law TW_1, P(TW_1 <= t) = 1 - beta, as
written t_(1-beta) in the doc and computed as `TracyWidom(beta=1).cdfinv(1 - beta)` in the
public code. beta is therefore the asymptotic probability that the largest eigenvalue of a
pure-noise matrix lands above the corrected edge. beta = 0.01 (the default) gives
t = +2.0234, just outside the asymptotic edge; beta = 0.8 gives t = -2.2832, slightly
*inside* it, so a pure-noise matrix usually shows one, sometimes two, singular values above
it (measured: the share of noise matrices with at least one is close to beta).

Default beta (0.01; rmt.beta, RMTConfig in baselines/rmt.py)
------------------------------------------------
The MP pruning papers (arXiv 2503.01922, 2606.02608) take the edge from BEMA (Ke, Ma & Lin):
fit sigma^2 on the central eigenvalues, then add t_(1-beta) times the Tracy-Widom scale. In
BEMA, beta is the level of a test: the count above the edge estimates the number of spikes,
and beta is the chance that pure noise adds one. The papers' public code
(yspennstate/RMT_pruning_ViT prune.py: alpha = 0.25, beta = 0.8; every
bema_inside(..., ALPHA, 0.8) call and BETA = 0.8 in yspennstate/RMT_based_pruning_in_deep_learning)
uses beta = 0.8 instead. That puts the edge inside the bulk, which pure noise crosses about
four times in five. We follow BEMA's reading and make the default a small test level,
beta = 0.01, because the RMT pruners use the count: in classical RMT the share of values at
or below the edge sets each layer's budget, and the components below the edge are the ones
denoised. A count that calls noise signal would bias both. Pass beta = 0.8, deflate =
False (rmt.beta: 0.8, rmt.deflate: false) to get the public code's edge back.

Measured over 200 Gaussian draws per configuration (scripts/mp_fit_check.py; 7 shapes
from 64 x 576 to 1200 x 300, both orientations; k = 1, 3, 10 spikes at 2-4x the BBP
threshold sigma (N M)^(1/4), k = 10 where the smaller side is >= 128):
- public code (beta = 0.8, one fit): exactly k in 33-100 % of the draws (k = 1: 33-51 %),
  0 on pure noise in only 18-26 %.
- default (beta = 0.01, deflated): exactly k in 97.5-100 % (mean 99.6 %), and never fewer
  than k. 0 on pure noise in 97-100 % (mean 98.9 %; 98.9-99.5 % over 1000 draws on four
  shapes, as the level predicts).
- Many spikes for the smaller side: 10 of 64 and 20 of 48 (at 6-10x BBP) are counted
  exactly in 100 % of the draws by the default. The one-fit edge at beta = 0.01 never gets
  the 20 of 48 right.
The default edge is 1-2 % (in singular values) above the asymptotic sigma (sqrt N + sqrt M)
and 2-4 % above the 0.8 edge, for these shapes. The weakest spike (2x BBP) stayed at least
9 % above it in every draw, so no real spike is lost.

Goodness of fit (KS-style): ks = max over the window of |F_emp - F_MP(lambda_i / sigma^2)|.
F_emp steps from i/p to (i+1)/p at the i-th eigenvalue and both sides of the step are used,
so ks >= 1 / (2p) for any fit.

Only numpy and torch are used (scipy is not a dependency of the suite). The TW_1 quantiles
are a table, see `_TW1_QUANTILES`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Optional, cast

import numpy as np
import torch
import torch.nn as nn

from suite.pruning import masks

# ----------------------------------------------------------------------------- Tracy-Widom
# Quantiles of TW_1 (GOE) at p = 0.01, 0.02, ..., 0.99. Computed once offline to 1e-10.
# Method (Bornemann 2010): Nystrom discretisation of F_1(s) = det(I - A_s) on L^2(0, inf),
# A_s(u, v) = Ai(s + u + v), with 80 Gauss-Legendre nodes; cross-checked with 140 nodes
# (max quantile change 2e-13). Check values: mean -1.20653, sd 1.26799; Johnstone (2001,
# Table 1) lists -3.90, -3.18, -2.78, -1.91, -1.27, -0.59, 0.45, 0.98, 2.02 at
# p = .01 .05 .10 .30 .50 .70 .90 .95 .99, all matched by the rounded table below.
_TW1_P = np.round(np.arange(1, 100) / 100.0, 2)
_TW1_QUANTILES = np.array(
    [
        -3.8954,
        -3.6141,
        -3.4324,
        -3.2940,
        -3.1804,
        -3.0829,
        -2.9967,
        -2.9191,
        -2.8481,  # .01-.09
        -2.7824,
        -2.7211,
        -2.6633,
        -2.6086,
        -2.5565,
        -2.5067,
        -2.4589,
        -2.4128,
        -2.3683,  # .10-.18
        -2.3251,
        -2.2832,
        -2.2423,
        -2.2025,
        -2.1636,
        -2.1255,
        -2.0881,
        -2.0515,
        -2.0154,  # .19-.27
        -1.9799,
        -1.9449,
        -1.9104,
        -1.8763,
        -1.8426,
        -1.8092,
        -1.7761,
        -1.7434,
        -1.7108,  # .28-.36
        -1.6785,
        -1.6464,
        -1.6145,
        -1.5828,
        -1.5511,
        -1.5196,
        -1.4881,
        -1.4567,
        -1.4254,  # .37-.45
        -1.3941,
        -1.3627,
        -1.3314,
        -1.3000,
        -1.2686,
        -1.2371,
        -1.2054,
        -1.1737,
        -1.1418,  # .46-.54
        -1.1098,
        -1.0775,
        -1.0451,
        -1.0124,
        -0.9795,
        -0.9463,
        -0.9128,
        -0.8790,
        -0.8448,  # .55-.63
        -0.8102,
        -0.7752,
        -0.7397,
        -0.7037,
        -0.6672,
        -0.6300,
        -0.5923,
        -0.5538,
        -0.5147,  # .64-.72
        -0.4747,
        -0.4338,
        -0.3920,
        -0.3491,
        -0.3052,
        -0.2599,
        -0.2134,
        -0.1653,
        -0.1156,  # .73-.81
        -0.0641,
        -0.0105,
        0.0454,
        0.1038,
        0.1652,
        0.2299,
        0.2985,
        0.3717,
        0.4501,  # .82-.90
        0.5351,
        0.6279,
        0.7307,
        0.8463,
        0.9793,
        1.1371,
        1.3332,
        1.5978,
        2.0234,  # .91-.99
    ]
)


def tw1_quantile(prob: float) -> float:
    """t with P(TW_1 <= t) = prob, for prob in [0.01, 0.99]: exact at the table's points,
    linear in between (the table step is 0.01)."""
    prob = round(float(prob), 10)  # so that 1 - 0.8 = 0.19999999999999996 hits the 0.20 entry
    if not 0.01 <= prob <= 0.99:
        raise ValueError(f"TW_1 quantile level {prob} outside the tabulated range [0.01, 0.99]")
    return float(np.interp(prob, _TW1_P, _TW1_QUANTILES))


# ----------------------------------------------------------------------------- MP law
_GRID = 4097


@lru_cache(maxsize=256)
def _mp_table(g: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Unit-variance MP law, ratio g in (0, 1]: (t grid, CDF on it, a, b), x(t) = a + c (1 - cos t)."""
    if not 0.0 < g <= 1.0:
        raise ValueError(f"aspect ratio g must lie in (0, 1], got {g}")
    rg = math.sqrt(g)
    a, b = (1.0 - rg) ** 2, (1.0 + rg) ** 2
    c = (b - a) / 2.0
    # t = pi u^2 with u uniform: fine steps near t = 0, where for g just below 1 (a tiny
    # but not 0) the density has a narrow peak of width ~ sqrt(a) in t
    t = math.pi * np.linspace(0.0, 1.0, _GRID) ** 2
    # density in t: f(x) dx/dt = c^2 sin^2 t / (2 pi g x(t)), rewritten with 1 - cos t =
    # 2 sin^2(t/2) so that the a = 0 case (g = 1) has no 0/0 at t = 0
    h = np.sin(t / 2.0) ** 2
    num = 4.0 * c * c * h * np.cos(t / 2.0) ** 2
    den = 2.0 * math.pi * g * (a + 2.0 * c * h)
    if a > 0.0:
        dens = num / den
    else:
        dens = 4.0 * c * c * np.cos(t / 2.0) ** 2 / (2.0 * math.pi * g * 2.0 * c)
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) * 0.5 * np.diff(t))])
    cdf /= cdf[-1]  # the raw trapezoid total is 1 to ~1e-7
    return t, cdf, a, b


def mp_quantile(prob: np.ndarray, g: float) -> np.ndarray:
    """Quantiles of the unit-variance MP law with ratio g <= 1 (support [(1-sqrt g)^2, (1+sqrt g)^2])."""
    t, cdf, a, b = _mp_table(float(g))
    tp = np.interp(np.asarray(prob, dtype=np.float64), cdf, t)
    return cast(np.ndarray, a + (b - a) / 2.0 * (1.0 - np.cos(tp)))  # numpy types np.interp of an array as Any


def mp_cdf(x: np.ndarray, g: float) -> np.ndarray:
    """Distribution function of the unit-variance MP law with ratio g <= 1."""
    t, cdf, a, b = _mp_table(float(g))
    u = 1.0 - 2.0 * (np.asarray(x, dtype=np.float64) - a) / (b - a)
    return cast(np.ndarray, np.interp(np.arccos(np.clip(u, -1.0, 1.0)), t, cdf))


# ----------------------------------------------------------------------------- edge fit
@dataclass
class MPFit:
    shape: tuple[int, int]  # matrix view (N out, M in) the fit used
    g: float  # min(N, M) / max(N, M)
    sigma2: float  # fitted entry variance
    lambda_plus: float  # sigma2 (1 + sqrt g)^2, eigenvalues = s^2 / max(N, M)
    lambda_plus_corrected: float  # lambda_plus + Tracy-Widom finite-size term
    sv_edge: float  # sqrt(max(N, M) * lambda_plus_corrected), singular-value units
    n_above: int  # singular values strictly above sv_edge
    n_total: int  # number of singular values, min(N, M)
    ks: float  # max |F_emp - F_MP| over the fit window
    tw_t: float  # the TW_1 quantile used, P(TW_1 <= tw_t) = 1 - beta
    sv_max: float  # largest singular value

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d


def matrix_view(W: torch.Tensor) -> torch.Tensor:
    """2-D view of a weight: Linear as is, Conv (out, in, kh, kw) -> out x (in * kh * kw)."""
    if W.dim() < 2:
        raise ValueError(f"need a weight with at least 2 dimensions, got shape {tuple(W.shape)}")
    return W.reshape(W.shape[0], -1)


DEFAULT_ALPHA = 0.25  # fit window: the central half of the eigenvalues (the public code's alpha)
DEFAULT_BETA = 0.01  # TW tail probability of the edge; see "Default beta" in the module docstring
DEFAULT_DEFLATE = True  # fit sigma^2 on the bulk without the values counted above the edge
# quantile position of the i-th smallest value in the scale fit: (i + 0.5) / p, the midpoint of
# its probability cell; the public code (RMT_pruning_ViT RMT.py:172 at b839c13) uses i / p
DEFAULT_QUANTILE_OFFSET = 0.5


@torch.no_grad()
def mp_edge_fit(
    W: torch.Tensor,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    deflate: bool = DEFAULT_DEFLATE,
    quantile_offset: float = DEFAULT_QUANTILE_OFFSET,
) -> MPFit:
    """Fit the MP bulk of one weight tensor and locate its upper edge (module docstring has
    the conventions). alpha: window quantiles alpha .. 1 - alpha; beta: TW level, the edge
    uses the (1 - beta) quantile of TW_1, so beta is the chance that pure noise shows a
    singular value above it (default 0.01: count the spikes that are there, not noise);
    deflate: refit sigma^2 without the values above the edge until the count is stable
    (False: one fit on all p values, as the public code)."""
    X = matrix_view(W.detach()).to("cpu", torch.float64)
    shape = cast("tuple[int, int]", tuple(X.shape))  # matrix_view: 2-D
    return mp_edge_fit_svals(
        torch.linalg.svdvals(X).numpy(), shape, alpha=alpha, beta=beta, deflate=deflate, quantile_offset=quantile_offset
    )


def _bulk_fit(
    s: np.ndarray, n: int, p: int, k: int, alpha: float, offset: float = DEFAULT_QUANTILE_OFFSET
) -> tuple[float, float]:
    """(sigma2, ks) of the p - k smallest singular values (s descending) taken as the
    singular values of an (n - k) x (p - k) noise matrix: eigenvalues s^2 / (n - k) against
    the unit MP law with ratio (p - k) / (n - k). k = 0 is the plain fit."""
    nk, pk = n - k, p - k
    gk = pk / nk
    lam = np.sort(s[k:] ** 2 / nk)  # ascending
    lo, hi = int(alpha * pk), int((1.0 - alpha) * pk)
    if hi <= lo:
        raise ValueError(f"empty fit window for {pk} singular values at alpha={alpha}")
    idx = np.arange(lo, hi)
    q = mp_quantile((idx + offset) / pk, gk)
    sigma2 = float(np.dot(q, lam[idx]) / np.dot(q, q))
    if sigma2 > 0.0:
        F = mp_cdf(lam[idx] / sigma2, gk)
        ks = float(np.max(np.maximum(np.abs(idx / pk - F), np.abs((idx + 1) / pk - F))))
    else:  # an all-zero matrix: no bulk to compare with
        ks = float("nan")
    return sigma2, ks


def mp_edge_fit_svals(
    s: np.ndarray,
    shape: tuple[int, int],
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    deflate: bool = DEFAULT_DEFLATE,
    quantile_offset: float = DEFAULT_QUANTILE_OFFSET,
) -> MPFit:
    """`mp_edge_fit` from the singular values `s` (any order) of an N x M matrix view, so
    that several settings can be tried on one SVD (scripts/mp_fit_check.py does)."""
    if not 0.0 <= alpha < 0.5:
        raise ValueError(f"alpha must lie in [0, 0.5), got {alpha}")
    N, Mi = int(shape[0]), int(shape[1])
    n, p = max(N, Mi), min(N, Mi)
    s = np.sort(np.asarray(s, dtype=np.float64))[::-1]  # descending
    if s.shape != (p,):
        raise ValueError(f"expected {p} singular values for shape {(N, Mi)}, got {s.shape}")
    g = p / n
    rg = math.sqrt(g)
    t_tw = tw1_quantile(1.0 - beta)
    edge_unit = (1.0 + rg) ** 2 + t_tw * n ** (-2.0 / 3.0) * g ** (-1.0 / 6.0) * (1.0 + rg) ** (4.0 / 3.0)
    # deflation: at most half the values, and the window must keep at least one value
    k_max = p // 2
    while k_max > 0 and int((1.0 - alpha) * (p - k_max)) <= int(alpha * (p - k_max)):
        k_max -= 1
    k, seen = 0, set()
    while True:
        seen.add(k)
        sigma2, ks = _bulk_fit(s, n, p, k, alpha, quantile_offset)
        sv_edge = math.sqrt(n * max(sigma2 * edge_unit, 0.0))
        n_above = int(np.sum(s > sv_edge))
        k_next = min(n_above, k_max)
        if not deflate or k_next in seen:  # a fixed point (or, in odd spectra, a cycle / the cap)
            break
        k = k_next
    return MPFit(
        shape=(N, Mi),
        g=g,
        sigma2=sigma2,
        lambda_plus=sigma2 * (1.0 + rg) ** 2,
        lambda_plus_corrected=sigma2 * edge_unit,
        sv_edge=sv_edge,
        n_above=n_above,
        n_total=int(p),
        ks=ks,
        tw_t=t_tw,
        sv_max=float(s[0]) if p else 0.0,
    )


def mp_layer_report(
    layers: Sequence[tuple[str, nn.Module]],
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    deflate: bool = DEFAULT_DEFLATE,
) -> list[dict[str, Any]]:
    """One row per prunable layer: the MP fit of its dense stored weight plus the share of
    singular values at or below the edge (the noise share the RMT method prunes by)."""
    rows = []
    for name, mod in layers:
        fit = mp_edge_fit(masks.stored_weight(mod), alpha=alpha, beta=beta, deflate=deflate)
        row = {"layer": name, **fit.to_dict()}
        row["frac_below"] = 1.0 - fit.n_above / fit.n_total
        row["edge_ratio"] = fit.sv_max / fit.sv_edge if fit.sv_edge > 0 else float("nan")
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- SEB / SER
# The doc gives the form of w_l(s) but not b, s_d or p. Defaults chosen here: b = 1 (one
# standard deviation of edge changes a layer's weight by d(s)), s_d = 1 (the budgeting
# fades linearly to nothing at s = 1 rather than switching off at some sparsity the papers
# never name), p = 1 (linear fade).
SEB_B, SEB_SD, SEB_P = 1.0, 1.0, 1.0


def seb_layer_weights(
    fits: Sequence[MPFit], s: float, b: float | Sequence[float] = SEB_B, s_d: float = SEB_SD, p: float = SEB_P
) -> list[float]:
    """w_l(s) = max(0.1, 1 + b d(s) z_l), d(s) = max(0, 1 - s / s_d)^p, z_l the z-score of
    sv_edge across the given layers (population std); b one value, or one per layer (the
    paper's high-sparsity regime weights attention and MLP layers differently). Equal edges, or
    a single layer, give z = 0 and w = 1 everywhere (plain global magnitude)."""
    edges = np.array([f.sv_edge for f in fits], dtype=np.float64)
    sd = float(edges.std()) if len(edges) > 1 else 0.0
    z = (edges - edges.mean()) / sd if sd > 0.0 else np.zeros_like(edges)
    d = max(0.0, 1.0 - s / s_d) ** p
    bs = [float(b)] * len(z) if isinstance(b, (int, float)) else [float(x) for x in b]
    if len(bs) != len(z):
        raise ValueError(f"{len(bs)} values of b for {len(z)} layers")
    return [max(0.1, 1.0 + bl * d * float(zl)) for bl, zl in zip(bs, z)]


def seb_paper_regime(s: float, names: Sequence[str]) -> tuple[list[float], float]:
    """(b per layer, s_d) of the SEB paper's regimes at target sparsity s (arXiv 2606.02608;
    RMT_based_pruning_in_deep_learning @ d7c0cff, cast_2e/methodology.tex:1079-1085, 1179-1183,
    run_finetune_pipeline.py:69-82): below 0.30 plain magnitude (b = 0); 0.30-0.40 b 1.0, s_d 0.50;
    to 0.55 b 1.25, s_d 0.70; above, s_d 0.85 with b 1.0 for attention layers, 2.0 for MLP layers
    and 1.5 for the others (its classify_layer_type: 'attn' in the name; 'mlp' or '.fc')."""
    if s < 0.30:
        return [0.0] * len(names), 1.0
    if s <= 0.40:
        return [1.0] * len(names), 0.50
    if s <= 0.55:
        return [1.25] * len(names), 0.70

    def kind(n: str) -> float:
        return 1.0 if "attn" in n else 2.0 if ("mlp" in n or ".fc" in n) else 1.5

    return [kind(n) for n in names], 0.85


def seb_scores(weights: Sequence[torch.Tensor], layer_weights: Sequence[float]) -> list[torch.Tensor]:
    """|W| / w_l per layer: the quantity SEB prunes by (smallest first)."""
    return [w.detach().abs() / wl for w, wl in zip(weights, layer_weights)]


def seb_masks(
    weights: Sequence[torch.Tensor],
    fits: Sequence[MPFit],
    sparsity: float,
    b: float | Sequence[float] = SEB_B,
    s_d: float = SEB_SD,
    p: float = SEB_P,
    budget_sparsity: Optional[float] = None,
) -> list[torch.Tensor]:
    """0/1 masks removing the round(sparsity * N) smallest |W| / w_l over all layers together.
    w_l is evaluated at `budget_sparsity` (default: `sparsity`); SER over-prunes to rho * s
    with the weights of the final target s, so it passes budget_sparsity = s."""
    if len(weights) != len(fits):
        raise ValueError(f"{len(weights)} weights but {len(fits)} fits")
    s_b = sparsity if budget_sparsity is None else budget_sparsity
    wl = seb_layer_weights(fits, s_b, b=b, s_d=s_d, p=p)
    return masks.magnitude_masks(seb_scores(weights, wl), sparsity, "global")


def ser_scores(dws: Sequence[torch.Tensor], layer_weights: Sequence[float]) -> list[torch.Tensor]:
    """Restore score |dw| * w_l(s) per weight (only the removed entries are looked at)."""
    return [dw.detach().abs() * wl for dw, wl in zip(dws, layer_weights)]


@torch.no_grad()
def ser_restore(
    masks_over: Sequence[torch.Tensor], dw_scores: Sequence[torch.Tensor], target_sparsity: float
) -> list[torch.Tensor]:
    """Restore (set to 1) the removed entries with the highest scores until exactly
    round(target_sparsity * N) zeros remain over all masks together. Entries the
    over-pruned masks kept are never touched; scores of kept entries are ignored. Ties
    among equal scores are broken by torch.topk. Raises if the masks already have fewer
    zeros than the target (they were not over-pruned)."""
    if len(masks_over) != len(dw_scores):
        raise ValueError(f"{len(masks_over)} masks but {len(dw_scores)} score tensors")
    for m, sc in zip(masks_over, dw_scores):
        if m.shape != sc.shape:
            raise ValueError(f"mask shape {tuple(m.shape)} != score shape {tuple(sc.shape)}")
    flat_m = torch.cat([m.detach().reshape(-1) for m in masks_over])
    flat_s = torch.cat([sc.detach().reshape(-1).to(torch.float64) for sc in dw_scores])
    total = flat_m.numel()
    k_target = int(round(target_sparsity * total))
    removed = torch.nonzero(flat_m == 0).reshape(-1)
    n_restore = removed.numel() - k_target
    if n_restore < 0:
        raise ValueError(f"masks have {removed.numel()} zeros, fewer than the target {k_target}")
    new = flat_m.clone()
    if n_restore > 0:
        sc = torch.nan_to_num(flat_s[removed], nan=-math.inf)
        pick = torch.topk(sc, n_restore, largest=True).indices
        new[removed[pick]] = 1
    out, i = [], 0
    for m in masks_over:
        out.append(new[i : i + m.numel()].view_as(m).to(m.dtype))
        i += m.numel()
    return out
