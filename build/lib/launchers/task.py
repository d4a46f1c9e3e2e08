"""What one array task runs: rebuild the run config and train it.

Kept tiny and importable by name, so submitit can pickle a reference to `run` and every
rank of a multi-process task (SLURM ntasks, or submitit's local multi-task jobs) calls it.
"""
from __future__ import annotations

import os
from typing import Any


def run(cfg_data: dict[str, Any], tracking_uri: str, experiment_id: str) -> dict[str, Any]:
    from suite.config import RunConfig
    from suite.engine import train

    cfg = RunConfig.model_validate(cfg_data)
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.engine.threads_per_rank))
    return train(cfg, experiment_id=experiment_id, tracking_uri=tracking_uri)
