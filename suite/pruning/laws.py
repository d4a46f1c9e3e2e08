"""Fits of the two laws the Hyperflux papers state, on measured runs.

- Pressure law (v2): final density under a fixed pressure gamma,
      d(gamma) = c * exp(-(a0 * ln gamma + a1 * ln^2 gamma)),
  fitted by least squares on ln d; R^2 on ln d. `pressure_law_gamma` inverts it to choose the
  constant pressure for a target density (the law-based scheduler).
- Neural Pruning Law (v3): ln d = ln c - alpha * ln s between density and the smallest saliency
  among surviving weights, fitted where lo < d <= hi (0.5 % and 50 % by default).
"""

from __future__ import annotations

import math

import numpy as np


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def pressure_law_fit(gammas, densities) -> dict[str, float]:
    g = np.asarray(gammas, dtype=float)
    d = np.asarray(densities, dtype=float)
    keep = (g > 0) & (d > 0)
    g, d = g[keep], d[keep]
    if len(g) < 3:
        raise ValueError(f"the pressure law needs at least 3 runs with gamma > 0 and density > 0, got {len(g)}")
    x = np.log(g)
    y = np.log(d)
    A = np.stack([np.ones_like(x), -x, -(x**2)], axis=1)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    ln_c, a0, a1 = (float(v) for v in coef)
    return {"c": math.exp(ln_c), "a0": a0, "a1": a1, "r2": _r2(y, A @ coef), "n": int(len(g))}


def pressure_law_density(law: dict[str, float], gamma: float) -> float:
    x = math.log(gamma)
    return law["c"] * math.exp(-(law["a0"] * x + law["a1"] * x * x))


def pressure_law_gamma(law: dict[str, float], density: float) -> float:
    """The gamma at which the law predicts `density`, on the branch where density falls as
    gamma grows. Raises ValueError when the law never reaches that density."""
    c, a0, a1 = law["c"], law["a0"], law["a1"]
    rhs = math.log(c) - math.log(density)  # a1 x^2 + a0 x = rhs
    if abs(a1) < 1e-12:
        if a0 <= 0:
            raise ValueError("the fitted law does not decrease with gamma")
        return math.exp(rhs / a0)
    disc = a0 * a0 + 4 * a1 * rhs
    if disc < 0:
        raise ValueError(f"the fitted law never reaches density {density:.4g}")
    roots = [(-a0 + sq) / (2 * a1) for sq in (math.sqrt(disc), -math.sqrt(disc))]
    falling = [x for x in roots if a0 + 2 * a1 * x > 0]
    if not falling:
        raise ValueError(f"density {density:.4g} lies outside the falling branch of the fitted law")
    return math.exp(min(falling, key=abs))


def npl_fit(densities, saliencies, lo: float = 0.005, hi: float = 0.5) -> dict[str, float]:
    d = np.asarray(densities, dtype=float)
    s = np.asarray(saliencies, dtype=float)
    keep = (d > lo) & (d <= hi) & (s > 0)
    d, s = d[keep], s[keep]
    if len(d) < 3:
        raise ValueError(f"the pruning law needs at least 3 points with {lo} < density <= {hi}, got {len(d)}")
    x, y = np.log(s), np.log(d)
    A = np.stack([np.ones_like(x), -x], axis=1)
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    return {"c": math.exp(float(coef[0])), "alpha": float(coef[1]), "r2": _r2(y, A @ coef), "n": int(len(d))}
