"""The tables of a report section: rows of the accuracy table (a method at one target, over seeds),
their equal-budget controls, the cells and header of the accuracy table, the published numbers
next to the suite's and the compute table."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from reports.fmt import pct, sparsity_key
from reports.records import DENSE, RunRecord, is_dense, is_matched, latest_finished, method_order
from reports.stats import diff_ci, mean, mean_ci

# a pruning run is compared with a budget-matched dense run whose total budget is within this
# fraction of its own; outside it, the comparison is flagged
BUDGET_TOLERANCE = 0.05


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""
    numeric: set[int] = field(default_factory=set)
    kind: str = ""  # data-kind attribute of the HTML table (what the browser test looks for)


@dataclass
class Row:
    """One line of an accuracy table: a method at one target sparsity, over seeds."""

    method: str
    target: float | None
    achieved: list[float]
    test: list[float]
    seeds: list[int | None]
    top5: list[float] = field(default_factory=list)
    compression: list[float] = field(default_factory=list)
    speedup: list[float] = field(default_factory=list)
    measured: dict[int, list[float]] = field(default_factory=dict)  # batch -> measured speed-ups
    budget: list[float] = field(default_factory=list)  # total training images (budget_total_images)
    budget_incomplete: bool = False  # a run started from a dense run whose budget was not recorded
    run_ids: list[str] = field(default_factory=list)  # its MLflow runs, in the order of `seeds`
    check: Any = None  # reports.protocol.Check, filled in by protocol_tables

    @property
    def n(self) -> int:
        return len(self.test)

    def achieved_mean(self) -> float | None:
        return statistics.fmean(self.achieved) if self.achieved else None

    def test_mean(self) -> float | None:
        return statistics.fmean(self.test) if self.test else None

    def test_std(self) -> float | None:
        return statistics.stdev(self.test) if len(self.test) > 1 else None


def group_rows(records: list[RunRecord]) -> list[Row]:
    groups: dict[tuple[str, float], list[RunRecord]] = defaultdict(list)
    for r in records:
        groups[(r.method, sparsity_key(r.target_sparsity))].append(r)
    rows = []
    for (method, _), rs in sorted(groups.items(), key=lambda kv: (method_order(kv[0][0]), kv[0][1])):
        rs.sort(key=lambda r: (r.seed is None, r.seed or 0))
        rows.append(
            Row(
                method=method,
                target=rs[0].target_sparsity,
                achieved=[r.achieved_sparsity for r in rs if r.achieved_sparsity is not None],
                test=[r.test_top1 for r in rs if r.test_top1 is not None],
                seeds=[r.seed for r in rs],
                run_ids=[r.run_id for r in rs],
                top5=[r.test_top5 for r in rs if r.test_top5 is not None],
                compression=[
                    r.compression_ratio
                    for r in rs
                    if r.compression_ratio is not None and math.isfinite(r.compression_ratio)
                ],
                speedup=[
                    r.theoretical_speedup
                    for r in rs
                    if r.theoretical_speedup is not None and math.isfinite(r.theoretical_speedup)
                ],
                measured={
                    b: [r.measured_speedup[b] for r in rs if b in r.measured_speedup]
                    for b in sorted({b for r in rs for b in r.measured_speedup})
                },
                budget=[r.budget_total_images for r in rs if r.budget_total_images and not uncounted(r)],
                budget_incomplete=any(uncounted(r) for r in rs),
            )
        )
    return rows


def uncounted(r: RunRecord) -> bool:
    """A run that started from the sweep's dense run without that run's budget record (e.g. a
    dense run trained before budgets were logged): its total budget is its own only."""
    return r.params.get("init") == "dense" and r.budget_parent_counted == 0.0


def closest_budget(b: float, plans: dict[str, float]) -> tuple[str, float, bool]:
    """Among dense plans (label -> mean total budget), the one closest to budget `b` in ratio:
    (label, b / its budget, whether that is within BUDGET_TOLERANCE)."""
    label = min(plans, key=lambda k: abs(math.log(b / plans[k])))
    ratio = b / plans[label]
    return label, ratio, abs(ratio - 1.0) <= BUDGET_TOLERANCE


def find_control(row: Row, rows: list[Row]) -> tuple[Row | None, float | None]:
    """The row a pruning row is compared with: the dense row (the short dense run or a
    budget-matched one, same section) whose mean total budget is closest to the row's, if within
    BUDGET_TOLERANCE; otherwise none, with the ratio to the closest."""
    b = mean(row.budget)
    cands = {d.method: d for d in rows if is_dense(d.method) and d.budget}
    if b is None or not cands:
        return None, None
    label, ratio, within = closest_budget(b, {m: mean(d.budget) for m, d in cands.items()})
    return (cands[label] if within else None), ratio


def _dense_values(rows: list[Row], attr: str = "test") -> list[float]:
    return [v for row in rows if row.method == DENSE for v in getattr(row, attr)]


def dense_reference(rows: list[Row]) -> float | None:
    vals = _dense_values(rows)
    return statistics.fmean(vals) if vals else None


@dataclass
class Section:
    dataset: str
    model: str
    rows: list[Row]
    dense: float | None
    plots: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)
    # plotly figures for index.html (reports/interactive.py): (the PNG it stands for, its <div>)
    interactive: list[tuple[str, str]] = field(default_factory=list)
    tables: list = field(default_factory=list)  # Table
    has_top5: bool = False
    notes: list[str] = field(default_factory=list)  # under the accuracy table
    published: Any = None  # Table, or a sentence when nothing matches
    compute: Any = None  # Table
    flagged: int = 0  # protocol cells flagged (reports.protocol)

    @property
    def measured_batches(self) -> list[int]:
        """The batch sizes of `hfbench bench deploy` measurements in this section."""
        return sorted({b for row in self.rows for b in row.measured})


def mean_ci_cell(vals: list[float]) -> str:
    m, hw = mean_ci(vals)
    if m is None:
        return "n/a"
    return pct(m) if hw is None else f"{pct(m)} ± {pct(hw)}"


def _ratio_cell(vals: list[float]) -> str:
    return f"{statistics.fmean(vals):.2f}" if vals else "n/a"


def _measured_cell(vals: list[float], runs: int) -> str:
    """Mean measured speed-up; says so when only some of the row's runs were measured."""
    if not vals:
        return "n/a"
    cell = f"{statistics.fmean(vals):.2f}"
    return cell if len(vals) == runs else f"{cell} ({len(vals)} of {runs} runs)"


def _delta_cell(vals: list[float], dense: list[float], reference: bool) -> str:
    if reference:
        return "—"  # the reference itself
    if not vals or not dense:
        return "n/a"
    d = 100.0 * (statistics.fmean(vals) - statistics.fmean(dense))
    hw = diff_ci(vals, dense)
    return f"{d:+.2f}" if hw is None else f"{d:+.2f} ± {100.0 * hw:.2f}"


def _has_matched(sec: Section) -> bool:
    return any(is_matched(r.method) for r in sec.rows)


def table_cells(row: Row, sec: Section) -> list[str]:
    dense_rows = sec.rows
    cells = [
        row.method,
        pct(row.target),
        pct(row.achieved_mean()),
        _ratio_cell(row.compression),
        _ratio_cell(row.speedup),
        *[_measured_cell(row.measured.get(b, []), len(row.run_ids)) for b in sec.measured_batches],
        mean_ci_cell(row.test),
    ]
    if sec.has_top5:
        cells.append(mean_ci_cell(row.top5))
    cells.append(str(row.n))
    ref = is_dense(row.method)  # a dense row: the reference itself
    control, ratio = (None, None) if ref else find_control(row, sec.rows)
    if ref:
        cells.append("—")
    elif row.budget_incomplete:
        cells.append("n/a (dense start's budget not recorded)")
    else:
        cells.append("n/a" if ratio is None else f"{ratio:.2f}")
    if _has_matched(sec):
        if ref:
            cells.append("—")
        elif control is None:
            cells.append("n/a (no dense run of this budget)")
        else:
            cells.append(
                _delta_cell(row.test, control.test, False) + ("" if control.method == DENSE else f" ({control.method})")
            )
    cells.append(_delta_cell(row.test, _dense_values(dense_rows), row.method == DENSE))
    if sec.has_top5:
        cells.append(_delta_cell(row.top5, _dense_values(dense_rows, "top5"), row.method == DENSE))
    cells.append("—" if row.check is None else ("flagged: " + "; ".join(row.check.flags)) if row.check.flags else "ok")
    return cells


def table_header(sec: Section) -> list[str]:
    h = [
        "Method",
        "Target sparsity (%)",
        "Achieved sparsity (%)",
        "Compression (×)",
        "Theoretical speed-up (×)",
        *[f"Measured speed-up, batch {b} (×)" for b in sec.measured_batches],
        "Test top-1 (%)",
    ]
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


ACC_NOTE = (
    "Top-1 (and top-5) are the mean ± half-width of the 95 % t confidence interval over seeds "
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
    "pass on the registry model at the dataset's input size."
)
FAILED_HEADER = ["Run", "Method", "Target sparsity (%)", "Seed", "Status", "Later finished", "Error"]


def published_table(sec: Section, table: list, inits: dict[str, str] | None = None) -> Any:
    """Published rows like for like with each suite row; `inits`: method -> the runs' start
    (init param), when all its runs share one."""
    from reports import published

    rows = []
    for row in sec.rows:
        if row.method == DENSE:
            continue
        for p in published.matches(
            sec.dataset, sec.model, row.method, row.target, table, (inits or {}).get(row.method)
        ):
            pub_delta = "n/a" if p.dense_top1 is None else f"{p.top1 - p.dense_top1:+.2f}"
            rows.append(
                [
                    row.method,
                    pct(row.target),
                    mean_ci_cell(row.test),
                    str(row.n),
                    p.method,
                    f"{100 * p.sparsity:.2f}",
                    f"{p.top1:.2f}",
                    "n/a" if p.dense_top1 is None else f"{p.dense_top1:.2f}",
                    pub_delta,
                    p.training,
                    p.source,
                ]
            )
    apart = published.unmatched_note(r.method for r in sec.rows)
    if not rows:
        return (
            f"No published number matches {sec.dataset} / {sec.model} for these methods and "
            f"sparsities. " + published.mapping_note() + apart
        )
    return Table(
        "Published numbers (published, not measured here) next to this suite's",
        [
            "suite method",
            "target %",
            "suite top-1 % (95 % CI)",
            "n",
            "published method",
            "published sparsity %",
            "published top-1 %",
            "published dense top-1 %",
            "published Δ vs dense (pp)",
            "published training",
            "source",
        ],
        rows,
        published.mapping_note() + apart,
        numeric={1, 2, 3, 5, 6, 7, 8},
        kind="published",
    )


def _range(vals: list[float], fmt: str) -> str:
    if not vals:
        return "n/a"
    lo, hi = min(vals), max(vals)
    return format(lo, fmt) if format(lo, fmt) == format(hi, fmt) else f"{format(lo, fmt)}–{format(hi, fmt)}"


def _floor_note(method: str) -> str:
    """The method's own words on what keeps its step above its floor (Pruner.floor_note)."""
    try:
        from suite.pruning import registry

        return registry.get(method).floor_note or "not stated by the method"
    except KeyError:  # a plugin method this process has not loaded
        return "not stated by the method"


def compute_table(recs: list[RunRecord], bench: dict | None) -> Any:
    dense = [r.samples for r in recs if r.method == DENSE and r.samples]
    dense_samples = statistics.fmean(dense) if dense else None
    by_method: dict[str, list[RunRecord]] = defaultdict(list)
    for r in recs:
        by_method[r.method].append(r)
    rows = []
    above: list[str] = []  # methods whose measured step is more than 10 % over their floor, and why
    for method in sorted(by_method, key=method_order):
        rs = by_method[method]
        mult = [r.samples / dense_samples for r in rs if r.samples and dense_samples]
        walls = [r.wall_time_s for r in rs if r.wall_time_s is not None]
        dh = [r.device_hours for r in rs if r.device_hours is not None]
        from_dense = sorted({r.params.get("init", "") for r in rs} - {""})
        base = rs[0].base_method
        st = (bench or {}).get("step", {}).get(base)
        mem = (bench or {}).get("mem", {}).get(base)
        floor = (bench or {}).get("floor", {}).get(base)
        if st is not None and floor is not None and math.isfinite(floor) and st[0] > 1.1 * floor:
            above.append(f"{base} ({st[0] / floor:.2f}x its floor: {_floor_note(base)})")
        st_cell = mem_cell = ""  # columns left out without a benchmark run
        if bench is not None:
            st_cell = (
                "n/a"
                if st is None
                else (
                    f"{st[0]:.3f}"
                    + (f" [IQR {st[1]:.3f}, {st[2]:.3f}]" if st[1] is not None and st[2] is not None else "")
                    + (f"; floor {floor:.3f}" if floor is not None and math.isfinite(floor) else "")
                )
            )
            mem_cell = "n/a" if mem is None else f"{mem:.3f}"
        rows.append(
            [
                method,
                str(len(rs)),
                _range([float(r.epochs) for r in rs if r.epochs is not None], ".0f"),
                _range(mult, ".2f"),
                _range(mult, ".2f"),
                "n/a" if not walls else f"{statistics.fmean(walls):.1f}",
                "n/a" if not dh else f"{sum(dh):.3f}",
                ", ".join(from_dense) or "-",
                st_cell,
                mem_cell,
            ]
        )
    note = (
        "Steps multiple = optimiser steps × global batch (batch_size × world size) of a run over the mean "
        "of the dense runs' (for IMP the epochs are (levels + 1) × epochs_per_level). Dense-equivalent "
        "FLOPs multiple = the steps multiple: in this suite pruned weights are masked, so every step "
        "still computes the dense layers. Runs that start from the dense model (init: dense) count only "
        "their own steps: add the dense run (1×) for the full cost. Wall time is the mean per run; "
        "device-hours = wall_time_s × env.world_size / 3600, summed over the runs. "
    )
    if bench is None:
        note += (
            "Step-time and peak-memory ratios (method / dense) appear here once `hfbench bench overhead` "
            "has logged a run to this store (MLflow experiment 'bench')."
        )
    else:
        p = bench["params"]
        note += (
            f"Step-time and peak-memory ratios (method / dense) from overhead benchmark run "
            f"{bench['run_id']} (model {p.get('model', '?')}, device {p.get('device', '?')}, "
            f"batch {p.get('batch', '?')}); median over rounds with IQR. Floor: the step-time ratio if the "
            f"method's per-weight work (masks, gates, their optimiser state) moved only the bytes it must, at "
            f"the machine's measured memory bandwidth."
        )
        if above:
            note += " More than 10 % above the floor: " + "; ".join(dict.fromkeys(above)) + "."
    header = [
        "method",
        "runs",
        "epochs",
        "steps × batch vs dense (×)",
        "dense-equivalent FLOPs (×)",
        "wall time per run (s)",
        "device-hours",
        "init",
        "step-time ratio (bench)",
        "peak-memory ratio (bench)",
    ]
    if bench is None:  # no measurement: no columns of "no benchmark" cells
        header, rows = header[:-2], [r[:-2] for r in rows]
    return Table(
        "Compute",
        header,
        rows,
        note,
        numeric={1, 2, 3, 4, 5, 6},
        kind="compute",
    )


def add_controls(records: list[RunRecord]) -> None:
    """Each finished pruning run's control and budget ratio (results.csv): among the dense runs of
    its model and dataset (the short one and each budget-matched plan), the one whose mean total
    budget is closest to the run's; it is the control when within BUDGET_TOLERANCE."""
    fin = latest_finished(records)
    for r in fin:
        b = r.budget_total_images
        if is_dense(r.method) or not b:
            continue
        if uncounted(r):
            r.control = "none: the dense run it starts from has no budget record (its total counts this run only)"
            continue
        plans: dict[str, list[float]] = defaultdict(list)
        for x in fin:
            if (x.dataset, x.model) == (r.dataset, r.model) and is_dense(x.method) and x.budget_total_images:
                plans[x.method].append(x.budget_total_images)
        if not plans:
            continue
        label, r.budget_ratio, within = closest_budget(b, {k: statistics.fmean(v) for k, v in plans.items()})
        r.control = label if within else f"none within {100 * BUDGET_TOLERANCE:g} % (closest: {label})"


def row_runs(row: Row, recs: list[RunRecord]) -> list[RunRecord]:
    return [r for r in recs if r.method == row.method and sparsity_key(r.target_sparsity) == sparsity_key(row.target)]
