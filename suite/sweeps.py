"""Sweep configurations: a grid of runs (models x methods x sparsities x seeds x extra axes),
the overrides that make each run, the scale knob of a smoke run, equal-budget dense controls, and
how the runs are launched (local processes or SLURM). `load_sweep` reads one from YAML and
expands it once, so every error is found before anything runs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from suite.config import RunConfig, sync_sections
from suite.pruning.registry import CONTROL
from suite.schema import Strict, did_you_mean
from suite.validation import (
    ConfigError,
    _deep_copy,
    _deep_update,
    _no_control,
    _plain,
    _tracking_uri,
    _unknown_keys,
    _unshared,
    _validate,
    load_yaml,
    safe_component,
    safe_path,
    set_dotted,
)

_Strict = Strict
MAX_GRID_RUNS = 20_000  # runs one sweep may expand to


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
    folder: str = Field(
        "runs/submitit",
        description="submitit logs and job files: <folder>/<sweep name>/<time>; a relative path may not contain '..'",
    )
    slurm: SlurmConfig = SlurmConfig()
    poll_s: float = Field(2.0, gt=0, le=600)
    max_requeues: int = Field(10, ge=0, le=1000, description="preemptions/time-outs a task may be requeued after")
    submit_retry_s: int = Field(
        600,
        ge=0,
        le=86400,
        description="how long a SLURM submission is retried while the controller does not answer (0: no retry)",
    )
    tracking_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="the sweep's own MLflow calls (experiment, "
        "finished runs) give up after this long and name the server",
    )

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
        default_factory=dict, description="extra grid axes over run fields, e.g. {hyperflux.fixed_gamma: [1, 2, 4]}"
    )
    budget_matched_dense: bool = Field(
        False,
        description="add, per model and seed, a dense run trained for each total budget of the pruning "
        "runs (their own epochs, plus the dense run's for those that start from it): the "
        "report's control for equal-budget comparisons",
    )
    dense_convergence: bool = Field(
        False,
        description="add, per model and seed, a dense run trained for twice the dense run's epochs: the "
        "report shows what doubling the dense budget gains (the dense start counts as converged "
        "below 0.2 pp)",
    )

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
            # not clamped to the scaled epochs: a method may lengthen the run afterwards (Hyperflux
            # keeps its phases, IMP derives its length from its levels), and an eval_every beyond
            # the run's length means what it always means: evaluate after the last epoch
            f["eval_every"] = scaled(f["eval_every"], k)
        if isinstance(f.get("lr_milestones"), list) and f["lr_milestones"]:  # kept inside the run, distinct
            ms: list = []
            for m in f["lr_milestones"]:
                if isinstance(m, float) and m.is_integer():
                    m = int(m)
                v = min(max(scaled(m, k), ms[-1] + 1 if ms else 1), ep - 1) if isinstance(m, int) else m
                if not ms or v != ms[-1]:
                    ms.append(v)
            f["lr_milestones"] = [m for m in ms if not isinstance(m, int) or m >= 1]


def _budget_matched_dense(runs: list[RunConfig], dense: dict) -> list[RunConfig]:
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

    def per_step(r: RunConfig) -> int:
        return r.batch_size * r.engine.world_size * r.engine.nodes

    def full_epoch_steps(r: RunConfig) -> Optional[int]:
        n = datasets.get(r.dataset).train_images
        return None if n is None else n // per_step(r)  # the training loader drops the last partial batch

    def epoch_images(r: RunConfig) -> Optional[float]:
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
            fields = {
                **parent.model_dump(),
                "epochs": epochs,
                "max_steps_per_epoch": cap,
                "budget_matched": True,
                "lr_milestones": ms,
            }
            out.append(
                _validate(
                    RunConfig,
                    fields,
                    where="grid.budget_matched_dense",
                    source=f"budget-matched dense run for {parent.run_name()}",
                )
            )
    return out


def _doubled_dense(dense: dict) -> list[RunConfig]:
    """The convergence check of each dense run: the same run with twice the epochs (step
    milestones doubled), a budget-matched plan of twice its budget for the report."""
    out = []
    for parent in dense.values():
        fields = {
            **parent.model_dump(),
            "epochs": 2 * parent.epochs,
            "budget_matched": True,
            "lr_milestones": [2 * m for m in parent.lr_milestones],
        }
        out.append(
            _validate(
                RunConfig, fields, where="grid.dense_convergence", source=f"doubled dense run for {parent.run_name()}"
            )
        )
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
        default_factory=dict,
        description="per-method run fields, e.g. {hyperflux: {epochs: 12}}; a key may "
        "also be a variant of grid.methods (l0-ref: {...}) or one target of a method or variant (str-ref@0.9: "
        "{...}, as a published recipe sets its knob per sparsity); applied in that order, the most specific last",
    )
    launcher: LauncherConfig = LauncherConfig()
    plugins: list[str] = Field(
        default_factory=list,
        description="Python files (relative to the sweep file) or "
        "modules to import before the grid is read: each registers its methods "
        "(suite.pruning.registry); every run carries the list to the process that trains it",
    )
    reuse_dense: bool = Field(
        False,
        description="start from dense weights already in out_dir (same hash) "
        "even if that dense run is not in this experiment",
    )
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
    _SWEEP_SET = {
        "method": "grid.methods",
        "sparsity": "grid.sparsities",
        "seed": "grid.seeds",
        "plugins": "plugins",
        "data_dir": "data_dir",
        "out_dir": "out_dir",
        "experiment": "experiment",
        "sweep": "name",
        "tracking_uri": "tracking_uri",
    }

    def _refuse_shadowed_fields(self) -> None:
        places = [("base", self.base)] + [(f"overrides.{m}", o) for m, o in self.overrides.items()]
        places.append(("grid.params", {k.split(".")[0]: v for k, v in self.grid.params.items()}))
        for where, d in places:
            for key, owner in self._SWEEP_SET.items():
                if key in d and not (where == "base" and key == "method"):
                    raise ConfigError(
                        f"{where}.{key}: the sweep sets {key} for every run from {owner}; "
                        f"set it there (this value would be ignored)"
                    )
            if "model" in d and where != "base":
                raise ConfigError(
                    f"{where}.model: the sweep sets the model from "
                    f"{'grid.models' if self.grid.models else 'base.model'}; set it there"
                )
        if self.grid.models and self.base.get("model") not in (None, *self.grid.models):
            raise ConfigError(
                f"base.model: {self.base['model']!r} is not used, grid.models "
                f"({', '.join(map(str, self.grid.models))}) sets the models; drop it or add it there"
            )

    def expand(self) -> list[RunConfig]:
        """The grid as run configs: dense runs first (one per model and seed), then every
        pruning method x sparsity x seed x model. Raises ConfigError naming the bad field."""
        from suite.pruning import registry

        dense_m = registry.CONTROL
        runs: list[RunConfig] = []
        self._refuse_shadowed_fields()
        models = self.grid.models or [self.base.get("model", RunConfig.model_fields["model"].default)]
        seen: set[str] = set()
        axes = [
            (k, list({json.dumps(x, sort_keys=True): x for x in v}.values()))  # repeats are one value
            for k, v in self.grid.params.items()
        ]
        n = len(models) * len(self.grid.seeds) * len(self.grid.methods) * len(self.grid.sparsities)
        for _, v in axes:
            n *= max(1, len(v))
        if n > MAX_GRID_RUNS:
            raise ConfigError(
                f"grid: models x seeds x methods x sparsities x grid.params values gives {n:,} runs "
                f"(more than {MAX_GRID_RUNS:,}); split the sweep"
            )
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
                fields.update(
                    model=model,
                    seed=seed,
                    method=method,
                    sparsity=s,
                    plugins=list(self.plugins),
                    data_dir=self.data_dir,
                    out_dir=self.out_dir,
                    experiment=self.experiment_name(),
                    sweep=self.name,
                    tracking_uri=self.tracking_uri,
                )
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
                    raise ConfigError(
                        f"{r.method}: init 'dense' needs {dense_m!r} in grid.methods "
                        f"(no dense run for model {r.model}, seed {r.seed})"
                    )
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
                        f"engine.nodes for more, or engine.device: cpu)"
                    )
        runs.sort(key=lambda r: r.method != dense_m)
        names: dict[str, float] = {}
        for r in runs:  # sparsities the run name (and the report's columns) cannot tell apart
            other = names.setdefault(r.run_name(), r.sparsity)
            if other != r.sparsity:
                raise ConfigError(
                    f"grid.sparsities: {other!r} and {r.sparsity!r} are both shown as "
                    f"{r.run_name()!r}; make them distinct"
                )
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
        bad = [
            f"grid.methods[{i}]: unknown method {m!r}{did_you_mean(m, known)}"
            for i, m in enumerate(self.grid.methods)
            if m not in known
        ]
        listed = set(self.grid.methods) | {variants[m][0] for m in self.grid.methods if m in variants}
        targets = [f"{x:g}" for x in self.grid.sparsities]
        for m in self.overrides:
            name, at, target = m.partition("@")
            if name not in known:
                bad.append(f"overrides.{m}: unknown method {name!r}{did_you_mean(name, known)}")
            elif at and target not in targets:
                bad.append(
                    f"overrides.{m}: {target!r} is not one of grid.sparsities as written in run names "
                    f"({', '.join(targets)})"
                )
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


def load_sweep(path: str | Path, overrides: Optional[dict[str, Any]] = None) -> SweepConfig:
    # a copy without YAML aliases: `--set overrides.magnitude.epochs=30` must not also change the
    # methods that share magnitude's settings through an alias (&finetune / *finetune)
    data = _unshared(load_yaml(path), str(path))
    for dotted, value in (overrides or {}).items():
        set_dotted(data, dotted, value)
    plugins = data.get("plugins") if isinstance(data, dict) else None
    if isinstance(plugins, list):  # a plugin file is found next to the sweep file, wherever hfbench runs
        data["plugins"] = [
            str((Path(path).parent / p).resolve())
            if isinstance(p, str) and p.endswith(".py") and not Path(p).is_absolute()
            else p
            for p in plugins
        ]
    sweep = _validate(SweepConfig, data, source=str(path))
    try:
        sweep.expand()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return sweep
