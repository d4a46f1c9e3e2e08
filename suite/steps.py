"""One training step and one evaluation pass, as every run takes them: the engine's loop and
the benchmarks (suite/bench.py) both call `train_step`; `attach_pruner` builds the pruner and
optimiser for both."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from suite.config import RunConfig
from suite.optim import WeightsAndGates
from suite.pruning import masks, registry


def autocast(device: str, precision: str):
    """bf16 / fp16 mixed precision (torch.autocast) for the forward pass and loss, or a no-op."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=precision in ("bf16", "fp16"))


def to_device(x: torch.Tensor, device: str, channels_last: bool = False) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, device: str, rank: int, world: int, precision: str = "fp32", channels_last: bool = False
) -> float:
    """Top-1 on the whole split: rank r takes batches r, r+world, ...; counts are summed."""
    was = model.training
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64)
    for i, (x, y) in enumerate(loader):
        if i % world != rank:
            continue
        x, y = to_device(x, device, channels_last), y.to(device, non_blocking=True)
        with autocast(device, precision):
            out = model(x)
        correct[0] += (out.argmax(1) == y).sum().item()
        correct[1] += y.numel()
    if world > 1:
        dist.all_reduce(correct)
    model.train(was)
    return float(correct[0] / correct[1])


def _weight_groups(
    model: nn.Module, gate_ids: set[int], decay_on: str = "all", weight_decay: float = 0.0
) -> list[dict]:
    """SGD groups of the model's own trained parameters. Frozen parameters (e.g. the
    frozen_bn_scale quirk) are left out: no update, no weight decay. decay_on 'conv_linear':
    weight decay only on Conv2d/Linear weights, every other parameter in a group without it."""
    params = [p for p in model.parameters() if id(p) not in gate_ids and p.requires_grad]
    if decay_on == "all":
        return [{"params": params}]
    decayed = {id(masks.stored_weight(m)) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    groups = [
        {"params": [p for p in params if id(p) in decayed]},
        {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def attach_pruner(cfg: RunConfig, model: nn.Module, layers: list, steps_per_epoch: int, device: str):
    """The method's pruner attached to `model` (moved to `device`) and the optimiser over its
    weights and gates, bound to the pruner: (pruner, optimiser). Shared with suite.bench."""
    pruner = registry.get(cfg.method)(cfg, layers, steps_per_epoch)
    pruner.attach(model)
    model.to(device)
    gates = pruner.gate_parameters()
    extra = pruner.extra_weight_groups()
    own = {id(g) for g in gates} | {id(p) for grp in extra for p in grp["params"]}
    opt = WeightsAndGates(
        _weight_groups(model, own, cfg.weight_decay_on) + extra,
        gates,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov,
        gate_lr=1e-3,
    )
    pruner.bind_optimizer(opt)
    return pruner, opt


def loss_scaled_gates(model: nn.Module, scaler: Any) -> list:
    """fp16 (a gradient scaler): the gates that add their pressure gradient inside backward
    (masks._GatedProduct) and so must be handed the loss scale each step; [] otherwise."""
    from suite.pruning import masks

    return [m for m in model.modules() if isinstance(m, masks.GatedWeight)] if scaler is not None else []


def train_step(
    engine: Any,
    pruner: Any,
    criterion: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    step: int,
    *,
    device: str,
    precision: str = "fp32",
    scaler: Any = None,
    gated: list = (),
    check: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on the batch (x, y); `step` is its number (1 for the first), which
    `pruner.after_step` gets. Returns (logits, loss): the forward's output and the criterion's
    loss, without the pruner's term and unscaled.

    engine: a DeepSpeed engine, or anything with its three calls (forward, `backward(loss)`,
    `step()`). The forward and the loss run under autocast for bf16 / fp16; the pruner's loss
    term is added outside it. fp16 (`scaler` given): the loss is scaled before backward, and the
    gates in `gated`, which add their pressure gradient inside backward (masks._GatedProduct),
    are handed this step's loss scale first so they scale it alike. `check`, if given, sees the
    total loss before it is scaled and returns the one to differentiate (the engine's fault
    injection and its non-finite loss check)."""
    if gated:
        s_t = scaler.scale(torch.ones((), device=device))  # the current scale, as a tensor (no sync)
        for g in gated:
            g.loss_scale = s_t
    with autocast(device, precision):
        logits = engine(x)
        loss = criterion(logits, y)
    extra = pruner.loss_term()
    total = loss + extra if extra is not None else loss
    if check is not None:
        total = check(total)
    if scaler is not None:
        total = scaler.scale(total)
    engine.backward(total)
    engine.step()
    pruner.after_step(step)
    return logits, loss
