"""The one Pruner interface. Every method (Hyperflux and each baseline) implements it.

The engine calls, in order:
  attach(model)                  once, before the optimiser exists: add masks/gates
  gate_parameters()              extra parameters for the gate optimiser (Adam); [] if none
  extra_weight_groups()          SGD parameter groups with their own options (e.g. STR's
                                 thresholds with their own weight decay); [] if none
  bind_optimizer(opt)            once, with the optimiser (suite.optim.WeightsAndGates), for
                                 methods that reset its state (IMP rewinding) or change a group
  on_train_start()               once, after loading the starting weights (e.g. one-shot prune)
  lrs(epoch)                     at each epoch start: (weight LR, gate LR)
  loss_term()                    each step: a term added to the task loss, or None
  after_step(step)               each step, after the optimiser step (e.g. GMP mask updates)
  end_epoch(epoch, density)      each epoch end, with the density the suite measured; returns
                                 method metrics to log (e.g. gamma, target density)
  state_dict()/load_state_dict() for checkpoints
A method never reports its own sparsity: the suite measures it (sparsity.py), with the model
in eval mode, so a method whose training-time weights are stochastic (hard-concrete gates)
is measured at its deterministic test-time weights.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn as nn

from suite.pruning import masks


def weight_lr(cfg, epoch: int) -> float:
    """The run's weight LR in 1-based `epoch` (non-Hyperflux schedule): cosine from lr (epoch 1)
    towards lr_end over the run, or the step schedule: lr * lr_gamma ** (milestones passed),
    where a milestone m takes effect from epoch m + 1 (torch MultiStepLR stepped once per epoch)."""
    if cfg.lr_schedule == "step":
        return cfg.lr * cfg.lr_gamma ** sum(1 for m in cfg.lr_milestones if m <= epoch - 1)
    return cosine(cfg.lr, cfg.lr_end, epoch - 1, cfg.epochs)


def cosine(start: float, end: float, i: int, n: int) -> float:
    """Cosine from `start` (i = 0) towards `end` (i = n)."""
    if n <= 0:
        return end
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(i, n) / n))


class Pruner:
    name = "base"

    def __init__(self, cfg, layers: list[tuple[str, nn.Module]], steps_per_epoch: int):
        self.cfg = cfg
        self.layers = layers
        self.steps_per_epoch = steps_per_epoch

    def attach(self, model: nn.Module) -> None:
        pass

    def gate_parameters(self) -> list[torch.Tensor]:
        return []

    def extra_weight_groups(self) -> list[dict]:
        return []

    def bind_optimizer(self, optimizer) -> None:
        self.optimizer = optimizer

    def on_train_start(self) -> None:
        pass

    def lrs(self, epoch: int) -> tuple[float, float]:
        """Weight LR (the run's schedule, `weight_lr`) and gate LR for 1-based epoch."""
        return weight_lr(self.cfg, epoch), 0.0

    def loss_term(self) -> Optional[torch.Tensor]:
        return None

    def after_step(self, step: int) -> None:
        pass

    def end_epoch(self, epoch: int, density: float) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class MaskPruner(Pruner):
    """Base for methods that hold a 0/1 mask per prunable layer."""

    def attach(self, model: nn.Module) -> None:
        self.params = [masks.attach(mod, masks.MaskedWeight(mod.weight.shape)) for _, mod in self.layers]

    def stored(self) -> list[torch.Tensor]:
        return [masks.stored_weight(mod) for _, mod in self.layers]

    @torch.no_grad()
    def set_masks(self, new: list[torch.Tensor]) -> None:
        for p, m in zip(self.params, new):
            p.mask.copy_(m)

    @torch.no_grad()
    def prune_to(self, sparsity: float, scope: str, scores: Optional[list[torch.Tensor]] = None) -> None:
        """Prune the currently active weights to `sparsity` by smallest |score| (pruned stay
        pruned); the score is the stored weight (magnitude) unless given. Records the smallest
        surviving |score| as `threshold`, the saliency the Neural Pruning Law relates to density."""
        scores = [(w if sc is None else sc) * p.mask
                  for w, p, sc in zip(self.stored(), self.params, scores or [None] * len(self.params))]
        new = masks.magnitude_masks(scores, sparsity, scope)
        self.set_masks(new)
        alive = torch.cat([sc.abs()[m.bool()] for sc, m in zip(scores, new)])
        self.threshold = float(alive.min()) if alive.numel() else float("nan")

    def end_epoch(self, epoch: int, density: float) -> dict[str, float]:
        t = getattr(self, "threshold", None)
        return {"npl_threshold": t} if t is not None else {}
