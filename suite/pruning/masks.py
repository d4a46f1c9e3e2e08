"""Mask and gate machinery shared by every method.

A pruned layer keeps its dense stored weight `W` and gets a parametrization, so that
`layer.weight` (what the forward pass uses) is the *effective* weight:
- MaskedWeight:  W_eff = W * mask          (mask: a 0/1 buffer, set by the method)
- GatedWeight:   W_eff = W * H(m)          (m: a learnable gate per weight, Hyperflux)
Because the effective weight is what every layer computes with, the suite can count
sparsity for every method in one way: the zeros of `layer.weight` (see sparsity.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize


class MaskedWeight(nn.Module):
    def __init__(self, shape: torch.Size):
        super().__init__()
        self.register_buffer("mask", torch.ones(shape))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


class _HardGate(torch.autograd.Function):
    """Forward: 1[m >= 0]. Backward: the incoming gradient times `scale` (straight-through)."""

    @staticmethod
    def forward(ctx, m: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return (m >= 0).to(m.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def hard_gate(m: torch.Tensor, scale: float = 0.25) -> torch.Tensor:
    return _HardGate.apply(m, scale)


class GatedWeight(nn.Module):
    def __init__(self, gate: torch.Tensor, ste_scale: float):
        super().__init__()
        self.gate = nn.Parameter(gate)
        self.ste_scale = ste_scale

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * hard_gate(self.gate, self.ste_scale).to(w.dtype)


def attach(module: nn.Module, param: nn.Module) -> nn.Module:
    """Put `param` between the module's stored weight and its forward pass."""
    parametrize.register_parametrization(module, "weight", param, unsafe=True)
    return param


def stored_weight(module: nn.Module) -> torch.Tensor:
    """The dense stored weight (the parameter the weight optimiser updates)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def parametrization(module: nn.Module) -> nn.Module | None:
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight[0]
    return None


def bake(model: nn.Module) -> None:
    """Replace every parametrized weight by its effective value (for export)."""
    for mod in list(model.modules()):
        if parametrize.is_parametrized(mod, "weight"):
            parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)


@torch.no_grad()
def magnitude_masks(weights: list[torch.Tensor], sparsity: float, scope: str = "global") -> list[torch.Tensor]:
    """0/1 masks that remove the `round(sparsity * N)` smallest |w|, over all tensors together
    (scope 'global') or per tensor (scope 'layer'). Ties are broken by torch.topk exactly as
    torch.nn.utils.prune.global_unstructured does, so masks match it bit for bit."""
    if scope == "layer":
        return [magnitude_masks([w], sparsity, "global")[0] for w in weights]
    if scope != "global":
        raise ValueError(f"unknown magnitude scope {scope!r}")
    return lowest_score_masks([w.detach().abs() for w in weights], sparsity)


@torch.no_grad()
def lowest_score_masks(scores: list[torch.Tensor], sparsity: float) -> list[torch.Tensor]:
    """0/1 masks that remove the `round(sparsity * N)` lowest scores over all tensors together
    (scores are ranked as given, not by absolute value); ties broken by torch.topk."""
    flat_scores = torch.cat([sc.reshape(-1) for sc in scores])
    k = int(round(sparsity * flat_scores.numel()))
    flat = torch.ones_like(flat_scores)
    if k > 0:
        flat[torch.topk(flat_scores, k, largest=False).indices] = 0
    out, i = [], 0
    for sc in scores:
        out.append(flat[i:i + sc.numel()].view_as(sc).to(sc.dtype))
        i += sc.numel()
    return out
