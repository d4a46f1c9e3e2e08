"""The comparison protocol, checked on the runs themselves: equal budgets, targets hit, enough
seeds, the same shared hyper-parameters; paired statistics with a multiple-comparison correction;
accuracy at each target sparsity read off each method's own curve.

Everything here works on `reports.records.RunRecord`s of one (dataset, model) section and returns
plain rows for the report writers:

- `interpolate_at(points, s)`: a method's accuracy at sparsity s from its (achieved sparsity,
  accuracy) points, by monotone cubic (PCHIP, scipy) interpolation in x = log(1 - s); None
  outside the measured range (never extrapolated).
- `comparisons(...)`: per (method, target) the paired difference from its equal-budget control
  (same seed: the same dense start), a 95 % t interval and a p value (scipy.stats), Holm-corrected
  over every comparison of the section (statsmodels), and the call: better / worse only when the
  corrected test rejects, else "no difference".
- `checks(...)`: per (method, target) the protocol flags: budget ratio outside 0.95-1.05 of the
  control, target missed by more than 1 pp, fewer than 3 seeds, a shared hyper-parameter that
  differs from the control's; and how far the end-of-search snap moved a calibrated method.
- `convergence(...)`: whether the dense model had converged: the paired gain of a dense run
  trained for twice the budget (grid.dense_convergence) over the dense start, against
  CONVERGED_PP.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

BUDGET_RANGE = (0.95, 1.05)
TARGET_MISS_PP = 1.0  # flag: achieved sparsity further than this from the target
EQUAL_SPARSITY_PP = 0.5  # "missed (achieved X %)": left out of the ranking at that target
MIN_SEEDS = 3
ALPHA = 0.05
CONVERGED_PP = 0.2  # the dense start counts as converged when doubling its budget gains less than this
DOUBLED = (1.9, 2.1)  # a dense control of this budget ratio to the dense start is its doubling
# run fields every compared run should share with its control (method-specific settings and the
# LR, which fine-tuning legitimately lowers, are not in this list)
SHARED = (
    "dataset",
    "model",
    "batch_size",
    "weight_decay",
    "weight_decay_on",
    "momentum",
    "nesterov",
    "label_smoothing",
    "engine.precision",
    "engine.world_size",
)


def _x(s: float) -> float:
    return math.log(max(1.0 - s, 1e-12))


def interpolate_at(points: list[tuple[float, float]], s: float) -> Optional[float]:
    """Accuracy at sparsity `s` on the monotone (PCHIP) interpolant through `points` (achieved
    sparsity, accuracy) in x = log(1 - sparsity); points at the same sparsity are averaged. None
    when s lies outside the measured sparsities, or with fewer than two distinct points (unless s
    is one of them)."""
    by: dict[float, list[float]] = defaultdict(list)
    for sp, acc in points:
        by[round(sp, 9)].append(acc)
    xs_s = sorted(by)
    if not xs_s or not (xs_s[0] - 1e-9 <= s <= xs_s[-1] + 1e-9):
        return None
    if len(xs_s) == 1:
        return statistics.fmean(by[xs_s[0]])
    xs = [_x(v) for v in reversed(xs_s)]  # x decreases as sparsity grows: reverse for ascending x
    ys = [statistics.fmean(by[v]) for v in reversed(xs_s)]
    return pchip(xs, ys, _x(s))


def _sign(v: float) -> int:
    return (v > 0) - (v < 0)


def _pchip_slopes(h: list[float], m: list[float]) -> list[float]:
    """Fritsch-Carlson derivatives at the knots (interval widths h, secant slopes m): zero at a
    local extremum, else the weighted harmonic mean of the two secants; at the ends the one-sided
    three-point estimate, kept to the sign of the end secant and to three times its size."""
    if len(m) == 1:
        return [m[0], m[0]]
    d = [0.0] * (len(m) + 1)
    for k in range(1, len(m)):
        if _sign(m[k - 1]) * _sign(m[k]) > 0:
            w1, w2 = 2 * h[k] + h[k - 1], h[k] + 2 * h[k - 1]
            d[k] = (w1 + w2) / (w1 / m[k - 1] + w2 / m[k])

    def end(h0: float, h1: float, m0: float, m1: float) -> float:
        e = ((2 * h0 + h1) * m0 - h0 * m1) / (h0 + h1)
        if _sign(e) != _sign(m0):
            return 0.0
        if _sign(m0) != _sign(m1) and abs(e) > 3 * abs(m0):
            return 3 * m0
        return e

    d[0] = end(h[0], h[1], m[0], m[1])
    d[-1] = end(h[-1], h[-2], m[-1], m[-2])
    return d


def pchip(xs: list[float], ys: list[float], x: float) -> float:
    """The monotone piecewise cubic Hermite interpolant (PCHIP) through (xs ascending, ys) at x,
    clamped to [xs[0], xs[-1]]. The same curve as scipy's PchipInterpolator, which the tests
    check; written out because importing scipy.interpolate costs the report build half a second."""
    h = [b - a for a, b in zip(xs, xs[1:])]
    m = [(y1 - y0) / w for y0, y1, w in zip(ys, ys[1:], h)]
    d = _pchip_slopes(h, m)
    x = min(max(x, xs[0]), xs[-1])
    k = max(0, min(bisect.bisect_right(xs, x) - 1, len(h) - 1))
    t = (x - xs[k]) / h[k]
    h00, h10 = (1 + 2 * t) * (1 - t) ** 2, t * (1 - t) ** 2
    h01, h11 = t * t * (3 - 2 * t), t * t * (t - 1)
    return h00 * ys[k] + h10 * h[k] * d[k] + h01 * ys[k + 1] + h11 * h[k] * d[k + 1]


@dataclass
class Comparison:
    method: str
    target: Optional[float]
    control: str
    n_pairs: int
    diff: Optional[float] = None  # mean paired difference, accuracy units
    ci: Optional[float] = None  # 95 % t half-width
    p: Optional[float] = None
    p_holm: Optional[float] = None
    call: str = "n/a"


def paired(a: dict[Any, float], b: dict[Any, float]) -> tuple[int, Optional[float], Optional[float], Optional[float]]:
    """(pairs, mean difference a - b, 95 % t half-width, two-sided p) over the seeds both have."""
    from scipy.special import stdtr

    from reports.stats import t975

    keys = sorted(set(a) & set(b), key=str)
    d = [a[k] - b[k] for k in keys]
    if not d:
        return 0, None, None, None
    m = statistics.fmean(d)
    if len(d) < 2:
        return len(d), m, None, None
    sd = statistics.stdev(d)
    if sd == 0.0:
        return len(d), m, 0.0, (0.0 if m != 0 else 1.0)
    se = sd / math.sqrt(len(d))
    hw = t975(len(d) - 1) * se
    # scipy's Student t distribution function (what scipy.stats.t.sf wraps): two-sided p
    p = float(2 * stdtr(len(d) - 1, -abs(m) / se))
    return len(d), m, hw, p


def holm_adjust(ps: list[float]) -> list[float]:
    """Holm's step-down adjusted p values, in the order given: the i-th smallest p times the
    number of hypotheses not yet rejected (m - i + 1), carried forward as a running maximum and
    capped at 1. The same numbers as statsmodels' multipletests(method="holm"), which the tests
    check; written out because importing statsmodels costs the report build a second and a half."""
    m = len(ps)
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda k: ps[k])):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


def holm(comps: list[Comparison]) -> None:
    """Holm-corrected p values and calls, over the comparisons that have a p value."""
    tested = [c for c in comps if c.p is not None and math.isfinite(c.p)]  # a NaN p is no test
    for c, pa in zip(tested, holm_adjust([c.p for c in tested])):  # type: ignore[misc]
        c.p_holm = pa
        c.call = ("better" if c.diff > 0 else "worse") if pa <= ALPHA else "no difference"
    for c in comps:
        if (
            c.p is None or not math.isfinite(c.p)
        ) and c.call == "n/a":  # a call set by the caller (e.g. no control) stays
            c.call = "n/a (fewer than 2 paired seeds)" if c.n_pairs < 2 else "n/a"


@dataclass
class Check:
    method: str
    target: Optional[float]
    seeds: int
    budget_ratio: Optional[float]
    miss_pp: Optional[float]  # achieved - target, percentage points (mean over seeds)
    differs: list[str] = field(default_factory=list)  # "weight_decay: 0.001 (control 0.0005)"
    flags: list[str] = field(default_factory=list)
    snap_pp: Optional[float] = None  # mean |move| of the end-of-search snap (calibrated methods)
    worst_pp: Optional[float] = None  # achieved - target of the run furthest from it (pp): what decides a miss


def _param(r, key: str) -> Optional[str]:
    return r.params.get(key)


def check_cell(
    method: str, target: Optional[float], runs: list, control_runs: list, budget_ratio: Optional[float]
) -> Check:
    """The protocol flags of one (method, target) cell against its control runs."""
    ach = [r.achieved_sparsity for r in runs if r.achieved_sparsity is not None]
    miss = None if target is None or not ach else 100.0 * (statistics.fmean(ach) - target)
    c = Check(method, target, len({r.seed for r in runs}), budget_ratio, miss)
    if target is not None and ach:
        c.worst_pp = 100.0 * (max(ach, key=lambda a: abs(a - target)) - target)
    snaps = [abs(r.metrics["snap_pp"]) for r in runs if "snap_pp" in getattr(r, "metrics", {})]
    c.snap_pp = statistics.fmean(snaps) if snaps else None
    if budget_ratio is not None and not BUDGET_RANGE[0] <= budget_ratio <= BUDGET_RANGE[1]:
        c.flags.append(f"budget x{budget_ratio:.2f} of its control")
    if c.worst_pp is not None and abs(c.worst_pp) > TARGET_MISS_PP:  # every run must be on target, not the mean
        c.flags.append(
            f"target missed by {c.worst_pp:+.1f} pp"
            + (" (one seed)" if len(ach) > 1 and miss is not None and abs(miss) <= TARGET_MISS_PP else "")
        )
    if c.seeds < MIN_SEEDS:
        c.flags.append(f"{c.seeds} seed{'s' if c.seeds != 1 else ''}, fewer than {MIN_SEEDS}")
    if control_runs:
        for key in SHARED:
            mine = sorted({str(_param(r, key)) for r in runs if _param(r, key) is not None})
            theirs = sorted({str(_param(r, key)) for r in control_runs if _param(r, key) is not None})
            if mine and theirs and mine != theirs:
                c.differs.append(f"{key}: {', '.join(mine)} (control {', '.join(theirs)})")
        if c.differs:
            c.flags.append("differs from its control: " + "; ".join(d.split(":")[0] for d in c.differs))
    return c


@dataclass
class Convergence:
    control: str  # the longer dense run's label
    ratio: float  # its budget over the dense start's
    n_pairs: int
    gain: Optional[float]  # mean paired test top-1 gain, accuracy units
    ci: Optional[float]  # 95 % t half-width
    converged: Optional[bool]  # gain < CONVERGED_PP (None: no pair)


def convergence(short: dict[Any, float], long: dict[Any, float], control: str, ratio: float) -> Convergence:
    """Paired (by seed) gain of the longer dense run over the dense start; converged when the
    mean gain is below CONVERGED_PP percentage points."""
    n, d, hw, _ = paired(long, short)
    return Convergence(control, ratio, n, d, hw, None if d is None else 100.0 * d < CONVERGED_PP)
