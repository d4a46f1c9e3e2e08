"""The pruning-dynamics part of a report section (one dataset / model pair).

From the per-epoch metrics the engine logs (suite/engine.py) it builds:
* a targeting table: per pruning run, target vs achieved sparsity, the error in percentage
  points, the first epoch from which the density stays within 1 pp of the final target, and
  the weights pruned and regrown over the run (gate or mask flips between epoch ends);
* ``flips_<stem>.png``: weights pruned and regrown per epoch for the runs that regrew weights
  (regrown_total > 0: the gated methods; a 0/1-mask method's pruned weights stay pruned);
* ``pressure_law_<stem>.png`` and a fit line: final density against the knob a variant fixes
  instead of steering to a target (a "final" entry of its method's `dynamics`: the fixed
  pressure gamma), with d(gamma) = c exp(-(a0 ln g + a1 ln^2 g)) fitted (suite.pruning.laws);
  one per such variant (the second and later: ``pressure_law_<variant>_<stem>.png``);
* ``npl_<stem>.png`` and a table: the Neural Pruning Law ln d = ln c - alpha ln s per method
  and saliency (each method's `dynamics`), fitted where 0.5 % < density <= 50 %.
Nothing here names a method: what a method logs and how to read it comes from the registry.
"""

from __future__ import annotations

import math
from pathlib import Path

from reports.fmt import slug
from reports.plots import log_axis, method_style, new_figure, save
from reports.records import history
from reports.tables import Table
from suite.pruning.laws import npl_fit, pressure_law_fit


def saliencies() -> dict[str, list[tuple[str, str, str]]]:
    """Variant -> [(label, kind, key)]: which logged saliency is each method's own pruning
    criterion (hyperflux.md section 8), merged over the `dynamics` of every registered method
    when called (plugins included). kind "epoch": (density, metric `key`) at every epoch;
    "final": one point per run (final density, param `key`), for a variant that fixes a knob
    instead of steering to a target."""
    from suite.pruning import registry

    out: dict[str, list[tuple[str, str, str]]] = {}
    for name in registry.names():
        for variant, specs in registry.get(name).dynamics.items():
            out.setdefault(variant, []).extend(specs)
    return out


def fixed_knob(variant: str, specs: dict[str, list[tuple[str, str, str]]] | None = None) -> tuple[str, str] | None:
    """(label, param key) of the knob a variant fixes instead of steering to a target (its first
    "final" dynamics entry), or None: such runs have no target (their sparsity only names a
    reference), and their final densities against the knob give the pressure law."""
    for label, kind, key in (saliencies() if specs is None else specs).get(variant, []):
        if kind == "final":
            return label, key
    return None


def regrew(r) -> bool:
    """A run that regrew weights (flips from pruned back to active between epoch ends)."""
    return (r.metrics.get("regrown_total") or 0) > 0


def epochs_within(density: list[tuple[int, float]], target_density: float, tol: float = 0.01) -> int | None:
    """First epoch from which |density - target| <= tol holds until the end (None if never)."""
    first = None
    for step, d in density:
        if abs(d - target_density) <= tol:
            first = step if first is None else first
        else:
            first = None
    return first


def npl_points(client, recs) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """(variant, saliency label) -> [(density, saliency)], positive saliencies only."""
    pts: dict[tuple[str, str], list[tuple[float, float]]] = {}
    declared = saliencies()
    for r in recs:
        specs = declared.get(r.method, [])
        dens = None
        for label, kind, key in specs:
            if kind == "final":
                s = r.params.get(key)
                if s is not None and r.final_density is not None and float(s) > 0:
                    pts.setdefault((r.method, label), []).append((r.final_density, float(s)))
                continue
            if dens is None:
                dens = dict(history(client, r.run_id, "density"))
            last = None
            hist = history(client, r.run_id, key)
            if hist:  # listed even when no value is positive, so the table says why there is no fit
                pts.setdefault((r.method, label), [])
            for step, v in hist:
                if step in dens and v > 0 and math.isfinite(v) and (dens[step], v) != last:
                    # an epoch where nothing changed (e.g. after the last GMP update) adds no point
                    last = (dens[step], v)
                    pts.setdefault((r.method, label), []).append(last)
    return pts


def _loglog(ax, xlabel: str, ylabel: str, title: str) -> None:
    log_axis(ax, "x")
    log_axis(ax, "y")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10, y=1.0)  # y fixed: matplotlib skips its costly title placement
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def build(client, recs, out_dir: Path, stem: str, title: str) -> tuple[list[Table], list[tuple[str, str]]]:
    """Tables and plots (file name, caption) for the pruning runs `recs` of one section."""
    tables: list[Table] = []
    plots: list[tuple[str, str]] = []
    # dense runs (the short one, and budget-matched controls "dense-matched ...") prune nothing
    pruning = [r for r in recs if not r.method.startswith("dense") and r.final_density is not None]
    if not pruning:
        return tables, plots

    # -- targeting, pruning and regrowth -------------------------------------------------
    declared = saliencies()
    rows, flips = [], []
    for r in sorted(pruning, key=lambda r: (r.method, r.target_sparsity or 0, r.seed or 0)):
        if fixed_knob(r.method, declared):
            continue  # no target: its sparsity only names the reference trajectory
        dens = history(client, r.run_id, "density")
        target_d = 1.0 - (r.target_sparsity or 0.0)
        err = None if r.achieved_sparsity is None else 100 * abs(r.achieved_sparsity - (r.target_sparsity or 0))
        within = epochs_within(dens, target_d)
        m = r.metrics
        rows.append(
            [
                r.method,
                f"{100 * (r.target_sparsity or 0):.1f}",
                f"{100 * (r.achieved_sparsity or 0):.2f}",
                "-" if err is None else f"{err:.2f}",
                "-" if within is None else f"{within}/{r.epochs}",
                f"{int(m.get('pruned_total', 0))}",
                f"{int(m.get('regrown_total', 0))}",
            ]
        )
        if regrew(r):  # the runs that regrew weights: their flips per epoch
            pr, rg = history(client, r.run_id, "pruned"), history(client, r.run_id, "regrown")
            if pr or rg:
                flips.append((r, pr, rg))
    if rows:
        tables.append(
            Table(
                "Sparsity targeting, pruning and regrowth",
                ["method", "target %", "achieved %", "|error| pp", "within 1 pp from epoch", "pruned", "regrown"],
                rows,
                "pruned / regrown: weights that went from active to pruned / pruned to active between "
                "consecutive epoch ends, summed over the run (for gated methods: gate sign flips).",
                numeric={1, 2, 3, 5, 6},
                kind="targeting",
            )
        )
    if flips:
        # one panel per method (small multiples share their axes), one line pair per target: the
        # mean over its seeds at each epoch, so that a large sweep stays readable
        groups: dict[tuple[str, float], list] = {}
        for r, pr, rg in flips:
            groups.setdefault((r.method, round(r.target_sparsity or 0.0, 6)), []).append((pr, rg))

        def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
            acc: dict[int, list[float]] = {}
            for c in curves:
                for step, v in c:
                    acc.setdefault(step, []).append(v)
            return [(step, sum(vs) / len(vs)) for step, vs in sorted(acc.items())]

        targets_of: dict[str, list[float]] = {}
        for method, target in sorted(groups):
            targets_of.setdefault(method, []).append(target)
        methods = sorted(targets_of)
        ncol = min(3, len(methods))
        nrow = math.ceil(len(methods) / ncol)
        fig = new_figure(size=(3.3 * ncol + 0.8, 2.5 * nrow + 0.9))
        fig.subplots_adjust(left=0.09, right=0.98, bottom=0.1 + 0.05 / nrow, top=0.88 - 0.04 / nrow, hspace=0.35)
        axes = list(fig.subplots(nrow, ncol, sharex=True, sharey=True, squeeze=False).flat)
        for ax, method in zip(axes, methods):
            c = method_style(method)[0]  # the method's colour from the other plots
            ts = targets_of[method]
            for target in ts:  # its targets go from solid to faint
                runs = groups[(method, target)]
                alpha = 1.0 - 0.6 * ts.index(target) / max(len(ts) - 1, 1)
                lab = f"{100 * target:g}%" + (f" (n={len(runs)})" if len(runs) > 1 else "")
                pr = mean_curve([p for p, _ in runs])
                rg = mean_curve([g for _, g in runs])
                if pr:
                    ax.plot(
                        [s for s, _ in pr],
                        [max(v, 0.5) for _, v in pr],
                        color=c,
                        alpha=alpha,
                        linestyle="--",
                        linewidth=1,
                    )
                if rg:
                    ax.plot(
                        [s for s, _ in rg], [max(v, 0.5) for _, v in rg], color=c, alpha=alpha, linewidth=1.4, label=lab
                    )
            log_axis(ax, "y")
            ax.set_title(method, fontsize=9, color=c, y=1.0)
            ax.grid(True, which="both", alpha=0.3)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6, loc="upper right", title="target", title_fontsize=6)
        for ax in axes[len(methods) :]:  # the grid's empty places
            ax.set_visible(False)
        fig.supxlabel("epoch", fontsize=9)
        fig.supylabel("weights per epoch (0 drawn at 0.5)", fontsize=9)
        fig.suptitle(f"{title}: weights pruned (dashed) and regrown (solid) per epoch, runs that regrew", fontsize=10)
        name = f"flips_{stem}.png"
        save(fig, out_dir / name)
        plots.append(
            (name, f"Weights pruned (dashed) and regrown (solid) per epoch, runs that regrew weights, {title}")
        )

    # -- pressure law ----------------------------------------------------------------------
    # final density against the knob a variant fixes (its "final" dynamics entry), one law per
    # variant; the first keeps the plain file name
    knobs = {v: k for v in sorted({r.method for r in pruning}) if (k := fixed_knob(v, declared))}
    for n, (variant, (label, key)) in enumerate(sorted(knobs.items())):
        fixed = [(float(r.params[key]), r.final_density) for r in pruning if r.method == variant and r.params.get(key)]
        if len(fixed) < 3:
            continue
        fixed.sort()
        note = ""
        try:
            law = pressure_law_fit([g for g, _ in fixed], [d for _, d in fixed])
            note = (
                f"d(gamma) = {law['c']:.4g} exp(-({law['a0']:.4g} ln g + {law['a1']:.4g} ln^2 g)), "
                f"R^2 = {law['r2']:.4f} on {law['n']} runs."
            )
        except (ValueError, ArithmeticError) as e:
            law, note = None, f"the law could not be fitted: {e}"
        tables.append(
            Table(
                f"Pressure law ({variant} runs, fixed {label})",
                [label, "final density %"],
                [[f"{g:.4g}", f"{100 * d:.3f}"] for g, d in fixed],
                note,
                numeric={0, 1},
                kind="pressure_law",
            )
        )
        fig = new_figure()
        ax = fig.add_subplot()
        ax.scatter([g for g, _ in fixed], [100 * d for _, d in fixed], color="C0", label="runs", zorder=3)
        if law:
            lo, hi = math.log(fixed[0][0]), math.log(fixed[-1][0])
            gs = [math.exp(lo + (hi - lo) * i / 100) for i in range(101)]
            ax.plot(
                gs,
                [100 * law["c"] * math.exp(-(law["a0"] * math.log(g) + law["a1"] * math.log(g) ** 2)) for g in gs],
                color="C1",
                label=f"fit, R^2 = {law['r2']:.4f}",
            )
        _loglog(ax, label, "final density (%)", f"{title}: pressure law, {variant}")
        name = f"pressure_law_{stem}.png" if n == 0 else f"pressure_law_{slug(variant)}_{stem}.png"
        save(fig, out_dir / name)
        plots.append((name, f"Final density against fixed {label} ({variant}), with the fitted law, {title}"))

    # -- Neural Pruning Law ------------------------------------------------------------------
    pts = npl_points(client, pruning)
    if pts:
        rows = []
        fig = new_figure()
        ax = fig.add_subplot()
        seen: dict[str, int] = {}
        for (variant, label), xy in sorted(pts.items()):
            # the method's colour from the other plots; its saliencies told apart by marker and line
            c, k = method_style(variant)[0], seen.setdefault(variant, 0)
            seen[variant] += 1
            mk, ls = ("o", "s", "^", "D")[k % 4], ("-", "--", ":", "-.")[k % 4]
            if xy:
                ax.scatter(
                    [s for _, s in xy],
                    [100 * d for d, _ in xy],
                    s=8,
                    marker=mk,
                    color=c,
                    alpha=0.6,
                    label=f"{variant}: {label}",
                )
            try:
                if not xy:
                    raise ValueError("no positive value: a power law needs saliency > 0")
                fit = npl_fit([d for d, _ in xy], [s for _, s in xy])
                kept = [s for d, s in xy if 0.005 < d <= 0.5]
                lo, hi = min(kept), max(kept)
                ax.plot(
                    [lo, hi],
                    [100 * fit["c"] * lo ** -fit["alpha"], 100 * fit["c"] * hi ** -fit["alpha"]],
                    color=c,
                    linestyle=ls,
                    linewidth=1.2,
                )
                rows.append([variant, label, f"{fit['alpha']:.4f}", f"{fit['r2']:.4f}", str(fit["n"])])
            except ValueError as e:
                rows.append([variant, label, "-", "-", str(len(xy)) + f" ({e})"])
        if any(pts.values()):
            _loglog(ax, "minimum surviving saliency", "density (%)", f"{title}: Neural Pruning Law")
            name = f"npl_{stem}.png"
            save(fig, out_dir / name)
            plots.append((name, f"Density against minimum surviving saliency (Neural Pruning Law), {title}"))
        tables.append(
            Table(
                "Neural Pruning Law fits",
                ["method", "saliency", "alpha", "R^2", "points"],
                rows,
                "ln d = ln c - alpha ln s over (density, saliency) points where 0.5 % < density "
                "<= 50 %; per epoch along each run, or one point per run for fixed pressure.",
                numeric={2, 3, 4},
                kind="npl",
            )
        )
    return tables, plots
