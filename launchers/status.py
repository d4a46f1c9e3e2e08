"""`hfbench status`: where every run of a sweep stands, from MLflow (state, epoch, metrics,
error) and SLURM accounting (queued, requeued n times), for the runs the sweep config defines."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from typing import Optional

from launchers.sweep import jobs_file
from reports import records
from suite import tracking
from suite.run_schema import internal_key
from suite.sweeps import SweepConfig


@dataclass
class RunStatus:
    run: str
    hash: str
    state: str  # finished | running | requeued | failed | queued | not submitted
    progress: str = ""
    test_top1: Optional[float] = None
    sparsity: Optional[float] = None
    requeues: int = 0
    job: str = ""
    error: str = ""


def _last_jobs(sweep: SweepConfig) -> dict[str, dict]:
    path = jobs_file(sweep)
    out: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            out[rec["hash"]] = rec
    return out


def _sacct(job: str) -> tuple[str, int]:
    """(current SLURM state, number of requeues) of one job or array task; ('', 0) if unknown."""
    if not job or shutil.which("sacct") is None:
        return "", 0
    try:
        out = subprocess.run(
            ["sacct", "-D", "-X", "-n", "-P", "-o", "JobID,State", "-j", job],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "", 0
    states = [ln.split("|")[1].split()[0] for ln in out.splitlines() if "|" in ln]
    if not states:
        return "", 0
    requeues = sum(s in ("REQUEUED", "PREEMPTED", "NODE_FAIL") for s in states)
    requeues = max(requeues, len(states) - 1)
    return states[-1], requeues


# final SLURM states of a task that ended without finishing its run
ENDED = ("CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "FAILED", "BOOT_FAIL", "DEADLINE")


def _pending_reason(job: str) -> str:
    """Why SLURM keeps a job waiting (squeue's reason, e.g. Resources, Priority,
    ReqNodeNotAvail) and, for a drained or down node, that node's state and reason."""
    if not job or shutil.which("squeue") is None:
        return ""
    try:
        out = (
            subprocess.run(["squeue", "-h", "-j", job, "-o", "%T|%r"], capture_output=True, text=True, timeout=30)
            .stdout.strip()
            .splitlines()
        )
        if not out or not out[0].startswith("PENDING"):
            return ""
        reason = out[0].split("|", 1)[1]
        nodes = (
            subprocess.run(["sinfo", "-h", "-R", "-o", "%N: %T (%E)"], capture_output=True, text=True, timeout=30)
            .stdout.strip()
            .replace("\n", "; ")
        )
        return f"pending: {reason}" + (f"; nodes {nodes}" if nodes else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def sweep_status(sweep: SweepConfig, uri: Optional[str] = None) -> list[RunStatus]:
    uri = uri or sweep.tracking_uri or tracking.default_uri()
    # a sqlite store that does not exist yet holds no run: every run is "not submitted", and no
    # empty store is created where the command was typed
    c = tracking.client(uri) if tracking.store_exists(uri) else None
    exp = c.get_experiment_by_name(sweep.experiment_name()) if c is not None else None
    by_hash = tracking.runs_by_hash(uri, exp.experiment_id) if exp else {}
    jobs = _last_jobs(sweep)
    rows = []
    for cfg in sweep.expand():
        h = cfg.run_hash()
        runs = by_hash.get(h, [])
        rec = jobs.get(h, {})
        job = rec.get("job_id", "") if rec.get("executor") == "slurm" else ""
        st = RunStatus(cfg.run_name(), h, "not submitted", job=job)
        slurm_state, st.requeues = _sacct(job)
        fin = [r for r in runs if r.info.status == "FINISHED"]
        latest = fin[0] if fin else (runs[0] if runs else None)
        if latest is not None:
            m = {internal_key(k): v for k, v in latest.data.metrics.items()}  # short names (suite/run_schema.py)
            st.test_top1 = m.get("final_test_top1", m.get("test_top1"))
            st.sparsity = m.get("final_sparsity", m.get("sparsity"))
            st.job = latest.data.tags.get("hfbench.slurm_job", job)
            if latest.info.status == "FINISHED":
                st.state, st.progress = "finished", f"{cfg.epochs}/{cfg.epochs}"
            else:
                hist = records.history(c, latest.info.run_id, "density")
                st.progress = f"{max((step for step, _ in hist), default=0)}/{cfg.epochs}"
                if latest.info.status in ("FAILED", "KILLED"):
                    st.state = "cancelled" if latest.info.status == "KILLED" else "failed"
                    err = (latest.data.tags.get("hfbench.error") or "").strip()
                    st.error = err.splitlines()[0][:200] if err else ""
                elif slurm_state in ENDED:  # the task is gone, its MLflow run was never ended
                    st.state, st.error = slurm_state.lower(), f"SLURM {slurm_state}; the MLflow run was left RUNNING"
                elif slurm_state in ("PENDING", "REQUEUED") or (st.requeues and slurm_state != "RUNNING"):
                    st.state = "requeued"
                    st.error = _pending_reason(job)
                else:
                    st.state = "running"
        elif rec:
            st.state = "queued" if slurm_state in ("", "PENDING", "RUNNING", "REQUEUED") else slurm_state.lower()
            if st.state == "queued":
                st.error = _pending_reason(job)
        rows.append(st)
    return rows


def format_table(rows: list[RunStatus]) -> str:
    head = (
        f"{'run':<34} {'hash':<12} {'state':<13} {'epoch':>7} {'test':>7} {'sparsity':>8} {'requeued':>8}  job / error"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        acc = f"{100 * r.test_top1:.2f}%" if r.test_top1 is not None else "-"
        sp = f"{100 * r.sparsity:.2f}%" if r.sparsity is not None else "-"
        lines.append(
            f"{r.run:<34} {r.hash:<12} {r.state:<13} {r.progress or '-':>7} {acc:>7} {sp:>8} "
            f"{r.requeues:>8}  {r.error or r.job}"
        )
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    lines.append(", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return "\n".join(lines)
