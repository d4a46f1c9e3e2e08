"""Sweeps: expand the grid, prepare data and the MLflow experiment, send the runs through
submitit (a SLURM array when a cluster answers, local processes otherwise), show progress,
and print a summary. Runs whose config hash already FINISHED in the experiment are skipped.

Runs that start from a dense model (init: dense) go in a second stage, after the dense runs
of the first stage have written their weights.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

from launchers.checks import (
    check_files,
    check_private,
    check_resources,
    choose_executor,
    ensure_data,
    slurm_reachable,
)
from launchers.outcomes import Outcome, _Progress, _progress, describe, launch_costs, summary_table
from suite import tracking
from suite.config import RunConfig
from suite.sweeps import SweepConfig

# SLURM states of a job that is queued or running again after a requeue, and the states it
# passes through on the way there (see Sweep._settled).
_NOT_DONE = (
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "CONFIGURING",
    "COMPLETING",
    "RESIZING",
    "SUSPENDED",
)
_COMING_BACK = ("NODE_FAIL", "PREEMPTED")
TRANSIENT_GRACE_S = 300


class SubmitFailed(RuntimeError):
    """SLURM did not take a submission (refused it, or its controller stayed silent)."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM while the sweep waits; the message says what was cancelled."""


_RENDEZVOUS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)


def make_executor(sweep: SweepConfig, kind: str, folder: Path, world_size: int, nodes: int, threads: int = 1):
    import submitit

    if kind != "debug":  # debug runs in this process, which may hold a process group already
        for k in _RENDEZVOUS:
            os.environ.pop(k, None)
    L = sweep.launcher
    ex = submitit.AutoExecutor(folder=str(folder), cluster=kind, slurm_max_num_timeout=L.max_requeues)
    params: dict[str, Any] = dict(
        name=f"hfbench-{sweep.name}",
        timeout_min=L.slurm.time_min,
        nodes=nodes,
        tasks_per_node=world_size,
        cpus_per_task=max(threads, L.slurm.cpus_per_task),
    )
    if L.slurm.gpus_per_node:
        params["gpus_per_node"] = L.slurm.gpus_per_node
    if L.slurm.mem_gb:
        params["mem_gb"] = L.slurm.mem_gb
    if kind == "slurm":
        params["slurm_array_parallelism"] = L.parallelism
        params["slurm_signal_delay_s"] = L.slurm.signal_delay_s
        if L.slurm.partition:
            params["slurm_partition"] = L.slurm.partition
        extra = dict(L.slurm.extra)
        for k in ("account", "qos", "constraint"):
            v = getattr(L.slurm, k)
            if v:
                extra[k] = v
        if extra:
            params["slurm_additional_parameters"] = extra
    ex.update_parameters(**params)
    return ex


def jobs_file(sweep: SweepConfig) -> Path:
    return Path(sweep.launcher.folder) / sweep.name / "jobs.jsonl"


def _first_line(err: BaseException) -> str:
    """The error line of a failure: for submitit's FailedJobError, the last 'SomeError: ...'
    line of the remote traceback it carries."""
    import re

    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    errs = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Preempted)\b", ln)]
    if errs:
        return errs[-1][:300]
    return lines[0][:300] if lines else type(err).__name__


class Sweep:
    def __init__(self, sweep: SweepConfig, executor: Optional[str] = None, say=print):
        self.sweep = sweep
        self.kind = choose_executor(executor or sweep.launcher.executor)
        self.say = say
        self._transient: dict[str, float] = {}  # job id -> when it was first seen NODE_FAIL/PREEMPTED
        self.uri = sweep.tracking_uri or tracking.default_uri()
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"  # two sweeps in one second differ
        self.folder = Path(sweep.launcher.folder) / sweep.name / stamp  # fresh per sweep (see platform.md)

    def run(self) -> list[Outcome]:
        t0 = time.time()
        runs = self.sweep.expand()
        check_resources(self.sweep, runs, self.kind)  # before data, the experiment or any job
        check_files(runs)
        check_private(self.sweep, runs)
        ensure_data(runs, say=self.say)
        with tracking.bounded(self.uri, self.sweep.launcher.tracking_timeout_s) as b:
            exp_id = b.call(
                tracking.ensure_experiment,
                self.uri,
                self.sweep.experiment_name(),
                describe(self.sweep, runs),
                what="sweep's experiment lookup",
            )
            self.exp_id = exp_id
            g = self.sweep.grid
            b.call(
                tracking.ensure_sweep_run,
                self.uri,
                exp_id,
                self.sweep.name,
                describe(self.sweep, runs),
                {
                    "hfbench.grid.methods": ", ".join(g.methods),
                    "hfbench.grid.sparsities": ", ".join(f"{s:g}" for s in g.sparsities),
                    "hfbench.grid.seeds": ", ".join(map(str, g.seeds)),
                    "hfbench.runs": str(len(runs)),
                },
                what="sweep's parent run",
            )
            finished = b.call(tracking.finished_hashes, self.uri, exp_id, what="sweep's finished-run lookup")
        self.say(
            f"[hfbench] sweep {self.sweep.name}: {len(runs)} runs, experiment "
            f"{self.sweep.experiment_name()!r} (id {exp_id}) at {tracking.redact(self.uri)}; executor {self.kind}"
        )
        from suite.engine import weights_readable

        outcomes: dict[str, Outcome] = {}
        todo: list[RunConfig] = []
        for r in runs:
            h = r.run_hash()
            weights_ok = r.method != "dense" or weights_readable(Path(r.out_dir) / h / "final_weights.pt")
            if (h in finished and weights_ok) or (r.method == "dense" and self.sweep.reuse_dense and weights_ok):
                outcomes[h] = Outcome(r, "skipped")
            else:
                todo.append(r)
        if outcomes:
            self.say(f"[hfbench] {len(outcomes)} runs already FINISHED in this experiment: skipped")
        from reports.fmt import experiment_url, ui_base

        page = experiment_url(ui_base(self.uri), str(exp_id))  # the training-runs view of this experiment
        ui = (
            f"`mlflow ui --backend-store-uri {tracking.redact(self.uri)}`, then {page}"
            if self.uri.startswith(("sqlite:", "/", "file:"))
            else page
        )
        self.say(
            f"[hfbench] job logs: {self.folder}; run folders: {Path(self.sweep.out_dir).resolve()}; "
            f"MLflow UI: {ui}; progress: hfbench status <config>"
        )
        self._t0, self._n_total, self._n_done = time.time(), len(todo), 0
        # stage 1: the runs others start from; stage 2: the runs that start from them, with the
        # dense controls (budget-matched, doubled) that nothing waits for, long ones first, so no
        # slot idles while a control finishes alone
        stage1 = [r for r in todo if r.init != "dense" and not r.budget_matched]
        controls = [r for r in todo if r.budget_matched]
        stage2 = [r for r in todo if r.init == "dense"]
        for o in self._launch(stage1):
            outcomes[o.cfg.run_hash()] = o
        ready = []
        for r in stage2:
            w = Path(r.out_dir) / r.init_from / "final_weights.pt"
            if weights_readable(w):
                ready.append(r.model_copy(update={"init_checkpoint": str(w.resolve())}))
            else:
                parent = outcomes.get(r.init_from)
                why = f"dense parent {parent.cfg.run_name()} ({r.init_from}) " + (
                    f"{parent.result.get('slurm_state', '').lower() or 'failed'}: {parent.error}"
                    if parent is not None and parent.state == "failed"
                    else f"has no readable weights ({w})"
                )
                outcomes[r.run_hash()] = Outcome(r, "failed", error=why[:400])
        controls.sort(key=lambda r: -r.epochs * (r.max_steps_per_epoch or 10**6))
        for o in self._launch(controls + ready):
            outcomes[o.cfg.run_hash()] = o
        ordered = [outcomes[r.run_hash()] for r in runs]
        self.say(summary_table(ordered))
        costs = launch_costs(ordered, t0)
        if costs:
            self.say(costs)
        return ordered

    def _launch(self, runs: list[RunConfig]) -> list[Outcome]:
        if not runs:
            return []
        groups: dict[tuple[int, int, int], list[RunConfig]] = {}
        for r in runs:
            groups.setdefault((r.engine.world_size, r.engine.nodes, r.engine.threads_per_rank), []).append(r)
        pending: list[tuple[RunConfig, Any]] = []
        unsubmitted: list[Outcome] = []  # SLURM never took them
        waiting: list[tuple[RunConfig, Any]] = []  # local executor: (cfg, executor) not yet submitted
        deferred: list[tuple[RunConfig, Any]] = []  # being trained right now by another launch (e.g. another sweep)
        from launchers import task
        from suite.engine import run_busy

        for (ws, nodes, threads), rs in groups.items():
            ex = make_executor(self.sweep, self.kind, self.folder, ws, nodes, threads)
            busy = [r for r in rs if run_busy(Path(r.out_dir) / r.run_hash())]
            if busy:
                self.say(
                    f"[hfbench] {len(busy)} runs are being trained by another process right now "
                    f"(e.g. another sweep): waiting for them instead of training them twice"
                )
                deferred += [(r, ex) for r in busy]
                rs = [r for r in rs if r not in busy]
                if not rs:
                    continue
            if self.kind == "slurm":

                def submit_all(ex=ex, rs=rs):
                    with ex.batch():
                        return [
                            ex.submit(task.TrainTask(), r.model_dump(mode="json"), self.uri, self.exp_id) for r in rs
                        ]

                try:
                    jobs = self._submit(submit_all, f"{len(rs)} runs")
                except SubmitFailed as e:
                    self.say(f"[hfbench] {e}")
                    unsubmitted += [Outcome(r, "failed", error=str(e)[:400]) for r in rs]
                    continue
                pending += list(zip(rs, jobs))
                self._record(list(zip(rs, jobs)))
                self.say(
                    f"[hfbench] submitted SLURM array {jobs[0].job_id.split('_')[0]}: {len(rs)} tasks "
                    f"x {f'{nodes} nodes x ' if nodes > 1 else ''}{ws} ranks, at most {self.sweep.launcher.parallelism} at once; logs in {self.folder}"
                )
            else:
                waiting += [(r, ex) for r in rs]
        return unsubmitted + self._wait(pending, waiting, deferred)

    def _submit(self, fn, what: str):
        """Run a SLURM submission; while the controller does not answer (sinfo fails too), retry
        with growing pauses for up to launcher.submit_retry_s, saying so. A refusal by a
        controller that answers is not retried."""
        deadline = time.time() + self.sweep.launcher.submit_retry_s
        pause = 5.0
        while True:
            try:
                return fn()
            except Exception as e:
                why = _first_line(e)[:200]
                if slurm_reachable(timeout=10):
                    raise SubmitFailed(f"SLURM refused the submission of {what}: {why}") from None
                if time.time() + pause > deadline:
                    raise SubmitFailed(
                        f"SLURM controller did not answer for {self.sweep.launcher.submit_retry_s} s "
                        f"(launcher.submit_retry_s); {what} not submitted: {why}"
                    ) from None
                self.say(
                    f"[hfbench] SLURM controller not answering ({why}); retrying the submission of {what} "
                    f"in {pause:.0f} s"
                )
                time.sleep(pause)
                pause = min(2 * pause, 60.0)

    def _record(self, submitted) -> None:
        """Append (run hash -> job id) to the sweep's job log, read by `hfbench status`."""
        import json

        path = jobs_file(self.sweep)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            for r, job in submitted:
                f.write(
                    json.dumps(
                        {
                            "hash": r.run_hash(),
                            "run": r.run_name(),
                            "job_id": str(job.job_id),
                            "executor": self.kind,
                            "folder": str(self.folder),
                            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                        }
                    )
                    + "\n"
                )

    def _wait(self, pending, waiting, deferred=()) -> list[Outcome]:
        self.deferred = list(deferred)
        total = len(pending) + len(waiting) + len(self.deferred)
        done: list[Outcome] = []
        running = list(pending)
        limit = self.sweep.launcher.parallelism
        bar = _Progress(
            max(total, getattr(self, "_n_total", 0)),
            f"sweep {self.sweep.name}",
            done=getattr(self, "_n_done", 0),
            t0=getattr(self, "_t0", None),
        )
        try:
            out = self._poll(running, waiting, done, limit, bar)
            self._n_done = getattr(self, "_n_done", 0) + len(out)
            return out
        except KeyboardInterrupt:
            cancelled = [f"{r.run_name()} (job {job.job_id})" for r, job in running]
            for _, job in running:
                if getattr(job, "_process", None) is not None:
                    continue  # local: stopped below (submitit's SIGINT may be ignored, and prints a traceback)
                try:
                    job.cancel(check=False)
                except Exception:
                    pass
            _stop_local_jobs([job for _, job in running])
            for r, job in running:  # their MLflow runs end now, not RUNNING for good
                tracking.end_orphaned_runs(
                    self.uri,
                    self.exp_id,
                    r.run_hash(),
                    Path(r.out_dir) / r.run_hash(),
                    status="KILLED",
                    reason=f"the sweep was interrupted; job {job.job_id} cancelled",
                )
            parts = [f"cancelled {len(cancelled)} running: {', '.join(cancelled) or 'none'}"]
            if waiting:
                parts.append(f"{len(waiting)} not started")
            if self.deferred:
                parts.append(f"{len(self.deferred)} left to the other process training them")
            parts.append(
                f"{sum(o.state == 'finished' for o in done)} finished and "
                f"{sum(o.state == 'failed' for o in done)} failed before"
            )
            raise SweepInterrupted(
                f"sweep {self.sweep.name} interrupted: {'; '.join(parts)}. Rerun the same command to go on: "
                f"finished runs are skipped, checkpointed ones resume"
            ) from None
        finally:
            bar.close()

    def _poll(self, running, waiting, done, limit, bar) -> list[Outcome]:
        from launchers import task

        while running or waiting or self.deferred:
            self._check_deferred(running, waiting, done, bar)
            while waiting and len(running) < limit:  # local executor: honour the parallelism limit
                r, ex = waiting.pop(0)
                job = ex.submit(task.TrainTask(), r.model_dump(mode="json"), self.uri, self.exp_id)
                running.append((r, job))
                self._record([(r, job)])
            still = []
            for r, job in running:
                if not self._settled(job):
                    still.append((r, job))
                    continue
                try:
                    res = job.results()[0]  # rank 0 of a multi-task job (one process per rank)
                    o = Outcome(r, "finished", result=res, job_id=str(job.job_id))
                    msg = (
                        f"done   {r.run_name()}: test {100 * res['final_test_top1']:.2f}% "
                        f"sparsity {100 * res['final_sparsity']:.2f}%"
                        + (
                            " (trained by another launch of the same run; not trained twice)"
                            if res.get("reused")
                            else ""
                        )
                    )
                except Exception as e:  # the task raised, was cancelled or died
                    o, msg = self._judge_failed(r, job, e)
                done.append(o)
                bar.write(f"[hfbench] {msg}")
                bar.update(1)
            running[:] = still
            bar.status(f"failed {sum(o.state == 'failed' for o in done)}; " + _progress(running))
            if running or waiting or self.deferred:
                time.sleep(self.sweep.launcher.poll_s)
        return done

    def _judge_failed(self, r: RunConfig, job, err: BaseException) -> tuple[Outcome, str]:
        """A job that gave no result. The run's own done marker decides whether it finished (the
        result file can be lost while training completed, e.g. a deleted submitit folder). If
        not, the failure names SLURM's final state (CANCELLED, TIMEOUT, OUT_OF_MEMORY, ...), and
        an MLflow run of this folder left RUNNING by the dead task is ended with that reason."""
        from suite.engine import done_result

        out = Path(r.out_dir) / r.run_hash()
        res = done_result(out, r.run_hash(), self.exp_id)
        if res is not None:
            return (
                Outcome(r, "finished", result=res, job_id=str(job.job_id)),
                f"done   {r.run_name()}: test {100 * res['final_test_top1']:.2f}% sparsity "
                f"{100 * res['final_sparsity']:.2f}% (from its done marker; the job's own result was lost: "
                f"{_first_line(err)[:120]})",
            )
        state = ""
        if type(job).__name__ == "SlurmJob":
            from launchers.status import _sacct

            state = _sacct(str(job.job_id))[0]
        error = _first_line(err)
        if state and state not in ("COMPLETED", "FAILED") and state not in error:
            error = f"SLURM {state}: {error}"
        ended = tracking.end_orphaned_runs(
            self.uri,
            self.exp_id,
            r.run_hash(),
            out,
            status="KILLED" if state == "CANCELLED" else "FAILED",
            reason=f"job {job.job_id} ended{' ' + state if state else ''}: {error}",
        )
        o = Outcome(r, "failed", error=error, job_id=str(job.job_id))
        o.result = {"slurm_state": state}
        return o, (
            f"FAILED {r.run_name()}: {error} (log: {getattr(job, 'paths', None) and job.paths.stderr})"
            + (f"; MLflow run {', '.join(ended)} ended" if ended else "")
        )

    def _settled(self, job) -> bool:
        """job.done(), except for a SLURM job that is coming back. submitit counts NODE_FAIL and
        PREEMPTED as final and stops asking about the job, but SLURM requeues such a job
        (--requeue) and it resumes from its checkpoint. So a job without a result file is asked
        about here (sacct, every record): while its latest state is queued or running it is
        not settled; a NODE_FAIL/PREEMPTED latest state is waited on for TRANSIENT_GRACE_S (the
        requeue normally follows within seconds) before the run counts as failed."""
        if not job.done():
            return False
        parts = getattr(job, "_sub_jobs", None) or [job]
        if all(p.paths.result_pickle.exists() for p in parts) or type(job).__name__ != "SlurmJob":
            return True
        from launchers.status import _sacct

        state, _ = _sacct(str(job.job_id))
        if state in _COMING_BACK:
            first = self._transient.setdefault(str(job.job_id), time.time())
            return time.time() - first > TRANSIENT_GRACE_S
        self._transient.pop(str(job.job_id), None)
        return state not in _NOT_DONE

    def _check_deferred(self, running, waiting, done, bar) -> None:
        """A run another process was training: take its result once it is done, or launch it
        here if that process stopped without finishing it."""
        from launchers import task
        from suite.engine import done_result, run_busy

        still = []
        for r, ex in self.deferred:
            out = Path(r.out_dir) / r.run_hash()
            if run_busy(out):
                still.append((r, ex))
                continue
            res = done_result(out, r.run_hash(), self.exp_id)
            if res is not None:
                done.append(Outcome(r, "finished", result=res, job_id="(another sweep)"))
                bar.write(
                    f"[hfbench] done   {r.run_name()}: trained by another sweep; test "
                    f"{100 * res['final_test_top1']:.2f}% sparsity {100 * res['final_sparsity']:.2f}%"
                )
                bar.update(1)
            elif self.kind == "slurm":
                try:
                    job = self._submit(
                        lambda ex=ex, r=r: ex.submit(
                            task.TrainTask(), r.model_dump(mode="json"), self.uri, self.exp_id
                        ),
                        r.run_name(),
                    )
                except SubmitFailed as e:
                    done.append(Outcome(r, "failed", error=str(e)[:400]))
                    bar.write(f"[hfbench] FAILED {r.run_name()}: {e}")
                    bar.update(1)
                    continue
                running.append((r, job))
                self._record([(r, job)])
            else:
                waiting.append((r, ex))
        self.deferred = still


def _stop_local_jobs(jobs, grace_s: float = 5.0) -> None:
    """Stop local jobs: SIGTERM to every process of the job (submitit's wrapper and the
    training process under it), SIGKILL to those still alive after `grace_s` (the job ignores
    SIGTERM). submitit's own cancel sends SIGINT, which a sweep started in the background by a
    script has set to ignored."""
    import signal as _signal

    pids = [job._process.pid for job in jobs if getattr(job, "_process", None) is not None]
    if not pids:
        return

    def tree(root: int) -> list[int]:
        kids: dict[int, list[int]] = {}
        for st in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = st.read_text().rsplit(")", 1)[1].split()
                kids.setdefault(int(fields[1]), []).append(int(st.parent.name))
            except (OSError, IndexError, ValueError):
                continue
        out, todo = [], [root]
        while todo:
            p = todo.pop()
            out.append(p)
            todo += kids.get(p, [])
        return out

    deadline = time.time() + grace_s
    live = [p for root in pids for p in tree(root)]
    for p in live:
        try:
            os.kill(p, _signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    while live and time.time() < deadline:
        time.sleep(0.5)
        live = [
            p
            for p in live
            if Path(f"/proc/{p}").exists()
            and "zombie"
            not in (
                Path(f"/proc/{p}/status").read_text(errors="replace")
                if Path(f"/proc/{p}/status").exists()
                else "zombie"
            )
        ]
    for p in live:
        try:
            os.kill(p, _signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
