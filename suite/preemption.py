"""Preemption: the stop signal, the ranks' agreement on the step to stop at, the hand-over to
submitit once the checkpoint is written; and the faults tests inject (HFBENCH_INJECT)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import torch
import torch.distributed as dist

# the signal a rank received (None: none), the handler it replaced, whether this process is
# handing over (the run then stays RUNNING in MLflow), and every replaced handler by signal
_STOP: dict[str, Any] = {"signum": None, "frame": None, "previous": None, "handing_over": False, "installed": {}}

STOP_CHECK_EVERY = 10  # steps between the ranks' agreement on a stop request (world > 1)


class Preempted(RuntimeError):
    pass


def install_stop_handler(signals: tuple[int, ...] = (signal.SIGUSR2,)) -> None:
    """Turn the preemption / time-limit signal (SLURM sends USR2 ahead of both, through
    submitit) into a request that the training loop honours at the next step boundary: it
    writes a full checkpoint there, then hands over to the handler that was installed before
    (submitit's, which requeues the job)."""
    for sig in signals:
        previous = signal.getsignal(sig)
        if getattr(previous, "hfbench_stop_request", False):  # installed twice in one process (debug
            previous = previous.replaced  # executor, tests): keep the original
        _STOP["installed"][sig] = previous  # for a rank that learns of the stop only from the others

        def request(signum, frame, previous=previous):
            _STOP.update(signum=signum, frame=frame, previous=previous)

        request.hfbench_stop_request = True  # type: ignore[attr-defined]
        request.replaced = previous  # type: ignore[attr-defined]
        signal.signal(sig, request)


def stop_requested(world: int, step: int) -> bool:
    """Whether to stop after this step: this rank's signal, or with several ranks, any rank's
    (all of them answer the same at the same step)."""
    flag = _STOP["signum"] is not None
    if world > 1:
        if step % STOP_CHECK_EVERY:
            return False  # the collective runs on few steps only
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = bool(t.item())
    return flag


def handing_over() -> bool:
    """True once this process has begun handing over after a stop (its checkpoint is written)."""
    return bool(_STOP["handing_over"])


def hand_over(rank: int) -> None:
    """After the checkpoint is written: let submitit requeue (rank 0), or wait to be stopped."""
    _STOP["handing_over"] = True
    signum = _STOP["signum"] or signal.SIGUSR2
    # a rank told of the stop by the others (no signal of its own) calls the handler it replaced
    # all the same: on rank 0 that is submitit's, which requeues the whole job
    previous = _STOP["previous"] if _STOP["signum"] is not None else _STOP["installed"].get(signum)
    if callable(previous):
        previous(signum, _STOP["frame"])  # submitit: checkpoint() + requeue + exit on rank 0
    if rank != 0:
        time.sleep(600)  # rank 0 requeues the whole allocation, which ends this process too
    raise Preempted("stopped by a signal after writing a checkpoint; run the same config again to resume")


def injected_fault(run_hash: str) -> dict[str, int]:
    """Testing hook: HFBENCH_INJECT='<run hash>:nan@<step>' makes that run's loss NaN at that
    step; '<run hash>:sleep@<ms>' adds that many milliseconds to each of its steps (a slow run,
    e.g. to meet a time limit); '<run hash>:exitfinal@1' kills the process right after its final
    metrics are logged, before its weights and done marker are written; '<run hash>:usr2@<step>'
    makes the last rank send itself SIGUSR2 right after that global step (a preemption warning
    at a known point, which the other ranks learn of only through the stop agreement; a resumed
    run is past that step and is not signalled again). Items are comma-separated; '*' matches
    every run. Unset in normal use."""
    out: dict[str, int] = {}
    for item in filter(None, os.environ.get("HFBENCH_INJECT", "").split(",")):
        h, _, what = item.partition(":")
        if h in (run_hash, "*"):
            kind, _, value = what.partition("@")
            if kind in ("nan", "sleep", "exitfinal", "usr2"):
                out[kind] = int(value)
    return out


def signal_if_due(fault: dict[str, int], step: int, rank: int, world: int) -> None:
    """The usr2 fault: the last rank signals itself right after the chosen global step."""
    if fault.get("usr2") == step and rank == world - 1:
        os.kill(os.getpid(), signal.SIGUSR2)


def faulty_loss(fault: dict[str, int], total: torch.Tensor, step: int) -> torch.Tensor:
    """The sleep and nan faults, applied to step `step`'s loss (the loss itself when none is due)."""
    if fault.get("sleep"):
        time.sleep(fault["sleep"] / 1000)
    if fault.get("nan") == step:
        total = total * float("nan")
    return total
