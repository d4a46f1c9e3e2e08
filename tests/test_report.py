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
    drop = {"dense": 0.0, "hyperflux": 0.04, "magnitude": 0.09}[method] * target ** 4
    test = base - drop + 0.0037 * seed * (1.0 + 2.0 * target)  # spread grows with sparsity
    return round(test, 6), round(test + 0.0021, 6)


def _synthetic_achieved(method: str, target: float, seed: int) -> float:
    # Hyperflux regrows a little past its target; magnitude pruning hits it exactly.
    return target - 0.004 * (seed + 1) * target if method == "hyperflux" else target


def log_run(client: MlflowClient, exp_id: str, *, method: str, model: str, dataset: str,
            target: float, seed: int, epochs: int = EPOCHS, status: str = "FINISHED",
            error: str | None = None, run_index: int = 0) -> dict:
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
        "method": method, "model": model, "dataset": dataset, "sparsity": str(target),
        "seed": str(seed), "epochs": str(epochs), "optim.lr": "0.1",
        "hyperflux.pruning_end": str(epochs - 1), "config_hash": f"cfg{run_index:09x}", **ENV,
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
            "train_loss": 1.0 / ep, "val_top1": val * frac, "test_top1": test * frac,
            "density": dens, "sparsity": 1.0 - dens, "lr": 0.1 / ep,
        }
        if method == "hyperflux":
            per_epoch.update(gamma=0.2 * ep, target_density=tgt)
        metrics += [Metric(k, v, ts + ep, ep) for k, v in per_epoch.items()]
    wall = 12.5 + run_index
    if status == "FINISHED":
        finals = {
            "final_test_top1": test, "final_val_top1": val, "final_sparsity": achieved,
            "final_density": 1.0 - achieved, "wall_time_s": wall,
        }
        metrics += [Metric(k, v, ts + epochs, epochs) for k, v in finals.items()]
    batch_tags = [RunTag("hfbench.error", error)] if error else []
    client.log_batch(rid, metrics=metrics, params=[Param(k, v) for k, v in params.items()],
                     tags=batch_tags)
    client.set_terminated(rid, status=status)
    return {
        "run_id": rid, "run_hash": run_hash, "status": status, "method": method, "model": model,
        "dataset": dataset, "seed": seed, "target": target, "epochs": epochs,
        "test": test if status == "FINISHED" else test * done_epochs / epochs,
        "val": val if status == "FINISHED" else val * done_epochs / epochs,
        "achieved": achieved if status == "FINISHED" else 1.0 - densities[-1],
        "wall": wall if status == "FINISHED" else None, "error": error or "",
        "density": densities, "target_density": target_densities,
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
    add(method="magnitude", model=MODEL, dataset=DATASET, target=0.98, seed=7, status="FAILED",
        error=ERROR_TEXT)
    add(method="dense", model=SMALL_MODEL, dataset=DATASET, target=0.0, seed=0)
    add(method="magnitude", model=SMALL_MODEL, dataset=DATASET, target=0.9, seed=0)
    # An experiment that exists but is empty.
    client.create_experiment("empty-experiment")

    out = root / "out"
    files = build_report(uri, EXPERIMENT, out, title="Synthetic FMNIST report")
    return {"uri": uri, "out": out, "files": files, "logged": logged}


def _mean_std(vals: list[float]) -> str:
    mean = f"{100 * statistics.fmean(vals):.2f}"
    return mean if len(vals) == 1 else f"{mean} ± {100 * statistics.stdev(vals):.2f}"


def _expected_rows(logged: list[dict], model: str) -> list[tuple[str, ...]]:
    """(method, target %, achieved %, test cell, n, delta) per table row, computed here."""
    fin = [r for r in logged if r["status"] == "FINISHED" and r["model"] == model]
    dense = statistics.fmean(r["test"] for r in fin if r["method"] == "dense")
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in fin:
        groups.setdefault((r["method"], r["target"]), []).append(r)
    rows = []
    for (method, target), rs in groups.items():
        tests = [r["test"] for r in rs]
        delta = "—" if method == "dense" else f"{100 * (statistics.fmean(tests) - dense):+.2f}"
        rows.append((method, f"{100 * target:.2f}",
                     f"{100 * statistics.fmean(r['achieved'] for r in rs):.2f}",
                     _mean_std(tests), str(len(rs)), delta))
    return rows


def test_written_files(built):
    files, out = built["files"], built["out"]
    expected = {
        "results.csv", "report.md", "index.html",
        f"acc_vs_sparsity_{DATASET}_{MODEL}.png", f"density_{DATASET}_{MODEL}.png",
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
    required = ["run_id", "run_hash", "status", "method", "model", "dataset", "seed",
                "target_sparsity", "achieved_sparsity", "test_top1", "val_top1", "epochs",
                "wall_time_s", "error"]
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
    assert f"| magnitude | 90.00 | 90.00 | {100 * _synthetic_accuracy('magnitude', 0.9, 0)[0]:.2f} | 1 |" in md
    # the failed run is not part of the n=2 magnitude 98 % row
    assert "| magnitude | 98.00 | 98.00 |" in md


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
    assert "http://" not in lowered and "https://" not in lowered
    assert "<script" not in lowered and "<link" not in lowered
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
