"""Flux statistics and Neural-Pruning-Law saliencies, measured on a probe batch.

Flux (hyperflux.md section 3): phi_i = -w_i * G_i with G_i = dCE/dW_eff_i and w_i the stored
weight. For an active weight it is the first-order loss increase if it were removed; for a
pruned one (G measured with it at zero) the first-order decrease if it were restored.

The probe is one extra forward and backward pass, in eval mode (BatchNorm running statistics
and dropout untouched, no random numbers drawn), on a batch the caller passes (the engine uses
the last training batch of the epoch), every `flux_every` epochs. It never touches `.grad` or
the optimiser, so training is bit-for-bit the same with or without it; its cost is logged as
`probe_time_s` beside `epoch_time_s`.

Saliencies recorded for the Neural Pruning Law (hyperflux.md section 8), each the minimum over
the surviving (active) weights:
- `npl_min_abs_w`: |w| (magnitude pruning's saliency, the k-th smallest |w|),
- `npl_min_taylor`: |w * G| (a first-order Taylor / gradient criterion),
- `flux_active_min`: phi (Hyperflux's own; its pressure gamma is logged separately).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from suite.pruning import masks

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def flux_and_grad(
    model: nn.Module, layers: list[tuple[str, nn.Module]], x: torch.Tensor, y: torch.Tensor, criterion: Callable
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per prunable layer: (stored weight w, G = dCE/dW_eff, active map), all detached."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), parametrize.cached():
            effs = [mod.weight for _, mod in layers]  # W_eff, computed once and reused by forward
            loss = criterion(model(x), y)
            grads = torch.autograd.grad(loss, effs)
        out = []
        for (_, mod), eff, g in zip(layers, effs, grads):
            out.append((masks.stored_weight(mod).detach(), g.detach(), eff.detach() != 0))
        return out
    finally:
        model.train(was_training)


def _quantiles(v: np.ndarray, prefix: str) -> dict[str, float]:
    if v.size == 0:
        return {}
    qs = np.quantile(v, QUANTILES)
    return {f"{prefix}_q{int(round(100 * q)):02d}": float(x) for q, x in zip(QUANTILES, qs)}


def statistics(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Flux quantiles over active and over pruned weights, the minimum active flux, and the
    NPL saliencies (see the module docstring)."""
    phi = [(-(w * g)).float().reshape(-1).cpu() for w, g, _ in parts]
    act = [a.reshape(-1).cpu() for _, _, a in parts]
    absw = [w.abs().float().reshape(-1).cpu() for w, _, _ in parts]
    phi_all, act_all, absw_all = torch.cat(phi), torch.cat(act), torch.cat(absw)
    phi_act = phi_all[act_all].numpy()
    phi_pru = phi_all[~act_all].numpy()
    out: dict[str, float] = {}
    out.update(_quantiles(phi_act, "flux_active"))
    out.update(_quantiles(phi_pru, "flux_pruned"))
    if phi_act.size:
        out["flux_active_min"] = float(phi_act.min())
        out["npl_min_abs_w"] = float(absw_all[act_all].min())
        out["npl_min_taylor"] = float(np.abs(phi_act).min())
    return out
