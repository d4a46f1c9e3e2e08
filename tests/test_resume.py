"""Preemption and resume: a run stopped by USR2 mid-epoch writes a checkpoint at the next step,
and the resumed run ends bit for bit where the uninterrupted run ends, in one MLflow run."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SCRIPT = r"""
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


def _cfg(tmp_path: Path, data_dir: Path, out: str, method: str, precision: str = "fp32") -> dict:
    from suite.config import RunConfig

    return RunConfig(method=method, sparsity=0.8, epochs=4, max_steps_per_epoch=15, batch_size=64,
                     engine={"precision": precision, "device": "cpu"},
                     data_dir=str(data_dir), out_dir=str(tmp_path / out), experiment="resume",
                     hyperflux={"pruning_end": 3, "gate_lr": 0.02},
                     gmp={"start_epoch": 0, "end_epoch": 3, "update_every": 4}).model_dump(mode="json")


def _start(cfg: dict, uri: str, result: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(cfg), uri, str(result)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("method,precision", [("hyperflux", "fp32"), ("gmp", "fp32"), ("hyperflux", "fp16")],
                         ids=["hyperflux", "gmp", "hyperflux-fp16"])
def test_usr2_mid_epoch_then_resume_is_bit_exact(tmp_path, betons, method, precision):
    """fp16: the gradient scaler's state and the loss scale the gates' pressure gradient carries
    must survive the resume too."""
    from suite import tracking

    data = betons["train"].parent
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.ensure_experiment(uri, "resume")

    # the uninterrupted reference in a store of its own: in the same experiment the run hash would
    # be claimed and reused, not trained again (one training per hash per experiment)
    ref_uri = f"sqlite:///{tmp_path / 'ref.db'}"
    tracking.ensure_experiment(ref_uri, "resume")
    ref = _start(_cfg(tmp_path, data, "ref", method, precision), ref_uri, tmp_path / "ref.json")
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out
    reference = json.loads((tmp_path / "ref.json").read_text())

    cfg = _cfg(tmp_path, data, "cut", method, precision)
    p = _start(cfg, uri, tmp_path / "cut.json")
    lines = []
    for line in p.stdout:  # wait for epoch 2 to begin, then signal in the middle of it
        lines.append(line)
        if " epoch 1/4 " in line:
            time.sleep(0.3)
            p.send_signal(signal.SIGUSR2)
            break
    rest, _ = p.communicate(timeout=300)
    log = "".join(lines) + rest
    assert p.returncode != 0 and "stop requested at epoch" in log and "Preempted" in log, log[-3000:]
    assert not (tmp_path / "cut.json").exists()

    again = _start(cfg, uri, tmp_path / "cut.json")
    out2, _ = again.communicate(timeout=600)
    assert again.returncode == 0 and "resuming" in out2, out2[-3000:]
    resumed = json.loads((tmp_path / "cut.json").read_text())

    assert resumed["state_digest"] == reference["state_digest"], "resumed run diverged from the uninterrupted one"
    for k in ("final_test_top1", "final_val_top1", "final_density"):
        assert resumed[k] == reference[k], k
    # one MLflow run for the interrupted config, finished, with every epoch logged
    c = tracking.client(uri)
    exp = c.get_experiment_by_name("resume").experiment_id
    runs = [r for r in c.search_runs([exp]) if r.info.run_id == resumed["mlflow_run_id"]]
    assert len(c.search_runs([exp])) == 1 and len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = sorted({m.step for m in c.get_metric_history(runs[0].info.run_id, "density")})
    assert steps == [1, 2, 3, 4]
