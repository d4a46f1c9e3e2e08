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
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration was rejected. The message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- method sections
class HyperfluxConfig(_Strict):
    """Hyperflux hyper-parameters (docs: hyperflux.md sections 1-6)."""

    pruning_end: int = Field(8, ge=1, description="P: last epoch of the pruning phase")
    gate_lr: float = Field(1e-3, gt=0, le=1.0, description="Adam learning rate of the gates")
    gate_init_low: float = 0.2
    gate_init_high: float = 0.5
    ste_scale: float = Field(0.25, gt=0, description="straight-through gradient scale of the hard gate")
    step: float = Field(0.2, gt=0, le=10, description="controller step s (0.2 CIFAR, 0.15 ImageNet/ViT)")
    end_lr_pruning: Optional[float] = Field(None, ge=0, description="weight LR at the end of pruning (default lr/30)")
    reset_lr: float = Field(1e-3, ge=0, description="weight LR at the start of regrowth")
    end_lr_regrowth: float = Field(1e-4, ge=0, description="weight LR at the end of regrowth")
    decay: float = Field(0.75, gt=0, le=1, description="gate LR multiplier per regrowth epoch")
    reset_scaler: float = Field(1.0, gt=0, description="gate LR at regrowth start = gate_lr * reset_scaler")
    freeze_gates_after: int = Field(50, ge=0, description="gate LR set to 0 after this many regrowth epochs")
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


METHOD_SECTIONS = {"hyperflux": HyperfluxConfig, "magnitude": MagnitudeConfig, "gmp": GMPConfig}


class EngineConfig(_Strict):
    world_size: int = Field(1, ge=1, le=1024, description="ranks (GPUs, or CPU processes) per run")
    nodes: int = Field(1, ge=1, le=256)
    zero_stage: Literal[0] = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads_per_rank: int = Field(1, ge=1, le=256)
    deterministic: bool = True


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
    lr_end: float = Field(0.0, ge=0, description="final weight LR of the cosine schedule (non-Hyperflux)")
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0, le=1)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    max_steps_per_epoch: Optional[int] = Field(None, ge=1, description="scale knob: cap batches per epoch")
    eval_every: int = Field(1, ge=1, description="evaluate val/test every k epochs (and always after the last)")
    flux_every: int = Field(1, ge=0, description="flux statistics and NPL saliencies every k epochs (and after "
                            "the last); one extra forward/backward on a training batch; 0: off")
    init: Literal["scratch", "dense"] = Field("scratch", description="start from random init or from the sweep's dense run")
    init_from: Optional[str] = Field(None, description="run hash of the dense run this run starts from (set by the sweep)")
    init_checkpoint: Optional[str] = Field(None, description="path of the starting weights (set by the sweep)")
    hyperflux: HyperfluxConfig = HyperfluxConfig()
    magnitude: MagnitudeConfig = MagnitudeConfig()
    gmp: GMPConfig = GMPConfig()
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
            raise ValueError(f"unknown method {v!r}; known: {', '.join(registry.names())}")
        return v

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from suite import models

        if v not in models.names():
            raise ValueError(f"unknown model {v!r}; known: {', '.join(models.names())}")
        return v

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, v: str) -> str:
        from suite import datasets

        if v not in datasets.names():
            raise ValueError(f"unknown dataset {v!r}; known: {', '.join(datasets.names())}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.method == "dense" and self.sparsity != 0.0:
            raise ValueError("method 'dense' needs sparsity 0 (got %s)" % self.sparsity)
        if self.method != "dense" and self.sparsity == 0.0:
            raise ValueError(f"method {self.method!r} needs a target sparsity > 0")
        if self.method == "hyperflux" and self.hyperflux.pruning_end > self.epochs:
            raise ValueError(
                f"hyperflux.pruning_end ({self.hyperflux.pruning_end}) must be <= epochs ({self.epochs})")
        if self.method == "hyperflux":
            from suite.pruning.hyperflux import PressureScheduler

            PressureScheduler(self.sparsity, self.hyperflux.pruning_end, self.hyperflux.step)
        if self.method == "gmp":
            end = self.gmp.end_epoch if self.gmp.end_epoch is not None else self.epochs
            if end > self.epochs or end <= self.gmp.start_epoch:
                raise ValueError(f"gmp.end_epoch must be in (gmp.start_epoch, epochs]; got {end}")
            if self.gmp.initial_sparsity > self.sparsity:
                raise ValueError("gmp.initial_sparsity must be <= sparsity")
        if self.init == "dense" and self.method == "dense":
            raise ValueError("init: a dense run cannot start from a dense run; use init 'scratch'")
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
        for name in METHOD_SECTIONS:
            if name != self.method:
                d.pop(name)
        if self.method == "hyperflux":  # inputs of the other pressure schedules change nothing
            h = d["hyperflux"]
            if h["schedule"] != "law":
                h.pop("law")
            if h["schedule"] != "fixed":
                h.pop("fixed_gamma")
        return d

    def run_hash(self) -> str:
        blob = json.dumps(self.semantic_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def variant(self) -> str:
        """The method with the option that changes what it is (the report's line label):
        hyperflux, hyperflux-law, hyperflux-fixed, gmp, gmp-taylor, ..."""
        if self.method == "hyperflux" and self.hyperflux.schedule != "controller":
            return f"hyperflux-{self.hyperflux.schedule}"
        if self.method == "gmp" and self.gmp.criterion != "magnitude":
            return f"gmp-{self.gmp.criterion}"
        return self.method

    def run_name(self) -> str:
        if self.method == "dense":
            return f"{self.model}-dense-s{self.seed}"
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
            if name != self.method:
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


class LauncherConfig(_Strict):
    executor: Literal["auto", "slurm", "local", "debug"] = "auto"
    parallelism: int = Field(2, ge=1, le=10000, description="runs at once (SLURM array limit)")
    folder: str = "runs/submitit"
    slurm: SlurmConfig = SlurmConfig()
    poll_s: float = Field(2.0, gt=0, le=600)
    max_requeues: int = Field(10, ge=0, le=1000, description="preemptions/time-outs a task may be requeued after")


class GridConfig(_Strict):
    methods: list[str] = Field(default_factory=lambda: ["dense"], min_length=1)
    sparsities: list[float] = Field(default_factory=lambda: [0.9], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    models: Optional[list[str]] = None
    params: dict[str, list[Any]] = Field(
        default_factory=dict, description="extra grid axes over run fields, e.g. {hyperflux.fixed_gamma: [1, 2, 4]}")

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


class SweepConfig(_Strict):
    name: str = Field(..., min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")
    experiment: Optional[str] = Field(None, min_length=1, max_length=200)
    tracking_uri: Optional[str] = None
    data_dir: str = "data"
    out_dir: str = "runs"
    base: dict[str, Any] = Field(default_factory=dict, description="run fields shared by every run")
    grid: GridConfig = GridConfig()
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-method run fields, e.g. {hyperflux: {epochs: 12}}")
    launcher: LauncherConfig = LauncherConfig()
    reuse_dense: bool = Field(False, description="start from dense weights already in out_dir (same hash) "
                                                 "even if that dense run is not in this experiment")

    def experiment_name(self) -> str:
        return self.experiment or self.name

    def expand(self) -> list[RunConfig]:
        """The grid as run configs: dense runs first (one per model and seed), then every
        pruning method x sparsity x seed x model. Raises ConfigError naming the bad field."""
        runs: list[RunConfig] = []
        models = self.grid.models or [self.base.get("model", RunConfig.model_fields["model"].default)]
        seen: set[str] = set()
        axes = list(self.grid.params.items())
        combos = list(itertools.product(*[v for _, v in axes])) if axes else [()]
        for model, seed, method, combo in itertools.product(models, self.grid.seeds, self.grid.methods, combos):
            if method == "dense" and combo != combos[0]:
                continue  # extra axes vary the pruning runs; one dense run per model and seed
            sparsities = [0.0] if method == "dense" else self.grid.sparsities
            for s in sparsities:
                fields = _deep_copy(self.base)
                _deep_update(fields, self.overrides.get(method, {}))
                if method != "dense":
                    for (key, _), value in zip(axes, combo):
                        set_dotted(fields, key, value)
                fields.update(model=model, seed=seed, method=method, sparsity=s,
                              data_dir=self.data_dir, out_dir=self.out_dir,
                              experiment=self.experiment_name(), sweep=self.name,
                              tracking_uri=self.tracking_uri)
                if method == "dense":
                    fields["init"] = "scratch"
                where = f"overrides.{method}" if method in self.overrides else "base"
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
        runs.sort(key=lambda r: r.method != "dense")
        return runs

    @model_validator(mode="after")
    def _check(self):
        from suite.pruning import registry

        for i, m in enumerate(self.grid.methods):
            if m not in registry.names():
                raise ValueError(f"grid.methods[{i}]: unknown method {m!r}; known: {', '.join(registry.names())}")
        for m in self.overrides:
            if m not in registry.names():
                raise ValueError(f"overrides: unknown method {m!r}")
        for k in ("method", "sparsity", "seed", "experiment", "sweep"):
            if k in self.base:
                raise ValueError(f"base.{k}: set by the grid or the sweep, not in base")
        return self


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d))


def _deep_update(dst: dict[str, Any], src: dict[str, Any]) -> None:
    """Merge src into dst; nested mappings are merged, not replaced."""
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = _deep_copy(v) if isinstance(v, dict) else v


# --------------------------------------------------------------------------- loading
def _format_errors(err: ValidationError, where: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if where:
            loc = f"{where}.{loc}" if e["loc"] else where
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required field missing"
        lines.append(f"  {loc}: {msg} (got {e.get('input')!r})" if e["type"] != "missing" else f"  {loc}: {msg}")
    return "\n".join(lines)


def _validate(model: type[BaseModel], data: Any, where: str = "", source: str = "config"):
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: invalid {model.__name__}:\n{_format_errors(err, where)}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_sweep(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> SweepConfig:
    data = load_yaml(path)
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
