"""Sweeps: expand the grid, prepare data and the MLflow experiment, send the runs through
submitit (a SLURM array when a cluster answers, local processes otherwise), show progress,
and print a summary. Runs whose config hash already FINISHED in the experiment are skipped.

Runs that start from a dense model (init: dense) go in a second stage, after the dense runs
of the first stage have written their weights.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from suite import datasets, tracking
from suite.config import ConfigError, RunConfig
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


@dataclass
class Outcome:
    cfg: RunConfig
    state: str  # finished | failed | skipped
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    job_id: str = ""


def slurm_reachable(timeout: float = 10.0) -> bool:
    """True when `sinfo` answers with at least one node: a SLURM controller is up."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%N"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and bool(out.stdout.strip())


def choose_executor(kind: str) -> str:
    if kind == "auto":
        return "slurm" if slurm_reachable() else "local"
    if kind == "slurm" and not slurm_reachable():
        raise ConfigError("launcher.executor is 'slurm' but no SLURM controller answers (sinfo failed)")
    return kind


def check_files(runs: list[RunConfig]) -> None:
    """Refuse, before anything is submitted, runs whose starting weights file is missing."""
    for r in runs:
        if r.init == "pretrained" and not Path(r.pretrained).is_file():
            raise ConfigError(
                f"run {r.run_name()}: pretrained: weights file {r.pretrained} not found "
                f"(give a local path; nothing is downloaded at run time)"
            )


def check_resources(sweep: SweepConfig, runs: list[RunConfig], kind: str) -> None:
    """Refuse, before anything is submitted, runs the chosen executor cannot place.

    SLURM: engine.world_size ranks per node must fit launcher.slurm.gpus_per_node when that is
    set and the runs use GPUs (checked when the sweep is loaded, see SweepConfig.expand).
    Local executor (this machine is the one node): engine.nodes must be 1; a run on 'cuda' (or
    'auto' where a GPU is visible) needs engine.world_size <= the GPUs visible here, and
    launcher.slurm.gpus_per_node (passed on to the local jobs) may not exceed them either.
    Debug executor (in this process): one rank, one node."""
    if kind == "slurm":
        check_cluster(sweep, runs)
        return
    if kind not in ("local", "debug"):
        return
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpn = sweep.launcher.slurm.gpus_per_node
    if gpn > visible:
        raise ConfigError(
            f"launcher.slurm.gpus_per_node ({gpn}) is more than the {visible} GPU(s) visible on "
            f"this machine (executor {kind})"
        )
    for r in runs:
        if r.engine.nodes > 1:
            raise ConfigError(
                f"run {r.run_name()}: engine.nodes ({r.engine.nodes}) > 1 needs the SLURM executor "
                f"(launcher.executor is {kind!r})"
            )
        if kind == "debug" and r.engine.world_size > 1:
            raise ConfigError(
                f"run {r.run_name()}: engine.world_size ({r.engine.world_size}) > 1 cannot run on the "
                f"debug executor (one process); use launcher.executor local or slurm"
            )
        from suite.data import loader_thread_limit

        threads = loader_thread_limit()
        if r.engine.loader_workers > threads:
            raise ConfigError(
                f"run {r.run_name()}: engine.loader_workers ({r.engine.loader_workers}) is more than "
                f"the {threads} loader threads this machine allows (its CPUs, or NUMBA_NUM_THREADS)"
            )
        on_gpu = r.engine.device == "cuda" or (r.engine.device == "auto" and visible > 0)
        if on_gpu and r.engine.world_size > visible:
            raise ConfigError(
                f"run {r.run_name()}: engine.world_size ({r.engine.world_size}) is more than the "
                f"{visible} GPU(s) visible on this machine (engine.device {r.engine.device}); "
                f"lower it or set engine.device: cpu"
            )


def check_private(sweep: SweepConfig, runs: list[RunConfig]) -> None:
    """On a shared cluster, whoever can write into launcher.folder (the job pickles submitit
    loads) or a run folder (checkpoints torch loads) runs code as the submitter. Refuse such
    folders when they exist but belong to another user or are writable by group or others,
    and make everything this sweep creates private to its user (umask 077, inherited by the
    jobs through sbatch's environment)."""
    import stat

    os.umask(0o077)
    me = os.getuid()
    wanted = [("launcher.folder", Path(sweep.launcher.folder))]
    wanted += [("out_dir", Path(o)) for o in sorted({r.out_dir for r in runs})]
    wanted += [("data_dir", Path(d)) for d in sorted({r.data_dir for r in runs})]
    for field_name, d in wanted:  # the nearest existing folder on the way must be a folder
        for p in [d, *d.parents]:
            if p.exists():
                if not p.is_dir():
                    raise ConfigError(f"{field_name}: {d}: {p} is a file, not a folder")
                break
    folders = [
        ("launcher.folder", Path(sweep.launcher.folder)),
        ("launcher.folder", Path(sweep.launcher.folder) / sweep.name),
    ]
    folders += [("out_dir", Path(o)) for o in sorted({r.out_dir for r in runs})]
    for field_name, d in folders:
        try:
            st = d.stat()
        except FileNotFoundError:
            continue
        if st.st_uid != me:
            raise ConfigError(
                f"{field_name}: {d} belongs to another user (uid {st.st_uid}); anyone who owns it "
                f"can replace what your jobs load. Use a folder of your own"
            )
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:  # sticky, like /tmp: ok
            raise ConfigError(
                f"{field_name}: {d} is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'} "
                f"(mode {stat.S_IMODE(st.st_mode):o}); anyone who can write there can replace what "
                f"your jobs load. Run `chmod go-w {d}` or use a private folder"
            )


def _scontrol(what: str) -> list[dict[str, str]]:
    """`scontrol show <what> -o`, one dict per line (key=value fields)."""
    out = subprocess.run(["scontrol", "show", what, "-o"], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip() or f"scontrol show {what} failed")
    rows = []
    for line in out.stdout.splitlines():
        row: dict[str, str] = {}
        for tok in line.split():
            k, eq, v = tok.partition("=")
            if eq:
                row[k] = v
        if row:
            rows.append(row)
    return rows


def slurm_minutes(v: str) -> Optional[float]:
    """SLURM's time format ([D-]HH:MM:SS, MM:SS, MM, UNLIMITED) in minutes; None = no limit."""
    if v in ("UNLIMITED", "INFINITE", "NONE", ""):
        return None
    days, _, rest = v.rpartition("-")
    parts = [float(x) for x in rest.split(":")]
    if len(parts) == 3:
        h, m, sec = parts
    elif len(parts) == 2:
        h, (m, sec) = 0.0, parts
    else:
        h, m, sec = 0.0, parts[0], 0.0
    return (float(days) if days else 0.0) * 1440 + h * 60 + m + sec / 60


def check_cluster(sweep: SweepConfig, runs: list[RunConfig]) -> None:
    """Refuse, before the experiment is created or anything is submitted, SLURM requests the
    cluster can never satisfy (they would wait in the queue forever, or fail inside sbatch):
    an unknown partition, time_min above the partition's MaxTime, more CPUs, memory or GPUs
    per node, or more nodes, than the partition has. Each refusal names the field."""
    S = sweep.launcher.slurm
    try:
        parts = {p["PartitionName"]: p for p in _scontrol("partition")}
        nodes = _scontrol("node")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        print(f"[hfbench] WARNING: could not read the cluster's partitions ({e}); requests not checked", flush=True)
        return
    if S.partition:
        name = S.partition
        if name not in parts:
            raise ConfigError(
                f"launcher.slurm.partition: {name!r} is not a partition of this cluster "
                f"(partitions: {', '.join(sorted(parts)) or 'none'})"
            )
    else:
        name = next((n for n, p in parts.items() if p.get("Default") == "YES"), "")
        if not name:
            raise ConfigError(
                "launcher.slurm.partition is not set and the cluster has no default partition "
                f"(partitions: {', '.join(sorted(parts)) or 'none'})"
            )
    part = parts[name]
    limit = slurm_minutes(part.get("MaxTime", "UNLIMITED"))
    if limit is not None and S.time_min > limit:
        raise ConfigError(
            f"launcher.slurm.time_min ({S.time_min}) is above partition {name!r}'s time limit "
            f"({limit:g} min); the jobs would wait forever"
        )
    members = [n for n in nodes if name in n.get("Partitions", "").split(",")]
    if not members:
        raise ConfigError(f"launcher.slurm.partition: {name!r} has no nodes")

    def gpus(n: dict) -> int:
        import re

        return sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,(]+)?:(\d+)", n.get("Gres", "")))

    max_cpu = max(int(n.get("CPUTot", 0)) for n in members)
    max_mem = max(int(n.get("RealMemory", 0)) for n in members)  # MB
    max_gpu = max(gpus(n) for n in members)
    if S.mem_gb and S.mem_gb * 1024 > max_mem:
        raise ConfigError(
            f"launcher.slurm.mem_gb ({S.mem_gb:g}) is more than any node of partition {name!r} has "
            f"({max_mem / 1024:g} GB)"
        )
    if S.gpus_per_node > max_gpu:
        raise ConfigError(
            f"launcher.slurm.gpus_per_node ({S.gpus_per_node}) is more than any node of partition "
            f"{name!r} has ({max_gpu})"
        )
    for r in runs:
        cpus = max(r.engine.threads_per_rank, S.cpus_per_task) * r.engine.world_size
        if cpus > max_cpu:
            raise ConfigError(
                f"run {r.run_name()}: launcher.slurm.cpus_per_task x engine.world_size "
                f"({max(r.engine.threads_per_rank, S.cpus_per_task)} x {r.engine.world_size} = {cpus} "
                f"CPUs) is more than any node of partition {name!r} has ({max_cpu})"
            )
        if r.engine.nodes > len(members):
            raise ConfigError(
                f"run {r.run_name()}: engine.nodes ({r.engine.nodes}) is more than partition "
                f"{name!r} has ({len(members)})"
            )
    usable = [n for n in members if not any(s in n.get("State", "") for s in ("DOWN", "DRAIN", "FAIL"))]
    if not usable:
        print(
            f"[hfbench] WARNING: every node of partition {name!r} is down or drained "
            f"({'; '.join(n['NodeName'] + ': ' + n.get('State', '?') for n in members)}); the jobs will wait",
            flush=True,
        )


def ensure_data(runs: list[RunConfig], build: bool = True, say=print) -> None:
    """Build the missing data files the suite knows how to make, or stop naming the command."""
    done: set[tuple[str, str]] = set()
    for r in runs:
        key = (r.dataset, r.data_dir)
        if key in done:
            continue
        done.add(key)
        spec = datasets.get(r.dataset)
        for p in spec.paths(r.data_dir).values():  # a folder (or socket, ...) under a data file's name
            if p.exists() and not p.is_file():
                from suite.data import DataError

                raise DataError(
                    f"{p}: expected a .beton data file, found a {'folder' if p.is_dir() else 'non-file'}; "
                    f"move it away (the sweep would write the file there)"
                )
        missing = spec.missing(r.data_dir)
        if not missing:
            spec.validate(r.data_dir)  # before anything is submitted
            continue
        if build and spec.build is not None:
            say(f"[hfbench] building {r.dataset} files in {r.data_dir} (missing: {', '.join(p.name for p in missing)})")
            spec.build(Path(r.data_dir))
        else:
            raise FileNotFoundError(
                f"dataset {r.dataset}: missing {', '.join(map(str, missing))}; make them with: "
                + spec.make_command.format(data_dir=r.data_dir)
            )


# torch.distributed rendezvous variables. Jobs inherit the submitter's environment (sbatch
# --export=ALL, submitit's local processes): a sweep started inside a torchrun job, or from a
# process that trained in-process, would hand every task the same RANK/WORLD_SIZE/MASTER_PORT,
# so each would skip its own rendezvous and array tasks on one node would collide on the port.
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


def describe(sweep, runs) -> str:
    """The experiment's note in MLflow: what the sweep compares, under which protocol."""
    g = sweep.grid
    models = sorted({r.model for r in runs})
    data = sorted({r.dataset for r in runs})
    return (
        f"hfbench sweep `{sweep.name}`: {', '.join(g.methods)} on {', '.join(data)} / {', '.join(models)} at "
        f"{', '.join(f'{100 * s:g} %' for s in g.sparsities)} sparsity, seeds {', '.join(map(str, g.seeds))}; "
        f"{len(runs)} runs. Each run's config is its `config.yaml` artifact; `hfbench report` turns this "
        f"experiment into tables and plots."
    )


class _Progress:
    """A tqdm bar on a terminal; on a log file, one plain status line every 30 s."""

    def __init__(self, total: int, desc: str, done: int = 0, t0: float | None = None):
        """`total` runs of the whole sweep, `done` of them settled in earlier stages, since `t0`."""
        self.tty = sys.stderr.isatty()
        self.total, self.n, self.desc, self.last = total, done, desc, 0.0
        self.t0 = t0 if t0 is not None else time.time()
        self.n0 = done
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=desc, unit="run", file=sys.stderr, dynamic_ncols=True)

    def timing(self) -> str:
        """'elapsed 12m 05s, ETA ~31m' (the ETA from the mean time per settled run so far)."""
        el = time.time() - self.t0
        txt = f"elapsed {_dur(el)}"
        if self.n > 0 and self.n < self.total:
            txt += f", ETA ~{_dur(el / self.n * (self.total - self.n))}"
        return txt

    def write(self, msg: str) -> None:
        if self.tty:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def update(self, k: int) -> None:
        self.n += k
        if self.tty:
            self.bar.update(k)

    def status(self, text: str) -> None:
        if self.tty:
            self.bar.set_postfix_str(text)
        elif time.time() - self.last > 30:
            self.last = time.time()
            print(
                f"[hfbench] {self.desc}: {self.n}/{self.total} done ({self.timing()}); {text}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.tty:
            self.bar.close()


def _dur(s: float) -> str:
    s = int(round(s))
    h, m, sec = s // 3600, (s % 3600) // 60, s % 60
    return f"{h}h {m:02d}m" if h else f"{m}m {sec:02d}s" if m else f"{sec}s"


_REASONS: dict[str, tuple[float, str]] = {}  # job id -> (when asked, "pending: <reason>")


def _queued_reason(job_id: str) -> str:
    """SLURM's reason for a queued job (asked at most every 30 s per job)."""
    t, reason = _REASONS.get(job_id, (0.0, ""))
    if time.time() - t > 30:
        from launchers.status import _pending_reason

        reason = _pending_reason(job_id)
        _REASONS[job_id] = (time.time(), reason)
    return reason


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


def _progress(running) -> str:
    """'hyperflux-0.9 e7/20, gmp-0.5 e3/20' from the last epoch line of each running job's log."""
    import re

    parts = []
    for r, job in running[:4]:
        ep = "starting"
        try:
            text = Path(job.paths.stdout).read_text(errors="replace")[-4000:]
            found = re.findall(r" epoch (\d+/\d+) ", text)
            if found:
                ep = "e" + found[-1]
        except (OSError, AttributeError):
            pass
        if ep == "starting" and type(job).__name__ == "SlurmJob":
            ep = _queued_reason(str(job.job_id)) or ep
        label = r.run_name().removeprefix(f"{r.model}-").removesuffix(f"-s{r.seed}")
        parts.append(f"{label} {ep}")
    return "running: " + (", ".join(parts) if parts else "-") + (" ..." if len(running) > 4 else "")


def launch_costs(outcomes: list[Outcome], t0: float) -> str:
    """What launching cost this sweep, from the tasks' startup timelines (suite.engine):
    `hfbench sweep` start -> first training step of the first task, and the median fixed cost
    per task with its parts."""
    # only runs this sweep trained: a run reused from an earlier training (another sweep's claim,
    # a folder already done) carries that training's timeline, from before this sweep began
    res = [
        o.result
        for o in outcomes
        if o.state == "finished"
        and "startup_total_s" in o.result
        and not o.result.get("reused")
        and not o.result.get("reused_from")
    ]
    if not res:
        return ""
    import statistics

    first = min(r["first_step_unix"] for r in res) - t0
    med = {k: statistics.median(r[k] for r in res if k in r) for k in res[0] if k.startswith("startup_")}
    parts = ", ".join(
        f"{k.removeprefix('startup_').removesuffix('_s')} {v:.1f}" for k, v in med.items() if k != "startup_total_s"
    )
    return (
        f"[hfbench] launch cost: first training step {first:.1f} s after the sweep started; per task "
        f"(median of {len(res)}, last segment) {med['startup_total_s']:.1f} s from process start to "
        f"the end of the first step ({parts} s)"
    )


def summary_table(outcomes: list[Outcome]) -> str:
    head = f"{'run':<36} {'hash':<12} {'state':<8} {'target':>7} {'achieved':>8} {'test top-1':>10}"
    lines = [head, "-" * len(head)]
    for o in outcomes:
        r = o.result
        ach = f"{100 * r['final_sparsity']:.2f}%" if "final_sparsity" in r else "-"
        acc = f"{100 * r['final_test_top1']:.2f}%" if "final_test_top1" in r else "-"
        line = f"{o.cfg.run_name():<36} {o.cfg.run_hash():<12} {o.state:<8} {100 * o.cfg.sparsity:>6.1f}% {ach:>8} {acc:>10}"
        if o.error:
            line += f"  {o.error}"
        lines.append(line)
    n_f = sum(o.state == "failed" for o in outcomes)
    lines.append(
        f"{len(outcomes)} runs: {sum(o.state == 'finished' for o in outcomes)} finished, "
        f"{sum(o.state == 'skipped' for o in outcomes)} skipped (already done), {n_f} failed"
    )
    return "\n".join(lines)
