"""Two DeepSpeed ranks on the CPU (gloo), started as a real 2-task submitit job: both ranks
must end with identical weights, gates and masks."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.mark.parametrize("method", ["hyperflux", "gmp"])
def test_two_ranks_end_identical(tmp_path, betons, method):
    import submitit

    from launchers import task
    from suite import tracking
    from suite.config import RunConfig

    cfg = RunConfig(
        method=method,
        sparsity=0.5,
        epochs=3,
        max_steps_per_epoch=6,
        batch_size=32,
        data_dir=str(betons["train"].parent),
        out_dir=str(tmp_path / "runs"),
        hyperflux={"pruning_end": 2, "gate_lr": 0.05},
        gmp={"start_epoch": 0, "end_epoch": 2, "update_every": 3},
        engine={"world_size": 2},
        experiment="dist",
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "dist")
    ex = submitit.AutoExecutor(folder=str(tmp_path / "submitit"), cluster="local")
    ex.update_parameters(tasks_per_node=2, nodes=1, timeout_min=10)
    job = ex.submit(task.run, cfg.model_dump(mode="json"), uri, exp)
    results = job.results()
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert results[0]["state_digest"] == results[1]["state_digest"], "ranks diverged"
    assert results[0]["final_density"] == results[1]["final_density"] < 1.0
    # the run trained something: the gradient all-reduce ran over two shards of data
    runs = tracking.training_runs(tracking.client(uri), exp)
    assert len(runs) == 1 and runs[0].data.tags["env.world_size"] == "2"


def test_zero_stages_train_the_same_dense_model(tmp_path, betons):
    """engine.zero_stage 1 and 2 (optimiser state, then gradients too, partitioned over two
    gloo ranks) end with the same weights as stage 0, to float tolerance; and the flag takes
    effect: under stage 0 each rank holds the momentum of every parameter, under 1 and 2 each
    holds about half (the partition), together all of it."""
    import submitit
    import torch

    from launchers import task
    from suite import tracking
    from suite.config import RunConfig

    finals, held = {}, {}
    for stage in (0, 1, 2):
        cfg = RunConfig(
            method="dense",
            epochs=2,
            max_steps_per_epoch=5,
            batch_size=32,
            eval_every=2,
            data_dir=str(betons["train"].parent),
            out_dir=str(tmp_path / f"runs{stage}"),
            engine={"world_size": 2, "zero_stage": stage},
            experiment="zero",
        )
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        exp = tracking.ensure_experiment(uri, "zero")
        ex = submitit.AutoExecutor(folder=str(tmp_path / f"submitit{stage}"), cluster="local")
        ex.update_parameters(tasks_per_node=2, nodes=1, timeout_min=10)
        results = ex.submit(task.run, cfg.model_dump(mode="json"), uri, exp).results()
        assert results[0]["state_digest"] == results[1]["state_digest"], f"stage {stage}: ranks diverged"
        finals[stage] = torch.load(results[0]["weights"], weights_only=True)
        held[stage] = [r["optimizer_state_numel"] for r in results]
    n = sum(v.numel() for k, v in finals[0].items() if v.is_floating_point() and "running_" not in k)
    assert held[0] == [n, n], (held[0], n)  # SGD momentum: one element per parameter element, on each rank
    for stage in (1, 2):
        assert sum(held[stage]) >= n and all(h <= 0.55 * n for h in held[stage]), (stage, held[stage], n)
    for stage in (1, 2):
        for k, v in finals[0].items():
            torch.testing.assert_close(finals[stage][k], v, rtol=1e-4, atol=1e-5, msg=f"stage {stage}: {k}")


_ONE_TASK = """
import os, sys
from suite.distributed import setup_distributed
print(setup_distributed("cpu"), os.environ["MASTER_PORT"])
"""


def test_a_one_task_job_rendezvouses_on_a_free_port_not_on_submitits(tmp_path):
    """submitit derives MASTER_PORT from the job id (20000-60000, mostly Linux's range for
    outgoing connections). A one-task submitit job whose port is taken by someone else still
    starts: it meets only itself, on a port the kernel picked free."""
    import os
    import random
    import socket
    import subprocess
    import sys
    from pathlib import Path

    job_id = "19417"
    taken = random.Random(job_id).randint(20000, 60000)  # submitit's draw for this job id
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", taken))
        s.listen()
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        env.update(
            PYTHONPATH=str(Path(__file__).resolve().parents[1]),
            SUBMITIT_EXECUTOR="local",
            SUBMITIT_LOCAL_JOB_ID=job_id,
            SUBMITIT_LOCAL_NTASKS="1",
            SUBMITIT_LOCAL_JOB_NUM_NODES="1",
            SUBMITIT_LOCAL_NODEID="0",
            SUBMITIT_LOCAL_GLOBALID="0",
            SUBMITIT_LOCAL_LOCALID="0",
        )
        out = subprocess.run(
            [sys.executable, "-c", _ONE_TASK], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path
        )
    assert out.returncode == 0, out.stderr[-3000:]
    ranks, port = out.stdout.split()[-4:-1], out.stdout.split()[-1]
    assert "".join(ranks) == "(0,1,0)" and int(port) != taken
