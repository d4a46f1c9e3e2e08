"""End to end through the real parts: FFCV data, DeepSpeed engine, submitit to the local
SLURM cluster and to local processes, MLflow server. Slow; run in CI by the test command."""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from launchers.sweep import Sweep
from suite import tracking
from suite.run_schema import mlflow_key
from suite.sweeps import load_sweep

# experiment names on the shared MLflow server are unique per test session: a rerun against the
# same server must train again, not find the last session's finished runs
TAG = uuid.uuid4().hex[:6]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _sweep_file(tmp_path: Path, data_dir: Path, name: str, executor: str, uri: str, matched: bool = False) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(
        textwrap.dedent(f"""
        name: {name}
        tracking_uri: {uri}
        data_dir: {data_dir}
        out_dir: {tmp_path / "runs"}
        base: {{model: fmnist_cnn, epochs: 3, max_steps_per_epoch: 8, batch_size: 64, init: dense}}
        grid: {{methods: [dense, magnitude, gmp, hyperflux], sparsities: [0.5], seeds: [0],
                budget_matched_dense: {str(matched).lower()}}}
        overrides:
          dense: {{epochs: 1, max_steps_per_epoch: 20}}
          hyperflux: {{hyperflux: {{pruning_end: 2, gate_lr: 0.05}}}}
          gmp: {{gmp: {{start_epoch: 0, end_epoch: 2, update_every: 4}}}}
        launcher: {{executor: {executor}, parallelism: 2, folder: {tmp_path / "submitit"}, poll_s: 1}}
    """)
    )
    return p


def _check_mlflow(uri: str, experiment: str, n: int) -> list:
    """The experiment holds the sweep's parent run and its n training runs, each in the schema of
    suite/run_schema.py: grouped metric names, the environment as tags, the dataset as an input."""
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None
    every = c.search_runs([exp.experiment_id])
    parents = [r for r in every if tracking.TAG_SWEEP_PARENT in r.data.tags]
    runs = [r for r in every if tracking.TAG_HASH in r.data.tags]
    assert len(runs) == n, f"expected {n} runs in {experiment}, found {len(runs)}"
    assert len(parents) == 1 and len(every) == n + 1, [r.info.run_name for r in every]
    assert parents[0].data.tags[tracking.TAG_SWEEP_PARENT] == experiment and not parents[0].data.params
    for r in runs:
        assert r.info.status == "FINISHED", (r.info.run_name, r.data.tags.get("hfbench.error"))
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        m = r.data.metrics
        for key in (
            "train/loss",
            "eval/val_top1",
            "eval/test_top1",
            "prune/achieved_density",
            "prune/achieved_sparsity",
            "final/test_top1",
            "final/achieved_sparsity",
            "startup/total_s",
        ):
            assert key in m, f"{r.info.run_name}: metric {key} missing"
        assert all("/" in k for k in m), sorted(k for k in m if "/" not in k)  # every metric in a group
        assert 0.0 < m["final/test_top1"] <= 1.0
        assert r.data.params["config_hash"] == r.data.tags[tracking.TAG_HASH]
        # the environment is tags, not config: no env.* param, the versions as tags
        assert not [k for k in r.data.params if k.startswith("env.")]
        assert r.data.tags["env.git_commit"] and r.data.tags["env.deepspeed"] != "absent"
        # the dataset is the run's input: its name, the folder of its files, their sizes
        (inp,) = r.inputs.dataset_inputs
        assert inp.dataset.name == "fashion_mnist" and len(inp.dataset.digest) == 16
        assert [t.value for t in inp.tags if t.key == "mlflow.data.context"] == ["train"]
        assert json.loads(inp.dataset.profile)["train"]["samples"] > 0
        # fp32 and the default memory format, read off the first step's tensors
        assert (r.data.params["observed.compute_dtype"], r.data.params["observed.channels_last"]) == (
            "float32",
            "False",
        )
        hist = c.get_metric_history(r.info.run_id, "eval/val_top1")
        assert [h.step for h in sorted(hist, key=lambda h: h.step)] == list(range(1, int(r.data.params["epochs"]) + 1))
        arts = {a.path for a in c.list_artifacts(r.info.run_id)}
        assert {"config.yaml", "layer_density.csv"} <= arts
        if r.data.params["method"] == "hyperflux":
            assert "method/gamma" in m and "method/target_density" in m
    return runs


def _run(path: Path):
    sweep = load_sweep(path)
    outcomes = Sweep(sweep).run()
    return sweep, outcomes


def test_sweep_through_slurm_into_mlflow_server(tmp_path, betons, mlflow_server, slurm_cluster):
    data_dir = betons["train"].parent
    sweep, outcomes = _run(_sweep_file(tmp_path, data_dir, f"e2e-slurm-{TAG}", "slurm", mlflow_server))
    assert [o.state for o in outcomes] == ["finished"] * 4, [(o.cfg.run_name(), o.error) for o in outcomes]
    # they really ran as SLURM jobs: the pruning runs as one array, all COMPLETED in accounting
    pruned = [o for o in outcomes if o.cfg.method != "dense"]
    assert len({o.job_id.split("_")[0] for o in pruned}) == 1 and all("_" in o.job_id for o in pruned)
    for o in outcomes:  # accounting catches up a moment after the result file appears
        for _ in range(60):
            out = subprocess.run(
                ["sacct", "-n", "-X", "-P", "-o", "State", "-j", o.job_id], capture_output=True, text=True, timeout=30
            )
            if out.stdout.split() == ["COMPLETED"]:
                break
            time.sleep(0.5)
        assert out.stdout.split() == ["COMPLETED"], (o.job_id, out.stdout, out.stderr)
    runs = _check_mlflow(mlflow_server, f"e2e-slurm-{TAG}", 4)
    weights = {r.data.params["method"]: int(r.data.params["prunable_weights"]) for r in runs}
    for o in outcomes:
        if o.cfg.method in ("magnitude", "gmp"):  # exact: half the prunable weights, rounded
            n = weights[o.cfg.method]
            assert o.result["final_sparsity"] * n == pytest.approx(round(0.5 * n), abs=1e-6), o.result["final_sparsity"]
        elif o.cfg.method == "hyperflux":  # a controller, not a count: near the target, not on it
            assert abs(o.result["final_sparsity"] - 0.5) < 0.2
    # run again: everything FINISHED is skipped, nothing is trained twice
    sweep, again = _run(_sweep_file(tmp_path, data_dir, f"e2e-slurm-{TAG}", "slurm", mlflow_server))
    assert [o.state for o in again] == ["skipped"] * 4
    assert len(_check_mlflow(mlflow_server, f"e2e-slurm-{TAG}", 4)) == len(runs)


def test_sweep_through_local_executor(tmp_path, betons):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    said: list[str] = []
    outcomes = Sweep(
        load_sweep(_sweep_file(tmp_path, betons["train"].parent, "e2e-local", "local", uri, matched=True)),
        say=lambda *a, **k: said.append(" ".join(map(str, a))),
    ).run()
    assert [o.state for o in outcomes] == ["finished"] * 5, [(o.cfg.run_name(), o.error) for o in outcomes]
    # the training budget, counted exactly: dense 1 x 20 steps of 64 images; every pruning run 3 x 8
    # of its own, 1,280 + 1,536 = 2,816 images in total with its dense start; the budget-matched dense
    # run trains 44 steps from scratch (4 epochs of 11: 2,816 images)
    by = {(o.cfg.method, o.cfg.budget_matched): o.result for o in outcomes}
    assert (by[("dense", False)]["budget_steps"], by[("dense", False)]["budget_total_images"]) == (20, 1280)
    for m in ("magnitude", "gmp", "hyperflux"):
        r = by[(m, False)]
        assert (r["budget_steps"], r["budget_images"], r["budget_total_images"]) == (24, 1536, 2816), m
        assert r["budget_total_steps"] == 44 and r["budget_parent_counted"] == 1.0
    matched = by[("dense", True)]
    assert (matched["budget_steps"], matched["budget_total_images"]) == (44, 2816)
    assert outcomes[1].cfg.run_name() == "fmnist_cnn-dense-matched-e4x11-s0"
    # every task timed its startup; the sweep reports the launch cost from those timelines
    for o in outcomes:
        parts = [o.result[k] for k in ("startup_import_s", "startup_mlflow_s", "startup_data_s", "startup_model_s")]
        assert all(p >= 0 for p in parts) and o.result["startup_total_s"] >= sum(parts)
    assert any(line.startswith("[hfbench] launch cost: first training step") for line in said), said[-3:]
    _check_mlflow(uri, "e2e-local", 5)
    # magnitude reached its target exactly; the pruned runs started from the dense weights
    mag = next(o for o in outcomes if o.cfg.method == "magnitude")
    assert mag.result["final_sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert mag.cfg.init_from == outcomes[0].cfg.run_hash()
    _report_of_engine_runs(tmp_path, uri, outcomes)


def _report_of_engine_runs(tmp_path: Path, uri: str, outcomes) -> None:
    """The report built by the CLI from runs the engine really trained (not synthetic MLflow
    runs): every run is a row whose numbers are the ones the run logged, and the report names
    every method, its budget and its equal-budget control. A renamed or missing metric fails here."""
    import csv
    import os
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "launchers.cli",
            "report",
            "--experiment",
            "e2e-local",
            "--tracking-uri",
            uri,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {r["run_hash"]: r for r in csv.DictReader((out / "results.csv").open(newline=""))}
    assert set(rows) == {o.cfg.run_hash() for o in outcomes}
    c = tracking.client(uri)
    for o in outcomes:
        row, m = rows[o.cfg.run_hash()], c.get_run(o.result["mlflow_run_id"]).data.metrics
        assert row["status"] == "FINISHED"
        assert row["method"].split()[0] == ("dense-matched" if o.cfg.budget_matched else o.cfg.method), row["method"]
        assert float(row["test_top1"]) == m["final/test_top1"] == o.result["final_test_top1"]
        assert float(row["achieved_sparsity"]) == m["final/achieved_sparsity"]
        assert int(float(row["budget_total_images"])) == o.result["budget_total_images"]
        assert row["control"] != "" or o.cfg.method == "dense", row
    md = (out / "report.md").read_text()
    for row in rows.values():  # every method (and the matched control, by its name) has its results row
        assert f"\n| {row['method']} | " in md, row["method"]
    assert (out / "index.html").stat().st_size > 10_000


def test_slurm_preemption_requeues_and_resumes_bit_exact(tmp_path, betons, mlflow_server, slurm_cluster, monkeypatch):
    """USR2 to a running SLURM task (what SLURM sends before preemption or the time limit), sent
    by `scancel --signal`: checkpoint, requeue by submitit, resume; same final state as an
    uninterrupted run, one MLflow run. Each step is slowed by 40 ms (the engine's test hook;
    it changes no number) so the signal, sent once epoch 1 is logged, lands well before the
    run's end on any machine."""
    import json
    import sys
    import threading
    import time

    from tests.test_resume import SCRIPT_ONE

    data = betons["train"].parent
    p = tmp_path / "pre.yaml"
    p.write_text(
        textwrap.dedent(f"""
        name: e2e-preempt-{TAG}
        tracking_uri: {mlflow_server}
        data_dir: {data}
        out_dir: {tmp_path / "runs"}
        base: {{model: fmnist_cnn, epochs: 4, max_steps_per_epoch: 15, batch_size: 64, init: scratch,
                hyperflux: {{pruning_end: 3, gate_lr: 0.02}}}}
        grid: {{methods: [hyperflux], sparsities: [0.8], seeds: [3]}}
        launcher: {{executor: slurm, parallelism: 1, folder: {tmp_path / "submitit"}, poll_s: 1}}
    """)
    )
    monkeypatch.setenv("HFBENCH_INJECT", "*:sleep@40")
    sweep = load_sweep(p)
    cfg = sweep.expand()[0]
    box = {}
    t = threading.Thread(target=lambda: box.update(out=Sweep(sweep).run()))
    t.start()
    deadline = time.time() + 400
    job_id = None
    while time.time() < deadline and job_id is None:
        for log in (tmp_path / "submitit").rglob("*_log.out"):
            if " epoch 1/4 " in log.read_text(errors="replace"):
                job_id = log.name.split("_log.out")[0].rsplit("_", 1)[0]
        time.sleep(0.2)
    assert job_id, "the task never reached epoch 1"
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    t.join(timeout=600)
    assert not t.is_alive()
    (o,) = box["out"]
    assert o.state == "finished", o.error
    logs = "".join(f.read_text(errors="replace") for f in (tmp_path / "submitit").rglob("*_log.*"))
    assert "stop requested at epoch" in logs and "resuming" in logs, logs[-3000:]

    # the uninterrupted reference, same config, in a plain process
    ref_cfg = cfg.model_copy(update={"out_dir": str(tmp_path / "ref"), "experiment": "e2e-preempt-ref"})
    uri = f"sqlite:///{tmp_path / 'ref.db'}"
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            SCRIPT_ONE,
            json.dumps(ref_cfg.model_dump(mode="json")),
            uri,
            str(tmp_path / "ref.json"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ref = json.loads((tmp_path / "ref.json").read_text())
    assert o.result["state_digest"] == ref["state_digest"]
    assert o.result["final_test_top1"] == ref["final_test_top1"]

    c = tracking.client(mlflow_server)
    exp = c.get_experiment_by_name(f"e2e-preempt-{TAG}").experiment_id
    runs = tracking.training_runs(c, exp)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert sorted({m.step for m in c.get_metric_history(runs[0].info.run_id, mlflow_key("density"))}) == [1, 2, 3, 4]


def test_failing_task_is_isolated_reported_and_resumed(tmp_path, betons, mlflow_server, slurm_cluster, monkeypatch):
    """One task's loss turns NaN (injected): it alone fails, MLflow marks it FAILED with the
    reason, `hfbench status` shows it, and a second sweep reruns only it."""
    from launchers.status import format_table, sweep_status

    p = tmp_path / "fail.yaml"
    p.write_text(
        textwrap.dedent(f"""
        name: e2e-fail-{TAG}
        tracking_uri: {mlflow_server}
        data_dir: {betons["train"].parent}
        out_dir: {tmp_path / "runs"}
        base: {{model: fmnist_cnn, epochs: 2, max_steps_per_epoch: 8, batch_size: 64, init: scratch}}
        grid: {{methods: [magnitude, gmp], sparsities: [0.5], seeds: [0]}}
        overrides: {{gmp: {{gmp: {{start_epoch: 0, end_epoch: 1, update_every: 2}}}}}}
        launcher: {{executor: slurm, parallelism: 2, folder: {tmp_path / "submitit"}, poll_s: 1}}
    """)
    )
    sweep = load_sweep(p)
    mag, gmp = sweep.expand()
    monkeypatch.setenv("HFBENCH_INJECT", f"{gmp.run_hash()}:nan@3")
    first = Sweep(sweep).run()
    assert [o.state for o in first] == ["finished", "failed"]
    assert "non-finite loss" in first[1].error
    rows = {r.hash: r for r in sweep_status(sweep)}
    assert rows[mag.run_hash()].state == "finished" and rows[gmp.run_hash()].state == "failed"
    assert "non-finite loss" in rows[gmp.run_hash()].error and rows[gmp.run_hash()].progress == "0/2"
    assert "failed" in format_table(list(rows.values()))

    monkeypatch.delenv("HFBENCH_INJECT")
    second = Sweep(sweep).run()
    assert [o.state for o in second] == ["skipped", "finished"]
    c = tracking.client(mlflow_server)
    runs = tracking.training_runs(c, c.get_experiment_by_name(f"e2e-fail-{TAG}").experiment_id)
    finished = [r.data.tags[tracking.TAG_HASH] for r in runs if r.info.status == "FINISHED"]
    assert sorted(finished) == sorted([mag.run_hash(), gmp.run_hash()])
    assert len(runs) == 3  # the failed attempt stays on record, marked FAILED
    assert {r.state for r in sweep_status(sweep)} == {"finished"}
