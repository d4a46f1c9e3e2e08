"""Hyperflux (arXiv 2504.05349), as described in docs/hyperflux.md sections 1-6.

- Every prunable weight w_i has a gate m_i ~ U[0.2, 0.5]; W_eff = W * 1[m >= 0].
- Loss = CE_ls + gamma * mean(m) over all N gates (linear in raw m: gradient gamma / N).
- The hard gate's backward passes the gradient scaled by 0.25, so
  dL/dm_i = 0.25 * w_i * dCE/dW_eff_i + gamma / N, and pruned weights get no data gradient.
- Weights: SGD (momentum, coupled weight decay); gates: Adam (lr 1e-3). The engine builds both.
- Phase 1 (epochs 1..P): weight LR cosine lr -> end_lr_pruning; after each epoch the pressure
  controller moves gamma so the measured density follows the target trajectory D*(t).
- Phase 2 (epochs P+1..E): gamma = 0; weight LR reset_lr -> end_lr_regrowth (cosine); gate LR
  gate_lr * reset_scaler, times `decay` each epoch, 0 after `freeze_gates_after` epochs.
- Not in the paper, off by default: `snap_pp` > 0 shifts every gate by one common amount when
  the gates freeze (after epoch P + freeze_gates_after; at least P + 1 with phase_off_by_one,
  whose epoch P + 1 still trains the gates), so that the frozen mask meets the target
  exactly when the run is within snap_pp points of it (the fair protocol's equal-sparsity rule,
  the same snap the calibrated baselines get, suite/pruning/calibration.py); the gates' own
  values still rank the weights. Logged: knob_sparsity (before), snap_pp (the move).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Literal, Optional, cast

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from suite.pruning import masks, registry, sparsity
from suite.pruning.base import Pruner, cosine, run_section, scaled
from suite.pruning.calibration import snap_to
from suite.schema import Strict

if TYPE_CHECKING:
    from suite.config import RunConfig


class HyperfluxConfig(Strict):
    """Hyperflux hyper-parameters (docs: hyperflux.md sections 1-6)."""

    pruning_end: int = Field(8, ge=1, description="P: last epoch of the pruning phase")
    gate_lr: float = Field(1e-3, gt=0, le=1.0, description="Adam learning rate of the gates")
    gate_init_low: float = Field(0.2, ge=-100, le=100)
    gate_init_high: float = Field(0.5, ge=-100, le=100)
    ste_scale: float = Field(0.25, gt=0, le=100, description="straight-through gradient scale of the hard gate")
    step: float = Field(0.2, gt=0, le=10, description="controller step s (0.2 CIFAR, 0.15 ImageNet/ViT)")
    end_lr_pruning: Optional[float] = Field(
        None, ge=0, le=10, description="weight LR at the end of pruning (default lr/30)"
    )
    reset_lr: float = Field(1e-3, ge=0, le=10, description="weight LR at the start of regrowth")
    end_lr_regrowth: float = Field(1e-4, ge=0, le=10, description="weight LR at the end of regrowth")
    decay: float = Field(0.75, gt=0, le=1, description="gate LR multiplier per regrowth epoch")
    reset_scaler: float = Field(1.0, gt=0, le=1e4, description="gate LR at regrowth start = gate_lr * reset_scaler")
    freeze_gates_after: int = Field(50, ge=0, description="gate LR set to 0 after this many regrowth epochs")
    snap_pp: float = Field(
        0.0,
        ge=0,
        le=100,
        description="not in the paper (0: off): when the gates freeze "
        "(freeze_gates_after regrowth epochs, before the last epoch) within this many points of "
        "the target, every gate is shifted by one common amount so the target is met exactly; "
        "the fair protocol's equal-sparsity rule for every method",
    )
    schedule: Literal["controller", "fixed", "law"] = Field(
        "controller",
        description="controller: the paper's; fixed: gamma = fixed_gamma throughout pruning; "
        "law: constant gamma solved from a fitted gamma-density law for the target",
    )
    fixed_gamma: Optional[float] = Field(None, gt=0, le=1e6, description="pressure for schedule 'fixed'")
    law: Optional[dict[str, float]] = Field(
        None,
        description="{c, a0, a1} of d(gamma) = c exp(-(a0 ln g + a1 ln^2 g)), "
        "for schedule 'law' (from `hfbench fit-law`)",
    )
    pattern: masks.Pattern = Field(
        "unstructured",
        description="not in the paper: N:M keeps a weight only while its gate is among the N highest "
        "of its group of M (consecutive weights along each row of W.reshape(out, -1)) as well as "
        ">= 0, from the first step; the gates start ordered by |w| within each group, so the first "
        "mask is the magnitude N:M mask; sparsity must be at least 1 - N/M; a layer whose row "
        "length is not a multiple of M is gated as usual",
    )
    quirks: list[Literal["phase_off_by_one", "frozen_bn_scale"]] = Field(
        default_factory=list,
        description="reference-code behaviours, off by default (hyperflux.md sections 5 and 7): "
        "phase_off_by_one: the first regrowth epoch still runs with the last pressure; "
        "frozen_bn_scale: BatchNorm scales are never optimised",
    )

    @model_validator(mode="after")
    def _init_range(self) -> HyperfluxConfig:
        if not self.gate_init_low <= self.gate_init_high:
            raise ValueError("gate_init_low must be <= gate_init_high")
        if self.schedule == "fixed" and self.fixed_gamma is None:
            raise ValueError("schedule 'fixed' needs fixed_gamma")
        if self.schedule == "law":
            if not self.law or set(self.law) != {"c", "a0", "a1"}:
                raise ValueError("schedule 'law' needs law: {c: .., a0: .., a1: ..}")
        return self


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def snap_epoch(h: HyperfluxConfig) -> int:
    """The epoch after which hyperflux.snap_pp snaps (see Hyperflux.snap_epoch)."""
    return h.pruning_end + max(h.freeze_gates_after, 1 if "phase_off_by_one" in h.quirks else 0)


def _trajectory(r0: float, t: int, P: int) -> float:
    """D*(t) in percent for a given r0 (see PressureScheduler)."""
    d = 100.0
    for e in range(1, t + 1):
        d *= r0 + (0.999 - r0) * _sigmoid((6.0 / P) * (e - P / 2.0))
    return d


@functools.lru_cache(maxsize=4096)
def _solve_r0(final_density_pct: float, P: int) -> float:
    """r0 with D*(P) = final_density_pct, by bisection (200 halvings). A pure function of its
    arguments, cached: validating a sweep builds a scheduler per run (a paper recipe's fidelity
    check builds ~1000, which took ~12 s of pure-Python trajectories uncached)."""
    lo, hi = 0.0, 0.999  # D*(P) grows with r0
    if not _trajectory(lo, P, P) <= final_density_pct <= _trajectory(hi, P, P):
        raise ValueError(
            f"the target trajectory cannot reach {final_density_pct:.3g} % density in "
            f"{P} pruning epochs; change hyperflux.pruning_end"
        )
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _trajectory(mid, P, P) > final_density_pct:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


class PressureScheduler:
    """Target trajectory D*(t) and the pressure controller (hyperflux.md section 6).

    D*(t) = 100 * prod_{e=1..t} r(e),  r(e) = r0 + (0.999 - r0) * sigmoid((6/P)(e - P/2)),
    with r0 found by bisection so that D*(P) = 100 - target sparsity (in percent).
    """

    def __init__(self, target_sparsity: float, pruning_end: int, step: float) -> None:
        if not 0.0 < target_sparsity < 1.0:
            raise ValueError(f"target sparsity must be in (0, 1), got {target_sparsity}")
        self.P = pruning_end
        self.s = step
        self.final_density_pct = 100.0 * (1.0 - target_sparsity)
        self.r0 = self._solve_r0()
        self.g = 0.0
        self.inertia_up = 0.0
        self.inertia_down = 0.0

    def _trajectory(self, r0: float, t: int) -> float:
        return _trajectory(r0, t, self.P)

    def _solve_r0(self) -> float:
        return _solve_r0(self.final_density_pct, self.P)

    def target_pct(self, t: int) -> float:
        """D*(t) in percent; t = 0 is 100 %, t = P is the target, constant after P."""
        return self._trajectory(self.r0, min(t, self.P))

    @property
    def gamma(self) -> float:
        return cast(float, self.g**1.5)  # float ** float: typed Any

    def update(self, epoch: int, density_pct: float) -> float:
        """One controller step after `epoch` with the measured density (percent)."""
        if density_pct > self.target_pct(epoch):
            self.g += self.s + self.inertia_up
            self.inertia_up += self.s / 4
            self.inertia_down = 0.0
        else:
            self.g = self.g - (self.s + self.inertia_down)
            if self.g < 1e-9:  # floor at zero, without float residue such as 4e-17
                self.g = 0.0
            self.inertia_down += self.s / 4
            self.inertia_up = 0.0
        return self.gamma

    def state_dict(self) -> dict[str, float]:
        return {"g": self.g, "inertia_up": self.inertia_up, "inertia_down": self.inertia_down}

    def load_state_dict(self, st: dict[str, float]) -> None:
        self.g, self.inertia_up, self.inertia_down = st["g"], st["inertia_up"], st["inertia_down"]


def gates_by_magnitude(gates: torch.Tensor, w: torch.Tensor, m: int) -> torch.Tensor:
    """The same gate values, rearranged within each group of m (along the rows of
    W.reshape(out, -1)) so that the largest |w| of a group gets its largest gate: an N:M layer's
    first mask (the top-N gates of each group) is then the magnitude N:M mask of the starting
    weights, not a random one, and the gates' distribution is the paper's U[low, high]."""
    g = gates.reshape(-1, m)
    order = torch.sort(w.detach().abs().reshape(-1, m).float().cpu(), dim=1, stable=True).indices
    out = torch.empty_like(g)
    out.scatter_(1, order, torch.sort(g, dim=1).values)  # i-th smallest gate to the i-th smallest |w|
    return out.reshape(gates.shape)


def feasible_pruning_end(p: int, sparsity_: Any, step: Any, full: int) -> int:
    """The smallest P >= p (up to the recipe's own) whose target trajectory reaches the sparsity."""
    step = step if step is not None else HyperfluxConfig.model_fields["step"].default
    for cand in range(p, max(p, full) + 1):
        try:
            PressureScheduler(float(sparsity_), cand, step)
            return cand
        except (TypeError, ValueError):
            continue
    return p  # let the run's own validation name the problem


@registry.register
class Hyperflux(Pruner):
    name = "hyperflux"
    section = "hyperflux"
    options = HyperfluxConfig
    own_lr_schedule = True  # the two phases (lrs below)
    epoch_metrics = {"gamma": "gamma {:.3g}", "target_density": "target {:.2%}"}
    bench_sets = {"hyperflux.schedule": "fixed", "hyperflux.fixed_gamma": 1.0}  # a constant pressure: no controller
    # forward: read m, W, write W_eff (12); backward: read G, W, m, write dW, dm with the pressure
    # added (20); Adam on the gates: read dm, both moments, m, write both moments, m (28)
    floor_bytes = 60
    floor_note = "the mask is written to a buffer before the product, and dW and dm are two passes"
    summary = "the paper's pressure controller"
    variants = {f"hyperflux-{p.replace(':', 'of')}": {"hyperflux": {"pattern": p}} for p in masks.PATTERNS[1:]}
    dynamics = {
        "hyperflux-fixed": [
            ("pressure gamma", "final", "hyperflux.fixed_gamma"),
            ("min surviving flux", "epoch", "flux_active_min"),
        ],
        "hyperflux": [("min surviving flux", "epoch", "flux_active_min")],
        "hyperflux-law": [("min surviving flux", "epoch", "flux_active_min")],
    }

    @classmethod
    def check(cls, run: RunConfig) -> None:
        h = run_section(run, "hyperflux", HyperfluxConfig)
        if h.pruning_end > run.epochs:
            raise ValueError(f"hyperflux.pruning_end ({h.pruning_end}) must be <= epochs ({run.epochs})")
        if h.snap_pp > 0 and snap_epoch(h) >= run.epochs:
            raise ValueError(
                f"hyperflux.snap_pp: the snap happens when the gates freeze, after epoch "
                f"{snap_epoch(h)} (pruning_end + freeze_gates_after, at least pruning_end "
                f"+ 1 with phase_off_by_one), which must come before the last epoch ({run.epochs})"
            )
        nm = masks.parse_pattern(h.pattern)
        if nm is not None and run.sparsity < 1.0 - nm[0] / nm[1] - 1e-9:
            raise ValueError(
                f"hyperflux.pattern {h.pattern} keeps at most {nm[0]} of every {nm[1]} weights: "
                f"sparsity must be at least {1.0 - nm[0] / nm[1]:g}, got {run.sparsity:g}"
            )
        PressureScheduler(run.sparsity, h.pruning_end, h.step)

    @classmethod
    def scale(cls, f: dict[str, Any], k: float, full: int) -> None:
        if k == 1.0:
            return
        h = f.setdefault("hyperflux", {}) if isinstance(f.get("hyperflux", {}), dict) else {}
        ep = f["epochs"]
        P = h.get("pruning_end", HyperfluxConfig.model_fields["pruning_end"].default)
        new_p = min(scaled(P, k), ep)
        if P < full and new_p >= ep and ep >= 2:
            new_p = ep - 1  # keep a regrowth phase
        new_p = feasible_pruning_end(new_p, f.get("sparsity"), h.get("step"), P)
        # a regrowth phase where the recipe has one: one epoch after P, two with the reference boundary
        # (phase_off_by_one: epoch P + 1 is still a pruning epoch)
        regrow = (2 if "phase_off_by_one" in (h.get("quirks") or []) else 1) if P < full else 0
        f["epochs"] = ep = max(ep, new_p + regrow)  # a short P cannot reach high sparsity
        h["pruning_end"] = new_p
        if "freeze_gates_after" in h:
            h["freeze_gates_after"] = scaled(h["freeze_gates_after"], k) if h["freeze_gates_after"] else 0
            if h.get("snap_pp") and isinstance(h["freeze_gates_after"], int):
                # the snap needs an epoch after the freeze: shorten the regrowth's gate training, else
                # lengthen the run by the missing epochs
                quirk = 1 if "phase_off_by_one" in (h.get("quirks") or []) else 0
                h["freeze_gates_after"] = max(quirk, min(h["freeze_gates_after"], ep - 1 - new_p))
                f["epochs"] = ep = max(ep, new_p + max(h["freeze_gates_after"], quirk) + 1)

    @classmethod
    def hash_options(cls, h: dict[str, Any], run: RunConfig) -> None:
        # phase_off_by_one was redefined to match the reference exactly (epoch P+1 also keeps the
        # pruning LRs): runs made under the old meaning must not be taken for new ones
        h["quirks"] = ["phase_off_by_one@9aaed27" if q == "phase_off_by_one" else q for q in h["quirks"]]
        if h["snap_pp"] == 0.0:
            h.pop("snap_pp")  # added later: runs without it keep their hashes
        if h["schedule"] != "law":  # inputs of the other pressure schedules change nothing
            h.pop("law")
        if h["schedule"] != "fixed":
            h.pop("fixed_gamma")
        if h.get("pattern") == "unstructured":
            h.pop("pattern")  # added later: runs without it keep their hashes
        elif "pattern" in h:  # the first version started from a random N:M mask: its runs train again
            h["pattern"] = f"{h['pattern']}@gates-by-magnitude"

    @classmethod
    def variant(cls, run: RunConfig) -> str:
        h = run_section(run, "hyperflux", HyperfluxConfig)
        nm = masks.parse_pattern(h.pattern)
        return (cls.name if h.schedule == "controller" else f"{cls.name}-{h.schedule}") + (
            "" if nm is None else f"-{nm[0]}of{nm[1]}"
        )

    @classmethod
    def run_name(cls, run: RunConfig) -> Optional[str]:
        h = run_section(run, "hyperflux", HyperfluxConfig)
        if h.schedule == "fixed":  # named by its pressure: the sparsity is what it gives
            return f"{run.model}-{cls.name}-g{h.fixed_gamma:g}-s{run.seed}"
        return None

    @classmethod
    def recipe(cls, params: dict[str, str], variant: str) -> str:
        how = cls.summary
        if params.get("hyperflux.pattern", "unstructured") != "unstructured":
            how += f"; {params['hyperflux.pattern']}: only the top gates of each group count (not in the paper)"
        if float(params.get("hyperflux.snap_pp", "0") or 0) > 0:
            how += f"; the gate-freeze snap (at most {params.get('hyperflux.snap_pp')} pp, not in the paper)"
        return how

    def __init__(self, cfg: RunConfig, layers: list[tuple[str, nn.Module]], steps_per_epoch: int) -> None:
        super().__init__(cfg, layers, steps_per_epoch)
        self.h = run_section(cfg, "hyperflux", HyperfluxConfig)
        self.scheduler = PressureScheduler(cfg.sparsity, self.h.pruning_end, self.h.step)
        self.params: list[masks.GatedWeight] = []
        self.n = sum(masks.effective_weight(mod).numel() for _, mod in layers)
        self.gamma = 0.0  # pressure in force during the current epoch
        if self.h.schedule == "fixed":
            self.gamma = cast(float, self.h.fixed_gamma)  # HyperfluxConfig refuses 'fixed' without it
        elif self.h.schedule == "law":
            from suite.pruning.laws import pressure_law_gamma

            law = cast("dict[str, float]", self.h.law)  # HyperfluxConfig refuses 'law' without it
            self.gamma = pressure_law_gamma(law, 1.0 - cfg.sparsity)
        self.constant_gamma = self.gamma if self.h.schedule != "controller" else None

    def attach(self, model: nn.Module) -> None:
        if "frozen_bn_scale" in self.h.quirks:  # reference-code quirk: BN scale never optimised
            for mod in model.modules():
                if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.weight is not None:
                    mod.weight.requires_grad_(False)
        gen = torch.Generator().manual_seed(self.cfg.seed + 7919)
        self.params = []
        for _, mod in self.layers:
            w = masks.effective_weight(mod)
            m = torch.empty(w.shape, dtype=torch.float32).uniform_(
                self.h.gate_init_low, self.h.gate_init_high, generator=gen
            )
            nm = masks.parse_pattern(self.h.pattern)
            patterned = nm is not None and masks.nm_eligible(w.shape, nm[1])
            if patterned:
                m = gates_by_magnitude(m, w, nm[1])  # type: ignore[index]
            gated = masks.attach(mod, masks.GatedWeight(m.to(w.device), self.h.ste_scale))
            if patterned:
                gated.nm = nm
            self.params.append(gated)
        self.gamma = self.gamma  # hand the pressure to the new gates

    def gate_parameters(self) -> list[torch.Tensor]:
        return [p.gate for p in self.params]

    def lrs(self, epoch: int) -> tuple[float, float]:
        """(weight LR, gate LR) of 1-based `epoch`.

        Default boundary: pruning is epochs 1..P (weight LR cosine lr -> end_lr_pruning, gate LR
        gate_lr); regrowth epoch P+1+j (j = 0, 1, ...) runs at cosine(reset_lr -> end_lr_regrowth,
        j / (E - P)) and gate LR gate_lr * reset_scaler * decay^j, 0 once j >= freeze_gates_after.
        With the `phase_off_by_one` quirk (the reference code, see end_epoch): epoch P+1 still runs
        the pruning phase's end values (end_lr_pruning, gate_lr), and the reference's reset is
        followed in the same call by one cosine step and one decay step, so epoch P+1+j (j >= 1)
        has the same regrowth formula as the default and no epoch runs at j = 0."""
        P, E, h = self.h.pruning_end, self.cfg.epochs, self.h
        last_pruning = P + 1 if "phase_off_by_one" in h.quirks else P
        if epoch <= last_pruning:
            end = h.end_lr_pruning if h.end_lr_pruning is not None else self.cfg.lr / 30.0
            return cosine(self.cfg.lr, end, min(epoch - 1, P), P), h.gate_lr
        j = epoch - P - 1  # regrowth epoch index, 0-based
        w_lr = cosine(h.reset_lr, h.end_lr_regrowth, j, max(1, E - P))
        g_lr = 0.0 if j >= h.freeze_gates_after else h.gate_lr * h.reset_scaler * h.decay**j
        return w_lr, g_lr

    @property
    def gamma(self) -> float:
        return self._gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        """The pressure term gamma / N * sum(m) enters through each gate's backward (masks.
        _GatedProduct adds its gradient gamma / N), so setting gamma sets that on every gate."""
        self._gamma = float(value)
        for p in self.params:
            p.pressure = self._gamma / self.n

    def loss_term(self) -> Optional[torch.Tensor]:
        return None  # the pressure term's gradient is added in the gates' backward (see gamma)

    def end_epoch(self, epoch: int, density: float) -> dict[str, float]:
        """After `epoch`: set the pressure the next epoch trains with.

        Default: the controller updates after epochs 1..P-1 (epochs 2..P train under pressure; its
        last output, computed after P, is logged but not used) and regrowth (P+1..E) runs without.
        `phase_off_by_one` (the reference code, schedulers.py: the controller returns once
        epoch >= P; stages_context.py: the reset comes after epoch P+1): no update after epoch P,
        so epochs P and P+1 both train with the pressure computed after P-1, and regrowth starts
        at P+2 without pressure."""
        P = self.h.pruning_end
        quirk = "phase_off_by_one" in self.h.quirks
        out = {"gamma": self.gamma, "target_density": self.scheduler.target_pct(epoch) / 100.0}
        pressured_until = P + 1 if quirk else P  # last epoch that trains under pressure
        if self.constant_gamma is not None:  # fixed or law-based pressure: constant through pruning
            self.gamma = self.constant_gamma if epoch < pressured_until else 0.0
            if self.h.snap_pp > 0 and epoch == self.snap_epoch():
                out.update(self._snap(density))
            return out
        if epoch < P:
            self.gamma = self.scheduler.update(epoch, 100.0 * density)
        elif epoch == P and quirk:
            pass  # the reference's controller returns here: the pressure stays for epoch P + 1
        elif epoch == P:
            self.scheduler.update(epoch, 100.0 * density)  # logged as pressure_g; regrowth has no pressure
            self.gamma = 0.0
        else:
            self.gamma = 0.0
        out["pressure_g"] = self.scheduler.g
        if self.h.snap_pp > 0 and epoch == self.snap_epoch():
            out.update(self._snap(density))
        return out

    def snap_epoch(self) -> int:
        """The last epoch in which the gates train: P + freeze_gates_after, and at least P + 1 with
        the reference's phase_off_by_one (its epoch P + 1 trains gates under pressure)."""
        return snap_epoch(self.h)

    @torch.no_grad()
    def _snap(self, density: float) -> dict[str, float]:
        base = [p.gate.detach().clone() for p in self.params]
        top = max(float(b.abs().max()) for b in base) + 1.0

        def shift(x: float) -> None:  # larger x: every gate lower, fewer survive
            for p, b in zip(self.params, base):
                p.gate.copy_(b - x)

        return snap_to(
            1.0 - self.cfg.sparsity, self.h.snap_pp, density, shift, lambda: sparsity.density(self.layers), -top, top
        )

    def state_dict(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.gamma = st["gamma"]
        self.scheduler.load_state_dict(st["scheduler"])
