"""Continuous Sparsification (Savarese, Silva & Maire 2020), docs/baselines.md "Other L0 methods".

Every prunable weight has a mask parameter s (initial value s0 = cs.s_init) and
    train mode, search phase:  W_eff = W * sigmoid(beta * s) / sigmoid(s0)
    loss term:                 lam * sum(sigmoid(beta * s) / sigmoid(s0))   (sum over all masks)
The search runs cs.rounds rounds of cs.epochs_per_round epochs (default 3/4 of the epochs
divided by the rounds). Within a round beta grows geometrically from 1 to cs.beta_final, updated
after every optimiser step (beta = beta_final ** (k / (K - 1)) before the round's step k of K).
At the start of each later round s <- min(beta_final * s, s0) and beta restarts at 1. After the
last round the mask becomes 1[s > c] / sigmoid(s0) (c = 0 unless the snap moved it) and fixed;
with cs.rewind every model parameter and buffer except the mask parameters (the prunable layers'
stored weights, biases, normalisation statistics) is restored to its value at the start of
0-based epoch cs.rewind_epoch (snapshot taken then, in lrs; in on_train_start for epoch 0) and
the SGD momentum is cleared; the remaining epochs retrain with the fixed mask.

Reference mode (`cs.mode: reference`, variant cs-ref) follows lolemacs/continuous-sparsification
at 5bd4039 (main.py, models/layers.py, models/networks.py) instead:
- lam is fixed (main.py:26, 1e-8); the knob is s0 (main.py:28, default 0.0; the README's -0.1 is
  sparser, 0.1 denser); no controller, no snap.
- beta is set once per epoch: beta_final ** (e / (E - 1)) in 0-based epoch e of a round of E epochs
  (main.py:64, 99-100), back to 1 for each round (main.py:116).
- the round reset runs after beta went back to 1, so it is s <- min(s, s0) (main.py:116-117,
  layers.py:36-37), not the paper's min(beta_final s, s0).
- the masks train in the weights' SGD (momentum, the run's Nesterov, same LR, no weight decay:
  main.py:110-111, 66), as a group of their own (Pruner.extra_weight_groups).
- the run's LR schedule (cosine or step) restarts at every round and for the retraining; step
  milestones count within a round (main.py:49-55, 61, 66 adjust the LR by the round's epoch).
- evaluation during the search uses the soft mask at the current beta (main.py:86; the model keeps
  its temperature), so the suite's ruler reads the weights the reference evaluates: none exactly
  zero until the ticket. The metric mask_density logs 1[s > 0], what the ticket will keep.
- epochs: the rounds take epochs_per_round each (default epochs / (rounds + 1)), the rest retrains
  the ticket (main.py:15-16, 113-123: 3 x 85 search, 85 retraining).
- the ticket: after the last round every parameter and buffer except the masks goes back to its
  value at the start of epoch `rewind_epoch` of round 1 (main.py:25, 65; networks.py:14-24), the
  SGD state is cleared (a new optimiser, main.py:120) and the mask is 1[s > 0] / sigmoid(s0)
  (layers.py:30-34: scaled, also after rewinding).
- layers: the suite's prunable set (every Conv2d and Linear); the reference leaves its 1x1
  shortcut convolutions and the classifier unmasked (networks.py:53, 79), a difference listed in
  docs/reference/baselines.yaml.

Choices where the doc is open (calibrated mode):
- lam is the unnormalised paper coefficient (default 1e-8, the paper's value); the knob
  controller is multiplicative, so a normalised lam would only change its starting value.
- s is trained by the gate optimiser the engine offers (Adam, lr cs.mask_lr); the paper uses
  SGD with momentum for s. Adam divides out the gradient scale, so lam acts relative to the data
  gradient per mask and mask_lr is the speed at which s moves (about mask_lr per step).
- eval mode (the suite's ruler and the evaluation): the hard mask 1[s > 0] / sigmoid(s0), the
  limit of the training mask as beta -> infinity; the measured density during the search is
  the one the final binarisation gives, and the controller steers that. Since the ruler reads
  1[s > 0], s0 must be > 0 for the run to start dense (default 0.1, see below; the reference code's
  default s0 = 0.0, lolemacs/continuous-sparsification main.py:28 at 5bd4039, and its high-sparsity
  setting -0.1 would read as 100 % sparse at the start and after every round reset). For s0 > 0 the
  round reset min(beta s, s0) keeps the sign of every s, so it does not change the hard mask.
- final mask: 1[s > 0] / sigmoid(s0), with and without rewinding (as the reference's ticket).
- round transitions and the binarisation happen at the start of the epoch (in lrs), so the
  evaluation after each epoch sees the mask that epoch trained with; each is applied once (the
  pruner state records how far it got, for resumed runs). The snapshot is part of the pruner
  state until it has been used.
- lam is calibrated by calibration.KnobController after every search epoch (mode "off": fixed),
  with anti-windup: the knob is held (the measurement is recorded, the knob not moved; metric
  knob_held) when the next epoch starts at beta * s0 > cs.control_beta_s (default 2). Measured
  under the benchmark protocol (80 epochs x 25 steps, 3 rounds of 20 epochs, target 90 %): the
  density stops moving about 60 % into each round (beta * s0 ~ 3); without the hold the
  controller raised lam 30-90x over the rest of the round and the next round, restarting at
  beta 1, collapsed (density 0.62 -> 0.22 in two epochs against a target of 0.31; final
  sparsity 84.9 % with s0 0.5, 91.1 % with s0 0.1).
- the end-of-search snap (calibration.snap_pp, see suite/pruning/calibration.py): after the last
  search epoch the cut c of the hard mask 1[s > c] (0 until then) is set by bisection so that
  the mask gives exactly the target sparsity, when the knob left the run within snap_pp points
  of it; the binarisation that follows uses 1[s > c]. The masks still rank the weights; only the
  cut moves. c is part of the pruner state.
- defaults tuned under that protocol (measured): s0 = 0.1 (0.5 needs two epochs at mask_lr
  0.01 to reach 0, a lag the controller overshoots on); lookahead 3 (CS's own calibration
  default; the trend term has to brake before a round's pruning burst lands); rewind off: the
  20 fine-tuning epochs at the cosine schedule's low LR cannot recover weights rewound to the
  dense start under a 91 % mask (top-1 90.1 % before the rewind, 77.9 % at the end).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal, Optional, cast

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from suite.pruning import masks, registry, sparsity
from suite.pruning.base import Pruner, cosine, run_section, scaled
from suite.pruning.calibration import Calibrated, CalibrationConfig, KnobController, snap_to
from suite.schema import Strict

if TYPE_CHECKING:
    from suite.config import RunConfig


class CSConfig(Strict):
    """Continuous Sparsification (Savarese et al. 2020): mask sigmoid(beta s) / sigmoid(s0)."""

    mode: Literal["calibrated", "reference"] = Field(
        "calibrated",
        description="calibrated: the suite's equal-sparsity mode (lam steered, beta per step, Adam on "
        "the masks, anti-windup, snap); reference: lolemacs/continuous-sparsification's recipe: lam fixed, the knob "
        "is s0; beta x beta_final^(1/(epochs_per_round-1)) per epoch, back to 1 each round; round reset "
        "s <- min(s, s0) (the code's order); masks trained by the weights' SGD (no weight decay); the LR schedule "
        "restarts every round and for the retraining; soft mask at evaluation during the search; after the search "
        "the weights rewind to the start of epoch rewind_epoch and the ticket 1[s > 0] / sigmoid(s0) retrains "
        "for the remaining epochs (variant cs-ref)",
    )
    rounds: int = Field(3, ge=1, le=100, description="search rounds (beta annealed 1 -> beta_final in each)")
    epochs_per_round: Optional[int] = Field(
        None,
        ge=1,
        description="default: 3/4 of epochs divided by rounds "
        "(reference mode: epochs / (rounds + 1), the last share retrains)",
    )
    beta_final: float = Field(200.0, gt=1, description="temperature reached at the end of each round")
    s_init: Optional[float] = Field(
        None,
        ge=-100,
        le=100,
        description="s0: initial mask parameter (default 0.1; "
        "reference mode 0.0, the reference's knob: lower is sparser). Calibrated mode "
        "needs s0 > 0, so that the hard mask 1[s > 0] the suite measures starts dense; "
        "small, so a mask reaches 0 within an epoch of the knob asking for it (0.5: two "
        "epochs of lag, overshoot)",
    )
    lam: float = Field(
        1e-8,
        gt=0,
        description="lambda of lambda * sum(mask) (unnormalised; paper: 1e-8); the "
        "knob, calibrated, unless calibration.mode is off or mode is reference (fixed); start "
        "value: with s0 0.1, 1e-7 pruned 26 % in the first epoch (target 4 %) and the controller "
        "settled near 1e-8 in round 1 (measured)",
    )
    mask_lr: float = Field(
        0.01,
        gt=0,
        le=100,
        description="Adam learning rate of the mask parameters (calibrated "
        "mode; reference mode trains them with the weights' SGD and LR)",
    )
    control_beta_s: float = Field(
        2.0,
        gt=0,
        description="the knob controller holds the knob while beta * s_init "
        "exceeds this (anti-windup: the density stops moving at beta * s0 ~ 3, about 60 % "
        "into a round; without the hold the knob wound up 30-90x and the next round "
        "collapsed, measured)",
    )
    rewind: Optional[bool] = Field(
        None,
        description="retrain the final binary mask from the weights at the start "
        "of epoch rewind_epoch (default: off in calibrated mode, on in reference mode; "
        "off: in the 80 x 25 protocol the 20 low-LR fine-tuning epochs of the calibrated "
        "mode cannot recover the rewound weights, 90.1 % -> 77.9 % top-1 at 91 % "
        "sparsity, measured)",
    )
    rewind_epoch: Optional[int] = Field(
        None,
        ge=0,
        description="the rewind point (default 2, the reference's, or "
        "the round's last epoch in a run whose rounds are shorter): the weights at "
        "the start of this 0-based "
        "epoch of the first round (after this many epochs; the reference's 2)",
    )
    calibration: CalibrationConfig = CalibrationConfig(lookahead=3.0)  # see cs docstring (measured)

    @model_validator(mode="after")
    def _mode_defaults(self) -> CSConfig:
        ref = self.mode == "reference"
        if self.s_init is None:
            self.s_init = 0.0 if ref else 0.1
        if self.rewind is None:
            self.rewind = ref
        if not ref and self.s_init <= 0:
            raise ValueError(
                f"cs.s_init = {self.s_init:g}: the calibrated mode needs s0 > 0 (the hard mask 1[s > 0] "
                f"must start dense); s0 <= 0 is for mode: reference"
            )
        return self


def cs_round_epochs(run: RunConfig) -> int:
    """Epochs of one CS search round: as given, or 3/4 of the run split over the rounds (calibrated),
    or the run split into rounds + 1 equal segments, the last retraining the ticket (reference)."""
    c = run_section(run, "cs", CSConfig)
    if c.epochs_per_round:
        return c.epochs_per_round
    share = run.epochs // (c.rounds + 1) if c.mode == "reference" else (3 * run.epochs) // 4 // c.rounds
    return max(1, share)


_OWN = ".parametrizations.weight.0."  # state-dict infix of the mask parametrization's tensors


class CSMask(nn.Module):
    final_mask: torch.Tensor  # buffer

    def __init__(self, shape: torch.Size, s0: float, soft_eval: bool = False) -> None:
        super().__init__()
        self.soft_eval = soft_eval  # reference mode: evaluation sees the soft mask too
        self.s = nn.Parameter(torch.full(shape, float(s0)))
        self.register_buffer("final_mask", torch.ones(shape))
        self.s0 = s0
        self.scale = 1.0 / (1.0 / (1.0 + math.exp(-s0)))  # 1 / sigmoid(s0)
        self.beta = 1.0
        self.binary = False
        self.cut = 0.0  # the hard mask is 1[s > cut]; moved only by the end-of-search snap

    def soft(self) -> torch.Tensor:
        return torch.sigmoid(self.beta * self.s) * self.scale

    def hard(self) -> torch.Tensor:
        return (self.s > self.cut).to(self.s.dtype) * self.scale

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.binary:
            return w * self.final_mask.to(w.dtype)
        m = self.soft() if self.training else self.soft().detach() if self.soft_eval else self.hard().detach()
        return w * m.to(w.dtype)


@registry.register
class ContinuousSparsification(Calibrated, Pruner):
    name = "cs"
    section = "cs"
    options = CSConfig
    variants = {"cs-ref": {"cs": {"mode": "reference"}}}
    summary = "continuous sparsification masks, 3 rounds"
    # forward: read s, W, write W_eff (12; the penalty's sum of sigmoid(s) fused in); backward:
    # read G, W, s, write dW, ds with the penalty's gradient (20); Adam on s (28)
    floor_bytes = 60
    floor_note = "its mask is a chain of eager operators (scaling, sigmoid) and the penalty recomputes it"
    reference_recipe = (
        "lolemacs/continuous-sparsification's recipe, lambda {lam} fixed, the knob s0 = {s_init}, "
        "beta per epoch to {beta_final} in each of {rounds} rounds, masks in the weights' SGD, the LR "
        "restarted each round, the ticket 1[s > 0] retrained from the weights at epoch {rewind_epoch}"
    )
    published_note = "no published CS row in reports/published.csv"

    @classmethod
    def search_epochs(cls, run: RunConfig) -> int:
        c = run_section(run, "cs", CSConfig)
        return c.rounds * c.epochs_per_round if c.epochs_per_round else c.rounds

    @classmethod
    def check(cls, run: RunConfig) -> None:
        super().check(run)
        c = run_section(run, "cs", CSConfig)
        if c.rewind_epoch is None:  # the reference's epoch 2, inside the first round
            c.rewind_epoch = min(2, max(0, cs_round_epochs(run) - 1))
        if c.rewind and c.rewind_epoch >= cs_round_epochs(run):
            raise ValueError(
                f"cs.rewind_epoch ({c.rewind_epoch}) must fall inside the first round ({cs_round_epochs(run)} epochs)"
            )
        if c.mode == "reference":
            epr = cs_round_epochs(run)
            if c.rounds * epr >= run.epochs:
                raise ValueError(
                    f"cs: reference mode retrains the ticket after {c.rounds} rounds of {epr} "
                    f"epochs; epochs ({run.epochs}) leaves no retraining"
                )
            if run.lr_schedule == "step" and run.lr_milestones and run.lr_milestones[-1] >= epr:
                raise ValueError(
                    f"lr_milestones: cs reference mode restarts the schedule every round, so its "
                    f"milestones count within a round of {epr} epochs; got {run.lr_milestones}"
                )

    @classmethod
    def scale(cls, f: dict[str, Any], k: float, full: int) -> None:
        if k == 1.0:
            return
        c = f.setdefault("cs", {}) if isinstance(f.get("cs", {}), dict) else {}
        ep = f["epochs"]
        rounds = c.get("rounds", CSConfig.model_fields["rounds"].default)
        ref = c.get("mode") == "reference"
        if c.get("epochs_per_round") is not None:
            c["epochs_per_round"] = max(1, min(scaled(c["epochs_per_round"], k), ep // max(rounds + ref, 1)))
        if rounds + ref > ep:
            c["rounds"] = rounds = max(1, ep - ref)
        # the rewind point and (reference mode) the step milestones stay inside the (shortened) first round
        epr = c.get("epochs_per_round") or max(1, ep // (rounds + 1) if ref else (3 * ep) // 4 // rounds)
        if c.get("rewind_epoch") is not None:
            c["rewind_epoch"] = max(0, min(round(c["rewind_epoch"] * k), epr - 1))
        if ref and isinstance(f.get("lr_milestones"), list):
            f["lr_milestones"] = sorted({m for m in f["lr_milestones"] if isinstance(m, int) and 1 <= m < epr})

    @classmethod
    def hash_options(cls, d: dict[str, Any], run: RunConfig) -> None:
        super().hash_options(d, run)
        if not d["rewind"]:
            d.pop("rewind_epoch")  # added later, read only when rewinding

    def __init__(self, cfg: RunConfig, layers: list[tuple[str, nn.Module]], steps_per_epoch: int) -> None:
        super().__init__(cfg, layers, steps_per_epoch)
        self.h = run_section(cfg, "cs", CSConfig)
        self.ref = self.h.mode == "reference"
        self.epr = cs_round_epochs(cfg)
        self.search_end = self.h.rounds * self.epr
        c = self.h.calibration
        self.controller = KnobController(
            self.h.lam,
            1.0 - cfg.sparsity,
            self.search_end,
            "off" if self.ref else c.mode,
            c.gain,
            c.max_factor,
            c.lookahead,
        )
        self.round = 0  # rounds started (the round reset has been applied for rounds 1..round-1)
        self.binary = False
        self.t = 0  # optimiser steps done
        self.snapshot: Optional[dict[str, torch.Tensor]] = None
        self.optimizer = None
        self.cut = 0.0
        self.snapped = False

    # ------------------------------------------------------------------ setup
    def attach(self, model: nn.Module) -> None:
        self.model = model
        s_init = cast(float, self.h.s_init)  # set by CSConfig._mode_defaults
        self.params = [
            masks.attach(
                mod,
                CSMask(masks.effective_weight(mod).shape, s_init, soft_eval=self.ref).to(
                    masks.effective_weight(mod).device
                ),
            )
            for _, mod in self.layers
        ]

    def gate_parameters(self) -> list[torch.Tensor]:
        return [] if self.ref else [p.s for p in self.params]

    def extra_weight_groups(self) -> list[dict[str, Any]]:
        # reference: the masks are trained by the weights' SGD, without weight decay (main.py:111)
        return [{"params": [p.s for p in self.params], "weight_decay": 0.0}] if self.ref else []

    def on_train_start(self) -> None:
        if self.h.rewind and self.h.rewind_epoch == 0:
            self._take_snapshot()

    def _take_snapshot(self) -> None:
        self.snapshot = {k: v.detach().clone() for k, v in self.model.state_dict().items() if _OWN not in k}

    # ------------------------------------------------------------------ schedule
    def beta_at(self, t: int) -> float:
        """beta for the optimiser step that follows `t` completed steps (calibrated mode: per step)."""
        k_round = self.epr * self.steps_per_epoch
        if t >= self.search_end * self.steps_per_epoch:
            return self.h.beta_final
        k = t % k_round
        return cast(float, self.h.beta_final ** (k / max(1, k_round - 1)))  # float ** float: typed Any

    def beta_of_epoch(self, epoch: int) -> float:
        """Reference mode: beta in 1-based `epoch`, beta_final ** (e / (E - 1)) in 0-based epoch e of
        its round of E epochs (main.py:64, 99-100)."""
        e = (min(epoch, self.search_end) - 1) % self.epr
        return cast(float, self.h.beta_final ** (e / max(1, self.epr - 1)))

    def _set_beta(self, beta: float) -> None:
        for p in self.params:
            p.beta = beta

    @torch.no_grad()
    def _round_reset(self) -> None:
        # reference: beta is back at 1 when the reset runs (main.py:116-117), so s <- min(s, s0)
        factor = 1.0 if self.ref else self.h.beta_final
        for p in self.params:
            p.s.copy_(torch.clamp(factor * p.s, max=self.h.s_init))

    @torch.no_grad()
    def _binarise(self, rewind: bool) -> None:
        for p in self.params:
            p.final_mask.copy_((p.s > p.cut).to(p.final_mask.dtype) * p.scale)
        if rewind and self.snapshot is not None:
            state = self.model.state_dict()
            for k, v in self.snapshot.items():
                state[k].copy_(v)
            if self.optimizer is not None:
                self.optimizer.reset_weight_state()
            self.snapshot = None
        self._mark_binary()

    def _mark_binary(self) -> None:
        self.binary = True
        for p in self.params:
            p.binary = True  # s stays a parameter; the forward pass no longer uses it (no gradient)

    def segment_lr(self, epoch: int) -> float:
        """Reference mode: the run's weight-LR schedule restarted at each round and for the
        retraining; `epoch` is 1-based over the run."""
        if epoch > self.search_end:
            i, n = epoch - self.search_end - 1, self.cfg.epochs - self.search_end
        else:
            i, n = (epoch - 1) % self.epr, self.epr
        if self.cfg.lr_schedule == "step":
            return self.cfg.lr * self.cfg.lr_gamma ** sum(1 for m in self.cfg.lr_milestones if m <= i)
        return cosine(self.cfg.lr, self.cfg.lr_end, i, n)

    def lrs(self, epoch: int) -> tuple[float, float]:
        if self.ref:
            return self.segment_lr(epoch), 0.0
        w_lr, _ = super().lrs(epoch)
        return (w_lr, 0.0) if epoch > self.search_end else (w_lr, self.h.mask_lr)

    def start_epoch(self, epoch: int) -> None:
        """The search's state at the start of `epoch`: the rewind snapshot, the round reset and beta,
        or the binary ticket once the search is over."""
        # rewind and rewind_epoch: set by CSConfig._mode_defaults and check()
        if self.h.rewind and self.snapshot is None and not self.binary and epoch == cast(int, self.h.rewind_epoch) + 1:
            self._take_snapshot()  # the start of 0-based epoch rewind_epoch (main.py:65)
        if epoch > self.search_end:
            if not self.binary:
                self._binarise(cast(bool, self.h.rewind))
            return
        r = (epoch - 1) // self.epr + 1  # 1-based round of this epoch
        while self.round < r:
            if self.round >= 1:
                self._round_reset()
            self.round += 1
        self._set_beta(self.beta_of_epoch(epoch) if self.ref else self.beta_at(self.t))

    def after_step(self, step: int) -> None:
        self.t = step
        if not self.ref:
            self._set_beta(self.beta_at(step))

    # ------------------------------------------------------------------ loss, control
    def loss_term(self) -> Optional[torch.Tensor]:
        if self.binary:
            return None
        return self.controller.knob * torch.stack([p.soft().sum() for p in self.params]).sum()

    def end_epoch(self, epoch: int, density: float) -> dict[str, float]:
        if self.ref:  # nothing steered: the temperature, the round and what the ticket would keep
            keep = torch.cat([(p.s.detach() > 0).flatten() for p in self.params]).float().mean()
            return {
                "beta": self.params[0].beta if self.params else 1.0,
                "knob": self.h.lam,
                "round": float(self.round if not self.binary else self.h.rounds + 1),
                "mask_density": float(keep),
            }
        out = self.controller.metrics(epoch)
        out["beta"] = self.params[0].beta if self.params else 1.0
        out["round"] = float(self.round if not self.binary else self.h.rounds + 1)
        nxt = self.t  # the next epoch starts after the steps done so far
        if self.binary or self.beta_at(nxt) * cast(float, self.h.s_init) <= self.h.control_beta_s:
            self.controller.update(epoch, density)
        else:
            self.controller.hold(density)
            out["knob_held"] = 1.0
        if epoch >= self.search_end and not self.snapped and not self.binary:
            self.snapped = True
            out.update(self._snap(density))
        return out

    @torch.no_grad()
    def _snap(self, density: float) -> dict[str, float]:
        def cut(x: float) -> None:
            self._set_cut(x)

        s_all = torch.cat([p.s.detach().flatten() for p in self.params])
        lo, hi = float(s_all.min()) - 1.0, float(s_all.max()) + 1.0
        prev = self.params[0].training if self.params else False
        for p in self.params:
            p.eval()  # the ruler reads the hard mask
        try:
            return snap_to(
                1.0 - self.cfg.sparsity,
                self.h.calibration.snap_limit(),
                density,
                cut,
                lambda: sparsity.density(self.layers),
                lo,
                hi,
            )
        finally:
            for p in self.params:
                p.train(prev)

    def _set_cut(self, x: float) -> None:
        self.cut = float(x)
        for p in self.params:
            p.cut = self.cut

    def state_dict(self) -> dict[str, Any]:
        return {
            "controller": self.controller.state_dict(),
            "round": self.round,
            "binary": self.binary,
            "t": self.t,
            "snapshot": self.snapshot,
            "cut": self.cut,
            "snapped": self.snapped,
        }

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.controller.load_state_dict(st["controller"])
        self.round, self.t, self.snapshot = st["round"], st["t"], st["snapshot"]
        self.snapped = st.get("snapped", False)
        self._set_cut(st.get("cut", 0.0))
        if st["binary"]:
            self._mark_binary()  # final_mask and the rewound weights come with the model state
        if not self.ref:  # reference mode: start_epoch() sets the epoch's beta
            self._set_beta(self.beta_at(self.t))
