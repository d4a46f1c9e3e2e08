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
  start_epoch(epoch)             at each epoch start, after the LRs are set (e.g. a round reset)
  state_dict()/load_state_dict() for checkpoints
What a method declares to the rest of the suite lives on its class, so that a method is one file
(registered with `@registry.register`): its config section (`section`, `options`, a pydantic
model), named variants, the checks and defaults of its recipe (`prepare`, `check`, `min_epochs`),
how `--scale` shortens its epoch counts (`scale`), which fields of its section enter the run hash
(`hash_options`), its report label (`variant`, `run_name`), the metrics printed in the engine's
epoch line (`epoch_metrics`), and what the reports say about it (`summary`, `recipe`,
`published`, `dynamics`). The defaults below fit a method without options.
A method never reports its own sparsity: the suite measures it (sparsity.py), with the model
in eval mode, so a method whose training-time weights are stochastic (hard-concrete gates)
is measured at its deterministic test-time weights.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Optional, TypeVar, cast

import torch
import torch.nn as nn

from suite.pruning import masks

if TYPE_CHECKING:
    from suite.config import RunConfig
    from suite.optim import WeightsAndGates
    from suite.schema import Strict

_Options = TypeVar("_Options", bound="Strict")


def run_section(run: RunConfig, name: str, model: type[_Options]) -> _Options:
    """`run.<name>`, a method's config section, typed as its pydantic `model`: RunConfig gains a
    field per registered section at runtime (suite.config.sync_sections), which a type checker
    cannot see."""
    return cast(_Options, getattr(run, name))


def weight_lr(cfg: RunConfig, epoch: int) -> float:
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


def scaled(v: Any, k: float) -> Any:
    """An epoch count under `--scale k`: round(v k), at least 1; anything else unchanged."""
    return max(1, round(v * k)) if isinstance(v, int) and not isinstance(v, bool) else v


class Pruner:
    name: ClassVar[str] = "base"

    # -- what the method declares (class level; read by the config, sweeps and reports) -------
    section: ClassVar[Optional[str]] = None  # the run config section it reads (a family may share one)
    options: ClassVar[Optional[type[Strict]]] = None  # that section's model (a suite.schema.Strict subclass)
    variants: ClassVar[dict[str, dict[str, Any]]] = {}  # variant name -> the run fields that make it
    min_epochs: ClassVar[int] = 1  # the shortest run --scale may shrink it to
    own_lr_schedule: ClassVar[bool] = False  # True: the weight LR is the method's, lr_schedule 'step' refused
    # end_epoch metrics printed in the engine's epoch line: metric -> format, e.g. {"gamma": "gamma {:.3g}"}
    epoch_metrics: ClassVar[dict[str, str]] = {}
    bench_sets: ClassVar[dict[str, Any]] = {}  # overhead bench: dotted run fields for a representative step
    # overhead bench floor: the bytes per prunable weight that the method's per-weight work must
    # move each training step beyond dense training's, every pass fused (each tensor read or
    # written once per phase: forward, backward, optimiser), fp32; None: not declared
    floor_bytes: ClassVar[Optional[int]] = None
    floor_note: ClassVar[str] = ""  # what keeps its measured step above that floor, for the report
    summary: ClassVar[str] = ""  # one line for the report: how the method reaches its sparsity
    published: ClassVar[dict[str, tuple[str, ...]]] = {}  # variant -> method names in reports/published.csv
    published_note: ClassVar[str] = ""  # why the method's own runs are not compared with a published row
    # variant -> plots of the report's dynamics page: (label, "epoch" or "final", metric or param key)
    dynamics: ClassVar[dict[str, list[tuple[str, str, str]]]] = {}

    @classmethod
    def prepare(cls, fields: dict[str, Any]) -> dict[str, Any]:
        """Before validation, the run's raw fields: derive what the recipe fixes (IMP: its epochs
        from its levels). Returns the fields (a copy when changed)."""
        return fields

    @classmethod
    def check(cls, run: RunConfig) -> None:
        """After validation: refuse a run the recipe cannot train (raise ValueError naming the field)."""

    @classmethod
    def scale(cls, f: dict[str, Any], k: float, full_epochs: int) -> None:
        """`--scale`: shorten the epoch counts of the method's section in the raw fields `f` (in
        place; f['epochs'] is already scaled, `full_epochs` is the unscaled value; k may be 1 when
        only the steps per epoch are capped)."""

    @classmethod
    def hash_options(cls, d: dict[str, Any], run: RunConfig) -> None:
        """The section's part of the run hash, `d` (in place): drop fields added after runs were
        recorded while they hold the value older runs used, so those runs keep their hashes."""

    @classmethod
    def variant(cls, run: RunConfig) -> str:
        """The report's label of the run: the method, or the named recipe its options make it."""
        return cls.name

    @classmethod
    def run_name(cls, run: RunConfig) -> Optional[str]:
        """A run name other than <model>-<variant>-<sparsity>-s<seed>, or None."""
        return None

    @classmethod
    def recipe(cls, params: dict[str, str], variant: str) -> str:
        """One sentence for the report's method table from a run's logged params (how this run's
        recipe reaches its sparsity); `summary` unless the options change it."""
        return cls.summary

    # -- the run --------------------------------------------------------------------------------

    optimizer: Optional[WeightsAndGates]  # set by bind_optimizer

    def __init__(self, cfg: RunConfig, layers: list[tuple[str, nn.Module]], steps_per_epoch: int) -> None:
        self.cfg = cfg
        self.layers = layers
        self.steps_per_epoch = steps_per_epoch

    def attach(self, model: nn.Module) -> None:
        pass

    def gate_parameters(self) -> list[torch.Tensor]:
        return []

    def extra_weight_groups(self) -> list[dict[str, Any]]:
        return []

    def bind_optimizer(self, optimizer: WeightsAndGates) -> None:
        self.optimizer = optimizer

    def on_train_start(self) -> None:
        pass

    def lrs(self, epoch: int) -> tuple[float, float]:
        """Weight LR (the run's schedule, `weight_lr`) and gate LR for 1-based epoch; no side effects
        (the engine may call it again for the same epoch): changes of state go in start_epoch."""
        return weight_lr(self.cfg, epoch), 0.0

    def start_epoch(self, epoch: int) -> None:
        """At the start of 1-based `epoch`, after the epoch's LRs are set."""

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

    # forward W_eff = W * M (read W, M; write W_eff), backward dW = G * M (read G, M; write dW):
    # 6 passes of 4 bytes; pruning itself happens a few times a run, not per step
    floor_bytes = 24

    def attach(self, model: nn.Module) -> None:
        self.params = [
            masks.attach(mod, masks.MaskedWeight(masks.effective_weight(mod).shape)) for _, mod in self.layers
        ]

    def stored(self) -> list[torch.Tensor]:
        return [masks.stored_weight(mod) for _, mod in self.layers]

    @torch.no_grad()
    def set_masks(self, new: list[torch.Tensor]) -> None:
        for p, m in zip(self.params, new):
            p.mask.copy_(m)

    def _active_scores(self, scores: Optional[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Per layer: the given score (the stored weight when none is given) times the current
        mask, so that pruned weights score 0 and stay pruned."""
        unscored: list[Optional[torch.Tensor]] = [None] * len(self.params)
        return [(w if sc is None else sc) * p.mask for w, p, sc in zip(self.stored(), self.params, scores or unscored)]

    @torch.no_grad()
    def prune_to(self, sparsity: float, scope: str, scores: Optional[list[torch.Tensor]] = None) -> None:
        """Prune the currently active weights to `sparsity` by smallest |score| (pruned stay
        pruned); the score is the stored weight (magnitude) unless given. Records the smallest
        surviving |score| as `threshold`, the saliency the Neural Pruning Law relates to density."""
        scores = self._active_scores(scores)
        new = masks.magnitude_masks(scores, sparsity, scope)
        self.set_masks(new)
        alive = torch.cat([sc.abs()[m.bool()] for sc, m in zip(scores, new)])
        self.threshold = float(alive.min()) if alive.numel() else float("nan")

    @torch.no_grad()
    def prune_nm(self, keep: int, m: int, scores: Optional[list[torch.Tensor]] = None) -> None:
        """Keep the `keep` largest |score| of every group of m consecutive weights along the rows
        of W.reshape(out, -1), among the active weights (pruned stay pruned); layers that cannot
        hold the pattern (masks.nm_eligible) keep their masks. `threshold` as in prune_to, over
        the patterned layers."""
        scored = [sc.abs() for sc in self._active_scores(scores)]
        new, alive = [], []
        for sc, p in zip(scored, self.params):
            if masks.nm_eligible(sc.shape, m):
                keep_mask = masks.nm_keep(sc, keep, m) * p.mask
                alive.append(sc[keep_mask.bool()])
                new.append(keep_mask)
            else:
                new.append(p.mask.clone())
        self.set_masks(new)
        kept = torch.cat(alive) if alive else torch.empty(0)
        self.threshold = float(kept.min()) if kept.numel() else float("nan")

    def end_epoch(self, epoch: int, density: float) -> dict[str, float]:
        t = getattr(self, "threshold", None)
        return {"npl_threshold": t} if t is not None else {}
