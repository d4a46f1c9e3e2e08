"""Turn the training runs of one MLflow experiment into a report directory.

``build_report`` writes, into ``out_dir``:

* ``results.csv``   one row per training run (every status), the raw material;
* ``report.md``     environment, one accuracy table per (dataset, model), failed runs, plot links;
* ``acc_vs_sparsity_<dataset>_<model>.png``  test top-1 against achieved sparsity per method;
* ``density_<dataset>_<model>.png``  density trajectories against their targets, for the methods
  that steer along a target trajectory of their own (target_density in their epoch line);
* ``index.html``    the same content as report.md, fully self-contained (images inlined).

The run schema it reads is the one the training code logs on rank 0:
tags ``hfbench.*``, params ``method``/``model``/``dataset``/``sparsity``/``seed``/``epochs``
and ``env.*``, per-epoch metrics (step = epoch) and the ``final_*`` metrics at the last step.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import functools
import html
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit, urlunsplit

from reports import dynamics, flops

__all__ = ["ReportError", "RunRecord", "build_report"]

# The SQLAlchemy tracking store refuses pages larger than this.
_PAGE_SIZE = 50_000

# Columns of results.csv, in order.  The first block is the contract; the rest is extra context.
CSV_COLUMNS = [
    "run_id", "run_hash", "status", "method", "model", "dataset", "seed",
    "target_sparsity", "achieved_sparsity", "test_top1", "val_top1", "epochs",
    "wall_time_s", "error",
    "final_density", "sweep", "run_name", "config_hash", "start_time", "end_time",
    "test_top5", "compression_ratio", "theoretical_speedup", "theoretical_speedup_prunable",
    "dense_macs", "remaining_macs", "epochs_run", "optimizer_steps", "batch_size", "world_size",
    "device_hours", "git_commit", "hardware", "torch", "config_artifact", "rerun_command",
    # the training budget (engine.budget): this run's own, and in total with the run it starts from
    "budget_steps", "budget_images", "budget_epochs", "budget_device_s",
    "budget_total_steps", "budget_total_images", "budget_total_epochs", "budget_total_device_s",
    "budget_parent_counted", "control", "budget_ratio",
]
BUDGET_METRICS = ["budget_steps", "budget_images", "budget_epochs", "budget_device_s", "budget_total_steps",
                  "budget_total_images", "budget_total_epochs", "budget_total_device_s", "budget_parent_counted"]
# a pruning run is compared with a budget-matched dense run whose total budget is within this
# fraction of its own; outside it, the comparison is flagged
BUDGET_TOLERANCE = 0.05

_DENSE = "dense"
_MATCHED = "dense-matched"  # dense controls trained for the pruning runs' total budget


# one colour and marker per method and variant, the same in every plot of a report: the registry
# has more methods than matplotlib's ten default colours, and a colour that followed the methods
# a plot happens to hold would change meaning between plots. The dense control is a black square,
# budget-matched dense controls grey squares; every other label takes, in registry order, the next
# (colour, marker) of a 40-colour qualitative palette crossed with a 13-marker cycle (distinct
# pairs for 520 labels).
_CONTROL_STYLE = ("#000000", "s")
_MATCHED_STYLE = ("#555555", "s")
_MARKERS = ("o", "v", "^", "<", ">", "D", "P", "X", "d", "h", "p", "*", "H")  # 13, coprime with 40


@functools.lru_cache(maxsize=1)
def _colours() -> tuple[str, ...]:
    """tab20's ten dark shades, then its ten light ones, then tab20b shade by shade: neighbours
    in the registry order get different hues first."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    t20 = [to_hex(c) for c in colormaps["tab20"].colors]
    t20b = [to_hex(c) for c in colormaps["tab20b"].colors]
    return tuple(t20[0::2] + t20[1::2] + [c for k in range(4) for c in t20b[k::4]])


def style_labels() -> list[str]:
    """Every report label the registry knows, in palette order: the pruning methods (registry
    order, so they take the strongest colours), then their variants and the other labels their
    declarations name (published, dynamics), sorted."""
    from suite.pruning import registry

    names = registry.pruning_names()
    more: set[str] = set()
    for name in names:
        cls = registry.get(name)
        more |= set(cls.variants) | set(cls.published) | set(cls.dynamics)
    return names + sorted(more - set(names) - {m for m in more if _is_dense(m)})


@functools.lru_cache(maxsize=8)
def _palette(labels: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    colours = _colours()
    return {label: (colours[i % len(colours)], _MARKERS[i % len(_MARKERS)]) for i, label in enumerate(labels)}


def method_style(method: str) -> tuple[str, str]:
    """(colour, marker) of a method or variant; budget-matched dense controls are grey squares,
    labels the registry does not know get a stable colour and marker (by name, not by position)."""
    if method == _DENSE:
        return _CONTROL_STYLE
    if _is_matched(method) or method.startswith(_DENSE):
        return _MATCHED_STYLE
    style = _palette(tuple(style_labels())).get(method)
    if style is not None:
        return style
    import zlib

    h = zlib.crc32(method.encode())
    return (_colours()[h % len(_colours())], _MARKERS[(h // len(_colours())) % len(_MARKERS)])


def _is_matched(method: str) -> bool:
    """A budget-matched dense control; its label carries its plan, e.g. 'dense-matched 85x49'."""
    return method.startswith(_MATCHED)


def _is_dense(method: str) -> bool:
    return method == _DENSE or _is_matched(method)


def _registry_family(label: str) -> str:
    from suite.pruning import registry

    return registry.family(label)


def _family(r: "RunRecord") -> str:
    """The registry method of a run (its variant's family), '' when no registered method claims it."""
    from suite.pruning import registry

    return registry.family(r.base_method) or registry.family(r.method)


def _tracks_target(r: "RunRecord") -> bool:
    """A run of a method that steers along a target density trajectory of its own and says so by
    printing target_density in its epoch line (its `epoch_metrics`): the density plot's runs."""
    from suite.pruning import registry

    fam = _family(r)
    return bool(fam) and fam != registry.CONTROL and "target_density" in registry.get(fam).epoch_metrics


# Statuses that count as "did not finish" in the failed-runs table.
_FAILED_STATUSES = ("FAILED", "KILLED")


class ReportError(ValueError):
    """The experiment cannot be reported on (missing, deleted, or without training runs)."""


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
    metrics: dict[str, float] = field(default_factory=dict)  # latest value of every metric
    params: dict[str, str] = field(default_factory=dict)
    base_method: str = ""  # the registry method (the variant's family, registry.family of the label)
    test_top5: float | None = None
    artifact_uri: str = ""
    # filled in by build_report
    compression_ratio: float | None = None
    theoretical_speedup: float | None = None
    theoretical_speedup_prunable: float | None = None
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
        local = _local_path(self.artifact_uri)
        if local is not None:
            return _portable(f"{local.rstrip('/')}/config.yaml")
        return f"{self.artifact_uri.rstrip('/')}/config.yaml" if self.artifact_uri else ""

    @property
    def rerun_command(self) -> str:
        """One command that retrains exactly this run (same config, so the same run hash)."""
        local = _local_path(self.artifact_uri)
        if local is not None:
            return f"hfbench train {_portable(local.rstrip('/') + '/config.yaml')}"
        if not self.artifact_uri:
            return ""
        return (f"mlflow artifacts download -r {self.run_id} -a config.yaml -d rerun-{self.identity} && "
                f"hfbench train rerun-{self.identity}/config.yaml")

    @property
    def identity(self) -> str:
        # Re-runs of the same config share a run hash; fall back to the run id when absent.
        return self.run_hash or self.run_id


for _k in BUDGET_METRICS:  # results.csv columns read from the run's budget metrics
    setattr(RunRecord, _k, property(lambda self, k=_k: _to_float(self.metrics.get(k))))


# ----------------------------------------------------------------------------------------
# small helpers


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


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:.2f}"


def _fmt_time(ms: int | None) -> str:
    if ms is None:
        return ""
    return _dt.datetime.fromtimestamp(ms / 1000.0, tz=_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _slug(text: str) -> str:
    """A file-name-safe version of a dataset/model name."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return s or "unknown"


def _safe_uri(uri: str) -> str:
    """Drop any user:password part of a tracking URI before printing it."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return uri


def _portable(path: str) -> str:
    """A local path as the report shows it: relative to the folder the report was built from when
    it lies below it (a committed report then names no machine's folders), else unchanged."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return path


def _portable_uri(uri: str) -> str:
    """sqlite:////abs/below/cwd/x.db -> sqlite:///x.db (relative), file:// paths likewise; others as is."""
    for prefix in ("sqlite:///", "file://"):
        if uri.startswith(prefix) and uri[len(prefix):].startswith("/"):
            rel = _portable(uri[len(prefix):])
            if not rel.startswith("/"):
                return ("sqlite:///" if prefix == "sqlite:///" else "") + rel
    return uri


def _local_path(uri: str) -> str | None:
    """The directory of a file:// (or plain path) artifact URI; None for remote stores."""
    if not uri:
        return None
    if uri.startswith("file://"):
        from urllib.parse import unquote

        return unquote(urlsplit(uri).path)
    if uri.startswith("/"):
        return uri
    return None


def _one_line(text: str, limit: int | None = None) -> str:
    s = " ".join(str(text).split())
    if limit is not None and len(s) > limit:
        s = s[: limit - 1] + "…"
    return s


def _sparsity_key(s: float | None) -> float:
    # Target sparsities are parsed from strings like "0.9"; round so that 0.9 and 0.90 group.
    return -1.0 if s is None else round(s, 6)


# ----------------------------------------------------------------------------------------
# reading MLflow


def _resolve_experiment(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None and experiment.isdigit():
        # Accept an experiment id as well, as the MLflow UI shows ids.
        try:
            exp = client.get_experiment(experiment)
        except Exception:  # MlflowException when the id does not exist
            exp = None
    if exp is None:
        raise ReportError(f"MLflow experiment {experiment!r} does not exist")
    if getattr(exp, "lifecycle_stage", "active") == "deleted":
        raise ReportError(f"MLflow experiment {experiment!r} is deleted")
    return exp


def _all_runs(client, experiment_id: str) -> list:
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


def _record_from_run(run) -> RunRecord | None:
    """Parse one MLflow run; None when it is not a training run (no method anywhere)."""
    params = run.data.params
    tags = run.data.tags
    metrics = run.data.metrics  # latest value of every key
    # the variant (a method's named recipe) labels the line; older runs only have the method
    method = tags.get("hfbench.variant") or params.get("method") or tags.get("hfbench.method")
    if not method:
        return None
    if method == _MATCHED:  # one row per control plan: epochs x steps per epoch
        method = f"{_MATCHED} {params.get('epochs', '?')}x{params.get('max_steps_per_epoch', 'None')}".replace(
            "xNone", "xall")
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
        env={k: v for k, v in params.items() if k.startswith("env.")},
        metrics=dict(metrics),
        params=dict(params),
        base_method=params.get("method") or tags.get("hfbench.method") or _registry_family(method) or method,
        # only when the runs log it (the engine logs top-1; nothing is made up here)
        test_top5=_first(_to_float(metrics.get("final_test_top5")), _to_float(metrics.get("test_top5"))),
        artifact_uri=getattr(run.info, "artifact_uri", "") or "",
    )


def _last_per_step(points) -> list[tuple[int, float]]:
    # Keep the last value logged at each step (a resumed run may log a step twice).
    by_step: dict[int, tuple[int, float]] = {}
    for m in points:
        prev = by_step.get(m.step)
        if prev is None or m.timestamp >= prev[0]:
            by_step[m.step] = (m.timestamp, m.value)
    return [(step, v) for step, (_, v) in sorted(by_step.items())]


class Histories:
    """Metric histories of many runs, read in bulk.

    ``prefetch(run_ids, key)`` reads one key for many runs with one query per chunk of runs
    where the store can (the SQLAlchemy store's get_metric_history_bulk), else one
    get_metric_history call per run on a few threads. ``history`` answers from what was
    prefetched and falls back to a single call for anything else."""

    _CHUNK = 500

    def __init__(self, client):
        self.client = client
        self._cache: dict[tuple[str, str], list[tuple[int, float]]] = {}
        store = getattr(getattr(client, "_tracking_client", None), "store", None)
        self._bulk = getattr(store, "get_metric_history_bulk", None)

    def prefetch(self, run_ids: Iterable[str], key: str) -> None:
        ids = [r for r in dict.fromkeys(run_ids) if (r, key) not in self._cache]
        if not ids:
            return
        if self._bulk is not None:
            try:
                for i in range(0, len(ids), self._CHUNK):
                    chunk = ids[i:i + self._CHUNK]
                    got: dict[str, list] = {r: [] for r in chunk}
                    for m in self._bulk(chunk, key, max_results=10_000_000):
                        got[m.run_id].append(m)  # a Metric with run_id
                    for r, pts in got.items():
                        self._cache[(r, key)] = _last_per_step(pts)
                return
            except Exception:  # a store without the bulk query after all: per-run calls
                self._bulk = None
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=8) as pool:
            for r, hist in zip(ids, pool.map(lambda r: _last_per_step(self.client.get_metric_history(r, key)),
                                             ids)):
                self._cache[(r, key)] = hist

    def prefetch_records(self, records: Iterable[RunRecord], key: str) -> None:
        """Prefetch `key` for the runs whose latest metrics have it; the others have no history."""
        have = []
        for r in records:
            if key in r.metrics:
                have.append(r.run_id)
            else:
                self._cache[(r.run_id, key)] = []
        self.prefetch(have, key)

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        if (run_id, key) not in self._cache:
            self._cache[(run_id, key)] = _last_per_step(self.client.get_metric_history(run_id, key))
        return self._cache[(run_id, key)]


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    if isinstance(client, Histories):
        return client.history(run_id, key)
    return _last_per_step(client.get_metric_history(run_id, key))


def _read_artifacts(client, records: list[RunRecord], name: str) -> dict[str, str]:
    """run id -> text of artifact `name` (absent when the run has none): straight from disk
    for a local artifact store, else downloaded on a few threads."""
    out: dict[str, str] = {}
    remote = []
    for r in records:
        local = _local_path(r.artifact_uri)
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


# ----------------------------------------------------------------------------------------
# aggregation


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (Lentz's method)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


@functools.lru_cache(maxsize=4096)
def t975(df: float) -> float:
    """The 0.975 quantile of Student's t with df (> 0, not necessarily whole) degrees of freedom.

    Pure Python (scipy's import alone costs seconds): bisection on the two-sided tail
    P(|T| > t) = I_{df/(df+t^2)}(df/2, 1/2) = 0.05, to 1e-12."""
    lo, hi = 0.0, 1.0
    while _betainc(df / 2.0, 0.5, df / (df + hi * hi)) > 0.05:
        hi *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if _betainc(df / 2.0, 0.5, df / (df + mid * mid)) > 0.05:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12:
            break
    return 0.5 * (lo + hi)


def mean_ci(vals: list[float]) -> tuple[float | None, float | None]:
    """(mean, half-width of the 95 % t confidence interval of the mean); no interval for n < 2."""
    if not vals:
        return None, None
    m = statistics.fmean(vals)
    if len(vals) < 2:
        return m, None
    return m, t975(len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals))


def diff_ci(a: list[float], b: list[float]) -> float | None:
    """Half-width of the 95 % Welch t interval of mean(a) - mean(b). A side with one run adds no
    variance term (its sampling error is unknown); None when both sides have one run."""
    terms, dfs = [], []
    for v in (a, b):
        if len(v) >= 2:
            var_n = statistics.variance(v) / len(v)
            terms.append(var_n)
            dfs.append((var_n, len(v) - 1))
    if not terms:
        return None
    se2 = sum(terms)
    if se2 == 0:
        return 0.0
    df = se2 ** 2 / sum(t ** 2 / d for t, d in dfs)
    return t975(df) * math.sqrt(se2)


@dataclass
class _Row:
    """One line of an accuracy table: a method at one target sparsity, over seeds."""

    method: str
    target: float | None
    achieved: list[float]
    test: list[float]
    seeds: list[int | None]
    top5: list[float] = field(default_factory=list)
    compression: list[float] = field(default_factory=list)
    speedup: list[float] = field(default_factory=list)
    budget: list[float] = field(default_factory=list)  # total training images (budget_total_images)
    budget_incomplete: bool = False  # a run started from a dense run whose budget was not recorded
    check: Any = None  # reports.protocol.Check, filled in by _protocol_tables

    @property
    def n(self) -> int:
        return len(self.test)

    def achieved_mean(self) -> float | None:
        return statistics.fmean(self.achieved) if self.achieved else None

    def test_mean(self) -> float | None:
        return statistics.fmean(self.test) if self.test else None

    def test_std(self) -> float | None:
        return statistics.stdev(self.test) if len(self.test) > 1 else None


def _latest_finished(records: Iterable[RunRecord]) -> list[RunRecord]:
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


def _method_order(method: str) -> tuple[int, str]:
    return (0 if method == _DENSE else 1 if _is_matched(method) else 2, method)


def _group_rows(records: list[RunRecord]) -> list[_Row]:
    groups: dict[tuple[str, float], list[RunRecord]] = defaultdict(list)
    for r in records:
        groups[(r.method, _sparsity_key(r.target_sparsity))].append(r)
    rows = []
    for (method, _), rs in sorted(groups.items(), key=lambda kv: (_method_order(kv[0][0]), kv[0][1])):
        rs.sort(key=lambda r: (r.seed is None, r.seed or 0))
        rows.append(_Row(
            method=method,
            target=rs[0].target_sparsity,
            achieved=[r.achieved_sparsity for r in rs if r.achieved_sparsity is not None],
            test=[r.test_top1 for r in rs if r.test_top1 is not None],
            seeds=[r.seed for r in rs],
            top5=[r.test_top5 for r in rs if r.test_top5 is not None],
            compression=[r.compression_ratio for r in rs
                         if r.compression_ratio is not None and math.isfinite(r.compression_ratio)],
            speedup=[r.theoretical_speedup for r in rs
                     if r.theoretical_speedup is not None and math.isfinite(r.theoretical_speedup)],
            budget=[r.budget_total_images for r in rs if r.budget_total_images and not _uncounted(r)],
            budget_incomplete=any(_uncounted(r) for r in rs),
        ))
    return rows


def _mean(vals: list[float]) -> float | None:
    return statistics.fmean(vals) if vals else None


def _uncounted(r: RunRecord) -> bool:
    """A run that started from the sweep's dense run without that run's budget record (e.g. a
    dense run trained before budgets were logged): its total budget is its own only."""
    return r.params.get("init") == "dense" and r.budget_parent_counted == 0.0


def _closest_budget(b: float, plans: dict[str, float]) -> tuple[str, float, bool]:
    """Among dense plans (label -> mean total budget), the one closest to budget `b` in ratio:
    (label, b / its budget, whether that is within BUDGET_TOLERANCE)."""
    label = min(plans, key=lambda k: abs(math.log(b / plans[k])))
    ratio = b / plans[label]
    return label, ratio, abs(ratio - 1.0) <= BUDGET_TOLERANCE


def _control(row: _Row, rows: list[_Row]) -> tuple[_Row | None, float | None]:
    """The row a pruning row is compared with: the dense row (the short dense run or a
    budget-matched one, same section) whose mean total budget is closest to the row's, if within
    BUDGET_TOLERANCE; otherwise none, with the ratio to the closest."""
    b = _mean(row.budget)
    cands = {d.method: d for d in rows if _is_dense(d.method) and d.budget}
    if b is None or not cands:
        return None, None
    label, ratio, within = _closest_budget(b, {m: _mean(d.budget) for m, d in cands.items()})
    return (cands[label] if within else None), ratio


def _dense_values(rows: list[_Row], attr: str = "test") -> list[float]:
    return [v for row in rows if row.method == _DENSE for v in getattr(row, attr)]


def _dense_reference(rows: list[_Row]) -> float | None:
    vals = _dense_values(rows)
    return statistics.fmean(vals) if vals else None


@dataclass
class _Section:
    dataset: str
    model: str
    rows: list[_Row]
    dense: float | None
    plots: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)
    tables: list = field(default_factory=list)  # reports.dynamics.Table
    has_top5: bool = False
    notes: list[str] = field(default_factory=list)  # under the accuracy table
    published: Any = None  # dynamics.Table, or a sentence when nothing matches
    compute: Any = None  # dynamics.Table
    flagged: int = 0  # protocol cells flagged (reports.protocol)


def _mean_ci_cell(vals: list[float]) -> str:
    m, hw = mean_ci(vals)
    if m is None:
        return "n/a"
    return _pct(m) if hw is None else f"{_pct(m)} ± {_pct(hw)}"


def _ratio_cell(vals: list[float]) -> str:
    return f"{statistics.fmean(vals):.2f}" if vals else "n/a"


def _delta_cell(vals: list[float], dense: list[float], is_dense: bool) -> str:
    if is_dense:
        return "—"  # the reference itself
    if not vals or not dense:
        return "n/a"
    d = 100.0 * (statistics.fmean(vals) - statistics.fmean(dense))
    hw = diff_ci(vals, dense)
    return f"{d:+.2f}" if hw is None else f"{d:+.2f} ± {100.0 * hw:.2f}"


def _has_matched(sec: "_Section") -> bool:
    return any(_is_matched(r.method) for r in sec.rows)


def _table_cells(row: _Row, sec: "_Section") -> list[str]:
    dense_rows = sec.rows
    cells = [row.method, _pct(row.target), _pct(row.achieved_mean()), _ratio_cell(row.compression),
             _ratio_cell(row.speedup), _mean_ci_cell(row.test)]
    if sec.has_top5:
        cells.append(_mean_ci_cell(row.top5))
    cells.append(str(row.n))
    is_dense = _is_dense(row.method)
    control, ratio = (None, None) if is_dense else _control(row, sec.rows)
    if is_dense:
        cells.append("—")
    elif row.budget_incomplete:
        cells.append("n/a (dense start's budget not recorded)")
    else:
        cells.append("n/a" if ratio is None else f"{ratio:.2f}")
    if _has_matched(sec):
        if is_dense:
            cells.append("—")
        elif control is None:
            cells.append("n/a (no dense run of this budget)")
        else:
            cells.append(_delta_cell(row.test, control.test, False) + ("" if control.method == _DENSE
                                                                       else f" ({control.method})"))
    cells.append(_delta_cell(row.test, _dense_values(dense_rows), row.method == _DENSE))
    if sec.has_top5:
        cells.append(_delta_cell(row.top5, _dense_values(dense_rows, "top5"), row.method == _DENSE))
    cells.append("—" if row.check is None else ("flagged: " + "; ".join(row.check.flags)) if row.check.flags
                 else "ok")
    return cells


def _table_header(sec: "_Section") -> list[str]:
    h = ["Method", "Target sparsity (%)", "Achieved sparsity (%)", "Compression (×)",
         "Theoretical speed-up (×)", "Test top-1 (%)"]
    if sec.has_top5:
        h.append("Test top-5 (%)")
    h += ["n"]
    if _has_matched(sec):
        h += ["Budget (× control)", "Δ top-1 vs equal-budget dense (pp)", "Δ top-1 vs short dense (pp)"]
    else:
        h += ["Budget (× dense)", "Δ top-1 vs dense (pp)"]
    if sec.has_top5:
        h.append("Δ top-5 vs dense (pp)")
    h.append("Protocol")
    return h


_ACC_NOTE = ("Top-1 (and top-5) are the mean ± half-width of the 95 % t confidence interval over seeds "
             "(n runs; a bare mean when n = 1). Budget = the run's total training images (its own and "
             "those of the run it starts from, logged as budget_total_images) over those of the dense "
             "run closest in budget: the short dense run or a budget-matched one (dense-matched EPOCHSxSTEPS: "
             "a dense run trained for the pruning runs' total budget, grid.budget_matched_dense). Within 5 % "
             "it is the equal-budget control; Δ vs equal-budget dense compares at equal training, Δ vs short "
             "dense also credits the method with its extra training. "
             "Δ vs dense is in percentage points against the mean of "
             "the dense runs, ± the half-width of the 95 % Welch t interval of the difference (a side with "
             "one run contributes no variance; none when both have one run). Compression = prunable "
             "weights / remaining prunable weights. Theoretical speed-up = dense MACs / remaining MACs per "
             "image: each prunable Conv2d counts out_h × out_w × numel(weight), each prunable Linear "
             "tokens × numel(weight) (tokens = 1 for a flat input), scaled by the layer's density from the "
             "run's layer_density.csv; the non-prunable Conv2d / Linear layers are counted dense; attention "
             "matmuls, norms, activations and pooling are excluded. Output sizes come from a forward-hook "
             "pass on the registry model at the dataset's input size.")
_FAILED_HEADER = ["Run", "Method", "Target sparsity (%)", "Seed", "Status", "Later finished", "Error"]


# ----------------------------------------------------------------------------------------
# plots (object-oriented matplotlib API: no pyplot, so no global backend or figure registry)


def _new_figure(size=(7.0, 4.5)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Fixed margins: constrained layout measures every text artist and dominated the build time.
    fig = Figure(figsize=size, dpi=110)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.92)
    FigureCanvasAgg(fig)
    return fig


# The x axis of the accuracy plot is -log10(1 - sparsity): equal steps for 90 %, 99 %, 99.9 %.
_SPARSITY_CAP = 1.0 - 1e-6
_TICK_SPARSITIES = [0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999,
                    0.99999]


def _log_x(s: float) -> float:
    return -math.log10(1.0 - min(max(s, 0.0), _SPARSITY_CAP))


def _tick_label(s: float) -> str:
    return f"{round(100.0 * s, 4):g}%"


def _plot_accuracy(section: _Section, path: Path, records: list[RunRecord]) -> None:
    fig = _new_figure()
    ax = fig.add_subplot()
    by_method: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        if not _is_dense(r.method) and r.achieved_sparsity is not None and r.test_top1 is not None:
            by_method[r.method].append(r)

    xs_all: list[float] = []
    any_band = False
    for i, method in enumerate(sorted(by_method)):
        groups: dict[float, list[RunRecord]] = defaultdict(list)
        for r in by_method[method]:
            groups[_sparsity_key(r.target_sparsity)].append(r)
        pts = []
        for rs in groups.values():
            x = _log_x(statistics.fmean(r.achieved_sparsity for r in rs))
            mean, hw = mean_ci([100.0 * r.test_top1 for r in rs])
            pts.append((x, mean, hw, len(rs)))
        pts.sort()
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        ns = sorted({p[3] for p in pts})
        xs_all += xs
        colour, mk = method_style(method)
        n_txt = f"n={ns[0]}" if len(ns) == 1 else f"n={ns[0]}–{ns[-1]}"
        ax.plot(xs, ys, marker=mk, color=colour, label=f"{method} ({n_txt})")
        band = [(x, y - hw, y + hw) for x, y, hw, _ in pts if hw is not None]
        any_band = any_band or bool(band)
        if len(band) >= 2:
            ax.fill_between([b[0] for b in band], [b[1] for b in band], [b[2] for b in band],
                            color=colour, alpha=0.18, linewidth=0)
        elif band:  # a single point with seeds: an error bar instead of a band
            x, lo, hi = band[0]
            ax.errorbar([x], [(lo + hi) / 2], yerr=[[(hi - lo) / 2]], color=colour, capsize=3)

    if section.dense is not None:
        ax.axhline(100.0 * section.dense, color="black", linestyle="--", linewidth=1.2,
                   label=f"dense ({_pct(section.dense)}%)")
    plans: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if _is_matched(r.method) and r.test_top1 is not None:
            plans[r.method].append(r.test_top1)
    for label, vals in sorted(plans.items()):
        m = statistics.fmean(vals)
        ax.axhline(100.0 * m, color="dimgray", linestyle=":", linewidth=1.4, label=f"{label} ({_pct(m)}%)")

    if xs_all:
        lo_x, hi_x = min(xs_all), max(xs_all)
    else:
        lo_x, hi_x = 0.0, 1.0
    ticks = [s for s in _TICK_SPARSITIES if lo_x - 0.15 <= _log_x(s) <= hi_x + 0.15]
    if len(ticks) < 2:
        ticks = [0.0, 0.9, 0.99]
    ax.set_xticks([_log_x(s) for s in ticks], [_tick_label(s) for s in ticks])
    pad = max(0.1, 0.05 * (hi_x - lo_x))
    ax.set_xlim(min(lo_x, _log_x(ticks[0])) - pad, max(hi_x, _log_x(ticks[-1])) + pad)
    ax.set_xlabel("achieved sparsity (log scale in 1 − sparsity)")
    ax.set_ylabel("test top-1 (%)")
    seeds_note = "mean over seeds, band: 95 % t CI" if any_band else "one run per point, n=1, no band"
    ax.set_title(f"{section.dataset} / {section.model}: accuracy vs sparsity ({seeds_note})",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")  # accuracy falls with sparsity: lower left is free
    fig.savefig(path)


def _plot_density(section: _Section, path: Path,
                  curves: list[tuple[RunRecord, list[tuple[int, float]], list[tuple[int, float]]]]) -> None:
    fig = _new_figure()
    ax = fig.add_subplot()
    targets = sorted({_sparsity_key(r.target_sparsity) for r, _, _ in curves})
    palette = [f"C{i % 10}" for i in range(len(targets))]
    colour = dict(zip(targets, palette))
    labelled_measured: set[float] = set()
    drawn_target: set[float] = set()
    for rec, measured, target in sorted(curves, key=lambda c: (_sparsity_key(c[0].target_sparsity),
                                                               c[0].seed or 0)):
        key = _sparsity_key(rec.target_sparsity)
        name = _pct(rec.target_sparsity) + "% sparsity"
        pos_measured = [(s, 100.0 * v) for s, v in measured if v > 0]
        if pos_measured:
            ax.plot(*zip(*pos_measured), color=colour[key], linewidth=1.4, alpha=0.9,
                    label=None if key in labelled_measured else f"measured, target {name}")
            labelled_measured.add(key)
        # The target trajectory is the same for every seed: draw it once per target.
        pos_target = [(s, 100.0 * v) for s, v in target if v > 0]
        if pos_target and key not in drawn_target:
            ax.plot(*zip(*pos_target), color=colour[key], linestyle="--", linewidth=1.2,
                    label=f"target trajectory, {name}")
            drawn_target.add(key)
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"{y:g}%"))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # A fixed corner: with one line per run, matplotlib's "best" placement search dominates
    # the plotting time.  Densities fall over training, so the lower left is usually empty.
    _finish(fig, ax, path, "epoch", "density (% of prunable weights)",
            f"{section.dataset} / {section.model}: density per epoch ({_label_list(curves)})", "lower left")


def _label_list(curves) -> str:
    """The methods (report labels) of the density curves, for a title."""
    return ", ".join(sorted({c[0].method for c in curves}, key=_method_order))


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend_loc: str) -> None:
    """Labels, grid, a legend in a fixed corner, saved."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc=legend_loc)
    fig.savefig(path)


# ----------------------------------------------------------------------------------------
# published numbers, compute, overhead benchmark


def _published_table(sec: _Section, table: list, inits: dict[str, str] | None = None) -> Any:
    """Published rows like for like with each suite row; `inits`: method -> the runs' start
    (init param), when all its runs share one."""
    from reports import published

    rows = []
    for row in sec.rows:
        if row.method == _DENSE:
            continue
        for p in published.matches(sec.dataset, sec.model, row.method, row.target, table,
                                   (inits or {}).get(row.method)):
            pub_delta = "n/a" if p.dense_top1 is None else f"{p.top1 - p.dense_top1:+.2f}"
            rows.append([row.method, _pct(row.target), _mean_ci_cell(row.test), str(row.n),
                         p.method, f"{100 * p.sparsity:.2f}", f"{p.top1:.2f}",
                         "n/a" if p.dense_top1 is None else f"{p.dense_top1:.2f}", pub_delta,
                         p.training, p.source])
    apart = published.unmatched_note(r.method for r in sec.rows)
    if not rows:
        return (f"No published number matches {sec.dataset} / {sec.model} for these methods and "
                f"sparsities. " + published.mapping_note() + apart)
    return dynamics.Table(
        "Published numbers (published, not measured here) next to this suite's",
        ["suite method", "target %", "suite top-1 % (95 % CI)", "n", "published method",
         "published sparsity %", "published top-1 %", "published dense top-1 %",
         "published Δ vs dense (pp)", "published training", "source"],
        rows, published.mapping_note() + apart, numeric={1, 2, 3, 5, 6, 7, 8}, kind="published")


def _overhead(client) -> dict | None:
    """The latest FINISHED run of experiment "bench" with step_ratio.<method> metrics:
    {"run_id", "params", "step": {method: (ratio, q1, q3)}, "mem": {method: ratio}}."""
    try:
        exp = client.get_experiment_by_name("bench")
        if exp is None:
            return None
        runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  max_results=200, order_by=["attributes.start_time DESC"])
    except Exception:
        return None
    for run in runs:
        m = run.data.metrics
        step = {k.split(".", 1)[1]: (v, m.get(f"step_ratio_q1.{k.split('.', 1)[1]}"),
                                     m.get(f"step_ratio_q3.{k.split('.', 1)[1]}"))
                for k, v in m.items() if k.startswith("step_ratio.")}
        if step:
            mem = {k.split(".", 1)[1]: v for k, v in m.items() if k.startswith("mem_ratio.")}
            return {"run_id": run.info.run_id, "params": dict(run.data.params), "step": step, "mem": mem}
    return None


def _range(vals: list[float], fmt: str) -> str:
    if not vals:
        return "n/a"
    lo, hi = min(vals), max(vals)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{format(lo, fmt)}–{format(hi, fmt)}"


def _compute_table(recs: list[RunRecord], bench: dict | None) -> Any:
    dense = [r.samples for r in recs if r.method == _DENSE and r.samples]
    dense_samples = statistics.fmean(dense) if dense else None
    by_method: dict[str, list[RunRecord]] = defaultdict(list)
    for r in recs:
        by_method[r.method].append(r)
    rows = []
    for method in sorted(by_method, key=_method_order):
        rs = by_method[method]
        mult = [r.samples / dense_samples for r in rs if r.samples and dense_samples]
        walls = [r.wall_time_s for r in rs if r.wall_time_s is not None]
        dh = [r.device_hours for r in rs if r.device_hours is not None]
        from_dense = sorted({r.params.get("init", "") for r in rs} - {""})
        base = rs[0].base_method
        st = (bench or {}).get("step", {}).get(base)
        mem = (bench or {}).get("mem", {}).get(base)
        if bench is None:
            st_cell = mem_cell = "no overhead benchmark run"
        else:
            st_cell = "n/a" if st is None else (
                f"{st[0]:.3f}" + (f" [IQR {st[1]:.3f}, {st[2]:.3f}]" if st[1] is not None and st[2] is not None
                                  else ""))
            mem_cell = "n/a" if mem is None else f"{mem:.3f}"
        rows.append([method, str(len(rs)), _range([float(r.epochs) for r in rs if r.epochs is not None], ".0f"),
                     _range(mult, ".2f"), _range(mult, ".2f"),
                     "n/a" if not walls else f"{statistics.fmean(walls):.1f}",
                     "n/a" if not dh else f"{sum(dh):.3f}", ", ".join(from_dense) or "-", st_cell, mem_cell])
    note = ("Steps multiple = optimiser steps × global batch (batch_size × world size) of a run over the mean "
            "of the dense runs' (for IMP the epochs are (levels + 1) × epochs_per_level). Dense-equivalent "
            "FLOPs multiple = the steps multiple: in this suite pruned weights are masked, so every step "
            "still computes the dense layers. Runs that start from the dense model (init: dense) count only "
            "their own steps: add the dense run (1×) for the full cost. Wall time is the mean per run; "
            "device-hours = wall_time_s × env.world_size / 3600, summed over the runs. ")
    if bench is None:
        note += "Step-time and peak-memory ratios: no overhead benchmark run (MLflow experiment 'bench')."
    else:
        p = bench["params"]
        note += (f"Step-time and peak-memory ratios (method / dense) from overhead benchmark run "
                 f"{bench['run_id']} (model {p.get('model', '?')}, device {p.get('device', '?')}, "
                 f"batch {p.get('batch', '?')}); median over rounds with IQR.")
    return dynamics.Table("Compute", ["method", "runs", "epochs", "steps × batch vs dense (×)",
                                      "dense-equivalent FLOPs (×)", "wall time per run (s)", "device-hours",
                                      "init", "step-time ratio (bench)", "peak-memory ratio (bench)"],
                          rows, note, numeric={1, 2, 3, 4, 5, 6}, kind="compute")


# ----------------------------------------------------------------------------------------
# writers


def _add_controls(records: list[RunRecord]) -> None:
    """Each finished pruning run's control and budget ratio (results.csv): among the dense runs of
    its model and dataset (the short one and each budget-matched plan), the one whose mean total
    budget is closest to the run's; it is the control when within BUDGET_TOLERANCE."""
    fin = _latest_finished(records)
    for r in fin:
        b = r.budget_total_images
        if _is_dense(r.method) or not b:
            continue
        if _uncounted(r):
            r.control = "none: the dense run it starts from has no budget record (its total counts this run only)"
            continue
        plans: dict[str, list[float]] = defaultdict(list)
        for x in fin:
            if (x.dataset, x.model) == (r.dataset, r.model) and _is_dense(x.method) and x.budget_total_images:
                plans[x.method].append(x.budget_total_images)
        if not plans:
            continue
        label, r.budget_ratio, within = _closest_budget(b, {k: statistics.fmean(v) for k, v in plans.items()})
        r.control = label if within else f"none within {100 * BUDGET_TOLERANCE:g} % (closest: {label})"


def _row_runs(row: _Row, recs: list[RunRecord]) -> list[RunRecord]:
    return [r for r in recs if r.method == row.method and _sparsity_key(r.target_sparsity) == _sparsity_key(row.target)]


def _protocol_tables(sec: "_Section", recs: list[RunRecord]) -> list:
    """The protocol check, the paired comparisons with their calls and the ranking per target,
    and the accuracy at each target read off each method's own curve (reports.protocol)."""
    from reports import protocol as P
    from reports.dynamics import Table

    checks, comps, targets = [], [], sorted({r.target for r in sec.rows if not _is_dense(r.method) and r.target})
    for row in sec.rows:
        if _is_dense(row.method):
            continue
        control, ratio = _control(row, sec.rows)
        mine = _row_runs(row, recs)
        ctl_runs = _row_runs(control, recs) if control else [r for r in recs if r.method == _DENSE]
        row.check = P.check_cell(row.method, row.target, mine, ctl_runs, None if row.budget_incomplete else ratio)
        checks.append(row.check)
        if control is None:
            comps.append(P.Comparison(row.method, row.target, "none of equal budget", 0, call="n/a (no equal-budget control)"))
            continue
        n, d, hw, p = P.paired({r.seed: r.test_top1 for r in mine if r.test_top1 is not None},
                               {r.seed: r.test_top1 for r in ctl_runs if r.test_top1 is not None})
        comps.append(P.Comparison(row.method, row.target, control.method, n, d, hw, p))
    P.holm(comps)
    sec.flagged = sum(1 for c in checks if c.flags)
    tables = []
    if checks:
        tables.append(Table(
            "Protocol", ["method", "target %", "seeds", "budget (× control)", "achieved − target (pp)",
                         "snap (pp)", "shared settings that differ from the control", "flags"],
            [[c.method, _pct(c.target), str(c.seeds), "n/a" if c.budget_ratio is None else f"{c.budget_ratio:.2f}",
              "n/a" if c.miss_pp is None else f"{c.miss_pp:+.2f}",
              "—" if c.snap_pp is None else f"{c.snap_pp:.2f}", "; ".join(c.differs) or "none",
              "; ".join(c.flags) or "ok"] for c in checks],
            note=(f"A cell is flagged when its total training budget is outside {P.BUDGET_RANGE[0]}-"
                  f"{P.BUDGET_RANGE[1]} of its control's, its achieved sparsity is more than {P.TARGET_MISS_PP:g} pp "
                  f"from the target in any run, it has fewer than {P.MIN_SEEDS} seeds, or a shared setting ({', '.join(P.SHARED)}) "
                  f"differs from its control's. Flagged cells: {sec.flagged} of {len(checks)}. Snap: for the "
                  "methods whose sparsity follows a calibrated knob and that snap to the target (their runs log "
                  "snap_pp), the mean size in sparsity points of the move that closed, at the end of the search, the "
                  "gap the knob left to the target, by one global scalar of the method's own mask rule (the "
                  "method's snap_pp option; the gap itself is logged per run as snap_gap_pp; '—': not such a "
                  "method)."),
            kind="protocol"))
    methods_table = _methods_table(sec, recs)
    if methods_table is not None:
        tables.append(methods_table)
    conv = _convergence(sec, recs)
    if conv is not None:
        tables.append(conv)
    if comps:
        by_target: dict[float, list] = defaultdict(list)
        for c in comps:
            by_target[_sparsity_key(c.target)].append(c)
        rank_rows = []
        row_of = {(r.method, _sparsity_key(r.target)): r for r in sec.rows}
        for t in sorted(by_target):
            ranked, missed = [], []
            for c in by_target[t]:
                row = row_of[(c.method, t)]
                miss = row.check.worst_pp
                (missed if miss is not None and abs(miss) > P.EQUAL_SPARSITY_PP else ranked).append((row, c))
            ranked.sort(key=lambda rc: -(rc[0].test_mean() or 0.0))
            for i, (row, c) in enumerate(ranked, 1):
                rank_rows.append([_pct(t), str(i), c.method, _mean_ci_cell(row.test), c.control,
                                  "n/a" if c.diff is None else f"{100 * c.diff:+.2f}"
                                  + ("" if c.ci is None else f" ± {100 * c.ci:.2f}"),
                                  "n/a" if c.p_holm is None else f"{c.p_holm:.3g}", c.call])
            for row, c in missed:
                rank_rows.append([_pct(t), "—", c.method, f"missed (achieved {_pct(row.achieved_mean())} %)",
                                  c.control, "—", "—", "not ranked"])
        tables.append(Table(
            "Ranking per target sparsity", ["target %", "rank", "method", "test top-1 (%)", "control",
                                            "paired Δ vs control (pp)", "p (Holm)", "call"], rank_rows,
            note=(f"Methods whose every run is within {P.EQUAL_SPARSITY_PP:g} pp of the target, by mean test top-1. Δ is paired by "
                  "seed (the same seed shares the dense start) against the equal-budget dense control, with a "
                  "95 % t interval; p from the paired t test, Holm-corrected over every comparison of this "
                  f"section (alpha {P.ALPHA:g}); better / worse only where the corrected test rejects."),
            kind="ranking"))
    methods = sorted({r.method for r in sec.rows if not _is_dense(r.method)}, key=_method_order)
    if comps and methods and targets:
        tables.insert(0, _summary_grid(sec, comps, methods, targets))
    if methods and targets:
        interp_rows = []
        for m in methods:
            pts = [(r.achieved_sparsity, r.test_top1) for r in recs
                   if r.method == m and r.achieved_sparsity is not None and r.test_top1 is not None]
            vals = [P.interpolate_at(pts, t) for t in targets]
            interp_rows.append([m] + ["—" if v is None else f"{_pct(v)} (interpolated)" for v in vals])
        tables.append(Table(
            "Accuracy at each target, read off each method's curve", ["method"] + [f"{_pct(t)} %" for t in targets],
            interp_rows,
            note=("Monotone cubic (PCHIP) interpolation of mean test top-1 against achieved sparsity, in "
                  "log(1 − sparsity), through each method's own points; '—' where the target lies outside "
                  "the sparsities the method reached (never extrapolated)."),
            kind="interpolated"))
    return tables


def _methods_table(sec: "_Section", recs: list[RunRecord]):
    """Which mode of each method ran, from what start, for how long, and how it reached its
    sparsity (the calibrated knob, the snap, a reference recipe), read from the runs' params by
    each method's `recipe`."""
    from reports.dynamics import Table
    from suite.pruning import registry

    rows = []
    for m in sorted({r.method for r in recs if not _is_dense(r.method)}, key=_method_order):
        rs = [r for r in recs if r.method == m and r.status == "FINISHED"]
        if not rs:
            continue
        # the method's own sentence, from this run's logged params (Pruner.recipe)
        fam = _family(rs[0])
        how = registry.get(fam).recipe(rs[0].params, m) if fam else "see its module's docstring"
        inits = sorted({r.params.get("init", "?") for r in rs})
        epochs = sorted({r.epochs for r in rs if r.epochs is not None})
        rows.append([m, ", ".join(inits), ", ".join(map(str, epochs)), how])
    if not rows:
        return None
    return Table("Methods in this section", ["method", "start", "epochs", "how it reaches its sparsity"], rows,
                 note=("From the runs' own params. 'exact': the method prunes to the target by construction; the "
                       "others are steered or left to their knob as said. Each method's formulas and its "
                       "differences from its paper: docs/baselines.md and docs/hyperflux.md."),
                 kind="methods")


def _summary_grid(sec: "_Section", comps: list, methods: list[str], targets: list[float]):
    """The answer first: test top-1 per method (rows) and target sparsity (columns), mean ± 95 %
    half-width; ★ marks the best mean among the methods that met the target (within 0.5 pp),
    ▲ / ▼ a difference from the equal-budget dense control that survives the Holm correction;
    a cell whose run missed its target says so instead of giving a number to compare."""
    from reports import protocol as P
    from reports.dynamics import Table

    row_of = {(r.method, _sparsity_key(r.target)): r for r in sec.rows}
    call_of = {(c.method, _sparsity_key(c.target)): c.call for c in comps}
    best: dict[float, str] = {}
    for t in targets:
        ok = [(row_of[(m, _sparsity_key(t))].test_mean(), m) for m in methods if (m, _sparsity_key(t)) in row_of
              and row_of[(m, _sparsity_key(t))].check is not None
              and row_of[(m, _sparsity_key(t))].check.worst_pp is not None
              and abs(row_of[(m, _sparsity_key(t))].check.worst_pp) <= P.EQUAL_SPARSITY_PP
              and row_of[(m, _sparsity_key(t))].test_mean() is not None]
        if ok:
            best[_sparsity_key(t)] = max(ok)[1]
    rows = []
    for m in methods:
        cells = [m]
        for t in targets:
            row = row_of.get((m, _sparsity_key(t)))
            if row is None:
                cells.append("—")
                continue
            miss = row.check.worst_pp if row.check is not None else None
            if miss is not None and abs(miss) > P.EQUAL_SPARSITY_PP:
                cells.append(f"missed ({_pct(row.achieved_mean())} %)")
                continue
            call = call_of.get((m, _sparsity_key(t)), "")
            mark = " ▲" if call == "better" else " ▼" if call == "worse" else ""
            star = " ★" if best.get(_sparsity_key(t)) == m else ""
            cells.append(_mean_ci_cell(row.test) + mark + star)
        rows.append(cells)
    controls = "; ".join(f"{r.method} {_mean_ci_cell(r.test)} %" for r in sec.rows if _is_dense(r.method))
    return Table("Summary: test top-1 (%) by method and target sparsity",
                 ["method"] + [f"{_pct(t)} %" for t in targets], rows,
                 note=("Mean ± 95 % t half-width over seeds. ★ best mean among the methods whose every run "
                       f"is within {P.EQUAL_SPARSITY_PP:g} pp of the target; ▲ / ▼ better / worse than the equal-budget dense "
                       "control, paired by seed, Holm-corrected (no mark: no difference the test can show, or "
                       "too few seeds); 'missed' when a run ended more than "
                       f"{P.EQUAL_SPARSITY_PP:g} pp from the target. Dense controls: {controls or 'none'}."),
                 numeric=set(range(1, len(targets) + 1)), kind="summary")


def _convergence(sec: "_Section", recs: list[RunRecord]):
    """The dense convergence check: each budget-matched dense plan of about twice the dense
    start's budget (grid.dense_convergence), its paired gain over the dense start. None when the
    section has no such plan."""
    from reports import protocol as P
    from reports.dynamics import Table

    short = next((r for r in sec.rows if r.method == _DENSE), None)
    if short is None or not short.budget:
        return None
    rows = []
    for row in sec.rows:
        if not _is_matched(row.method) or not row.budget:
            continue
        ratio = _mean(row.budget) / _mean(short.budget)
        if not P.DOUBLED[0] <= ratio <= P.DOUBLED[1]:
            continue
        c = P.convergence({r.seed: r.test_top1 for r in _row_runs(short, recs) if r.test_top1 is not None},
                          {r.seed: r.test_top1 for r in _row_runs(row, recs) if r.test_top1 is not None},
                          row.method, ratio)
        gain = "n/a" if c.gain is None else f"{100 * c.gain:+.2f}" + ("" if c.ci is None else f" ± {100 * c.ci:.2f}")
        verdict = "n/a" if c.converged is None else (
            f"converged (gain < {P.CONVERGED_PP:g} pp)" if c.converged
            else f"not converged (gain ≥ {P.CONVERGED_PP:g} pp): the dense start is undertrained")
        rows.append([row.method, f"{ratio:.2f}", str(c.n_pairs), _mean_ci_cell(short.test), _mean_ci_cell(row.test),
                     gain, verdict])
    if not rows:
        return None
    return Table("Dense convergence", ["longer dense run", "budget (× dense start)", "paired seeds",
                                       "dense start top-1 (%)", "longer run top-1 (%)", "gain (pp)", "verdict"],
                 rows, note=("A pruning method compared with an undertrained dense model is credited with the "
                             "dense model's missing training. The dense start counts as converged when a dense "
                             f"run of twice its budget (grid.dense_convergence) gains less than {P.CONVERGED_PP:g} "
                             "pp of test top-1 on average over the seeds (paired by seed, 95 % t interval)."),
                 kind="convergence")


def _layer_target(recs: list[RunRecord]) -> float | None:
    """The target the per-layer view shows: 90 % when runs have it, else the highest target that
    at least two methods reached with layer counts."""
    by: dict[float, set[str]] = defaultdict(set)
    for r in recs:
        if not _is_dense(r.method) and r.layer_counts and r.target_sparsity:
            by[_sparsity_key(r.target_sparsity)].add(r.method)
    ok = [t for t, ms in by.items() if len(ms) >= 2]
    if not ok:
        return None
    return 0.9 if 0.9 in ok else max(ok)


def _plot_layers(section: "_Section", path: Path, recs: list[RunRecord], target: float) -> None:
    """Density of each prunable layer per method at one target (mean over seeds): how each method
    spreads the same budget over the layers."""
    import numpy as np

    by: dict[str, list[list[dict]]] = defaultdict(list)
    for r in recs:
        if not _is_dense(r.method) and r.layer_counts and _sparsity_key(r.target_sparsity) == target:
            by[r.method].append(r.layer_counts)
    methods = sorted(by, key=_method_order)
    layers = [row["layer"] for row in by[methods[0]][0]]
    fig = _new_figure()
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    x = np.arange(len(layers))
    for i, m in enumerate(methods):
        dens = [statistics.fmean(c[j]["nonzero"] / max(c[j]["numel"], 1) for c in by[m] if j < len(c))
                for j in range(len(layers))]
        colour, _ = method_style(m)
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, [100 * d for d in dens], width, color=colour, label=m)
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
    ax.set_xticks(x, layers, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("density of the layer (%, log scale)")
    ax.set_title(f"{section.dataset} / {section.model}: density per layer at {_pct(target)} % sparsity")
    ax.legend(fontsize=7, ncol=2)
    fig.subplots_adjust(bottom=0.22, left=0.12)
    fig.savefig(path)


def _plot_cost(section: "_Section", path: Path, records: list[RunRecord]) -> None:
    """Test top-1 against total training budget (dense-equivalent epochs), one point per run."""
    fig = _new_figure()
    ax = fig.add_subplot()
    by: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.test_top1 is not None and r.budget_total_epochs:
            by[r.method].append(r)
    for i, (m, rs) in enumerate(sorted(by.items(), key=lambda kv: _method_order(kv[0]))):
        colour, marker = method_style(m)
        ax.scatter([r.budget_total_epochs for r in rs], [100.0 * r.test_top1 for r in rs], s=22, marker=marker,
                   color=colour, label=m)
    ax.set_xscale("log")
    _finish(fig, ax, path, "total training budget (dense-equivalent epochs, including the run it starts from)",
            "test top-1 (%)", f"{section.dataset} / {section.model}: accuracy against training cost", "lower right")


def _write_csv(path: Path, records: list[RunRecord]) -> None:
    def cell(v: Any) -> Any:
        if v is None:
            return ""
        if isinstance(v, float):
            return repr(v)  # full precision, round-trips
        return v

    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        for r in records:
            row = {
                **{c: getattr(r, c) for c in CSV_COLUMNS if c not in ("start_time", "end_time")},
                "start_time": _fmt_time(r.start_time),
                "end_time": _fmt_time(r.end_time),
            }
            w.writerow([cell(row[c]) for c in CSV_COLUMNS])


def _env_summary(records: list[RunRecord]) -> list[tuple[str, str]]:
    """Each env.* param with its value, or its distinct values with run counts if they differ."""
    values: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in records:
        for k, v in r.env.items():
            values[k][v] += 1
    out = []
    for k in sorted(values):
        vs = values[k]
        if len(vs) == 1:
            out.append((k, next(iter(vs))))
        else:
            out.append((k, "; ".join(f"{v} ({n} runs)" for v, n in sorted(vs.items(), key=lambda x: -x[1]))))
    return out


@dataclass
class _Content:
    """Everything both renderers (Markdown and HTML) show, computed once."""

    title: str
    experiment: str
    experiment_id: str
    tracking_uri: str
    generated: str
    counts: dict[str, int]
    sweeps: list[str]
    env: list[tuple[str, str]]
    sections: list[_Section]
    failed: list[list[str]]


def _md_escape(text: str) -> str:
    return _one_line(text).replace("\\", "\\\\").replace("|", "\\|")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return lines


def _counts_line(counts: dict[str, int]) -> str:
    parts = [f"{n} {status.lower()}" for status, n in sorted(counts.items())]
    return f"{sum(counts.values())} training runs ({', '.join(parts)})"


def _render_md(c: _Content) -> str:
    out = [f"# {c.title}", ""]
    out.append(f"Experiment `{c.experiment}` (id {c.experiment_id}) at `{c.tracking_uri}`, "
               f"generated {c.generated}.")
    out.append("")
    out.append(_counts_line(c.counts) + ".")
    if c.sweeps:
        out.append(f"Sweeps: {', '.join(f'`{s}`' for s in c.sweeps)}.")
    out += [""]
    out += ["## Results", "", _ACC_NOTE, "",
            "Reproduce any point: results.csv has one row per run with its run hash, config hash, git "
            "commit, hardware, the run's config.yaml artifact and the command that retrains it "
            "(`hfbench train <config.yaml>`).", ""]
    for s in c.sections:
        out += [f"### {s.dataset} / {s.model}", ""]
        summary = [t for t in s.tables if getattr(t, "kind", "") == "summary"]
        for t in summary:  # the answer first
            out += [f"#### {t.title}", ""] + _md_table(t.header, t.rows) + ["", t.note, ""]
        out += _md_table(_table_header(s), [_table_cells(r, s) for r in s.rows])
        out.append("")
        out += [n for note in s.notes for n in (note, "")]
        for name, caption in s.plots:
            out += [f"![{caption}]({name})", ""]
        tables = [t for t in (s.published, s.compute) if t is not None] + [t for t in s.tables if t not in summary]
        for t in tables:
            if isinstance(t, str):
                out += ["#### Published numbers", "", t, ""]
                continue
            out += [f"#### {t.title}", ""] + _md_table(t.header, t.rows) + [""]
            if t.note:
                out += [t.note, ""]
    if not c.sections:
        out += ["No run finished.", ""]
    out += ["## Failed runs", ""]
    if c.failed:
        out += _md_table(_FAILED_HEADER, c.failed)
    else:
        out.append("None.")
    out.append("")
    plots = [(n, cap) for s in c.sections for n, cap in s.plots]
    if plots:
        out += ["## Plots", ""]
        out += [f"- [{cap}]({n})" for n, cap in plots]
        out.append("")
    out += ["## Environment", ""]
    if c.env:
        out += [f"- `{k}`: {_md_escape(v)}" for k, v in c.env]
    else:
        out.append("No `env.*` parameters were logged.")
    out.append("")
    return "\n".join(out)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto;
       max-width: 70em; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { border-bottom: 2px solid #ccc; padding-bottom: .2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .8em 0 1.2em; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .7em; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #fafafa; }
code { background: #f4f4f4; padding: 0 .25em; border-radius: 3px; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #e4e4e4; }
figcaption { font-size: .85em; color: #555; }
td.err { font-family: ui-monospace, monospace; font-size: .85em; max-width: 40em; }
"""


def _html_table(header: list[str], rows: list[list[str]], numeric: set[int], err_col: int | None = None,
                kind: str = "") -> str:
    e = html.escape
    parts = [f'<table data-kind="{e(kind)}">' if kind else "<table>", "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            cls = ' class="num"' if i in numeric else (' class="err"' if i == err_col else "")
            cells.append(f"<td{cls}>{e(v)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)


def _render_html(c: _Content, images: dict[str, bytes]) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{e(c.title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
           f"<h1>{e(c.title)}</h1>",
           f"<p>Experiment <code>{e(c.experiment)}</code> (id {e(c.experiment_id)}) at "
           f"<code>{e(c.tracking_uri)}</code>, generated {e(c.generated)}.</p>",
           f"<p>{e(_counts_line(c.counts))}.</p>"]
    if c.sweeps:
        out.append("<p>Sweeps: " + ", ".join(f"<code>{e(s)}</code>" for s in c.sweeps) + ".</p>")
    out += ["<h2>Results</h2>", f"<p>{e(_ACC_NOTE)}</p>",
            "<p>Reproduce any point: results.csv has one row per run with its run hash, config hash, git "
            "commit, hardware, the run's config.yaml artifact and the command that retrains it "
            "(<code>hfbench train &lt;config.yaml&gt;</code>).</p>"]
    for s in c.sections:
        out.append(f"<h3>{e(s.dataset)} / {e(s.model)}</h3>")
        summary = [t for t in s.tables if getattr(t, "kind", "") == "summary"]
        for t in summary:  # the answer first
            out.append(f"<h4>{e(t.title)}</h4>")
            out.append(_html_table(t.header, t.rows, numeric=t.numeric, kind=t.kind))
            out.append(f"<p>{e(t.note)}</p>")
        header = _table_header(s)
        out.append(_html_table(header, [_table_cells(r, s) for r in s.rows],
                               numeric=set(range(1, len(header))), kind="accuracy"))
        out += [f"<p>{e(n)}</p>" for n in s.notes]
        for name, caption in s.plots:
            b64 = base64.b64encode(images[name]).decode("ascii")
            out.append(f'<figure id="{e(name)}"><img src="data:image/png;base64,{b64}" '
                       f'alt="{e(caption)}"><figcaption>{e(caption)} ({e(name)})</figcaption></figure>')
        tables = [t for t in (s.published, s.compute) if t is not None] + [t for t in s.tables if t not in summary]
        for t in tables:
            if isinstance(t, str):
                out += ["<h4>Published numbers</h4>", f'<p data-kind="published-none">{e(t)}</p>']
                continue
            out.append(f"<h4>{e(t.title)}</h4>")
            out.append(_html_table(t.header, t.rows, numeric=t.numeric, kind=t.kind))
            if t.note:
                out.append(f"<p>{e(t.note)}</p>")
    if not c.sections:
        out.append("<p>No run finished.</p>")
    out.append("<h2>Failed runs</h2>")
    if c.failed:
        out.append(_html_table(_FAILED_HEADER, c.failed, numeric={2, 3}, err_col=6, kind="failed"))
    else:
        out.append("<p>None.</p>")
    plots = [(n, cap) for s in c.sections for n, cap in s.plots]
    if plots:
        out.append("<h2>Plots</h2>")
        out.append("<ul>" + "".join(f'<li><a href="#{e(n)}">{e(cap)}</a></li>' for n, cap in plots) + "</ul>")
    out.append("<h2>Environment</h2>")
    if c.env:
        out.append("<ul>" + "".join(f"<li><code>{e(k)}</code>: {e(_one_line(v))}</li>" for k, v in c.env)
                   + "</ul>")
    else:
        out.append("<p>No <code>env.*</code> parameters were logged.</p>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------
# entry point


def _add_costs(client, records: list[RunRecord]) -> None:
    """Compression ratio and theoretical speed-up of every finished run (layer_density.csv
    artifact + the registry model's per-layer MACs, computed once per model and dataset)."""
    done = [r for r in records if r.status == "FINISHED"]
    texts = _read_artifacts(client, done, "layer_density.csv")
    for r in done:
        layers = flops.parse_layer_density(texts[r.run_id]) if r.run_id in texts else None
        r.layer_counts = layers
        geo = flops.geometry(r.model, r.dataset) if layers else None
        c = flops.run_cost(layers, geo, r.final_density)
        r.compression_ratio, r.theoretical_speedup = c.compression, c.speedup
        r.theoretical_speedup_prunable = c.speedup_prunable
        r.dense_macs, r.remaining_macs, r.cost_note = c.dense_macs, c.remaining_macs, c.note



def build_report(tracking_uri: str, experiment: str, out_dir: Path,
                 title: str | None = None) -> dict[str, Path]:
    """Write the report of MLflow experiment ``experiment`` into ``out_dir``.

    Returns the written files keyed by file name: ``results.csv``, ``report.md``,
    ``index.html`` and one entry per PNG plot.  Raises ``ReportError`` when the experiment
    does not exist, is deleted, or holds no training runs.

    Tables and plots use FINISHED runs only, one per run hash (the latest re-run wins);
    results.csv lists every training run whatever its status.
    """
    from mlflow import MlflowClient

    out_dir = Path(out_dir)
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = _resolve_experiment(client, experiment)
    records = [rec for rec in map(_record_from_run, _all_runs(client, exp.experiment_id)) if rec]
    if not records:
        raise ReportError(f"MLflow experiment {experiment!r} has no training runs")

    out_dir.mkdir(parents=True, exist_ok=True)
    # Plots from an earlier build of this directory would otherwise linger unreferenced.
    for stale in [p for pat in ("acc_vs_sparsity_", "density_", "flips_", "pressure_law_", "npl_")
                  for p in out_dir.glob(f"{pat}*.png")]:
        stale.unlink()

    written: dict[str, Path] = {}
    records.sort(key=lambda r: (r.dataset, r.model, _method_order(r.method),
                                _sparsity_key(r.target_sparsity), r.seed or 0, r.start_time or 0))
    _add_costs(client, records)
    _add_controls(records)
    csv_path = out_dir / "results.csv"
    _write_csv(csv_path, records)
    written["results.csv"] = csv_path

    finished = _latest_finished(records)
    by_pair: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for r in finished:
        by_pair[(r.dataset, r.model)].append(r)

    # every metric history the plots and tables read, in one bulk query per key
    hist = Histories(client)
    pruning = [r for r in finished if not _is_dense(r.method) and r.final_density is not None]
    # the density plot's runs (a target trajectory of their own) and the flips plot's (regrowth)
    tracking = [r for r in finished if _tracks_target(r)]
    regrowing = [r for r in pruning if dynamics.regrew(r)]
    hist.prefetch_records(pruning + tracking, "density")
    hist.prefetch_records(tracking, "target_density")
    for key in ("pruned", "regrown"):
        hist.prefetch_records(regrowing, key)
    declared = dynamics.saliencies()
    npl_keys: dict[str, list[RunRecord]] = defaultdict(list)
    for r in pruning:
        for _label, kind, key in declared.get(r.method, []):
            if kind == "epoch":
                npl_keys[key].append(r)
    for key, rs in npl_keys.items():
        hist.prefetch_records(rs, key)

    from reports import published

    published_table = published.load()
    bench = _overhead(client)
    images: dict[str, bytes] = {}
    sections: list[_Section] = []
    for (dataset, model), recs in sorted(by_pair.items()):
        rows = _group_rows(recs)
        sec = _Section(dataset, model, rows, _dense_reference(rows))
        sec.has_top5 = any(r.test_top5 is not None for r in recs)
        stem = f"{_slug(dataset)}_{_slug(model)}"
        shape = flops.dataset_shape(dataset)
        if not sec.has_top5 and shape is not None and shape[1] >= 1000:
            sec.notes.append("Top-5 is not shown: these runs do not log test_top5.")
        cost_notes = sorted({r.cost_note for r in recs if r.cost_note})
        if cost_notes:
            sec.notes.append("Speed-up / compression caveats: " + "; ".join(cost_notes) + ".")
        starts: dict[str, set[str]] = defaultdict(set)
        for r in recs:
            if r.params.get("init"):
                starts[r.method].add(r.params["init"])
        sec.published = _published_table(sec, published_table,
                                          {m: next(iter(v)) for m, v in starts.items() if len(v) == 1})
        sec.compute = _compute_table(recs, bench)

        if any(not _is_dense(r.method) for r in recs):
            name = f"acc_vs_sparsity_{stem}.png"
            _plot_accuracy(sec, out_dir / name, recs)
            sec.plots.append((name, f"Test top-1 vs achieved sparsity, {dataset} / {model}"))

        lt = _layer_target(recs)
        if lt is not None:
            name = f"layers_{stem}.png"
            _plot_layers(sec, out_dir / name, recs, lt)
            sec.plots.append((name, f"Density per prunable layer at {_pct(lt)} % sparsity, by method, {dataset} / {model}"))

        curves = []
        for r in (r for r in recs if _tracks_target(r)):
            measured = hist.history(r.run_id, "density")
            if measured:
                curves.append((r, measured, hist.history(r.run_id, "target_density")))
        if curves:
            name = f"density_{stem}.png"
            _plot_density(sec, out_dir / name, curves)
            sec.plots.append((name, f"Density per epoch vs target ({_label_list(curves)}), {dataset} / {model}"))

        sec.tables, more = dynamics.build(hist, recs, out_dir, stem, f"{dataset} / {model}")
        sec.tables = _protocol_tables(sec, recs) + sec.tables
        if any(not _is_dense(r.method) and r.budget_total_images for r in recs):
            name = f"acc_vs_budget_{stem}.png"
            _plot_cost(sec, out_dir / name, recs)
            more = [(name, f"Test top-1 vs total training budget (dense-equivalent epochs), {dataset} / {model}")] + more
        sec.plots += more
        for name, _ in sec.plots:
            written[name] = out_dir / name
            images[name] = (out_dir / name).read_bytes()
        sections.append(sec)

    finished_ids = {r.identity for r in finished}
    failed_rows = [
        [r.run_name or r.run_id, r.method, _pct(r.target_sparsity),
         "" if r.seed is None else str(r.seed), r.status,
         "yes" if r.identity in finished_ids else "no", _one_line(r.error, 300) or "(no error tag)"]
        for r in records if r.status in _FAILED_STATUSES
    ]
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        counts[r.status] += 1

    content = _Content(
        title=title or f"hfbench report: {experiment}",
        experiment=exp.name,
        experiment_id=str(exp.experiment_id),
        tracking_uri=_portable_uri(_safe_uri(tracking_uri)),
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        counts=dict(counts),
        sweeps=sorted({r.sweep for r in records if r.sweep}),
        env=_env_summary(records),
        sections=sections,
        failed=failed_rows,
    )
    md_path = out_dir / "report.md"
    md_path.write_text(_render_md(content), encoding="utf-8")
    written["report.md"] = md_path
    html_path = out_dir / "index.html"
    html_path.write_text(_render_html(content, images), encoding="utf-8")
    written["index.html"] = html_path
    return written
