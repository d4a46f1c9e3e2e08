"""Turn the training runs of one MLflow experiment into a report directory.

``build_report`` writes, into ``out_dir``:

* ``results.csv``   one row per training run (every status), the raw material;
* ``report.md``     environment, one accuracy table per (dataset, model), failed runs, plot links;
* ``acc_vs_sparsity_<dataset>_<model>.png``  test top-1 against achieved sparsity per method;
* ``density_<dataset>_<model>.png``  Hyperflux density trajectories against their targets;
* ``index.html``    the same content as report.md, fully self-contained (images inlined).

The run schema it reads is the one the training code logs on rank 0:
tags ``hfbench.*``, params ``method``/``model``/``dataset``/``sparsity``/``seed``/``epochs``
and ``env.*``, per-epoch metrics (step = epoch) and the ``final_*`` metrics at the last step.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import html
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlsplit, urlunsplit

from reports import dynamics

__all__ = ["ReportError", "RunRecord", "build_report"]

# The SQLAlchemy tracking store refuses pages larger than this.
_PAGE_SIZE = 50_000

# Columns of results.csv, in order.  The first block is the contract; the rest is extra context.
CSV_COLUMNS = [
    "run_id", "run_hash", "status", "method", "model", "dataset", "seed",
    "target_sparsity", "achieved_sparsity", "test_top1", "val_top1", "epochs",
    "wall_time_s", "error",
    "final_density", "sweep", "run_name", "config_hash", "start_time", "end_time",
]

_DENSE = "dense"
_HYPERFLUX = "hyperflux"
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

    @property
    def identity(self) -> str:
        # Re-runs of the same config share a run hash; fall back to the run id when absent.
        return self.run_hash or self.run_id


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
    # the variant (e.g. hyperflux-law, gmp-taylor) labels the line; older runs only have the method
    method = tags.get("hfbench.variant") or params.get("method") or tags.get("hfbench.method")
    if not method:
        return None
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
    )


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    points = client.get_metric_history(run_id, key)
    # Keep the last value logged at each step (a resumed run may log a step twice).
    by_step: dict[int, tuple[int, float]] = {}
    for m in points:
        prev = by_step.get(m.step)
        if prev is None or m.timestamp >= prev[0]:
            by_step[m.step] = (m.timestamp, m.value)
    return [(step, v) for step, (_, v) in sorted(by_step.items())]


# ----------------------------------------------------------------------------------------
# aggregation


@dataclass
class _Row:
    """One line of an accuracy table: a method at one target sparsity, over seeds."""

    method: str
    target: float | None
    achieved: list[float]
    test: list[float]
    seeds: list[int | None]

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
    return (0 if method == _DENSE else 1, method)


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
        ))
    return rows


def _dense_reference(rows: list[_Row]) -> float | None:
    vals = [v for row in rows if row.method == _DENSE for v in row.test]
    return statistics.fmean(vals) if vals else None


@dataclass
class _Section:
    dataset: str
    model: str
    rows: list[_Row]
    dense: float | None
    plots: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)
    tables: list = field(default_factory=list)  # reports.dynamics.Table


def _table_cells(row: _Row, dense: float | None) -> list[str]:
    mean, std = row.test_mean(), row.test_std()
    if mean is None:
        test = "n/a"
    elif std is None:
        test = _pct(mean)
    else:
        test = f"{_pct(mean)} ± {_pct(std)}"
    if row.method == _DENSE:
        delta = "—"  # the reference itself
    elif mean is None or dense is None:
        delta = "n/a"
    else:
        delta = f"{100.0 * (mean - dense):+.2f}"
    return [row.method, _pct(row.target), _pct(row.achieved_mean()), test, str(row.n), delta]


_TABLE_HEADER = ["Method", "Target sparsity (%)", "Achieved sparsity (%)", "Test top-1 (%)", "n",
                 "Δ vs dense (pp)"]
_FAILED_HEADER = ["Run", "Method", "Target sparsity (%)", "Seed", "Status", "Later finished", "Error"]


# ----------------------------------------------------------------------------------------
# plots (object-oriented matplotlib API: no pyplot, so no global backend or figure registry)


def _new_figure(size=(7.0, 4.5)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110, layout="constrained")
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
        if r.method != _DENSE and r.achieved_sparsity is not None and r.test_top1 is not None:
            by_method[r.method].append(r)

    xs_all: list[float] = []
    for method in sorted(by_method):
        groups: dict[float, list[RunRecord]] = defaultdict(list)
        for r in by_method[method]:
            groups[_sparsity_key(r.target_sparsity)].append(r)
        pts = []
        for rs in groups.values():
            x = _log_x(statistics.fmean(r.achieved_sparsity for r in rs))
            accs = [100.0 * r.test_top1 for r in rs]
            mean = statistics.fmean(accs)
            pts.append((x, mean, mean - min(accs), max(accs) - mean))
        pts.sort()
        xs, ys, lo, hi = (list(v) for v in zip(*pts))
        xs_all += xs
        if any(len(rs) > 1 for rs in groups.values()):
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=method)
        else:
            ax.plot(xs, ys, marker="o", label=method)

    if section.dense is not None:
        ax.axhline(100.0 * section.dense, color="black", linestyle="--", linewidth=1.2,
                   label=f"dense ({_pct(section.dense)}%)")

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
    seeds_note = "mean over seeds, bars min–max" if any(
        len(v) > 1 for v in by_method.values()) else "one run per point"
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
    ax.set_xlabel("epoch")
    ax.set_ylabel("density (% of prunable weights)")
    ax.set_title(f"{section.dataset} / {section.model}: Hyperflux density per epoch", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    # A fixed corner: with one line per run, matplotlib's "best" placement search dominates
    # the plotting time.  Densities fall over training, so the lower left is usually empty.
    ax.legend(fontsize=7, loc="lower left")
    fig.savefig(path)


# ----------------------------------------------------------------------------------------
# writers


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
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
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
    out += ["", "## Environment", ""]
    if c.env:
        out += [f"- `{k}`: {_md_escape(v)}" for k, v in c.env]
    else:
        out.append("No `env.*` parameters were logged.")
    out.append("")
    out += ["## Results", "",
            "Test top-1 is the mean ± sample standard deviation over seeds (n runs); "
            "Δ vs dense is in percentage points against the mean of the dense runs.", ""]
    for s in c.sections:
        out += [f"### {s.dataset} / {s.model}", ""]
        out += _md_table(_TABLE_HEADER, [_table_cells(r, s.dense) for r in s.rows])
        out.append("")
        for name, caption in s.plots:
            out += [f"![{caption}]({name})", ""]
        for t in s.tables:
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


def _html_table(header: list[str], rows: list[list[str]], numeric: set[int], err_col: int | None = None) -> str:
    e = html.escape
    parts = ["<table>", "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
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
    out.append("<h2>Environment</h2>")
    if c.env:
        out.append("<ul>" + "".join(f"<li><code>{e(k)}</code>: {e(_one_line(v))}</li>" for k, v in c.env)
                   + "</ul>")
    else:
        out.append("<p>No <code>env.*</code> parameters were logged.</p>")
    out += ["<h2>Results</h2>",
            "<p>Test top-1 is the mean ± sample standard deviation over seeds (n runs); "
            "Δ vs dense is in percentage points against the mean of the dense runs.</p>"]
    for s in c.sections:
        out.append(f"<h3>{e(s.dataset)} / {e(s.model)}</h3>")
        out.append(_html_table(_TABLE_HEADER, [_table_cells(r, s.dense) for r in s.rows],
                               numeric={1, 2, 3, 4, 5}))
        for name, caption in s.plots:
            b64 = base64.b64encode(images[name]).decode("ascii")
            out.append(f'<figure id="{e(name)}"><img src="data:image/png;base64,{b64}" '
                       f'alt="{e(caption)}"><figcaption>{e(caption)} ({e(name)})</figcaption></figure>')
        for t in s.tables:
            out.append(f"<h4>{e(t.title)}</h4>")
            out.append(_html_table(t.header, t.rows, numeric=t.numeric))
            if t.note:
                out.append(f"<p>{e(t.note)}</p>")
    if not c.sections:
        out.append("<p>No run finished.</p>")
    out.append("<h2>Failed runs</h2>")
    if c.failed:
        out.append(_html_table(_FAILED_HEADER, c.failed, numeric={2, 3}, err_col=6))
    else:
        out.append("<p>None.</p>")
    plots = [(n, cap) for s in c.sections for n, cap in s.plots]
    if plots:
        out.append("<h2>Plots</h2>")
        out.append("<ul>" + "".join(f'<li><a href="#{e(n)}">{e(cap)}</a></li>' for n, cap in plots) + "</ul>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------
# entry point


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
    csv_path = out_dir / "results.csv"
    _write_csv(csv_path, records)
    written["results.csv"] = csv_path

    finished = _latest_finished(records)
    by_pair: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for r in finished:
        by_pair[(r.dataset, r.model)].append(r)

    images: dict[str, bytes] = {}
    sections: list[_Section] = []
    for (dataset, model), recs in sorted(by_pair.items()):
        rows = _group_rows(recs)
        sec = _Section(dataset, model, rows, _dense_reference(rows))
        stem = f"{_slug(dataset)}_{_slug(model)}"

        if any(r.method != _DENSE for r in recs):
            name = f"acc_vs_sparsity_{stem}.png"
            _plot_accuracy(sec, out_dir / name, recs)
            sec.plots.append((name, f"Test top-1 vs achieved sparsity, {dataset} / {model}"))

        hf = [r for r in recs if r.method.startswith(_HYPERFLUX)]
        curves = []
        for r in hf:
            measured = _history(client, r.run_id, "density")
            if measured:
                curves.append((r, measured, _history(client, r.run_id, "target_density")))
        if curves:
            name = f"density_{stem}.png"
            _plot_density(sec, out_dir / name, curves)
            sec.plots.append((name, f"Hyperflux density per epoch vs target, {dataset} / {model}"))

        sec.tables, more = dynamics.build(client, recs, out_dir, stem, f"{dataset} / {model}")
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
        tracking_uri=_safe_uri(tracking_uri),
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
