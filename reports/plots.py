"""The plots of a report section, drawn with matplotlib's object-oriented API (no pyplot, so no
global backend or figure registry), and the colour and marker of each method."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

from reports.fmt import pct, sparsity_key
from reports.records import DENSE, RunRecord, is_dense, is_matched, method_order
from reports.stats import mean_ci
from reports.tables import Section

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
    return names + sorted(more - set(names) - {m for m in more if is_dense(m)})


@functools.lru_cache(maxsize=8)
def _palette(labels: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    colours = _colours()
    return {label: (colours[i % len(colours)], _MARKERS[i % len(_MARKERS)]) for i, label in enumerate(labels)}


def method_style(method: str) -> tuple[str, str]:
    """(colour, marker) of a method or variant; budget-matched dense controls are grey squares,
    labels the registry does not know get a stable colour and marker (by name, not by position)."""
    if method == DENSE:
        return _CONTROL_STYLE
    if is_matched(method) or method.startswith(DENSE):
        return _MATCHED_STYLE
    style = _palette(tuple(style_labels())).get(method)
    if style is not None:
        return style
    import zlib

    h = zlib.crc32(method.encode())
    return (_colours()[h % len(_colours())], _MARKERS[(h // len(_colours())) % len(_MARKERS)])


def new_figure(size=(7.0, 4.5)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Fixed margins: constrained layout measures every text artist and dominated the build time.
    fig = Figure(figsize=size, dpi=110)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.92)
    FigureCanvasAgg(fig)
    return fig


# Drawing the PNGs is most of a report build's time, and every figure is independent. Inside
# `parallel_saves()`, save() hands each figure to a forked child as soon as a CPU is free for one,
# while this process goes on with the rest of the report (the figure reaches the child by fork,
# not by pickling); what no child has taken when the block ends is drawn here, and a child that
# fails has its figure drawn again here, so no PNG is lost.
_drawer: _Drawer | None = None


def cpus() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _draw(jobs) -> None:
    for fig, path in jobs:
        fig.savefig(path)


CHILD_TIMEOUT_S = 300.0  # a child still drawing after this is taken for hung: killed, its figure drawn here


class _Drawer:
    def __init__(self, children: int):
        self.children = children if hasattr(os, "fork") else 0
        self.queue: list[tuple[object, Path]] = []
        self.running: list[tuple[object, tuple[object, Path]]] = []  # (process, its job)
        self.forked = 0
        self.redrawn = 0  # figures a child did not write, drawn here instead

    def add(self, job: tuple[object, Path]) -> None:
        self.queue.append(job)
        self.pump()

    def pump(self) -> None:
        """Reap the children that are done; start one per queued figure while slots are free."""
        for proc, job in [pj for pj in self.running if not pj[0].is_alive()]:  # type: ignore[attr-defined]
            self.running.remove((proc, job))
            self._reap(proc, job)
        if self.children < 1:
            return
        import multiprocessing

        while self.queue and len(self.running) < self.children:
            job = self.queue.pop(0)
            proc = multiprocessing.get_context("fork").Process(target=_draw, args=([job],), daemon=True)
            try:
                proc.start()
            except OSError:  # no fork (out of processes or memory): this process draws it
                _draw([job])
                continue
            self.running.append((proc, job))
            self.forked += 1

    def _reap(self, proc, job, redraw: bool = True) -> None:
        proc.join(CHILD_TIMEOUT_S)
        if proc.is_alive():  # hung: stop it and draw the figure here
            proc.kill()
            proc.join()
        if proc.exitcode != 0 and redraw:  # the child failed: draw its figure here
            self.redrawn += 1
            _draw([job])

    def finish(self, redraw: bool = True) -> None:
        """Draw what is queued (the children take from the front, this process from the back),
        then wait for the children; with redraw False (the build failed) only wait."""
        while self.queue and redraw:
            _draw([self.queue.pop()])
            self.pump()
        self.queue.clear()
        for proc, job in self.running:
            self._reap(proc, job, redraw)
        self.running = []


def save(fig, path: Path) -> None:
    """Write the figure as a PNG now, or, inside parallel_saves(), by the time the block ends."""
    if _drawer is None:
        fig.savefig(path)
    else:
        _drawer.add((fig, Path(path)))


@contextlib.contextmanager
def parallel_saves(workers: int | None = None):
    """Draw the figures save() is given inside the block in up to `workers` processes (this one
    and forked children; default: one per CPU), overlapping the code that follows each save();
    every PNG is written when the block is left. Yields the drawer (`forked` counts the children
    started, `redrawn` the figures a child failed to write and this process drew)."""
    global _drawer
    outer, _drawer = _drawer, _Drawer((cpus() if workers is None else workers) - 1)
    drawer = _drawer
    try:
        yield drawer
    except BaseException:
        _drawer = outer
        drawer.finish(redraw=False)  # the build failed: wait for the children, draw nothing more
        raise
    _drawer = outer
    drawer.finish()


def log_axis(ax, which: str = "y", fmt: str = "{:g}") -> None:
    """A log scale on the x or y axis with plain tick labels (0.01, 1, 100; `fmt` formats each):
    matplotlib's default 10^k labels are typeset with mathtext, tick by tick, and were a third of
    a report's drawing. Minor ticks are labelled too where the majors would leave the axis bare:
    every one when no power of ten is in view, 2x and 5x ones when the view spans about a decade."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    # minor ticks at 2 and 5 times each power of ten, not at 2..9: every tick is a few artists
    # that matplotlib makes and lays out one by one
    axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: fmt.format(v)))

    def minor(v: float, _pos) -> str:
        lo, hi = sorted(axis.get_view_interval())
        if lo <= 0 or v <= 0:
            return ""
        if math.floor(math.log10(lo)) == math.floor(math.log10(hi)):
            return fmt.format(v)  # no major tick in view: every minor one is labelled
        if math.log10(hi / lo) > 1.2:
            return ""
        return fmt.format(v) if f"{v:g}".lstrip("-0.")[:1] in ("2", "5") else ""

    axis.set_minor_formatter(FuncFormatter(minor))


# The x axis of the accuracy plot is -log10(1 - sparsity): equal steps for 90 %, 99 %, 99.9 %.
_SPARSITY_CAP = 1.0 - 1e-6
_TICK_SPARSITIES = [0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 0.9995, 0.9999, 0.99999]


def _log_x(s: float) -> float:
    return -math.log10(1.0 - min(max(s, 0.0), _SPARSITY_CAP))


def _tick_label(s: float) -> str:
    return f"{round(100.0 * s, 4):g}%"


def plot_accuracy(section: Section, path: Path, records: list[RunRecord]) -> None:
    fig = new_figure()
    ax = fig.add_subplot()
    by_method: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        if not is_dense(r.method) and r.achieved_sparsity is not None and r.test_top1 is not None:
            by_method[r.method].append(r)

    xs_all: list[float] = []
    any_band = False
    for method in sorted(by_method):
        groups: dict[float, list[RunRecord]] = defaultdict(list)
        for r in by_method[method]:
            groups[sparsity_key(r.target_sparsity)].append(r)
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
            ax.fill_between(
                [b[0] for b in band], [b[1] for b in band], [b[2] for b in band], color=colour, alpha=0.18, linewidth=0
            )
        elif band:  # a single point with seeds: an error bar instead of a band
            x, lo, hi = band[0]
            ax.errorbar([x], [(lo + hi) / 2], yerr=[[(hi - lo) / 2]], color=colour, capsize=3)

    if section.dense is not None:
        ax.axhline(
            100.0 * section.dense, color="black", linestyle="--", linewidth=1.2, label=f"dense ({pct(section.dense)}%)"
        )
    plans: dict[str, list[float]] = defaultdict(list)
    for r in records:
        if is_matched(r.method) and r.test_top1 is not None:
            plans[r.method].append(r.test_top1)
    for label, vals in sorted(plans.items()):
        m = statistics.fmean(vals)
        ax.axhline(100.0 * m, color="dimgray", linestyle=":", linewidth=1.4, label=f"{label} ({pct(m)}%)")

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
    ax.set_title(f"{section.dataset} / {section.model}: accuracy vs sparsity ({seeds_note})", fontsize=10, y=1.0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")  # accuracy falls with sparsity: lower left is free
    save(fig, path)


def plot_density(
    section: Section, path: Path, curves: list[tuple[RunRecord, list[tuple[int, float]], list[tuple[int, float]]]]
) -> None:
    fig = new_figure()
    ax = fig.add_subplot()
    targets = sorted({sparsity_key(r.target_sparsity) for r, _, _ in curves})
    # targets, not methods: a sequential colour map (light to dark with sparsity), so no colour
    # here reads as one of the methods' colours of the other plots
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    palette = [cmap(0.85 - 0.75 * i / max(len(targets) - 1, 1)) for i in range(len(targets))]
    colour = dict(zip(targets, palette))
    labelled_measured: set[float] = set()
    drawn_target: set[float] = set()
    for rec, measured, target in sorted(curves, key=lambda c: (sparsity_key(c[0].target_sparsity), c[0].seed or 0)):
        key = sparsity_key(rec.target_sparsity)
        name = pct(rec.target_sparsity) + "% sparsity"
        pos_measured = [(s, 100.0 * v) for s, v in measured if v > 0]
        if pos_measured:
            ax.plot(
                *zip(*pos_measured),
                color=colour[key],
                linewidth=1.4,
                alpha=0.9,
                label=None if key in labelled_measured else f"measured, target {name}",
            )
            labelled_measured.add(key)
        # The target trajectory is the same for every seed: draw it once per target.
        pos_target = [(s, 100.0 * v) for s, v in target if v > 0]
        if pos_target and key not in drawn_target:
            ax.plot(
                *zip(*pos_target), color=colour[key], linestyle="--", linewidth=1.2, label=f"target trajectory, {name}"
            )
            drawn_target.add(key)
    from matplotlib.ticker import MaxNLocator

    log_axis(ax, "y", "{:g}%")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    # A fixed corner: with one line per run, matplotlib's "best" placement search dominates
    # the plotting time.  Densities fall over training, so the lower left is usually empty.
    _finish(
        fig,
        ax,
        path,
        "epoch",
        "density (% of prunable weights)",
        f"{section.dataset} / {section.model}: density per epoch ({label_list(curves)})",
        "lower left",
    )


def label_list(curves) -> str:
    """The methods (report labels) of the density curves, for a title."""
    return ", ".join(sorted({c[0].method for c in curves}, key=method_order))


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend_loc: str) -> None:
    """Labels, grid, a legend in a fixed corner, saved."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10, y=1.0)  # y fixed: matplotlib skips its costly title placement
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc=legend_loc)
    save(fig, path)


def layer_target(recs: list[RunRecord]) -> float | None:
    """The target the per-layer view shows: 90 % when runs have it, else the highest target that
    at least two methods reached with layer counts."""
    by: dict[float, set[str]] = defaultdict(set)
    for r in recs:
        if not is_dense(r.method) and r.layer_counts and r.target_sparsity:
            by[sparsity_key(r.target_sparsity)].add(r.method)
    ok = [t for t, ms in by.items() if len(ms) >= 2]
    if not ok:
        return None
    return 0.9 if 0.9 in ok else max(ok)


def plot_layers(section: Section, path: Path, recs: list[RunRecord], target: float) -> None:
    """Density of each prunable layer per method at one target (mean over seeds): how each method
    spreads the same budget over the layers."""
    import numpy as np

    by: dict[str, list[list[dict]]] = defaultdict(list)
    for r in recs:
        if not is_dense(r.method) and r.layer_counts and sparsity_key(r.target_sparsity) == target:
            by[r.method].append(r.layer_counts)
    methods = sorted(by, key=method_order)
    layers = [row["layer"] for row in by[methods[0]][0]]
    fig = new_figure()
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    x = np.arange(len(layers))
    for i, m in enumerate(methods):
        dens = [
            statistics.fmean(c[j]["nonzero"] / max(c[j]["numel"], 1) for c in by[m] if j < len(c))
            for j in range(len(layers))
        ]
        colour, _ = method_style(m)
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, [100 * d for d in dens], width, color=colour, label=m)
    log_axis(ax, "y")
    ax.set_xticks(x, layers, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("density of the layer (%, log scale)")
    ax.set_title(f"{section.dataset} / {section.model}: density per layer at {pct(target)} % sparsity", y=1.0)
    ax.legend(fontsize=7, ncol=2)
    fig.subplots_adjust(bottom=0.22, left=0.12)
    save(fig, path)


def plot_cost(section: Section, path: Path, records: list[RunRecord]) -> None:
    """Test top-1 against total training budget (dense-equivalent epochs), one point per run."""
    fig = new_figure()
    ax = fig.add_subplot()
    by: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.test_top1 is not None and r.budget_total_epochs:
            by[r.method].append(r)
    for m, rs in sorted(by.items(), key=lambda kv: method_order(kv[0])):
        colour, marker = method_style(m)
        ax.scatter(
            [r.budget_total_epochs for r in rs],
            [100.0 * r.test_top1 for r in rs],
            s=22,
            marker=marker,
            color=colour,
            label=m,
        )
    log_axis(ax, "x")
    _finish(
        fig,
        ax,
        path,
        "total training budget (dense-equivalent epochs, including the run it starts from)",
        "test top-1 (%)",
        f"{section.dataset} / {section.model}: accuracy against training cost",
        "lower right",
    )


def plot_speedups(section: Section, path: Path, records: list[RunRecord]) -> None:
    """Measured inference speed-up (`hfbench bench deploy`) against the theoretical one (dense
    MACs / remaining MACs), one point per run and batch size: colour and marker by method, the
    batch size in the label; the diagonal is "as fast as the MAC count says", the horizontal
    line "as fast as dense"."""
    fig = new_figure()
    ax = fig.add_subplot()
    fills = ("full", "none")  # batch sizes alternate filled / open markers
    batches = sorted({b for r in records for b in r.measured_speedup})
    lo, hi = 1.0, 1.0
    by: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.theoretical_speedup and r.measured_speedup:
            by[r.method].append(r)
    for m, rs in sorted(by.items(), key=lambda kv: method_order(kv[0])):
        colour, marker = method_style(m)
        for i, b in enumerate(batches):
            pts = [(r.theoretical_speedup, r.measured_speedup[b]) for r in rs if b in r.measured_speedup]
            if not pts:
                continue
            xs, ys = zip(*pts)
            lo, hi = min(lo, *xs, *ys), max(hi, *xs, *ys)
            open_marker = fills[i % 2] == "none"
            ax.scatter(
                xs,
                ys,
                s=26,
                marker=marker,
                facecolors="none" if open_marker else colour,
                edgecolors=colour,
                label=f"{m}, batch {b}",
            )
    ax.plot([lo, hi], [lo, hi], color="0.6", lw=1, ls="--", zorder=0, label="measured = theoretical")
    ax.axhline(1.0, color="0.3", lw=0.8, zorder=0)
    log_axis(ax, "x")
    log_axis(ax, "y")
    _finish(
        fig,
        ax,
        path,
        "theoretical speed-up (dense MACs / remaining MACs, ×)",
        "measured speed-up (dense time / sparse time, ×)",
        f"{section.dataset} / {section.model}: measured against theoretical inference speed-up",
        "upper left",
    )
