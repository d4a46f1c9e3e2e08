"""Magnitude family.

- OneShotMagnitude: at the start of the run (normally from the dense checkpoint) remove the
  round(s * N) smallest |w| over all prunable layers together (or per layer), then fine-tune
  with the mask fixed for the whole run (cosine LR).
- GradualMagnitude (Zhu & Gupta 2017): every `update_every` steps between start and end
  epoch, prune to s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n dt))^3 by magnitude of the
  weights still active; pruned weights stay pruned; fine-tune to the end with the final mask.
  `gmp.criterion: taylor` ranks by a first-order Taylor saliency instead of |w|: the mean of
  |w * dL/dw| over the steps since the previous mask update (Molchanov et al. 2019, per weight).
- IterativeMagnitude (lottery ticket with rewinding; Frankle & Carbin 2019, Frankle et al.
  2020): train a segment, prune `prune_fraction` of the remaining weights by global
  magnitude, rewind every surviving weight (and every other parameter and buffer) to its
  value after `rewind_step` steps of the first segment, reset the optimiser state, retrain
  with the LR schedule restarted (`imp.rewind: lr`, learning-rate rewinding after Renda et al.
  2020: the survivors keep their trained values, only the LR schedule restarts); repeat for
  `levels` levels, the last one pruning exactly to
  the target. Its training cost is (levels + 1) segments: the run's epochs are set to
  (levels + 1) x imp.epochs_per_level (suite/config.py) and logged, so the report can divide
  by the dense run's epochs.
All log `npl_threshold`, the smallest surviving saliency after the last update, for the
Neural Pruning Law fits (`hfbench fit-npl`).
"""
from __future__ import annotations

from typing import Any

import torch

from suite.config import imp_levels
from suite.pruning.base import MaskPruner, cosine


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


class IterativeMagnitude(MaskPruner):
    name = "imp"

    def __init__(self, cfg, layers, steps_per_epoch):
        super().__init__(cfg, layers, steps_per_epoch)
        self.imp = cfg.imp
        self.levels = imp_levels(cfg.sparsity, cfg.imp)
        self.epl = cfg.imp.epochs_per_level
        if cfg.imp.rewind_step > self.epl * steps_per_epoch:
            raise ValueError(f"imp.rewind_step ({cfg.imp.rewind_step}) is beyond the first segment "
                             f"({self.epl} epochs x {steps_per_epoch} steps)")
        self.snapshot: dict[str, torch.Tensor] | None = None

    def level_sparsity(self, level: int) -> float:
        """Sparsity after `level` pruning levels: 1 - (1 - f)^level, the last level exactly the target
        (f = 1 - (1 - s)^(1 / levels) when imp.prune_fraction is null)."""
        if level >= self.levels:
            return self.cfg.sparsity
        f = self.imp.prune_fraction
        if f is None:
            f = 1.0 - (1.0 - self.cfg.sparsity) ** (1.0 / self.levels)
        return min(self.cfg.sparsity, 1.0 - (1.0 - f) ** level)

    def attach(self, model) -> None:
        super().attach(model)
        self.model = model

    def _take_snapshot(self) -> None:
        # every parameter and buffer except the masks, which belong to the current level
        self.snapshot = {k: v.detach().clone() for k, v in self.model.state_dict().items()
                         if not k.endswith(".mask")}

    def on_train_start(self) -> None:
        if self.imp.rewind_step == 0 and self.imp.rewind == "weights":
            self._take_snapshot()

    def after_step(self, step: int) -> None:
        if step == self.imp.rewind_step and self.snapshot is None and self.imp.rewind == "weights":
            self._take_snapshot()

    def lrs(self, epoch: int) -> tuple[float, float]:
        """Cosine from lr to lr_end within each segment, restarted at every rewind."""
        return cosine(self.cfg.lr, self.cfg.lr_end, (epoch - 1) % self.epl, self.epl), 0.0

    @torch.no_grad()
    def end_epoch(self, epoch: int, density: float) -> dict[str, float]:
        level = (epoch - 1) // self.epl  # the segment that just ran
        out = {"imp_level": float(level), "imp_levels": float(self.levels),
               "target_density": 1.0 - self.level_sparsity(level)}
        if epoch % self.epl == 0 and level < self.levels:
            lr_rewind = self.imp.rewind == "lr"  # Renda et al.: keep the trained weights, restart the LR
            if self.snapshot is None and not lr_rewind:
                raise RuntimeError("IMP: no rewind point was saved (imp.rewind_step never reached)")
            self.prune_to(self.level_sparsity(level + 1), self.imp.scope)
            if not lr_rewind:
                missing, unexpected = self.model.load_state_dict(self.snapshot, strict=False)
                if unexpected or any(not k.endswith(".mask") for k in missing):
                    raise RuntimeError(f"IMP rewind: state mismatch (missing {missing}, unexpected {unexpected})")
            opt = getattr(self, "optimizer", None)
            if opt is not None:
                opt.sgd.state.clear()  # momentum of the previous segment does not carry over
        out.update(super().end_epoch(epoch, density))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot, "threshold": getattr(self, "threshold", None)}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.snapshot = st["snapshot"]
        if st.get("threshold") is not None:
            self.threshold = st["threshold"]
