"""Hard-concrete L0 gates (Louizos, Welling & Kingma 2018), docs/baselines.md "Other L0 methods".

Every prunable layer gets a parametrization W_eff = W * z with a learnable log_alpha per gate:
- train mode (search phase): a fresh sample per forward pass,
      u ~ U(0, 1),  s = sigmoid((log u - log(1 - u) + log_alpha) / beta),
      z = clamp(s * (zeta - gamma) + gamma, 0, 1)            (gamma = -0.1, zeta = 1.1, beta = 2/3);
- eval mode, and every mode after the search phase: the deterministic test-time gate
      z = clamp(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1),
  which is exactly 0 for log_alpha <= log(-gamma / zeta), so the suite's ruler (zeros of the
  effective weight, model in eval mode) counts the pruned weights.
- penalty: lam * sum_g n_g * P(z_g != 0) / sum_g n_g with P(z_g != 0) = sigmoid(log_alpha_g -
  beta log(-gamma / zeta)) and n_g the number of weights gate g covers: the expected density of
  the prunable weights. For granularity "weight" (one gate per weight, the suite's default for
  unstructured pruning) this is the mean over gates of the paper's expected-L0 term, i.e. the
  paper's sum divided by the number of gates, so `lam` does not scale with model size.
  Granularity "unit" has one gate per output channel/row (the authors' setting), broadcast over
  the row; weighting by n_g keeps the penalty a share of weights, as the ruler counts them.
- log_alpha starts at log(1 - p) - log(p), p = l0.drop_init, plus N(0, 0.01^2) noise from a
  generator seeded with cfg.seed (like Hyperflux's gates), and is trained by the gate optimiser
  (Adam, lr l0.gate_lr) during the search phase, epochs 1..search_end (default 3/4 of epochs).
- `lam` is the knob: calibration.KnobController moves it after every search epoch so that the
  measured density follows the cubic target trajectory (calibration.mode "off": fixed lam).
- at the end of the search (calibration.snap_pp, see suite/pruning/calibration.py) every log_alpha
  is shifted by one common amount, found by bisection, so that the frozen gates give exactly the
  target sparsity, when the knob left the run within snap_pp points of it.
- reference mode (`l0.mode: reference`, variant l0-ref; AMLab-Amsterdam/L0_regularization at
  39a5fe6: l0_layers.py, models.py, train_lenet5.py): lam is the paper's lambda per training
  example and stays fixed: penalty lam * sum_g n_g P_g / N (N the training images); log_alpha is
  clamped to [ln 0.01, ln 100] after every step; the gated weights get no SGD weight decay, their
  L2 is weight_decay / 2 * sum_g P_g |theta_g|^2 in the loss (so it also pulls the gates); unit
  gates of a Linear cover its input columns, of a Conv2d its output channels; the gates train to
  the last epoch; no calibration, no snap. Differences left: the gates' own Adam (lr l0.gate_lr;
  the reference trains them in the weights' optimiser), and drop_init is one value for every layer.
- after search_end the gates are frozen at their test-time value (not binarised: the surviving
  gates keep their value in (0, 1], which the weights were trained with; pruned gates are
  exactly 0): the gate LR is 0, the gate is detached (no gradient, no noise), there is no
  penalty, and the weights fine-tune (weight LR: the base cosine lr -> lr_end over the run).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal, Optional, cast

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from suite.pruning import masks, registry, sparsity
from suite.pruning.base import Pruner, run_section
from suite.pruning.calibration import Calibrated, CalibrationConfig, KnobController, snap_to
from suite.schema import Strict

if TYPE_CHECKING:
    from suite.config import RunConfig


class L0Config(Strict):
    """Hard-concrete L0 gates (Louizos, Welling & Kingma 2018)."""

    granularity: Optional[Literal["weight", "unit"]] = Field(
        None,
        description="one gate per weight, or per unit (a Conv2d's output channel; a Linear's output row, "
        "its input column in reference mode); default: weight, reference mode unit (the reference code has no "
        "per-weight gates)",
    )
    lam: float = Field(
        1.0,
        gt=0,
        description="knob: strength of the expected-L0 penalty (per gate, "
        "normalised by the number of gates); calibrated unless calibration.mode is off",
    )
    beta: float = Field(2 / 3, gt=0, description="temperature of the hard-concrete distribution")
    gamma: float = Field(-0.1, lt=0, description="stretch interval lower end")
    zeta: float = Field(1.1, gt=1, description="stretch interval upper end")
    drop_init: Optional[float] = Field(
        None,
        gt=0,
        lt=1,
        description="initial drop probability of each gate "
        "(default 0.1; reference mode 0.5, the reference's LeNet-5 script)",
    )
    gate_lr: Optional[float] = Field(
        None,
        gt=0,
        le=10,
        description="Adam learning rate of log_alpha (default 0.05; reference mode 0.001, the LeNet-5 script's Adam)",
    )
    search_end: Optional[int] = Field(
        None,
        ge=1,
        description="last epoch gates train (default 3/4 of epochs); "
        "afterwards the test-time gates are frozen and the weights fine-tune",
    )
    calibration: CalibrationConfig = CalibrationConfig()
    mode: Literal["calibrated", "reference"] = Field(
        "calibrated",
        description="calibrated: the suite's equal-sparsity mode (knob steered, snap, gates frozen "
        "at search_end); reference: AMLab-Amsterdam/L0_regularization's recipe: lam is the paper's lambda per "
        "training example, fixed; gates train to the last epoch; log_alpha clamped to [ln 0.01, ln 100]; the "
        "weights' L2 is weight_decay/2 * sum_g P(z_g != 0) |theta_g|^2 in the loss instead of SGD decay; unit "
        "gates of a Linear cover its input columns (variant l0-ref)",
    )

    @model_validator(mode="after")
    def _mode_defaults(self) -> L0Config:
        ref = self.mode == "reference"
        if self.granularity is None:
            self.granularity = "unit" if ref else "weight"
        if self.drop_init is None:
            self.drop_init = 0.5 if ref else 0.1
        if self.gate_lr is None:
            self.gate_lr = 1e-3 if ref else 0.05
        return self


class HardConcreteGate(nn.Module):
    """W_eff = W * z, z a hard-concrete gate per weight (or per output row, broadcast)."""

    def __init__(self, log_alpha: torch.Tensor, beta: float, gamma: float, zeta: float) -> None:
        super().__init__()
        self.log_alpha = nn.Parameter(log_alpha)
        self.beta, self.gamma, self.zeta = beta, gamma, zeta
        self.frozen = False

    def sample(self) -> torch.Tensor:
        la = self.log_alpha
        u = torch.rand_like(la).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def test_gate(self) -> torch.Tensor:
        return (torch.sigmoid(self.log_alpha) * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def p_nonzero(self) -> torch.Tensor:
        """P(z != 0) = sigmoid(log_alpha - beta log(-gamma / zeta)), the expected L0 per gate."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            z = self.test_gate().detach()
        elif self.training:
            z = self.sample()
        else:
            z = self.test_gate()
        return w * z.to(w.dtype)


@registry.register
class HardConcreteL0(Calibrated, Pruner):
    name = "l0"
    section = "l0"
    options = L0Config
    variants = {"l0-ref": {"l0": {"mode": "reference"}}}
    summary = "hard-concrete gates"
    # forward: read log_alpha, W, write W_eff and the uniform noise backward needs (16); backward:
    # read G, W, log_alpha, noise, write dW, dlog_alpha with the L0 term's gradient (24); Adam on
    # log_alpha (28)
    floor_bytes = 68
    floor_note = "its gate is a chain of about ten eager operators and draws a random number per weight"
    reference_recipe = (
        "AMLab-Amsterdam/L0_regularization's recipe, lambda {lam} per training example fixed, "
        "{granularity} gates, log_alpha clamped to [ln 0.01, ln 100], the L2 weighted by P(z != 0), "
        "gates trained to the end"
    )
    # Louizos et al. 2018 as run by Gale et al. 2019 (a fixed lambda)
    published = {"l0-ref": ("l0_hard_concrete",)}
    published_note = (
        "calibrated mode (lambda steered to the target, snapped); the published L0 rows use a fixed lambda: l0-ref"
    )

    def __init__(self, cfg: RunConfig, layers: list[tuple[str, nn.Module]], steps_per_epoch: int) -> None:
        super().__init__(cfg, layers, steps_per_epoch)
        self.h = run_section(cfg, "l0", L0Config)
        self.ref = self.h.mode == "reference"
        self.search_end = cfg.epochs if self.ref else (self.h.search_end or max(1, (3 * cfg.epochs) // 4))
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
        self.frozen = False
        self.n_train: Optional[int] = None
        if self.ref:
            from suite import datasets

            self.n_train = datasets.get(cfg.dataset).train_images
            if not self.n_train:
                raise ValueError(
                    f"l0.mode reference: the penalty is per training example, and dataset "
                    f"{cfg.dataset!r} does not declare its number of training images"
                )

    def attach(self, model: nn.Module) -> None:
        gen = torch.Generator().manual_seed(self.cfg.seed + 7919)
        p = cast(float, self.h.drop_init)  # set by L0Config._mode_defaults
        la0 = math.log(1 - p) - math.log(p)
        self.params: list[HardConcreteGate] = []
        self.sizes: list[int] = []  # weights per gate, per layer
        for _, mod in self.layers:
            w = masks.effective_weight(mod)
            shape: tuple[int, ...]
            if self.h.granularity == "weight":
                shape = w.shape
            elif self.ref and isinstance(mod, nn.Linear):  # the reference gates a Linear's input units
                shape = (1, w.shape[1])
            else:
                shape = (w.shape[0],) + (1,) * (w.dim() - 1)
            la = la0 + 0.01 * torch.randn(shape, generator=gen)
            self.params.append(
                masks.attach(mod, HardConcreteGate(la.to(w.device), self.h.beta, self.h.gamma, self.h.zeta))
            )
            self.sizes.append(w.numel() // la.numel())
        self.n = sum(masks.effective_weight(mod).numel() for _, mod in self.layers)

    def gate_parameters(self) -> list[torch.Tensor]:
        return [p.log_alpha for p in self.params]

    def extra_weight_groups(self) -> list[dict[str, Any]]:
        """Reference mode: the gated weights in a group without SGD weight decay (their L2 is the
        P(z != 0)-weighted term of loss_term)."""
        if not self.ref:
            return []
        return [{"params": [masks.stored_weight(mod) for _, mod in self.layers], "weight_decay": 0.0}]

    def after_step(self, step: int) -> None:
        if self.ref and not self.frozen:
            with torch.no_grad():
                for p in self.params:
                    p.log_alpha.clamp_(math.log(0.01), math.log(100.0))

    @property
    def lam(self) -> float:
        return self.controller.knob

    def _freeze(self) -> None:
        self.frozen = True
        for p in self.params:
            p.frozen = True

    def lrs(self, epoch: int) -> tuple[float, float]:
        w_lr, _ = super().lrs(epoch)
        gate_lr = cast(float, self.h.gate_lr)  # set by L0Config._mode_defaults
        return (w_lr, 0.0) if epoch > self.search_end else (w_lr, gate_lr)

    def start_epoch(self, epoch: int) -> None:
        if epoch > self.search_end:
            self._freeze()

    def expected_density(self) -> torch.Tensor:
        return torch.stack([(p.p_nonzero() * k).sum() for p, k in zip(self.params, self.sizes)]).sum() / self.n

    def loss_term(self) -> Optional[torch.Tensor]:
        if self.frozen:
            return None
        if self.ref:
            l0 = torch.stack([(p.p_nonzero() * k).sum() for p, k in zip(self.params, self.sizes)]).sum()
            l2 = torch.stack(
                [
                    (p.p_nonzero() * masks.stored_weight(mod).pow(2)).sum()
                    for p, (_, mod) in zip(self.params, self.layers)
                ]
            ).sum()
            n_train = cast(int, self.n_train)  # reference mode: set (and checked) in __init__
            return self.lam * l0 / n_train + 0.5 * self.cfg.weight_decay * l2
        return self.lam * self.expected_density()

    def end_epoch(self, epoch: int, density: float) -> dict[str, float]:
        out = self.controller.metrics(epoch)
        with torch.no_grad():
            out["expected_density"] = float(self.expected_density())
        self.controller.update(epoch, density)
        if epoch >= self.search_end and not self.frozen:
            self._freeze()
            if not self.ref:  # the reference reports the sparsity its fixed lambda gives
                out.update(self._snap(density))
        return out

    @torch.no_grad()
    def _snap(self, density: float) -> dict[str, float]:
        base = [p.log_alpha.detach().clone() for p in self.params]

        def shift(x: float) -> None:  # larger x: every gate lower, fewer survive
            for p, b in zip(self.params, base):
                p.log_alpha.copy_(b - x)

        return snap_to(
            1.0 - self.cfg.sparsity,
            self.h.calibration.snap_limit(),
            density,
            shift,
            lambda: sparsity.density(self.layers),
            -100.0,
            100.0,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict(), "frozen": self.frozen}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.controller.load_state_dict(st["controller"])
        if st["frozen"]:
            self._freeze()
