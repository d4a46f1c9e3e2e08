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
import signal
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
        result = run(cfg_data, tracking_uri, experiment_id)
        _ignore_late_stop_signal()
        return result


def _ignore_late_stop_signal() -> None:
    """The run is finished; a USR2 from here on (SLURM's time-limit warning landing while the
    process writes its result and exits) has nothing left to save. Ignore it: Python resets
    the handlers it installed to the default action while it shuts down, and the default
    action of USR2 kills the process, so SLURM would record a finished run as FAILED. An
    ignored signal stays ignored through shutdown."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
