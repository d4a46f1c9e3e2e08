"""What a sweep checks before it creates the experiment or submits anything: the executor
(SLURM when a cluster answers), the data and weights files, the resources each run asks for
against the machine or the cluster's partitions, private folders; and the data it can build."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from suite import datasets
from suite.config import ConfigError, RunConfig
from suite.sweeps import SweepConfig


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
