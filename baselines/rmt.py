"""Marchenko-Pastur (random-matrix) pruning family: the four Pruner classes.

docs/baselines.md, "Marchenko-Pastur (random-matrix) pruning". The math (MP edge fit, SEB
layer weights and masks, SER restore) lives in baselines/marchenko_pastur.py; this module
only schedules it inside the suite's Pruner hooks. Every method starts from the trained dense
model (cfg.init == "dense"), fits the MP edge of every prunable layer on its *dense* stored
weight (mp_edge_fit with rmt.alpha, rmt.beta, rmt.deflate; Conv viewed as out x (in kh kw)),
and ends with exactly round(s N) zeros over all N prunable weights (the suite's ruler
measures it).

NOTE: the papers (arXiv 2503.01922, 2606.02608) stop at 70 % sparsity. Results of these
methods beyond 0.7 are new ground, not a reproduction; say so in reports.

Methods
-------
seb  SpectralEdgeBudget (2606.02608). z_l = z-score of sigma+(l) over the layers,
     w_l(s) = max(0.1, 1 + b d(s) z_l), d(s) = (1 - s / s_d)_+^p (b, s_d, p = rmt.seb_b,
     rmt.seb_sd, rmt.seb_p); one global magnitude prune on |W| / w_l at on_train_start, so a
     layer with a large edge loses more; then fine-tune with the mask fixed (like one-shot
     magnitude). Logs npl_threshold = the smallest surviving |W| / w_l.

ser  SpectralEdgeRestore (2606.02608), three phases in one run:
     1. on_train_start: over-prune to s_o = min(rho s, 0.999) (rho = rmt.ser_rho) by the SEB
        score with the layer weights of the *final* target, w_l(s)
        (seb_masks(..., budget_sparsity=s)).
     2. epoch 1 is the selection epoch. The removed entries (the "reservoir") get their stored
        weight set to 0 and their mask set to 1, so they train from zero, while the over-pruned
        survivors are frozen. Freezing is done twice over: a gradient hook zeroes the survivors'
        gradient (so SGD momentum never sees their task gradient) and after every optimiser
        step their stored values are copied back from a snapshot (this also undoes SGD weight
        decay, which moves a weight even when its gradient is zero). So the survivors are
        bit-identical through the epoch and the network starts the epoch computing exactly the
        over-pruned function. The momentum buffers of the prunable weights are cleared when
        the selection starts and again at the restore (the public code builds a new optimiser
        per phase).
     3. end_epoch(1): dw = W_end - W_start of every reservoir entry (W_start = 0, so dw is its
        trained value); restore with ser_restore(masks_over, |dw| w_l(s), s), which brings the
        zero count to exactly round(s N). Restored entries KEEP their trained value (the
        selection epoch trained them together with the frozen survivors; zeroing them would
        throw that away, and the network right after the restore is the selection-end network
        minus the unrestored reservoir). Unrestored reservoir entries are masked (and their
        stored value zeroed). Epochs 2.. fine-tune with the mask frozen.
     Timing and the ruler: the suite measures density at each epoch end *before* end_epoch
     runs, so epoch 1 reports the over-pruned survivors plus the (now nonzero) reservoir, i.e.
     the selection state; the restore happens in end_epoch(1) and every later epoch reports
     exactly s. Needs epochs >= 2 (else the final measured sparsity would be the selection
     state); the constructor refuses fewer.

rmt_hybrid  HybridMagnitudeSER (2606.02608, "magnitude up to 0.2, SER beyond"). Reading chosen,
     from the public code (hybrid_mag20_then_v8*.py): the paper runs one trajectory
     0.05 -> 0.70; stage 1 is exact global magnitude pruning with fine-tuning up to s = 0.20,
     stage 2 runs SER cycles starting *from the s = 0.20 magnitude checkpoint*. So here:
     - s <= rmt.hybrid_switch: one-shot global magnitude to s, fine-tune (= "magnitude").
     - s >  rmt.hybrid_switch: one-shot global magnitude to the switch (0.2) at
       on_train_start, epoch 1 fine-tunes that model; at end_epoch(1) SER over-prunes the
       magnitude survivors to min(rho s, 0.999) by |W| / w_l(s) (the magnitude-pruned 20 %
       stay pruned and are not in the reservoir, i.e. the first 0.2 by magnitude, the rest by
       SER), epoch 2 is the selection epoch, end_epoch(2) restores to exactly s, then
       fine-tune. MP fits come from the dense weights (the public code caches them once per
       model). Needs epochs >= 3 on this path.

rmt  ClassicalRMT (2503.01922): in baselines/rmt_classical.py, on the same config section and base.

state_dict / load_state_dict: masks are buffers in the model and the stored weights are in the
model checkpoint. The pruner state holds the phase, the SER over-pruned masks and reservoir,
the layer weights, per-layer shares and thresholds; the SER survivor snapshot is re-taken from
the model on load (mid-selection the model holds exactly the snapshot values).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, Optional, cast

import torch
import torch.nn as nn
from pydantic import Field

from baselines import marchenko_pastur as mp
from suite.pruning import masks, registry
from suite.pruning.base import MaskPruner, run_section
from suite.schema import Strict

if TYPE_CHECKING:
    from suite.config import RunConfig


class RMTConfig(Strict):
    """Marchenko-Pastur (random-matrix) pruning family (docs: baselines.md; baselines/marchenko_pastur.py)."""

    alpha: float = Field(0.25, gt=0, lt=0.5, description="central quantile window of the MP scale fit")
    beta: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="Tracy-Widom tail probability of the edge correction: "
        "the chance that a pure-noise layer shows a singular value above the edge (0.01: "
        "count the spikes that are there; the papers' public code uses 0.8, an edge inside "
        "the bulk that noise crosses most of the time; baselines/marchenko_pastur.py)",
    )
    deflate: bool = Field(
        True,
        description="fit the MP scale on the bulk without the values counted above the "
        "edge, refitting until the count is stable (false: one fit on all values, as the public "
        "code; many spikes then inflate the scale and hide spikes)",
    )
    seb_b: float = Field(1.0, ge=0, description="SEB: b in w_l(s) = max(0.1, 1 + b d(s) z_l)")
    seb_sd: float = Field(1.0, gt=0, description="SEB: s_d in d(s) = (1 - s / s_d)_+^p")
    seb_p: float = Field(1.0, gt=0, description="SEB: p in d(s)")
    seb_regime: Literal["fixed", "paper"] = Field(
        "fixed",
        description="SEB's b and s_d: fixed (seb_b, seb_sd for every target), or the paper's regimes by "
        "target (below 0.30 plain magnitude; to 0.40 b 1.0, s_d 0.5; to 0.55 b 1.25, s_d 0.7; above, s_d 0.85 with "
        "b 1.0 attention / 2.0 MLP / 1.5 other layers; baselines/marchenko_pastur.py seb_paper_regime)",
    )
    ser_rho: float = Field(1.1, ge=1, description="SER: over-prune to min(rho * s, 0.999) before restoring")
    ser_reinsert: Optional[float] = Field(
        None,
        gt=0,
        lt=1,
        description="SER: over-prune to s + this (absolute) "
        "instead of rho * s; the released code reinserts 0.03 of all weights",
    )
    quantile_offset: float = Field(
        0.5,
        ge=0,
        lt=1,
        description="MP scale fit: the i-th smallest value sits at "
        "quantile (i + offset) / p (0.5: its cell's midpoint; the public code: 0)",
    )
    hybrid_switch: float = Field(0.2, gt=0, lt=1, description="hybrid: magnitude up to this sparsity, SER beyond")
    regularised_epochs: int = Field(1, ge=0, description="classical RMT: epochs of the short regularised fine-tune")
    l1: float = Field(
        1e-5,
        ge=0,
        description="classical RMT: L1 coefficient (on sum |w| of the prunable weights) in the regularised fine-tune",
    )
    cycles: int = Field(
        1,
        ge=1,
        le=1000,
        description="classical RMT: pruning cycles (1: one shot at the start; "
        "the public code: 34, each removing 0.06 x 1.02^i of the remaining weights with layer shares "
        "to the power 1.5 / i; here scaled so the last cycle lands on the target)",
    )
    cycle_steps: Optional[int] = Field(
        None,
        ge=1,
        description="classical RMT: optimiser steps between cycles (default: the first half of the run split evenly)",
    )
    sv_tau: float = Field(
        1.0,
        ge=0,
        description="classical RMT: noise singular-vector entries below "
        "sv_tau (1 - s_i / sv_edge) / sqrt(dim) are zeroed",
    )


class _RMTBase(MaskPruner):
    """Shared: MP fits of the dense weights, SEB layer weights, epoch tracking; one config section."""

    section = "rmt"
    options = RMTConfig

    @classmethod
    def hash_options(cls, d: dict[str, Any], run: RunConfig) -> None:
        # added later: runs without them keep their hashes
        if d.get("ser_reinsert") is None:
            d.pop("ser_reinsert", None)
        if d.get("quantile_offset") == 0.5:
            d.pop("quantile_offset", None)
        if d.get("seb_regime") == "fixed":
            d.pop("seb_regime", None)
        if d.get("cycles") == 1:
            d.pop("cycles", None)
            d.pop("cycle_steps", None)
        if not d["deflate"]:
            d.pop("deflate")  # the single-fit edge keeps the hashes it had before deflation existed

    def __init__(self, cfg: RunConfig, layers: list[tuple[str, nn.Module]], steps_per_epoch: int) -> None:
        super().__init__(cfg, layers, steps_per_epoch)
        self.r = run_section(cfg, "rmt", RMTConfig)
        self.epoch = 1
        self.fits: list[mp.MPFit] = []

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def fit_all(self, weights: Optional[list[torch.Tensor]] = None) -> list[mp.MPFit]:
        """MP edge fits of `weights` (default: the stored weights), kept as self.fits."""
        self.fits = [
            mp.mp_edge_fit(
                w, alpha=self.r.alpha, beta=self.r.beta, deflate=self.r.deflate, quantile_offset=self.r.quantile_offset
            )
            for w in (self.stored() if weights is None else weights)
        ]
        return self.fits

    def seb_b_sd(self, s: float) -> tuple[float | list[float], float]:
        """SEB's b (one, or per layer) and s_d at target s: as configured, or the paper's regime."""
        if self.r.seb_regime == "paper":
            return mp.seb_paper_regime(s, [n for n, _ in self.layers])
        return self.r.seb_b, self.r.seb_sd

    def layer_weights(self, s: float) -> list[float]:
        b, s_d = self.seb_b_sd(s)
        return mp.seb_layer_weights(self.fits, s, b=b, s_d=s_d, p=self.r.seb_p)

    @torch.no_grad()
    def _reset_momentum(self) -> None:
        opt = getattr(self, "optimizer", None)
        if opt is not None:
            opt.zero_momentum(self.stored())


# ----------------------------------------------------------------------------- SEB
@registry.register
class SpectralEdgeBudget(_RMTBase):
    name = "seb"
    summary = "exact: spectral-edge budgets by layer (MP fit), one shot"

    @torch.no_grad()
    def on_train_start(self) -> None:
        self.fit_all()
        s = self.cfg.sparsity
        self.wl = self.layer_weights(s)
        scores = mp.seb_scores(self.stored(), self.wl)
        new = masks.magnitude_masks(scores, s, "global")
        self.set_masks(new)
        alive = torch.cat([sc[m.bool()] for sc, m in zip(scores, new)])
        self.threshold = float(alive.min()) if alive.numel() else float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {"threshold": getattr(self, "threshold", None), "wl": getattr(self, "wl", None)}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        if st.get("threshold") is not None:
            self.threshold = st["threshold"]
        if st.get("wl") is not None:
            self.wl = st["wl"]


# ----------------------------------------------------------------------------- SER
@registry.register
class SpectralEdgeRestore(_RMTBase):
    """Over-prune by SEB, one selection epoch training only the removed entries, restore to s."""

    name = "ser"
    selection_epoch = 1  # the epoch whose steps train the reservoir; restore at its end
    # SER restores at the end of its selection epoch and then fine-tunes: at least 2 epochs
    min_epochs = 2
    summary = "exact: over-prune, select and restore, then fine-tune"
    # in the selection epoch (the first, which the bench measures): the mask (24), the survivors'
    # gradients zeroed in the same backward pass (read the over-pruned mask: 4) and the survivors
    # put back after each step (read snapshot, mask, W; write W: 16); afterwards a plain mask (24)
    floor_bytes = 44
    published = {"ser": ("mp_ser",)}  # arXiv 2606.02608: spectral edge restore

    @classmethod
    def needed_epochs(cls, run: RunConfig) -> int:
        return cls.min_epochs

    @classmethod
    def check(cls, run: RunConfig) -> None:
        need = cls.needed_epochs(run)
        if run.epochs < need:
            raise ValueError(
                f"epochs: {cls.name} needs at least {need} (a selection epoch, then a fine-tune "
                f"after the restore), got {run.epochs}"
            )

    def __init__(self, cfg: RunConfig, layers: list[tuple[str, nn.Module]], steps_per_epoch: int) -> None:
        super().__init__(cfg, layers, steps_per_epoch)
        self._check_epochs()
        self.phase = "init"  # init -> (prefix) -> select -> finetune
        self.over: list[torch.Tensor] = []  # over-pruned masks (1 = survivor)
        self.reservoir: list[torch.Tensor] = []  # bool: removed by the SER over-prune, trains in selection
        self.snapshot: list[torch.Tensor] = []  # survivors' stored values during selection
        self._made_from: Optional[list[torch.Tensor]] = None  # the `over` that _free and _keep were made from
        self._free: list[torch.Tensor] = []  # 1 - over: what the gradient keeps during selection
        self._keep: list[torch.Tensor] = []  # over as bool: the survivors put back after each step

    def _check_epochs(self) -> None:
        need = self.selection_epoch + 1
        if self.cfg.epochs < need:
            raise ValueError(
                f"{self.name}: needs epochs >= {need} (selection epoch {self.selection_epoch} "
                f"plus a fine-tune after the restore), got {self.cfg.epochs}"
            )

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        for i, w in enumerate(self.stored()):
            w.register_hook(self._freeze_hook(i))  # type: ignore[no-untyped-call]  # unannotated in torch

    def _freeze_hook(self, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if self.phase == "select" and self.over:
                return grad * self._selection_masks()[0][i].to(grad.dtype)
            return grad

        return hook

    def _selection_masks(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(1 - over, over as bool) per layer, made once per selection rather than every step."""
        if self._made_from is not self.over:
            self._free = [1 - o for o in self.over]
            self._keep = [o.bool() for o in self.over]
            self._made_from = self.over
        return self._free, self._keep

    def over_target(self) -> float:
        """The over-pruned sparsity SER selects from: rho * s (the paper's multiplicative rule), or
        s + rmt.ser_reinsert (the released code: 3 % of all weights, absolute), at most 0.999."""
        if self.r.ser_reinsert is not None:
            return min(self.cfg.sparsity + self.r.ser_reinsert, 0.999)
        return min(self.r.ser_rho * self.cfg.sparsity, 0.999)

    @torch.no_grad()
    def start_selection(self, prior: Optional[list[torch.Tensor]] = None) -> None:
        """Over-prune the entries `prior` keeps (all, if None) to over_target() by |W| / w_l(s),
        then open the selection phase. Entries `prior` already removed stay removed and are not
        in the reservoir."""
        s = self.cfg.sparsity
        if not self.fits:
            self.fit_all()
        self.wl = self.layer_weights(s)
        W = self.stored()
        prior = prior if prior is not None else [torch.ones_like(w) for w in W]
        if prior is None or all(bool(p.all()) for p in prior):
            b, s_d = self.seb_b_sd(s)
            over = mp.seb_masks(W, self.fits, self.over_target(), b=b, s_d=s_d, p=self.r.seb_p, budget_sparsity=s)
        else:  # previously removed entries rank first (score -1 < any |W| / w_l)
            scores = [
                torch.where(p.bool(), sc, torch.full_like(sc, -1.0)) for sc, p in zip(mp.seb_scores(W, self.wl), prior)
            ]
            over = [o.to(w.dtype) for o, w in zip(masks.lowest_score_masks(scores, self.over_target()), W)]
        self.over = [o.detach().clone() for o in over]
        self.reservoir = [(p.bool() & ~o.bool()) for p, o in zip(prior, self.over)]
        for w, r in zip(W, self.reservoir):
            w[r] = 0.0  # reservoir entries train from zero
        self.set_masks([(o.bool() | r).to(o.dtype) for o, r in zip(self.over, self.reservoir)])
        self.snapshot = [w.detach().clone() for w in W]
        self._reset_momentum()
        self.phase = "select"

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if self.phase == "select":
            # one pass per layer (torch.where in place) instead of boolean-index gathers and scatters
            for w, keep, snap in zip(self.stored(), self._selection_masks()[1], self.snapshot):
                torch.where(keep, snap, w, out=w)

    @torch.no_grad()
    def restore(self) -> list[torch.Tensor]:
        """End of the selection: restore the reservoir entries with the largest |dw| w_l(s)
        to reach exactly round(s N) zeros; returns the final masks."""
        W = self.stored()
        dw = [w.detach() * r for w, r in zip(W, self.reservoir)]  # W_end - W_start, W_start = 0
        sc = [
            torch.where(r, d.abs() * wl, torch.full_like(d, -math.inf)) for d, r, wl in zip(dw, self.reservoir, self.wl)
        ]
        final = mp.ser_restore(self.over, sc, self.cfg.sparsity)
        for w, m in zip(W, final):
            w[m == 0] = 0.0
        self.set_masks(final)
        self.restored = [(m.bool() & r) for m, r in zip(final, self.reservoir)]
        self.n_restored = int(sum(int(x.sum()) for x in self.restored))
        self.over, self.reservoir, self.snapshot = [], [], []
        self._made_from, self._free, self._keep = None, [], []  # the selection masks go with it
        self._reset_momentum()
        self.phase = "finetune"
        return final

    def on_train_start(self) -> None:
        self.fit_all()
        self.start_selection()

    def end_epoch(self, epoch: int, density: float) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.phase == "select" and epoch == self.selection_epoch:
            self.restore()
            out["ser_restored"] = float(self.n_restored)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "epoch": self.epoch,
            "wl": getattr(self, "wl", None),
            "over": [o.clone() for o in self.over],
            "reservoir": [r.clone() for r in self.reservoir],
            "fits": [f.to_dict() for f in self.fits],
        }

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.phase = st["phase"]
        self.epoch = st.get("epoch", self.epoch)
        self.wl = cast("list[float]", st.get("wl"))  # None only in a state saved before start_selection sets it
        W = self.stored()
        self.over = [o.to(w.device).clone() for o, w in zip(st.get("over", []), W)]
        self._made_from, self._free, self._keep = None, [], []  # made again from `over` when needed
        self.reservoir = [r.to(w.device).clone() for r, w in zip(st.get("reservoir", []), W)]
        self.fits = [mp.MPFit(**{**d, "shape": tuple(d["shape"])}) for d in st.get("fits", [])]
        # mid-selection the model's survivors equal the snapshot (restored after every step)
        self.snapshot = [w.detach().clone() for w in self.stored()] if self.phase == "select" else []


# ----------------------------------------------------------------------------- hybrid
@registry.register
class HybridMagnitudeSER(SpectralEdgeRestore):
    """Magnitude for s <= switch; beyond: magnitude to the switch, one fine-tune epoch, then SER."""

    name = "rmt_hybrid"
    min_epochs = 3  # above the switch: its magnitude epoch, SER's selection epoch, a fine-tune
    summary = "exact: magnitude to the switch, SER beyond (the paper prunes in 0.05 cycles)"
    # a mask while it prunes by magnitude, as in the bench's first epoch (SER's selection comes later)
    floor_bytes = 24
    # arXiv 2606.02608: magnitude up to 0.2, SER beyond
    published = {"rmt_hybrid": ("mp_hybrid_mag_ser",)}

    @classmethod
    def needed_epochs(cls, run: RunConfig) -> int:
        switch = run_section(run, "rmt", RMTConfig).hybrid_switch
        return cls.min_epochs if run.sparsity > switch else 1  # one-shot magnitude below

    def __init__(self, cfg: RunConfig, layers: list[tuple[str, nn.Module]], steps_per_epoch: int) -> None:
        self.use_ser = cfg.sparsity > run_section(cfg, "rmt", RMTConfig).hybrid_switch
        self.selection_epoch = 2
        super().__init__(cfg, layers, steps_per_epoch)

    def _check_epochs(self) -> None:
        if self.use_ser:
            super()._check_epochs()

    def on_train_start(self) -> None:
        if not self.use_ser:
            self.prune_to(self.cfg.sparsity, "global")
            self.phase = "magnitude"
            return
        self.fit_all()  # on the dense weights, before the magnitude prefix
        self.prune_to(self.r.hybrid_switch, "global")
        del self.threshold  # the prefix threshold is not the final method's saliency
        self.phase = "prefix"

    def end_epoch(self, epoch: int, density: float) -> dict[str, float]:
        if self.phase == "magnitude":
            return MaskPruner.end_epoch(self, epoch, density)
        if self.phase == "prefix" and epoch == self.selection_epoch - 1:
            self.start_selection([p.mask.detach().clone() for p in self.params])
            return {}
        return super().end_epoch(epoch, density)

    def state_dict(self) -> dict[str, Any]:
        st = super().state_dict()
        st["threshold"] = getattr(self, "threshold", None)
        return st

    def load_state_dict(self, st: dict[str, Any]) -> None:
        super().load_state_dict(st)
        if st.get("threshold") is not None:
            self.threshold = st["threshold"]
