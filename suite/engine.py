"""The one training engine: FFCV loader -> model -> pruner -> DeepSpeed engine -> MLflow.

Every run, dense or pruned, one rank or many, goes through `train()`. DeepSpeed owns the
model wrapper, gradient all-reduce and the optimiser step (gloo on CPU, NCCL on GPU); the
pruner plugs in through the Pruner hooks; the suite measures sparsity itself; rank 0 logs
to MLflow and writes checkpoints at epoch ends (write to a temp file, then rename).
"""
from __future__ import annotations

import math
import os
import signal
import socket
import sys
import time
import traceback
from contextlib import closing
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from suite import datasets, models, tracking
from suite.config import RunConfig, dump_run
from suite.optim import WeightsAndGates
from suite.pruning import flux, masks, registry, sparsity


# ----------------------------------------------------------------------------- distribution
def _free_port() -> int:
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
        except RuntimeError:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo",
                                   auto_mpi_discovery=False, verbose=False)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))


def resolve_device(cfg: RunConfig) -> str:
    if cfg.engine.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.engine.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("engine.device is 'cuda' but no GPU is visible")
    return cfg.engine.device


# ----------------------------------------------------------------------------- preemption
_STOP: dict[str, Any] = {"signum": None, "frame": None, "previous": None, "handing_over": False, "installed": {}}


def install_stop_handler(signals: tuple[int, ...] = (signal.SIGUSR2,)) -> None:
    """Turn the preemption / time-limit signal (SLURM sends USR2 ahead of both, through
    submitit) into a request that the training loop honours at the next step boundary: it
    writes a full checkpoint there, then hands over to the handler that was installed before
    (submitit's, which requeues the job)."""
    for sig in signals:
        previous = signal.getsignal(sig)
        if getattr(previous, "hfbench_stop_request", False):  # installed twice in one process (debug
            previous = previous.replaced                        # executor, tests): keep the original
        _STOP["installed"][sig] = previous  # for a rank that learns of the stop only from the others

        def request(signum, frame, previous=previous):
            _STOP.update(signum=signum, frame=frame, previous=previous)

        request.hfbench_stop_request = True  # type: ignore[attr-defined]
        request.replaced = previous  # type: ignore[attr-defined]
        signal.signal(sig, request)


STOP_CHECK_EVERY = 10  # steps between the ranks' agreement on a stop request (world > 1)


def _stop_requested(world: int, step: int) -> bool:
    flag = _STOP["signum"] is not None
    if world > 1:  # every rank stops at the same step, whichever rank got the signal
        if step % STOP_CHECK_EVERY:
            return False  # keep the collective off most steps
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        flag = bool(t.item())
    return flag


def _hand_over(rank: int) -> None:
    """After the checkpoint is written: let submitit requeue (rank 0), or wait to be stopped."""
    _STOP["handing_over"] = True
    signum = _STOP["signum"] or signal.SIGUSR2
    # A rank that got no signal itself (the stop agreement told it) still hands over to the
    # handler it replaced: on rank 0 that is submitit's, which requeues the whole job.
    previous = _STOP["previous"] if _STOP["signum"] is not None else _STOP["installed"].get(signum)
    if callable(previous):
        previous(signum, _STOP["frame"])  # submitit: checkpoint() + requeue + exit on rank 0
    if rank != 0:
        time.sleep(600)  # rank 0 requeues the whole allocation, which stops this process too
    raise Preempted("stopped by a signal after writing a checkpoint; run the same config again to resume")


class Preempted(RuntimeError):
    pass


def _injected_fault(run_hash: str) -> dict[str, int]:
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


# ----------------------------------------------------------------------------- data
class Stream:
    """Batches from a loader without end; an 'epoch' is `steps` batches (a full pass unless
    max_steps_per_epoch caps it, in which case the next epoch continues where it stopped).

    Its position (loader pass, batches taken from it) is part of a checkpoint, so a resumed run
    sees exactly the batches the uninterrupted run would have seen."""

    def __init__(self, loader):
        self.loader = loader
        self.it = None
        self.pass_no = 0
        self.pos = 0

    def next(self):
        while True:
            if self.it is None:
                self.pass_no = self.loader.epoch
                self.it = iter(self.loader)
                self.pos = 0
            try:
                batch = next(self.it)
            except StopIteration:
                self.it = None
                continue
            self.pos += 1
            return batch

    def state(self) -> dict[str, int]:
        if self.it is None:
            return {"pass": int(self.loader.epoch), "pos": 0}
        return {"pass": int(self.pass_no), "pos": int(self.pos)}

    def restore(self, st: dict[str, int]) -> None:
        self.loader.set_epoch(st["pass"])
        self.it, self.pass_no, self.pos = None, st["pass"], 0
        if st["pos"]:
            self.it = iter(self.loader)
            for _ in range(st["pos"]):
                next(self.it)
            self.pos = st["pos"]


def make_loaders(cfg: RunConfig, world: int):
    from suite.data import make_loader

    spec = datasets.get(cfg.dataset)
    paths = spec.paths(cfg.data_dir)
    missing = spec.missing(cfg.data_dir)
    if missing:
        raise FileNotFoundError(f"dataset {cfg.dataset}: missing {', '.join(map(str, missing))}; make them with: "
                                + spec.make_command.format(data_dir=cfg.data_dir))
    spec.validate(cfg.data_dir)  # a truncated or mismatched file fails here, naming it, before training
    make_loader = spec.loader or make_loader  # the dataset's recipe (RGB datasets); Fashion-MNIST's otherwise
    nw = cfg.engine.loader_workers
    from suite.data import loader_thread_limit

    if nw > loader_thread_limit():  # the sweep checks it too, for the local executor, before submitting
        raise ValueError(f"engine.loader_workers is {nw}, more than the {loader_thread_limit()} loader "
                         f"threads this node allows (its CPU count, or NUMBA_NUM_THREADS): lower it")
    train = make_loader(paths["train"], cfg.batch_size, train=True, seed=cfg.seed, num_workers=nw,
                        distributed=world > 1)
    val = make_loader(paths["val"], 500, train=False, num_workers=nw)
    test = make_loader(paths["test"], 500, train=False, num_workers=nw)
    return spec, train, val, test


def autocast(device: str, precision: str):
    """bf16 / fp16 mixed precision (torch.autocast) for the forward pass and loss, or a no-op."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=precision in ("bf16", "fp16"))


def to_device(x: torch.Tensor, device: str, channels_last: bool = False) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: str, rank: int, world: int, precision: str = "fp32",
             channels_last: bool = False) -> float:
    """Top-1 on the whole split: rank r takes batches r, r+world, ...; counts are summed."""
    was = model.training
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64)
    for i, (x, y) in enumerate(loader):
        if i % world != rank:
            continue
        x, y = to_device(x, device, channels_last), y.to(device, non_blocking=True)
        with autocast(device, precision):
            out = model(x)
        correct[0] += (out.argmax(1) == y).sum().item()
        correct[1] += y.numel()
    if world > 1:
        dist.all_reduce(correct)
    model.train(was)
    return float(correct[0] / correct[1])


# ----------------------------------------------------------------------------- checkpoints
def _write_tmp(obj: Any, tmp: Path) -> None:
    """torch.save + fsync to `tmp`; on failure nothing is left behind, and a full disk is
    reported as such (torch.save itself says only 'unexpected pos ...' when a write fails)."""
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException as e:
        free = None
        if isinstance(e, Exception) and not isinstance(e, OSError):
            try:
                st = os.statvfs(tmp.parent)
                free = st.f_bavail * st.f_frsize
            except OSError:
                pass
        tmp.unlink(missing_ok=True)
        if free is not None and free < 8 << 20:
            import errno

            raise OSError(errno.ENOSPC, f"No space left on device while writing {tmp.name[1:].split('.tmp')[0]} "
                                        f"in {tmp.parent} ({free} bytes free; torch.save said: {e})") from e
        raise


def save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _write_tmp(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(obj: Any, path: Path) -> None:
    """Write a checkpoint so that a good one always survives: the new file is written and
    fsynced under a temporary name; the current one becomes `prev.pt`, then the new one takes
    its place (both renames are atomic). A process killed at any point leaves last.pt or
    prev.pt (or both) complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _write_tmp(obj, tmp)
    if path.is_file():
        os.replace(path, path.with_name("prev.pt"))
    os.replace(tmp, path)


CHECKPOINT_KEYS = ("run_hash", "epoch", "step", "model", "optimizer", "pruner")


def load_checkpoint(out: Path, run_hash: str, say=print) -> Optional[dict[str, Any]]:
    """The newest readable checkpoint of a run folder (last.pt, else prev.pt), or None if it
    has none. A truncated or corrupt file is reported and passed over. A checkpoint of
    another config is an error (never silently overwritten)."""
    cands = [p for p in (out / "last.pt", out / "prev.pt") if p.is_file()]
    bad = []
    for p in cands:
        try:
            ck = torch.load(p, map_location="cpu", weights_only=True)
            if not isinstance(ck, dict) or any(k not in ck for k in CHECKPOINT_KEYS):
                raise ValueError("not a complete hfbench checkpoint")
        except Exception as e:
            bad.append(f"{p.name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            say(f"[hfbench] WARNING: checkpoint {p} is unreadable ({bad[-1]}); trying the previous one", flush=True)
            continue
        if ck["run_hash"] != run_hash:
            raise RuntimeError(f"{p}: checkpoint belongs to another config ({ck['run_hash']}, this run is {run_hash})")
        if bad:
            say(f"[hfbench] WARNING: resuming from {p} (epoch {ck['epoch']}, step {ck['step']}) instead", flush=True)
        return ck
    if bad:
        raise RuntimeError(f"{out}: no usable checkpoint ({'; '.join(bad)}); delete the folder to start this run over")
    return None


class RunLock:
    """One process trains a run at a time: an exclusive flock on <run folder>/run.lock, held
    for the whole run by rank 0 and released by the OS when the process dies (no stale locks).
    A second launch of the same run (e.g. two sweeps with overlapping grids) waits for the
    first and then returns its result instead of training again."""

    def __init__(self, out: Path):
        import fcntl

        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "run.lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._fcntl = fcntl

    def try_acquire(self) -> bool:
        try:
            self._fcntl.flock(self.fd, self._fcntl.LOCK_EX | self._fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def acquire(self) -> None:
        self._fcntl.flock(self.fd, self._fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None


def run_busy(out: Path) -> bool:
    """True while some process holds the run's lock (it is training right now)."""
    if not (out / "run.lock").is_file():
        return False
    lock = RunLock(out)
    try:
        return not lock.try_acquire()
    finally:
        lock.release()


def done_result(out: Path, run_hash: str, experiment_id: Optional[str]) -> Optional[dict[str, Any]]:
    """The result a finished run left in done.json, if it was logged to this experiment."""
    import json

    p = out / "done.json"
    if not p.is_file():
        return None
    try:
        res = json.loads(p.read_text())
    except ValueError:
        return None
    if res.get("run_hash") != run_hash or str(res.get("experiment_id")) != str(experiment_id):
        return None
    return res


def reuse_finished(run, out: Path, cfg: RunConfig, experiment_id: str, say=print) -> dict[str, Any]:
    """This run hash was trained to FINISHED in this experiment by a sweep with another
    out_dir (its MLflow run names the folder). Make this folder look as if it had trained it:
    its final weights (which a dense parent's children load) and its done marker. The other
    folder must be readable from here (a shared file system); if not, say so."""
    import json
    import shutil

    src = Path(run.data.tags.get("hfbench.run_dir", ""))
    done = done_result(src, cfg.run_hash(), experiment_id) if src.name else None
    if done is None or not (src / "final_weights.pt").is_file():
        raise RuntimeError(f"{cfg.run_name()} ({cfg.run_hash()}) was trained in this experiment by another sweep "
                           f"(MLflow run {run.info.run_id}, folder {src or 'not recorded'}), whose weights and done "
                           f"marker this process cannot read; point out_dir at that folder's parent, or copy it here")
    out.mkdir(parents=True, exist_ok=True)
    if src.resolve() != out.resolve():
        tmp = out / f".final_weights.pt.tmp{os.getpid()}"
        shutil.copyfile(src / "final_weights.pt", tmp)
        os.replace(tmp, out / "final_weights.pt")
    res = {**done, "weights": str(out / "final_weights.pt"), "reused_from": str(src)}
    save_text_atomic(json.dumps(res, default=str), out / "done.json")
    say(f"[hfbench] {cfg.run_name()} ({cfg.run_hash()}) was trained by another sweep into {src} (MLflow run "
        f"{run.info.run_id}); reusing it, not training it again", flush=True)
    return res


def load_pretrained(model: nn.Module, path: str | Path, say=print) -> None:
    """Load a torchvision/timm state dict from a local file (no download, no code executed).
    Accepted wrappers: the bare state dict, {'model': ...}, {'state_dict': ...}; a 'module.'
    prefix (DDP) is dropped. The last Linear layer is kept fresh when its shape differs (e.g.
    ImageNet weights for a 10-class model); any other missing, unexpected or mis-shaped key is
    an error naming the keys and the file."""
    try:
        obj = torch.load(_existing(path, "pretrained weights"), map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError):
        raise
    except Exception as e:  # not a torch file, cut short, or a pickle that would run code
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"pretrained weights {path}: unreadable as torch weights ({type(e).__name__}: {first})") \
            from None
    if isinstance(obj, dict):
        for k in ("state_dict", "model"):
            if isinstance(obj.get(k), dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"pretrained weights {path}: not a state dict of tensors")
    sd = {k.removeprefix("module."): v for k, v in obj.items()}
    own = model.state_dict()
    head = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1:]
    head_keys = {f"{head[0]}.weight", f"{head[0]}.bias"} if head else set()
    shape_diff = sorted(k for k in sd if k in own and sd[k].shape != own[k].shape)
    if shape_diff and set(shape_diff) <= head_keys:
        say(f"[hfbench] pretrained {Path(path).name}: classifier {head[0]} has another shape "
            f"({tuple(sd[shape_diff[0]].shape)} vs {tuple(own[shape_diff[0]].shape)}); it starts fresh")
        for k in shape_diff:
            sd[k] = own[k]
        shape_diff = []
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected or shape_diff:
        def few(keys):
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
        parts = [f"{what}: {few(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                            ("other shape", shape_diff)) if keys]
        raise ValueError(f"pretrained weights {path} do not fit the model; " + "; ".join(parts))
    model.load_state_dict(sd)


def _existing(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict without executing code (weights_only)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"starting weights not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or a pickle that would run code
        raise ValueError(f"starting weights {p} are unreadable ({type(e).__name__}: {str(e)[:200]}); "
                         f"delete the file (or its run folder) to train them again") from None
    return obj.get("model", obj) if isinstance(obj, dict) and "model" in obj else obj


def weights_readable(path: Path) -> bool:
    """A weights file that exists and is a whole zip archive (torch.save's format): a file cut
    short loses its central directory, which is at the end. Cheap enough to ask before trusting
    a finished run's weights."""
    import zipfile

    return path.is_file() and zipfile.is_zipfile(path)


def state_digest(model: nn.Module) -> str:
    """sha256 over every tensor of the model state (weights, masks, gates), in key order."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def observed_settings(model: nn.Module, logits: torch.Tensor) -> dict[str, str]:
    """What the first training step really ran with, read off its tensors (not the config): the
    forward's compute dtype (bf16/fp16 autocast shows in the logits) and the memory format of the
    convolution weights. A precision or channels_last flag that did not take effect shows here."""
    convs = [p for p in model.parameters() if p.dim() == 4]
    return {"observed.compute_dtype": str(logits.dtype).replace("torch.", ""),
            # a weight with one input channel or a 1x1 kernel is in both formats at once
            "observed.channels_last": str(all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
                                          and any(not p.is_contiguous() for p in convs))}


def optimizer_state_numel(opt: Any) -> int:
    """Elements of optimiser state (momentum, Adam moments) this rank holds: all of it without
    ZeRO, about 1/world of it with ZeRO stage 1 or 2, which partitions that state over the ranks
    (DeepSpeed's ZeRO optimiser wraps the client optimiser as `.optimizer`)."""
    base = getattr(opt, "optimizer", opt)
    parts = [o for o in (getattr(base, "sgd", None), getattr(base, "adam", None)) if o is not None] or [base]
    return sum(int(t.numel()) for o in parts for st in o.state.values() for t in st.values()
               if torch.is_tensor(t) and t.dim() > 0)


def process_start_time(default: float) -> float:
    """Unix time this process started (psutil, a DeepSpeed dependency); `default` if unknown."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - timing is informative only
        return default


def startup_costs(marks: dict[str, float]) -> dict[str, float]:
    """Fixed cost of one task (or resumed segment), in seconds, from its startup timeline:
    interpreter + imports (torch, submitit, suite), distributed setup, MLflow run, data loaders,
    model + DeepSpeed engine, first training step; startup_total_s = process start -> end of
    the first step."""
    order = ["process", "engine", "dist", "mlflow", "data", "model", "first_step"]
    names = ["startup_import_s", "startup_dist_s", "startup_mlflow_s", "startup_data_s", "startup_model_s",
             "startup_first_step_s"]
    out = {n: marks[b] - marks[a] for n, a, b in zip(names, order, order[1:]) if a in marks and b in marks}
    out["startup_total_s"] = marks["first_step"] - marks["process"]
    return out


BUDGET_KEYS = ("steps", "images", "epochs", "device_s")


def _load_final(path: Path, run_hash: str) -> tuple[Optional[dict[str, float]], Optional[int]]:
    """The final metrics an earlier attempt of this run computed and logged (final_metrics.json),
    with their timestamp; (None, None) when there are none (or they belong to another run)."""
    import json

    try:
        rec = json.loads(path.read_text())
        if rec.get("run_hash") == run_hash:
            return {k: float(v) for k, v in rec["metrics"].items()}, int(rec["ts"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None, None


def budget(cfg: RunConfig, steps: int, world: int, n_train: int, train_time: float, say=print) -> dict[str, float]:
    """What this run cost and what it cost in all, counting the run it starts from.

    Own: optimiser steps, training images seen (steps x batch x ranks), dense-equivalent epochs
    (images / training-set size) and device-seconds (training time x ranks, evaluation excluded).
    Total: own plus the parent's total, read from the parent's done.json (written when it
    finished) for `init: dense`. A pretrained weights file, or a parent whose record is missing,
    adds nothing it can count: budget_parent_counted is 0 then (1 when counted, or no parent)."""
    images = float(steps * cfg.batch_size * world)
    own = {"steps": float(steps), "images": images, "epochs": images / max(n_train, 1),
           "device_s": float(train_time * world)}
    parent: dict[str, float] = {}
    counted = 1.0
    if cfg.init == "pretrained":
        counted = 0.0
    elif cfg.init == "dense":
        rec = Path(cfg.init_checkpoint or "").parent / "done.json"
        try:
            import json

            done = json.loads(rec.read_text())
            parent = {k: float(done[f"budget_total_{k}"]) for k in BUDGET_KEYS}
        except (OSError, ValueError, KeyError, TypeError):
            counted = 0.0
            say(f"[hfbench] {cfg.run_name()}: no budget record of the dense run it starts from ({rec}); "
                f"its total budget counts this run only")
    out = {f"budget_{k}": v for k, v in own.items()}
    out.update({f"budget_total_{k}": v + parent.get(k, 0.0) for k, v in own.items()})
    out["budget_parent_counted"] = counted
    return out


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.out_dir) / cfg.run_hash()


# ----------------------------------------------------------------------------- training
def _ds_config(cfg: RunConfig, world: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.batch_size * world,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        # the client optimiser is the suite's own SGD + Adam wrapper (suite/optim.py): ZeRO
        # partitions its state like any torch optimiser's (tests/test_distributed.py)
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def _weight_groups(model: nn.Module, gate_ids: set[int], decay_on: str = "all",
                   weight_decay: float = 0.0) -> list[dict]:
    """SGD groups of the model's own trained parameters. Frozen parameters (e.g. the
    frozen_bn_scale quirk) are left out: no update, no weight decay. decay_on 'conv_linear':
    weight decay only on Conv2d/Linear weights, every other parameter in a group without it."""
    params = [p for p in model.parameters() if id(p) not in gate_ids and p.requires_grad]
    if decay_on == "all":
        return [{"params": params}]
    decayed = {id(masks.stored_weight(m)) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    groups = [{"params": [p for p in params if id(p) in decayed]},
              {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def attach_pruner(cfg: RunConfig, model: nn.Module, layers: list, steps_per_epoch: int, device: str):
    """The method's pruner attached to `model` (moved to `device`) and the optimiser over its
    weights and gates, bound to the pruner: (pruner, optimiser). Shared with suite.bench."""
    pruner = registry.get(cfg.method)(cfg, layers, steps_per_epoch)
    pruner.attach(model)
    model.to(device)
    gates = pruner.gate_parameters()
    extra = pruner.extra_weight_groups()
    own = {id(g) for g in gates} | {id(p) for grp in extra for p in grp["params"]}
    opt = WeightsAndGates(_weight_groups(model, own, cfg.weight_decay_on) + extra, gates, lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, nesterov=cfg.nesterov, gate_lr=1e-3)
    pruner.bind_optimizer(opt)
    return pruner, opt


def train(cfg: RunConfig, experiment_id: Optional[str] = None, tracking_uri: Optional[str] = None,
          log=print) -> dict[str, Any]:
    """Train one run end to end; returns the final metrics (on every rank)."""
    t_start = time.time()
    marks = {"process": process_start_time(t_start), "engine": t_start}  # startup timeline (unix times)
    device = resolve_device(cfg)
    torch.set_num_threads(cfg.engine.threads_per_rank)
    rank, world, local_rank = setup_distributed(device)
    marks["dist"] = time.time()
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if cfg.engine.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.seed)
    out = run_dir(cfg)
    ckpt_path = out / "last.pt"
    say = log if rank == 0 else (lambda *a, **k: None)

    lock = None
    earlier = None
    claim = None
    if rank == 0:
        lock = RunLock(out)
        if not lock.try_acquire():
            say(f"[hfbench] {cfg.run_name()} ({cfg.run_hash()}): another process is training this run; "
                f"waiting for it", flush=True)
            lock.acquire()
        earlier = done_result(out, cfg.run_hash(), experiment_id)
        uri = tracking_uri or cfg.tracking_uri or tracking.default_uri()
        if earlier is not None and not weights_readable(out / "final_weights.pt"):
            say(f"[hfbench] {cfg.run_name()}: its final weights are gone or unreadable; training them again",
                flush=True)
            earlier = None
        if earlier is not None and experiment_id is not None and \
                not tracking.run_in_store(uri, earlier.get("mlflow_run_id"), experiment_id):
            earlier = None  # finished for another store or experiment (same out_dir): not for this one
        if earlier is None and experiment_id is not None:
            claim = tracking.Claim(uri, experiment_id, cfg.run_hash(), owner=str(out.resolve()), say=say)
            other = claim.acquire()
            if other is not None:
                claim.release()
                earlier = reuse_finished(other, out, cfg, experiment_id, say)
    if world > 1:
        box = [earlier]
        dist.broadcast_object_list(box, src=0)
        earlier = box[0]
    try:
        if earlier is not None:  # trained meanwhile (or before) by another launch of the same run
            say(f"[hfbench] {cfg.run_name()} ({cfg.run_hash()}) is already finished in this experiment: "
                f"MLflow run {earlier.get('mlflow_run_id')}; not training it again", flush=True)
            return {**earlier, "rank": rank, "reused": True}
        return _train_locked(cfg, device, rank, world, out, ckpt_path, say, t_start, marks, experiment_id,
                             tracking_uri, claim)
    finally:
        if claim is not None and not _STOP["handing_over"]:
            claim.release()  # finished or failed; a preempted run keeps its claim until it resumes
        if lock is not None:
            lock.release()


def _train_locked(cfg, device, rank, world, out, ckpt_path, say, t_start, marks, experiment_id, tracking_uri,
                  claim=None):
    resume = load_checkpoint(out, cfg.run_hash(), say)
    uri = tracking_uri or cfg.tracking_uri or tracking.default_uri()
    if resume is not None and rank == 0 and experiment_id is not None and resume.get("mlflow_run_id") and \
            not tracking.run_in_store(uri, resume["mlflow_run_id"], experiment_id):
        say(f"[hfbench] {cfg.run_name()}: the checkpoint in {out} belongs to MLflow run {resume['mlflow_run_id']}, "
            f"which is not in this experiment or store; training this run afresh here", flush=True)
        resume = None
    if world > 1:  # every rank starts where rank 0 decided
        box = [resume is None]
        dist.broadcast_object_list(box, src=0)
        if box[0]:
            resume = None
    logger: Any = tracking.NullLogger()
    if rank == 0 and experiment_id is not None:
        logger = tracking.RunLogger(uri, experiment_id, cfg, run_id=resume.get("mlflow_run_id") if resume else None,
                                    spool_dir=out, say=say)
        if claim is not None:
            claim.set_run(logger.run_id)
    marks["mlflow"] = time.time()
    try:
        result = _train(cfg, device, rank, world, out, ckpt_path, resume, logger, say, t_start, marks)
    except BaseException as e:
        if _STOP["handing_over"]:
            raise  # preempted or timed out with a checkpoint: the MLflow run stays RUNNING until resumed
        logger.finish("FAILED", error=f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
        raise
    logger.finish("FINISHED")
    result["mlflow_run_id"] = logger.run_id
    if rank == 0 and experiment_id is not None:
        import json

        save_text_atomic(json.dumps({**result, "experiment_id": str(experiment_id)}, default=str), out / "done.json")
    return result


def save_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _train(cfg, device, rank, world, out, ckpt_path, resume, logger, say, t_start, marks):
    import deepspeed

    spec, train_loader, val_loader, test_loader = make_loaders(cfg, world)
    if len(train_loader) == 0:  # FFCV would wait forever for a first batch that cannot be filled
        raise ValueError(f"batch_size {cfg.batch_size} x {world} ranks is larger than the training set of "
                         f"{cfg.dataset}: not one full batch per epoch; lower batch_size")
    marks["data"] = time.time()
    mspec = models.get(cfg.model)
    model = mspec.build(spec.num_classes, spec.input_shape[0])
    if cfg.init == "dense":
        if not cfg.init_checkpoint:
            raise ValueError("init is 'dense' but no init_checkpoint was resolved (run it through a sweep)")
        model.load_state_dict(load_weights(cfg.init_checkpoint))
    elif cfg.init == "pretrained":
        load_pretrained(model, cfg.pretrained, say=say if rank == 0 else (lambda *a, **k: None))
    layers = mspec.prunable(model)
    steps_per_epoch = cfg.max_steps_per_epoch or len(train_loader)
    pruner, opt = attach_pruner(cfg, model, layers, steps_per_epoch, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=_ds_config(cfg, world))
    cl, precision = cfg.engine.channels_last, cfg.engine.precision
    if cl:  # after DeepSpeed's broadcast (it views parameters as flat bytes); in place: same Parameters
        engine.module.to(memory_format=torch.channels_last)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    scaler = opt.use_grad_scaler(device) if precision == "fp16" else None
    # gates that add their pressure gradient in backward must scale it like the loss (masks._GatedProduct)
    gated = [m for m in engine.module.modules() if isinstance(m, masks.GatedWeight)] if scaler is not None else []
    marks["model"] = time.time()

    start_epoch, step, in_epoch = 1, 0, 0
    if resume is not None:
        engine.module.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        pruner.load_state_dict(resume["pruner"])
        if scaler is not None and resume.get("grad_scaler"):
            scaler.load_state_dict(resume["grad_scaler"])
        torch.set_rng_state(resume["torch_rng"])
        step, in_epoch = resume["step"], resume.get("in_epoch", 0)
        start_epoch = resume["epoch"] if in_epoch else resume["epoch"] + 1
        say(f"[hfbench] resuming {cfg.run_name()} at epoch {start_epoch}, step {step}")
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if job else os.environ.get("SLURM_JOB_ID", "")
    if job:
        logger.set_tag("hfbench.slurm_job", job)
    if resume is not None:
        logger.set_tag("hfbench.resumed_at_step", str(step))
    else:
        if rank == 0:  # a fresh start: final metrics of an earlier attempt describe another training
            (out / "final_metrics.json").unlink(missing_ok=True)
        engine.eval()
        start_active = sparsity.active(layers)  # before a one-shot prune, which then counts as pruned in epoch 1
        pruner.on_train_start()
        n_prunable = sum(m.weight.numel() for _, m in layers)
        logger.log_params({
            **tracking.environment(world, device),
            "prunable_policy": mspec.policy,
            "prunable_layers": ",".join(n for n, _ in layers),
            "prunable_weights": n_prunable,
            "steps_per_epoch": steps_per_epoch,
        })
        logger.log_text(dump_run(cfg), "config.yaml")
        say(f"[hfbench] {cfg.run_name()} ({cfg.run_hash()}): {cfg.epochs} epochs x {steps_per_epoch} steps, "
            f"world {world} on {device}; {len(layers)} prunable layers, {n_prunable} weights ({mspec.policy})")

    stream = Stream(train_loader)
    if resume is not None and "stream" in resume:
        stream.restore(resume["stream"])
    # pruning and regrowth counts: compare which prunable weights are active (effective value
    # non-zero) at consecutive epoch ends; the same ruler for every method
    active = [a.clone() for a in resume["active"]] if resume is not None and "active" in resume \
        else (start_active if resume is None else sparsity.active(layers))
    flips = dict(resume.get("flips", {})) if resume is not None else {}
    flips = {"pruned_total": flips.get("pruned_total", 0), "regrown_total": flips.get("regrown_total", 0)}
    metrics: dict[str, float] = dict(resume.get("metrics", {})) if resume is not None else {}
    # the last epoch's metrics go into the checkpoint with the timestamp they are logged with,
    # and a resumed run logs them again: identical (key, value, step, timestamp) entries are
    # stored once by MLflow, so a crash between the checkpoint and the logging loses nothing
    # and duplicates nothing
    logged = dict(resume.get("logged", {})) if resume is not None else {}
    if logged.get("metrics"):
        logger.log_metrics(logged["metrics"], step=logged["step"], ts=logged["ts"])
    train_time = resume.get("train_time_s", 0.0) if resume is not None else 0.0
    last_eval: dict[str, float] = {}
    layer_rows: list = list(resume.get("layer_rows", [])) if resume is not None else []
    probe_batch = None
    startup: dict[str, float] = {}  # this segment's startup costs, measured at its first step

    def checkpoint(epoch: int, in_epoch: int, loss_sum: torch.Tensor, train_time: float) -> None:
        """Everything a resumed run needs to continue exactly where this one is."""
        if rank == 0:
            save_checkpoint({"run_hash": cfg.run_hash(), "epoch": epoch, "in_epoch": in_epoch, "step": step,
                         "loss_sum": loss_sum.tolist(), "model": engine.module.state_dict(),
                         "optimizer": opt.state_dict(), "pruner": pruner.state_dict(),
                         "grad_scaler": scaler.state_dict() if scaler is not None else None,
                         "torch_rng": torch.get_rng_state(), "mlflow_run_id": logger.run_id,
                         "train_time_s": train_time, "metrics": metrics, "logged": logged, "flips": flips,
                         "active": active, "stream": stream.state(), "layer_rows": layer_rows}, ckpt_path)
        if world > 1:
            dist.barrier()

    fault = _injected_fault(cfg.run_hash())
    for epoch in range(start_epoch, cfg.epochs + 1):
        t0 = time.time()
        w_lr, g_lr = pruner.lrs(epoch)
        opt.set_lrs(w_lr, g_lr)
        pruner.start_epoch(epoch)
        engine.train()
        first = in_epoch if epoch == start_epoch else 0
        loss_sum = torch.tensor(resume["loss_sum"], dtype=torch.float64) if first \
            else torch.zeros(2, dtype=torch.float64)
        for i in range(first, steps_per_epoch):
            x, y = stream.next()
            x, y = to_device(x, device, cl), y.to(device, non_blocking=True)
            probe_batch = (x, y)
            if gated:  # fp16: the gates' injected pressure gradient carries the loss scale of this step
                s_t = scaler.scale(torch.ones((), device=device))  # the current scale, as a tensor (no sync)
                for g in gated:
                    g.loss_scale = s_t
            with autocast(device, precision):
                logits = engine(x)
                loss = criterion(logits, y)
            extra = pruner.loss_term()
            total = loss + extra if extra is not None else loss
            if fault.get("sleep"):
                time.sleep(fault["sleep"] / 1000)
            if fault.get("nan") == step + 1:
                total = total * float("nan")
            if not torch.isfinite(total):
                raise FloatingPointError(f"non-finite loss ({total.item()}) at epoch {epoch}, step {step + 1}")
            if scaler is not None:
                total = scaler.scale(total)
            engine.backward(total)
            engine.step()
            step += 1
            pruner.after_step(step)
            if fault.get("usr2") == step and rank == world - 1:
                os.kill(os.getpid(), signal.SIGUSR2)
            loss_sum[0] += loss.item()
            loss_sum[1] += 1
            if not startup:
                marks["first_step"] = time.time()
                startup = startup_costs(marks)
                logger.log_metrics(startup, step=step)
                logger.log_params(observed_settings(engine.module, logits))
            if _stop_requested(world, step):
                checkpoint(epoch, i + 1, loss_sum, train_time + time.time() - t0)
                say(f"[hfbench] {cfg.run_name()}: stop requested at epoch {epoch}, step {step}; checkpoint "
                    f"written to {ckpt_path}", flush=True)
                _hand_over(rank)
        epoch_train = time.time() - t0
        train_time += epoch_train
        if world > 1:
            dist.all_reduce(loss_sum)
        engine.eval()  # the ruler reads test-time weights (deterministic for stochastic gates)
        now = sparsity.active(layers)
        layer_rows.extend((epoch, name, float(a.float().mean())) for (name, _), a in zip(layers, now))
        dens = sparsity.density_of(now)
        pruned, regrown = sparsity.flips(active, now)
        active = now
        flips["pruned_total"] += pruned
        flips["regrown_total"] += regrown
        metrics = {"pruned": pruned, "regrown": regrown, **flips,
                   "train_loss": float(loss_sum[0] / loss_sum[1]), "density": dens, "sparsity": 1 - dens,
                   "lr": w_lr, "gate_lr": g_lr,
                   # images per second per rank over this epoch's training steps (no evaluation)
                   "img_per_s": (steps_per_epoch - first) * cfg.batch_size / max(epoch_train, 1e-9)}
        if scaler is not None:  # fp16: the dynamic loss scale and the updates it skipped (inf/NaN grads)
            metrics["grad_scale"] = float(scaler.get_scale())
            metrics["skipped_steps"] = float(opt.skipped_steps)
        metrics.update(pruner.end_epoch(epoch, dens))
        if metrics.get("snap_pp"):  # the method moved its mask at the epoch's end: the ruler reads it again
            now = sparsity.active(layers)
            layer_rows[-len(layers):] = [(epoch, name, float(a.float().mean())) for (name, _), a in zip(layers, now)]
            dens = sparsity.density_of(now)
            active = now
            metrics.update(density=dens, sparsity=1 - dens)
        if cfg.flux_every and (epoch % cfg.flux_every == 0 or epoch == cfg.epochs) and rank == 0 \
                and probe_batch is not None:
            tp = time.time()  # diagnostics on this epoch's last batch; training never sees them
            metrics.update(flux.statistics(flux.flux_and_grad(engine.module, layers, *probe_batch, criterion)))
            metrics["probe_time_s"] = time.time() - tp
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            metrics["val_top1"] = evaluate(engine.module, val_loader, device, rank, world, precision, cl)
            metrics["test_top1"] = evaluate(engine.module, test_loader, device, rank, world, precision, cl)
            last_eval = {k: metrics[k] for k in ("val_top1", "test_top1")}
        metrics["epoch_time_s"] = time.time() - t0
        logged = {"metrics": metrics, "step": epoch, "ts": int(time.time() * 1000)}
        checkpoint(epoch, 0, loss_sum, train_time)
        logger.log_metrics(metrics, step=epoch, ts=logged["ts"])
        ev_txt = (f"val {100 * last_eval['val_top1']:.2f}% test {100 * last_eval['test_top1']:.2f}%"
                  if last_eval else "val - test -")
        extra_txt = "".join(" " + fmt.format(metrics[k]) for k, fmt in pruner.epoch_metrics.items() if k in metrics)
        say(f"[hfbench] {cfg.run_name()} epoch {epoch}/{cfg.epochs} loss {metrics['train_loss']:.4f} "
            f"{ev_txt} "
            f"density {100 * dens:.2f}%{extra_txt} ({metrics['epoch_time_s']:.1f}s)", flush=True)

    counts = sparsity.count(layers)
    digest = state_digest(engine.module)
    # the final metrics are computed once: a process killed after logging them and before its done
    # marker logs the very same (key, value, step, timestamp) entries again when resumed, which
    # MLflow stores once (wall time included)
    final_path = out / "final_metrics.json"
    final, final_ts = _load_final(final_path, cfg.run_hash())
    if final is None:
        n_train = getattr(train_loader, "num_samples", len(train_loader) * cfg.batch_size) * world
        final = {"final_test_top1": metrics["test_top1"], "final_val_top1": metrics["val_top1"],
                 "final_density": metrics["density"], "final_sparsity": metrics["sparsity"],
                 "train_time_s": train_time, "wall_time_s": time.time() - t_start,
                 **budget(cfg, step, world, n_train, train_time, say)}
        final_ts = int(time.time() * 1000)
        if rank == 0:
            import json

            save_text_atomic(json.dumps({"run_hash": cfg.run_hash(), "ts": final_ts, "metrics": final}), final_path)
    logger.log_metrics(final, step=cfg.epochs, ts=final_ts)
    if fault.get("exitfinal"):
        os._exit(3)
    logger.log_text(sparsity.table(counts), "layer_density.csv")
    logger.log_text("epoch,layer,density\n" + "".join(f"{e},{n},{d:.6f}\n" for e, n, d in layer_rows),
                    "layer_density_epochs.csv")
    if rank == 0:
        masks.bake(engine.module)
        save_atomic(engine.module.state_dict(), out / "final_weights.pt")
    for ld in (train_loader, val_loader, test_loader):
        if hasattr(ld, "close"):
            ld.close()
    if world > 1:
        dist.barrier()
    final["run_hash"] = cfg.run_hash()
    final["state_digest"] = digest
    final["rank"] = rank
    final["optimizer_state_numel"] = optimizer_state_numel(engine.optimizer)
    final["weights"] = str(out / "final_weights.pt")
    final.update(startup)
    if startup:
        final["first_step_unix"] = marks["first_step"]
    return final
