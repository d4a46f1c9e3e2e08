"""The suite's single sparsity ruler, used for every method.

sparsity = (number of prunable weights whose effective value is exactly 0) / (number of
prunable weights), where the effective value is `layer.weight` as the forward pass sees it
(after any mask or gate) and the prunable layers come from the model registry's policy.
Biases and normalisation parameters are never counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from suite.pruning import masks


@dataclass
class LayerCount:
    name: str
    shape: tuple[int, ...]
    numel: int
    nonzero: int

    @property
    def density(self) -> float:
        return self.nonzero / self.numel if self.numel else 0.0


@torch.no_grad()
def count(layers: list[tuple[str, nn.Module]]) -> list[LayerCount]:
    out = []
    for name, mod in layers:
        w = masks.effective_weight(mod)  # parametrizations applied
        out.append(LayerCount(name, tuple(w.shape), w.numel(), int(torch.count_nonzero(w))))
    return out


def density(layers: list[tuple[str, nn.Module]]) -> float:
    counts = count(layers)
    total = sum(c.numel for c in counts)
    return sum(c.nonzero for c in counts) / total


def sparsity(layers: list[tuple[str, nn.Module]]) -> float:
    return 1.0 - density(layers)


def table(counts: list[LayerCount]) -> str:
    """CSV text of the per-layer counts (an MLflow artifact)."""
    rows = ["layer,shape,numel,nonzero,density"]
    for c in counts:
        rows.append(f"{c.name},{'x'.join(map(str, c.shape))},{c.numel},{c.nonzero},{c.density:.6f}")
    return "\n".join(rows) + "\n"


@torch.no_grad()
def active(layers: list[tuple[str, nn.Module]]) -> list[torch.Tensor]:
    """Boolean map per layer of the prunable weights that are active (effective value != 0)."""
    return [masks.effective_weight(mod) != 0 for _, mod in layers]


def density_of(active_maps: list[torch.Tensor]) -> float:
    """Density from activity maps (the same ruler as density(), without reading the weights again)."""
    return sum(int(a.sum()) for a in active_maps) / sum(a.numel() for a in active_maps)


def flips(before: list[torch.Tensor], after: list[torch.Tensor]) -> tuple[int, int]:
    """(pruned, regrown) between two activity maps: active -> inactive, inactive -> active."""
    pruned = sum(int((b & ~a).sum()) for b, a in zip(before, after))
    regrown = sum(int((~b & a).sum()) for b, a in zip(before, after))
    return pruned, regrown
