"""Mask and gate machinery shared by every method.

A pruned layer keeps its dense stored weight `W` and gets a parametrization, so that
`layer.weight` (what the forward pass uses) is the *effective* weight:
- MaskedWeight:  W_eff = W * mask          (mask: a 0/1 buffer, set by the method)
- GatedWeight:   W_eff = W * H(m)          (m: a learnable gate per weight, Hyperflux)
Because the effective weight is what every layer computes with, the suite can count
sparsity for every method in one way: the zeros of `layer.weight` (see sparsity.py).
"""

from __future__ import annotations

import math
from typing import Any, Literal, TypeVar, cast

import torch
import torch.nn as nn
from torch.nn.utils import parametrize


class MaskedWeight(nn.Module):
    mask: torch.Tensor  # buffer

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.register_buffer("mask", torch.ones(shape))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


class _GatedProduct(torch.autograd.Function):
    """W_eff = W * H(m) with H(m) = 1[m >= 0] given as `keep` (a float 0/1 tensor); backward:
        dL/dW = G * H(m)                     (pruned weights get no data gradient)
        dL/dm = scale * G * W + pressure     (straight-through estimate of G * W * H'(m), plus
                                              the gradient of the pressure term)
    with G = dL/dW_eff. The pressure term gamma/N * sum(m) has the same gradient gamma/N for
    every gate, so it is added here rather than built as a loss: that saves a pass over every
    gate for the sum and one for accumulating its gradient. This assumes the loss reaches
    backward unscaled (fp32/bf16, no loss scaling, one micro-step per step), as the engine runs
    it."""

    @staticmethod
    def forward(
        ctx: Any,
        w: torch.Tensor,
        m: torch.Tensor,
        keep: torch.Tensor,
        scale: float,
        pressure: float,
        loss_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ctx.save_for_backward(w, keep)
        ctx.scale, ctx.pressure, ctx.m_dtype, ctx.loss_scale = scale, pressure, m.dtype, loss_scale
        return w * keep

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None, None]:
        w, keep = ctx.saved_tensors
        gw = grad * keep if ctx.needs_input_grad[0] else None
        gm = None
        if ctx.needs_input_grad[1]:
            p = (
                grad.new_full((), ctx.pressure)
                if ctx.loss_scale is None
                else (ctx.loss_scale * ctx.pressure).to(grad.dtype)
            )
            gm = torch.addcmul(p, grad, w, value=ctx.scale).to(ctx.m_dtype)
        return gw, gm, None, None, None, None


class GatedWeight(nn.Module):
    """Hyperflux's gate per weight. `pressure` (gamma / N, set by the pruner) is added to every
    gate's gradient in backward (see _GatedProduct).

    H(m) is written each forward into a float buffer kept between steps (torch.ge with a float
    `out` is one vectorised pass; a bool mask, torch.where or a bool-to-float cast each cost
    two to eight times as much on the CPU, measured by the overhead benchmark's profile). Autograd's
    version check guards it: a second forward before the first one's backward raises instead
    of using a changed mask."""

    def __init__(self, gate: torch.Tensor, ste_scale: float) -> None:
        super().__init__()
        self.gate = nn.Parameter(gate)
        self.ste_scale = ste_scale
        self.pressure = 0.0
        self.loss_scale: torch.Tensor | None = None  # fp16: the gradient scaler's current scale (engine)
        self.nm: tuple[int, int] | None = None  # N:M pattern: also keep only the top-N gates of each group of M
        self._keep: torch.Tensor | None = None
        self._group: torch.Tensor | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        k = self._keep
        if k is None or k.shape != w.shape or k.dtype != w.dtype or k.device != w.device:
            k = self._keep = torch.empty(w.shape, dtype=w.dtype, device=w.device)
        torch.ge(self.gate.detach(), 0, out=k)
        if self.nm is not None:  # and among the N highest gates of its group of M
            g = self._group
            if g is None or g.shape != k.shape or g.dtype != k.dtype or g.device != k.device:
                g = self._group = torch.empty_like(k)
            k.mul_(nm_keep(self.gate, self.nm[0], self.nm[1], out=g))
        out: torch.Tensor = _GatedProduct.apply(w, self.gate, k, self.ste_scale, self.pressure, self.loss_scale)
        return out


_Param = TypeVar("_Param", bound=nn.Module)


def attach(module: nn.Module, param: _Param) -> _Param:
    """Put `param` between the module's stored weight and its forward pass."""
    parametrize.register_parametrization(module, "weight", param, unsafe=True)
    return param


def effective_weight(module: nn.Module) -> torch.Tensor:
    """`module.weight`: the weight the forward pass uses (after the parametrization, if any)."""
    return cast(torch.Tensor, module.weight)


def stored_weight(module: nn.Module) -> torch.Tensor:
    """The dense stored weight (the parameter the weight optimiser updates)."""
    if parametrize.is_parametrized(module, "weight"):
        return _weight_parametrizations(module).original
    return cast(torch.Tensor, module.weight)


def parametrization(module: nn.Module) -> nn.Module | None:
    if parametrize.is_parametrized(module, "weight"):
        return _weight_parametrizations(module)[0]
    return None


def _weight_parametrizations(module: nn.Module) -> parametrize.ParametrizationList:
    """`module.parametrizations.weight`: the stored weight (`original`) and the parametrizations on it."""
    return cast(parametrize.ParametrizationList, cast(nn.Module, module.parametrizations).weight)


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
        out.append(flat[i : i + sc.numel()].view_as(sc).to(sc.dtype))
        i += sc.numel()
    return out


# -- N:M semi-structured sparsity ------------------------------------------------------------
# At most N non-zero weights in every group of M consecutive weights along each row of the
# weight seen as a matrix, W.reshape(out, -1): the input features of a linear layer, and for a
# convolution the (in_channel, kh, kw) entries in the order im2col lays them out, so the pattern is
# the one a sparse matmul over the unfolded input (and NVIDIA's 2:4 kernels, torch's
# to_sparse_semi_structured) runs. A layer whose row length is not a multiple of M has no such
# grouping: it takes no pattern (nm_eligible) and its method treats it as unstructured.
PATTERNS = ("unstructured", "2:4", "4:8")
Pattern = Literal["unstructured", "2:4", "4:8"]  # a method section's `pattern` field


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """(N, M) of an "N:M" pattern, None for "unstructured"."""
    if pattern == "unstructured":
        return None
    try:
        n_s, m_s = pattern.split(":")
        n, m = int(n_s), int(m_s)
    except ValueError:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' (e.g. 2:4); got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: need 0 < N < M")
    return n, m


def nm_eligible(shape: torch.Size | tuple[int, ...], m: int) -> bool:
    """Whether a weight of this shape can hold an N:M pattern: rows of W.reshape(out, -1) whose
    length is a multiple of M."""
    return len(shape) >= 2 and (math.prod(shape[1:]) % m == 0)


@torch.no_grad()
def nm_keep(scores: torch.Tensor, n: int, m: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """0/1 tensor (scores' shape and dtype, or written into `out`) keeping the n highest scores
    of every group of m consecutive entries along each row of scores.reshape(out, -1); of equal
    scores the earlier entry is kept."""
    groups = scores.detach().reshape(-1, m)
    # a stable sort, so that equal scores go to the earlier entry (torch.topk leaves ties open)
    idx = torch.sort(groups, dim=1, descending=True, stable=True).indices[:, :n]
    # built contiguous and viewed back: scores may be channels_last (engine.channels_last), where a
    # view of an empty_like would not follow the logical order the groups are cut in
    kg = torch.zeros(groups.shape, dtype=scores.dtype, device=scores.device)
    kg.scatter_(1, idx, 1.0)
    keep = kg.view(scores.shape)
    if out is None:
        return keep
    out.copy_(keep)
    return out


def nm_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Groups of m along the rows of weight.reshape(out, -1) that hold more than n non-zeros."""
    return int(((weight.detach().reshape(-1, m) != 0).sum(dim=1) > n).sum())
