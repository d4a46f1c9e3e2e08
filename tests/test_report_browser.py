"""index.html in a real browser: headless Chromium loads the self-contained report and a check
script (added to a copy of the page, never to the report itself) records, once the page has
loaded, whether every image decoded (naturalWidth > 0), which tables are present, and any error
event; Chromium's console log (--enable-logging=stderr) must hold no CONSOLE line.

Needs Debian's chromium (scripts/setup.sh installs it); fails, not skips, without it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

_HEAD = """<script>
window.__hfErrors = [];
window.addEventListener('error', function (e) {
  var t = e.target;
  window.__hfErrors.push(t && t.tagName ? ('resource ' + t.tagName + ' failed') : String(e.message));
}, true);
</script>"""

_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var res = {images: imgs.length, broken: [], tables: {}, errors: window.__hfErrors,
             publishedNone: document.querySelectorAll('[data-kind="published-none"]').length};
  imgs.forEach(function (i) { if (!(i.complete && i.naturalWidth > 0)) res.broken.push(i.alt); });
  res.rows = {}; res.linkedRows = {}; res.links = [];
  document.querySelectorAll('table').forEach(function (t) {
    var k = t.getAttribute('data-kind') || '(none)';
    res.tables[k] = (res.tables[k] || 0) + 1;
    t.querySelectorAll('tr').forEach(function (tr, i) {
      if (i === 0) return;  // the header
      res.rows[k] = (res.rows[k] || 0) + 1;
      var a = tr.querySelectorAll('a.run');
      if (a.length) res.linkedRows[k] = (res.linkedRows[k] || 0) + 1;
      a.forEach(function (x) { res.links.push([k, x.textContent, x.href]); });
    });
  });
  // the interactive figures: drawn (plotly's SVG), their traces, the run links their points carry,
  // and what a click on the first linked point opens (window.open recorded, not followed)
  var opened = [];
  window.open = function (u) { opened.push(u); return null; };
  res.figures = [];
  document.querySelectorAll('div.interactive').forEach(function (box) {
    var gd = box.querySelector('.js-plotly-plot');
    var f = {png: box.getAttribute('data-png'), drawn: box.querySelectorAll('svg.main-svg').length,
             traces: gd && gd.data ? gd.data.length : 0, links: [], clicked: null};
    (gd && gd.data ? gd.data : []).forEach(function (t) {
      (t.customdata || []).forEach(function (u) { if (u) f.links.push(u); });
    });
    if (gd && f.links.length) {
      gd.emit('plotly_click', {points: [{customdata: f.links[0]}]});
      f.clicked = opened.length ? opened[opened.length - 1] : null;
    }
    res.figures.push(f);
  });
  var pre = document.createElement('pre');
  pre.id = 'hfbench-check';
  pre.textContent = JSON.stringify(res);
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        "chromium is not installed: the browser check of index.html needs it "
        "(scripts/setup.sh installs Debian's chromium package: apt-get install chromium)"
    )


def check_page(page: Path, tmp: Path) -> tuple[dict, list[str]]:
    """Load a copy of `page` with the check script in headless Chromium: (result, console lines)."""
    html = page.read_text(encoding="utf-8")
    assert "<head>" in html and "</body>" in html
    probe = tmp / f"check_{page.stem}.html"
    probe.write_text(
        html.replace("<head>", "<head>" + _HEAD, 1).replace("</body>", _CHECK + "</body>", 1), encoding="utf-8"
    )
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=20000",
        "--dump-dom",
        probe.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    m = re.search(r'<pre id="hfbench-check">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"the check script did not run (chromium exit {proc.returncode}); stderr tail: {proc.stderr[-2000:]}"
    import html as _html

    result = json.loads(_html.unescape(m.group(1)))
    console = [ln for ln in proc.stderr.splitlines() if "CONSOLE" in ln]
    return result, console


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from reports.bench_build import EXPERIMENT, make_store
    from reports.build import build_report

    root = tmp_path_factory.mktemp("browser")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    make_store(uri, 44, root / "artifacts", epochs=4, failed_every=20)
    files = build_report(uri, EXPERIMENT, root / "out")
    return root, files, uri


def test_index_html_in_chromium(report, tmp_path):
    root, files, uri = report
    result, console = check_page(files["index.html"], tmp_path)
    pngs = [n for n in files if n.endswith(".png")]
    assert result["images"] == len(pngs) > 0
    assert result["broken"] == [], f"images that did not load: {result['broken']}"
    assert result["errors"] == [], result["errors"]
    assert console == [], console
    t = result["tables"]
    sections = 2  # fmnist_cnn and lenet300
    assert t.get("accuracy") == sections
    assert t.get("summary") == sections  # the method x target grid leads each section
    assert t.get("compute") == sections
    assert t.get("targeting") == sections
    assert t.get("npl") == sections
    assert t.get("failed") == 1
    # no published number exists for Fashion-MNIST: each section says so instead of a table
    assert result["publishedNone"] == sections and "published" not in t
    assert "(none)" not in t, t
    # the two interactive figures of each section are drawn, one point per run, each point linked
    # to its run, and a click opens that run's page
    from mlflow import MlflowClient

    from reports.bench_build import EXPERIMENT
    from reports.records import is_dense, latest_finished, load

    figs = result["figures"]
    assert all(f["drawn"] >= 1 and f["traces"] >= 1 for f in figs), figs
    pngs_twinned = sorted(f["png"] for f in figs)
    assert pngs_twinned == sorted(n for n in pngs if n.startswith(("acc_vs_sparsity", "acc_vs_budget")))
    recs = latest_finished(
        load(
            MlflowClient(tracking_uri=uri),
            MlflowClient(tracking_uri=uri).get_experiment_by_name(EXPERIMENT).experiment_id,
        )
    )
    for f in figs:
        model = "fmnist_cnn" if "fmnist_cnn" in f["png"] else "lenet300"
        mine = [r for r in recs if r.model == model and r.test_top1 is not None]
        if f["png"].startswith("acc_vs_sparsity"):
            want = {r.run_id for r in mine if not is_dense(r.method) and r.achieved_sparsity is not None}
        else:
            want = {r.run_id for r in mine if r.budget_total_epochs}
        got = [u.split("/runs/")[1].split("?")[0] for u in f["links"]]
        assert sorted(got) == sorted(want), f["png"]
        assert f["clicked"] == f["links"][0]


def test_checker_catches_a_broken_image(report, tmp_path):
    """The check itself works: a corrupt data URI is reported, not silently passed."""
    _, files, _ = report
    page = files["index.html"].read_text(encoding="utf-8")
    bad = tmp_path / "broken.html"
    bad.write_text(
        re.sub(
            r'<img src="data:image/png;base64,[A-Za-z0-9+/=]{40}', '<img src="data:image/png;base64,AAAA', page, count=1
        ),
        encoding="utf-8",
    )
    result, _ = check_page(bad, tmp_path)
    assert len(result["broken"]) == 1


def test_every_row_links_to_its_mlflow_runs(report, tmp_path):
    """Every row of the accuracy tables and of the failed-runs table links to MLflow runs, each
    link names a run of this experiment (the seed it trained), and the runs behind a row are
    exactly the finished runs of its method and target."""
    from mlflow import MlflowClient

    from reports.bench_build import EXPERIMENT
    from reports.records import latest_finished, load
    from reports.tables import sparsity_key

    _, files, uri = report
    result, _ = check_page(files["index.html"], tmp_path)
    rows, linked = result["rows"], result["linkedRows"]
    assert rows["accuracy"] == linked["accuracy"] > 0 and rows["failed"] == linked["failed"] > 0, (rows, linked)
    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(EXPERIMENT).experiment_id
    recs = {r.run_id: r for r in load(c, exp)}
    pat = re.compile(
        rf"^http://127\.0\.0\.1:5000/#/experiments/{exp}/runs/([0-9a-f]{{32}})\?workflowType=machine_learning$"
    )
    acc: dict[tuple[str, str, float], set[str]] = {}
    for kind, label, href in result["links"]:
        m = pat.match(href)
        assert m and m.group(1) in recs, href
        r = recs[m.group(1)]
        if kind == "accuracy":
            assert label == f"s{r.seed}", (label, r.seed)
            acc.setdefault((r.model, r.method, sparsity_key(r.target_sparsity)), set()).add(r.run_id)
        else:
            assert kind == "failed" and r.status == "FAILED", (kind, r.status)
    want: dict[tuple[str, str, float], set[str]] = {}
    for r in latest_finished(recs.values()):
        want.setdefault((r.model, r.method, sparsity_key(r.target_sparsity)), set()).add(r.run_id)
    assert acc == want


SEEDS_REPORT = Path(__file__).resolve().parents[1] / "reports" / "fmnist_seeds"


def test_committed_multi_seed_report_in_chromium(tmp_path):
    """The committed report of the real 3-seed Fashion-MNIST sweep (configs/fmnist_seeds.yaml,
    built by `hfbench report`): every run finished, three seeds behind every method and
    sparsity, and index.html renders in Chromium with every image, the accuracy and compute
    tables (with the overhead benchmark's step-time ratios) and no error."""
    import csv

    rows = list(csv.DictReader((SEEDS_REPORT / "results.csv").open()))
    assert rows and {r["status"] for r in rows} == {"FINISHED"}
    seeds: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        seeds.setdefault((r["method"], r["target_sparsity"]), set()).add(r["seed"])
    assert len({m for m, _ in seeds}) == 12  # dense and the 11 pruning methods
    assert all(len(s) >= 3 for s in seeds.values()), {k: v for k, v in seeds.items() if len(v) < 3}
    result, console = check_page(SEEDS_REPORT / "index.html", tmp_path)
    pngs = list(SEEDS_REPORT.glob("*.png"))
    assert result["images"] == len(pngs) > 0
    assert result["broken"] == [] and result["errors"] == [] and console == [], (result, console)
    t = result["tables"]
    assert t.get("accuracy") == 1 and t.get("compute") == 1, t
    md = (SEEDS_REPORT / "report.md").read_text()
    assert "95 % t confidence interval" in md and "step-time ratio (bench)" in md


FAIR_REPORT = Path(__file__).resolve().parents[1] / "reports" / "fmnist_fair"


def test_committed_fair_report_in_chromium(tmp_path):
    """The committed report of the fair protocol (configs/fmnist_fair.yaml, 174 runs): every run
    finished, 3 seeds behind every method and target, every run within 0.5 pp of its target, no
    protocol flag, the dense convergence shown; index.html renders in Chromium with every image,
    the summary grid first, and no error."""
    import csv

    rows = list(csv.DictReader((FAIR_REPORT / "results.csv").open()))
    assert len(rows) == 174 and {r["status"] for r in rows} == {"FINISHED"}
    seeds: dict[tuple[str, str], set[str]] = {}
    for r in rows:
        seeds.setdefault((r["method"], r["target_sparsity"]), set()).add(r["seed"])
        if float(r["target_sparsity"]) > 0:
            assert abs(float(r["achieved_sparsity"]) - float(r["target_sparsity"])) <= 0.005, r["run_name"]
    assert all(len(s) == 3 for s in seeds.values())
    md = (FAIR_REPORT / "report.md").read_text()
    assert "Flagged cells: 0 of 55." in md and "converged (gain < 0.2 pp)" in md
    result, console = check_page(FAIR_REPORT / "index.html", tmp_path)
    assert result["images"] == len(list(FAIR_REPORT.glob("*.png"))) > 0
    assert result["broken"] == [] and result["errors"] == [] and console == [], (result, console)
    t = result["tables"]
    assert t.get("summary") == 1 and t.get("convergence") == 1 and t.get("protocol") == 1, t
    html = (FAIR_REPORT / "index.html").read_text()
    assert html.index('data-kind="summary"') < html.index('data-kind="accuracy"')


def test_screenshots_of_the_report_and_the_mlflow_ui(report, tmp_path):
    """reports.screenshots serves the store with `mlflow server` and photographs the report and
    the MLflow UI in headless Chromium: three PNGs of the asked width, none blank, and the
    server it started is gone afterwards."""
    import struct

    from reports.bench_build import EXPERIMENT
    from reports.screenshots import take

    _, files, uri = report
    shots = take(files["index.html"].parent, EXPERIMENT, uri, tmp_path / "shots")
    assert sorted(shots) == ["mlflow_run.png", "mlflow_runs.png", "report.png"]
    for name, path in shots.items():
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        width, height = struct.unpack(">II", data[16:24])
        assert width == 1400 and height >= 1000, (name, width, height)
        assert len(data) > 30_000, (name, len(data))  # a blank page compresses to a few KiB
    left = subprocess.run(["pgrep", "-f", f"mlflow server --backend-store-uri {uri}"], capture_output=True, text=True)
    assert left.stdout.strip() == "", left.stdout
