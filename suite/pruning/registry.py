"""Method name -> Pruner class. Hyperflux lives in suite/pruning/hyperflux.py, every other
method in baselines/<family>.py."""
from __future__ import annotations

import importlib

_METHODS = {
    "dense": "baselines.dense:Dense",
    "magnitude": "baselines.magnitude:OneShotMagnitude",
    "gmp": "baselines.magnitude:GradualMagnitude",
    "imp": "baselines.magnitude:IterativeMagnitude",
    "l0": "baselines.hard_concrete:HardConcreteL0",
    "str": "baselines.soft_threshold:SoftThreshold",
    "cs": "baselines.continuous_sparsification:ContinuousSparsification",
    "rmt": "baselines.rmt:ClassicalRMT",
    "seb": "baselines.rmt:SpectralEdgeBudget",
    "ser": "baselines.rmt:SpectralEdgeRestore",
    "rmt_hybrid": "baselines.rmt:HybridMagnitudeSER",
    "hyperflux": "suite.pruning.hyperflux:Hyperflux",
}


def names() -> list[str]:
    return sorted(_METHODS)


def get(name: str):
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(names())}")
    mod, cls = _METHODS[name].split(":")
    return getattr(importlib.import_module(mod), cls)
