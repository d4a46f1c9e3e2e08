"""Interactive versions of a section's two main plots for index.html, drawn with plotly: accuracy
against achieved sparsity, and accuracy against training budget. Same data, colours and markers
as the PNGs (which stay, in report.md and beside these); here every run is a point whose hover
names it (seed, target, achieved sparsity, accuracy) and whose click opens its MLflow run, and
a legend entry hides or shows a method. plotly's JavaScript is inlined once per page (`script`),
so the page stays self-contained and works offline.
"""

from __future__ import annotations

import functools
import statistics
from collections import defaultdict
from collections.abc import Callable

from reports.fmt import pct, sparsity_key
from reports.plots import _TICK_SPARSITIES, _log_x, _tick_label, method_style
from reports.records import RunRecord, is_dense, is_matched, method_order
from reports.stats import mean_ci
from reports.tables import Section

# matplotlib marker -> plotly symbol
_SYMBOL = {
    "o": "circle",
    "v": "triangle-down",
    "^": "triangle-up",
    "<": "triangle-left",
    ">": "triangle-right",
    "D": "diamond",
    "P": "cross",
    "X": "x",
    "d": "diamond-tall",
    "h": "hexagon",
    "p": "pentagon",
    "*": "star",
    "H": "hexagon2",
    "s": "square",
}
_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "png", "scale": 2}}
# a click on a run's point opens its MLflow run (customdata holds the address, "" for none)
_ON_CLICK = (
    "var el = document.getElementById('{plot_id}');"
    "el.on('plotly_click', function (d) { var u = d.points[0].customdata;"
    " if (typeof u === 'string' && u) { window.open(u, '_blank', 'noopener'); } });"
)


def script() -> str:
    """plotly.js, inlined: one <script> per page, before the first figure."""
    from plotly.offline import get_plotlyjs

    return f'<script type="text/javascript">{get_plotlyjs()}</script>'


def _style(method: str) -> tuple[str, str]:
    colour, marker = method_style(method)
    return colour, _SYMBOL.get(marker, "circle")


def _hover(r: RunRecord) -> str:
    seed = "" if r.seed is None else f" seed {r.seed}"
    return (
        f"<b>{r.run_name or r.run_id}</b>{seed}<br>target {pct(r.target_sparsity)} %, achieved "
        f"{pct(r.achieved_sparsity)} %<br>test top-1 {pct(r.test_top1)} %"
    )


@functools.lru_cache(maxsize=1)
def _template() -> dict:
    """plotly's "plotly_white" template as plain JSON: the figures are plain dicts handed to
    plotly.io unvalidated (plotly's figure objects validate and deep-copy every property, which
    cost the report build more than half a second), so a template name would not be expanded."""
    import plotly.io as pio

    return pio.templates["plotly_white"].to_plotly_json()


def _html(traces: list[dict], layout: dict, div_id: str) -> str:
    import plotly.io as pio

    fig = {"data": traces, "layout": layout}
    return pio.to_html(
        fig,
        full_html=False,
        include_plotlyjs=False,
        div_id=div_id,
        config=_CONFIG,
        post_script=_ON_CLICK,
        validate=False,
    )


def _layout(title: str, xtitle: str, xaxis: dict) -> dict:
    return {
        "title": {"text": title, "font": {"size": 14}},
        "xaxis": {"title": {"text": xtitle}, **xaxis},
        "yaxis": {"title": {"text": "test top-1 (%)"}},
        "template": _template(),
        "height": 480,
        "margin": {"l": 60, "r": 20, "t": 50, "b": 50},
        "legend": {"font": {"size": 11}},
        "hovermode": "closest",
    }


def accuracy_figure(section: Section, records: list[RunRecord], url: Callable[[str], str], div_id: str) -> str:
    """Mean test top-1 per method and target with its 95 % t interval (lines), and every run
    (points), against achieved sparsity on the PNG's axis (-log10(1 - sparsity))."""
    traces: list[dict] = []
    by: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        if not is_dense(r.method) and r.achieved_sparsity is not None and r.test_top1 is not None:
            by[r.method].append(r)
    xs_all: list[float] = []
    for method in sorted(by, key=method_order):
        colour, symbol = _style(method)
        groups: dict[float, list[RunRecord]] = defaultdict(list)
        for r in by[method]:
            groups[sparsity_key(r.target_sparsity)].append(r)
        pts = []
        for _, rs in sorted(groups.items()):
            x = _log_x(statistics.fmean(r.achieved_sparsity for r in rs))  # type: ignore[misc]
            mean, hw = mean_ci([100.0 * r.test_top1 for r in rs])  # type: ignore[operator]
            pts.append((x, mean, hw or 0.0, len(rs), rs[0].target_sparsity))
        pts.sort()
        xs_all += [p[0] for p in pts]
        traces.append(
            dict(
                type="scatter",
                x=[p[0] for p in pts],
                y=[p[1] for p in pts],
                error_y={"type": "data", "array": [p[2] for p in pts], "visible": True, "thickness": 1},
                mode="lines+markers",
                name=method,
                legendgroup=method,
                line={"color": colour},
                marker={"symbol": symbol, "size": 9, "color": colour},
                hovertemplate=[
                    f"<b>{method}</b> at {pct(t)} %: {m:.2f} ± {hw:.2f} % (n={n})<extra></extra>"
                    for _, m, hw, n, t in pts
                ],
                customdata=[""] * len(pts),
            )
        )
        runs = by[method]
        traces.append(
            dict(
                type="scatter",
                x=[_log_x(r.achieved_sparsity) for r in runs],  # type: ignore[arg-type]
                y=[100.0 * r.test_top1 for r in runs],  # type: ignore[operator]
                mode="markers",
                name=f"{method} runs",
                legendgroup=method,
                showlegend=False,
                marker={"symbol": symbol, "size": 6, "color": colour, "opacity": 0.45},
                hovertemplate=[_hover(r) + "<extra>click: open in MLflow</extra>" for r in runs],
                customdata=[url(r.run_id) for r in runs],
            )
        )
    lo = min(xs_all, default=0.0)
    hi = max(xs_all, default=1.0)
    refs = [("dense", section.dense, "black", "dash")] if section.dense is not None else []
    plans: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if is_matched(r.method) and r.test_top1 is not None:
            plans[r.method].append(r.test_top1)
    refs += [(label, statistics.fmean(v), "dimgray", "dot") for label, v in sorted(plans.items())]
    for label, value, colour, dash in refs:
        traces.append(
            dict(
                type="scatter",
                x=[lo - 0.1, hi + 0.1],
                y=[100.0 * value] * 2,
                mode="lines",
                name=f"{label} ({pct(value)} %)",
                line={"color": colour, "dash": dash, "width": 1.5},
                hovertemplate=f"{label}: {pct(value)} %<extra></extra>",
                customdata=["", ""],
            )
        )
    ticks = [s for s in _TICK_SPARSITIES if lo - 0.15 <= _log_x(s) <= hi + 0.15] or [0.0, 0.9, 0.99]
    layout = _layout(
        f"{section.dataset} / {section.model}: accuracy vs sparsity (mean ± 95 % t interval; points: runs)",
        "achieved sparsity (log scale in 1 − sparsity)",
        {"tickvals": [_log_x(s) for s in ticks], "ticktext": [_tick_label(s) for s in ticks]},
    )
    return _html(traces, layout, div_id)


def cost_figure(section: Section, records: list[RunRecord], url: Callable[[str], str], div_id: str) -> str:
    """Test top-1 of every run against its total training budget (dense-equivalent epochs)."""
    traces: list[dict] = []
    by: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.test_top1 is not None and r.budget_total_epochs:
            by[r.method].append(r)
    for method, rs in sorted(by.items(), key=lambda kv: method_order(kv[0])):
        colour, symbol = _style(method)
        traces.append(
            dict(
                type="scatter",
                x=[r.budget_total_epochs for r in rs],
                y=[100.0 * r.test_top1 for r in rs],  # type: ignore[operator]
                mode="markers",
                name=method,
                marker={"symbol": symbol, "size": 8, "color": colour},
                hovertemplate=[
                    _hover(r) + f"<br>budget {r.budget_total_epochs:.1f} epochs<extra>click: open in MLflow</extra>"
                    for r in rs
                ],
                customdata=[url(r.run_id) for r in rs],
            )
        )
    layout = _layout(
        f"{section.dataset} / {section.model}: accuracy against training cost (one point per run)",
        "total training budget (dense-equivalent epochs, including the run it starts from)",
        {"type": "log"},
    )
    return _html(traces, layout, div_id)
