"""reports.build against a real MLflow sqlite store filled with synthetic training runs.

The runs follow the schema the training code logs on rank 0 (tags hfbench.*, params with the
config and env.*, per-epoch metrics with step = epoch, final_* metrics at the last step).
"""

from __future__ import annotations

import base64
import csv
import re
import statistics
import time

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from reports.build import ReportError, build_report

EXPERIMENT = "fmnist-report-test"
DATASET = "fashion_mnist"
MODEL = "lenet5"
SMALL_MODEL = "mlp-2x256"  # second (dataset, model) table: one seed per point
EPOCHS = 5
TARGETS = (0.5, 0.9, 0.98)
SEEDS = (0, 1)
ERROR_TEXT = "RuntimeError: CUDA out of memory | tried to allocate 2.00 GiB"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ENV = {
    "env.git_commit": "0123abcd4567",
    "env.torch": "2.14.1",
    "env.deepspeed": "0.19.8",
    "env.mlflow": "3.17.2",
    "env.python": "3.11.2",
    "env.hardware": "cpu: 16 cores",
    "env.world_size": "1",
}


def _synthetic_accuracy(method: str, target: float, seed: int) -> tuple[float, float]:
    """Deterministic (test, val) top-1 for a run; seeds differ by a few tenths of a percent."""
    base = 0.9012
    drop = {"dense": 0.0, "hyperflux": 0.04, "magnitude": 0.09}[method] * target**4
    test = base - drop + 0.0037 * seed * (1.0 + 2.0 * target)  # spread grows with sparsity
    return round(test, 6), round(test + 0.0021, 6)


def _synthetic_achieved(method: str, target: float, seed: int) -> float:
    # Hyperflux regrows a little past its target; magnitude pruning hits it exactly.
    return target - 0.004 * (seed + 1) * target if method == "hyperflux" else target


def log_run(
    client: MlflowClient,
    exp_id: str,
    *,
    method: str,
    model: str,
    dataset: str,
    target: float,
    seed: int,
    epochs: int = EPOCHS,
    status: str = "FINISHED",
    error: str | None = None,
    run_index: int = 0,
) -> dict:
    """Log one synthetic run the way the training code does; return what was logged."""
    run_hash = f"{run_index:012x}"
    name = f"{method}-s{target}-seed{seed}"
    tags = {
        "hfbench.run_hash": run_hash,
        "hfbench.method": method,
        "hfbench.model": model,
        "hfbench.dataset": dataset,
        "hfbench.sweep": "fmnist-demo",
    }
    run = client.create_run(exp_id, tags=tags, run_name=name)
    rid = run.info.run_id
    params = {
        "method": method,
        "model": model,
        "dataset": dataset,
        "sparsity": str(target),
        "seed": str(seed),
        "epochs": str(epochs),
        "optim.lr": "0.1",
        "hyperflux.pruning_end": str(epochs - 1),
        "config_hash": f"cfg{run_index:09x}",
        **ENV,
    }
    test, val = _synthetic_accuracy(method, target, seed)
    achieved = _synthetic_achieved(method, target, seed)
    done_epochs = epochs if status == "FINISHED" else 2
    ts = int(time.time() * 1000)
    metrics: list[Metric] = []
    densities, target_densities = [], []
    for ep in range(1, done_epochs + 1):
        frac = ep / epochs
        dens = 1.0 - achieved * frac
        tgt = 1.0 - target * min(1.0, frac * 1.1)
        densities.append(dens)
        target_densities.append(tgt)
        per_epoch = {
            "train_loss": 1.0 / ep,
            "val_top1": val * frac,
            "test_top1": test * frac,
            "density": dens,
            "sparsity": 1.0 - dens,
            "lr": 0.1 / ep,
        }
        if method == "hyperflux":
            per_epoch.update(gamma=0.2 * ep, target_density=tgt)
        metrics += [Metric(k, v, ts + ep, ep) for k, v in per_epoch.items()]
    wall = 12.5 + run_index
    if status == "FINISHED":
        finals = {
            "final_test_top1": test,
            "final_val_top1": val,
            "final_sparsity": achieved,
            "final_density": 1.0 - achieved,
            "wall_time_s": wall,
        }
        metrics += [Metric(k, v, ts + epochs, epochs) for k, v in finals.items()]
    batch_tags = [RunTag("hfbench.error", error)] if error else []
    client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in params.items()], tags=batch_tags)
    client.set_terminated(rid, status=status)
    return {
        "run_id": rid,
        "run_hash": run_hash,
        "status": status,
        "method": method,
        "model": model,
        "dataset": dataset,
        "seed": seed,
        "target": target,
        "epochs": epochs,
        "test": test if status == "FINISHED" else test * done_epochs / epochs,
        "val": val if status == "FINISHED" else val * done_epochs / epochs,
        "achieved": achieved if status == "FINISHED" else 1.0 - densities[-1],
        "wall": wall if status == "FINISHED" else None,
        "error": error or "",
        "density": densities,
        "target_density": target_densities,
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(EXPERIMENT)
    logged: list[dict] = []
    i = 0

    def add(**kw):
        nonlocal i
        i += 1
        logged.append(log_run(client, exp_id, run_index=i, **kw))

    for seed in SEEDS:
        add(method="dense", model=MODEL, dataset=DATASET, target=0.0, seed=seed)
    for method in ("hyperflux", "magnitude"):
        for target in TARGETS:
            for seed in SEEDS:
                add(method=method, model=MODEL, dataset=DATASET, target=target, seed=seed)
    add(method="magnitude", model=MODEL, dataset=DATASET, target=0.98, seed=7, status="FAILED", error=ERROR_TEXT)
    add(method="dense", model=SMALL_MODEL, dataset=DATASET, target=0.0, seed=0)
    add(method="magnitude", model=SMALL_MODEL, dataset=DATASET, target=0.9, seed=0)
    # An experiment that exists but is empty.
    client.create_experiment("empty-experiment")

    out = root / "out"
    files = build_report(uri, EXPERIMENT, out, title="Synthetic FMNIST report")
    return {"uri": uri, "out": out, "files": files, "logged": logged}


def _half_width(vals: list[float]) -> float:
    """95 % t confidence half-width of the mean, computed here independently (scipy)."""
    from scipy.stats import t

    return t.ppf(0.975, len(vals) - 1) * statistics.stdev(vals) / len(vals) ** 0.5


def _mean_std(vals: list[float]) -> str:
    mean = f"{100 * statistics.fmean(vals):.2f}"
    return mean if len(vals) == 1 else f"{mean} ± {100 * _half_width(vals):.2f}"


def _welch(a: list[float], b: list[float]) -> float | None:
    from scipy.stats import t

    parts = [(statistics.variance(v) / len(v), len(v) - 1) for v in (a, b) if len(v) > 1]
    if not parts:
        return None
    se2 = sum(p for p, _ in parts)
    df = se2**2 / sum(p**2 / d for p, d in parts)
    return t.ppf(0.975, df) * se2**0.5


def _expected_rows(logged: list[dict], model: str) -> list[tuple[str, ...]]:
    """(method, target %, achieved %, compression, speed-up, test cell, n, delta) per table row,
    computed here. These runs log no layer_density.csv: compression is 1 / final density and
    the speed-up is n/a."""
    fin = [r for r in logged if r["status"] == "FINISHED" and r["model"] == model]
    dense_vals = [r["test"] for r in fin if r["method"] == "dense"]
    dense = statistics.fmean(dense_vals)
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in fin:
        groups.setdefault((r["method"], r["target"]), []).append(r)
    rows = []
    for (method, target), rs in groups.items():
        tests = [r["test"] for r in rs]
        hw = _welch(tests, dense_vals)
        delta = (
            "—"
            if method == "dense"
            else f"{100 * (statistics.fmean(tests) - dense):+.2f}" + ("" if hw is None else f" ± {100 * hw:.2f}")
        )
        compression = statistics.fmean(1.0 / (1.0 - r["achieved"]) for r in rs)
        budget = "—" if method == "dense" else "n/a"  # these runs log no budget metrics
        seeds = len({r["seed"] for r in rs})
        proto = (
            "—"
            if method == "dense"
            else "ok"
            if seeds >= 3
            else f"flagged: {seeds} seed{'s' if seeds != 1 else ''}, fewer than 3"
        )
        rows.append(
            (
                method,
                f"{100 * target:.2f}",
                f"{100 * statistics.fmean(r['achieved'] for r in rs):.2f}",
                f"{compression:.2f}",
                "n/a",
                _mean_std(tests),
                str(len(rs)),
                budget,
                delta,
                proto,
            )
        )
    return rows


def test_written_files(built):
    files, out = built["files"], built["out"]
    expected = {
        "results.csv",
        "report.md",
        "index.html",
        f"acc_vs_sparsity_{DATASET}_{MODEL}.png",
        f"density_{DATASET}_{MODEL}.png",
        f"acc_vs_sparsity_{DATASET}_{SMALL_MODEL}.png",
    }
    assert set(files) == expected
    assert all(p.parent == out and p.is_file() for p in files.values())
    assert {p.name for p in out.glob("*.png")} == {n for n in expected if n.endswith(".png")}
    for name, path in files.items():
        if name.endswith(".png"):
            assert path.read_bytes().startswith(PNG_MAGIC)


def test_results_csv(built):
    with built["files"]["results.csv"].open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    logged = {r["run_id"]: r for r in built["logged"]}
    assert len(rows) == len(logged) == 17
    assert {r["run_id"] for r in rows} == set(logged)
    required = [
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
    ]
    assert set(required) <= set(rows[0])
    for row in rows:
        exp = logged[row["run_id"]]
        assert row["run_hash"] == exp["run_hash"]
        assert row["status"] == exp["status"]
        assert (row["method"], row["model"], row["dataset"]) == (exp["method"], exp["model"], exp["dataset"])
        assert int(row["seed"]) == exp["seed"]
        assert int(row["epochs"]) == exp["epochs"]
        assert float(row["target_sparsity"]) == pytest.approx(exp["target"])
        assert float(row["achieved_sparsity"]) == pytest.approx(exp["achieved"])
        assert float(row["test_top1"]) == pytest.approx(exp["test"])
        assert float(row["val_top1"]) == pytest.approx(exp["val"])
        if exp["wall"] is None:
            assert row["wall_time_s"] == ""
        else:
            assert float(row["wall_time_s"]) == pytest.approx(exp["wall"])
        assert row["error"] == exp["error"]
    assert sum(r["status"] == "FAILED" for r in rows) == 1


def test_report_md_tables(built):
    md = built["files"]["report.md"].read_text()
    assert md.startswith("# Synthetic FMNIST report")
    for key, value in ENV.items():
        assert f"`{key}`: {value}" in md
    for model in (MODEL, SMALL_MODEL):
        assert f"### {DATASET} / {model}" in md
        for cells in _expected_rows(built["logged"], model):
            assert "| " + " | ".join(cells) + " |" in md, cells
    # the single-seed table shows a bare mean, no ±
    assert (
        f"| magnitude | 90.00 | 90.00 | 10.00 | n/a | {100 * _synthetic_accuracy('magnitude', 0.9, 0)[0]:.2f} | 1 |"
    ) in md
    # the failed run is not part of the n=2 magnitude 98 % row
    assert "| magnitude | 98.00 | 98.00 | 50.00 | n/a |" in md


def test_report_md_failed_and_links(built):
    md = built["files"]["report.md"].read_text()
    failed_section = md.split("## Failed runs", 1)[1]
    assert "FAILED" in failed_section
    # the pipe in the error message is escaped so the table stays intact
    assert ERROR_TEXT.replace("|", "\\|") in failed_section
    assert "magnitude-s0.98-seed7" in failed_section
    for name in built["files"]:
        if name.endswith(".png"):
            assert f"]({name})" in md


def test_index_html_self_contained(built):
    files = built["files"]
    page = files["index.html"].read_text()
    pngs = {name: p.read_bytes() for name, p in files.items() if name.endswith(".png")}
    embedded = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert page.count('<img src="data:image/png;base64,') == len(pngs) == len(embedded) == 3
    decoded = [base64.b64decode(b, validate=True) for b in embedded]
    assert all(d.startswith(PNG_MAGIC) for d in decoded)
    assert sorted(decoded) == sorted(pngs.values())
    lowered = page.lower()
    # nothing is loaded from elsewhere: the only URLs are the rows' links to their MLflow runs
    assert not re.search(r'(src|srcset|action)\s*=\s*"(https?:)?//', lowered)
    markup = re.sub(r"<script.*?</script>", "", page, flags=re.S)  # plotly.js names its own site
    urls = re.findall(r'href="(https?://[^"]+)"', markup)
    assert urls and all(
        re.fullmatch(r"http://127\.0\.0\.1:5000/#/experiments/\d+/runs/[0-9a-f]+\?workflowType=machine_learning", u)
        for u in urls
    ), urls[:3]
    # scripts only inline: plotly's library once, then each interactive figure's own
    assert "<link" not in lowered and not re.search(r"<script[^>]*\bsrc=", lowered)
    assert (
        lowered.count("<script") == 1 + page.count('<div class="interactive"')
        and page.count('<div class="interactive"') >= 1
    )
    assert "<style>" in page
    # same numbers as the markdown, as HTML table cells
    for cells in _expected_rows(built["logged"], MODEL):
        tds = [f"<td>{cells[0]}</td>"] + [f'<td class="num">{c}</td>' for c in cells[1:]]
        assert "".join(tds) in page
    assert "CUDA out of memory | tried to allocate" in page


def test_missing_experiment_raises(built):
    with pytest.raises(ReportError, match="no-such-experiment"):
        build_report(built["uri"], "no-such-experiment", built["out"] / "missing")
    assert not (built["out"] / "missing").exists()


def test_empty_experiment_raises(built):
    with pytest.raises(ReportError, match="empty-experiment"):
        build_report(built["uri"], "empty-experiment", built["out"] / "empty")
    assert issubclass(ReportError, ValueError)


# ----------------------------------------------------------------------------------------
# a large synthetic sweep (reports.bench_build): correctness at scale, not timing

# output positions per image of each prunable layer, worked out by hand from the architectures
# (FMNISTCNN: 28 -> 14 -> 7 with two stride-2 convs; LeNet-300-100: Linear only)
POSITIONS = {
    "fmnist_cnn": {"features.0": 14 * 14, "features.2": 7 * 7, "classifier.1": 1, "classifier.3": 1},
    "lenet300": {"net.1": 1, "net.3": 1, "net.5": 1},
}


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    from reports.bench_build import EXPERIMENT as SYN
    from reports.bench_build import make_store

    root = tmp_path_factory.mktemp("large")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    logged = make_store(uri, 200, root / "artifacts", epochs=4, failed_every=37)
    files = build_report(uri, SYN, root / "out")
    return {"logged": logged, "files": files}


def test_large_sweep_results_csv(large):
    with large["files"]["results.csv"].open(newline="") as fh:
        rows = {r["run_id"]: r for r in csv.DictReader(fh)}
    logged = large["logged"]
    assert len(rows) == len(logged) == 200
    assert sum(r["status"] == "FAILED" for r in rows.values()) == sum(r["status"] == "FAILED" for r in logged) > 0
    for exp in logged:
        row = rows[exp["run_id"]]
        assert row["rerun_command"].startswith("hfbench train ") and row["rerun_command"].endswith("config.yaml")
        assert row["git_commit"] == "0123abcd4567" and row["world_size"] == "1"
        if exp["status"] != "FINISHED":
            continue
        assert float(row["test_top1"]) == pytest.approx(exp["test"])
        counts = exp["counts"]
        assert float(row["compression_ratio"]) == pytest.approx(sum(c[2] for c in counts) / sum(c[3] for c in counts))
        pos = POSITIONS[exp["model"]]
        dense = sum(pos[n] * k for n, _, k, _ in counts)
        remaining = sum(pos[n] * z for n, _, _, z in counts)
        assert float(row["theoretical_speedup"]) == pytest.approx(dense / remaining)
        assert float(row["device_hours"]) == pytest.approx(exp["wall"] / 3600)


def test_large_sweep_tables(large):
    md = large["files"]["report.md"].read_text()
    fin = [r for r in large["logged"] if r["status"] == "FINISHED"]
    for model in ("fmnist_cnn", "lenet300"):
        assert f"### fashion_mnist / {model}" in md
        section = md.split(f"### fashion_mnist / {model}", 1)[1].split("\n### ", 1)[0]
        dense = [r["test"] for r in fin if r["model"] == model and r["method"] == "dense"]
        for method, target in (("gmp", 0.9), ("hyperflux", 0.98), ("imp", 0.5)):
            rs = [r for r in fin if r["model"] == model and r["method"] == method and r["target"] == target]
            tests = [r["test"] for r in rs]
            hw = _welch(tests, dense)
            cells = [
                _mean_std(tests),
                str(len(rs)),
                "n/a",  # no budget metrics logged
                f"{100 * (statistics.fmean(tests) - statistics.fmean(dense)):+.2f}"
                + ("" if hw is None else f" ± {100 * hw:.2f}"),
            ]
            assert " | " + " | ".join(cells) + " |" in section, (model, method, target, cells)
        # one targeting row per finished pruning run; the overhead bench feeds the compute table
        targeting = section.split("#### Sparsity targeting", 1)[1].split("####", 1)[0]
        n_pruning = sum(1 for r in fin if r["model"] == model and r["method"] != "dense")
        assert sum(1 for ln in targeting.splitlines() if ln.startswith("| ") and "target %" not in ln) == n_pruning
        compute = section.split("#### Compute", 1)[1].split("####", 1)[0]
        assert "| hyperflux |" in compute and "1.310 [IQR 1.300, 1.320]; floor 1.155 | 1.480 |" in compute
        # 1.310 / 1.155 = 1.13x its floor: the note names it with the method's own reason
        from suite.pruning import registry

        assert f"hyperflux (1.13x its floor: {registry.get('hyperflux').floor_note})" in compute
        assert "No published number matches" in section
    page = large["files"]["index.html"].read_text()
    assert page.count('<table data-kind="accuracy">') == 2 and page.count('<table data-kind="compute">') == 2


def test_t_quantile_and_published_matching():
    from scipy.stats import t

    from reports import published
    from reports.stats import diff_ci, mean_ci, t975

    for df in (1, 2, 3.7, 9, 41.5, 500):
        assert t975(df) == pytest.approx(t.ppf(0.975, df), rel=1e-9)
    assert mean_ci([0.5]) == (0.5, None)
    assert diff_ci([0.5], [0.6]) is None
    table = published.load()
    got = published.matches("imagenet", "resnet50", "str-ref", 0.8, table)
    assert published.matches("imagenet", "resnet50", "str", 0.8, table) == []  # calibrated: not STR's recipe
    assert [(p.method, p.sparsity, p.top1) for p in got] == [("str", 0.8127, 76.12)]
    assert "Kusupati" in got[0].source
    assert [p.top1 for p in published.matches("imagenet", "timm_resnet50", "gmp-layer", 0.9, table)] == [73.91]
    assert published.matches("imagenet", "resnet50", "hyperflux", 0.9, table) == []
    assert published.matches("fashion_mnist", "fmnist_cnn", "gmp", 0.9, table) == []


def test_published_table_shows_matches_side_by_side():
    from reports import published
    from reports.tables import Row as _Row
    from reports.tables import Section as _Section
    from reports.tables import published_table as _published_table

    rows = [
        _Row("dense", 0.0, [0.0], [0.765, 0.767], [0, 1]),
        _Row("str-ref", 0.8, [0.8], [0.751, 0.755], [0, 1]),
        _Row("hyperflux", 0.8, [0.8], [0.76], [0]),
    ]
    t = _published_table(_Section("imagenet", "resnet50", rows, 0.766), published.load())
    assert not isinstance(t, str) and t.kind == "published"
    assert len(t.rows) == 1
    row = t.rows[0]
    assert row[0] == "str-ref" and row[4] == "str" and row[6] == "76.12" and row[7] == "77.01" and "Kusupati" in row[-1]
    assert all("published" in h for h in t.header[4:10])


def test_equal_budget_controls_each_run_gets_its_own(tmp_path):
    """Planted: a short dense run (budget 100), two budget-matched plans (200: two seeds; 400: one),
    and pruning runs of total budget 204 (-> the 200 plan), 400 (-> the 400 plan), 100 (from
    scratch -> the short dense run), 300 (no dense run within 5 %: closest 400, ratio 0.75) and
    one whose dense start left no budget record (flagged, not compared)."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("budget")
    ts = int(time.time() * 1000)
    n = iter(range(1, 100))

    def run(variant, method, target, test, budget, epochs, seed=0, init="dense", counted=1.0):
        i = next(n)
        r = client.create_run(
            exp,
            tags={"hfbench.run_hash": f"{i:012x}", "hfbench.method": method, "hfbench.variant": variant},
            run_name=f"{variant}-{target}-{seed}",
        )
        metrics = {
            "final_test_top1": test,
            "final_val_top1": test,
            "final_sparsity": target,
            "final_density": 1 - target,
            "budget_total_images": budget,
            "budget_images": budget / 2,
            "budget_parent_counted": counted,
        }
        params = {
            "method": method,
            "model": MODEL,
            "dataset": DATASET,
            "sparsity": str(target),
            "seed": str(seed),
            "epochs": str(epochs),
            "init": init,
        }
        client.log_batch(
            r.info.run_id,
            metrics=[Metric(k, v, ts, epochs) for k, v in metrics.items()],
            params=[Param(k, v) for k, v in params.items()],
        )
        client.set_terminated(r.info.run_id, "FINISHED")

    run("dense", "dense", 0.0, 0.90, 100.0, 5, init="scratch")
    run("dense-matched", "dense", 0.0, 0.92, 200.0, 10, init="scratch")
    run("dense-matched", "dense", 0.0, 0.93, 200.0, 10, seed=1, init="scratch")
    run("dense-matched", "dense", 0.0, 0.95, 400.0, 20, init="scratch")
    run("magnitude", "magnitude", 0.5, 0.91, 204.0, 5)
    run("gmp", "gmp", 0.5, 0.915, 400.0, 15)
    run("str", "str", 0.5, 0.89, 100.0, 5, init="scratch")
    run("cs", "cs", 0.5, 0.88, 300.0, 10, init="scratch")
    run("hyperflux", "hyperflux", 0.5, 0.9, 104.0, 5, counted=0.0)
    build_report(uri, "budget", tmp_path / "rep")
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Budget (× control) | Δ top-1 vs equal-budget dense (pp) | Δ top-1 vs short dense (pp)" in md
    table = md.split("Δ top-1 vs short dense (pp) |", 1)[1].split("\n\n", 1)[0]
    rows = {ln.split(" | ")[0].lstrip("| "): ln.split(" | ") for ln in table.splitlines() if ln.startswith("| ")}
    assert rows["dense-matched 10xall"][6] == "2" and rows["dense-matched 20xall"][6] == "1"  # one row a plan
    mag, gmp, str_, cs, hf = rows["magnitude"], rows["gmp"], rows["str"], rows["cs"], rows["hyperflux"]
    assert mag[7] == "1.02" and mag[8].startswith("-1.50 ± ") and mag[8].endswith("(dense-matched 10xall)")
    assert (gmp[7], gmp[8]) == ("1.00", "-3.50 (dense-matched 20xall)")
    assert (str_[7], str_[8]) == ("1.00", "-1.00")  # the short dense run is its equal-budget control
    assert (cs[7], cs[8]) == ("0.75", "n/a (no dense run of this budget)")
    assert hf[7] == "n/a (dense start's budget not recorded)" and hf[8] == "n/a (no dense run of this budget)"
    csv_rows = {r["method"]: r for r in csv.DictReader((tmp_path / "rep" / "results.csv").open())}
    assert csv_rows["magnitude"]["control"] == "dense-matched 10xall"
    assert float(csv_rows["magnitude"]["budget_ratio"]) == pytest.approx(1.02)
    assert csv_rows["gmp"]["control"] == "dense-matched 20xall"
    assert csv_rows["str"]["control"] == "dense"
    assert csv_rows["cs"]["control"] == "none within 5 % (closest: dense-matched 20xall)"
    assert float(csv_rows["cs"]["budget_ratio"]) == pytest.approx(0.75)
    assert csv_rows["hyperflux"]["control"].startswith("none: the dense run it starts from has no budget record")
    assert float(csv_rows["gmp"]["budget_total_images"]) == 400.0 and float(csv_rows["gmp"]["budget_images"]) == 200.0


def test_a_report_built_beside_its_store_names_no_machine_folders(tmp_path, monkeypatch):
    """Built from the folder that holds the store (as the committed reports are, from the
    repository root), the report shows the tracking URI, each run's config artifact and its
    retrain command relative to that folder, and they resolve there; nothing names tmp_path."""
    from reports.bench_build import EXPERIMENT as SYN
    from reports.bench_build import make_store

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    make_store(uri, 6, tmp_path / "artifacts", epochs=2, failed_every=0)
    files = build_report(uri, SYN, tmp_path / "out")
    md = files["report.md"].read_text()
    assert "at `sqlite:///mlflow.db`" in md and str(tmp_path) not in md
    with files["results.csv"].open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(str(tmp_path) not in v for r in rows for v in r.values())
    for r in rows:
        assert (tmp_path / r["config_artifact"]).is_file()
        assert r["rerun_command"] == f"hfbench train {r['config_artifact']}"


def test_every_method_has_its_own_colour_in_every_plot():
    """Twelve methods, twelve distinct colours (matplotlib's default cycle has ten, and CS and STR
    shared one); a method's style does not depend on which other methods a report holds."""
    from reports.plots import method_style
    from suite.pruning import registry

    styles = {m: method_style(m) for m in registry.names()}
    assert len({c for c, _ in styles.values()}) == len(styles) == 12
    assert method_style("dense-matched 85x49")[1] == "s" and method_style("my-variant") == method_style("my-variant")


def test_published_rows_are_matched_like_for_like():
    """Issue 20: global GMP is not Gale et al.'s uniform GMP; a run from trained weights is not
    compared with a method published from scratch (nor the reverse); a target halfway between two
    published points matches neither; the nearest published point wins."""
    from reports import published
    from suite.config import RunConfig

    table = published.load()
    assert RunConfig(method="gmp", sparsity=0.9, gmp={"scope": "layer"}).variant() == "gmp-layer"
    assert RunConfig(method="gmp", sparsity=0.9).variant() == "gmp"
    assert [p.method for p in published.matches("imagenet", "resnet50", "gmp-layer", 0.9, table, "scratch")] == [
        "gmp_uniform"
    ]
    assert published.matches("imagenet", "resnet50", "gmp", 0.9, table, "scratch") == []  # no global GMP row
    assert published.matches("imagenet", "resnet50", "imp", 0.9, table, "pretrained") == []
    assert published.matches("imagenet", "resnet50", "imp", 0.9, table, "scratch") == []  # not a ticket
    assert [p.top1 for p in published.matches("imagenet", "resnet50", "imp-ticket", 0.9, table, "scratch")] == [73.61]
    assert published.matches("imagenet", "resnet50", "rmt_hybrid", 0.5, table, "scratch") == []
    assert published.matches("imagenet", "resnet50", "rmt_hybrid", 0.5, table, "pretrained")[0].top1 == 75.76
    assert published.matches("imagenet", "resnet50", "gmp-layer", 0.965, table, "scratch") == []  # 95 and 98 tie
    assert [p.sparsity for p in published.matches("imagenet", "resnet50", "str-ref", 0.96, table, "scratch")] == [
        0.9515
    ]
    note = published.unmatched_note(["str", "str-ref", "imp", "hyperflux"])
    assert "str: calibrated mode" in note and "imp: IMP from a trained network" in note and "hyperflux" not in note


def test_per_layer_density_view_shows_each_methods_layer_budget(large):
    """The per-layer view (issue 19): one bar per method and prunable layer at 90 %, from each
    run's layer_density.csv; listed among the report's plots."""
    files = large["files"]
    names = [n for n in files if n.startswith("layers_")]
    assert names and all(files[n].stat().st_size > 0 for n in names)
    md = files["report.md"].read_text()
    assert all(f"]({n})" in md for n in names) and "Density per prunable layer at 90.00 % sparsity" in md


def test_compute_table_without_a_benchmark_run_has_no_empty_benchmark_columns(built):
    """No overhead benchmark in the store: the compute table leaves its step-time and memory
    columns out (they were eight cells of "no overhead benchmark run") and its note says which
    command adds them. With a benchmark the columns are there (test_large_sweep_tables)."""
    md = built["files"]["report.md"].read_text()
    compute = md.split("#### Compute", 1)[1].split("\n#### ", 1)[0].split("\n### ", 1)[0]
    header = next(ln for ln in compute.splitlines() if ln.startswith("| method"))
    assert "wall time per run (s)" in header and "(bench)" not in header
    assert "no overhead benchmark run" not in md
    assert "once `hfbench bench overhead` has logged a run" in compute
    # and without a deploy benchmark there is no measured-vs-theoretical speed-up plot
    assert not any(n.startswith("speedup_") for n in built["files"])


def test_a_method_keeps_its_colour_in_the_flips_plot_and_targets_use_their_own_scale(large, tmp_path, monkeypatch):
    """Colours mean the same thing in every plot: in the pruned/regrown plot (one panel per
    method) and the Neural Pruning Law plot each line or point has its method's colour
    (reports.plots.method_style), as in the accuracy plot; the density plot's
    lines are targets, drawn from a sequential map that is not the method palette's C0..C9."""
    from pathlib import Path

    from matplotlib.colors import to_hex

    from reports import dynamics, plots
    from reports.bench_build import EXPERIMENT as SYN

    figs: dict[str, object] = {}

    def capture(module):
        made = module.new_figure

        def new_figure(*a, **kw):
            fig = made(*a, **kw)
            real_save = fig.savefig
            fig.savefig = lambda path, *x, **y: (figs.__setitem__(Path(path).name, fig), real_save(path, *x, **y))[1]
            return fig

        monkeypatch.setattr(module, "new_figure", new_figure)

    capture(dynamics)
    capture(plots)
    monkeypatch.setattr(plots, "cpus", lambda: 1)  # every figure drawn here, where figs can see it
    uri = "sqlite:///" + str(large["files"]["results.csv"].parent.parent / "mlflow.db")
    build_report(uri, SYN, tmp_path / "again")
    flips = {k: f for k, f in figs.items() if k.startswith("flips_")}
    assert flips, sorted(figs)
    checked = 0
    for fig in flips.values():  # small multiples: one panel per method, titled with it
        panels = [ax for ax in fig.axes if ax.get_visible()]
        methods = [ax.get_title() for ax in panels]
        assert len(panels) >= 2 and len(set(methods)) == len(methods), methods
        for ax, method in zip(panels, methods):
            lines = ax.get_lines()
            assert lines and {to_hex(ln.get_color()) for ln in lines} == {to_hex(plots.method_style(method)[0])}
            checked += len(lines)
    assert checked > 0
    npl = [f for k, f in figs.items() if k.startswith("npl_")]
    assert npl, sorted(figs)
    for fig in npl:  # the NPL points take their method's colour too
        for coll in fig.axes[0].collections:
            method = coll.get_label().split(":", 1)[0]
            assert to_hex(coll.get_facecolor()[0]) == to_hex(plots.method_style(method)[0]), coll.get_label()
    tab10 = {to_hex(f"C{i}") for i in range(10)}
    dens = [f for k, f in figs.items() if k.startswith("density_")]
    assert dens, sorted(figs)
    for fig in dens:
        assert not {to_hex(ln.get_color()) for ln in fig.axes[0].get_lines()} & tab10


def test_the_report_leads_with_results_and_explains_them_after(built):
    """Under "Results" the first thing is a table (the method x sparsity grid where one is
    built, else the accuracy table), not paragraphs; the notes on how to read the tables and
    reproduce a point follow the results, before the failed runs, in report.md and index.html."""
    from reports.tables import ACC_NOTE

    md = built["files"]["report.md"].read_text()
    results = md.split("## Results\n", 1)[1]
    first_lines = [ln for ln in results.splitlines() if ln.strip()][:3]
    assert first_lines[0].startswith("### ") and first_lines[1].startswith(("|", "#### ")), first_lines
    assert md.index("## Results") < md.index("## Reading the tables") < md.index("## Failed runs")
    assert ACC_NOTE in md.split("## Reading the tables", 1)[1] and "hfbench train <config.yaml>" in md
    html = built["files"]["index.html"].read_text()
    body = html.split("<h2>Results</h2>", 1)[1]
    assert body.lstrip().startswith("<h3>") and body.index("<table") < body.index("<p>")
    assert html.index("<h2>Reading the tables</h2>") < html.index("<h2>Failed runs</h2>")


def test_the_sqlite_fast_path_reads_what_mlflows_api_reads(tmp_path):
    """reports/sqlite_store.py reads a sqlite store with plain SQL: the records (every field,
    the same order) and the metric histories are those read through MLflow's API, a deleted
    run stays out, a NaN metric is NaN and a run still RUNNING is read as such."""
    import math

    from mlflow import MlflowClient

    from reports import records
    from reports.bench_build import EXPERIMENT as SYN
    from reports.bench_build import make_store
    from reports.sqlite_store import open_store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    make_store(uri, 14, tmp_path / "artifacts", epochs=3, failed_every=5)
    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name(SYN).experiment_id
    first, second = records.load(c, exp, fast=False)[:2]
    c.delete_run(first.run_id)
    running = c.create_run(exp, tags={"hfbench.variant": "magnitude", "hfbench.run_hash": "feed"}).info.run_id
    c.log_metric(running, "prune/achieved_density", 0.25, step=1)
    c.log_metric(running, "eval/test_top1", math.nan, step=1)
    assert open_store(c) is not None
    fast, api = records.load(c, exp), records.load(c, exp, fast=False)
    assert first.run_id not in {r.run_id for r in fast}
    assert [r.run_id for r in fast] == [r.run_id for r in api] and len(fast) == 14
    by_id = {r.run_id: r for r in fast}
    assert math.isnan(by_id[running].metrics["test_top1"]) and by_id[running].status == "RUNNING"
    assert by_id[second.run_id].status in ("FINISHED", "FAILED")
    for a, b in zip(fast, api):
        for name, va in vars(a).items():
            vb = getattr(b, name)
            same = va == vb or (isinstance(va, float) and math.isnan(va) and math.isnan(vb))
            if name == "metrics":
                same = va.keys() == vb.keys() and all(
                    va[k] == vb[k] or (math.isnan(va[k]) and math.isnan(vb[k])) for k in va
                )
            assert same, (a.run_id, name, va, vb)
    h_fast, h_api = records.Histories(c), records.Histories(c, fast=False)
    for key in ("density", "target_density", "train_loss", "test_top1"):
        h_fast.prefetch_records(fast, key)
        h_api.prefetch_records(api, key)
        for r in fast:
            assert repr(h_fast.history(r.run_id, key)) == repr(h_api.history(r.run_id, key)), (r.run_id, key)  # nan too
    assert h_fast.history(running, "density") == [(1, 0.25)]


def _figure(k: int):
    from reports.plots import new_figure

    fig = new_figure()
    ax = fig.add_subplot()
    ax.plot([0, 1, 2], [k, k * k, 1 + k])
    ax.set_title(f"figure {k}")
    return fig


def test_parallel_saves_writes_the_same_pngs_as_drawing_in_this_process(tmp_path):
    """Inside parallel_saves(workers=3) the figures are drawn by forked children (counted) and
    by this process; every PNG is written, byte for byte the one a plain savefig writes."""
    import os

    from reports import plots

    for k in range(5):
        _figure(k).savefig(tmp_path / f"ref{k}.png")
    with plots.parallel_saves(workers=3) as drawer:
        for k in range(5):
            plots.save(_figure(k), tmp_path / f"par{k}.png")
    assert drawer.forked >= 1 if hasattr(os, "fork") else drawer.forked == 0
    assert drawer.redrawn == 0  # every child wrote its own figure
    for k in range(5):
        assert (tmp_path / f"par{k}.png").read_bytes() == (tmp_path / f"ref{k}.png").read_bytes(), k
    with plots.parallel_saves(workers=1) as drawer:  # one worker: no child, all drawn here
        plots.save(_figure(9), tmp_path / "one.png")
        assert not (tmp_path / "one.png").exists()  # drawn when the block ends
    assert drawer.forked == 0 and (tmp_path / "one.png").stat().st_size > 0


def test_a_figure_whose_drawing_child_fails_is_drawn_by_the_parent(tmp_path):
    """A child that dies drawing its figure (here: one that refuses outside the parent) costs
    nothing: the parent draws that figure again, so every PNG exists when the block ends."""
    import os

    from reports import plots

    parent = os.getpid()

    class OnlyInParent:
        def __init__(self, fig):
            self.fig = fig

        def savefig(self, path):
            if os.getpid() != parent:
                raise RuntimeError("refusing to draw in a child")
            self.fig.savefig(path)

    with plots.parallel_saves(workers=2) as drawer:
        for k in range(3):
            plots.save(OnlyInParent(_figure(k)), tmp_path / f"f{k}.png")
    assert drawer.forked >= 1 and drawer.redrawn == drawer.forked  # each child failed, each figure redrawn
    for k in range(3):
        assert (tmp_path / f"f{k}.png").stat().st_size > 0, k
