"""Typed run and sweep configurations.

A *run* is one training job (one model, one method, one target sparsity, one seed).
A *sweep* is a grid of runs plus how to launch them. Both come from YAML, are validated
by pydantic (unknown keys and bad values are rejected with the dotted name of the field),
and a run's identity is a stable hash of its resolved, semantic content.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import Field, field_validator, model_validator
from pydantic.fields import FieldInfo

from suite.pruning.registry import CONTROL
from suite.schema import Strict, did_you_mean
from suite.validation import (  # noqa: F401 - re-exported: the run config's readers and checks
    ConfigError,
    _no_control,
    _plain,
    _tracking_uri,
    _unknown_keys,
    _validate,
    load_yaml,
    safe_path,
    set_dotted,
)

_Strict = Strict


class EngineConfig(_Strict):
    world_size: int = Field(1, ge=1, le=1024, description="ranks (GPUs, or CPU processes) per run")
    nodes: int = Field(1, ge=1, le=256)
    zero_stage: Literal[0, 1, 2] = Field(
        0,
        description="DeepSpeed ZeRO stage: 1 partitions the optimiser "
        "state across ranks, 2 also the gradients (dense runs)",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads_per_rank: int = Field(1, ge=1, le=256)
    deterministic: bool = True
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="bf16 / fp16: torch.autocast mixed precision for forward and loss; weights, gates and "
        "optimiser state stay fp32; fp16 adds a dynamic gradient scaler (torch.amp.GradScaler: "
        "steps with inf/NaN gradients are skipped), as the Hyperflux reference code trains",
    )
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
        "cosine",
        description="weight LR over the run (non-Hyperflux): cosine lr -> lr_end, or step: lr times "
        "lr_gamma after each epoch listed in lr_milestones (torch MultiStepLR, per epoch)",
    )
    lr_milestones: list[int] = Field(
        default_factory=list,
        description="step schedule: epochs after which the LR "
        "is multiplied by lr_gamma (e.g. [80, 120] for the reference dense CIFAR run)",
    )
    lr_gamma: float = Field(0.1, gt=0, le=1, description="step schedule: LR factor at each milestone")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0, le=1)
    weight_decay_on: Literal["all", "conv_linear"] = Field(
        "all",
        description="parameters weight decay applies to: every trained one, or only Conv2d/Linear weights "
        "(no biases, norms, embeddings; the Hyperflux reference's ImageNet recipe)",
    )
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    max_steps_per_epoch: Optional[int] = Field(None, ge=1, description="scale knob: cap batches per epoch")
    eval_every: int = Field(1, ge=1, description="evaluate val/test every k epochs (and always after the last)")
    flux_every: int = Field(
        1,
        ge=0,
        description="flux statistics and NPL saliencies every k epochs (and after "
        "the last); one extra forward/backward on a training batch; 0: off",
    )
    budget_matched: bool = Field(
        False,
        description="a dense control trained for the total budget of the pruning "
        "runs it is compared with (added by grid.budget_matched_dense; dense only)",
    )
    init: Literal["scratch", "dense", "pretrained"] = Field(
        "scratch",
        description="start from random init, from the sweep's dense run, or from the weights file "
        "`pretrained` (torchvision/timm state dict on local disk)",
    )
    pretrained: Optional[str] = Field(
        None,
        description="weights file for init 'pretrained' (loaded with "
        "weights_only; a classifier of another class count is re-initialised)",
    )
    init_from: Optional[str] = Field(
        None, description="run hash of the dense run this run starts from (set by the sweep)"
    )
    init_checkpoint: Optional[str] = Field(None, description="path of the starting weights (set by the sweep)")
    # each method's own section (e.g. hyperflux: {...}) is added by the method's module
    # (suite.pruning.registry): see _method_sections below
    engine: EngineConfig = EngineConfig()
    plugins: list[str] = Field(
        default_factory=list,
        description="plugin files or modules that register methods "
        "(set by the sweep's `plugins`; imported before the method is looked up)",
    )
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
    def model_validate(cls, obj: Any, **kwargs: Any) -> RunConfig:  # type: ignore[override]
        _ready_for(obj)
        return super().model_validate(obj, **kwargs)

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        from suite.pruning import registry

        if v not in registry.names():
            raise ValueError(
                f"unknown method {v!r}{did_you_mean(v, registry.names())}; known: {', '.join(registry.names())}"
            )
        return v

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from suite import models

        if v not in models.names():
            raise ValueError(
                f"unknown model {v!r}{did_you_mean(v, models.names())}; known: {', '.join(models.names())}"
            )
        return v

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from suite import datasets

        if v not in datasets.names():
            raise ValueError(
                f"unknown dataset {v!r}{did_you_mean(v, datasets.names())}; known: {', '.join(datasets.names())}"
            )
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
            raise ValueError(
                f"budget_matched: only a dense run can be a budget-matched control (method {self.method!r})"
            )
        if self.method == dense and self.sparsity != 0.0:
            raise ValueError(f"method {dense!r} needs sparsity 0 (got {self.sparsity})")
        if self.method != dense and self.sparsity == 0.0:
            raise ValueError(f"method {self.method!r} needs a target sparsity > 0")
        method = registry.get(self.method)
        method.check(self)
        if self.init == "dense" and self.method == dense:
            raise ValueError("init: a dense run cannot start from a dense run; use init 'scratch' or 'pretrained'")
        if (self.init == "pretrained") != (self.pretrained is not None):
            raise ValueError(
                "pretrained: give a weights file exactly when init is 'pretrained' "
                f"(init {self.init!r}, pretrained {self.pretrained!r})"
            )
        if self.lr_schedule == "step" and method.own_lr_schedule:
            raise ValueError(
                f"lr_schedule: {self.method} has its own weight-LR schedule; 'step' applies to "
                f"methods that follow the run's schedule"
            )
        if self.lr_schedule == "step":
            ms = self.lr_milestones
            if any(b <= a for a, b in zip(ms, ms[1:])) or (ms and (ms[0] < 1 or ms[-1] >= self.epochs)):
                raise ValueError(
                    f"lr_milestones: the step schedule needs strictly increasing epochs in "
                    f"[1, epochs - 1] (epochs {self.epochs}), got {ms}"
                )
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
        for k in (
            "data_dir",
            "experiment",
            "sweep",
            "tracking_uri",
            "out_dir",
            "init_checkpoint",
            "eval_every",
            "flux_every",
            "plugins",
        ):
            d.pop(k)
        # fields added after runs were recorded enter the hash only when set, so older runs keep
        # their hashes; the weights file counts by name, not by folder
        eng = d["engine"]
        eng.pop("loader_workers")
        for k, default in (("precision", "fp32"), ("channels_last", False)):
            if eng[k] == default:
                eng.pop(k)
        for k, default in (
            ("lr_schedule", "cosine"),
            ("lr_milestones", []),
            ("lr_gamma", 0.1),
            ("weight_decay_on", "all"),
            ("budget_matched", False),
        ):
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

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        """The run's fields with its own method section only: what goes to a worker or into
        config.yaml must not need the plugins of other methods this process happened to load."""
        d = super().model_dump(**kwargs)
        own = self.section()
        for name in _method_sections():
            if name != own:
                d.pop(name, None)
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
            return (
                f"{self.model}-{self.variant()}-e{self.epochs}x{self.max_steps_per_epoch or 'all'}-s{self.seed}"
                if self.budget_matched
                else f"{self.model}-{self.method}-s{self.seed}"
            )
        return (
            registry.get(self.method).run_name(self) or f"{self.model}-{self.variant()}-{self.sparsity:g}-s{self.seed}"
        )

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
    old = dict(RunConfig.__pydantic_fields__)
    RunConfig.__pydantic_fields__.clear()
    RunConfig.__pydantic_fields__.update(fields)
    try:
        RunConfig.model_rebuild(force=True)
    except Exception:  # a section model pydantic cannot build: RunConfig stays as it was
        RunConfig.__pydantic_fields__.clear()
        RunConfig.__pydantic_fields__.update(old)
        RunConfig.model_rebuild(force=True)
        raise
    _SYNCED = key


def load_run(path: str | Path) -> RunConfig:
    return _validate(RunConfig, load_yaml(path), source=str(path))


def dump_run(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
