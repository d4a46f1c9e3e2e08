"""Process group and DeepSpeed set-up: which device a run uses, how its ranks meet, and the
DeepSpeed config its model is wrapped with (the engine's and the benchmarks')."""

from __future__ import annotations

import os
import socket
from contextlib import closing
from typing import Any

import torch
import torch.distributed as dist

from suite.config import RunConfig


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(device: str) -> tuple[int, int, int]:
    """Join (or create) the process group; return (rank, world size, local rank).

    Rendezvous comes from, in order: torchrun-style env vars (RANK/WORLD_SIZE), the submitit
    job environment (SLURM or local multi-task jobs, across nodes too), or a single process.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        try:
            import submitit

            submitit.JobEnvironment()  # raises outside a submitit job
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            if os.environ["WORLD_SIZE"] == "1":
                # submitit's port is drawn from the job id within 20000-60000, most of which is
                # Linux's range for outgoing connections: a one-task job sometimes found it taken
                # (EADDRINUSE, measured with two test workers). Nobody else has to meet this
                # rank, so it takes a port the kernel says is free; several tasks keep submitit's.
                os.environ["MASTER_PORT"] = str(free_port())
        except RuntimeError:
            os.environ.update(
                RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
            )
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if device == "cuda" else "gloo", auto_mpi_discovery=False, verbose=False
        )
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def resolve_device(cfg: RunConfig) -> str:
    if cfg.engine.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.engine.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("engine.device is 'cuda' but no GPU is visible")
    return cfg.engine.device


def ds_config(cfg: RunConfig, world: int) -> dict[str, Any]:
    """The DeepSpeed config of a run over `world` ranks (no gradient accumulation)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.batch_size * world,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        # the client optimiser is the suite's own SGD + Adam wrapper (suite/optim.py): ZeRO
        # partitions its state like any torch optimiser's (tests/test_distributed.py)
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
