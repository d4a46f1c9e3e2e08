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
and ``env.*``, per-epoch metrics (step = epoch) and the ``final_*`` metrics at the last step (reports.records reads it).

The pieces: reports.records (MLflow -> run records), reports.stats, reports.tables,
reports.comparisons, reports.plots, reports.dynamics and reports.render; this module
only puts them together.
"""

from __future__ import annotations

import datetime as _dt
import sqlite3
from collections import defaultdict
from pathlib import Path

from reports import dynamics, flops, interactive, published
from reports.bench_runs import deploy_speedups, overhead
from reports.comparisons import protocol_tables
from reports.fmt import one_line, pct, portable_uri, run_url, safe_uri, slug, sparsity_key, ui_base
from reports.plots import (
    label_list,
    layer_target,
    parallel_saves,
    plot_accuracy,
    plot_cost,
    plot_density,
    plot_layers,
    plot_speedups,
)
from reports.records import (
    Histories,
    RunRecord,
    is_dense,
    latest_finished,
    load,
    method_order,
    read_artifacts,
    tracks_target,
)
from reports.render import Content, env_summary, render_html, render_md, write_csv
from reports.sqlite_store import open_store
from reports.tables import Section, add_controls, compute_table, dense_reference, group_rows, published_table

__all__ = ["ReportError", "build_report"]

# Statuses that count as "did not finish" in the failed-runs table.
_FAILED_STATUSES = ("FAILED", "KILLED")


class ReportError(ValueError):
    """The experiment cannot be reported on (missing, deleted, or without training runs)."""


class LazyClient:
    """An MlflowClient made on first use. A report of a local sqlite store is read with plain SQL
    (reports/sqlite_store.py) and never needs one: making it checks the store's schema, about a
    second of the build."""

    def __init__(self, uri: str):
        self.hfbench_uri = uri
        self._client = None

    def __getattr__(self, name: str):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.hfbench_uri)
        return getattr(self._client, name)


def _resolve_experiment(client, experiment: str):
    store = open_store(client)
    if store is not None:
        try:
            exp = store.experiment(experiment)
        except sqlite3.Error:  # e.g. locked past sqlite's timeout: MLflow's API instead, as elsewhere
            store = None
    if store is None:
        exp = client.get_experiment_by_name(experiment)
    if exp is None and store is None and experiment.isdigit():
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


def _add_costs(client, records: list[RunRecord]) -> None:
    """Compression ratio and theoretical speed-up of every finished run (layer_density.csv
    artifact + the registry model's per-layer MACs, computed once per model and dataset)."""
    done = [r for r in records if r.status == "FINISHED"]
    texts = read_artifacts(client, done, "layer_density.csv")
    for r in done:
        layers = flops.parse_layer_density(texts[r.run_id]) if r.run_id in texts else None
        r.layer_counts = layers
        geo = flops.geometry(r.model, r.dataset) if layers else None
        c = flops.run_cost(layers, geo, r.final_density)
        r.compression_ratio, r.theoretical_speedup = c.compression, c.speedup
        r.theoretical_speedup_prunable = c.speedup_prunable
        r.dense_macs, r.remaining_macs, r.cost_note = c.dense_macs, c.remaining_macs, c.note


def build_report(
    tracking_uri: str, experiment: str, out_dir: Path, title: str | None = None, ui: str | None = None
) -> dict[str, Path]:
    """Write the report of MLflow experiment ``experiment`` into ``out_dir``.

    Returns the written files keyed by file name: ``results.csv``, ``report.md``,
    ``index.html`` and one entry per PNG plot.  Raises ``ReportError`` when the experiment
    does not exist, is deleted, or holds no training runs.

    Every table row links to its MLflow runs in the UI at ``ui`` (default: the tracking server,
    or for a local store where ``mlflow ui`` serves it; "" for no links).

    Tables and plots use FINISHED runs only, one per run hash (the latest re-run wins);
    results.csv lists every training run whatever its status.
    """
    out_dir = Path(out_dir)
    client = LazyClient(tracking_uri)
    exp = _resolve_experiment(client, experiment)
    records = load(client, exp.experiment_id)
    if not records:
        raise ReportError(f"MLflow experiment {experiment!r} has no training runs")

    out_dir.mkdir(parents=True, exist_ok=True)
    # Plots from an earlier build of this directory would otherwise linger unreferenced.
    for stale in [
        p
        for pat in ("acc_vs_sparsity_", "density_", "flips_", "pressure_law_", "npl_")
        for p in out_dir.glob(f"{pat}*.png")
    ]:
        stale.unlink()

    written: dict[str, Path] = {}
    records.sort(
        key=lambda r: (
            r.dataset,
            r.model,
            method_order(r.method),
            sparsity_key(r.target_sparsity),
            r.seed or 0,
            r.start_time or 0,
        )
    )
    _add_costs(client, records)
    measured = deploy_speedups(client, exp.name)
    for r in records:
        r.measured_speedup = measured.get(r.run_id, {})
    add_controls(records)
    csv_path = out_dir / "results.csv"
    write_csv(csv_path, records)
    written["results.csv"] = csv_path

    finished = latest_finished(records)
    by_pair: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
    for r in finished:
        by_pair[(r.dataset, r.model)].append(r)

    # every metric history the plots and tables read, in one bulk query per key
    hist = Histories(client)
    pruning = [r for r in finished if not is_dense(r.method) and r.final_density is not None]
    # the density plot's runs (a target trajectory of their own) and the flips plot's (regrowth)
    tracking = [r for r in finished if tracks_target(r)]
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

    published_rows = published.load()
    bench = overhead(client)
    ui_root = ui_base(tracking_uri) if ui is None else ui.rstrip("/")

    def link(run_id: str) -> str:  # a run's page in the MLflow UI, "" without one
        return run_url(ui_root, str(exp.experiment_id), run_id) if ui_root else ""

    images: dict[str, bytes] = {}
    sections: list[Section] = []
    with parallel_saves():  # the PNGs are drawn, in parallel, when the loop is done
        for (dataset, model), recs in sorted(by_pair.items()):
            rows = group_rows(recs)
            sec = Section(dataset, model, rows, dense_reference(rows))
            sec.has_top5 = any(r.test_top5 is not None for r in recs)
            stem = f"{slug(dataset)}_{slug(model)}"
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
            sec.published = published_table(
                sec, published_rows, {m: next(iter(v)) for m, v in starts.items() if len(v) == 1}
            )
            sec.compute = compute_table(recs, bench)
            if sec.measured_batches:
                sec.notes.append(
                    "Measured speed-up: dense model (zeros kept) time / the same weights in CSR (linear "
                    "layers as sparse matmuls, convolutions as sparse matmuls over the unfolded input), in "
                    "one process, interleaved, from the latest `hfbench bench deploy` run of this "
                    "experiment (MLflow experiment bench); below 1 the sparse kernels are slower than dense."
                )

            if any(not is_dense(r.method) for r in recs):
                name = f"acc_vs_sparsity_{stem}.png"
                plot_accuracy(sec, out_dir / name, recs)
                sec.plots.append((name, f"Test top-1 vs achieved sparsity, {dataset} / {model}"))
                sec.interactive.append((name, interactive.accuracy_figure(sec, recs, link, f"acc_{stem}")))

            lt = layer_target(recs)
            if lt is not None:
                name = f"layers_{stem}.png"
                plot_layers(sec, out_dir / name, recs, lt)
                sec.plots.append(
                    (name, f"Density per prunable layer at {pct(lt)} % sparsity, by method, {dataset} / {model}")
                )

            curves = []
            for r in (r for r in recs if tracks_target(r)):
                measured = hist.history(r.run_id, "density")
                if measured:
                    curves.append((r, measured, hist.history(r.run_id, "target_density")))
            if curves:
                name = f"density_{stem}.png"
                plot_density(sec, out_dir / name, curves)
                sec.plots.append((name, f"Density per epoch vs target ({label_list(curves)}), {dataset} / {model}"))

            sec.tables, more = dynamics.build(hist, recs, out_dir, stem, f"{dataset} / {model}")
            sec.tables = protocol_tables(sec, recs) + sec.tables
            if any(not is_dense(r.method) and r.budget_total_images for r in recs):
                name = f"acc_vs_budget_{stem}.png"
                plot_cost(sec, out_dir / name, recs)
                sec.interactive.append((name, interactive.cost_figure(sec, recs, link, f"cost_{stem}")))
                more = [
                    (name, f"Test top-1 vs total training budget (dense-equivalent epochs), {dataset} / {model}")
                ] + more
            if any(r.measured_speedup and r.theoretical_speedup for r in recs):
                name = f"speedup_{stem}.png"
                plot_speedups(sec, out_dir / name, recs)
                more.append(
                    (name, f"Measured vs theoretical inference speed-up (CSR, this machine), {dataset} / {model}")
                )
            sec.plots += more
            sections.append(sec)
    for sec in sections:
        for name, _ in sec.plots:
            written[name] = out_dir / name
            images[name] = (out_dir / name).read_bytes()

    finished_ids = {r.identity for r in finished}
    failed_rows = [
        [
            r.run_name or r.run_id,
            r.method,
            pct(r.target_sparsity),
            "" if r.seed is None else str(r.seed),
            r.status,
            "yes" if r.identity in finished_ids else "no",
            one_line(r.error, 300) or "(no error tag)",
        ]
        for r in records
        if r.status in _FAILED_STATUSES
    ]
    counts: dict[str, int] = defaultdict(int)
    for r in records:
        counts[r.status] += 1

    content = Content(
        title=title or f"hfbench report: {experiment}",
        experiment=exp.name,
        experiment_id=str(exp.experiment_id),
        tracking_uri=portable_uri(safe_uri(tracking_uri)),
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        counts=dict(counts),
        sweeps=sorted({r.sweep for r in records if r.sweep}),
        env=env_summary(records),
        sections=sections,
        failed=failed_rows,
        ui=ui_root,
        failed_ids=[r.run_id for r in records if r.status in _FAILED_STATUSES],
    )
    md_path = out_dir / "report.md"
    md_path.write_text(render_md(content), encoding="utf-8")
    written["report.md"] = md_path
    html_path = out_dir / "index.html"
    html_path.write_text(render_html(content, images), encoding="utf-8")
    written["index.html"] = html_path
    return written
