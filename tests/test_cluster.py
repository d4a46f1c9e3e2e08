"""Cluster behaviour against the real local SLURM (started by the test command): array
parallelism, time limits, multi-rank tasks. Slow; run in CI by the test command."""

from __future__ import annotations

import re
import subprocess
import textwrap
import time
import uuid
from datetime import datetime
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


_LIVE = ("", "Unknown", "PENDING", "RUNNING", "COMPLETING", "REQUEUED", "CONFIGURING")


def _sacct(job: str, fields: str, duplicates: bool = False) -> list[list[str]]:
    """Rows of `sacct` for one job (or array), retried until accounting has caught up: the
    job's last record has a final state and every field is filled ("State" must be a field)."""
    cmd = ["sacct", "-n", "-X", "-P", "-o", fields, "-j", job] + (["-D"] if duplicates else [])
    state = fields.split(",").index("State")
    rows: list[list[str]] = []
    for _ in range(120):
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        rows = [line.split("|") for line in out.stdout.splitlines() if line.strip()]
        if rows and rows[-1][state] not in _LIVE and all(c not in ("", "Unknown") for c in rows[-1]):
            if duplicates or all(r[state] not in _LIVE for r in rows):
                return rows
        time.sleep(0.5)
    return rows


def _write(tmp_path: Path, name: str, body: str) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(textwrap.dedent(body))
    return p


def _max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    """Most intervals [start, end) alive at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    live = best = 0
    for _, d in events:
        live += d
        best = max(best, live)
    return best


def test_six_task_array_honours_parallelism(tmp_path, betons, slurm_cluster):
    """6 runs as one SLURM array with at most 2 running at once (checked from sacct start and
    end times), into the default sqlite store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = _write(
        tmp_path,
        "par",
        f"""
        name: e2e-par
        tracking_uri: {uri}
        data_dir: {betons["train"].parent}
        out_dir: {tmp_path / "runs"}
        base: {{model: fmnist_cnn, epochs: 1, max_steps_per_epoch: 3, batch_size: 32, init: scratch}}
        grid: {{methods: [magnitude], sparsities: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], seeds: [0]}}
        launcher: {{executor: slurm, parallelism: 2, folder: {tmp_path / "submitit"}, poll_s: 1,
                    slurm: {{time_min: 10}}}}
    """,
    )
    outcomes = Sweep(load_sweep(p)).run()
    assert len(outcomes) == 6
    assert [o.state for o in outcomes] == ["finished"] * 6, [(o.cfg.run_name(), o.error) for o in outcomes]
    arrays = {o.job_id.split("_")[0] for o in outcomes}
    assert len(arrays) == 1, f"expected one array job, got {arrays}"
    rows = _sacct(arrays.pop(), "JobID,State,Start,End")
    rows = [r for r in rows if "_" in r[0] and "[" not in r[0]]
    assert len(rows) == 6 and {r[1] for r in rows} == {"COMPLETED"}, rows
    spans = [(datetime.fromisoformat(r[2]), datetime.fromisoformat(r[3])) for r in rows]
    peak = _max_overlap(spans)
    assert peak <= 2, f"{peak} array tasks ran at once with parallelism 2: {rows}"
    assert peak >= 2, f"the array never ran tasks side by side: {rows}"
    c = tracking.client(uri)
    runs = tracking.training_runs(c, c.get_experiment_by_name("e2e-par").experiment_id)
    assert len(runs) == 6 and {r.info.status for r in runs} == {"FINISHED"}
    achieved = sorted(round(r.data.metrics[mlflow_key("final_sparsity")], 3) for r in runs)
    assert achieved == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]


def test_time_limit_checkpoints_requeues_and_finishes(tmp_path, betons, mlflow_server, slurm_cluster, monkeypatch):
    """A 3-minute time limit on a run that needs longer: SLURM's USR2 (signal_delay_s before the
    limit) makes the task checkpoint, submitit requeues it, and the run finishes as one MLflow
    run with every epoch logged once. SLURM may send the signal up to 60 s earlier than asked
    (its event resolution), so the limit leaves a minute between the task's start and the
    earliest signal: a USR2 that lands while Python is still starting, before any handler is
    installed, would kill the task. Each step is slowed by 80 ms (the engine's test hook) so
    the run outlasts one allocation however fast the machine is."""
    monkeypatch.setenv("HFBENCH_INJECT", "*:sleep@80")
    p = _write(
        tmp_path,
        "tl",
        f"""
        name: e2e-timelimit-{TAG}
        tracking_uri: {mlflow_server}
        data_dir: {betons["train"].parent}
        out_dir: {tmp_path / "runs"}
        base: {{model: fmnist_cnn, epochs: 3, max_steps_per_epoch: 500, batch_size: 32, init: scratch,
                eval_every: 3}}
        grid: {{methods: [dense], sparsities: [0.5], seeds: [0]}}
        launcher: {{executor: slurm, parallelism: 1, folder: {tmp_path / "submitit"}, poll_s: 1,
                    max_requeues: 10, slurm: {{time_min: 3, signal_delay_s: 60}}}}
    """,
    )
    t0 = time.time()
    (o,) = Sweep(load_sweep(p)).run()
    assert o.state == "finished", o.error
    job = o.job_id
    states = [r[1] for r in _sacct(job, "JobID,State", duplicates=True)]
    assert states[-1] == "COMPLETED" and len(states) >= 2, states
    assert all(s in ("REQUEUED", "PREEMPTED", "TIMEOUT", "COMPLETED") for s in states), states
    logs = "".join(f.read_text(errors="replace") for f in (tmp_path / "submitit").rglob("*_log.*"))
    assert "stop requested at epoch" in logs and "resuming" in logs, logs[-3000:]
    c = tracking.client(mlflow_server)
    runs = tracking.training_runs(c, c.get_experiment_by_name(f"e2e-timelimit-{TAG}").experiment_id)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    hist = c.get_metric_history(runs[0].info.run_id, mlflow_key("train_loss"))
    assert sorted(h.step for h in hist) == [1, 2, 3], [h.step for h in hist]
    print(f"time-limit run: {len(states) - 1} requeue(s), {time.time() - t0:.0f} s, states {states}")


def test_two_rank_task_trains_and_logs_once(tmp_path, betons, mlflow_server, slurm_cluster):
    """engine.world_size 2: one SLURM task allocation with two processes (ntasks-per-node 2)
    that rendezvous from the SLURM environment; both train, only rank 0 logs."""
    p = _write(
        tmp_path,
        "r2",
        f"""
        name: e2e-2rank-{TAG}
        tracking_uri: {mlflow_server}
        data_dir: {betons["train"].parent}
        out_dir: {tmp_path / "runs"}
        base: {{model: fmnist_cnn, epochs: 3, max_steps_per_epoch: 6, batch_size: 32, init: scratch,
                engine: {{world_size: 2}}, hyperflux: {{pruning_end: 2, gate_lr: 0.05}}}}
        grid: {{methods: [hyperflux], sparsities: [0.5], seeds: [0]}}
        launcher: {{executor: slurm, parallelism: 1, folder: {tmp_path / "submitit"}, poll_s: 1,
                    slurm: {{time_min: 10}}}}
    """,
    )
    (o,) = Sweep(load_sweep(p)).run()
    assert o.state == "finished", o.error
    (row,) = _sacct(o.job_id, "JobID,State")
    assert row[1] == "COMPLETED", row
    # srun started two processes in the allocation: submitit writes one log per task
    outs = {f.name: f.read_text(errors="replace") for f in (tmp_path / "submitit").rglob("*_log.out")}
    assert len(outs) == 2, sorted(outs)
    assert all("Job completed successfully" in t for t in outs.values()), {k: v[-500:] for k, v in outs.items()}
    assert o.result["rank"] == 0
    c = tracking.client(mlflow_server)
    runs = tracking.training_runs(c, c.get_experiment_by_name(f"e2e-2rank-{TAG}").experiment_id)
    assert len(runs) == 1, f"{len(runs)} MLflow runs for one 2-rank task"
    r = runs[0]
    assert r.info.status == "FINISHED" and r.data.tags["env.world_size"] == "2"
    for key in ("train_loss", "density"):
        hist = c.get_metric_history(r.info.run_id, mlflow_key(key))
        assert sorted(h.step for h in hist) == [1, 2, 3], f"{key} logged {[h.step for h in hist]}"


def test_two_node_run_checkpoints_requeues_resumes_and_matches_one_node(
    tmp_path, betons, mlflow_server, slurm_cluster, monkeypatch
):
    """engine.nodes 2 on a real two-node SLURM partition (two slurmd with their own node names,
    scripts/services.sh): one rank per node rendezvous from the SLURM environment. The rank on
    the second node gets a preemption signal at step 7 (the engine's test hook, so the moment
    is fixed, not raced); rank 0 learns of it through the stop agreement, the ranks checkpoint
    at the step they agree on, submitit requeues the job, both nodes resume, and the run ends
    with the same weights, bit for bit, as the same run on one node with two ranks (local
    executor, a store of its own), logged once in one MLflow run."""
    import os

    multi = os.environ.get("HFBENCH_SLURM_MULTI_PARTITION")
    if not multi:
        pytest.fail(
            "HFBENCH_SLURM_MULTI_PARTITION is unset: start the services with scripts/services.sh "
            "(it starts two nodes and exports the partition that holds both)"
        )
    name = f"e2e-2node-{uuid.uuid4().hex[:8]}"
    base = (
        "{model: fmnist_cnn, epochs: 3, max_steps_per_epoch: 12, batch_size: 32, init: scratch, "
        "hyperflux: {pruning_end: 2, gate_lr: 0.05}, engine: {nodes: NODES, world_size: RANKS, device: cpu}}"
    )

    def sweep_file(tag: str, nodes: int, ranks: int, uri: str, launcher: str) -> Path:
        return _write(
            tmp_path,
            tag,
            f"""
            name: {name}
            tracking_uri: {uri}
            data_dir: {betons["train"].parent}
            out_dir: {tmp_path / tag}
            base: {base.replace("NODES", str(nodes)).replace("RANKS", str(ranks))}
            grid: {{methods: [hyperflux], sparsities: [0.5], seeds: [0]}}
            launcher: {launcher}
        """,
        )

    one = sweep_file(
        "one",
        1,
        2,
        f"sqlite:///{tmp_path / 'one.db'}",
        f"{{executor: local, folder: {tmp_path / 'sub-one'}, poll_s: 1}}",
    )
    (ref,) = Sweep(load_sweep(one)).run()
    assert ref.state == "finished", ref.error

    monkeypatch.setenv("HFBENCH_INJECT", "*:usr2@7")
    two = sweep_file(
        "two",
        2,
        1,
        mlflow_server,
        f"{{executor: slurm, parallelism: 1, folder: {tmp_path / 'sub-two'}, poll_s: 1, "
        f"max_requeues: 3, slurm: {{time_min: 15, partition: {multi}}}}}",
    )
    (o,) = Sweep(load_sweep(two)).run()
    assert o.state == "finished", o.error
    rows = _sacct(o.job_id, "JobID,State,NNodes,NodeList", duplicates=True)
    states = [r[1] for r in rows]
    assert states[-1] == "COMPLETED" and "REQUEUED" in states, states
    assert all(r[2] == "2" for r in rows), f"not every allocation spanned two nodes: {rows}"

    def nodes_of(partition: str) -> set[str]:
        return set(
            subprocess.run(
                ["sinfo", "-h", "-p", partition, "-N", "-o", "%N"], capture_output=True, text=True, timeout=30
            ).stdout.split()
        )

    (second,) = nodes_of(multi) - nodes_of(os.environ.get("HFBENCH_SLURM_PARTITION", "debug"))
    # the second node's own slurmd started a task of every allocation (the first and the requeued one)
    launched = (Path(os.environ["HFBENCH_SERVICES_DIR"]) / "log" / f"slurmd-{second}.log").read_text()
    assert launched.count(f"launch task StepId={o.job_id}.0 ") == len(rows), (second, rows)
    logs = "".join(f.read_text(errors="replace") for f in (tmp_path / "sub-two").rglob("*_log.*"))
    # rank 1 (second node) got the signal at step 7; both stopped at the agreed step 10 and resumed there
    assert "stop requested at epoch 1, step 10" in logs, logs[-3000:]
    assert re.search(r"\] resuming \S+ at epoch 1, step 10\b", logs), logs[-3000:]
    assert "resuming from" not in logs, "fell back to an older checkpoint"

    assert o.result["state_digest"] == ref.result["state_digest"], "two nodes ended elsewhere than one node"
    for k in ("final_test_top1", "final_density"):
        assert o.result[k] == ref.result[k], k
    c = tracking.client(mlflow_server)
    runs = tracking.training_runs(c, c.get_experiment_by_name(name).experiment_id)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [r.info.status for r in runs]
    assert runs[0].data.tags["env.world_size"] == "2"
    for key in ("train_loss", "density"):
        steps = sorted(h.step for h in c.get_metric_history(runs[0].info.run_id, mlflow_key(key)))
        assert steps == [1, 2, 3], f"{key} logged at {steps}"
    print(f"two nodes: states {states}, nodes {rows[-1][3]}")


def test_node_failure_requeues_and_resumes(tmp_path, betons, mlflow_server, slurm_cluster):
    """slurmd and the task's processes are SIGKILLed together mid-run (scripts/services.sh
    crash-node), the node comes back; SLURM requeues the task (NODE_FAIL), which resumes from
    its last epoch checkpoint and finishes as the same MLflow run, every epoch logged once."""
    import json
    import os
    import sys

    root = Path(__file__).resolve().parents[1]
    services = os.environ["HFBENCH_SERVICES_DIR"]
    p = _write(
        tmp_path,
        "nf",
        f"""
        name: e2e-nodefail-{TAG}
        tracking_uri: {mlflow_server}
        data_dir: {betons["train"].parent}
        out_dir: {tmp_path / "runs"}
        base: {{model: fmnist_cnn, epochs: 6, max_steps_per_epoch: 20, batch_size: 64, init: scratch,
                eval_every: 6}}
        grid: {{methods: [dense], sparsities: [0.5], seeds: [0]}}
        launcher: {{executor: slurm, parallelism: 1, folder: {tmp_path / "submitit"}, poll_s: 1,
                    slurm: {{time_min: 30}}}}
    """,
    )
    env = {
        **os.environ,
        "HFBENCH_INJECT": "*:sleep@150",
        "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    sweep = subprocess.Popen(
        [sys.executable, "-m", "launchers.cli", "sweep", str(p)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    t0 = time.time()
    ckpt = None
    while ckpt is None:  # wait for the task's second epoch checkpoint
        assert sweep.poll() is None, sweep.stdout.read()[-3000:]
        assert time.time() - t0 < 600, "the task never wrote a checkpoint"
        for q in (tmp_path / "runs").glob("*/prev.pt"):
            ckpt = q
        time.sleep(0.5)
    crash = subprocess.run(
        ["bash", str(root / "scripts/services.sh"), "crash-node", services], capture_output=True, text=True, timeout=120
    )
    assert crash.returncode == 0, crash.stdout + crash.stderr
    time.sleep(5)
    back = subprocess.run(
        ["bash", str(root / "scripts/services.sh"), "restart-node", services],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert back.returncode == 0, back.stdout + back.stderr
    out, _ = sweep.communicate(timeout=900)
    assert sweep.returncode == 0 and "done   fmnist_cnn-dense-s0" in out, out[-3000:]
    jobs = (
        [
            json.loads(line)
            for line in (tmp_path / "submitit" / f"e2e-nodefail-{TAG}" / "jobs.jsonl").read_text().splitlines()
            if line.strip()
        ]
        if (tmp_path / "submitit" / f"e2e-nodefail-{TAG}" / "jobs.jsonl").exists()
        else []
    )
    job = jobs[-1]["job_id"] if jobs else None
    assert job, "no job recorded"
    states = [r[1] for r in _sacct(job, "JobID,State", duplicates=True)]
    assert "NODE_FAIL" in states and states[-1] == "COMPLETED", states
    logs = "".join(f.read_text(errors="replace") for f in (tmp_path / "submitit").rglob("*_log.*"))
    assert "resuming" in logs, logs[-3000:]
    c = tracking.client(mlflow_server)
    runs = tracking.training_runs(c, c.get_experiment_by_name(f"e2e-nodefail-{TAG}").experiment_id)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [r.info.status for r in runs]
    steps = sorted(h.step for h in c.get_metric_history(runs[0].info.run_id, mlflow_key("train_loss")))
    assert steps == list(range(1, 7)), steps  # none lost, none twice
    print(f"node failure: states {states}, {time.time() - t0:.0f} s")


@pytest.mark.parametrize(
    "request_,field",
    [
        ("cpus_per_task: 64", "launcher.slurm.cpus_per_task"),
        ("time_min: 600", "launcher.slurm.time_min"),  # the partition allows 240
        ("mem_gb: 4096", "launcher.slurm.mem_gb"),
        ("partition: no-such-partition", "launcher.slurm.partition"),
    ],
    ids=["cpus", "time", "mem", "partition"],
)
def test_requests_the_cluster_cannot_satisfy_are_refused_before_submission(
    tmp_path, betons, slurm_cluster, request_, field
):
    """Issue 21: a request no node or partition of the cluster can meet used to wait in the queue
    forever (CPUs, time limit) or fail inside sbatch with a traceback after the experiment was
    created (memory, partition). Now: exit 2, one line naming the field, read from the cluster's
    own `scontrol show partition/node`; no experiment, no job, no submitit folder."""
    import sys

    from tests.test_faults import _env

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p = _write(
        tmp_path,
        "bad",
        f"""
        name: e2e-unsatisfiable
        tracking_uri: {uri}
        data_dir: {betons["train"].parent}
        out_dir: {tmp_path / "runs"}
        base: {{model: fmnist_cnn, epochs: 1, max_steps_per_epoch: 5}}
        grid: {{methods: [dense], sparsities: [0.5], seeds: [0]}}
        launcher: {{executor: slurm, folder: {tmp_path / "submitit"}, slurm: {{{request_}}}}}
    """,
    )
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    r = subprocess.run(
        [sys.executable, "-m", "launchers.cli", "sweep", str(p)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hfbench: ") and field in err[0], r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "submitit").exists()
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert set(after) <= set(before)


def _start_sweep(tmp_path: Path, name: str, uri: str, data: Path, **env):
    """A dense run (slowed by the engine's test hook) and a magnitude child, on SLURM, in a
    thread; returns (thread, box, sweep config, dense job id once its epoch 1 is logged)."""
    import threading

    p = _write(
        tmp_path,
        name,
        f"""
        name: {name}
        tracking_uri: {uri}
        data_dir: {data}
        out_dir: {tmp_path / "runs"}
        base: {{model: fmnist_cnn, epochs: 3, max_steps_per_epoch: 40, batch_size: 32, init: dense}}
        grid: {{methods: [dense, magnitude], sparsities: [0.5], seeds: [0]}}
        overrides: {{magnitude: {{epochs: 1, max_steps_per_epoch: 5}}}}
        launcher: {{executor: slurm, parallelism: 1, folder: {tmp_path / "submitit"}, poll_s: 1}}
    """,
    )
    sweep = load_sweep(p)
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(out=Sweep(sweep).run()))
    t.start()
    deadline, job_id = time.time() + 300, None
    while time.time() < deadline and job_id is None:
        for log in (tmp_path / "submitit").rglob("*_log.out"):
            if " epoch 1/3 " in log.read_text(errors="replace"):
                job_id = log.name.split("_log.out")[0].rsplit("_", 1)[0]
        time.sleep(0.2)
    assert job_id, "the dense task never reached epoch 1"
    return t, box, sweep, job_id


@pytest.mark.parametrize("target", ["task", "array"])
def test_scancel_ends_the_run_as_cancelled_and_its_children_say_why(
    tmp_path, betons, mlflow_server, slurm_cluster, monkeypatch, target
):
    """Issue 21, case 1: `scancel` of a running task, or of its whole array. The sweep names
    SLURM's state, the MLflow run is ended (KILLED, with the reason) instead of staying RUNNING
    for good, `status` says cancelled, and the dependent run says its parent was cancelled."""
    from launchers.status import sweep_status

    monkeypatch.setenv("HFBENCH_INJECT", "*:sleep@100")
    name = f"e2e-cancel-{uuid.uuid4().hex[:6]}"  # unique: the server outlives this test
    t, box, sweep, job_id = _start_sweep(tmp_path, name, mlflow_server, betons["train"].parent)
    subprocess.run(["scancel", job_id if target == "task" else job_id.split("_")[0]], check=True, timeout=30)
    t.join(timeout=300)
    assert not t.is_alive()
    dense, child = box["out"]
    assert dense.state == "failed" and "CANCELLED" in dense.error, dense.error
    assert (
        child.state == "failed" and "dense parent fmnist_cnn-dense-s0" in child.error and "cancelled" in child.error
    ), child.error
    c = tracking.client(mlflow_server)
    exp = c.get_experiment_by_name(name).experiment_id
    (run,) = tracking.training_runs(c, exp)
    assert run.info.status == "KILLED" and "CANCELLED" in run.data.tags["hfbench.error"]
    rows = {r.run: r for r in sweep_status(sweep, mlflow_server)}
    assert rows["fmnist_cnn-dense-s0"].state == "cancelled", rows


def test_a_deleted_submitit_folder_does_not_turn_a_finished_run_into_a_failure(
    tmp_path, betons, mlflow_server, slurm_cluster, monkeypatch
):
    """Issue 21, case 4: the submitit folder (job pickles, logs, result files) is deleted while
    the dense task trains. Training finishes (weights, done marker, MLflow FINISHED); the sweep
    judges it by its done marker, reports it finished, trains the child from its weights, and
    exits with every run finished."""
    import shutil

    monkeypatch.setenv("HFBENCH_INJECT", "*:sleep@60")
    name = f"e2e-nofolder-{uuid.uuid4().hex[:6]}"
    t, box, sweep, job_id = _start_sweep(tmp_path, name, mlflow_server, betons["train"].parent)
    for d in (tmp_path / "submitit" / name).iterdir():
        if d.is_dir():
            shutil.rmtree(d)
    t.join(timeout=600)
    assert not t.is_alive()
    outs = box["out"]
    assert [o.state for o in outs] == ["finished", "finished"], [(o.state, o.error) for o in outs]
    c = tracking.client(mlflow_server)
    exp = c.get_experiment_by_name(name).experiment_id
    assert sorted(r.info.status for r in tracking.training_runs(c, exp)) == ["FINISHED", "FINISHED"]


def test_a_controller_outage_at_a_stage_boundary_is_waited_out(
    tmp_path, betons, mlflow_server, slurm_cluster, monkeypatch
):
    """Issue 21, case 2: slurmctld goes down while the dense stage runs, so the next stage's
    sbatch cannot reach it. The sweep says so and retries the submission (it used to end with
    a raw traceback and never submit the rest); once the controller is back the child is
    submitted and trains, and the sweep ends with its summary, every run finished. The test
    restarts the controller only after the sweep has said it is retrying."""
    import os
    import threading

    monkeypatch.setenv("HFBENCH_INJECT", "*:sleep@30")
    said: list[str] = []
    services = Path(__file__).resolve().parents[1] / "scripts" / "services.sh"
    state = os.environ.get("HFBENCH_SERVICES_DIR", "/tmp/hfbench-services")
    p = _write(
        tmp_path,
        "outage",
        f"""
        name: e2e-ctld-outage-{uuid.uuid4().hex[:6]}
        tracking_uri: {mlflow_server}
        data_dir: {betons["train"].parent}
        out_dir: {tmp_path / "runs"}
        base: {{model: fmnist_cnn, epochs: 2, max_steps_per_epoch: 40, batch_size: 32, init: dense}}
        grid: {{methods: [dense, magnitude], sparsities: [0.5], seeds: [0]}}
        overrides: {{magnitude: {{epochs: 1, max_steps_per_epoch: 5}}}}
        launcher: {{executor: slurm, parallelism: 1, folder: {tmp_path / "submitit"}, poll_s: 1, submit_retry_s: 300}}
    """,
    )
    box: dict = {}
    sweep = load_sweep(p)
    t = threading.Thread(
        target=lambda: box.update(out=Sweep(sweep, say=lambda *a, **k: said.append(" ".join(map(str, a)))).run())
    )
    t.start()
    deadline, running = time.time() + 300, False
    while time.time() < deadline and not running:  # the dense task trains (it no longer needs the controller)
        running = any(
            " epoch 1/2 " in log.read_text(errors="replace") for log in (tmp_path / "submitit").rglob("*_log.out")
        )
        time.sleep(0.2)
    assert running, "the dense task never reached epoch 1"
    subprocess.run(["bash", str(services), "stop-controller", state], check=True, timeout=60)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and not any("retrying the submission" in s for s in said) and t.is_alive():
            time.sleep(0.5)
        assert any("retrying the submission" in s for s in said), said
    finally:
        subprocess.run(["bash", str(services), "start-controller", state], check=True, timeout=120)
    t.join(timeout=600)
    assert not t.is_alive()
    assert [o.state for o in box["out"]] == ["finished", "finished"], [(o.state, o.error) for o in box["out"]]
    assert any("2 runs: 2 finished" in s for s in said), said[-5:]


def test_a_queued_run_shows_why_it_waits(tmp_path, betons, mlflow_server, slurm_cluster):
    """Issue 21, case 2 (second half): with the only node drained, the run waits in the queue;
    the progress line and `status` show SLURM's pending reason and the drained node with its
    reason, instead of "starting" / "queued" alone. The node is resumed and the run finishes."""
    import socket
    import threading

    from launchers.status import sweep_status

    node = socket.gethostname().split(".")[0]
    name = f"e2e-drained-{uuid.uuid4().hex[:6]}"
    p = _write(
        tmp_path,
        "drained",
        f"""
        name: {name}
        tracking_uri: {mlflow_server}
        data_dir: {betons["train"].parent}
        out_dir: {tmp_path / "runs"}
        base: {{model: fmnist_cnn, epochs: 1, max_steps_per_epoch: 3, batch_size: 32, init: scratch}}
        grid: {{methods: [dense], sparsities: [0.5], seeds: [0]}}
        launcher: {{executor: slurm, parallelism: 1, folder: {tmp_path / "submitit"}, poll_s: 1}}
    """,
    )
    sweep = load_sweep(p)
    subprocess.run(
        ["scontrol", "update", f"nodename={node}", "state=drain", "reason=hfbench-maintenance"], check=True, timeout=30
    )
    said: list[str] = []
    try:
        box: dict = {}
        t = threading.Thread(
            target=lambda: box.update(out=Sweep(sweep, say=lambda *a, **k: said.append(str(a[0]))).run())
        )
        t.start()
        deadline, row = time.time() + 120, None
        while time.time() < deadline:
            rows = sweep_status(sweep, mlflow_server)
            if rows and "pending:" in rows[0].error:
                row = rows[0]
                break
            time.sleep(1)
        assert row is not None and row.state == "queued", [vars(r) for r in rows]
        assert "hfbench-maintenance" in row.error and node in row.error, row.error
        from launchers.outcomes import _queued_reason  # what the progress line shows for a queued run

        assert "hfbench-maintenance" in _queued_reason(row.job), row.job
    finally:
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], check=True, timeout=30)
    t.join(timeout=300)
    assert [o.state for o in box["out"]] == ["finished"]
