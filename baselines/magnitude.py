"""Magnitude family.

- OneShotMagnitude: at the start of the run (normally from the dense checkpoint) remove the
  round(s * N) smallest |w| over all prunable layers together (or per layer), then fine-tune
  with the mask fixed for the whole run (cosine LR).
- GradualMagnitude (Zhu & Gupta 2017): every `update_every` steps between start and end
  epoch, prune to s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))^3 by magnitude of the
  weights still active; pruned weights stay pruned; fine-tune to the end with the final mask.
  `gmp.criterion: taylor` ranks by a first-order Taylor saliency instead of |w|: the mean of
  |w * dL/dw| over the steps since the previous mask update (Molchanov et al. 2019, per weight).
Both log `npl_threshold`, the smallest surviving saliency after the last update, for the
Neural Pruning Law fits (`hfbench fit-npl`).
"""
from __future__ import annotations

from typing import Any

import torch

from suite.pruning.base import MaskPruner


class OneShotMagnitude(MaskPruner):
    name = "magnitude"

    def on_train_start(self) -> None:
        self.prune_to(self.cfg.sparsity, self.cfg.magnitude.scope)


class GradualMagnitude(MaskPruner):
    name = "gmp"

    def __init__(self, cfg, layers, steps_per_epoch):
        super().__init__(cfg, layers, steps_per_epoch)
        g = cfg.gmp
        end_epoch = g.end_epoch if g.end_epoch is not None else max(g.start_epoch + 1, (3 * cfg.epochs) // 4)
        self.t0 = g.start_epoch * steps_per_epoch
        self.t_end = end_epoch * steps_per_epoch
        self.current = 0.0

    def target_at(self, step: int) -> float:
        g, s_f = self.cfg.gmp, self.cfg.sparsity
        if step < self.t0:
            return 0.0
        frac = min(1.0, (step - self.t0) / max(1, self.t_end - self.t0))
        return s_f + (g.initial_sparsity - s_f) * (1.0 - frac) ** 3

    def attach(self, model) -> None:
        super().attach(model)
        self.taylor: list[torch.Tensor] = []
        self.taylor_steps = 0
        if self.cfg.gmp.criterion == "taylor":
            for w in self.stored():
                acc = torch.zeros_like(w, dtype=torch.float32)
                self.taylor.append(acc)
                w.register_hook(self._taylor_hook(w, acc))

    def _taylor_hook(self, w: torch.Tensor, acc: torch.Tensor):
        def hook(grad: torch.Tensor) -> None:
            with torch.no_grad():
                acc.add_((w.detach() * grad).abs().float())
        return hook

    def on_train_start(self) -> None:
        if self.t0 == 0 and self.cfg.gmp.initial_sparsity > 0:
            self._prune(0)

    def _prune(self, step: int) -> None:
        s = self.target_at(step)
        if s > self.current:
            scores = None
            if self.taylor:
                scores = [a / max(1, self.taylor_steps) for a in self.taylor]
            self.prune_to(s, self.cfg.gmp.scope, scores)
            self.current = s
        for a in self.taylor:  # a fresh average for the next update
            a.zero_()
        self.taylor_steps = 0

    def after_step(self, step: int) -> None:
        # step counts completed optimiser steps (1-based)
        self.taylor_steps += bool(self.taylor)
        if self.t0 <= step <= self.t_end and ((step - self.t0) % self.cfg.gmp.update_every == 0 or step == self.t_end):
            self._prune(step)

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current, "threshold": getattr(self, "threshold", None),
                "taylor": [a.clone() for a in self.taylor], "taylor_steps": self.taylor_steps}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.current = st["current"]
        if st.get("threshold") is not None:
            self.threshold = st["threshold"]
        for a, b in zip(self.taylor, st.get("taylor", [])):
            a.copy_(b)
        self.taylor_steps = st.get("taylor_steps", 0)
