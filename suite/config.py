"""Typed run and sweep configurations.

A *run* is one training job (one model, one method, one target sparsity, one seed).
A *sweep* is a grid of runs plus how to launch them. Both come from YAML, are validated
by pydantic (unknown keys and bad values are rejected with the dotted name of the field),
and a run's identity is a stable hash of its resolved, semantic content.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration was rejected. The message names the file and the field."""


class _Strict(BaseModel):
    # inf / nan are refused in every float field: none of them means anything there (an inf LR
    # would only fail at the second step)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- method sections
class HyperfluxConfig(_Strict):
    """Hyperflux hyper-parameters (docs: hyperflux.md sections 1-6)."""

    pruning_end: int = Field(8, ge=1, description="P: last epoch of the pruning phase")
    gate_lr: float = Field(1e-3, gt=0, le=1.0, description="Adam learning rate of the gates")
    gate_init_low: float = Field(0.2, ge=-100, le=100)
    gate_init_high: float = Field(0.5, ge=-100, le=100)
    ste_scale: float = Field(0.25, gt=0, le=100, description="straight-through gradient scale of the hard gate")
    step: float = Field(0.2, gt=0, le=10, description="controller step s (0.2 CIFAR, 0.15 ImageNet/ViT)")
    end_lr_pruning: Optional[float] = Field(None, ge=0, le=10, description="weight LR at the end of pruning (default lr/30)")
    reset_lr: float = Field(1e-3, ge=0, le=10, description="weight LR at the start of regrowth")
    end_lr_regrowth: float = Field(1e-4, ge=0, le=10, description="weight LR at the end of regrowth")
    decay: float = Field(0.75, gt=0, le=1, description="gate LR multiplier per regrowth epoch")
    reset_scaler: float = Field(1.0, gt=0, le=1e4, description="gate LR at regrowth start = gate_lr * reset_scaler")
    freeze_gates_after: int = Field(50, ge=0, description="gate LR set to 0 after this many regrowth epochs")
    snap_pp: float = Field(0.0, ge=0, le=100, description="not in the paper (0: off): when the gates freeze "
                           "(freeze_gates_after regrowth epochs, before the last epoch) within this many points of "
                           "the target, every gate is shifted by one common amount so the target is met exactly; "
                           "the fair protocol's equal-sparsity rule for every method")
    schedule: Literal["controller", "fixed", "law"] = Field(
        "controller", description="controller: the paper's; fixed: gamma = fixed_gamma throughout pruning; "
                                  "law: constant gamma solved from a fitted gamma-density law for the target")
    fixed_gamma: Optional[float] = Field(None, gt=0, le=1e6, description="pressure for schedule 'fixed'")
    law: Optional[dict[str, float]] = Field(None, description="{c, a0, a1} of d(gamma) = c exp(-(a0 ln g + a1 ln^2 g)), "
                                                              "for schedule 'law' (from `hfbench fit-law`)")
    quirks: list[Literal["phase_off_by_one", "frozen_bn_scale"]] = Field(
        default_factory=list,
        description="reference-code behaviours, off by default (hyperflux.md sections 5 and 7): "
                    "phase_off_by_one: the first regrowth epoch still runs with the last pressure; "
                    "frozen_bn_scale: BatchNorm scales are never optimised")

    @model_validator(mode="after")
    def _init_range(self):
        if not self.gate_init_low <= self.gate_init_high:
            raise ValueError("gate_init_low must be <= gate_init_high")
        if self.schedule == "fixed" and self.fixed_gamma is None:
            raise ValueError("schedule 'fixed' needs fixed_gamma")
        if self.schedule == "law":
            if not self.law or set(self.law) != {"c", "a0", "a1"}:
                raise ValueError("schedule 'law' needs law: {c: .., a0: .., a1: ..}")
        return self


class MagnitudeConfig(_Strict):
    """One-shot global magnitude pruning, then fine-tuning with the mask fixed."""

    scope: Literal["global", "layer"] = "global"


class GMPConfig(_Strict):
    """Gradual magnitude pruning (Zhu & Gupta 2017), cubic schedule."""

    start_epoch: int = Field(0, ge=0, description="t0, in epochs")
    end_epoch: Optional[int] = Field(None, ge=1, description="last pruning epoch (default: 3/4 of epochs)")
    initial_sparsity: float = Field(0.0, ge=0, lt=1)
    update_every: int = Field(50, ge=1, description="dt: steps between mask updates")
    scope: Literal["global", "layer"] = "global"
    criterion: Literal["magnitude", "taylor"] = Field(
        "magnitude", description="saliency: |w|, or the mean |w * dL/dw| since the last update (Taylor)")


class IMPConfig(_Strict):
    """Iterative magnitude pruning with rewinding (lottery ticket, Frankle et al.; open_lth).

    The run is levels + 1 training segments of `epochs_per_level` epochs each: segment 0
    trains from the run's starting weights (a fresh init, or the dense model), then each
    level prunes `prune_fraction` of the remaining weights by global magnitude (the last level
    prunes exactly to the target), rewinds the survivors and every other parameter and
    buffer to their values after `rewind_step` steps of segment 0 (0: the starting weights,
    the classic ticket), resets the optimiser state and retrains with the LR schedule
    restarted. The run's total epochs = (levels + 1) x epochs_per_level."""

    prune_fraction: Optional[float] = Field(0.2, gt=0, lt=1, description="share of the remaining weights pruned "
                                            "per level; null with `levels` set: the same share at every level, "
                                            "1 - (1 - s)^(1 / levels), so the last level lands on the target (an "
                                            "equal budget at every sparsity: the run is always levels + 1 segments)")
    rewind_step: int = Field(0, ge=0, description="k: rewind to the weights after k steps of the first segment")
    levels: Optional[int] = Field(None, ge=1, le=100, description="pruning levels (default: "
                                  "ceil(ln(1 - s) / ln(1 - prune_fraction)))")
    epochs_per_level: int = Field(1, ge=1, le=10000, description="epochs of each training segment")
    scope: Literal["global", "layer"] = "global"
    rewind: Literal["weights", "lr"] = Field(
        "weights", description="weights: the survivors go back to their values at rewind_step (Frankle et al.; "
        "a ticket when the run starts from scratch); lr: learning-rate rewinding (Renda et al. 2020): the survivors "
        "keep their trained values and only the LR schedule restarts (variant imp-lrr)")

    @model_validator(mode="after")
    def _fraction_or_levels(self):
        if self.prune_fraction is None and self.levels is None:
            raise ValueError("imp.prune_fraction null (an equal share per level) needs imp.levels")
        return self


class CalibrationConfig(_Strict):
    """How a method without a sparsity knob is steered to the requested sparsity.

    controller: after each search epoch, knob *= exp(gain * ln(density / target(epoch))) (with the trend term of `lookahead`, see suite/pruning/calibration.py), where
    target(epoch) follows Zhu & Gupta's cubic from 100 % to the requested density at the end
    of the search phase; the knob then stays where it is. off: the knob is used as given."""

    mode: Literal["controller", "off"] = "controller"
    gain: float = Field(1.0, gt=0, le=100, description="log-space gain of the controller")
    max_factor: float = Field(2.0, gt=1, le=1e6, description="largest change of the knob in one epoch")
    lookahead: float = Field(1.0, ge=0, le=10, description="k: compare the trend prediction d (d / d_prev)^k "
                             "with target(epoch + k) (0: the measured density with target(epoch))")
    snap_pp: float = Field(10.0, ge=0, le=100, description="end of the search: when the knob left the sparsity "
                           "within this many points of the target, one global scalar of the method's own mask rule "
                           "is moved so the target is met exactly (the size of the move is logged as snap_pp; "
                           "0: off)")

    def snap_limit(self) -> float:
        """The snap's reach: snap_pp while the controller steers the knob; none with mode off (the
        configured knob is used as given, as a paper would)."""
        return self.snap_pp if self.mode == "controller" else 0.0


class L0Config(_Strict):
    """Hard-concrete L0 gates (Louizos, Welling & Kingma 2018)."""

    granularity: Optional[Literal["weight", "unit"]] = Field(
        None, description="one gate per weight, or per unit (a Conv2d's output channel; a Linear's output row, "
        "its input column in reference mode); default: weight, reference mode unit (the reference code has no "
        "per-weight gates)")
    lam: float = Field(1.0, gt=0, description="knob: strength of the expected-L0 penalty (per gate, "
                       "normalised by the number of gates); calibrated unless calibration.mode is off")
    beta: float = Field(2 / 3, gt=0, description="temperature of the hard-concrete distribution")
    gamma: float = Field(-0.1, lt=0, description="stretch interval lower end")
    zeta: float = Field(1.1, gt=1, description="stretch interval upper end")
    drop_init: Optional[float] = Field(None, gt=0, lt=1, description="initial drop probability of each gate "
                                       "(default 0.1; reference mode 0.5, the reference's LeNet-5 script)")
    gate_lr: Optional[float] = Field(None, gt=0, le=10, description="Adam learning rate of log_alpha (default "
                                     "0.05; reference mode 0.001, the LeNet-5 script's Adam)")
    search_end: Optional[int] = Field(None, ge=1, description="last epoch gates train (default 3/4 of epochs); "
                                      "afterwards the test-time gates are frozen and the weights fine-tune")
    calibration: CalibrationConfig = CalibrationConfig()
    mode: Literal["calibrated", "reference"] = Field(
        "calibrated", description="calibrated: the suite's equal-sparsity mode (knob steered, snap, gates frozen "
        "at search_end); reference: AMLab-Amsterdam/L0_regularization's recipe: lam is the paper's lambda per "
        "training example, fixed; gates train to the last epoch; log_alpha clamped to [ln 0.01, ln 100]; the "
        "weights' L2 is weight_decay/2 * sum_g P(z_g != 0) |theta_g|^2 in the loss instead of SGD decay; unit "
        "gates of a Linear cover its input columns (variant l0-ref)")

    @model_validator(mode="after")
    def _mode_defaults(self):
        ref = self.mode == "reference"
        if self.granularity is None:
            self.granularity = "unit" if ref else "weight"
        if self.drop_init is None:
            self.drop_init = 0.5 if ref else 0.1
        if self.gate_lr is None:
            self.gate_lr = 1e-3 if ref else 0.05
        return self


class STRConfig(_Strict):
    """Soft threshold reparameterisation (Kusupati et al. 2020): W_hat = sign(W) relu(|W| - sigmoid(s_l))."""

    s_init: Optional[float] = Field(None, ge=-1e6, le=0, description="initial threshold parameter s_l of every "
                                    "layer (default -8; reference mode -3200, RAIVNLab/STR's ResNet-50 at 90.23 %: "
                                    "there the loss gradient on s is 0 and the weight decay alone raises it, which "
                                    "takes tens of ImageNet epochs; a short run needs a knob of its own)")
    s_weight_decay: float = Field(1e-2, gt=0, description="knob: weight decay on s_l (drives thresholds up); "
                                  "calibrated unless calibration.mode is off")
    search_end: Optional[int] = Field(None, ge=1, description="last epoch thresholds train (default 3/4 of epochs)")
    calibration: CalibrationConfig = CalibrationConfig()
    mode: Literal["calibrated", "reference"] = Field(
        "calibrated", description="calibrated: the suite's equal-sparsity mode (knob steered, thresholds frozen at "
        "search_end, snap); reference: RAIVNLab/STR's recipe: s decays with the weights' own weight_decay "
        "(s_weight_decay unused), thresholds train to the last epoch, no steering; the sparsity follows from "
        "s_init and weight_decay (variant str-ref)")

    @model_validator(mode="after")
    def _mode_defaults(self):
        if self.s_init is None:
            self.s_init = -3200.0 if self.mode == "reference" else -8.0
        return self


class CSConfig(_Strict):
    """Continuous Sparsification (Savarese et al. 2020): mask sigmoid(beta s) / sigmoid(s0)."""

    mode: Literal["calibrated", "reference"] = Field(
        "calibrated", description="calibrated: the suite's equal-sparsity mode (lam steered, beta per step, Adam on "
        "the masks, anti-windup, snap); reference: lolemacs/continuous-sparsification's recipe: lam fixed, the knob "
        "is s0; beta x beta_final^(1/(epochs_per_round-1)) per epoch, back to 1 each round; round reset "
        "s <- min(s, s0) (the code's order); masks trained by the weights' SGD (no weight decay); the LR schedule "
        "restarts every round and for the retraining; soft mask at evaluation during the search; after the search "
        "the weights rewind to the start of epoch rewind_epoch and the ticket 1[s > 0] / sigmoid(s0) retrains "
        "for the remaining epochs (variant cs-ref)")
    rounds: int = Field(3, ge=1, le=100, description="search rounds (beta annealed 1 -> beta_final in each)")
    epochs_per_round: Optional[int] = Field(None, ge=1, description="default: 3/4 of epochs divided by rounds "
                                            "(reference mode: epochs / (rounds + 1), the last share retrains)")
    beta_final: float = Field(200.0, gt=1, description="temperature reached at the end of each round")
    s_init: Optional[float] = Field(None, ge=-100, le=100, description="s0: initial mask parameter (default 0.1; "
                                    "reference mode 0.0, the reference's knob: lower is sparser). Calibrated mode "
                                    "needs s0 > 0, so that the hard mask 1[s > 0] the suite measures starts dense; "
                                    "small, so a mask reaches 0 within an epoch of the knob asking for it (0.5: two "
                                    "epochs of lag, overshoot)")
    lam: float = Field(1e-8, gt=0, description="lambda of lambda * sum(mask) (unnormalised; paper: 1e-8); the "
                       "knob, calibrated, unless calibration.mode is off or mode is reference (fixed); start "
                       "value: with s0 0.1, 1e-7 pruned 26 % in the first epoch (target 4 %) and the controller "
                       "settled near 1e-8 in round 1 (measured)")
    mask_lr: float = Field(0.01, gt=0, le=100, description="Adam learning rate of the mask parameters (calibrated "
                           "mode; reference mode trains them with the weights' SGD and LR)")
    control_beta_s: float = Field(2.0, gt=0, description="the knob controller holds the knob while beta * s_init "
                                  "exceeds this (anti-windup: the density stops moving at beta * s0 ~ 3, about 60 % "
                                  "into a round; without the hold the knob wound up 30-90x and the next round "
                                  "collapsed, measured)")
    rewind: Optional[bool] = Field(None, description="retrain the final binary mask from the weights at the start "
                                   "of epoch rewind_epoch (default: off in calibrated mode, on in reference mode; "
                                   "off: in the 80 x 25 protocol the 20 low-LR fine-tuning epochs of the calibrated "
                                   "mode cannot recover the rewound weights, 90.1 % -> 77.9 % top-1 at 91 % "
                                   "sparsity, measured)")
    rewind_epoch: Optional[int] = Field(None, ge=0, description="the rewind point (default 2, the reference's, or "
                                        "the round's last epoch in a run whose rounds are shorter): the weights at "
                                        "the start of this 0-based "
                              "epoch of the first round (after this many epochs; the reference's 2)")
    calibration: CalibrationConfig = CalibrationConfig(lookahead=3.0)  # see cs docstring (measured)

    @model_validator(mode="after")
    def _mode_defaults(self):
        ref = self.mode == "reference"
        if self.s_init is None:
            self.s_init = 0.0 if ref else 0.1
        if self.rewind is None:
            self.rewind = ref
        if not ref and self.s_init <= 0:
            raise ValueError(f"cs.s_init = {self.s_init:g}: the calibrated mode needs s0 > 0 (the hard mask 1[s > 0] "
                             f"must start dense); s0 <= 0 is for mode: reference")
        return self


class RMTConfig(_Strict):
    """Marchenko-Pastur (random-matrix) pruning family (docs: baselines.md; baselines/marchenko_pastur.py)."""

    alpha: float = Field(0.25, gt=0, lt=0.5, description="central quantile window of the MP scale fit")
    beta: float = Field(0.01, gt=0, lt=1, description="Tracy-Widom tail probability of the edge correction: "
                        "the chance that a pure-noise layer shows a singular value above the edge (0.01: "
                        "count the spikes that are there; the papers' public code uses 0.8, an edge inside "
                        "the bulk that noise crosses most of the time; baselines/marchenko_pastur.py)")
    deflate: bool = Field(True, description="fit the MP scale on the bulk without the values counted above the "
                          "edge, refitting until the count is stable (false: one fit on all values, as the public "
                          "code; many spikes then inflate the scale and hide spikes)")
    seb_b: float = Field(1.0, ge=0, description="SEB: b in w_l(s) = max(0.1, 1 + b d(s) z_l)")
    seb_sd: float = Field(1.0, gt=0, description="SEB: s_d in d(s) = (1 - s / s_d)_+^p")
    seb_p: float = Field(1.0, gt=0, description="SEB: p in d(s)")
    seb_regime: Literal["fixed", "paper"] = Field(
        "fixed", description="SEB's b and s_d: fixed (seb_b, seb_sd for every target), or the paper's regimes by "
        "target (below 0.30 plain magnitude; to 0.40 b 1.0, s_d 0.5; to 0.55 b 1.25, s_d 0.7; above, s_d 0.85 with "
        "b 1.0 attention / 2.0 MLP / 1.5 other layers; baselines/marchenko_pastur.py seb_paper_regime)")
    ser_rho: float = Field(1.1, ge=1, description="SER: over-prune to min(rho * s, 0.999) before restoring")
    ser_reinsert: Optional[float] = Field(None, gt=0, lt=1, description="SER: over-prune to s + this (absolute) "
                                          "instead of rho * s; the released code reinserts 0.03 of all weights")
    quantile_offset: float = Field(0.5, ge=0, lt=1, description="MP scale fit: the i-th smallest value sits at "
                                   "quantile (i + offset) / p (0.5: its cell's midpoint; the public code: 0)")
    hybrid_switch: float = Field(0.2, gt=0, lt=1, description="hybrid: magnitude up to this sparsity, SER beyond")
    regularised_epochs: int = Field(1, ge=0, description="classical RMT: epochs of the short regularised fine-tune")
    l1: float = Field(1e-5, ge=0, description="classical RMT: L1 coefficient (on sum |w| of the prunable weights) "
                      "in the regularised fine-tune")
    cycles: int = Field(1, ge=1, le=1000, description="classical RMT: pruning cycles (1: one shot at the start; "
                        "the public code: 34, each removing 0.06 x 1.02^i of the remaining weights with layer shares "
                        "to the power 1.5 / i; here scaled so the last cycle lands on the target)")
    cycle_steps: Optional[int] = Field(None, ge=1, description="classical RMT: optimiser steps between cycles "
                                       "(default: the first half of the run split evenly)")
    sv_tau: float = Field(1.0, ge=0, description="classical RMT: noise singular-vector entries below "
                          "sv_tau (1 - s_i / sv_edge) / sqrt(dim) are zeroed")


METHOD_SECTIONS = {"hyperflux": HyperfluxConfig, "magnitude": MagnitudeConfig, "gmp": GMPConfig,
                   "imp": IMPConfig, "l0": L0Config, "soft_threshold": STRConfig, "cs": CSConfig, "rmt": RMTConfig}
# methods that read another method's section (the RMT family shares one)
SECTION_OF = {"str": "soft_threshold", "seb": "rmt", "ser": "rmt", "rmt_hybrid": "rmt"}
# named variants a sweep can list in grid.methods (and key overrides by): a method with the one
# option that makes it another recipe; RunConfig.variant() gives the name back
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "l0-ref": ("l0", {"l0": {"mode": "reference"}}),
    "str-ref": ("str", {"soft_threshold": {"mode": "reference"}}),
    "cs-ref": ("cs", {"cs": {"mode": "reference"}}),
    "imp-lrr": ("imp", {"imp": {"rewind": "lr"}}),
    "imp-ticket": ("imp", {"init": "scratch"}),
    "gmp-layer": ("gmp", {"gmp": {"scope": "layer"}}),
}


def cs_round_epochs(run) -> int:
    """Epochs of one CS search round: as given, or 3/4 of the run split over the rounds (calibrated),
    or the run split into rounds + 1 equal segments, the last retraining the ticket (reference)."""
    c = run.cs
    if c.epochs_per_round:
        return c.epochs_per_round
    share = run.epochs // (c.rounds + 1) if c.mode == "reference" else (3 * run.epochs) // 4 // c.rounds
    return max(1, share)


def imp_levels(sparsity: float, imp: "IMPConfig") -> int:
    """Pruning levels of an IMP run: as given, or enough levels of `prune_fraction` to reach
    the target (8 for 80 %, 11 for 90 %, 14 for 95 % at 20 % per level)."""
    if imp.levels is not None:
        return imp.levels
    assert imp.prune_fraction is not None  # IMPConfig refuses null without levels
    return max(1, math.ceil(math.log(1.0 - sparsity) / math.log(1.0 - imp.prune_fraction) - 1e-9))


# methods that need more than one epoch: SER restores at the end of its selection epoch (1;
# 2 for the hybrid above its switch, after its magnitude epoch) and then fine-tunes (baselines/rmt.py)
MIN_EPOCHS = {"ser": 2, "rmt_hybrid": 3}


class EngineConfig(_Strict):
    world_size: int = Field(1, ge=1, le=1024, description="ranks (GPUs, or CPU processes) per run")
    nodes: int = Field(1, ge=1, le=256)
    zero_stage: Literal[0, 1, 2] = Field(0, description="DeepSpeed ZeRO stage: 1 partitions the optimiser "
                                         "state across ranks, 2 also the gradients (dense runs)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads_per_rank: int = Field(1, ge=1, le=256)
    deterministic: bool = True
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="bf16 / fp16: torch.autocast mixed precision for forward and loss; weights, gates and "
                            "optimiser state stay fp32; fp16 adds a dynamic gradient scaler (torch.amp.GradScaler: "
                            "steps with inf/NaN gradients are skipped), as the Hyperflux reference code trains")
    channels_last: bool = Field(False, description="NHWC memory format for the model and its input batches")
    loader_workers: int = Field(1, ge=1, le=256, description="FFCV loader threads per rank (not in the run hash)")


# --------------------------------------------------------------------------- the run
class RunConfig(_Strict):
    """Everything one training run needs. Semantic fields enter the run hash."""

    method: str = "dense"
    model: str = "fmnist_cnn"
    dataset: str = "fashion_mnist"
    sparsity: float = Field(0.0, ge=0.0, lt=1.0, description="target fraction of prunable weights at zero")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    epochs: int = Field(10, ge=1, le=10000)
    batch_size: int = Field(128, ge=1, le=65536, description="per-rank batch size")
    lr: float = Field(0.05, gt=0, le=10.0)
    lr_end: float = Field(0.0, ge=0, le=10, description="final weight LR of the cosine schedule (non-Hyperflux)")
    lr_schedule: Literal["cosine", "step"] = Field(
        "cosine", description="weight LR over the run (non-Hyperflux): cosine lr -> lr_end, or step: lr times "
                              "lr_gamma after each epoch listed in lr_milestones (torch MultiStepLR, per epoch)")
    lr_milestones: list[int] = Field(default_factory=list, description="step schedule: epochs after which the LR "
                                     "is multiplied by lr_gamma (e.g. [80, 120] for the reference dense CIFAR run)")
    lr_gamma: float = Field(0.1, gt=0, le=1, description="step schedule: LR factor at each milestone")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0, le=1)
    weight_decay_on: Literal["all", "conv_linear"] = Field(
        "all", description="parameters weight decay applies to: every trained one, or only Conv2d/Linear weights "
                           "(no biases, norms, embeddings; the Hyperflux reference's ImageNet recipe)")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    max_steps_per_epoch: Optional[int] = Field(None, ge=1, description="scale knob: cap batches per epoch")
    eval_every: int = Field(1, ge=1, description="evaluate val/test every k epochs (and always after the last)")
    flux_every: int = Field(1, ge=0, description="flux statistics and NPL saliencies every k epochs (and after "
                            "the last); one extra forward/backward on a training batch; 0: off")
    budget_matched: bool = Field(False, description="a dense control trained for the total budget of the pruning "
                                 "runs it is compared with (added by grid.budget_matched_dense; dense only)")
    init: Literal["scratch", "dense", "pretrained"] = Field(
        "scratch", description="start from random init, from the sweep's dense run, or from the weights file "
        "`pretrained` (torchvision/timm state dict on local disk)")
    pretrained: Optional[str] = Field(None, description="weights file for init 'pretrained' (loaded with "
                                      "weights_only; a classifier of another class count is re-initialised)")
    init_from: Optional[str] = Field(None, description="run hash of the dense run this run starts from (set by the sweep)")
    init_checkpoint: Optional[str] = Field(None, description="path of the starting weights (set by the sweep)")
    hyperflux: HyperfluxConfig = HyperfluxConfig()
    magnitude: MagnitudeConfig = MagnitudeConfig()
    gmp: GMPConfig = GMPConfig()
    imp: IMPConfig = IMPConfig()
    l0: L0Config = L0Config()
    soft_threshold: STRConfig = STRConfig()
    cs: CSConfig = CSConfig()
    rmt: RMTConfig = RMTConfig()
    engine: EngineConfig = EngineConfig()
    # where things go (not part of the identity)
    data_dir: str = "data"
    experiment: str = "default"
    sweep: str = ""
    tracking_uri: Optional[str] = None
    out_dir: str = "runs"

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from suite.pruning import registry

        if v not in registry.names():
            raise ValueError(f"unknown method {v!r}{did_you_mean(v, registry.names())}; known: {', '.join(registry.names())}")
        return v

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from suite import models

        if v not in models.names():
            raise ValueError(f"unknown model {v!r}{did_you_mean(v, models.names())}; known: {', '.join(models.names())}")
        return v

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from suite import datasets

        if v not in datasets.names():
            raise ValueError(f"unknown dataset {v!r}{did_you_mean(v, datasets.names())}; known: {', '.join(datasets.names())}")
        return v

    @field_validator("data_dir", "out_dir", "init_checkpoint", "pretrained")
    @classmethod
    def _safe_paths(cls, v: Optional[str], info) -> Optional[str]:
        return safe_path(v, info.field_name)

    @field_validator("experiment", "sweep", "tracking_uri")
    @classmethod
    def _no_control_chars(cls, v: Optional[str], info) -> Optional[str]:
        return v if v is None else _no_control(v, info.field_name)

    @model_validator(mode="before")
    @classmethod
    def _imp_epochs(cls, data: Any) -> Any:
        """IMP's length follows from its levels: epochs = (levels + 1) x imp.epochs_per_level."""
        if isinstance(data, dict) and data.get("method") == "imp":
            try:
                imp = IMPConfig.model_validate(data.get("imp", {}))
                s = float(data.get("sparsity", 0.0))
            except (ValidationError, TypeError, ValueError, OverflowError):
                return data  # the field validators report it
            if 0.0 < s < 1.0:
                try:
                    levels = imp_levels(s, imp)
                except (ArithmeticError, ValueError):  # log(1 - prune_fraction) == 0: tiny fraction
                    raise ValueError(f"imp.prune_fraction ({imp.prune_fraction}) is too small to reach "
                                     f"sparsity {s} in a finite number of levels") from None
                data = dict(data)
                data["epochs"] = (levels + 1) * imp.epochs_per_level
        return data

    @model_validator(mode="after")
    def _consistent(self):
        if self.budget_matched and self.method != "dense":
            raise ValueError(f"budget_matched: only a dense run can be a budget-matched control (method {self.method!r})")
        if self.method == "dense" and self.sparsity != 0.0:
            raise ValueError("method 'dense' needs sparsity 0 (got %s)" % self.sparsity)
        if self.method != "dense" and self.sparsity == 0.0:
            raise ValueError(f"method {self.method!r} needs a target sparsity > 0")
        if self.method == "hyperflux" and self.hyperflux.pruning_end > self.epochs:
            raise ValueError(
                f"hyperflux.pruning_end ({self.hyperflux.pruning_end}) must be <= epochs ({self.epochs})")
        if self.method == "hyperflux" and self.hyperflux.snap_pp > 0:
            from suite.pruning.hyperflux import snap_epoch

            if snap_epoch(self.hyperflux) >= self.epochs:
                raise ValueError(f"hyperflux.snap_pp: the snap happens when the gates freeze, after epoch "
                                 f"{snap_epoch(self.hyperflux)} (pruning_end + freeze_gates_after, at least pruning_end "
                                 f"+ 1 with phase_off_by_one), which must come before the last epoch ({self.epochs})")
        if self.method == "hyperflux":
            from suite.pruning.hyperflux import PressureScheduler

            PressureScheduler(self.sparsity, self.hyperflux.pruning_end, self.hyperflux.step)
        if self.method == "gmp":
            end = self.gmp.end_epoch if self.gmp.end_epoch is not None else self.epochs
            if end > self.epochs or end <= self.gmp.start_epoch:
                raise ValueError(f"gmp.end_epoch must be in (gmp.start_epoch, epochs]; got {end}")
            if self.gmp.initial_sparsity > self.sparsity:
                raise ValueError("gmp.initial_sparsity must be <= sparsity")
        need = MIN_EPOCHS.get(self.method, 1)
        if self.method == "rmt_hybrid" and self.sparsity <= self.rmt.hybrid_switch:
            need = 1  # one-shot magnitude below the switch
        if self.epochs < need:
            raise ValueError(f"epochs: {self.method} needs at least {need} (a selection epoch, then a fine-tune "
                             f"after the restore), got {self.epochs}")
        if self.init == "dense" and self.method == "dense":
            raise ValueError("init: a dense run cannot start from a dense run; use init 'scratch' or 'pretrained'")
        if (self.init == "pretrained") != (self.pretrained is not None):
            raise ValueError("pretrained: give a weights file exactly when init is 'pretrained' "
                             f"(init {self.init!r}, pretrained {self.pretrained!r})")
        if self.method in ("l0", "str", "cs"):  # calibrated L0 baselines: the search must fit in the run
            sec = self.cs if self.method == "cs" else self.l0 if self.method == "l0" else self.soft_threshold
            end = (self.cs.rounds * self.cs.epochs_per_round if self.cs.epochs_per_round else self.cs.rounds) \
                if self.method == "cs" else (sec.search_end or 1)
            if end > self.epochs:
                raise ValueError(f"{self.method}: the search phase ({end} epochs) must fit in epochs ({self.epochs})")
        if self.cs.rewind_epoch is None:  # the reference's epoch 2, inside the first round
            self.cs.rewind_epoch = min(2, max(0, cs_round_epochs(self) - 1))
        if self.method == "cs" and self.cs.rewind and self.cs.rewind_epoch >= cs_round_epochs(self):
            raise ValueError(f"cs.rewind_epoch ({self.cs.rewind_epoch}) must fall inside the first round "
                             f"({cs_round_epochs(self)} epochs)")
        if self.method == "cs" and self.cs.mode == "reference":
            epr = cs_round_epochs(self)
            if self.cs.rounds * epr >= self.epochs:
                raise ValueError(f"cs: reference mode retrains the ticket after {self.cs.rounds} rounds of {epr} "
                                 f"epochs; epochs ({self.epochs}) leaves no retraining")
            if self.lr_schedule == "step" and self.lr_milestones and self.lr_milestones[-1] >= epr:
                raise ValueError(f"lr_milestones: cs reference mode restarts the schedule every round, so its "
                                 f"milestones count within a round of {epr} epochs; got {self.lr_milestones}")
        if self.method == "gmp" and self.gmp.criterion == "taylor" and self.engine.precision == "fp16":
            raise ValueError("gmp.criterion taylor reads gradients before the fp16 gradient scaler unscales them; "
                             "use engine.precision bf16 or fp32")
        if self.lr_schedule == "step" and self.method in ("hyperflux", "imp"):
            raise ValueError(f"lr_schedule: {self.method} has its own weight-LR schedule (hyperflux: the two "
                             f"phases; imp: a cosine per level); 'step' applies to the other methods")
        if self.lr_schedule == "step":
            ms = self.lr_milestones
            if any(b <= a for a, b in zip(ms, ms[1:])) or (ms and (ms[0] < 1 or ms[-1] >= self.epochs)):
                raise ValueError(f"lr_milestones: the step schedule needs strictly increasing epochs in "
                                 f"[1, epochs - 1] (epochs {self.epochs}), got {ms}")
        elif self.lr_milestones:
            raise ValueError("lr_milestones: only used by lr_schedule 'step' (lr_schedule is 'cosine')")
        if self.engine.zero_stage != 0 and self.engine.precision == "fp16":
            raise ValueError("engine.precision fp16 (gradient scaler) is not supported with engine.zero_stage > 0")
        if self.engine.zero_stage != 0 and self.method != "dense":
            raise ValueError("engine.zero_stage > 0 is not supported with pruning yet")
        return self

    # -- identity --------------------------------------------------------------------------
    def semantic_dict(self) -> dict[str, Any]:
        """The fields that decide what is trained: everything except paths, names and the
        sections of other methods."""
        d = self.model_dump(mode="json")
        for k in ("data_dir", "experiment", "sweep", "tracking_uri", "out_dir", "init_checkpoint", "eval_every",
                  "flux_every"):
            d.pop(k)
        # fields added after runs were recorded enter the hash only when set, so older runs keep
        # their hashes; the weights file counts by name, not by folder
        eng = d["engine"]
        eng.pop("loader_workers")
        for k, default in (("precision", "fp32"), ("channels_last", False)):
            if eng[k] == default:
                eng.pop(k)
        for k, default in (("lr_schedule", "cosine"), ("lr_milestones", []), ("lr_gamma", 0.1),
                           ("weight_decay_on", "all"), ("budget_matched", False)):
            if d[k] == default:
                d.pop(k)
        if d["pretrained"] is None:
            d.pop("pretrained")
        else:
            d["pretrained"] = Path(d["pretrained"]).name
        for name in METHOD_SECTIONS:
            if name != self.section():
                d.pop(name)
        for sec in ("l0", "soft_threshold", "cs"):
            if sec in d and d[sec].get("mode") == "calibrated":
                d[sec].pop("mode")  # added later: calibrated runs keep their hashes
        if "cs" in d and not d["cs"]["rewind"]:
            d["cs"].pop("rewind_epoch")  # added later, read only when rewinding
        if "imp" in d and d["imp"].get("rewind") == "weights":
            d["imp"].pop("rewind")
        if self.section() == "rmt":  # added later: runs without them keep their hashes
            if d["rmt"].get("ser_reinsert") is None:
                d["rmt"].pop("ser_reinsert", None)
            if d["rmt"].get("quantile_offset") == 0.5:
                d["rmt"].pop("quantile_offset", None)
            if d["rmt"].get("seb_regime") == "fixed":
                d["rmt"].pop("seb_regime", None)
            if d["rmt"].get("cycles") == 1:
                d["rmt"].pop("cycles", None)
                d["rmt"].pop("cycle_steps", None)
        if self.section() == "rmt" and not d["rmt"]["deflate"]:
            d["rmt"].pop("deflate")  # the single-fit edge keeps the hashes it had before deflation existed
        if self.method == "hyperflux":  # inputs of the other pressure schedules change nothing
            h = d["hyperflux"]
            # phase_off_by_one was redefined to match the reference exactly (epoch P+1 also keeps the
            # pruning LRs): runs made under the old meaning must not be taken for new ones
            h["quirks"] = ["phase_off_by_one@9aaed27" if q == "phase_off_by_one" else q for q in h["quirks"]]
            if h["snap_pp"] == 0.0:
                h.pop("snap_pp")  # added later: runs without it keep their hashes
            if h["schedule"] != "law":
                h.pop("law")
            if h["schedule"] != "fixed":
                h.pop("fixed_gamma")
        return d

    def section(self) -> str:
        """The config section this run's method reads (its own, or its family's)."""
        return SECTION_OF.get(self.method, self.method)

    def run_hash(self) -> str:
        blob = json.dumps(self.semantic_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def variant(self) -> str:
        """The method with the option that changes what it is (the report's line label):
        hyperflux, hyperflux-law, hyperflux-fixed, gmp, gmp-taylor, ..."""
        if self.method == "dense" and self.budget_matched:
            return "dense-matched"
        if self.method == "hyperflux" and self.hyperflux.schedule != "controller":
            return f"hyperflux-{self.hyperflux.schedule}"
        if self.method == "imp" and self.imp.rewind == "lr":
            return "imp-lrr"
        if self.method == "imp" and self.init == "scratch":  # weight rewinding within a run from scratch
            return "imp-ticket"
        if self.method == "l0" and self.l0.mode == "reference":
            return "l0-ref"
        if self.method == "str" and self.soft_threshold.mode == "reference":
            return "str-ref"
        if self.method == "cs" and self.cs.mode == "reference":
            return "cs-ref"
        if self.method == "gmp":  # per-layer GMP (Gale et al.'s uniform) is another method than global
            return "gmp" + (f"-{self.gmp.criterion}" if self.gmp.criterion != "magnitude" else "") + \
                ("-layer" if self.gmp.scope == "layer" else "")
        return self.method

    def run_name(self) -> str:
        if self.method == "dense":
            return f"{self.model}-dense-matched-e{self.epochs}x{self.max_steps_per_epoch or 'all'}-s{self.seed}" \
                if self.budget_matched \
                else f"{self.model}-dense-s{self.seed}"
        if self.method == "hyperflux" and self.hyperflux.schedule == "fixed":
            return f"{self.model}-hyperflux-g{self.hyperflux.fixed_gamma:g}-s{self.seed}"
        return f"{self.model}-{self.variant()}-{self.sparsity:g}-s{self.seed}"

    def flat_params(self) -> dict[str, str]:
        """Dotted, flattened view for MLflow params (method sections of other methods omitted)."""
        out: dict[str, str] = {}

        def walk(prefix: str, obj: Any) -> None:
            if isinstance(obj, dict):
                for k, v in obj.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = str(obj)

        d = self.model_dump(mode="json")
        for name in METHOD_SECTIONS:
            if name != self.section():
                d.pop(name)
        walk("", d)
        return out



# --------------------------------------------------------------------------- the sweep
class SlurmConfig(_Strict):
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    time_min: int = Field(60, ge=1, le=60 * 24 * 14)
    cpus_per_task: int = Field(1, ge=1, le=512)
    mem_gb: Optional[float] = Field(None, gt=0)
    gpus_per_node: int = Field(0, ge=0, le=16)
    signal_delay_s: int = Field(90, ge=5, le=3600, description="USR2 this long before the time limit")
    extra: dict[str, str] = Field(default_factory=dict, description="extra sbatch options")

    @field_validator("partition", "account", "qos", "constraint")
    @classmethod
    def _one_line(cls, v: Optional[str], info) -> Optional[str]:
        # these land in the generated sbatch script: a newline would start a new shell line
        return v if v is None else _no_control(v, info.field_name)

    @field_validator("extra")
    @classmethod
    def _sbatch_options(cls, v: dict[str, str]) -> dict[str, str]:
        import re

        for k, x in v.items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", k):
                raise ValueError(f"extra: sbatch option name {k!r} must be letters, digits, '-' or '_'")
            _no_control(x, f"extra.{k}")
        return v


class LauncherConfig(_Strict):
    executor: Literal["auto", "slurm", "local", "debug"] = "auto"
    parallelism: int = Field(2, ge=1, le=10000, description="runs at once (SLURM array limit)")
    folder: str = Field("runs/submitit", description="submitit logs and job files: <folder>/<sweep name>/<time>; "
                        "a relative path may not contain '..'")
    slurm: SlurmConfig = SlurmConfig()
    poll_s: float = Field(2.0, gt=0, le=600)
    max_requeues: int = Field(10, ge=0, le=1000, description="preemptions/time-outs a task may be requeued after")
    submit_retry_s: int = Field(600, ge=0, le=86400, description="how long a SLURM submission is retried "
                                "while the controller does not answer (0: no retry)")
    tracking_timeout_s: float = Field(30.0, gt=0, le=3600, description="the sweep's own MLflow calls (experiment, "
                                      "finished runs) give up after this long and name the server")

    @field_validator("folder")
    @classmethod
    def _safe_folder(cls, v: str) -> str:
        return safe_path(v, "folder")


class GridConfig(_Strict):
    methods: list[str] = Field(default_factory=lambda: ["dense"], min_length=1)
    sparsities: list[float] = Field(default_factory=lambda: [0.9], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    models: Optional[list[str]] = None
    params: dict[str, list[Any]] = Field(
        default_factory=dict, description="extra grid axes over run fields, e.g. {hyperflux.fixed_gamma: [1, 2, 4]}")
    budget_matched_dense: bool = Field(
        False, description="add, per model and seed, a dense run trained for each total budget of the pruning "
                           "runs (their own epochs, plus the dense run's for those that start from it): the "
                           "report's control for equal-budget comparisons")
    dense_convergence: bool = Field(
        False, description="add, per model and seed, a dense run trained for twice the dense run's epochs: the "
                           "report shows what doubling the dense budget gains (the dense start counts as converged "
                           "below 0.2 pp)")

    @field_validator("sparsities")
    @classmethod
    def _range(cls, v: list[float]) -> list[float]:
        for i, s in enumerate(v):
            if not 0.0 < s < 1.0:
                raise ValueError(f"sparsities[{i}] = {s} is outside (0, 1)")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        for i, s in enumerate(v):
            if not 0 <= s <= 2**31 - 1:
                raise ValueError(f"seeds[{i}] = {s} must be in [0, 2^31)")
        return v

    @field_validator("params")
    @classmethod
    def _axes(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for k, values in v.items():
            if not k or any(not p for p in k.split(".")):
                raise ValueError(f"params: {k!r} is not a dotted run field name")
            if not values:
                raise ValueError(f"params.{k}: an axis needs at least one value (an empty one means no runs)")
            _plain(values, f"params.{k}")
        return v


class ScaleConfig(_Strict):
    """The scale knob: the same sweep, shrunk for a smoke run (`hfbench sweep --scale F --steps N`).
    Every epoch count of every run (epochs, IMP's epochs per level, Hyperflux's P and gate
    freeze, GMP's start/end, the L0 family's search end and CS's round length, eval_every) is
    multiplied by `epochs` and rounded, at least 1, keeping each phase inside the run and a
    regrowth / fine-tune phase where the full recipe has one (when the run is long enough);
    `steps_per_epoch` caps the batches of every epoch (the dataset seen per epoch). The run
    hash changes with them, so smoke runs never stand in for full ones."""

    epochs: float = Field(1.0, gt=0, le=1, description="factor on every epoch count")
    steps_per_epoch: Optional[int] = Field(None, ge=1, description="cap on batches per epoch")

    def apply(self, f: dict[str, Any]) -> None:
        """Scale one run's merged fields in place (before validation)."""
        if self.steps_per_epoch is not None:
            cur = f.get("max_steps_per_epoch")
            f["max_steps_per_epoch"] = self.steps_per_epoch if cur is None else min(cur, self.steps_per_epoch)
        if self.epochs != 1.0:
            self._scale_epochs(f, self.epochs)
        imp = f.get("imp")
        if f.get("method") == "imp" and isinstance(imp, dict) and imp.get("rewind_step"):
            if self.epochs != 1.0:
                imp["rewind_step"] = max(1, round(imp["rewind_step"] * self.epochs))
            cap = f.get("max_steps_per_epoch")
            if cap:  # the rewind point must fall inside the (shortened) first segment
                imp["rewind_step"] = min(imp["rewind_step"], imp.get("epochs_per_level", 1) * cap)

    @staticmethod
    def _scale_epochs(f: dict[str, Any], k: float) -> None:

        def sc(v: Any) -> Any:
            return max(1, round(v * k)) if isinstance(v, int) and not isinstance(v, bool) else v

        full = f.get("epochs", RunConfig.model_fields["epochs"].default)
        ep = f["epochs"] = max(sc(full), min(full, MIN_EPOCHS.get(f.get("method"), 1)))
        if "eval_every" in f:
            f["eval_every"] = min(sc(f["eval_every"]), ep)
        if isinstance(f.get("lr_milestones"), list) and f["lr_milestones"]:  # kept inside the run, distinct
            ms: list = []
            for m in f["lr_milestones"]:
                if isinstance(m, float) and m.is_integer():
                    m = int(m)
                v = min(max(sc(m), ms[-1] + 1 if ms else 1), ep - 1) if isinstance(m, int) else m
                if not ms or v != ms[-1]:
                    ms.append(v)
            f["lr_milestones"] = [m for m in ms if not isinstance(m, int) or m >= 1]
        method = f.get("method")
        sec = lambda name: f.setdefault(name, {}) if isinstance(f.get(name, {}), dict) else {}  # noqa: E731
        if method == "imp":
            imp = sec("imp")
            imp["epochs_per_level"] = sc(imp.get("epochs_per_level", IMPConfig.model_fields["epochs_per_level"].default))
        elif method == "hyperflux":
            h = sec("hyperflux")
            P = h.get("pruning_end", HyperfluxConfig.model_fields["pruning_end"].default)
            new_p = min(sc(P), ep)
            if P < full and new_p >= ep and ep >= 2:
                new_p = ep - 1  # keep a regrowth phase
            new_p = _feasible_pruning_end(new_p, f.get("sparsity"), h.get("step"), P)
            # a regrowth phase where the recipe has one: one epoch after P, two with the reference boundary
            # (phase_off_by_one: epoch P + 1 is still a pruning epoch)
            regrow = (2 if "phase_off_by_one" in (h.get("quirks") or []) else 1) if P < full else 0
            f["epochs"] = ep = max(ep, new_p + regrow)  # a short P cannot reach high sparsity
            h["pruning_end"] = new_p
            if "freeze_gates_after" in h:
                h["freeze_gates_after"] = sc(h["freeze_gates_after"]) if h["freeze_gates_after"] else 0
                if h.get("snap_pp") and isinstance(h["freeze_gates_after"], int):
                    # the snap needs an epoch after the freeze: shorten the regrowth's gate training, else
                    # lengthen the run by the missing epochs
                    quirk = 1 if "phase_off_by_one" in (h.get("quirks") or []) else 0
                    h["freeze_gates_after"] = max(quirk, min(h["freeze_gates_after"], ep - 1 - new_p))
                    f["epochs"] = ep = max(ep, new_p + max(h["freeze_gates_after"], quirk) + 1)
        elif method == "gmp":
            g = sec("gmp")
            start = min(sc(g["start_epoch"]) if g.get("start_epoch") else 0, max(ep - 1, 0))
            g["start_epoch"] = start
            if g.get("end_epoch") is not None:
                g["end_epoch"] = min(max(sc(g["end_epoch"]), start + 1), ep)
        elif method in ("l0", "str"):
            s_ = sec("l0" if method == "l0" else "soft_threshold")
            if s_.get("search_end") is not None:
                s_["search_end"] = min(sc(s_["search_end"]), ep)
        elif method == "cs":
            c = sec("cs")
            rounds = c.get("rounds", CSConfig.model_fields["rounds"].default)
            ref = c.get("mode") == "reference"
            if c.get("epochs_per_round") is not None:
                c["epochs_per_round"] = max(1, min(sc(c["epochs_per_round"]), ep // max(rounds + ref, 1)))
            if rounds + ref > ep:
                c["rounds"] = rounds = max(1, ep - ref)
            # the rewind point and (reference mode) the step milestones stay inside the (shortened) first round
            epr = c.get("epochs_per_round") or max(1, ep // (rounds + 1) if ref else (3 * ep) // 4 // rounds)
            if c.get("rewind_epoch") is not None:
                c["rewind_epoch"] = max(0, min(round(c["rewind_epoch"] * k), epr - 1))
            if ref and isinstance(f.get("lr_milestones"), list):
                f["lr_milestones"] = sorted({m for m in f["lr_milestones"] if isinstance(m, int) and 1 <= m < epr})


def _budget_matched_dense(runs: list["RunConfig"], dense: dict) -> list["RunConfig"]:
    """Dense controls for equal-budget comparisons: for each model / dataset / seed, one dense run
    per distinct total budget of its pruning runs (their own images, plus the dense run's for
    those that start from it). The control copies the dense run and trains the same total number
    of steps of the dense run's batch over as many epochs as the pruning chain has (dense epochs +
    the run's), each capped at ceil(steps / epochs) (an uncapped epoch is estimated from the
    dataset's train_images); step milestones scale with the epochs. What each run really saw is
    measured (budget_total_images) and the report prints the ratio."""
    import math as _m

    from suite import datasets

    def per_step(r: "RunConfig") -> int:
        return r.batch_size * r.engine.world_size * r.engine.nodes

    def full_epoch_steps(r: "RunConfig") -> Optional[int]:
        n = datasets.get(r.dataset).train_images
        return None if n is None else n // per_step(r)  # the training loader drops the last partial batch

    def epoch_images(r: "RunConfig") -> Optional[float]:
        full, cap = full_epoch_steps(r), r.max_steps_per_epoch
        steps = cap if full is None else full if cap is None else min(cap, full)
        return None if steps is None else float(steps * per_step(r))

    out: list[RunConfig] = []
    for key, parent in dense.items():
        p_img, p_full = epoch_images(parent), full_epoch_steps(parent)
        plans: set[tuple[int, Optional[int]]] = set()
        for r in runs:
            if r.method == "dense" or (r.model, r.dataset, r.seed) != key:
                continue
            r_img = epoch_images(r)
            if not p_img or r_img is None:
                continue
            from_dense = r.init == "dense"
            total_steps = (r.epochs * r_img + (parent.epochs * p_img if from_dense else 0)) / per_step(parent)
            epochs = r.epochs + (parent.epochs if from_dense else 0)
            cap: Optional[int] = _m.ceil(total_steps / epochs)
            if p_full is not None and cap >= p_full:  # whole epochs of the dense run's own shape
                epochs, cap = max(1, round(total_steps / p_full)), parent.max_steps_per_epoch
            if (epochs, cap) != (parent.epochs, parent.max_steps_per_epoch):
                plans.add((epochs, cap))
        for epochs, cap in sorted(plans, key=lambda p: (p[0], p[1] or 0)):
            k = epochs / parent.epochs
            ms = sorted({round(m * k) for m in parent.lr_milestones} & set(range(1, epochs)))
            fields = {**parent.model_dump(), "epochs": epochs, "max_steps_per_epoch": cap,
                      "budget_matched": True, "lr_milestones": ms}
            out.append(_validate(RunConfig, fields, where="grid.budget_matched_dense",
                                 source=f"budget-matched dense run for {parent.run_name()}"))
    return out


def _doubled_dense(dense: dict) -> list["RunConfig"]:
    """The convergence check of each dense run: the same run with twice the epochs (step
    milestones doubled), a budget-matched plan of twice its budget for the report."""
    out = []
    for parent in dense.values():
        fields = {**parent.model_dump(), "epochs": 2 * parent.epochs, "budget_matched": True,
                  "lr_milestones": [2 * m for m in parent.lr_milestones]}
        out.append(_validate(RunConfig, fields, where="grid.dense_convergence",
                             source=f"doubled dense run for {parent.run_name()}"))
    return out


def _feasible_pruning_end(p: int, sparsity: Any, step: Any, full: int) -> int:
    """The smallest P >= p (up to the recipe's own) whose target trajectory reaches the sparsity."""
    from suite.pruning.hyperflux import PressureScheduler

    step = step if step is not None else HyperfluxConfig.model_fields["step"].default
    for cand in range(p, max(p, full) + 1):
        try:
            PressureScheduler(float(sparsity), cand, step)
            return cand
        except (TypeError, ValueError):
            continue
    return p  # let the run's own validation name the problem


class SweepConfig(_Strict):
    name: str = Field(..., min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")
    experiment: Optional[str] = Field(None, min_length=1, max_length=200)
    tracking_uri: Optional[str] = None
    data_dir: str = "data"
    out_dir: str = "runs"
    base: dict[str, Any] = Field(default_factory=dict, description="run fields shared by every run")
    grid: GridConfig = GridConfig()
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-method run fields, e.g. {hyperflux: {epochs: 12}}; a key may "
        "also be a variant of grid.methods (l0-ref: {...}) or one target of a method or variant (str-ref@0.9: "
        "{...}, as a published recipe sets its knob per sparsity); applied in that order, the most specific last")
    launcher: LauncherConfig = LauncherConfig()
    reuse_dense: bool = Field(False, description="start from dense weights already in out_dir (same hash) "
                                                 "even if that dense run is not in this experiment")
    scale: ScaleConfig = ScaleConfig()

    @field_validator("name")
    @classmethod
    def _name_is_a_folder(cls, v: str) -> str:
        return safe_component(v, "name")  # <launcher.folder>/<name>/...

    @field_validator("experiment")
    @classmethod
    def _no_control_chars(cls, v: Optional[str], info) -> Optional[str]:
        return v if v is None else _no_control(v, info.field_name)

    @field_validator("tracking_uri")
    @classmethod
    def _store_uri(cls, v: Optional[str], info) -> Optional[str]:
        return _tracking_uri(v, info.field_name)

    @field_validator("data_dir", "out_dir")
    @classmethod
    def _safe_paths(cls, v: str, info) -> str:
        return safe_path(v, info.field_name)

    @field_validator("base", "overrides")
    @classmethod
    def _plain_data(cls, v: dict[str, Any], info) -> dict[str, Any]:
        _plain(v, info.field_name)
        return v

    def experiment_name(self) -> str:
        """The MLflow experiment; a scaled-down (smoke) sweep logs to <experiment>-smoke."""
        name = self.experiment or self.name
        return name + "-smoke" if self.scale != ScaleConfig() else name

    # run fields the sweep sets itself for every run: a value under base/overrides/grid.params
    # would be overwritten without a word
    _SWEEP_SET = {"method": "grid.methods", "sparsity": "grid.sparsities", "seed": "grid.seeds",
                  "data_dir": "data_dir", "out_dir": "out_dir", "experiment": "experiment", "sweep": "name",
                  "tracking_uri": "tracking_uri"}

    def _refuse_shadowed_fields(self) -> None:
        places = [("base", self.base)] + [(f"overrides.{m}", o) for m, o in self.overrides.items()]
        places.append(("grid.params", {k.split(".")[0]: v for k, v in self.grid.params.items()}))
        for where, d in places:
            for key, owner in self._SWEEP_SET.items():
                if key in d and not (where == "base" and key == "method"):
                    raise ConfigError(f"{where}.{key}: the sweep sets {key} for every run from {owner}; "
                                      f"set it there (this value would be ignored)")
            if "model" in d and where != "base":
                raise ConfigError(f"{where}.model: the sweep sets the model from "
                                  f"{'grid.models' if self.grid.models else 'base.model'}; set it there")
        if self.grid.models and self.base.get("model") not in (None, *self.grid.models):
            raise ConfigError(f"base.model: {self.base['model']!r} is not used, grid.models "
                              f"({', '.join(map(str, self.grid.models))}) sets the models; drop it or add it there")

    def expand(self) -> list[RunConfig]:
        """The grid as run configs: dense runs first (one per model and seed), then every
        pruning method x sparsity x seed x model. Raises ConfigError naming the bad field."""
        runs: list[RunConfig] = []
        self._refuse_shadowed_fields()
        models = self.grid.models or [self.base.get("model", RunConfig.model_fields["model"].default)]
        seen: set[str] = set()
        axes = [(k, list({json.dumps(x, sort_keys=True): x for x in v}.values()))  # repeats are one value
                for k, v in self.grid.params.items()]
        n = len(models) * len(self.grid.seeds) * len(self.grid.methods) * len(self.grid.sparsities)
        for _, v in axes:
            n *= max(1, len(v))
        if n > MAX_GRID_RUNS:
            raise ConfigError(f"grid: models x seeds x methods x sparsities x grid.params values gives {n:,} runs "
                              f"(more than {MAX_GRID_RUNS:,}); split the sweep")
        combos = list(itertools.product(*[v for _, v in axes])) if axes else [()]
        for model, seed, entry, combo in itertools.product(models, self.grid.seeds, self.grid.methods, combos):
            method, preset = VARIANTS.get(entry, (entry, {}))
            if method == "dense" and combo != combos[0]:
                continue  # extra axes vary the pruning runs; one dense run per model and seed
            sparsities = [0.0] if method == "dense" else self.grid.sparsities
            for s in sparsities:
                fields = _deep_copy(self.base)
                keys = list(dict.fromkeys([method, entry, f"{method}@{s:g}", f"{entry}@{s:g}"]))
                layers = [(k, self.overrides.get(k, {})) for k in keys]
                _deep_update(fields, layers[0][1])
                _deep_update(fields, _deep_copy(preset))
                for _, ov in layers[1:]:
                    _deep_update(fields, ov)
                if method != "dense":
                    for (key, _), value in zip(axes, combo):
                        set_dotted(fields, key, value)
                fields.update(model=model, seed=seed, method=method, sparsity=s,
                              data_dir=self.data_dir, out_dir=self.out_dir,
                              experiment=self.experiment_name(), sweep=self.name,
                              tracking_uri=self.tracking_uri)
                if method == "dense" and fields.get("init") != "pretrained":
                    fields["init"] = "scratch"
                self.scale.apply(fields)
                def where(loc, layers=layers):  # the value's own place: the most specific overrides, or base
                    for key, ov in reversed(layers):
                        if key not in self.overrides:
                            continue  # nothing written there
                        node = ov
                        for part in loc:
                            if not isinstance(node, dict) or part not in node:
                                break
                            node = node[part]
                        else:
                            return f"overrides.{key}"
                    return "base"
                cfg = _validate(RunConfig, fields, where=where, source=f"run {method}")
                if cfg.run_hash() not in seen:
                    seen.add(cfg.run_hash())
                    runs.append(cfg)
        # a run that starts from a dense model starts from the sweep's dense run of the same
        # model, dataset and seed; its hash includes that parent's hash
        dense = {(r.model, r.dataset, r.seed): r for r in runs if r.method == "dense"}
        for i, r in enumerate(runs):
            if r.init == "dense":
                parent = dense.get((r.model, r.dataset, r.seed))
                if parent is None:
                    raise ConfigError(f"{r.method}: init 'dense' needs 'dense' in grid.methods "
                                      f"(no dense run for model {r.model}, seed {r.seed})")
                runs[i] = r.model_copy(update={"init_from": parent.run_hash()})
        if self.grid.budget_matched_dense:
            runs += _budget_matched_dense(runs, dense)
        if self.grid.dense_convergence:
            have = {r.run_hash() for r in runs}
            runs += [r for r in _doubled_dense(dense) if r.run_hash() not in have]
        # every rank of a GPU run needs a GPU of its node: engine.world_size ranks go on each of
        # engine.nodes nodes (the launcher asks for world_size tasks per node)
        gpus = self.launcher.slurm.gpus_per_node
        if gpus:
            for r in runs:
                if r.engine.device != "cpu" and r.engine.world_size > gpus:
                    raise ConfigError(
                        f"run {r.run_name()}: engine.world_size ({r.engine.world_size} ranks per node) is larger "
                        f"than launcher.slurm.gpus_per_node ({gpus}); every rank needs its own GPU (use "
                        f"engine.nodes for more, or engine.device: cpu)")
        runs.sort(key=lambda r: r.method != "dense")
        names: dict[str, float] = {}
        for r in runs:  # sparsities the run name (and the report's columns) cannot tell apart
            other = names.setdefault(r.run_name(), r.sparsity)
            if other != r.sparsity:
                raise ConfigError(f"grid.sparsities: {other!r} and {r.sparsity!r} are both shown as "
                                  f"{r.run_name()!r}; make them distinct")
        return runs

    @model_validator(mode="after")
    def _check(self):
        from suite.pruning import registry

        known = registry.names() + sorted(VARIANTS)
        bad = [f"grid.methods[{i}]: unknown method {m!r}{did_you_mean(m, known)}"
               for i, m in enumerate(self.grid.methods) if m not in known]
        listed = set(self.grid.methods) | {VARIANTS[m][0] for m in self.grid.methods if m in VARIANTS}
        targets = [f"{x:g}" for x in self.grid.sparsities]
        for m in self.overrides:
            name, at, target = m.partition("@")
            if name not in known:
                bad.append(f"overrides.{m}: unknown method {name!r}{did_you_mean(name, known)}")
            elif at and target not in targets:
                bad.append(f"overrides.{m}: {target!r} is not one of grid.sparsities as written in run names "
                           f"({', '.join(targets)})")
            elif (at or name in VARIANTS) and name not in listed:
                bad.append(f"overrides.{m}: {name} is not in grid.methods, so these values would never apply")
        if bad:
            bad[-1] += f" (known: {', '.join(known)})"
        bad += _unknown_keys(self.base, RunConfig, "base")
        for m, o in self.overrides.items():
            bad += _unknown_keys(o, RunConfig, f"overrides.{m}")
        if bad:  # every problem at once, one per line, each at the place it was written
            raise ValueError("\n  ".join(bad))
        for k in ("method", "sparsity", "seed", "experiment", "sweep"):
            if k in self.base:
                raise ValueError(f"base.{k}: set by the grid or the sweep, not in base")
        return self


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d))


MAX_CONFIG_NODES = 200_000


def _unshared(data: Any, where: str) -> Any:
    """A copy in which no mapping or list is shared: YAML aliases (&a / *a) become separate
    copies, so a `--set` on one place cannot change another. A document whose aliases expand to
    more than MAX_CONFIG_NODES values (an alias bomb) is refused instead of expanded."""
    count = [0]

    def walk(v: Any) -> Any:
        count[0] += 1
        if count[0] > MAX_CONFIG_NODES:
            raise ConfigError(f"{where}: the config expands to more than {MAX_CONFIG_NODES:,} values "
                              f"(nested YAML aliases?); refused")
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return v

    return walk(data)


# --------------------------------------------------------------------------- safe names and paths
MAX_GRID_RUNS = 20_000

TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")


def _tracking_uri(v: Optional[str], what: str) -> Optional[str]:
    """A tracking URI MLflow can use as a store: one of its schemes, or an absolute path."""
    if v is None:
        return v
    _no_control(v, what)
    scheme = v.split(":", 1)[0].split("+", 1)[0].lower() if ":" in v else ""
    if not (scheme in TRACKING_SCHEMES or v.startswith("/")):
        raise ValueError(f"{what}: {v!r} is not a tracking store MLflow can use (schemes: "
                         f"{', '.join(TRACKING_SCHEMES)}; e.g. http://host:5000 or sqlite:////path/mlflow.db)")
    if scheme == "sqlite" and v.startswith("sqlite:///"):
        db = Path(v[len("sqlite:///"):].split("?", 1)[0])
        if db.is_dir():
            raise ValueError(f"{what}: {v!r} names a folder, not a database file (e.g. sqlite:///{db / 'mlflow.db'})")
    return v


def _no_control(v: str, what: str) -> str:
    """Refuse NUL, newlines and other control characters (they end up in file names, sbatch
    scripts and log lines)."""
    import unicodedata

    bad = [c for c in v if unicodedata.category(c) in ("Cc", "Zl", "Zp")]  # C0, DEL, C1 (\x85, \x9b), U+2028/9
    if bad:
        raise ValueError(f"{what} must not contain control characters (found {bad[0]!r})")
    return v


def safe_path(v: Optional[str], what: str = "path") -> Optional[str]:
    """A path from a config: no control characters, and a relative path may not climb out of
    the working directory with '..' (give an absolute path to write elsewhere on purpose)."""
    if v is None:
        return v
    _no_control(v, what)
    if not v.strip():
        raise ValueError(f"{what} must not be empty")
    if v.startswith("~"):  # expanded by some tools (submitit) and not by others: ambiguous
        raise ValueError(f"{what} {v!r}: '~' is not expanded consistently; write the absolute path")
    if not Path(v).is_absolute() and ".." in Path(v).parts:
        raise ValueError(f"{what} {v!r}: a relative path must not contain '..' "
                         "(use an absolute path to write outside the working directory)")
    return v


def safe_component(v: str, what: str = "name") -> str:
    """A string that becomes one path component (a folder name): no '/', '\\', NUL/control
    characters, and not '.' or '..'."""
    _no_control(v, what)
    if v in (".", "..") or "/" in v or "\\" in v:
        raise ValueError(f"{what} {v!r} must be a single folder name (no '/', not '.' or '..')")
    return v


def _plain(v: Any, where: str) -> None:
    """Values of free-form sections (base, overrides, grid.params) must be plain YAML data:
    mappings with string keys, lists, strings, numbers, booleans, null. A YAML date or
    !!binary would otherwise fail deep inside the sweep's expansion."""
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: key {k!r} must be a string")
            _plain(x, f"{where}.{k}")
    elif isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            _plain(x, f"{where}[{i}]")
    elif isinstance(v, float) and not math.isfinite(v):
        return  # refused (or accepted) by the field it lands in
    elif v is not None and not isinstance(v, (str, int, float, bool)):
        raise ValueError(f"{where}: a value of type {type(v).__name__} is not allowed here "
                         f"(got {v!r}; quote it if it is meant as text)")


def _deep_update(dst: dict[str, Any], src: dict[str, Any]) -> None:
    """Merge src into dst; nested mappings are merged, not replaced."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = _deep_copy(v) if isinstance(v, dict) else v


# --------------------------------------------------------------------------- loading
def did_you_mean(name: Any, options) -> str:
    """' (did you mean 'x'?)' for the closest option, or '' when none is close."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_keys(d: Any, model: type[BaseModel], prefix: str) -> list[str]:
    """Keys of `d` that `model` (and its nested sections) does not have, each with its dotted
    place and the closest known key: a typo is named where it was written."""
    out: list[str] = []
    if not isinstance(d, dict):
        return out
    fields = model.model_fields
    for k, v in d.items():
        if k not in fields:
            out.append(f"{prefix}.{k}: unknown key{did_you_mean(k, fields)}")
            continue
        ann = fields[k].annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(_unknown_keys(v, ann, f"{prefix}.{k}"))
    return out


def _short(v: Any, limit: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def _model_at(model: Any, loc: tuple) -> Any:
    """The pydantic model class that holds the field at `loc` (None past a dict or list)."""
    for part in loc[:-1]:
        f = getattr(model, "model_fields", {}).get(part) if isinstance(part, str) else None
        ann = getattr(f, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _format_errors(err: ValidationError, where: Any = "", model: Any = None) -> str:
    """One line per error at its dotted place; `where` is a prefix, or a function of the error's
    location that gives it (a run's field may come from base or from its method's overrides)."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        w = where(e["loc"]) if callable(where) else where
        if w:
            loc = f"{w}.{loc}" if e["loc"] else w
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            holder = _model_at(model, tuple(e["loc"])) if model is not None else None
            if holder is not None and e["loc"]:
                msg += did_you_mean(e["loc"][-1], holder.model_fields)
        elif e["type"] == "missing":
            msg = "required field missing"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        if e["type"] == "value_error" and not e["loc"] and not where:
            lines.append(f"  {msg}")  # a whole-config check: its message names the field
        elif e["type"] == "missing" or (e["type"] == "value_error" and not e["loc"]):
            lines.append(f"  {loc}: {msg}")
        else:
            lines.append(f"  {loc}: {msg} (got {_short(e.get('input'))})")
    return "\n".join(lines)


def _validate(model: type[BaseModel], data: Any, where: Any = "", source: str = "config"):
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: invalid {model.__name__}:\n{_format_errors(err, where, model)}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error naming its line
    (PyYAML keeps the last value silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read the config file: {e}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as e:  # ValueError: e.g. a date 2020-13-45
        raise ConfigError(f"{p}: not valid YAML: {type(e).__name__}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_sweep(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> SweepConfig:
    # a copy without YAML aliases: `--set overrides.magnitude.epochs=30` must not also change the
    # methods that share magnitude's settings through an alias (&finetune / *finetune)
    data = _unshared(load_yaml(path), str(path))
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    sweep = _validate(SweepConfig, data, source=str(path))
    try:
        sweep.expand()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return sweep


def load_run(path: str | Path) -> RunConfig:
    return _validate(RunConfig, load_yaml(path), source=str(path))


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set data['a']['b'] for 'a.b', creating mappings on the way (for CLI overrides)."""
    parts = dotted.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted}: {p} is not a mapping")
        cur = nxt
    cur[parts[-1]] = value


def dump_run(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
