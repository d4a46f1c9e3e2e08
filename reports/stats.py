"""The statistics of the report: 95 % t intervals of a mean and of a difference of means."""

from __future__ import annotations

import functools
import math
import statistics


@functools.lru_cache(maxsize=4096)
def t975(df: float) -> float:
    """The 0.975 quantile of Student's t with df (> 0, not necessarily whole) degrees of freedom
    (scipy's stdtrit, the inverse of its t distribution function: the very number scipy.stats.t.ppf
    gives, without importing scipy.stats, a second of every report; cached, as the tables ask for
    the same df many times)."""
    from scipy.special import stdtrit

    return float(stdtrit(df, 0.975))


def mean_ci(vals: list[float]) -> tuple[float | None, float | None]:
    """(mean, half-width of the 95 % t confidence interval of the mean); no interval for n < 2."""
    if not vals:
        return None, None
    m = statistics.fmean(vals)
    if len(vals) < 2:
        return m, None
    return m, t975(len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals))


def diff_ci(a: list[float], b: list[float]) -> float | None:
    """Half-width of the 95 % Welch t interval of mean(a) - mean(b). A side with one run adds no
    variance term (its sampling error is unknown); None when both sides have one run."""
    terms, dfs = [], []
    for v in (a, b):
        if len(v) >= 2:
            var_n = statistics.variance(v) / len(v)
            terms.append(var_n)
            dfs.append((var_n, len(v) - 1))
    if not terms:
        return None
    se2 = sum(terms)
    if se2 == 0:
        return 0.0
    df = se2**2 / sum(t**2 / d for t, d in dfs)
    return t975(df) * math.sqrt(se2)


def mean(vals: list[float]) -> float | None:
    """The mean, None for no values."""
    return statistics.fmean(vals) if vals else None
