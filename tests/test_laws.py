import math

import numpy as np
import pytest

from suite.config import RunConfig
from suite.models import prunable_layers
from suite.pruning.hyperflux import Hyperflux
from suite.pruning.laws import npl_fit, pressure_law_density, pressure_law_fit, pressure_law_gamma


def test_pressure_law_recovers_coefficients_and_inverts():
    law = {"c": 0.6, "a0": 0.45, "a1": 0.04}
    gammas = [2.0**k for k in range(-3, 6)]
    rng = np.random.default_rng(0)
    dens = [pressure_law_density(law, g) * math.exp(rng.normal(0, 0.01)) for g in gammas]
    fit = pressure_law_fit(gammas, dens)
    assert fit["a0"] == pytest.approx(0.45, abs=0.02) and fit["a1"] == pytest.approx(0.04, abs=0.01)
    assert fit["r2"] > 0.99
    # an independent reference: numpy's quadratic least squares in (ln gamma, ln density)
    p2, p1, p0 = np.polyfit(np.log(gammas), np.log(dens), 2)
    assert (fit["a1"], fit["a0"], math.log(fit["c"])) == pytest.approx((-p2, -p1, p0), rel=1e-9, abs=1e-12)
    # the inversion against a root finder on the falling branch (density falls for gamma above
    # the law's turning point exp(-a0 / (2 a1)))
    from scipy.optimize import brentq

    for target in (0.3, 0.1, 0.05):
        g = pressure_law_gamma(law, target)
        ref = math.exp(
            brentq(
                lambda x, t=target: math.log(pressure_law_density(law, math.exp(x))) - math.log(t),
                -law["a0"] / (2 * law["a1"]),
                20.0,
                xtol=1e-14,
            )
        )
        assert g == pytest.approx(ref, rel=1e-9)
    with pytest.raises(ValueError):
        pressure_law_gamma({"c": 0.6, "a0": -0.1, "a1": 0.0}, 0.1)


def test_npl_fit_uses_the_window_only():
    s = np.logspace(-4, -1, 30)
    d = 0.02 * s**-0.55
    d_out = np.concatenate([d, [0.9, 0.001]])  # outside 0.5 % < d <= 50 %: ignored
    fit = npl_fit(d_out, np.concatenate([s, [1e-6, 1.0]]))
    assert fit["alpha"] == pytest.approx(0.55, abs=1e-9) and fit["r2"] == pytest.approx(1.0)
    assert fit["n"] == int(((d > 0.005) & (d <= 0.5)).sum())


def test_fixed_and_law_schedules_hold_gamma_through_pruning():
    import torch.nn as nn

    model = nn.Sequential(nn.Linear(4, 3))
    layers = prunable_layers(model, "conv_linear")
    fixed = Hyperflux(
        RunConfig(
            method="hyperflux",
            sparsity=0.5,
            epochs=6,
            hyperflux={"pruning_end": 4, "schedule": "fixed", "fixed_gamma": 8.0},
        ),
        layers,
        1,
    )
    seen = [fixed.gamma]
    for e in range(1, 6):
        fixed.end_epoch(e, 0.5)
        seen.append(fixed.gamma)
    assert seen == [8.0, 8.0, 8.0, 8.0, 0.0, 0.0]
    law = {"c": 0.6, "a0": 0.45, "a1": 0.04}
    lb = Hyperflux(
        RunConfig(
            method="hyperflux", sparsity=0.9, epochs=6, hyperflux={"pruning_end": 4, "schedule": "law", "law": law}
        ),
        layers,
        1,
    )
    assert pressure_law_density(law, lb.gamma) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="fixed_gamma"):
        RunConfig(method="hyperflux", sparsity=0.5, hyperflux={"schedule": "fixed"})
