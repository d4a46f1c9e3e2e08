"""What one array task runs: rebuild the run config and train it.

`TrainTask` is a submitit Checkpointable: when SLURM warns of preemption or of the time limit
(USR2, sent by submitit's `--signal`), the engine writes a full checkpoint at the next step
boundary and submitit requeues the task; the requeued task calls the same object again, the
engine finds the checkpoint and continues the same MLflow run. A task killed without warning
(node failure, `scontrol requeue`) restarts from the last epoch-end checkpoint.
Every rank of a multi-process task (SLURM ntasks, or submitit's local multi-task jobs) runs it.
"""
from __future__ import annotations

import os
from typing import Any

import submitit


def run(cfg_data: dict[str, Any], tracking_uri: str, experiment_id: str) -> dict[str, Any]:
    from suite.config import RunConfig
    from suite.engine import train

    cfg = RunConfig.model_validate(cfg_data)
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.engine.threads_per_rank))
    return train(cfg, experiment_id=experiment_id, tracking_uri=tracking_uri)


class TrainTask(submitit.helpers.Checkpointable):
    """Callable submitted by the sweep; `checkpoint()` (inherited) resubmits it unchanged."""

    def __call__(self, cfg_data: dict[str, Any], tracking_uri: str, experiment_id: str) -> dict[str, Any]:
        from suite.engine import install_stop_handler

        install_stop_handler()
        return run(cfg_data, tracking_uri, experiment_id)
