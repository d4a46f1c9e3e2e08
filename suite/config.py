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
from pydantic.fields import FieldInfo

from suite.pruning.registry import CONTROL
from suite.schema import Strict, did_you_mean


class ConfigError(ValueError):
    """A configuration was rejected. The message names the file and the field."""


_Strict = Strict


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

    method: str = CONTROL
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
    # each method's own section (e.g. hyperflux: {...}) is added by the method's module
    # (suite.pruning.registry): see _method_sections below
    engine: EngineConfig = EngineConfig()
    plugins: list[str] = Field(default_factory=list, description="plugin files or modules that register methods "
                               "(set by the sweep's `plugins`; imported before the method is looked up)")
    # where things go (not part of the identity)
    data_dir: str = "data"
    experiment: str = "default"
    sweep: str = ""
    tracking_uri: Optional[str] = None
    out_dir: str = "runs"

    def __init__(self, **data: Any) -> None:
        _ready_for(data)
        super().__init__(**data)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> "RunConfig":  # type: ignore[override]
        _ready_for(obj)
        return super().model_validate(obj, **kwargs)

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
    def _method_prepare(cls, data: Any) -> Any:
        """Load the run's plugins, then let its method derive what its recipe fixes (e.g. IMP's epochs)."""
        if not isinstance(data, dict):
            return data
        from suite.pruning import registry

        plugins = data.get("plugins")
        if isinstance(plugins, list) and all(isinstance(p, str) for p in plugins):
            try:
                registry.load_plugins(plugins, where="plugins")
            except registry.PluginError as e:
                raise ValueError(str(e)) from None
        method = data.get("method", CONTROL)
        if isinstance(method, str) and method in registry.names():
            return registry.get(method).prepare(data)
        return data

    @model_validator(mode="after")
    def _consistent(self):
        from suite.pruning import registry

        dense = registry.CONTROL
        if self.budget_matched and self.method != dense:
            raise ValueError(f"budget_matched: only a dense run can be a budget-matched control (method {self.method!r})")
        if self.method == dense and self.sparsity != 0.0:
            raise ValueError(f"method {dense!r} needs sparsity 0 (got {self.sparsity})")
        if self.method != dense and self.sparsity == 0.0:
            raise ValueError(f"method {self.method!r} needs a target sparsity > 0")
        method = registry.get(self.method)
        method.check(self)
        if self.init == "dense" and self.method == dense:
            raise ValueError("init: a dense run cannot start from a dense run; use init 'scratch' or 'pretrained'")
        if (self.init == "pretrained") != (self.pretrained is not None):
            raise ValueError("pretrained: give a weights file exactly when init is 'pretrained' "
                             f"(init {self.init!r}, pretrained {self.pretrained!r})")
        if self.lr_schedule == "step" and method.own_lr_schedule:
            raise ValueError(f"lr_schedule: {self.method} has its own weight-LR schedule; 'step' applies to "
                             f"methods that follow the run's schedule")
        if self.lr_schedule == "step":
            ms = self.lr_milestones
            if any(b <= a for a, b in zip(ms, ms[1:])) or (ms and (ms[0] < 1 or ms[-1] >= self.epochs)):
                raise ValueError(f"lr_milestones: the step schedule needs strictly increasing epochs in "
                                 f"[1, epochs - 1] (epochs {self.epochs}), got {ms}")
        elif self.lr_milestones:
            raise ValueError("lr_milestones: only used by lr_schedule 'step' (lr_schedule is 'cosine')")
        if self.engine.zero_stage != 0 and self.engine.precision == "fp16":
            raise ValueError("engine.precision fp16 (gradient scaler) is not supported with engine.zero_stage > 0")
        if self.engine.zero_stage != 0 and self.method != dense:
            raise ValueError("engine.zero_stage > 0 is not supported with pruning yet")
        return self

    # -- identity --------------------------------------------------------------------------
    def semantic_dict(self) -> dict[str, Any]:
        """The fields that decide what is trained: everything except paths, names and the
        sections of other methods."""
        from suite.pruning import registry

        d = self.model_dump(mode="json")
        for k in ("data_dir", "experiment", "sweep", "tracking_uri", "out_dir", "init_checkpoint", "eval_every",
                  "flux_every", "plugins"):
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
        own = self.section()
        for name in _method_sections():
            if name != own:
                d.pop(name, None)
        if own is not None:
            registry.get(self.method).hash_options(d[own], self)
        return d

    def section(self) -> Optional[str]:
        """The config section this run's method reads (its own, or its family's); None if it has none."""
        from suite.pruning import registry

        return registry.get(self.method).section

    def run_hash(self) -> str:
        blob = json.dumps(self.semantic_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def variant(self) -> str:
        """The method with the option that changes what it is (the report's line label): the method's
        own `variant` (hyperflux-law, gmp-taylor, l0-ref, ...); a budget-matched control is
        <control>-matched."""
        from suite.pruning import registry

        if self.budget_matched:
            return f"{self.method}-matched"
        return registry.get(self.method).variant(self)

    def run_name(self) -> str:
        from suite.pruning import registry

        if self.method == registry.CONTROL:
            return f"{self.model}-{self.variant()}-e{self.epochs}x{self.max_steps_per_epoch or 'all'}-s{self.seed}" \
                if self.budget_matched else f"{self.model}-{self.method}-s{self.seed}"
        return registry.get(self.method).run_name(self) or f"{self.model}-{self.variant()}-{self.sparsity:g}-s{self.seed}"

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
        d.pop("plugins")
        for name in _method_sections():
            if name != self.section():
                d.pop(name, None)
        walk("", d)
        return out



# Each method declares its own section (a pydantic model on its Pruner class); RunConfig gets a
# field per section registered so far, placed before `engine`, so that `run.<section>` is typed
# and validated like any other field and a typo in it is named with a did-you-mean.
# validation (model_validate, load_run) must not go through RunConfig.__init__ (keyword arguments:
# a YAML key that is not a string would raise TypeError instead of a validation error); model_validate
# prepares the class itself
RunConfig.__pydantic_custom_init__ = False
RunConfig.model_rebuild(force=True)
_CORE_FIELDS = dict(RunConfig.__pydantic_fields__)
_SYNCED: tuple = ()


def _ready_for(data: Any) -> None:
    """Before a run is validated: import its plugins and give RunConfig the sections of every
    method registered (a plugin that fails is reported by the validation itself)."""
    from suite.pruning import registry

    plugins = data.get("plugins") if isinstance(data, dict) else None
    if isinstance(plugins, list) and all(isinstance(p, str) for p in plugins):
        try:
            registry.load_plugins(plugins)
        except registry.PluginError:
            pass  # _method_prepare raises it as the field's error
    sync_sections()


def _method_sections() -> dict[str, type]:
    from suite.pruning import registry

    return registry.sections()


def sync_sections() -> None:
    """Add the sections of newly registered methods to RunConfig (idempotent; cheap when nothing changed)."""
    global _SYNCED
    secs = _method_sections()
    key = tuple((name, id(model)) for name, model in secs.items())
    if key == _SYNCED:
        return
    fields: dict[str, FieldInfo] = {}
    for name, info in _CORE_FIELDS.items():
        if name == "engine":
            for sec, model in secs.items():
                fields[sec] = FieldInfo.from_annotated_attribute(model, Field(default_factory=model))
        fields[name] = info
    RunConfig.__pydantic_fields__.clear()
    RunConfig.__pydantic_fields__.update(fields)
    RunConfig.model_rebuild(force=True)
    _SYNCED = key


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
    methods: list[str] = Field(default_factory=lambda: [CONTROL], min_length=1)
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
        from suite.pruning import registry

        if self.steps_per_epoch is not None:
            cur = f.get("max_steps_per_epoch")
            f["max_steps_per_epoch"] = self.steps_per_epoch if cur is None else min(cur, self.steps_per_epoch)
        method = f.get("method")
        cls = registry.get(method) if isinstance(method, str) and method in registry.names() else None
        full = f.get("epochs", RunConfig.model_fields["epochs"].default)
        if self.epochs != 1.0:
            self._scale_epochs(f, self.epochs, cls.min_epochs if cls else 1)
        if cls is not None:  # the method's own epoch counts (its phases kept inside the run)
            cls.scale(f, self.epochs, full)

    @staticmethod
    def _scale_epochs(f: dict[str, Any], k: float, min_epochs: int) -> None:
        from suite.pruning.base import scaled

        full = f.get("epochs", RunConfig.model_fields["epochs"].default)
        ep = f["epochs"] = max(scaled(full, k), min(full, min_epochs))
        if "eval_every" in f:
            f["eval_every"] = min(scaled(f["eval_every"], k), ep)
        if isinstance(f.get("lr_milestones"), list) and f["lr_milestones"]:  # kept inside the run, distinct
            ms: list = []
            for m in f["lr_milestones"]:
                if isinstance(m, float) and m.is_integer():
                    m = int(m)
                v = min(max(scaled(m, k), ms[-1] + 1 if ms else 1), ep - 1) if isinstance(m, int) else m
                if not ms or v != ms[-1]:
                    ms.append(v)
            f["lr_milestones"] = [m for m in ms if not isinstance(m, int) or m >= 1]


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
    from suite.pruning import registry

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
            if r.method == registry.CONTROL or (r.model, r.dataset, r.seed) != key:
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
    plugins: list[str] = Field(default_factory=list, description="Python files (relative to the sweep file) or "
                               "modules to import before the grid is read: each registers its methods "
                               "(suite.pruning.registry); every run carries the list to the process that trains it")
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
    _SWEEP_SET = {"method": "grid.methods", "sparsity": "grid.sparsities", "seed": "grid.seeds", "plugins": "plugins",
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
        from suite.pruning import registry

        dense_m = registry.CONTROL
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
        variants = registry.variants()
        for model, seed, entry, combo in itertools.product(models, self.grid.seeds, self.grid.methods, combos):
            method, preset = variants.get(entry, (entry, {}))
            if method == dense_m and combo != combos[0]:
                continue  # extra axes vary the pruning runs; one dense run per model and seed
            sparsities = [0.0] if method == dense_m else self.grid.sparsities
            for s in sparsities:
                fields = _deep_copy(self.base)
                keys = list(dict.fromkeys([method, entry, f"{method}@{s:g}", f"{entry}@{s:g}"]))
                layers = [(k, self.overrides.get(k, {})) for k in keys]
                _deep_update(fields, layers[0][1])
                _deep_update(fields, _deep_copy(preset))
                for _, ov in layers[1:]:
                    _deep_update(fields, ov)
                if method != dense_m:
                    for (key, _), value in zip(axes, combo):
                        set_dotted(fields, key, value)
                fields.update(model=model, seed=seed, method=method, sparsity=s, plugins=list(self.plugins),
                              data_dir=self.data_dir, out_dir=self.out_dir,
                              experiment=self.experiment_name(), sweep=self.name,
                              tracking_uri=self.tracking_uri)
                if method == dense_m and fields.get("init") != "pretrained":
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
        dense = {(r.model, r.dataset, r.seed): r for r in runs if r.method == dense_m}
        for i, r in enumerate(runs):
            if r.init == "dense":
                parent = dense.get((r.model, r.dataset, r.seed))
                if parent is None:
                    raise ConfigError(f"{r.method}: init 'dense' needs {dense_m!r} in grid.methods "
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
        runs.sort(key=lambda r: r.method != dense_m)
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

        try:
            registry.load_plugins(self.plugins, where="plugins")
        except registry.PluginError as e:
            raise ValueError(str(e)) from None
        sync_sections()
        variants = registry.variants()
        known = registry.names() + sorted(variants)
        bad = [f"grid.methods[{i}]: unknown method {m!r}{did_you_mean(m, known)}"
               for i, m in enumerate(self.grid.methods) if m not in known]
        listed = set(self.grid.methods) | {variants[m][0] for m in self.grid.methods if m in variants}
        targets = [f"{x:g}" for x in self.grid.sparsities]
        for m in self.overrides:
            name, at, target = m.partition("@")
            if name not in known:
                bad.append(f"overrides.{m}: unknown method {name!r}{did_you_mean(name, known)}")
            elif at and target not in targets:
                bad.append(f"overrides.{m}: {target!r} is not one of grid.sparsities as written in run names "
                           f"({', '.join(targets)})")
            elif (at or name in variants) and name not in listed:
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
    plugins = data.get("plugins") if isinstance(data, dict) else None
    if isinstance(plugins, list):  # a plugin file is found next to the sweep file, wherever hfbench runs
        data["plugins"] = [str((Path(path).parent / p).resolve()) if isinstance(p, str) and p.endswith(".py")
                           and not Path(p).is_absolute() else p for p in plugins]
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
