"""The one training engine: FFCV loader -> model -> pruner -> DeepSpeed engine -> MLflow.

Every run, dense or pruned, one rank or many, goes through `train()`. DeepSpeed owns the
model wrapper, gradient all-reduce and the optimiser step (gloo on CPU, NCCL on GPU); the
pruner plugs in through the Pruner hooks; the suite measures sparsity itself; rank 0 logs
to MLflow and writes checkpoints at epoch ends (write to a temp file, then rename).

This module holds the run's course (lock, resume, the epoch loop, the final metrics); its
parts live beside it: suite/distributed.py (process group, DeepSpeed config), suite/steps.py
(the training step shared with suite/bench.py, evaluation), suite/batches.py (loaders, the
batch stream), suite/checkpoints.py (run folder, checkpoints, lock, done marker),
suite/preemption.py (stop signal, hand-over, injected faults), suite/weights.py (starting
weights) and suite/accounting.py (startup costs, budget). Their public names can be imported
from here as well.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from suite import models, run_claims, run_logger, run_schema, tracking
from suite.accounting import budget, observed_settings, optimizer_state_numel, process_start_time, startup_costs
from suite.batches import Stream, make_loaders
from suite.checkpoints import (
    RunLock,
    done_result,
    load_checkpoint,
    load_final,
    reuse_finished,
    run_busy,
    run_dir,
    save_atomic,
    save_checkpoint,
    save_final,
    save_text_atomic,
    state_digest,
    weights_readable,
)
from suite.config import RunConfig, dump_run
from suite.distributed import ds_config, resolve_device, setup_distributed
from suite.preemption import (
    Preempted,
    faulty_loss,
    hand_over,
    handing_over,
    injected_fault,
    install_stop_handler,
    signal_if_due,
    stop_requested,
)
from suite.pruning import flux, masks, sparsity
from suite.steps import attach_pruner, evaluate, loss_scaled_gates, to_device, train_step
from suite.weights import load_pretrained, load_start, load_weights

__all__ = [  # train, and the names launchers, tests and scripts import from here
    "train",
    "Preempted",
    "attach_pruner",
    "done_result",
    "install_stop_handler",
    "load_checkpoint",
    "load_pretrained",
    "load_weights",
    "make_loaders",
    "run_busy",
    "run_dir",
    "save_atomic",
    "save_checkpoint",
    "setup_distributed",
    "state_digest",
    "weights_readable",
]


def _silent(*a, **k) -> None:
    pass


@dataclass
class _Run:
    """Where one run trains, fixed for the whole of this process's part of it."""

    cfg: RunConfig
    device: str
    rank: int
    world: int
    out: Path  # the run folder
    say: Callable[..., None]  # rank 0: the caller's log; other ranks: silent
    t_start: float
    marks: dict[str, float]  # startup timeline (unix times)

    @property
    def ckpt_path(self) -> Path:
        return self.out / "last.pt"


def train(
    cfg: RunConfig, experiment_id: Optional[str] = None, tracking_uri: Optional[str] = None, log=print
) -> dict[str, Any]:
    """Train one run end to end; returns the final metrics (on every rank)."""
    t_start = time.time()
    marks = {"process": process_start_time(t_start), "engine": t_start}
    device = resolve_device(cfg)
    torch.set_num_threads(cfg.engine.threads_per_rank)
    rank, world, local_rank = setup_distributed(device)
    marks["dist"] = time.time()
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if cfg.engine.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.seed)
    run = _Run(cfg, device, rank, world, run_dir(cfg), log if rank == 0 else _silent, t_start, marks)

    lock = earlier = claim = None
    if rank == 0:
        lock, earlier, claim = _lock_and_claim(run, experiment_id, tracking_uri)
    if world > 1:
        box = [earlier]
        dist.broadcast_object_list(box, src=0)
        earlier = box[0]
    try:
        if earlier is not None:  # trained meanwhile (or before) by another launch of the same run
            run.say(
                f"[hfbench] {cfg.run_name()} ({cfg.run_hash()}) is already finished in this experiment: "
                f"MLflow run {earlier.get('mlflow_run_id')}; not training it again",
                flush=True,
            )
            return {**earlier, "rank": rank, "reused": True}
        return _train_locked(run, experiment_id, tracking_uri, claim)
    finally:
        if claim is not None and not handing_over():
            claim.release()  # finished or failed; a preempted run keeps its claim until it resumes
        if lock is not None:
            lock.release()


def _lock_and_claim(run: _Run, experiment_id: Optional[str], tracking_uri: Optional[str]):
    """Rank 0: take the run's lock (waiting for another process that trains it), then find
    whether it is finished already in this experiment, here or in another sweep's folder; if
    not, claim its hash in the experiment. Returns (lock, earlier result or None, claim or None)."""
    cfg, out, say = run.cfg, run.out, run.say
    claim = None
    lock = RunLock(out)
    if not lock.try_acquire():
        say(
            f"[hfbench] {cfg.run_name()} ({cfg.run_hash()}): another process is training this run; waiting for it",
            flush=True,
        )
        lock.acquire()
    earlier = done_result(out, cfg.run_hash(), experiment_id)
    uri = tracking_uri or cfg.tracking_uri or tracking.default_uri()
    if earlier is not None and not weights_readable(out / "final_weights.pt"):
        say(f"[hfbench] {cfg.run_name()}: its final weights are gone or unreadable; training them again", flush=True)
        earlier = None
    if (
        earlier is not None
        and experiment_id is not None
        and not tracking.run_in_store(uri, earlier.get("mlflow_run_id"), experiment_id)
    ):
        earlier = None  # finished for another store or experiment (same out_dir): not for this one
    if earlier is None and experiment_id is not None:
        claim = run_claims.Claim(uri, experiment_id, cfg.run_hash(), owner=str(out.resolve()), say=say)
        other = claim.acquire()
        if other is not None:
            claim.release()
            earlier = reuse_finished(other, out, cfg, experiment_id, say)
    return lock, earlier, claim


def _train_locked(run: _Run, experiment_id: Optional[str], tracking_uri: Optional[str], claim=None):
    """Resume from the run's checkpoint (if it belongs to this experiment), open its MLflow run,
    train, and mark it done; a failure is recorded in MLflow unless the run is handing over."""
    cfg, rank, out, say = run.cfg, run.rank, run.out, run.say
    resume = load_checkpoint(out, cfg.run_hash(), say)
    uri = tracking_uri or cfg.tracking_uri or tracking.default_uri()
    if (
        resume is not None
        and rank == 0
        and experiment_id is not None
        and resume.get("mlflow_run_id")
        and not tracking.run_in_store(uri, resume["mlflow_run_id"], experiment_id)
    ):
        say(
            f"[hfbench] {cfg.run_name()}: the checkpoint in {out} belongs to MLflow run {resume['mlflow_run_id']}, "
            f"which is not in this experiment or store; training this run afresh here",
            flush=True,
        )
        resume = None
    if run.world > 1:  # every rank starts where rank 0 decided
        box = [resume is None]
        dist.broadcast_object_list(box, src=0)
        if box[0]:
            resume = None
    logger: Any = run_logger.NullLogger()
    if rank == 0 and experiment_id is not None:
        logger = run_logger.RunLogger(
            uri, experiment_id, cfg, run_id=resume.get("mlflow_run_id") if resume else None, spool_dir=out, say=say
        )
        if claim is not None:
            claim.set_run(logger.run_id)
    run.marks["mlflow"] = time.time()
    try:
        result = _Training(run, resume, logger).train()
    except BaseException as e:
        if handing_over():
            raise  # preempted or timed out with a checkpoint: the MLflow run stays RUNNING until resumed
        logger.finish("FAILED", error=f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
        raise
    logger.finish("FINISHED")
    result["mlflow_run_id"] = logger.run_id
    if rank == 0 and experiment_id is not None:
        save_text_atomic(json.dumps({**result, "experiment_id": str(experiment_id)}, default=str), out / "done.json")
    return result


class _Training:
    """One run's training, from building its model to its final metrics. What a checkpoint
    carries besides the model, optimiser and pruner lives on the instance: the global step,
    the last epoch's metrics (and what was logged of them), training time, the active weights
    at the last epoch end and the pruning / regrowth counts, per-layer densities."""

    def __init__(self, run: _Run, resume: Optional[dict[str, Any]], logger: Any):
        import deepspeed

        cfg, world = run.cfg, run.world
        self.run, self.cfg, self.resume, self.logger = run, cfg, resume, logger
        spec, self.train_loader, self.val_loader, self.test_loader = make_loaders(cfg, world)
        self.dataset = run_schema.dataset_input(cfg.dataset, spec.paths(cfg.data_dir))  # MLflow's input
        if len(self.train_loader) == 0:  # FFCV would wait forever for a first batch that cannot be filled
            raise ValueError(
                f"batch_size {cfg.batch_size} x {world} ranks is larger than the training set of "
                f"{cfg.dataset}: not one full batch per epoch; lower batch_size"
            )
        run.marks["data"] = time.time()
        self.mspec = models.get(cfg.model)
        model = self.mspec.build(spec.num_classes, spec.input_shape[0])
        load_start(model, cfg, say=run.say)
        self.layers = self.mspec.prunable(model)
        self.steps_per_epoch = cfg.max_steps_per_epoch or len(self.train_loader)
        self.pruner, self.opt = attach_pruner(cfg, model, self.layers, self.steps_per_epoch, run.device)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.opt, config=ds_config(cfg, world))
        self.cl, self.precision = cfg.engine.channels_last, cfg.engine.precision
        if self.cl:  # after DeepSpeed's broadcast (it views parameters as flat bytes); in place: same Parameters
            self.engine.module.to(memory_format=torch.channels_last)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.scaler = self.opt.use_grad_scaler(run.device) if self.precision == "fp16" else None
        self.gated = loss_scaled_gates(self.engine.module, self.scaler)
        run.marks["model"] = time.time()

    def train(self) -> dict[str, Any]:
        start_epoch, in_epoch = self._start()
        self.fault = injected_fault(self.cfg.run_hash())
        for epoch in range(start_epoch, self.cfg.epochs + 1):
            self._epoch(epoch, in_epoch if epoch == start_epoch else 0)
        return self._finish()

    def _start(self) -> tuple[int, int]:
        """Restore a resumed run's state, or record a fresh run's set-up (one-shot prunes happen
        here); returns (first epoch, its steps already taken)."""
        run, cfg, resume, logger, engine = self.run, self.cfg, self.resume, self.logger, self.engine
        start_epoch, self.step, in_epoch = 1, 0, 0
        if resume is not None:
            engine.module.load_state_dict(resume["model"])
            self.opt.load_state_dict(resume["optimizer"])
            self.pruner.load_state_dict(resume["pruner"])
            if self.scaler is not None and resume.get("grad_scaler"):
                self.scaler.load_state_dict(resume["grad_scaler"])
            torch.set_rng_state(resume["torch_rng"])
            self.step, in_epoch = resume["step"], resume.get("in_epoch", 0)
            start_epoch = resume["epoch"] if in_epoch else resume["epoch"] + 1
            run.say(f"[hfbench] resuming {cfg.run_name()} at epoch {start_epoch}, step {self.step}")
        job = os.environ.get("SLURM_ARRAY_JOB_ID")
        job = f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if job else os.environ.get("SLURM_JOB_ID", "")
        if job:
            logger.set_tag("hfbench.slurm_job", job)
        if resume is not None:
            logger.set_tag("hfbench.resumed_at_step", str(self.step))
        else:
            if run.rank == 0:  # a fresh start: final metrics of an earlier attempt describe another training
                (run.out / "final_metrics.json").unlink(missing_ok=True)
            engine.eval()
            start_active = sparsity.active(
                self.layers
            )  # before a one-shot prune, which then counts as pruned in epoch 1
            self.pruner.on_train_start()
            n_prunable = sum(m.weight.numel() for _, m in self.layers)
            logger.set_tags(tracking.environment(run.world, run.device))  # tags: not part of the config
            logger.log_input(self.dataset)
            logger.log_params(
                {
                    "prunable_policy": self.mspec.policy,
                    "prunable_layers": ",".join(n for n, _ in self.layers),
                    "prunable_weights": n_prunable,
                    "steps_per_epoch": self.steps_per_epoch,
                }
            )
            logger.log_text(dump_run(cfg), "config.yaml")
            run.say(
                f"[hfbench] {cfg.run_name()} ({cfg.run_hash()}): {cfg.epochs} epochs x {self.steps_per_epoch} "
                f"steps, world {run.world} on {run.device}; {len(self.layers)} prunable layers, {n_prunable} "
                f"weights ({self.mspec.policy})"
            )

        self.stream = Stream(self.train_loader)
        if resume is not None and "stream" in resume:
            self.stream.restore(resume["stream"])
        resumed = resume if resume is not None else {}
        # pruning and regrowth counts: compare which prunable weights are active (effective value
        # non-zero) at consecutive epoch ends; the same ruler for every method
        self.active = (
            [a.clone() for a in resume["active"]]
            if resume is not None and "active" in resume
            else (start_active if resume is None else sparsity.active(self.layers))
        )
        flips = dict(resumed.get("flips", {}))
        self.flips = {"pruned_total": flips.get("pruned_total", 0), "regrown_total": flips.get("regrown_total", 0)}
        self.metrics: dict[str, float] = dict(resumed.get("metrics", {}))
        # the last epoch's metrics go into the checkpoint with the timestamp they are logged with,
        # and a resumed run logs them again: identical (key, value, step, timestamp) entries are
        # stored once by MLflow, so a crash between the checkpoint and the logging loses nothing
        # and duplicates nothing
        self.logged = dict(resumed.get("logged", {}))
        if self.logged.get("metrics"):
            logger.log_metrics(self.logged["metrics"], step=self.logged["step"], ts=self.logged["ts"])
        self.train_time = resumed.get("train_time_s", 0.0)
        self.last_eval: dict[str, float] = {}
        self.layer_rows: list = list(resumed.get("layer_rows", []))
        self.probe_batch = None
        self.startup: dict[str, float] = {}  # this segment's startup costs, measured at its first step
        return start_epoch, in_epoch

    def _checkpoint(self, epoch: int, in_epoch: int, loss_sum: torch.Tensor, train_time: float) -> None:
        """Everything a resumed run needs to continue exactly where this one is."""
        if self.run.rank == 0:
            scaler = self.scaler
            save_checkpoint(
                {
                    "run_hash": self.cfg.run_hash(),
                    "epoch": epoch,
                    "in_epoch": in_epoch,
                    "step": self.step,
                    "loss_sum": loss_sum.tolist(),
                    "model": self.engine.module.state_dict(),
                    "optimizer": self.opt.state_dict(),
                    "pruner": self.pruner.state_dict(),
                    "grad_scaler": scaler.state_dict() if scaler is not None else None,
                    "torch_rng": torch.get_rng_state(),
                    "mlflow_run_id": self.logger.run_id,
                    "train_time_s": train_time,
                    "metrics": self.metrics,
                    "logged": self.logged,
                    "flips": self.flips,
                    "active": self.active,
                    "stream": self.stream.state(),
                    "layer_rows": self.layer_rows,
                },
                self.run.ckpt_path,
            )
        if self.run.world > 1:
            dist.barrier()

    def _epoch(self, epoch: int, first: int) -> None:
        """Train one epoch from its step `first` (0, or where a resumed run stopped); then
        measure, checkpoint and log it."""
        run, cfg = self.run, self.cfg
        t0 = time.time()
        w_lr, g_lr = self.pruner.lrs(epoch)
        self.opt.set_lrs(w_lr, g_lr)
        self.pruner.start_epoch(epoch)
        self.engine.train()
        loss_sum = (
            torch.tensor(self.resume["loss_sum"], dtype=torch.float64) if first else torch.zeros(2, dtype=torch.float64)
        )
        for i in range(first, self.steps_per_epoch):
            self._step(epoch, i, loss_sum, t0)
        epoch_train = time.time() - t0
        self.train_time += epoch_train
        if run.world > 1:
            dist.all_reduce(loss_sum)
        metrics = {
            "train_loss": float(loss_sum[0] / loss_sum[1]),
            "lr": w_lr,
            "gate_lr": g_lr,
            # images per second per rank over this epoch's training steps (no evaluation)
            "img_per_s": (self.steps_per_epoch - first) * cfg.batch_size / max(epoch_train, 1e-9),
        }
        metrics, dens = self._measure(epoch, metrics)
        metrics["epoch_time_s"] = time.time() - t0
        self.metrics = metrics
        self.logged = {"metrics": metrics, "step": epoch, "ts": int(time.time() * 1000)}
        self._checkpoint(epoch, 0, loss_sum, self.train_time)
        self.logger.log_metrics(metrics, step=epoch, ts=self.logged["ts"])
        ev_txt = (
            f"val {100 * self.last_eval['val_top1']:.2f}% test {100 * self.last_eval['test_top1']:.2f}%"
            if self.last_eval
            else "val - test -"
        )
        extra_txt = "".join(
            " " + fmt.format(metrics[k]) for k, fmt in self.pruner.epoch_metrics.items() if k in metrics
        )
        run.say(
            f"[hfbench] {cfg.run_name()} epoch {epoch}/{cfg.epochs} loss {metrics['train_loss']:.4f} "
            f"{ev_txt} "
            f"density {100 * dens:.2f}%{extra_txt} ({metrics['epoch_time_s']:.1f}s)",
            flush=True,
        )

    def _step(self, epoch: int, i: int, loss_sum: torch.Tensor, t0: float) -> None:
        """Step i of the epoch (begun at t0), with the engine's extras around train_step: the
        injected faults, the probe batch, the startup costs, the stop check."""
        run = self.run
        x, y = self.stream.next()
        x, y = to_device(x, run.device, self.cl), y.to(run.device, non_blocking=True)
        self.probe_batch = (x, y)
        step = self.step + 1

        def check(total: torch.Tensor) -> torch.Tensor:
            total = faulty_loss(self.fault, total, step)
            if not torch.isfinite(total):
                raise FloatingPointError(f"non-finite loss ({total.item()}) at epoch {epoch}, step {step}")
            return total

        logits, loss = train_step(
            self.engine,
            self.pruner,
            self.criterion,
            x,
            y,
            step,
            device=run.device,
            precision=self.precision,
            scaler=self.scaler,
            gated=self.gated,
            check=check,
        )
        self.step = step
        signal_if_due(self.fault, step, run.rank, run.world)
        loss_sum[0] += loss.item()
        loss_sum[1] += 1
        if not self.startup:
            run.marks["first_step"] = time.time()
            self.startup = startup_costs(run.marks)
            self.logger.log_metrics(self.startup, step=step)
            self.logger.log_params(observed_settings(self.engine.module, logits))
        if stop_requested(run.world, step):
            self._checkpoint(epoch, i + 1, loss_sum, self.train_time + time.time() - t0)
            run.say(
                f"[hfbench] {self.cfg.run_name()}: stop requested at epoch {epoch}, step {step}; checkpoint "
                f"written to {run.ckpt_path}",
                flush=True,
            )
            hand_over(run.rank)

    def _measure(self, epoch: int, train: dict[str, float]) -> tuple[dict[str, float], float]:
        """The epoch's metrics, `train`'s included: sparsity and pruning / regrowth by the suite's
        ruler, the method's own, gradient-scaler state (fp16), flux diagnostics and accuracy when
        due; and the density the ruler read last."""
        run, cfg, layers = self.run, self.cfg, self.layers
        self.engine.eval()  # the ruler reads test-time weights (deterministic for stochastic gates)
        now = sparsity.active(layers)
        self.layer_rows.extend((epoch, name, float(a.float().mean())) for (name, _), a in zip(layers, now))
        dens = sparsity.density_of(now)
        pruned, regrown = sparsity.flips(self.active, now)
        self.active = now
        self.flips["pruned_total"] += pruned
        self.flips["regrown_total"] += regrown
        metrics = {
            "pruned": pruned,
            "regrown": regrown,
            **self.flips,
            "train_loss": train["train_loss"],
            "density": dens,
            "sparsity": 1 - dens,
            "lr": train["lr"],
            "gate_lr": train["gate_lr"],
            "img_per_s": train["img_per_s"],
        }
        if self.scaler is not None:  # fp16: the dynamic loss scale and the updates it skipped (inf/NaN grads)
            metrics["grad_scale"] = float(self.scaler.get_scale())
            metrics["skipped_steps"] = float(self.opt.skipped_steps)
        metrics.update(self.pruner.end_epoch(epoch, dens))
        if metrics.get("snap_pp"):  # the method moved its mask at the epoch's end: the ruler reads it again
            now = sparsity.active(layers)
            self.layer_rows[-len(layers) :] = [
                (epoch, name, float(a.float().mean())) for (name, _), a in zip(layers, now)
            ]
            dens = sparsity.density_of(now)
            self.active = now
            metrics.update(density=dens, sparsity=1 - dens)
        if (
            cfg.flux_every
            and (epoch % cfg.flux_every == 0 or epoch == cfg.epochs)
            and run.rank == 0
            and self.probe_batch is not None
        ):
            tp = time.time()  # diagnostics on this epoch's last batch; training never sees them
            metrics.update(
                flux.statistics(flux.flux_and_grad(self.engine.module, layers, *self.probe_batch, self.criterion))
            )
            metrics["probe_time_s"] = time.time() - tp
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            for split, loader in (("val_top1", self.val_loader), ("test_top1", self.test_loader)):
                metrics[split] = evaluate(
                    self.engine.module, loader, run.device, run.rank, run.world, self.precision, self.cl
                )
            self.last_eval = {k: metrics[k] for k in ("val_top1", "test_top1")}
        return metrics, dens

    def _finish(self) -> dict[str, Any]:
        """Final metrics (computed once, even across a crash after logging them), the per-layer
        tables, the final weights (masks baked in); returns the run's result."""
        run, cfg, logger, module = self.run, self.cfg, self.logger, self.engine.module
        counts = sparsity.count(self.layers)
        digest = state_digest(module)
        # the final metrics are computed once: a process killed after logging them and before its done
        # marker logs the very same (key, value, step, timestamp) entries again when resumed, which
        # MLflow stores once (wall time included)
        final_path = run.out / "final_metrics.json"
        final, final_ts = load_final(final_path, cfg.run_hash())
        if final is None:
            n_train = getattr(self.train_loader, "num_samples", len(self.train_loader) * cfg.batch_size) * run.world
            m = self.metrics
            final = {
                "final_test_top1": m["test_top1"],
                "final_val_top1": m["val_top1"],
                "final_density": m["density"],
                "final_sparsity": m["sparsity"],
                "train_time_s": self.train_time,
                "wall_time_s": time.time() - run.t_start,
                **budget(cfg, self.step, run.world, n_train, self.train_time, run.say),
            }
            final_ts = int(time.time() * 1000)
            if run.rank == 0:
                save_final(final_path, cfg.run_hash(), final_ts, final)
        logger.log_metrics(final, step=cfg.epochs, ts=final_ts)
        if self.fault.get("exitfinal"):
            os._exit(3)
        logger.log_text(sparsity.table(counts), "layer_density.csv")
        logger.log_text(
            "epoch,layer,density\n" + "".join(f"{e},{n},{d:.6f}\n" for e, n, d in self.layer_rows),
            "layer_density_epochs.csv",
        )
        if run.rank == 0:
            masks.bake(module)
            save_atomic(module.state_dict(), run.out / "final_weights.pt")
        for ld in (self.train_loader, self.val_loader, self.test_loader):
            if hasattr(ld, "close"):
                ld.close()
        if run.world > 1:
            dist.barrier()
        final["run_hash"] = cfg.run_hash()
        final["state_digest"] = digest
        final["rank"] = run.rank
        final["optimizer_state_numel"] = optimizer_state_numel(self.engine.optimizer)
        final["weights"] = str(run.out / "final_weights.pt")
        final.update(self.startup)
        if self.startup:
            final["first_step_unix"] = run.marks["first_step"]
        return final
