"""Reading one MLflow experiment into run records, and the metric histories and artifacts of its runs.

The run schema read here is the one the training code logs on rank 0 (suite/run_schema.py):
tags ``hfbench.*`` and ``env.*``, params ``method``/``model``/``dataset``/``sparsity`` (the
target)/``seed``/``epochs``, per-epoch metrics (step = epoch) and the ``final/*`` metrics at the
last step. Metrics are read under their short names (``final_sparsity``, ``train_loss``) whether
the store has them grouped (``final/achieved_sparsity``) or, written before the groups, not;
``env.*`` come from tags, or params in stores from before they were tags.

Public API: ``load(client, experiment_id)`` (every training run of an experiment, parsed),
``history(client, run_id, key)`` (one metric per step), ``Histories`` (bulk reader),
``read_artifacts``, ``latest_finished``, ``overhead`` (the latest overhead benchmark), and the
report labels (``DENSE``, ``MATCHED``, ``is_dense``, ``is_matched``, ``method_order``, ``family``,
``tracks_target``).
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reports.fmt import local_path, portable
from reports.sqlite_store import open_store
from suite.run_schema import internal_key, mlflow_key

__all__ = [
    "BUDGET_METRICS",
    "DENSE",
    "MATCHED",
    "Histories",
    "RunRecord",
    "family",
    "history",
    "is_dense",
    "is_matched",
    "latest_finished",
    "load",
    "method_order",
    "read_artifacts",
    "tracks_target",
]

# The SQLAlchemy tracking store refuses pages larger than this.
_PAGE_SIZE = 50_000

BUDGET_METRICS = [
    "budget_steps",
    "budget_images",
    "budget_epochs",
    "budget_device_s",
    "budget_total_steps",
    "budget_total_images",
    "budget_total_epochs",
    "budget_total_device_s",
    "budget_parent_counted",
]

# report labels: the dense control, budget-matched dense controls ("dense-matched EPOCHSxSTEPS")
DENSE = "dense"
MATCHED = "dense-matched"  # dense controls trained for the pruning runs' total budget


def is_matched(method: str) -> bool:
    """A budget-matched dense control; its label carries its plan, e.g. 'dense-matched 85x49'."""
    return method.startswith(MATCHED)


def is_dense(method: str) -> bool:
    return method == DENSE or is_matched(method)


def method_order(method: str) -> tuple[int, str]:
    """Sort key of report labels: the dense control, then budget-matched controls, then methods."""
    return (0 if method == DENSE else 1 if is_matched(method) else 2, method)


def _registry_family(label: str) -> str:
    from suite.pruning import registry

    return registry.family(label)


def family(r: RunRecord) -> str:
    """The registry method of a run (its variant's family), '' when no registered method claims it."""
    from suite.pruning import registry

    return registry.family(r.base_method) or registry.family(r.method)


def tracks_target(r: RunRecord) -> bool:
    """A run of a method that steers along a target density trajectory of its own and says so by
    printing target_density in its epoch line (its `epoch_metrics`): the density plot's runs."""
    from suite.pruning import registry

    fam = family(r)
    return bool(fam) and fam != registry.CONTROL and "target_density" in registry.get(fam).epoch_metrics


@dataclass
class RunRecord:
    """What the report needs from one MLflow run, already parsed."""

    run_id: str
    run_hash: str
    status: str
    method: str
    model: str
    dataset: str
    seed: int | None
    target_sparsity: float | None
    achieved_sparsity: float | None
    test_top1: float | None
    val_top1: float | None
    epochs: int | None
    wall_time_s: float | None
    error: str
    final_density: float | None
    sweep: str
    run_name: str
    config_hash: str
    start_time: int | None  # ms since epoch, as MLflow stores it
    end_time: int | None
    env: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # latest value of every metric, by short name
    metric_names: dict[str, str] = field(default_factory=dict)  # short name -> its name in the store
    params: dict[str, str] = field(default_factory=dict)
    base_method: str = ""  # the registry method (the variant's family, registry.family of the label)
    test_top5: float | None = None
    artifact_uri: str = ""
    # filled in by build_report
    compression_ratio: float | None = None
    theoretical_speedup: float | None = None
    theoretical_speedup_prunable: float | None = None
    measured_speedup: dict[int, float] = field(default_factory=dict)  # batch -> `hfbench bench deploy`
    dense_macs: int | None = None
    remaining_macs: float | None = None
    cost_note: str = ""
    control: str = ""  # what the report compares this run with (filled in by build_report)
    layer_counts: list | None = None  # its layer_density.csv rows (filled in by build_report)
    budget_ratio: float | None = None  # total budget / the control's

    @property
    def world_size(self) -> int:
        return _to_int(self.env.get("env.world_size")) or 1

    @property
    def batch_size(self) -> int | None:
        return _to_int(self.params.get("batch_size"))

    @property
    def epochs_run(self) -> int | None:
        """Epochs trained: the epochs param (for IMP already (levels + 1) x epochs_per_level)."""
        return self.epochs

    @property
    def optimizer_steps(self) -> int | None:
        spe = _to_int(self.params.get("steps_per_epoch")) or _to_int(self.params.get("max_steps_per_epoch"))
        return None if spe is None or self.epochs is None else spe * self.epochs

    @property
    def samples(self) -> float | None:
        """Optimiser steps x global batch (batch_size is per rank)."""
        steps, b = self.optimizer_steps, self.batch_size
        return None if steps is None or b is None else float(steps * b * self.world_size)

    @property
    def device_hours(self) -> float | None:
        return None if self.wall_time_s is None else self.wall_time_s * self.world_size / 3600.0

    @property
    def git_commit(self) -> str:
        return self.env.get("env.git_commit", "")

    @property
    def hardware(self) -> str:
        return self.env.get("env.hardware", "")

    @property
    def torch(self) -> str:
        return self.env.get("env.torch", "")

    @property
    def config_artifact(self) -> str:
        local = local_path(self.artifact_uri)
        if local is not None:
            return portable(f"{local.rstrip('/')}/config.yaml")
        return f"{self.artifact_uri.rstrip('/')}/config.yaml" if self.artifact_uri else ""

    @property
    def rerun_command(self) -> str:
        """One command that retrains exactly this run (same config, so the same run hash)."""
        local = local_path(self.artifact_uri)
        if local is not None:
            return f"hfbench train {portable(local.rstrip('/') + '/config.yaml')}"
        if not self.artifact_uri:
            return ""
        return (
            f"mlflow artifacts download -r {self.run_id} -a config.yaml -d rerun-{self.identity} && "
            f"hfbench train rerun-{self.identity}/config.yaml"
        )

    @property
    def identity(self) -> str:
        # Re-runs of the same config share a run hash; fall back to the run id when absent.
        return self.run_hash or self.run_id


for _k in BUDGET_METRICS:  # results.csv columns read from the run's budget metrics
    setattr(RunRecord, _k, property(lambda self, k=_k: _to_float(self.metrics.get(k))))


# ----------------------------------------------------------------------------------------
# parsing


def _to_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def _to_int(value: Any) -> int | None:
    f = _to_float(value)
    if f is None or not math.isfinite(f):
        return None
    return int(round(f))


def _first(*values: Any) -> Any:
    """The first value that is not None."""
    for v in values:
        if v is not None:
            return v
    return None


# ----------------------------------------------------------------------------------------
# reading MLflow


def _all_runs(client, experiment_id: str, fast: bool = True) -> list:
    if fast:  # a sqlite store: plain SQL, the same answer as the API (reports/sqlite_store.py)
        store = open_store(client)
        if store is not None:
            try:
                return store.runs(experiment_id)
            except sqlite3.Error:
                pass
    runs: list = []
    token = None
    while True:
        page = client.search_runs(
            experiment_ids=[experiment_id],
            max_results=_PAGE_SIZE,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def load(client, experiment_id: str, fast: bool = True) -> list[RunRecord]:
    """Every training run of the experiment (all statuses, oldest first), parsed; runs with no
    method anywhere (not training runs) are left out. `fast`: read a sqlite store with plain SQL
    (False: through MLflow's API, whatever the store)."""
    return [rec for rec in map(_record_from_run, _all_runs(client, experiment_id, fast)) if rec]


def _record_from_run(run) -> RunRecord | None:
    """Parse one MLflow run; None when it is not a training run (no method anywhere)."""
    params = run.data.params
    tags = run.data.tags
    stored = {internal_key(k): k for k in run.data.metrics}  # short name -> the name in this store
    metrics = {short: run.data.metrics[k] for short, k in stored.items()}  # latest value of every key
    # the variant (a method's named recipe) labels the line; older runs only have the method
    method = tags.get("hfbench.variant") or params.get("method") or tags.get("hfbench.method")
    if not method:
        return None
    if method == MATCHED:  # one row per control plan: epochs x steps per epoch
        method = f"{MATCHED} {params.get('epochs', '?')}x{params.get('max_steps_per_epoch', 'None')}".replace(
            "xNone", "xall"
        )
    final_density = _to_float(metrics.get("final_density"))
    achieved = _first(
        _to_float(metrics.get("final_sparsity")),
        None if final_density is None else 1.0 - final_density,
        _to_float(metrics.get("sparsity")),
    )
    return RunRecord(
        run_id=run.info.run_id,
        run_hash=tags.get("hfbench.run_hash", ""),
        status=run.info.status,
        method=method,
        model=params.get("model") or tags.get("hfbench.model") or "unknown",
        dataset=params.get("dataset") or tags.get("hfbench.dataset") or "unknown",
        seed=_to_int(params.get("seed")),
        target_sparsity=_to_float(params.get("sparsity")),
        achieved_sparsity=achieved,
        # Prefer the final_* metrics; fall back to the last per-epoch value (runs that died
        # before the end, or older runs that did not log final_*).
        test_top1=_first(_to_float(metrics.get("final_test_top1")), _to_float(metrics.get("test_top1"))),
        val_top1=_first(_to_float(metrics.get("final_val_top1")), _to_float(metrics.get("val_top1"))),
        epochs=_to_int(params.get("epochs")),
        wall_time_s=_to_float(metrics.get("wall_time_s")),
        error=tags.get("hfbench.error", ""),
        final_density=final_density,
        sweep=tags.get("hfbench.sweep", ""),
        run_name=tags.get("mlflow.runName", "") or getattr(run.info, "run_name", "") or "",
        config_hash=params.get("config_hash", ""),
        start_time=run.info.start_time,
        end_time=run.info.end_time,
        env={k: v for k, v in {**params, **tags}.items() if k.startswith("env.")},
        metrics=dict(metrics),
        metric_names=stored,
        params=dict(params),
        base_method=params.get("method") or tags.get("hfbench.method") or _registry_family(method) or method,
        # only when the runs log it (the engine logs top-1; nothing is made up here)
        test_top5=_first(_to_float(metrics.get("final_test_top5")), _to_float(metrics.get("test_top5"))),
        artifact_uri=getattr(run.info, "artifact_uri", "") or "",
    )


def _last_per_step(points: Iterable[tuple[int, int, float]]) -> list[tuple[int, float]]:
    """(step, value) from (step, timestamp, value) points: the last value logged at each step (a
    resumed run may log a step twice)."""
    by_step: dict[int, tuple[int, float]] = {}
    for step, ts, v in points:
        prev = by_step.get(step)
        if prev is None or ts >= prev[0]:
            by_step[step] = (ts, v)
    return [(step, v) for step, (_, v) in sorted(by_step.items())]


def _points(metrics) -> list[tuple[int, int, float]]:
    """MLflow Metric objects as (step, timestamp, value)."""
    return [(m.step, m.timestamp, m.value) for m in metrics]


class Histories:
    """Metric histories of many runs, read in bulk.

    ``prefetch(run_ids, key)`` reads one key for many runs with one query per chunk of runs
    where the store can (the SQLAlchemy store's get_metric_history_bulk), else one
    get_metric_history call per run on a few threads. ``history`` answers from what was
    prefetched and falls back to a single call for anything else."""

    _CHUNK = 500

    def __init__(self, client, fast: bool = True):
        self.client = client
        self._cache: dict[tuple[str, str], list[tuple[int, float]]] = {}
        self._sql = open_store(client) if fast else None  # a sqlite store: plain SQL
        self._bulk = None
        if self._sql is None:  # MLflow's SQLAlchemy store reads one key for many runs at once
            store = getattr(getattr(client, "_tracking_client", None), "store", None)
            self._bulk = getattr(store, "get_metric_history_bulk", None)

    def prefetch(self, run_ids: Iterable[str], key: str, stored: str | None = None) -> None:
        """Read metric `key` (a short name) of these runs, logged under `stored` (default: its
        grouped name, or the short name in a store from before the groups)."""
        ids = [r for r in dict.fromkeys(run_ids) if (r, key) not in self._cache]
        if not ids:
            return
        if self._sql is not None:
            try:
                got = self._sql.histories(ids, stored or mlflow_key(key))
                empty = [r for r, pts in got.items() if not pts]
                if stored is None and empty and mlflow_key(key) != key:  # runs of an older store: their short name
                    got.update(self._sql.histories(empty, key))
                for r, pts in got.items():
                    self._cache[(r, key)] = _last_per_step(pts)
                return
            except sqlite3.Error:
                self._sql = None
        if self._bulk is not None:
            try:
                for i in range(0, len(ids), self._CHUNK):
                    chunk = ids[i : i + self._CHUNK]
                    got: dict[str, list] = {r: [] for r in chunk}
                    for m in self._bulk(chunk, stored or mlflow_key(key), max_results=10_000_000):
                        got[m.run_id].append(m)  # a Metric with run_id
                    for r, pts in got.items():
                        self._cache[(r, key)] = _last_per_step(_points(pts))
                empty = [r for r in ids if not self._cache[(r, key)]]
                if stored is None and empty and mlflow_key(key) != key:  # runs of an older store: their short name
                    for r in empty:
                        del self._cache[(r, key)]
                    self.prefetch(empty, key, stored=key)
                return
            except Exception:  # a store without the bulk query after all: per-run calls
                self._bulk = None
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=8) as pool:
            for r, hist in zip(ids, pool.map(lambda r: _read(self.client, r, key, stored), ids)):
                self._cache[(r, key)] = hist

    def prefetch_records(self, records: Iterable[RunRecord], key: str) -> None:
        """Prefetch `key` for the runs whose latest metrics have it; the others have no history."""
        by_name: dict[str, list[str]] = {}
        for r in records:
            if key in r.metrics:
                by_name.setdefault(r.metric_names.get(key, key), []).append(r.run_id)
            else:
                self._cache[(r.run_id, key)] = []
        for stored, ids in by_name.items():
            self.prefetch(ids, key, stored=stored)

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        if (run_id, key) not in self._cache:
            self._cache[(run_id, key)] = _read(self.client, run_id, key)
        return self._cache[(run_id, key)]


def _read(client, run_id: str, key: str, stored: str | None = None) -> list[tuple[int, float]]:
    """One run's history of metric `key` (a short name): under `stored`, else its grouped name,
    else (a store from before the groups) the short name itself."""
    if stored is not None:
        return _last_per_step(_points(client.get_metric_history(run_id, stored)))
    got = client.get_metric_history(run_id, mlflow_key(key))
    if not got and mlflow_key(key) != key:
        got = client.get_metric_history(run_id, key)
    return _last_per_step(_points(got))


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of metric `key` (a short name, e.g. "density") of one run, the last value
    logged at each step; `client` is an MlflowClient or a Histories (then answered from what it
    prefetched)."""
    if isinstance(client, Histories):
        return client.history(run_id, key)
    return _read(client, run_id, key)


def read_artifacts(client, records: list[RunRecord], name: str) -> dict[str, str]:
    """run id -> text of artifact `name` (absent when the run has none): straight from disk
    for a local artifact store, else downloaded on a few threads."""
    out: dict[str, str] = {}
    remote = []
    for r in records:
        local = local_path(r.artifact_uri)
        if local is None:
            remote.append(r)
            continue
        try:
            out[r.run_id] = (Path(local) / name).read_text(encoding="utf-8")
        except OSError:
            pass
    if remote:
        import tempfile
        from concurrent.futures import ThreadPoolExecutor

        def fetch(r: RunRecord) -> str | None:
            try:
                with tempfile.TemporaryDirectory() as d:
                    return Path(client.download_artifacts(r.run_id, name, d)).read_text(encoding="utf-8")
            except Exception:
                return None

        with ThreadPoolExecutor(max_workers=8) as pool:
            for r, text in zip(remote, pool.map(fetch, remote)):
                if text is not None:
                    out[r.run_id] = text
    return out


def latest_finished(records: Iterable[RunRecord]) -> list[RunRecord]:
    """FINISHED runs, one per run hash (the most recently started wins), so that a config
    re-run after a crash or by a repeated sweep is not counted as an extra seed."""
    best: dict[str, RunRecord] = {}
    for r in records:
        if r.status != "FINISHED":
            continue
        cur = best.get(r.identity)
        if cur is None or (r.start_time or 0) >= (cur.start_time or 0):
            best[r.identity] = r
    return list(best.values())
