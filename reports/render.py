"""Writing a report's content: results.csv, report.md and the self-contained index.html."""

from __future__ import annotations

import base64
import csv
import html
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reports import interactive
from reports.fmt import DEFAULT_UI, fmt_time, one_line, run_url
from reports.records import RunRecord
from reports.tables import ACC_NOTE, FAILED_HEADER, Section, table_cells, table_header

# Columns of results.csv, in order.  The first block is the contract; the rest is extra context.
CSV_COLUMNS = [
    "run_id",
    "run_hash",
    "status",
    "method",
    "model",
    "dataset",
    "seed",
    "target_sparsity",
    "achieved_sparsity",
    "test_top1",
    "val_top1",
    "epochs",
    "wall_time_s",
    "error",
    "final_density",
    "sweep",
    "run_name",
    "config_hash",
    "start_time",
    "end_time",
    "test_top5",
    "compression_ratio",
    "theoretical_speedup",
    "theoretical_speedup_prunable",
    "dense_macs",
    "remaining_macs",
    "epochs_run",
    "optimizer_steps",
    "batch_size",
    "world_size",
    "device_hours",
    "git_commit",
    "hardware",
    "torch",
    "config_artifact",
    "rerun_command",
    # the training budget (engine.budget): this run's own, and in total with the run it starts from
    "budget_steps",
    "budget_images",
    "budget_epochs",
    "budget_device_s",
    "budget_total_steps",
    "budget_total_images",
    "budget_total_epochs",
    "budget_total_device_s",
    "budget_parent_counted",
    "control",
    "budget_ratio",
]


def write_csv(path: Path, records: list[RunRecord]) -> None:
    """results.csv: one row per run, CSV_COLUMNS in order."""

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
                "start_time": fmt_time(r.start_time),
                "end_time": fmt_time(r.end_time),
            }
            w.writerow([cell(row[c]) for c in CSV_COLUMNS])


REPRODUCE_NOTE = (
    "Reproduce any point: results.csv has one row per run with its run hash, config hash, git commit, "
    "hardware, the run's config.yaml artifact and the command that retrains it (hfbench train <config.yaml>). "
    "Its accuracies and sparsities are fractions (0.9123), as MLflow stores them; the tables show percent."
)


def env_summary(records: list[RunRecord]) -> list[tuple[str, str]]:
    """Each env.* tag (a param in stores from before they were tags) with its value, or its
    distinct values with run counts if they differ."""
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
class Content:
    """Everything both renderers (Markdown and HTML) show, computed once."""

    title: str
    experiment: str
    experiment_id: str
    tracking_uri: str
    generated: str
    counts: dict[str, int]
    sweeps: list[str]
    env: list[tuple[str, str]]
    sections: list[Section]
    failed: list[list[str]]
    ui: str = ""  # the MLflow UI the rows link to ("" for no links)
    failed_ids: list[str] = field(default_factory=list)  # the MLflow run of each failed row

    def url(self, run_id: str) -> str:
        return run_url(self.ui, self.experiment_id, run_id)

    def ui_note(self) -> str:
        how = (
            f"open `mlflow ui --backend-store-uri {self.tracking_uri}` first (it serves {self.ui})"
            if self.ui == DEFAULT_UI
            else f"they open in the MLflow UI at {self.ui}"
        )
        return f"Each row links to its MLflow runs (one per seed): {how}."


def _md_escape(text: str) -> str:
    return one_line(text).replace("\\", "\\\\").replace("|", "\\|")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return lines


def _counts_line(counts: dict[str, int]) -> str:
    parts = [f"{n} {status.lower()}" for status, n in sorted(counts.items())]
    return f"{sum(counts.values())} training runs ({', '.join(parts)})"


def render_md(c: Content) -> str:
    out = [f"# {c.title}", ""]
    out.append(f"Experiment `{c.experiment}` (id {c.experiment_id}) at `{c.tracking_uri}`, generated {c.generated}.")
    out.append("")
    out.append(_counts_line(c.counts) + ".")
    if c.sweeps:
        out.append(f"Sweeps: {', '.join(f'`{s}`' for s in c.sweeps)}.")
    out += [""]
    out += ["## Results", ""]  # the answer first; how to read it after the tables
    for s in c.sections:
        out += [f"### {s.dataset} / {s.model}", ""]
        summary = [t for t in s.tables if getattr(t, "kind", "") == "summary"]
        for t in summary:  # the answer first
            out += [f"#### {t.title}", ""] + _md_table(t.header, t.rows) + ["", t.note, ""]
        header, rows = table_header(s), [table_cells(r, s) for r in s.rows]
        if c.ui:
            header = header + ["MLflow runs"]
            rows = [
                cells + [" ".join(f"[{lab}]({url})" for lab, url in _row_links(c, r))] for cells, r in zip(rows, s.rows)
            ]
        out += _md_table(header, rows)
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
    out += [
        "## Reading the tables",
        "",
        ACC_NOTE,
        "",
        *([c.ui_note(), ""] if c.ui else []),
        REPRODUCE_NOTE.replace("hfbench train <config.yaml>", "`hfbench train <config.yaml>`"),
        "",
    ]
    out += ["## Failed runs", ""]
    if c.failed:
        rows = c.failed
        if c.ui and c.failed_ids:
            rows = [[f"[{row[0]}]({c.url(rid)})"] + row[1:] for row, rid in zip(c.failed, c.failed_ids)]
        out += _md_table(FAILED_HEADER, rows)
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
        out.append("No `env.*` tags were logged.")
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


def _row_links(c: Content, row) -> list[tuple[str, str]]:
    """(label, url) of each MLflow run of a table row: its seed, or its position without one."""
    return [
        (f"s{seed}" if seed is not None else f"#{i + 1}", c.url(rid))
        for i, (seed, rid) in enumerate(zip(row.seeds, row.run_ids))
    ]


def _html_table(
    header: list[str],
    rows: list[list[str]],
    numeric: set[int],
    err_col: int | None = None,
    kind: str = "",
    links: list[list[tuple[str, str]]] | None = None,
    first_links: list[str] | None = None,
) -> str:
    """An HTML table, every cell escaped; `links` adds a last column "MLflow runs" of (label,
    url) anchors per row, `first_links` makes each row's first cell a link."""
    e = html.escape
    parts = [
        f'<table data-kind="{e(kind)}">' if kind else "<table>",
        "<tr>" + "".join(f"<th>{e(h)}</th>" for h in header + (["MLflow runs"] if links else [])) + "</tr>",
    ]
    for j, row in enumerate(rows):
        cells = []
        for i, v in enumerate(row):
            cls = ' class="num"' if i in numeric else (' class="err"' if i == err_col else "")
            text = e(v)
            if i == 0 and first_links:
                text = f'<a class="run" href="{e(first_links[j])}">{text}</a>'
            cells.append(f"<td{cls}>{text}</td>")
        if links:
            cells.append(
                "<td>" + " ".join(f'<a class="run" href="{e(u)}">{e(lab)}</a>' for lab, u in links[j]) + "</td>"
            )
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)


def render_html(c: Content, images: dict[str, bytes]) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{e(c.title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{e(c.title)}</h1>",
        f"<p>Experiment <code>{e(c.experiment)}</code> (id {e(c.experiment_id)}) at "
        f"<code>{e(c.tracking_uri)}</code>, generated {e(c.generated)}.</p>",
        f"<p>{e(_counts_line(c.counts))}.</p>",
    ]
    if c.sweeps:
        out.append("<p>Sweeps: " + ", ".join(f"<code>{e(s)}</code>" for s in c.sweeps) + ".</p>")
    out += ["<h2>Results</h2>"]  # the answer first; how to read it after the tables
    scripted = False
    for s in c.sections:
        out.append(f"<h3>{e(s.dataset)} / {e(s.model)}</h3>")
        summary = [t for t in s.tables if getattr(t, "kind", "") == "summary"]
        for t in summary:  # the answer first
            out.append(f"<h4>{e(t.title)}</h4>")
            out.append(_html_table(t.header, t.rows, numeric=t.numeric, kind=t.kind))
            out.append(f"<p>{e(t.note)}</p>")
        header = table_header(s)
        out.append(
            _html_table(
                header,
                [table_cells(r, s) for r in s.rows],
                numeric=set(range(1, len(header))),
                kind="accuracy",
                links=[_row_links(c, r) for r in s.rows] if c.ui else None,
            )
        )
        out += [f"<p>{e(n)}</p>" for n in s.notes]
        if s.interactive and not scripted:
            out.append(interactive.script())  # once, before the first figure
            scripted = True
        out += [f'<div class="interactive" data-png="{e(png)}">{div}</div>' for png, div in s.interactive]
        twins = {png for png, _ in s.interactive}
        for name, caption in s.plots:
            b64 = base64.b64encode(images[name]).decode("ascii")
            fig = (
                f'<figure id="{e(name)}"><img src="data:image/png;base64,{b64}" '
                f'alt="{e(caption)}"><figcaption>{e(caption)} ({e(name)})</figcaption></figure>'
            )
            # a plot drawn interactively above keeps its PNG (as in report.md), folded away
            out.append(f"<details><summary>{e(name)} (static)</summary>{fig}</details>" if name in twins else fig)
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
    out += [
        "<h2>Reading the tables</h2>",
        f"<p>{e(ACC_NOTE)}</p>",
        *([f"<p>{e(c.ui_note())}</p>"] if c.ui else []),
        f"<p>{e(REPRODUCE_NOTE).replace('hfbench train &lt;config.yaml&gt;', '<code>hfbench train &lt;config.yaml&gt;</code>')}</p>",
    ]
    out.append("<h2>Failed runs</h2>")
    if c.failed:
        out.append(
            _html_table(
                FAILED_HEADER,
                c.failed,
                numeric={2, 3},
                err_col=6,
                kind="failed",
                first_links=[c.url(r) for r in c.failed_ids] if c.ui and c.failed_ids else None,
            )
        )
    else:
        out.append("<p>None.</p>")
    plots = [(n, cap) for s in c.sections for n, cap in s.plots]
    if plots:
        out.append("<h2>Plots</h2>")
        out.append("<ul>" + "".join(f'<li><a href="#{e(n)}">{e(cap)}</a></li>' for n, cap in plots) + "</ul>")
    out.append("<h2>Environment</h2>")
    if c.env:
        out.append("<ul>" + "".join(f"<li><code>{e(k)}</code>: {e(one_line(v))}</li>" for k, v in c.env) + "</ul>")
    else:
        out.append("<p>No <code>env.*</code> tags were logged.</p>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)
