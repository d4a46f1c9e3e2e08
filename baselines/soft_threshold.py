"""STR, soft threshold reparameterisation (Kusupati et al. 2020), docs/baselines.md "Other L0 methods".

Every prunable layer l gets a parametrization with one learnable scalar s_l:
    W_hat = sign(W) * relu(|W| - sigmoid(s_l)),
so every weight with |W| <= sigmoid(s_l) is exactly 0 (what the suite's ruler counts), the
others shrink by the threshold. As in the paper and its code (RAIVNLab/STR), s_l is trained by
the same SGD as the weights (same LR schedule and momentum), in its own parameter group
(Pruner.extra_weight_groups) whose weight decay is the knob `soft_threshold.s_weight_decay`:
decay pulls s_l (< 0) toward 0, i.e. raises the threshold; the task gradient pulls it down.
The initial s_l is `soft_threshold.s_init` for every layer.

Choices where the doc is open:
- the paper has no sparsity target; the suite calibrates the knob (calibration.KnobController):
  after every search epoch the s group's weight_decay is set to the controller's knob. The group
  is looked up by its parameters each time (the optimiser's group dicts are replaced when a
  checkpoint is loaded).
- search phase: epochs 1..search_end (default 3/4 of epochs). After it the thresholds are
  frozen: each layer stores sigmoid(s_l) as a buffer (`frozen_threshold`, part of the model's
  state dict) and the forward pass uses that constant, so s_l gets no gradient and the SGD
  (which skips parameters without a gradient) neither decays nor moves it. The weights keep
  training through the same soft-threshold function; a pruned weight (|W| <= threshold) gets no
  data gradient (relu' = 0), only the weights' own weight decay, which shrinks it, so pruned
  weights stay pruned and the sparsity can only creep up a little during fine-tuning. The STR
  paper trains s to the end of the run; freezing gives the fine-tuning phase every calibrated
  method in the suite has.
- reference mode (`soft_threshold.mode: reference`, variant str-ref; RAIVNLab/STR at cc74d38,
  main.py:394-397 and args.py:199: s is decayed with the weights' own weight decay): the s group's
  weight decay is the run's weight_decay, the thresholds train to the last epoch, nothing is
  steered or snapped; the sparsity follows from s_init and weight_decay (reference ResNet-50 at
  90.23 %: s_init -3200, weight decay 2.25e-5, 100 epochs, the STR repository's resnet50-str.yaml).
- at the freeze (calibration.snap_pp, see suite/pruning/calibration.py) every layer's frozen
  threshold is multiplied by one common factor, found by bisection, so that the sparsity is
  exactly the target when the knob left the run within snap_pp points of it: the ratios of the
  learned per-layer thresholds, STR's layer-wise budget, are kept.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal, Optional, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from suite.pruning import masks, registry, sparsity
from suite.pruning.base import Pruner, run_section
from suite.pruning.calibration import Calibrated, CalibrationConfig, KnobController, snap_to
from suite.schema import Strict

if TYPE_CHECKING:
    from suite.config import RunConfig


class STRConfig(Strict):
    """Soft threshold reparameterisation (Kusupati et al. 2020): W_hat = sign(W) relu(|W| - sigmoid(s_l))."""

    s_init: Optional[float] = Field(
        None,
        ge=-1e6,
        le=0,
        description="initial threshold parameter s_l of every "
        "layer (default -8; reference mode -3200, RAIVNLab/STR's ResNet-50 at 90.23 %: "
        "there the loss gradient on s is 0 and the weight decay alone raises it, which "
        "takes tens of ImageNet epochs; a short run needs a knob of its own)",
    )
    s_weight_decay: float = Field(
        1e-2,
        gt=0,
        description="knob: weight decay on s_l (drives thresholds up); calibrated unless calibration.mode is off",
    )
    search_end: Optional[int] = Field(None, ge=1, description="last epoch thresholds train (default 3/4 of epochs)")
    calibration: CalibrationConfig = CalibrationConfig()
    mode: Literal["calibrated", "reference"] = Field(
        "calibrated",
        description="calibrated: the suite's equal-sparsity mode (knob steered, thresholds frozen at "
        "search_end, snap); reference: RAIVNLab/STR's recipe: s decays with the weights' own weight_decay "
        "(s_weight_decay unused), thresholds train to the last epoch, no steering; the sparsity follows from "
        "s_init and weight_decay (variant str-ref)",
    )

    @model_validator(mode="after")
    def _mode_defaults(self) -> STRConfig:
        if self.s_init is None:
            self.s_init = -3200.0 if self.mode == "reference" else -8.0
        return self


def _threshold_as_number(w: torch.Tensor) -> bool:
    """softshrink takes the threshold as a number: free on the CPU, a synchronisation on a GPU."""
    return w.device.type == "cpu"


class _SoftThreshold(torch.autograd.Function):
    """sign(W) relu(|W| - t) in one pass where the composed form takes five, with the same values
    (W -+ t where |W| > t, else 0; a zero may differ in sign): on the CPU torch's softshrink
    kernel (t read as a number, which costs nothing there), on a GPU W - clamp(W, -t, t) (t stays
    on the device). Backward:
        dL/dW = G where |W| > t, else 0 (selected, so an inf or NaN in G at a pruned weight
                stays out, as in autograd's relu backward)
        dL/dt = -sum(G 1[|W| > t] sign(W))
    the same products and the same sum as autograd of the composed form (multiplying by 0, 1 or
    -1 is exact), sign(W) read off the output, which has W's sign wherever it is not 0."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if _threshold_as_number(w):
            ctx.lam = float(t)
            out = F.softshrink(w, ctx.lam)
        else:
            ctx.lam = None
            out = w - torch.clamp(w, -t, t)
        ctx.save_for_backward(w, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        w, out = ctx.saved_tensors
        if ctx.lam is not None:
            gw = torch.ops.aten.softshrink_backward(grad, w, ctx.lam)
        else:
            gw = torch.where(out != 0, grad, 0.0)
        gt = None
        if ctx.needs_input_grad[1]:
            gt = -(gw * torch.sign(out)).sum().reshape(1)
        return gw, gt


def soft_threshold(w: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """sign(w) relu(|w| - threshold); threshold a 1-element tensor."""
    out: torch.Tensor = _SoftThreshold.apply(w, threshold)
    return out


def soft_threshold_composed(w: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """The same function composed of torch operators (autograd's own gradient): the reference
    the fused one is tested against."""
    return torch.sign(w) * torch.relu(w.abs() - threshold)


class SoftThresholdWeight(nn.Module):
    frozen_threshold: torch.Tensor  # buffer

    def __init__(self, s_init: float) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor([float(s_init)]))
        self.register_buffer("frozen_threshold", torch.full((1,), float("nan")))

    @property
    def frozen(self) -> bool:
        return not bool(torch.isnan(self.frozen_threshold).item())

    def threshold(self) -> torch.Tensor:
        return self.frozen_threshold if self.frozen else torch.sigmoid(self.s)

    @torch.no_grad()
    def freeze(self) -> None:
        if not self.frozen:
            self.frozen_threshold.copy_(torch.sigmoid(self.s))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return soft_threshold(w, self.threshold().to(w.dtype))


@registry.register
class SoftThreshold(Calibrated, Pruner):
    name = "str"
    section = "soft_threshold"
    options = STRConfig
    variants = {"str-ref": {"soft_threshold": {"mode": "reference"}}}
    summary = "learned per-layer soft thresholds"
    # one threshold per layer: forward read W, write W_eff (8); backward read G, W, write dW, the
    # threshold's gradient a reduction in the same pass (12)
    floor_bytes = 20
    floor_note = "the threshold's gradient takes a sign and a product pass, kept so its sum is the recorded runs' one"
    reference_recipe = (
        "RAIVNLab/STR's recipe, s from {s_init} decayed by the weights' own weight decay, thresholds trained to the end"
    )
    # Kusupati et al. 2020: STR's own recipe, a hand-set decay per sparsity
    published = {"str-ref": ("str",)}
    published_note = (
        "calibrated mode (threshold decay steered to the target, snapped); published STR sets its "
        "decay by hand: str-ref"
    )

    def __init__(self, cfg: RunConfig, layers: list[tuple[str, nn.Module]], steps_per_epoch: int) -> None:
        super().__init__(cfg, layers, steps_per_epoch)
        self.h = run_section(cfg, "soft_threshold", STRConfig)
        self.ref = self.h.mode == "reference"
        self.search_end = cfg.epochs if self.ref else (self.h.search_end or max(1, (3 * cfg.epochs) // 4))
        c = self.h.calibration
        # reference: the knob is the weights' own decay, fixed (a zero decay is held as a tiny one)
        knob = max(cfg.weight_decay, 1e-300) if self.ref else self.h.s_weight_decay
        self.controller = KnobController(
            knob, 1.0 - cfg.sparsity, self.search_end, "off" if self.ref else c.mode, c.gain, c.max_factor, c.lookahead
        )
        self.frozen = False
        self.optimizer = None

    def attach(self, model: nn.Module) -> None:
        s_init = cast(float, self.h.s_init)  # set by STRConfig._mode_defaults
        self.params = [
            masks.attach(mod, SoftThresholdWeight(s_init).to(masks.effective_weight(mod).device))
            for _, mod in self.layers
        ]

    def thresholds(self) -> list[torch.Tensor]:
        return [p.s for p in self.params]

    def extra_weight_groups(self) -> list[dict[str, Any]]:
        return [{"params": self.thresholds(), "weight_decay": self.controller.knob}]

    def s_group(self) -> dict[str, Any] | None:
        """The optimiser's group holding the thresholds (looked up anew: loading a checkpoint
        replaces the group dicts)."""
        return None if self.optimizer is None else self.optimizer.group_of(self.thresholds())

    def _set_knob(self) -> None:
        if self.optimizer is not None:
            self.optimizer.set_group_options(self.thresholds(), weight_decay=self.controller.knob)

    def _freeze(self) -> None:
        self.frozen = True
        for p in self.params:
            p.freeze()

    def start_epoch(self, epoch: int) -> None:
        if epoch > self.search_end:
            self._freeze()
        self._set_knob()

    def end_epoch(self, epoch: int, density: float) -> dict[str, float]:
        out = self.controller.metrics(epoch)
        for (name, _), p in zip(self.layers, self.params):
            out[f"threshold/{name}"] = float(p.threshold().detach())
        self.controller.update(epoch, density)
        self._set_knob()
        if epoch >= self.search_end and not self.frozen:
            self._freeze()
            if not self.ref:
                out.update(self._snap(density))
        return out

    @torch.no_grad()
    def _snap(self, density: float) -> dict[str, float]:
        base = [p.frozen_threshold.clone() for p in self.params]

        def scale(x: float) -> None:  # thresholds x e^x: larger x, fewer survivors
            for p, b in zip(self.params, base):
                p.frozen_threshold.copy_(b * math.exp(x))

        return snap_to(
            1.0 - self.cfg.sparsity,
            self.h.calibration.snap_limit(),
            density,
            scale,
            lambda: sparsity.density(self.layers),
            -30.0,
            30.0,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict(), "frozen": self.frozen}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.controller.load_state_dict(st["controller"])
        self._set_knob()
        if st["frozen"]:
            self._freeze()
