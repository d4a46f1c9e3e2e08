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
  (levels + 1) x imp.epochs_per_level (IterativeMagnitude.prepare) and logged, so the report can divide
  by the dense run's epochs.
All log `npl_threshold`, the smallest surviving saliency after the last update, for the
Neural Pruning Law fits (`hfbench fit-npl`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Optional, cast

import torch
import torch.nn as nn
from pydantic import Field, ValidationError, model_validator

from suite.pruning import masks, registry
from suite.pruning.base import MaskPruner, cosine, run_section, scaled
from suite.schema import Strict

if TYPE_CHECKING:
    from suite.config import RunConfig


PATTERN_HELP = (
    "unstructured, or N:M: at most N non-zero weights in every group of M consecutive weights "
    "along each row of W.reshape(out, -1) (the sparsity must then be 1 - N/M; a layer whose row "
    "length is not a multiple of M stays dense)"
)


class MagnitudeConfig(Strict):
    """One-shot global magnitude pruning, then fine-tuning with the mask fixed."""

    scope: Literal["global", "layer"] = "global"
    pattern: masks.Pattern = Field("unstructured", description=PATTERN_HELP)


class GMPConfig(Strict):
    """Gradual magnitude pruning (Zhu & Gupta 2017), cubic schedule."""

    start_epoch: int = Field(0, ge=0, description="t0, in epochs")
    end_epoch: Optional[int] = Field(None, ge=1, description="last pruning epoch (default: 3/4 of epochs)")
    initial_sparsity: float = Field(0.0, ge=0, lt=1)
    update_every: int = Field(50, ge=1, description="dt: steps between mask updates")
    scope: Literal["global", "layer"] = "global"
    criterion: Literal["magnitude", "taylor"] = Field(
        "magnitude", description="saliency: |w|, or the mean |w * dL/dw| since the last update (Taylor)"
    )
    pattern: masks.Pattern = Field(
        "unstructured",
        description=PATTERN_HELP + "; each update keeps M - round(s_t M) weights of every group, N at the end",
    )


class IMPConfig(Strict):
    """Iterative magnitude pruning with rewinding (lottery ticket, Frankle et al.; open_lth).

    The run is levels + 1 training segments of `epochs_per_level` epochs each: segment 0
    trains from the run's starting weights (a fresh init, or the dense model), then each
    level prunes `prune_fraction` of the remaining weights by global magnitude (the last level
    prunes exactly to the target), rewinds the survivors and every other parameter and
    buffer to their values after `rewind_step` steps of segment 0 (0: the starting weights,
    the classic ticket), resets the optimiser state and retrains with the LR schedule
    restarted. The run's total epochs = (levels + 1) x epochs_per_level."""

    prune_fraction: Optional[float] = Field(
        0.2,
        gt=0,
        lt=1,
        description="share of the remaining weights pruned "
        "per level; null with `levels` set: the same share at every level, "
        "1 - (1 - s)^(1 / levels), so the last level lands on the target (an "
        "equal budget at every sparsity: the run is always levels + 1 segments)",
    )
    rewind_step: int = Field(0, ge=0, description="k: rewind to the weights after k steps of the first segment")
    levels: Optional[int] = Field(
        None, ge=1, le=100, description="pruning levels (default: ceil(ln(1 - s) / ln(1 - prune_fraction)))"
    )
    epochs_per_level: int = Field(1, ge=1, le=10000, description="epochs of each training segment")
    scope: Literal["global", "layer"] = "global"
    rewind: Literal["weights", "lr"] = Field(
        "weights",
        description="weights: the survivors go back to their values at rewind_step (Frankle et al.; "
        "a ticket when the run starts from scratch); lr: learning-rate rewinding (Renda et al. 2020): the survivors "
        "keep their trained values and only the LR schedule restarts (variant imp-lrr)",
    )

    @model_validator(mode="after")
    def _fraction_or_levels(self) -> IMPConfig:
        if self.prune_fraction is None and self.levels is None:
            raise ValueError("imp.prune_fraction null (an equal share per level) needs imp.levels")
        return self


def check_pattern(run: RunConfig, section: str, pattern: str, scope: str) -> Optional[tuple[int, int]]:
    """(N, M) of the section's N:M pattern, None when unstructured; refuses a run whose target
    is not the pattern's sparsity 1 - N/M, or that sets a scope a pattern has no use for (the
    same run would otherwise get two hashes)."""
    nm = masks.parse_pattern(pattern)
    if nm is not None and scope != "global":
        raise ValueError(f"{section}.scope {scope} means nothing with {section}.pattern {pattern}: leave it global")
    if nm is not None and abs(run.sparsity - (1.0 - nm[0] / nm[1])) > 1e-9:
        raise ValueError(
            f"{section}.pattern {pattern} keeps {nm[0]} of every {nm[1]} weights: sparsity must be "
            f"{1.0 - nm[0] / nm[1]:g}, got {run.sparsity:g}"
        )
    return nm


def pattern_suffix(pattern: str) -> str:
    """The variant suffix of a pattern: '' for unstructured, '-2of4' for 2:4."""
    nm = masks.parse_pattern(pattern)
    return "" if nm is None else f"-{nm[0]}of{nm[1]}"


def imp_levels(sparsity: float, imp: IMPConfig) -> int:
    """Pruning levels of an IMP run: as given, or enough levels of `prune_fraction` to reach
    the target (8 for 80 %, 11 for 90 %, 14 for 95 % at 20 % per level)."""
    if imp.levels is not None:
        return imp.levels
    assert imp.prune_fraction is not None  # IMPConfig refuses null without levels
    return max(1, math.ceil(math.log(1.0 - sparsity) / math.log(1.0 - imp.prune_fraction) - 1e-9))


@registry.register
class OneShotMagnitude(MaskPruner):
    name = "magnitude"
    section = "magnitude"
    options = MagnitudeConfig
    variants = {f"magnitude{pattern_suffix(p)}": {"magnitude": {"pattern": p}} for p in masks.PATTERNS[1:]}
    summary = "exact: one-shot global magnitude pruning, then fine-tuning (Han et al. 2015)"
    published = {"magnitude": ("magnitude",)}  # one-shot magnitude + fine-tune
    dynamics = {"magnitude": [("min surviving |w|", "epoch", "npl_threshold")]}

    @classmethod
    def check(cls, run: RunConfig) -> None:
        mc = run_section(run, "magnitude", MagnitudeConfig)
        check_pattern(run, "magnitude", mc.pattern, mc.scope)

    @classmethod
    def hash_options(cls, d: dict[str, Any], run: RunConfig) -> None:
        if d.get("pattern") == "unstructured":
            d.pop("pattern")  # added later: runs without it keep their hashes

    @classmethod
    def variant(cls, run: RunConfig) -> str:
        return cls.name + pattern_suffix(run_section(run, "magnitude", MagnitudeConfig).pattern)

    @classmethod
    def recipe(cls, params: dict[str, str], variant: str) -> str:
        p = params.get("magnitude.pattern", "unstructured")
        return (
            cls.summary
            if p == "unstructured"
            else f"one-shot {p} magnitude pruning (the largest |w| of each group), then fine-tuning"
        )

    def on_train_start(self) -> None:
        mc = run_section(self.cfg, "magnitude", MagnitudeConfig)
        nm = masks.parse_pattern(mc.pattern)
        if nm is None:
            self.prune_to(self.cfg.sparsity, mc.scope)
        else:
            self.prune_nm(nm[1] - round(self.cfg.sparsity * nm[1]), nm[1])


@registry.register
class GradualMagnitude(MaskPruner):
    name = "gmp"
    section = "gmp"
    options = GMPConfig
    variants = {
        "gmp-layer": {"gmp": {"scope": "layer"}},
        **{f"gmp{pattern_suffix(p)}": {"gmp": {"pattern": p}} for p in masks.PATTERNS[1:]},
    }
    summary = "exact: Zhu & Gupta's cubic schedule (Gale et al. 2019 prune per layer: gmp.scope layer)"
    published = {
        "gmp": ("gmp_global",),  # Zhu & Gupta's schedule, one global magnitude ranking
        "gmp-layer": ("gmp_uniform",),
    }  # Gale et al. 2019: the same sparsity in every layer
    dynamics = {
        "gmp": [("min surviving |w|", "epoch", "npl_threshold")],
        "gmp-taylor": [("min surviving |w*g|", "epoch", "npl_threshold")],
    }

    @classmethod
    def check(cls, run: RunConfig) -> None:
        g = run_section(run, "gmp", GMPConfig)
        end = g.end_epoch if g.end_epoch is not None else run.epochs
        if end > run.epochs or end <= g.start_epoch:
            raise ValueError(f"gmp.end_epoch must be in (gmp.start_epoch, epochs]; got {end}")
        if g.initial_sparsity > run.sparsity:
            raise ValueError("gmp.initial_sparsity must be <= sparsity")
        check_pattern(run, "gmp", g.pattern, g.scope)
        if g.criterion == "taylor" and run.engine.precision == "fp16":
            raise ValueError(
                "gmp.criterion taylor reads gradients before the fp16 gradient scaler unscales them; "
                "use engine.precision bf16 or fp32"
            )

    @classmethod
    def scale(cls, f: dict[str, Any], k: float, full: int) -> None:
        if k == 1.0:
            return
        g = f.setdefault("gmp", {}) if isinstance(f.get("gmp", {}), dict) else {}
        ep = f["epochs"]
        start = min(scaled(g["start_epoch"], k) if g.get("start_epoch") else 0, max(ep - 1, 0))
        g["start_epoch"] = start
        if g.get("end_epoch") is not None:
            g["end_epoch"] = min(max(scaled(g["end_epoch"], k), start + 1), ep)

    @classmethod
    def variant(cls, run: RunConfig) -> str:
        # per-layer GMP (Gale et al.'s uniform) is another method than global
        g = run_section(run, "gmp", GMPConfig)
        return (
            cls.name
            + (f"-{g.criterion}" if g.criterion != "magnitude" else "")
            + ("-layer" if g.scope == "layer" and g.pattern == "unstructured" else "")
            + pattern_suffix(g.pattern)
        )

    @classmethod
    def hash_options(cls, d: dict[str, Any], run: RunConfig) -> None:
        if d.get("pattern") == "unstructured":
            d.pop("pattern")  # added later: runs without it keep their hashes

    @classmethod
    def recipe(cls, params: dict[str, str], variant: str) -> str:
        p = params.get("gmp.pattern", "unstructured")
        if p == "unstructured":
            return cls.summary
        return f"Zhu & Gupta's cubic schedule in {p} groups: each update keeps M - round(s_t M) weights of every group"

    def __init__(self, cfg: RunConfig, layers: list[tuple[str, nn.Module]], steps_per_epoch: int) -> None:
        super().__init__(cfg, layers, steps_per_epoch)
        g = run_section(cfg, "gmp", GMPConfig)
        end_epoch = g.end_epoch if g.end_epoch is not None else max(g.start_epoch + 1, (3 * cfg.epochs) // 4)
        self.t0 = g.start_epoch * steps_per_epoch
        self.t_end = end_epoch * steps_per_epoch
        self.current = 0.0

    @property
    def gmp(self) -> GMPConfig:
        """The run's gmp section."""
        return run_section(self.cfg, "gmp", GMPConfig)

    def target_at(self, step: int) -> float:
        g, s_f = self.gmp, self.cfg.sparsity
        if step < self.t0:
            return 0.0
        frac = min(1.0, (step - self.t0) / max(1, self.t_end - self.t0))
        return s_f + (g.initial_sparsity - s_f) * (1.0 - frac) ** 3

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        self.taylor: list[torch.Tensor] = []
        self.taylor_steps = 0
        if self.gmp.criterion == "taylor":
            for w in self.stored():
                acc = torch.zeros_like(w, dtype=torch.float32)
                self.taylor.append(acc)
                # (Tensor.register_hook has no annotations in torch)
                w.register_hook(self._taylor_hook(w, acc))  # type: ignore[no-untyped-call]

    def _taylor_hook(self, w: torch.Tensor, acc: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            with torch.no_grad():
                acc.add_((w.detach() * grad).abs().float())

        return hook

    def on_train_start(self) -> None:
        if self.t0 == 0 and self.gmp.initial_sparsity > 0:
            self._prune(0)

    def _prune(self, step: int) -> None:
        s = self.target_at(step)
        if s > self.current:
            scores = None
            if self.taylor:
                scores = [a / max(1, self.taylor_steps) for a in self.taylor]
            nm = masks.parse_pattern(self.gmp.pattern)
            if nm is None:
                self.prune_to(s, self.gmp.scope, scores)
            elif (keep := nm[1] - round(s * nm[1])) < nm[1] - round(self.current * nm[1]):
                self.prune_nm(keep, nm[1], scores)  # the group budget moves in whole weights
            self.current = s
        for a in self.taylor:  # a fresh average for the next update
            a.zero_()
        self.taylor_steps = 0

    def after_step(self, step: int) -> None:
        # step counts completed optimiser steps (1-based)
        self.taylor_steps += bool(self.taylor)
        if self.t0 <= step <= self.t_end and ((step - self.t0) % self.gmp.update_every == 0 or step == self.t_end):
            self._prune(step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "current": self.current,
            "threshold": getattr(self, "threshold", None),
            "taylor": [a.clone() for a in self.taylor],
            "taylor_steps": self.taylor_steps,
        }

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.current = st["current"]
        if st.get("threshold") is not None:
            self.threshold = st["threshold"]
        for a, b in zip(self.taylor, st.get("taylor", [])):
            a.copy_(b)
        self.taylor_steps = st.get("taylor_steps", 0)


@registry.register
class IterativeMagnitude(MaskPruner):
    name = "imp"
    section = "imp"
    options = IMPConfig
    own_lr_schedule = True  # a cosine per level
    variants = {"imp-lrr": {"imp": {"rewind": "lr"}}, "imp-ticket": {"init": "scratch"}}
    summary = "exact: the last level prunes to the target"
    # Frankle et al. 2020: IMP rewinding within a run from scratch
    published = {"imp-ticket": ("imp_rewind",)}
    published_note = (
        "IMP from a trained network rewinds to trained weights, not a lottery ticket: imp-ticket is compared"
    )

    @classmethod
    def prepare(cls, data: dict[str, Any]) -> dict[str, Any]:
        """IMP's length follows from its levels: epochs = (levels + 1) x imp.epochs_per_level."""
        try:
            imp = IMPConfig.model_validate(data.get("imp", {}))
            s = float(data.get("sparsity", 0.0))
        except (ValidationError, TypeError, ValueError, OverflowError):
            return data  # the field validators report it
        if 0.0 < s < 1.0:
            try:
                levels = imp_levels(s, imp)
            except (ArithmeticError, ValueError):  # log(1 - prune_fraction) == 0: tiny fraction
                raise ValueError(
                    f"imp.prune_fraction ({imp.prune_fraction}) is too small to reach "
                    f"sparsity {s} in a finite number of levels"
                ) from None
            data = dict(data)
            data["epochs"] = (levels + 1) * imp.epochs_per_level
        return data

    @classmethod
    def scale(cls, f: dict[str, Any], k: float, full: int) -> None:
        imp = f.setdefault("imp", {}) if isinstance(f.get("imp", {}), dict) else {}
        if k != 1.0:
            imp["epochs_per_level"] = scaled(
                imp.get("epochs_per_level", IMPConfig.model_fields["epochs_per_level"].default), k
            )
        if imp.get("rewind_step"):
            if k != 1.0:
                imp["rewind_step"] = max(1, round(imp["rewind_step"] * k))
            cap = f.get("max_steps_per_epoch")
            if cap:  # the rewind point must fall inside the (shortened) first segment
                imp["rewind_step"] = min(imp["rewind_step"], imp.get("epochs_per_level", 1) * cap)

    @classmethod
    def hash_options(cls, d: dict[str, Any], run: RunConfig) -> None:
        if d.get("rewind") == "weights":
            d.pop("rewind")  # added later: runs without it keep their hashes

    @classmethod
    def variant(cls, run: RunConfig) -> str:
        if run_section(run, "imp", IMPConfig).rewind == "lr":
            return "imp-lrr"
        if run.init == "scratch":  # weight rewinding within a run from scratch
            return "imp-ticket"
        return cls.name

    @classmethod
    def recipe(cls, params: dict[str, str], variant: str) -> str:
        how = cls.summary
        if params.get("imp.rewind") == "lr":
            how += "; learning-rate rewinding (Renda et al. 2020): the survivors keep their values, the LR restarts"
        elif params.get("init") == "scratch":
            how += (
                f"; a lottery ticket (Frankle et al.): survivors rewound to step {params.get('imp.rewind_step')} "
                "of this run from scratch"
            )
        else:
            how += (
                "; survivors rewound to the trained starting network, not a lottery ticket (closer to "
                "learning-rate rewinding); compared with no published ticket"
            )
        return how

    def __init__(self, cfg: RunConfig, layers: list[tuple[str, nn.Module]], steps_per_epoch: int) -> None:
        super().__init__(cfg, layers, steps_per_epoch)
        self.imp = run_section(cfg, "imp", IMPConfig)
        self.levels = imp_levels(cfg.sparsity, self.imp)
        self.epl = self.imp.epochs_per_level
        if self.imp.rewind_step > self.epl * steps_per_epoch:
            raise ValueError(
                f"imp.rewind_step ({self.imp.rewind_step}) is beyond the first segment "
                f"({self.epl} epochs x {steps_per_epoch} steps)"
            )
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

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        self.model = model

    def _take_snapshot(self) -> None:
        # every parameter and buffer except the masks, which belong to the current level
        self.snapshot = {k: v.detach().clone() for k, v in self.model.state_dict().items() if not k.endswith(".mask")}

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
        out = {
            "imp_level": float(level),
            "imp_levels": float(self.levels),
            "target_density": 1.0 - self.level_sparsity(level),
        }
        if epoch % self.epl == 0 and level < self.levels:
            lr_rewind = self.imp.rewind == "lr"  # Renda et al.: keep the trained weights, restart the LR
            if self.snapshot is None and not lr_rewind:
                raise RuntimeError("IMP: no rewind point was saved (imp.rewind_step never reached)")
            self.prune_to(self.level_sparsity(level + 1), self.imp.scope)
            if not lr_rewind:
                snapshot = cast("dict[str, torch.Tensor]", self.snapshot)  # not None: refused above
                missing, unexpected = self.model.load_state_dict(snapshot, strict=False)
                if unexpected or any(not k.endswith(".mask") for k in missing):
                    raise RuntimeError(f"IMP rewind: state mismatch (missing {missing}, unexpected {unexpected})")
            opt = getattr(self, "optimizer", None)
            if opt is not None:
                opt.reset_weight_state()  # momentum of the previous segment does not carry over
        out.update(super().end_epoch(epoch, density))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot, "threshold": getattr(self, "threshold", None)}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.snapshot = st["snapshot"]
        if st.get("threshold") is not None:
            self.threshold = st["threshold"]
