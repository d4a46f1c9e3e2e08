"""The protocol part of a report section (reports.protocol applied to its rows): the protocol check,
the methods that ran, the dense convergence check, the paired comparisons with their calls and the
ranking per target, the summary grid, and the accuracy at each target read off each method's curve."""

from __future__ import annotations

from collections import defaultdict

from reports import protocol as P
from reports.fmt import pct, sparsity_key
from reports.records import DENSE, RunRecord, family, is_dense, is_matched, method_order
from reports.stats import mean
from reports.tables import Section, Table, find_control, mean_ci_cell, row_runs


def protocol_tables(sec: Section, recs: list[RunRecord]) -> list:
    """The protocol check, the paired comparisons with their calls and the ranking per target,
    and the accuracy at each target read off each method's own curve (reports.protocol)."""
    checks, comps, targets = [], [], sorted({r.target for r in sec.rows if not is_dense(r.method) and r.target})
    for row in sec.rows:
        if is_dense(row.method):
            continue
        control, ratio = find_control(row, sec.rows)
        mine = row_runs(row, recs)
        ctl_runs = row_runs(control, recs) if control else [r for r in recs if r.method == DENSE]
        row.check = P.check_cell(row.method, row.target, mine, ctl_runs, None if row.budget_incomplete else ratio)
        checks.append(row.check)
        if control is None:
            comps.append(
                P.Comparison(row.method, row.target, "none of equal budget", 0, call="n/a (no equal-budget control)")
            )
            continue
        n, d, hw, p = P.paired(
            {r.seed: r.test_top1 for r in mine if r.test_top1 is not None},
            {r.seed: r.test_top1 for r in ctl_runs if r.test_top1 is not None},
        )
        comps.append(P.Comparison(row.method, row.target, control.method, n, d, hw, p))
    P.holm(comps)
    sec.flagged = sum(1 for c in checks if c.flags)
    tables = []
    if checks:
        tables.append(
            Table(
                "Protocol",
                [
                    "method",
                    "target %",
                    "seeds",
                    "budget (× control)",
                    "achieved − target (pp)",
                    "snap (pp)",
                    "shared settings that differ from the control",
                    "flags",
                ],
                [
                    [
                        c.method,
                        pct(c.target),
                        str(c.seeds),
                        "n/a" if c.budget_ratio is None else f"{c.budget_ratio:.2f}",
                        "n/a" if c.miss_pp is None else f"{c.miss_pp:+.2f}",
                        "—" if c.snap_pp is None else f"{c.snap_pp:.2f}",
                        "; ".join(c.differs) or "none",
                        "; ".join(c.flags) or "ok",
                    ]
                    for c in checks
                ],
                note=(
                    f"A cell is flagged when its total training budget is outside {P.BUDGET_RANGE[0]}-"
                    f"{P.BUDGET_RANGE[1]} of its control's, its achieved sparsity is more than {P.TARGET_MISS_PP:g} pp "
                    f"from the target in any run, it has fewer than {P.MIN_SEEDS} seeds, or a shared setting ({', '.join(P.SHARED)}) "
                    f"differs from its control's. Flagged cells: {sec.flagged} of {len(checks)}. Snap: for the "
                    "methods whose sparsity follows a calibrated knob and that snap to the target (their runs log "
                    "snap_pp), the mean size in sparsity points of the move that closed, at the end of the search, the "
                    "gap the knob left to the target, by one global scalar of the method's own mask rule (the "
                    "method's snap_pp option; the gap itself is logged per run as snap_gap_pp; '—': not such a "
                    "method)."
                ),
                kind="protocol",
            )
        )
    methods_table = _methods_table(sec, recs)
    if methods_table is not None:
        tables.append(methods_table)
    conv = _convergence(sec, recs)
    if conv is not None:
        tables.append(conv)
    if comps:
        by_target: dict[float, list] = defaultdict(list)
        for c in comps:
            by_target[sparsity_key(c.target)].append(c)
        rank_rows = []
        row_of = {(r.method, sparsity_key(r.target)): r for r in sec.rows}
        for t in sorted(by_target):
            ranked, missed = [], []
            for c in by_target[t]:
                row = row_of[(c.method, t)]
                miss = row.check.worst_pp
                (missed if miss is not None and abs(miss) > P.EQUAL_SPARSITY_PP else ranked).append((row, c))
            ranked.sort(key=lambda rc: -(rc[0].test_mean() or 0.0))
            for i, (row, c) in enumerate(ranked, 1):
                rank_rows.append(
                    [
                        pct(t),
                        str(i),
                        c.method,
                        mean_ci_cell(row.test),
                        c.control,
                        "n/a"
                        if c.diff is None
                        else f"{100 * c.diff:+.2f}" + ("" if c.ci is None else f" ± {100 * c.ci:.2f}"),
                        "n/a" if c.p_holm is None else f"{c.p_holm:.3g}",
                        c.call,
                    ]
                )
            for row, c in missed:
                rank_rows.append(
                    [
                        pct(t),
                        "—",
                        c.method,
                        f"missed (achieved {pct(row.achieved_mean())} %)",
                        c.control,
                        "—",
                        "—",
                        "not ranked",
                    ]
                )
        tables.append(
            Table(
                "Ranking per target sparsity",
                [
                    "target %",
                    "rank",
                    "method",
                    "test top-1 (%)",
                    "control",
                    "paired Δ vs control (pp)",
                    "p (Holm)",
                    "call",
                ],
                rank_rows,
                note=(
                    f"Methods whose every run is within {P.EQUAL_SPARSITY_PP:g} pp of the target, by mean test top-1. Δ is paired by "
                    "seed (the same seed shares the dense start) against the equal-budget dense control, with a "
                    "95 % t interval; p from the paired t test, Holm-corrected over every comparison of this "
                    f"section (alpha {P.ALPHA:g}); better / worse only where the corrected test rejects."
                ),
                kind="ranking",
            )
        )
    methods = sorted({r.method for r in sec.rows if not is_dense(r.method)}, key=method_order)
    if comps and methods and targets:
        tables.insert(0, _summary_grid(sec, comps, methods, targets))
    if methods and targets:
        interp_rows = []
        for m in methods:
            pts = [
                (r.achieved_sparsity, r.test_top1)
                for r in recs
                if r.method == m and r.achieved_sparsity is not None and r.test_top1 is not None
            ]
            vals = [P.interpolate_at(pts, t) for t in targets]
            interp_rows.append([m] + ["—" if v is None else f"{pct(v)} (interpolated)" for v in vals])
        tables.append(
            Table(
                "Accuracy at each target, read off each method's curve",
                ["method"] + [f"{pct(t)} %" for t in targets],
                interp_rows,
                note=(
                    "Monotone cubic (PCHIP) interpolation of mean test top-1 against achieved sparsity, in "
                    "log(1 − sparsity), through each method's own points; '—' where the target lies outside "
                    "the sparsities the method reached (never extrapolated)."
                ),
                kind="interpolated",
            )
        )
    return tables


def _methods_table(sec: Section, recs: list[RunRecord]):
    """Which mode of each method ran, from what start, for how long, and how it reached its
    sparsity (the calibrated knob, the snap, a reference recipe), read from the runs' params by
    each method's `recipe`."""
    from suite.pruning import registry

    rows = []
    for m in sorted({r.method for r in recs if not is_dense(r.method)}, key=method_order):
        rs = [r for r in recs if r.method == m and r.status == "FINISHED"]
        if not rs:
            continue
        # the method's own sentence, from this run's logged params (Pruner.recipe)
        fam = family(rs[0])
        how = registry.get(fam).recipe(rs[0].params, m) if fam else "see its module's docstring"
        inits = sorted({r.params.get("init", "?") for r in rs})
        epochs = sorted({r.epochs for r in rs if r.epochs is not None})
        rows.append([m, ", ".join(inits), ", ".join(map(str, epochs)), how])
    if not rows:
        return None
    return Table(
        "Methods in this section",
        ["method", "start", "epochs", "how it reaches its sparsity"],
        rows,
        note=(
            "From the runs' own params. 'exact': the method prunes to the target by construction; the "
            "others are steered or left to their knob as said. Each method's formulas and its "
            "differences from its paper: docs/baselines.md and docs/hyperflux.md."
        ),
        kind="methods",
    )


def _summary_grid(sec: Section, comps: list, methods: list[str], targets: list[float]):
    """The answer first: test top-1 per method (rows) and target sparsity (columns), mean ± 95 %
    half-width; ★ marks the best mean among the methods that met the target (within 0.5 pp),
    ▲ / ▼ a difference from the equal-budget dense control that survives the Holm correction;
    a cell whose run missed its target says so instead of giving a number to compare."""
    row_of = {(r.method, sparsity_key(r.target)): r for r in sec.rows}
    call_of = {(c.method, sparsity_key(c.target)): c.call for c in comps}
    best: dict[float, str] = {}
    for t in targets:
        ok = [
            (row_of[(m, sparsity_key(t))].test_mean(), m)
            for m in methods
            if (m, sparsity_key(t)) in row_of
            and row_of[(m, sparsity_key(t))].check is not None
            and row_of[(m, sparsity_key(t))].check.worst_pp is not None
            and abs(row_of[(m, sparsity_key(t))].check.worst_pp) <= P.EQUAL_SPARSITY_PP
            and row_of[(m, sparsity_key(t))].test_mean() is not None
        ]
        if ok:
            best[sparsity_key(t)] = max(ok)[1]
    rows = []
    for m in methods:
        cells = [m]
        for t in targets:
            row = row_of.get((m, sparsity_key(t)))
            if row is None:
                cells.append("—")
                continue
            miss = row.check.worst_pp if row.check is not None else None
            if miss is not None and abs(miss) > P.EQUAL_SPARSITY_PP:
                cells.append(f"missed ({pct(row.achieved_mean())} %)")
                continue
            call = call_of.get((m, sparsity_key(t)), "")
            mark = " ▲" if call == "better" else " ▼" if call == "worse" else ""
            star = " ★" if best.get(sparsity_key(t)) == m else ""
            cells.append(mean_ci_cell(row.test) + mark + star)
        rows.append(cells)
    controls = "; ".join(f"{r.method} {mean_ci_cell(r.test)} %" for r in sec.rows if is_dense(r.method))
    return Table(
        "Summary: test top-1 (%) by method and target sparsity",
        ["method"] + [f"{pct(t)} %" for t in targets],
        rows,
        note=(
            "Mean ± 95 % t half-width over seeds. ★ best mean among the methods whose every run "
            f"is within {P.EQUAL_SPARSITY_PP:g} pp of the target; ▲ / ▼ better / worse than the equal-budget dense "
            "control, paired by seed, Holm-corrected (no mark: no difference the test can show, or "
            "too few seeds); 'missed' when a run ended more than "
            f"{P.EQUAL_SPARSITY_PP:g} pp from the target. Dense controls: {controls or 'none'}."
        ),
        numeric=set(range(1, len(targets) + 1)),
        kind="summary",
    )


def _convergence(sec: Section, recs: list[RunRecord]):
    """The dense convergence check: each budget-matched dense plan of about twice the dense
    start's budget (grid.dense_convergence), its paired gain over the dense start. None when the
    section has no such plan."""
    short = next((r for r in sec.rows if r.method == DENSE), None)
    if short is None or not short.budget:
        return None
    rows = []
    for row in sec.rows:
        if not is_matched(row.method) or not row.budget:
            continue
        ratio = mean(row.budget) / mean(short.budget)
        if not P.DOUBLED[0] <= ratio <= P.DOUBLED[1]:
            continue
        c = P.convergence(
            {r.seed: r.test_top1 for r in row_runs(short, recs) if r.test_top1 is not None},
            {r.seed: r.test_top1 for r in row_runs(row, recs) if r.test_top1 is not None},
            row.method,
            ratio,
        )
        gain = "n/a" if c.gain is None else f"{100 * c.gain:+.2f}" + ("" if c.ci is None else f" ± {100 * c.ci:.2f}")
        verdict = (
            "n/a"
            if c.converged is None
            else (
                f"converged (gain < {P.CONVERGED_PP:g} pp)"
                if c.converged
                else f"not converged (gain ≥ {P.CONVERGED_PP:g} pp): the dense start is undertrained"
            )
        )
        rows.append(
            [
                row.method,
                f"{ratio:.2f}",
                str(c.n_pairs),
                mean_ci_cell(short.test),
                mean_ci_cell(row.test),
                gain,
                verdict,
            ]
        )
    if not rows:
        return None
    return Table(
        "Dense convergence",
        [
            "longer dense run",
            "budget (× dense start)",
            "paired seeds",
            "dense start top-1 (%)",
            "longer run top-1 (%)",
            "gain (pp)",
            "verdict",
        ],
        rows,
        note=(
            "A pruning method compared with an undertrained dense model is credited with the "
            "dense model's missing training. The dense start counts as converged when a dense "
            f"run of twice its budget (grid.dense_convergence) gains less than {P.CONVERGED_PP:g} "
            "pp of test top-1 on average over the seeds (paired by seed, 95 % t interval)."
        ),
        kind="convergence",
    )
