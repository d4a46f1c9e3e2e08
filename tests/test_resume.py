"""Preemption and resume, for every method: a run stopped by USR2 mid-epoch writes a checkpoint
at the next step, and the rerun (a fresh process) ends bit for bit where the uninterrupted run
ends, in one MLflow run.

The runs are grouped to keep the test fast: per group of runs (precision, loader threads), one
process trains every uninterrupted reference, another (at the same time) every interrupted run,
and a third, fresh process resumes them all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from suite.pruning import registry
from suite.run_schema import mlflow_key

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

# argv: a JSON list of jobs [config, tracking URI, HFBENCH_INJECT or ""], an output JSON path.
# Each job's outcome: its result, or "preempted"; and its log lines.
SCRIPT = r"""
import json, os, sys
from suite import engine, preemption, tracking
from suite.config import RunConfig
jobs, out = json.loads(sys.argv[1]), sys.argv[2]
engine.install_stop_handler()
done = {}
for cfg_data, uri, inject in jobs:
    cfg = RunConfig.model_validate(cfg_data)
    os.environ.pop("HFBENCH_INJECT", None)
    if inject:
        os.environ["HFBENCH_INJECT"] = inject
    lines = []
    say = lambda *a, **k: lines.append(" ".join(map(str, a)))
    try:
        res = engine.train(cfg, tracking.ensure_experiment(uri, cfg.experiment), uri, log=say)
    except engine.Preempted:
        res = "preempted"
        preemption._STOP.update(signum=None, frame=None, previous=None, handing_over=False)
    done[cfg.run_hash()] = {"result": res, "log": lines}
open(out, "w").write(json.dumps(done))
"""

# One run in its own process (the fault tests): argv config JSON, tracking URI, result path.
SCRIPT_ONE = r"""
import json, sys
from suite import tracking
from suite.config import RunConfig
from suite.engine import install_stop_handler, train
cfg = RunConfig.model_validate(json.loads(sys.argv[1]))
uri, out = sys.argv[2], sys.argv[3]
install_stop_handler()
res = train(cfg, tracking.ensure_experiment(uri, cfg.experiment), uri)
open(out, "w").write(json.dumps(res))
"""


def start_one(cfg: dict, uri: str, result: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT_ONE, json.dumps(cfg), uri, str(result)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


METHODS = registry.names()  # every registered method, whatever is added later
CASES = [(m, "fp32", 1) for m in METHODS] + [("hyperflux", "fp16", 1), ("hyperflux", "fp32", 2)]
IDS = [m + ("" if p == "fp32" else f"-{p}") + ("" if w == 1 else f"-workers{w}") for m, p, w in CASES]
STOP_AT = 20  # global step of the signal: epoch 2 of 4, step 5 of 15


def _cfg(root: Path, data_dir: Path, method: str, precision: str, workers: int) -> dict:
    from suite.config import RunConfig

    return RunConfig(
        method=method,
        sparsity=0.0 if method == "dense" else 0.8,
        epochs=4,
        max_steps_per_epoch=15,
        batch_size=64,
        engine={"precision": precision, "device": "cpu", "loader_workers": workers},
        data_dir=str(data_dir),
        out_dir=str(root),
        experiment="resume",
        hyperflux={"pruning_end": 3, "gate_lr": 0.02},
        gmp={"start_epoch": 0, "end_epoch": 3, "update_every": 4},
    ).model_dump(mode="json")


def _start(jobs: list, out: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "HFBENCH_INJECT"}
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, json.dumps(jobs), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def _finish(procs: list[tuple[subprocess.Popen, Path]], also: list[subprocess.Popen] = ()) -> None:
    """Wait for these processes; if one fails (or the wait does), stop them all and `also`
    (nothing keeps training on the test machine's cores), then fail."""
    try:
        for p, out in procs:
            log, _ = p.communicate(timeout=1500)
            assert p.returncode == 0 and out.exists(), log[-4000:]
    except BaseException:
        for p in [q for q, _ in procs] + list(also):
            if p.poll() is None:
                p.kill()
                p.wait()
        raise


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, betons):
    """Train every case three ways; returns {case id: (reference, cut, resumed, URI, reference URI)}.
    Each group (precision, loader threads) has its own folders and stores: loader threads are
    not part of the run hash, so two groups may hold the same hash."""
    from suite import tracking
    from suite.config import RunConfig

    tmp = tmp_path_factory.mktemp("resume")
    data = betons["train"].parent
    groups: dict[tuple, list] = {}
    for case_id, (method, precision, workers) in zip(IDS, CASES):
        groups.setdefault((precision, workers), []).append((case_id, method))
    procs: dict[str, list] = {"ref": [], "cut": [], "again": []}
    plan = {}
    for (precision, workers), members in groups.items():
        root = tmp / f"{precision}-w{workers}"
        # the uninterrupted references in a store of their own: in the same experiment the run
        # hash would be claimed and reused, not trained again (one training per hash per experiment)
        uri, ref_uri = f"sqlite:///{root}-mlflow.db", f"sqlite:///{root}-ref.db"
        for u in (uri, ref_uri):
            tracking.ensure_experiment(u, "resume")
        jobs: dict[str, list] = {"ref": [], "cut": [], "again": []}
        for case_id, method in members:
            cfg = _cfg(root / "cut", data, method, precision, workers)
            h = RunConfig.model_validate(cfg).run_hash()
            jobs["ref"].append([_cfg(root / "ref", data, method, precision, workers), ref_uri, ""])
            jobs["cut"].append([cfg, uri, f"{h}:usr2@{STOP_AT}"])
            jobs["again"].append([cfg, uri, ""])
            plan[case_id] = (f"{root}-ref.json", f"{root}-cut.json", f"{root}-again.json", h, uri, ref_uri)
        for phase in jobs:
            procs[phase].append((jobs[phase], Path(f"{root}-{phase}.json")))
    # the references train side by side with the interrupted runs; the reruns come after, in fresh processes
    started = {ph: [(_start(j, out), out) for j, out in procs[ph]] for ph in ("ref", "cut")}
    _finish(started["cut"], also=[p for p, _ in started["ref"]])
    _finish(started["ref"])
    _finish([(_start(j, out), out) for j, out in procs["again"]])
    out = {}
    for case_id, (ref_f, cut_f, again_f, h, uri, ref_uri) in plan.items():
        got = [json.loads(Path(f).read_text())[h] for f in (ref_f, cut_f, again_f)]
        out[case_id] = (*got, uri, ref_uri)
    return out


@pytest.mark.parametrize("case", IDS)
def test_usr2_mid_epoch_then_resume_is_bit_exact(resumed, case):
    """Every method (random gates, per-level rewinds and spectral fits included): a preemption
    signal in the middle of epoch 2 (the engine's test hook sends it at that exact step, so
    nothing races), a checkpoint at the next step, a rerun that resumes: the weights, gates,
    masks and final metrics equal those of the uninterrupted run, bit for bit, in one MLflow
    run. fp16: the gradient scaler's state and the loss scale the gates' pressure gradient
    carries must survive the resume too; workers 2: the loader's position with two threads."""
    from suite import tracking

    ref, cut, again, uri, ref_uri = resumed[case]
    log = "\n".join(cut["log"])
    assert cut["result"] == "preempted" and f"stop requested at epoch 2, step {STOP_AT}" in log, log[-3000:]
    assert not any("stop requested" in line for line in ref["log"])
    # resumed from the checkpoint of the stop itself, not from an older one it fell back to
    assert any(
        line.startswith("[hfbench] resuming ") and line.endswith(f" at epoch 2, step {STOP_AT}")
        for line in again["log"]
    ), "\n".join(again["log"])[-3000:]
    assert not any("WARNING" in line and "instead" in line for line in again["log"]), again["log"]
    reference, result = ref["result"], again["result"]

    assert result["state_digest"] == reference["state_digest"], "resumed run diverged from the uninterrupted one"
    for k in ("final_test_top1", "final_val_top1", "final_density"):
        assert result[k] == reference[k], k
    # one MLflow run for the interrupted config, finished, with every epoch logged once
    c, rc = tracking.client(uri), tracking.client(ref_uri)
    run = c.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert (
        len(
            [
                r
                for r in tracking.training_runs(c, run.info.experiment_id)
                if r.data.tags.get(tracking.TAG_HASH) == run.data.tags.get(tracking.TAG_HASH)
            ]
        )
        == 1
    )
    steps = sorted(m.step for m in c.get_metric_history(run.info.run_id, mlflow_key("density")))
    expected = sorted(m.step for m in rc.get_metric_history(reference["mlflow_run_id"], mlflow_key("density")))
    assert steps == expected == list(range(1, len(expected) + 1)), steps  # every epoch, once (IMP: every level's)
