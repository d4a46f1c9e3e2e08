"""End to end through the real parts: FFCV data, DeepSpeed engine, submitit to the local
SLURM cluster and to local processes, MLflow server. Slow; run in CI by the test command."""
from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from launchers.sweep import Sweep
from suite import tracking
from suite.config import load_sweep

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _sweep_file(tmp_path: Path, data_dir: Path, name: str, executor: str, uri: str) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(textwrap.dedent(f"""
        name: {name}
        tracking_uri: {uri}
        data_dir: {data_dir}
        out_dir: {tmp_path / 'runs'}
        base: {{model: fmnist_cnn, epochs: 3, max_steps_per_epoch: 8, batch_size: 64, init: dense}}
        grid: {{methods: [dense, magnitude, gmp, hyperflux], sparsities: [0.5], seeds: [0]}}
        overrides:
          dense: {{epochs: 1, max_steps_per_epoch: 20}}
          hyperflux: {{hyperflux: {{pruning_end: 2, gate_lr: 0.05}}}}
          gmp: {{gmp: {{start_epoch: 0, end_epoch: 2, update_every: 4}}}}
        launcher: {{executor: {executor}, parallelism: 2, folder: {tmp_path / 'submitit'}, poll_s: 1}}
    """))
    return p


def _check_mlflow(uri: str, experiment: str, n: int) -> list:
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == n, f"expected {n} runs in {experiment}, found {len(runs)}"
    for r in runs:
        assert r.info.status == "FINISHED", (r.info.run_name, r.data.tags.get("hfbench.error"))
        m = r.data.metrics
        for key in ("train_loss", "val_top1", "test_top1", "density", "final_test_top1", "final_sparsity"):
            assert key in m, f"{r.info.run_name}: metric {key} missing"
        assert 0.0 < m["final_test_top1"] <= 1.0
        assert r.data.params["config_hash"] == r.data.tags[tracking.TAG_HASH]
        assert "env.git_commit" in r.data.params and "env.deepspeed" in r.data.params
        hist = c.get_metric_history(r.info.run_id, "val_top1")
        assert [h.step for h in sorted(hist, key=lambda h: h.step)] == list(range(1, int(r.data.params["epochs"]) + 1))
        arts = {a.path for a in c.list_artifacts(r.info.run_id)}
        assert {"config.yaml", "layer_density.csv"} <= arts
        if r.data.params["method"] == "hyperflux":
            assert "gamma" in m and "target_density" in m
    return runs


def _run(path: Path):
    sweep = load_sweep(path)
    outcomes = Sweep(sweep).run()
    return sweep, outcomes


def test_sweep_through_slurm_into_mlflow_server(tmp_path, betons, mlflow_server, slurm_cluster):
    data_dir = betons["train"].parent
    sweep, outcomes = _run(_sweep_file(tmp_path, data_dir, "e2e-slurm", "slurm", mlflow_server))
    assert [o.state for o in outcomes] == ["finished"] * 4, [(o.cfg.run_name(), o.error) for o in outcomes]
    # they really ran as SLURM jobs: the pruning runs as one array, all COMPLETED in accounting
    pruned = [o for o in outcomes if o.cfg.method != "dense"]
    assert len({o.job_id.split("_")[0] for o in pruned}) == 1 and all("_" in o.job_id for o in pruned)
    for o in outcomes:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", o.job_id],
                             capture_output=True, text=True, timeout=30)
        assert out.stdout.split() == ["COMPLETED"], (o.job_id, out.stdout, out.stderr)
    runs = _check_mlflow(mlflow_server, "e2e-slurm", 4)
    for o in outcomes:
        if o.cfg.method != "dense":
            assert abs(o.result["final_sparsity"] - 0.5) < 0.2
    # run again: everything FINISHED is skipped, nothing is trained twice
    sweep, again = _run(_sweep_file(tmp_path, data_dir, "e2e-slurm", "slurm", mlflow_server))
    assert [o.state for o in again] == ["skipped"] * 4
    assert len(_check_mlflow(mlflow_server, "e2e-slurm", 4)) == len(runs)


def test_sweep_through_local_executor(tmp_path, betons):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep, outcomes = _run(_sweep_file(tmp_path, betons["train"].parent, "e2e-local", "local", uri))
    assert [o.state for o in outcomes] == ["finished"] * 4, [(o.cfg.run_name(), o.error) for o in outcomes]
    _check_mlflow(uri, "e2e-local", 4)
    # magnitude reached its target exactly; the pruned runs started from the dense weights
    mag = next(o for o in outcomes if o.cfg.method == "magnitude")
    assert mag.result["final_sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert mag.cfg.init_from == outcomes[0].cfg.run_hash()
