"""hfbench bench: behaviour only (which rows, which order, which images), never timings."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from suite import bench, bench_data

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = pytest.mark.timeout(600)


def test_interleave_and_quartiles():
    assert bench.interleave("dense", "hyperflux", 3) == ["dense", "hyperflux"] * 3
    assert bench.quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
    assert bench.quartiles([2.0]) == (2.0, 2.0, 2.0)


def test_bench_config_puts_hyperflux_under_pressure():
    from suite.pruning import registry

    cfg = bench.bench_config("hyperflux", "fmnist_cnn", 8)
    assert cfg.sparsity == 0.9 and cfg.hyperflux.schedule == "fixed"
    t = bench.Trainee(cfg, 28, "cpu")
    assert isinstance(t.pruner, registry.get("hyperflux"))
    # the step that is timed includes the pressure term, whose gradient each gate's backward adds
    assert t.pruner.gamma == 1.0 and all(p.pressure == 1.0 / t.pruner.n > 0 for p in t.pruner.params)
    assert bench.bench_config("dense", "fmnist_cnn", 8).sparsity == 0.0


@TIMEOUT
def test_overhead_rows_ratios_and_order():
    methods = ["magnitude", "hyperflux", "l0"]
    res = bench.run_overhead(
        model="fmnist_cnn",
        size=28,
        batch=8,
        methods=methods,
        steps=2,
        warmup=1,
        repeats=3,
        device="cpu",
        memory=False,
        say=lambda *a: None,
    )
    rows = res["rows"]
    assert [r["method"] for r in rows] == ["dense"] + methods
    for r in rows:
        assert r["step_ms"] > 0 and r["img_s"] > 0 and r["ratio"] > 0
        assert r["ratio_q1"] <= r["ratio"] <= r["ratio_q3"]
    # each method's ratio comes from its own rounds against the dense blocks of those rounds
    for r in rows[1:]:
        assert r["rounds"] == 3
        assert r["dense_step_ms"] > 0
    # A B A B: dense and the method alternate, block by block, method after method
    assert res["trace"] == [x for m in methods for x in bench.interleave("dense", m, 3)]
    table = bench.overhead_table(res)
    for m in ["dense"] + methods:
        assert f"| {m} |" in table


@TIMEOUT
def test_memory_probe_runs_in_a_fresh_process():
    args = {
        "model": "fmnist_cnn",
        "size": 28,
        "batch": 8,
        "device": "cpu",
        "dtype": "fp32",
        "channels_last": False,
        "deepspeed": False,
        "threads": 1,
        "sparsity": 0.9,
        "warmup": 1,
        "steps": 1,
        "sets": None,
    }
    mb = bench.measure_memory("hyperflux", args)
    assert mb >= 0.0


@TIMEOUT
def test_data_bench_same_images_and_labels(tmp_path):
    tree = bench_data.make_jpeg_tree(tmp_path / "tree", classes=4, per_class=5, min_side=40, max_side=90)
    files = sorted(tree.rglob("*.JPEG"))
    assert len(files) == 20 and len({p.parent.name for p in files}) == 4
    res = bench_data.run_data(
        root=str(tree), size=32, batch=6, workers=1, passes=1, work_dir=str(tmp_path / "w"), say=lambda *a: None
    )
    assert Path(res["beton"]).is_file()
    assert {r["loader"]: r["images"] for r in res["rows"]} == {"ffcv": 20, "torchvision": 20}
    assert res["labels"]["ffcv"] == res["labels"]["torchvision"]
    assert Counter(res["labels"]["ffcv"]) == {0: 5, 1: 5, 2: 5, 3: 5}
    assert res["trace"] == ["ffcv", "torchvision"]
    assert all(r["img_s"] > 0 for r in res["rows"]) and res["ratio"] > 0


def _cli(*args: str, timeout: float = 500) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "launchers.cli", *args],
        cwd="/tmp",
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow  # end to end: the CLI, per-method memory subprocesses and MLflow
@TIMEOUT
def test_cli_overhead_prints_table_and_logs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = _cli(
        "bench",
        "overhead",
        "--model",
        "fmnist_cnn",
        "--size",
        "28",
        "--batch",
        "8",
        "--methods",
        "magnitude,hyperflux",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--repeats",
        "2",
        "--no-memory",
        "--tracking-uri",
        uri,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| method | step ms |" in p.stdout
    for m in ("dense", "magnitude", "hyperflux"):
        assert f"| {m} |" in p.stdout
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name("bench")
    (run,) = c.search_runs([exp.experiment_id])
    assert run.data.params["model"] == "fmnist_cnn" and run.data.params["threads"] == "1"
    assert run.data.metrics["step_ratio.dense"] == 1.0 and run.data.metrics["step_ratio.hyperflux"] > 0
    assert {a.path for a in c.list_artifacts(run.info.run_id)} >= {"overhead.md", "overhead.json"}
    # the floors are logged, and the report's records read them back
    from reports.bench_runs import overhead

    m = run.data.metrics
    assert m["floor_ratio.hyperflux"] > m["floor_ratio.magnitude"] > 1.0
    assert m["to_floor.hyperflux"] == pytest.approx(m["step_ratio.hyperflux"] / m["floor_ratio.hyperflux"])
    assert overhead(c)["floor"] == {k: m[f"floor_ratio.{k}"] for k in ("dense", "magnitude", "hyperflux")}


def test_every_registered_method_has_floor_bytes_its_own_or_its_familys():
    """The overhead table's floor needs each method's bytes per weight per step (Pruner.floor_bytes,
    in the method's file or, for the mask family, MaskPruner's); a method without one shows '-'."""
    from suite.pruning import registry

    missing = [m for m in registry.pruning_names() if not isinstance(registry.get(m).floor_bytes, int)]
    assert missing == []
    # the mask family moves fewer bytes than the methods that train a gate per weight with Adam
    assert registry.get("magnitude").floor_bytes < registry.get("hyperflux").floor_bytes


def test_floors_are_the_closed_form_of_bytes_weights_and_bandwidth():
    from suite.pruning import registry

    rows = [
        {"method": "dense", "ratio": 1.0, "dense_step_ms": 100.0},
        {"method": "hyperflux", "ratio": 1.5, "dense_step_ms": 100.0},
        {"method": "magnitude", "ratio": 1.1, "dense_step_ms": 80.0},
    ]
    bench.add_floors(rows, n_weights=1_000_000, bandwidth=10e9)
    hf = registry.get("hyperflux").floor_bytes * 1e6 / 10e9 * 1e3  # ms
    mg = registry.get("magnitude").floor_bytes * 1e6 / 10e9 * 1e3
    assert rows[0]["floor_ratio"] == 1.0 and rows[0]["to_floor"] == 1.0
    assert rows[1]["floor_ms"] == pytest.approx(hf) and rows[1]["floor_ratio"] == pytest.approx(1 + hf / 100)
    assert rows[1]["to_floor"] == pytest.approx(1.5 / (1 + hf / 100))
    assert rows[2]["floor_ratio"] == pytest.approx(1 + mg / 80)


def test_memory_bandwidth_counts_two_reads_and_a_write(monkeypatch):
    """12 bytes per element of c = a + b (two fp32 reads, one write) over the median pass time:
    with a clock that makes every pass take 1, 2 or 4 ms, exactly 12 x elements / 2 ms; and on
    the real clock a throughput between a slow disk's and any memory's."""
    ticks = iter([0.0, 10.0, 10.001, 20.0, 20.002, 30.0, 30.004])  # the first pass is not timed
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks))
    n = 4 * 2**20 // 4
    assert bench.memory_bandwidth("cpu", mib=4, repeats=3) == pytest.approx(12 * n / 0.002)
    monkeypatch.undo()
    assert 1e8 < bench.memory_bandwidth("cpu", mib=16, repeats=3) < 1e13


def test_cli_rejects_unknown_method():
    p = _cli("bench", "overhead", "--model", "fmnist_cnn", "--methods", "nope", "--no-track", timeout=120)
    assert p.returncode != 0 and "unknown method 'nope'" in p.stderr


def test_gpu_script_parses():
    for s in ("scripts/gpu_bench.sh", "scripts/gpu_wheels.sh"):
        assert subprocess.run(["bash", "-n", str(REPO / s)]).returncode == 0
