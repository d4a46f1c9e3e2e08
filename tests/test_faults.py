"""Faults injected for real: a process killed while writing a checkpoint, a corrupt
checkpoint, the MLflow server going down mid-run (and coming back, or not), two sweeps over
overlapping grids at once, a full disk, corrupt data files. The outcome of every test here
is summed in the "hfbench robustness report" printed at the end of a session (conftest.py)
so the figures come from a run, not from memory."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import torch

from suite import mlflow_spool, run_claims, run_logger, tracking
from suite.run_schema import internal_key, mlflow_key
from tests.test_resume import SCRIPT_ONE as SCRIPT
from tests.test_resume import start_one as _start

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(900)


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


def _run_cfg(tmp_path: Path, data_dir: Path, epochs: int = 4, method: str = "magnitude", **kw) -> dict:
    from suite.config import RunConfig

    return RunConfig(
        method=method,
        sparsity=0.8,
        epochs=epochs,
        max_steps_per_epoch=15,
        batch_size=64,
        data_dir=str(data_dir),
        out_dir=str(tmp_path / "runs"),
        experiment="faults",
        **kw,
    ).model_dump(mode="json")


def _popen(cfg: dict, uri: str, result: Path, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, json.dumps(cfg), uri, str(result)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(**env),
    )


def _read_until(p: subprocess.Popen, marker: str, lines: list[str], timeout: float = 600) -> None:
    t0 = time.time()
    for line in p.stdout:
        lines.append(line)
        if marker in line:
            return
        if time.time() - t0 > timeout:
            break
    raise AssertionError(f"never saw {marker!r}:\n" + "".join(lines)[-3000:])


# ----------------------------------------------------------------------------- checkpoints
WRITER = r"""
import sys, torch
from pathlib import Path
from suite.engine import save_checkpoint
save_checkpoint({"big": torch.zeros(60_000_000)}, Path(sys.argv[1]))
"""


def test_kill_during_checkpoint_write_keeps_the_last_good_one(tmp_path):
    from suite.engine import load_checkpoint, save_checkpoint

    path = tmp_path / "last.pt"
    good = {"run_hash": "h", "epoch": 3, "step": 30, "model": {"w": torch.arange(5.0)}, "optimizer": {}, "pruner": {}}
    save_checkpoint(good, path)
    p = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=_env())
    t0 = time.time()
    while not any(q.name.startswith(".last.pt.tmp") and q.stat().st_size > 1 << 20 for q in tmp_path.iterdir()):
        assert p.poll() is None, "the writer finished before it could be killed"
        assert time.time() - t0 < 120
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)  # mid-write: the temporary file is partial
    p.wait()
    ck = load_checkpoint(tmp_path, "h")
    assert ck["epoch"] == 3 and torch.equal(ck["model"]["w"], torch.arange(5.0))


@pytest.mark.slow  # three training processes one after another: end to end
def test_corrupt_checkpoint_falls_back_to_the_previous_one_and_ends_bit_exact(tmp_path, betons):
    from suite import tracking

    data = betons["train"].parent
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.ensure_experiment(uri, "faults")
    ref_uri = f"sqlite:///{tmp_path / 'ref.db'}"  # its own store: one experiment trains a hash once
    tracking.ensure_experiment(ref_uri, "faults")
    ref_cfg = _run_cfg(tmp_path / "ref", data)
    ref = _start(ref_cfg, ref_uri, tmp_path / "ref.json")
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out[-3000:]
    reference = json.loads((tmp_path / "ref.json").read_text())

    cfg = _run_cfg(tmp_path / "cut", data)
    p = _popen(cfg, uri, tmp_path / "cut.json", HFBENCH_INJECT="*:sleep@100")
    lines: list[str] = []
    _read_until(p, " epoch 3/4 ", lines)  # checkpoints of epochs 2 (prev.pt) and 3 (last.pt) written
    p.kill()  # no warning, as a node crash would
    p.wait()
    run_dir = Path(cfg["out_dir"]) / reference["run_hash"]
    last = run_dir / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated
    again = _start(cfg, uri, tmp_path / "cut.json")
    out2, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out2[-3000:]
    assert "unreadable" in out2 and "resuming from" in out2 and "prev.pt (epoch 2" in out2, out2[-3000:]
    resumed = json.loads((tmp_path / "cut.json").read_text())
    assert resumed["state_digest"] == reference["state_digest"]  # as if nothing had happened
    c = tracking.client(uri)
    assert c.get_run(resumed["mlflow_run_id"]).info.status == "FINISHED"
    # epoch 3 was trained twice (once before the kill, again from prev.pt): stored once
    for key in ("train_loss", "epoch_time_s", "density"):
        steps = [m.step for m in c.get_metric_history(resumed["mlflow_run_id"], mlflow_key(key))]
        assert sorted(steps) == [1, 2, 3, 4], (key, steps)


@pytest.mark.slow  # end to end, ~15-35 s of training on 2 cores: `make test` runs it, not the fast tier
def test_kill_after_the_final_metrics_then_rerun_logs_each_value_once(tmp_path, betons):
    """A run killed right after logging its final metrics, before its weights and done marker
    (HFBENCH_INJECT exitfinal), resumes, finishes, and MLflow holds each final value once: the
    rerun logs the same values with the same timestamp (final_metrics.json)."""
    from suite import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.ensure_experiment(uri, "faults")
    cfg = _run_cfg(tmp_path, betons["train"].parent, epochs=2)
    p = _popen(cfg, uri, tmp_path / "r.json", HFBENCH_INJECT="*:exitfinal@1")
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 3 and not (tmp_path / "r.json").exists(), out[-3000:]
    again = _popen(cfg, uri, tmp_path / "r.json")
    out2, _ = again.communicate(timeout=600)
    assert again.returncode == 0 and "resuming" in out2, out2[-3000:]
    res = json.loads((tmp_path / "r.json").read_text())
    c = tracking.client(uri)
    assert c.get_run(res["mlflow_run_id"]).info.status == "FINISHED"
    assert len(tracking.training_runs(c, c.get_experiment_by_name("faults").experiment_id)) == 1
    for key in ("final_test_top1", "final_sparsity", "train_time_s", "wall_time_s", "budget_total_images"):
        hist = c.get_metric_history(res["mlflow_run_id"], mlflow_key(key))
        assert len(hist) == 1 and hist[0].step == 2, (key, [(h.value, h.timestamp) for h in hist])
        assert hist[0].value == pytest.approx(res[key])


# ----------------------------------------------------------------------------- MLflow outage
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A private MLflow server on its own sqlite store, which the test stops and restarts."""

    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.p: subprocess.Popen | None = None

    def start(self) -> None:
        mlflow = Path(sys.executable).with_name("mlflow")
        self.p = subprocess.Popen(
            [
                str(mlflow),
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.root / 'store.db'}",
                "--default-artifact-root",
                str(self.root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=open(self.root / "server.log", "a"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        )
        import urllib.request

        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2)
                return
            except OSError:
                assert self.p.poll() is None, (self.root / "server.log").read_text()[-3000:]
                assert time.time() - t0 < 180, "MLflow server did not start"
                time.sleep(0.5)

    def stop(self) -> None:
        if self.p is not None and self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)  # as a crash would: no clean shutdown
            self.p.wait()
        self.p = None


def _assert_complete(uri: str, run_id: str, epochs: int) -> None:
    from suite import tracking

    c = tracking.client(uri)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("train_loss", "density", "epoch_time_s"):
        steps = [m.step for m in c.get_metric_history(run_id, mlflow_key(key))]
        assert sorted(steps) == list(range(1, epochs + 1)), (key, steps)  # none lost, none twice
    assert "config_hash" in run.data.params and mlflow_key("final_test_top1") in run.data.metrics
    names = {a.path for a in c.list_artifacts(run_id)}
    assert {"config.yaml", "layer_density.csv", "layer_density_epochs.csv"} <= names, names


@pytest.mark.slow
def test_mlflow_down_mid_run_buffers_and_delivers(tmp_path, betons):
    from suite import tracking

    data = betons["train"].parent
    srv = _Server(tmp_path)
    srv.start()
    try:
        exp = tracking.ensure_experiment(srv.uri, "faults")
        # 1) the server goes down at epoch 2 and is back at epoch 5: delivered by the run itself
        cfg = _run_cfg(tmp_path / "a", data, epochs=8)
        p = _popen(cfg, srv.uri, tmp_path / "a.json", HFBENCH_INJECT="*:sleep@150")
        lines: list[str] = []
        _read_until(p, " epoch 2/8 ", lines)
        srv.stop()
        _read_until(p, " epoch 5/8 ", lines)
        srv.start()
        rest, _ = p.communicate(timeout=600)
        log = "".join(lines) + rest
        assert p.returncode == 0, log[-3000:]
        assert "unreachable" in log and "MLflow answers again" in log, log[-3000:]
        res = json.loads((tmp_path / "a.json").read_text())
        _assert_complete(srv.uri, res["mlflow_run_id"], 8)
        assert not (Path(cfg["out_dir"]) / res["run_hash"] / "mlflow_spool.jsonl").exists()

        # 2) the server goes down at epoch 2 and is still down when the run ends: the logging
        #    stays on disk and `hfbench sync` delivers it later
        cfg = _run_cfg(tmp_path / "b", data, epochs=5, method="gmp", gmp={"end_epoch": 3, "update_every": 5})
        p = _popen(cfg, srv.uri, tmp_path / "b.json", HFBENCH_INJECT="*:sleep@100")
        lines = []
        _read_until(p, " epoch 2/5 ", lines)
        srv.stop()
        rest, _ = p.communicate(timeout=600)
        log = "".join(lines) + rest
        assert p.returncode == 0, log[-3000:]
        assert "hfbench sync" in log, log[-3000:]
        res = json.loads((tmp_path / "b.json").read_text())
        run_dir = Path(cfg["out_dir"]) / res["run_hash"]
        assert (run_dir / "mlflow_spool.jsonl").is_file()
        srv.start()
        c = tracking.client(srv.uri)
        assert c.get_run(res["mlflow_run_id"]).info.status == "RUNNING"  # nothing delivered yet
        sync = subprocess.run(
            [sys.executable, "-m", "launchers.cli", "sync", str(tmp_path / "b" / "runs")],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=300,
        )
        assert sync.returncode == 0, sync.stdout + sync.stderr
        assert "1 runs delivered, 0 still pending" in sync.stdout, sync.stdout
        _assert_complete(srv.uri, res["mlflow_run_id"], 5)
        assert not (run_dir / "mlflow_spool.jsonl").exists()
        # a second sync finds nothing to send
        again = subprocess.run(
            [sys.executable, "-m", "launchers.cli", "sync", str(tmp_path / "b" / "runs")],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=300,
        )
        assert again.returncode == 0 and "0 runs delivered, 0 still pending" in again.stdout, again.stdout
        _assert_complete(srv.uri, res["mlflow_run_id"], 5)
        assert exp == c.get_run(res["mlflow_run_id"]).info.experiment_id
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- concurrent sweeps
SWEEP = """
name: {name}
experiment: {experiment}
data_dir: {data}
out_dir: {out}
base: {{model: fmnist_cnn, epochs: 2, max_steps_per_epoch: 10, batch_size: 64, init: dense, eval_every: 2}}
grid: {{methods: [dense, magnitude], sparsities: {sparsities}, seeds: [0]}}
overrides: {{dense: {{epochs: 1}}}}
launcher: {{executor: local, parallelism: 2, folder: {folder}, poll_s: 0.5}}
"""


@pytest.mark.slow
def test_two_sweeps_at_once_train_each_config_once(tmp_path, betons, mlflow_server):
    from suite import tracking

    experiment = f"concurrent-{uuid.uuid4().hex[:8]}"
    data = betons["train"].parent
    procs = []
    for name, sp in (("sweep-a", "[0.5, 0.8]"), ("sweep-b", "[0.8, 0.9]")):
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            SWEEP.format(
                name=name,
                experiment=experiment,
                data=data,
                out=tmp_path / "runs",
                sparsities=sp,
                folder=tmp_path / "submitit",
            )
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "launchers.cli", "sweep", str(path), "--tracking-uri", mlflow_server],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=_env(),
            )
        )
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    c = tracking.client(mlflow_server)
    exp = c.get_experiment_by_name(experiment)
    runs = tracking.training_runs(c, exp.experiment_id, max_results=100)
    hashes = [r.data.tags["hfbench.run_hash"] for r in runs]
    assert len(hashes) == 4 and len(set(hashes)) == 4, sorted(hashes)  # dense + 3 sparsities, each once
    assert all(r.info.status == "FINISHED" for r in runs)
    default = c.get_experiment_by_name("Default")
    strays = c.search_runs([default.experiment_id], filter_string="tags.`hfbench.sweep` LIKE 'sweep-%'")
    assert not strays, "a run landed in the Default experiment"
    # the shared runs were waited for, not trained twice, and both sweeps report them done
    for out in outs:
        assert "FAILED" not in out, out[-3000:]
    assert sum(o.count("trained by another") for o in outs) >= 1, "\n---\n".join(o[-2000:] for o in outs)


# ----------------------------------------------------------------------------- disk full
@pytest.mark.slow
def test_disk_full_fails_the_run_with_the_reason_and_keeps_the_store_consistent(tmp_path, betons):
    from suite import tracking

    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, f"cannot mount a 4 MB tmpfs (the test needs root): {r.stderr}"
    try:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the store lives elsewhere, as on a cluster
        tracking.ensure_experiment(uri, "faults")
        cfg = _run_cfg(tmp_path, betons["train"].parent, epochs=4)
        cfg["out_dir"] = str(mnt)
        p = _popen(cfg, uri, tmp_path / "full.json")
        out, _ = p.communicate(timeout=600)
        assert p.returncode != 0, out[-3000:]
        assert "No space left on device" in out, out[-3000:]
        c = tracking.client(uri)
        runs = tracking.training_runs(c, c.get_experiment_by_name("faults").experiment_id)
        assert len(runs) == 1 and runs[0].info.status == "FAILED", ([r.info.status for r in runs], out[-3000:])
        assert "No space left on device" in runs[0].data.tags.get("hfbench.error", "")
        run_dir = next(q for q in mnt.iterdir() if q.is_dir())
        from suite.engine import load_checkpoint

        assert load_checkpoint(run_dir, runs[0].data.tags["hfbench.run_hash"])["epoch"] >= 1  # last good one
        assert not [q for q in run_dir.iterdir() if ".tmp" in q.name], "a partial file was left behind"
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ----------------------------------------------------------------------------- bad data files
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_beton_is_refused_before_anything_runs(tmp_path, betons, damage):
    data = tmp_path / "data"
    shutil.copytree(betons["train"].parent, data)
    bad = data / "fashion_mnist_train.beton"
    raw = bad.read_bytes()
    if damage == "truncate":
        bad.write_bytes(raw[: len(raw) // 3])
    else:
        bad.write_bytes(raw[:64] + os.urandom(4096) + raw[64 + 4096 :])
    _sweep_refuses(tmp_path, data, bad, "")


def _sweep_refuses(tmp_path: Path, data: Path, bad: Path, pattern: str) -> None:
    """`hfbench sweep` on that data folder exits 2 naming the bad file (and `pattern`), with no
    traceback, before creating any run or job folder."""
    path = tmp_path / "sweep.yaml"
    path.write_text(
        SWEEP.format(
            name="bad-data",
            experiment="bad-data",
            data=data,
            out=tmp_path / "runs",
            sparsities="[0.5]",
            folder=tmp_path / "submitit",
        )
    )
    r = subprocess.run(
        [sys.executable, "-m", "launchers.cli", "sweep", str(path), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert str(bad) in r.stderr and pattern in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "submitit").exists()


BAD_BETON = r"""
import sys
import numpy as np
from ffcv.fields import IntField, NDArrayField
from ffcv.writer import DatasetWriter
kind, path = sys.argv[1], sys.argv[2]
n = 600
shape = (1, 32, 32) if kind == "shape" else (1, 28, 28)
rng = np.random.default_rng(0)
images = rng.integers(0, 255, size=(n, *shape), dtype=np.uint8)
labels = np.arange(n) % (10 if kind == "shape" else 13)  # 13 classes where the dataset has 10
class DS:
    def __len__(self): return n
    def __getitem__(self, i): return images[i], int(labels[i]), i
w = DatasetWriter(path, {"image": NDArrayField(np.dtype("uint8"), shape), "label": IntField(), "index": IntField()},
                  num_workers=1)
w.from_indexed_dataset(DS())
"""


@pytest.mark.slow  # two processes (a bad file written, a sweep refusing it), ~15-20 s each: `make test` runs it
@pytest.mark.parametrize("kind,pattern", [("shape", "field 'image'"), ("labels", "labels span 0..12")])
def test_data_file_of_the_wrong_shape_or_label_count_is_refused(tmp_path, betons, kind, pattern):
    data = tmp_path / "data"
    shutil.copytree(betons["train"].parent, data)
    bad = data / "fashion_mnist_val.beton"
    bad.unlink()
    w = subprocess.run(
        [sys.executable, "-c", BAD_BETON, kind, str(bad)], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert w.returncode == 0, w.stderr[-3000:]
    _sweep_refuses(tmp_path, data, bad, pattern)


def test_a_poll_that_lands_on_node_fail_does_not_end_the_run(tmp_path, monkeypatch):
    """submitit counts NODE_FAIL as final and then stops asking SLURM about the job, yet SLURM
    requeues it within a second. The sweep's poll must wait for the requeued task, and fail the
    run only when the state stays NODE_FAIL past the grace period or a final state shows up.
    (The CI run of the node-failure test once landed in that sub-second window; the sacct
    answers are scripted here to hit it every time.)"""
    from launchers import status
    from launchers import sweep as sweep_mod

    class SlurmJob:  # the two things Sweep._settled reads of a submitit job
        job_id = "42_0"

        def __init__(self, folder: Path):
            self.paths = type("P", (), {"result_pickle": folder / "42_0_result.pkl"})()

        def done(self):
            return True  # what submitit says once it has seen NODE_FAIL

    answers: list[str] = []
    monkeypatch.setattr(status, "_sacct", lambda job: (answers.pop(0), 1))
    runner = sweep_mod.Sweep.__new__(sweep_mod.Sweep)
    runner._transient = {}
    job = SlurmJob(tmp_path)
    answers[:] = ["NODE_FAIL", "PENDING", "RUNNING", "NODE_FAIL", "RUNNING"]
    assert [runner._settled(job) for _ in range(5)] == [False] * 5
    job.paths.result_pickle.write_bytes(b"")  # the requeued task finished
    assert runner._settled(job)
    job.paths.result_pickle.unlink()
    answers[:] = ["FAILED"]
    assert runner._settled(job)  # a final state without a result: the run failed
    monkeypatch.setattr(sweep_mod, "TRANSIENT_GRACE_S", 0.05)
    answers[:] = ["NODE_FAIL", "NODE_FAIL"]
    assert not runner._settled(job)
    time.sleep(0.1)
    assert runner._settled(job)  # never requeued: failed after the grace period


def test_a_tracking_server_that_never_answers_is_reported_naming_it(tmp_path, betons):
    """A server that accepts connections and never answers: the sweep's own MLflow calls give up
    after launcher.tracking_timeout_s and the sweep ends with one line naming the server, before
    anything is submitted."""
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list = []
    stop = threading.Event()

    def accept():  # take connections, never answer
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    uri = f"http://127.0.0.1:{srv.getsockname()[1]}"
    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        f"name: silent\ntracking_uri: {uri}\ndata_dir: {betons['train'].parent}\n"
        f"out_dir: {tmp_path / 'runs'}\nbase: {{epochs: 1, max_steps_per_epoch: 2}}\n"
        f"launcher: {{executor: local, folder: {tmp_path / 'sub'}, tracking_timeout_s: 2}}\n"
    )
    try:
        out = subprocess.run(
            [sys.executable, "-m", "launchers.cli", "sweep", str(cfg)],
            capture_output=True,
            text=True,
            timeout=120,
            env=_env(),
            cwd=ROOT,
        )
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        srv.close()
    assert out.returncode == 1, out.stdout + out.stderr
    err = out.stderr.strip().splitlines()
    assert err[-1].startswith(
        f"hfbench: the MLflow server at {uri} did not answer the sweep's experiment lookup within 2 s"
    ), out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "sub").exists() and not (tmp_path / "runs").exists()  # nothing submitted


def test_usr2_after_a_finished_task_does_not_fail_the_job(tmp_path):
    """SLURM's time-limit warning can land just after a task finished training, while submitit
    writes the result and Python shuts down (seen in CI: the run was done, sacct said FAILED).
    Python resets the handlers it installed to the default action while it exits, and USR2's
    default action kills the process. A finished task therefore leaves USR2 ignored, which
    survives shutdown. Checked in a child process: the handler after the call, and a USR2 sent
    to the child then, which must leave it alive with exit code 0."""
    child = textwrap.dedent("""
        import os, signal
        import launchers.task as task
        task.run = lambda *a: {"state": "finished"}
        out = task.TrainTask()({}, "", "")
        assert out == {"state": "finished"}, out
        print("handler", signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN, flush=True)
        os.kill(os.getpid(), signal.SIGUSR2)
        print("alive", flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", child], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["handler", "True", "alive"], proc.stdout


@pytest.mark.slow
def test_a_spool_belongs_to_the_run_that_wrote_it(tmp_path, monkeypatch):
    """Issue 16, bug 3: an attempt fails while MLflow is down, the user reruns without
    `hfbench sync`. The old attempt's pending calls go to the old run, which gets its terminal
    status, before the new attempt starts; a killed attempt (no status in its spool) is closed
    as FAILED; a call the server refuses (a param whose value changed) is set aside and
    reported, and the calls after it are still delivered."""
    from suite import tracking
    from suite.config import RunConfig

    monkeypatch.setattr(run_logger.RunLogger, "FINISH_WAITS", (0,))
    monkeypatch.setattr(run_logger.RunLogger, "RETRY_S", 0.0)
    srv = _Server(tmp_path)
    srv.start()
    said: list[str] = []
    try:
        exp = tracking.ensure_experiment(srv.uri, f"spool-{uuid.uuid4().hex[:8]}")
        cfg = RunConfig(method="magnitude", sparsity=0.5, epochs=2, out_dir=str(tmp_path / "runs"))
        folder = tmp_path / "runs" / cfg.run_hash()
        c = tracking.client(srv.uri)

        def logger():
            return run_logger.RunLogger(
                srv.uri,
                exp,
                cfg,
                spool_dir=folder,
                connect_s=60,
                say=lambda *a, **k: said.append(" ".join(map(str, a))),
            )

        # attempt 1 fails while the server is down: its error and metric wait in the spool
        a1 = logger()
        srv.stop()
        a1.log_metrics({"train_loss": 1.5}, step=1)
        a1.finish("FAILED", error="RuntimeError: attempt one broke")
        assert (folder / "mlflow_spool.jsonl").is_file()
        srv.start()
        a2 = logger()  # the rerun
        r1, r2 = c.get_run(a1.run_id), c.get_run(a2.run_id)
        assert r1.info.status == "FAILED" and "attempt one broke" in r1.data.tags["hfbench.error"]
        assert [m.value for m in c.get_metric_history(a1.run_id, mlflow_key("train_loss"))] == [1.5]
        assert r2.info.status == "RUNNING" and "hfbench.error" not in r2.data.tags
        assert c.get_metric_history(a2.run_id, mlflow_key("train_loss")) == []

        # attempt 2 is killed (no status) while the server is down; attempt 3 closes it as FAILED
        srv.stop()
        a2.log_metrics({"train_loss": 1.25}, step=1)
        srv.start()
        a3 = logger()
        r2 = c.get_run(a2.run_id)
        assert r2.info.status == "FAILED" and "without a status" in r2.data.tags["hfbench.error"]
        assert [m.value for m in c.get_metric_history(a2.run_id, mlflow_key("train_loss"))] == [1.25]
        assert c.get_metric_history(a3.run_id, mlflow_key("train_loss")) == []

        # a refused call is set aside, not retried forever, and what follows it is delivered
        a3.log_params({"note": "first"})
        srv.stop()
        a3.log_params({"note": "second", "other": "kept"})
        a3.log_metrics({"train_loss": 1.0}, step=1)
        srv.start()
        assert a3.flush(force=True)
        r3 = c.get_run(a3.run_id)
        assert r3.data.params["note"] == "first" and r3.data.params["other"] == "kept"
        assert [m.value for m in c.get_metric_history(a3.run_id, mlflow_key("train_loss"))] == [1.0]
        assert mlflow_spool.Spool(folder).pending()[0] == []
        rejected = [json.loads(ln) for ln in (folder / "mlflow_spool.rejected.jsonl").read_text().splitlines()]
        assert [r["call"]["params"] for r in rejected] == [[["note", "second"]]]
        assert any("refused" in s and "set aside" in s for s in said), said
        a3.finish("FINISHED")
        assert c.get_run(a3.run_id).info.status == "FINISHED"
        assert not (folder / "mlflow_spool.jsonl").exists()
    finally:
        srv.stop()


@pytest.mark.slow
def test_two_sweeps_with_different_out_dirs_train_each_hash_once(tmp_path, betons, mlflow_server):
    """Issue 16, bug 5: the run folder's lock cannot keep apart two sweeps that train into
    different out_dirs. Started at the same moment over the same grid and experiment, each run
    hash is trained once (one MLflow run per hash, all FINISHED); the other sweep waits for it
    and reuses it, with the dense weights copied into its own folder so its pruned runs start."""
    from suite import tracking

    experiment = f"claims-{uuid.uuid4().hex[:8]}"
    data = betons["train"].parent
    procs = []
    for name in ("sweep-a", "sweep-b"):
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            SWEEP.format(
                name=name,
                experiment=experiment,
                data=data,
                out=tmp_path / f"runs-{name}",
                sparsities="[0.5, 0.8]",
                folder=tmp_path / "submitit",
            )
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "launchers.cli", "sweep", str(path), "--tracking-uri", mlflow_server],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=_env(),
            )
        )
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
        assert "FAILED" not in out and "3 runs: 3 finished" in out.replace("1 skipped", ""), out[-3000:]
    c = tracking.client(mlflow_server)
    exp = c.get_experiment_by_name(experiment)
    runs = tracking.training_runs(c, exp.experiment_id, max_results=100)
    hashes = sorted(r.data.tags["hfbench.run_hash"] for r in runs)
    assert len(hashes) == 3 and len(set(hashes)) == 3, hashes  # dense + 2 sparsities, each trained once
    assert all(r.info.status == "FINISHED" for r in runs)
    # each hash: one folder trained it (its MLflow run names that folder), the other reused it
    for r in runs:
        h, trained_in = r.data.tags["hfbench.run_hash"], Path(r.data.tags["hfbench.run_dir"])
        folders = [tmp_path / f"runs-{name}" / h for name in ("sweep-a", "sweep-b")]
        assert trained_in in [f.resolve() for f in folders], (trained_in, folders)
        other = next(f for f in folders if f.resolve() != trained_in)
        assert json.loads((other / "done.json").read_text())["reused_from"] == str(trained_in)
        assert (other / "final_weights.pt").is_file() and (trained_in / "final_weights.pt").is_file()
        assert (other / "final_weights.pt").read_bytes() == (trained_in / "final_weights.pt").read_bytes()
    assert not c.search_registered_models(f"name LIKE 'hfbench-claim-{exp.experiment_id}-%'")  # all dropped


@pytest.mark.slow
@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_sigterm_to_a_sweep_cancels_its_runs_and_says_so(tmp_path, betons, sigint):
    """`kill` of a running sweep: it cancels the run it was waiting for, says which (one line,
    no traceback), exits 143, the training process is gone and its MLflow run is ended, not
    left RUNNING. "ignored": the sweep was started in the background by a script, so SIGINT
    (what submitit cancels a local job with) is ignored by the sweep and its jobs."""
    from suite import tracking

    data = betons["train"].parent
    path = tmp_path / "term.yaml"
    path.write_text(
        textwrap.dedent(f"""
        name: term
        experiment: term-{uuid.uuid4().hex[:8]}
        tracking_uri: sqlite:///{tmp_path / "mlflow.db"}
        data_dir: {data}
        out_dir: {tmp_path / "runs"}
        base: {{model: fmnist_cnn, epochs: 3, max_steps_per_epoch: 200, batch_size: 32, init: scratch}}
        grid: {{methods: [dense], sparsities: [0.5], seeds: [0]}}
        launcher: {{executor: local, parallelism: 1, folder: {tmp_path / "submitit"}, poll_s: 0.5}}
    """)
    )
    ign = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint == "ignored" else None
    p = subprocess.Popen(
        [sys.executable, "-m", "launchers.cli", "sweep", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(HFBENCH_INJECT="*:sleep@100"),
        preexec_fn=ign,
    )
    lines: list[str] = []
    _read_until(p, "running: dense", lines)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t0 = time.time()
    while time.time() - t0 < 300:  # its MLflow run exists: the task is training
        exp = tracking.client(uri).get_experiment_by_name(path.read_text().split("experiment: ")[1].split()[0])
        if exp is not None and tracking.training_runs(tracking.client(uri), exp.experiment_id):
            break
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    rest, _ = p.communicate(timeout=300)
    out = "".join(lines) + rest
    assert p.returncode == 143, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    msg = [ln for ln in out.splitlines() if ln.startswith("hfbench: sweep term interrupted")]
    assert len(msg) == 1 and "cancelled 1 running: fmnist_cnn-dense-s0 (job " in msg[0] and "(SIGTERM)" in msg[0], out
    pids = [
        ln.split()[0]
        for ln in subprocess.run(["pgrep", "-af", "submitit"], capture_output=True, text=True).stdout.splitlines()
        if str(tmp_path) in ln
    ]
    t0 = time.time()
    while pids and time.time() - t0 < 30:  # the cancelled task exits on its own signal
        time.sleep(0.5)
        pids = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert not pids, f"training processes left running: {pids}"
    (run,) = tracking.training_runs(tracking.client(uri), exp.experiment_id)
    assert run.info.status in ("KILLED", "FAILED"), run.info.status


def test_a_line_cut_short_in_the_spool_does_not_block_the_calls_after_it(tmp_path):
    """A crash in the middle of an append leaves half a JSON line. The calls written after it
    (by the resumed run) must still be delivered, and the half line passed over."""
    from suite import tracking

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    exp = tracking.ensure_experiment(uri, "cut")
    c = tracking.client(uri)
    run = c.create_run(exp).info.run_id
    sp = mlflow_spool.Spool(tmp_path / "run")
    sp.append({"op": "batch", "metrics": [["train_loss", 1.0, 1, 1]]})
    with open(sp.path, "a") as f:
        f.write('{"op": "batch", "metrics": [["train_lo')  # the crash
    sp.append({"op": "batch", "metrics": [["train_loss", 0.5, 2, 2]]})
    sp.append({"op": "terminate", "status": "FINISHED"})
    assert mlflow_spool.deliver(c, run, sp, say=lambda *a, **k: None) == 4
    assert [m.value for m in c.get_metric_history(run, "train_loss")] == [1.0, 0.5]  # spooled as written
    assert c.get_run(run).info.status == "FINISHED" and not sp.path.exists()


def test_a_store_that_does_not_know_the_run_keeps_the_spool(tmp_path):
    """`hfbench sync` pointed at the wrong store: every call would be answered 'no such run'.
    That is not a refusal of one call: nothing is set aside, the spool stays whole."""
    from suite import tracking

    uri = f"sqlite:///{tmp_path / 'other.db'}"
    tracking.ensure_experiment(uri, "other")
    sp = mlflow_spool.Spool(tmp_path / "run")
    sp.append({"op": "batch", "metrics": [["train_loss", 1.0, 1, 1]]})
    sp.append({"op": "terminate", "status": "FINISHED"})
    with pytest.raises(Exception) as e:
        mlflow_spool.deliver(tracking.client(uri), "0123456789abcdef0123456789abcdef", sp, say=lambda *a, **k: None)
    assert getattr(e.value, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"
    assert len(sp.pending()[0]) == 2 and not (sp.dir / "mlflow_spool.rejected.jsonl").exists()


@pytest.mark.slow  # three training processes one after another: end to end
def test_a_run_folder_of_another_store_or_experiment_is_trained_for_this_one(tmp_path, betons):
    """The same out_dir used with a fresh tracking store, or with another experiment name,
    used to report the run finished although the new store had no run (its done marker and
    checkpoint belonged to the old one). Now the new store gets its own trained run; and a run
    whose final weights were deleted is trained again rather than reported done without them."""
    from suite import tracking

    data = betons["train"].parent
    cfg = _run_cfg(tmp_path, data, epochs=1)
    outs = {}
    for name in ("a", "b"):
        uri = f"sqlite:///{tmp_path / (name + '.db')}"
        tracking.ensure_experiment(uri, "faults")
        p = _start(cfg, uri, tmp_path / f"{name}.json")
        log, _ = p.communicate(timeout=600)
        assert p.returncode == 0, log[-3000:]
        outs[name] = json.loads((tmp_path / f"{name}.json").read_text())
        runs = tracking.training_runs(tracking.client(uri), tracking.ensure_experiment(uri, "faults"))
        assert [r.info.status for r in runs] == ["FINISHED"], name  # trained and logged in this store
    assert outs["a"]["mlflow_run_id"] != outs["b"]["mlflow_run_id"]
    weights = Path(cfg["out_dir"]) / outs["b"]["run_hash"] / "final_weights.pt"
    weights.unlink()
    p = _start(cfg, f"sqlite:///{tmp_path / 'b.db'}", tmp_path / "c.json")
    log, _ = p.communicate(timeout=600)
    assert p.returncode == 0 and "final weights are gone" in log, log[-3000:]
    assert weights.is_file()


def test_status_and_report_name_a_silent_server_instead_of_hanging(tmp_path):
    """`status` and `report` against a tracking URI nobody answers used to wait minutes in
    MLflow's retries and end in a traceback; like the sweep, they now say so in one line."""
    port = _free_port()  # nothing listens there
    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        f"name: s\ntracking_uri: http://127.0.0.1:{port}\nout_dir: {tmp_path}/runs\n"
        f"base: {{model: fmnist_cnn, epochs: 1}}\ngrid: {{methods: [magnitude], sparsities: [0.5]}}\n"
        f"launcher: {{folder: {tmp_path}/sub}}\n"
    )
    for args in (
        ["status", str(cfg)],
        ["report", "--experiment", "s", "--out", str(tmp_path / "r"), "--tracking-uri", f"http://127.0.0.1:{port}"],
    ):
        t0 = time.time()
        r = subprocess.run(
            [sys.executable, "-m", "launchers.cli", *args], capture_output=True, text=True, env=_env(), timeout=200
        )
        assert r.returncode == 1 and time.time() - t0 < 120, (args, r.stderr[-1500:])
        assert r.stderr.count("\n") == 1 and f"127.0.0.1:{port} did not answer" in r.stderr, r.stderr[-1500:]


def test_sync_reports_an_unreadable_meta_file_and_goes_on(tmp_path):
    """A spool whose meta file is cut short is reported and kept; the next spool is still
    delivered (it used to stop `hfbench sync` with a traceback)."""
    from suite import tracking

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    c = tracking.client(uri)
    run = c.create_run(tracking.ensure_experiment(uri, "sync")).info.run_id
    bad, good = mlflow_spool.Spool(tmp_path / "runs" / "a"), mlflow_spool.Spool(tmp_path / "runs" / "b")
    for sp in (bad, good):
        sp.append({"op": "batch", "metrics": [["train_loss", 1.0, 1, 1]]})
        sp.append({"op": "terminate", "status": "FINISHED"})
    (bad.dir / "mlflow_spool.meta.json").write_text("{trunc")
    (good.dir / "mlflow_spool.meta.json").write_text(json.dumps({"run_id": run, "uri": uri}))
    said: list[str] = []
    assert mlflow_spool.sync([tmp_path / "runs"], say=said.append) == (1, 1)
    assert any("unreadable meta file" in s for s in said), said
    assert bad.path.is_file() and not good.path.exists() and c.get_run(run).info.status == "FINISHED"


def test_a_claim_whose_process_is_gone_from_this_host_is_taken_over(tmp_path):
    """A sweep killed hard leaves its claim (its MLflow run stays RUNNING). Another folder
    asking for the same run used to wait for it forever; a claim naming a process of this host
    that no longer exists is stale and is taken over at once."""
    from suite import tracking

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    exp = tracking.ensure_experiment(uri, "claims")
    c = tracking.client(uri)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()  # a pid that has exited
    holder = c.create_run(exp).info.run_id  # RUNNING for good
    c.create_registered_model(
        f"hfbench-claim-{exp}-abc123",
        tags={
            "owner": str(tmp_path / "a"),
            "host": socket.gethostname(),
            "pid": dead,
            "since": str(time.time()),
            "run_id": holder,
        },
    )
    claim = run_claims.Claim(uri, exp, "abc123", owner=str(tmp_path / "b"), say=lambda *a, **k: None, poll_s=0.1)
    t0 = time.time()
    assert claim.acquire() is None and claim.held and time.time() - t0 < 30
    assert c.get_registered_model(f"hfbench-claim-{exp}-abc123").tags["owner"] == str(tmp_path / "b")
    # a claim held by a live process of this host is waited for, not taken
    c.set_registered_model_tag(f"hfbench-claim-{exp}-abc123", "pid", str(os.getpid()))
    other = run_claims.Claim(uri, exp, "abc123", owner=str(tmp_path / "c"), say=lambda *a, **k: None, poll_s=0.1)
    import threading

    box = {}
    t = threading.Thread(target=lambda: box.update(r=other.acquire()), daemon=True)
    t.start()
    t.join(timeout=3)
    assert t.is_alive() and not other.held  # still waiting
    claim.release()  # the holder ends: the waiter gets it
    t.join(timeout=30)
    assert not t.is_alive() and other.held


def test_weights_cut_short_are_not_taken_for_finished_weights(tmp_path):
    """A truncated final_weights.pt used to count as a finished dense run: it was skipped and
    every child failed on the unreadable file, on every rerun. A whole file passes the check,
    a cut one does not, and loading it says which file and what to do."""
    from suite.engine import load_weights, weights_readable

    p = tmp_path / "final_weights.pt"
    torch.save({"w": torch.randn(64, 64)}, p)
    assert weights_readable(p)
    p.write_bytes(p.read_bytes()[:1000])
    assert not weights_readable(p) and not weights_readable(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"final_weights.pt are unreadable .*delete the file"):
        load_weights(p)


def _train_one(tmp_path, betons, fields: str, experiment: str):
    """`hfbench train` of one run config (`fields` plus data, output and a sqlite store under
    tmp_path) in its own process: (the finished process, the tracking URI)."""
    cfg = tmp_path / "run.yaml"
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg.write_text(
        fields + f"data_dir: {betons['train'].parent}\nout_dir: {tmp_path / 'runs'}\n"
        f"tracking_uri: {uri}\nexperiment: {experiment}\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "launchers.cli", "train", str(cfg)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    return r, uri


@pytest.mark.slow  # end to end, ~15-35 s of training on 2 cores: `make test` runs it, not the fast tier
def test_a_batch_larger_than_the_training_set_fails_at_once_naming_it(tmp_path, betons):
    """FFCV waits forever for a first batch it cannot fill (batch_size 60,000 over 55,000
    training images hung `hfbench train` for minutes). The run now fails at once, naming
    batch_size, and its MLflow run is FAILED with that reason."""
    from suite import tracking

    r, uri = _train_one(
        tmp_path, betons, "method: dense\nepochs: 1\nbatch_size: 60000\nmax_steps_per_epoch: 2\n", "big-batch"
    )
    assert r.returncode != 0 and "batch_size 60000 x 1 ranks is larger than the training set" in r.stderr, r.stderr[
        -2000:
    ]
    (run,) = tracking.training_runs(
        tracking.client(uri), tracking.client(uri).get_experiment_by_name("big-batch").experiment_id
    )
    assert run.info.status == "FAILED" and "batch_size 60000" in run.data.tags["hfbench.error"]


@pytest.mark.slow  # end to end, ~15-35 s of training on 2 cores: `make test` runs it, not the fast tier
def test_a_snap_in_the_last_epoch_is_what_the_run_records(tmp_path, betons):
    """Hostile review: L0 snapped at the end of its only epoch (search_end = epochs), yet the run
    recorded the density measured before the snap (final_sparsity 0.0 for a 5 % run whose
    weights were 5 % sparse). The ruler now reads the mask again after the epoch's end."""
    from suite import tracking

    r, uri = _train_one(
        tmp_path,
        betons,
        "method: l0\nmodel: lenet300\nsparsity: 0.05\nepochs: 1\nmax_steps_per_epoch: 2\n",
        "snap-last",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    c = tracking.client(uri)
    (run,) = tracking.training_runs(c, c.get_experiment_by_name("snap-last").experiment_id)
    m = {internal_key(k): v for k, v in run.data.metrics.items()}
    n = 784 * 300 + 300 * 100 + 100 * 10
    assert m["snap_pp"] > 0 and abs(m["final_sparsity"] - 0.05) <= 1.0 / n, m
    assert m["sparsity"] == m["final_sparsity"]
    import mlflow

    text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/layer_density.csv")
    rows = [ln.split(",") for ln in text.splitlines()[1:]]
    assert abs(1 - sum(int(r[3]) for r in rows) / n - 0.05) <= 1.0 / n


def test_a_rank_told_of_the_stop_by_the_others_hands_over_to_the_handler_it_replaced():
    """The stop agreement (every rank stops at the same step, whichever rank got USR2) reaches
    ranks that got no signal. Rank 0 must still hand over to the handler it replaced (submitit's,
    which requeues the job); it used to look only at a handler recorded when a signal arrived,
    found none and ended the job as failed instead of requeued (found by the two-node test)."""
    import signal

    from suite import preemption

    calls = []
    before = signal.getsignal(signal.SIGUSR2)
    saved = {k: (dict(v) if isinstance(v, dict) else v) for k, v in preemption._STOP.items()}
    try:
        signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
        preemption.install_stop_handler()
        preemption.install_stop_handler()  # twice in one process (the debug executor): still the original
        assert preemption._STOP["signum"] is None  # this rank received nothing
        with pytest.raises(preemption.Preempted):
            preemption.hand_over(rank=0)
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, before)
        preemption._STOP.clear()
        preemption._STOP.update(saved)


@pytest.mark.slow  # end to end, ~15-35 s of training on 2 cores: `make test` runs it, not the fast tier
def test_a_failed_attempt_resumed_to_the_end_leaves_no_error_on_the_finished_run(tmp_path, betons):
    """A run whose loss turns NaN in epoch 2 (injected) fails with the reason as its
    hfbench.error tag; the rerun resumes the same MLflow run from epoch 1's checkpoint and
    finishes. The finished run must not carry the failed attempt's error (the report and
    `hfbench status` read that tag as the run's outcome)."""
    from suite import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.ensure_experiment(uri, "faults")
    cfg = _run_cfg(tmp_path, betons["train"].parent, epochs=2)
    p = _popen(cfg, uri, tmp_path / "r.json", HFBENCH_INJECT="*:nan@20")
    out, _ = p.communicate(timeout=600)
    assert p.returncode != 0 and "non-finite loss" in out, out[-3000:]
    c = tracking.client(uri)
    (failed,) = tracking.training_runs(c, c.get_experiment_by_name("faults").experiment_id)
    assert failed.info.status == "FAILED" and "non-finite loss" in failed.data.tags["hfbench.error"]
    again = _start(cfg, uri, tmp_path / "r.json")
    out2, _ = again.communicate(timeout=600)
    assert again.returncode == 0 and "resuming" in out2, out2[-3000:]
    run = c.get_run(json.loads((tmp_path / "r.json").read_text())["mlflow_run_id"])
    assert run.info.run_id == failed.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags.get("hfbench.error", "") == ""


def test_the_launch_cost_line_leaves_out_runs_reused_from_an_earlier_training():
    """A run the sweep reused (trained by another sweep or an earlier one) carries that
    training's startup timeline; counted, it made the first-step time negative."""
    from launchers.outcomes import Outcome, launch_costs
    from suite.config import RunConfig

    t0 = 1_000_000.0
    timeline = {"startup_total_s": 9.0, "startup_import_s": 4.0}
    reused = Outcome(RunConfig(), "finished", {**timeline, "first_step_unix": t0 - 3600, "reused": True})
    claimed = Outcome(RunConfig(), "finished", {**timeline, "first_step_unix": t0 - 60, "reused_from": "/x"})
    fresh = Outcome(RunConfig(), "finished", {**timeline, "first_step_unix": t0 + 12.5})
    line = launch_costs([reused, claimed, fresh], t0)
    assert "first training step 12.5 s after the sweep started" in line and "median of 1," in line, line
    assert launch_costs([reused, claimed], t0) == ""


def test_a_full_disk_under_the_spool_cursor_does_not_hold_back_delivery(tmp_path, monkeypatch):
    """The cursor file cannot be written (the run folder's disk is full): delivery goes on, this
    process remembers what it sent (no call sent twice by it), and the server has every call
    with the run's status; before, the run stayed RUNNING with its logging held back as if the
    server were down."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    exp = tracking.ensure_experiment(uri, "cursor")
    c = tracking.client(uri)
    run = c.create_run(exp).info.run_id
    sp = mlflow_spool.Spool(tmp_path / "run")
    sp.append({"op": "batch", "metrics": [["train/loss", 1.0, 1, 1]]})
    sp.append({"op": "batch", "metrics": [["train/loss", 0.5, 2, 2]]})
    real = Path.write_text

    def full(self, *a, **k):
        if self.name.startswith("mlflow_spool.pos"):
            raise OSError(28, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    assert mlflow_spool.deliver(c, run, sp, say=lambda *a, **k: None) == 2
    assert sp.pending()[0] == [] and not sp.cursor.exists()  # remembered here, not on disk
    sp.append({"op": "terminate", "status": "FINISHED"})
    assert mlflow_spool.deliver(c, run, sp, say=lambda *a, **k: None) == 1  # only the new call
    assert [m.value for m in c.get_metric_history(run, "train/loss")] == [1.0, 0.5]
    assert c.get_run(run).info.status == "FINISHED" and not sp.path.exists()
