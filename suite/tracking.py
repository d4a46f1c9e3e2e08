"""MLflow tracking: experiments created once (by the launcher), runs identified by their
config hash, params/metrics/artifacts logged by rank 0 only.

Run schema (what reports/ reads):
  tags     hfbench.run_hash, hfbench.method, hfbench.variant (the report's label), hfbench.model, hfbench.dataset, hfbench.sweep,
           hfbench.error (failures only)
  params   the flattened resolved config (dotted keys), config_hash, env.* (versions, hardware)
  metrics  per epoch (step = epoch): train_loss, val_top1, test_top1, density, sparsity, lr,
           gate_lr, epoch_time_s, and method metrics (hyperflux: gamma, target_density, pressure_g);
           once at the end: final_* and wall_time_s
  files    config.yaml, layer_density.csv
"""
from __future__ import annotations

import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional

TAG_HASH = "hfbench.run_hash"


def default_uri() -> str:
    """HFBENCH_MLFLOW_URI, else MLFLOW_TRACKING_URI, else a sqlite file in the working dir."""
    return os.environ.get("HFBENCH_MLFLOW_URI") or os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def ensure_experiment(uri: str, name: str) -> str:
    """Create the experiment if needed (call once, before any job starts); return its id."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name)
        except Exception:  # created meanwhile by someone else
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        raise RuntimeError(f"MLflow experiment {name!r} exists but is deleted; restore it or pick another name")
    return exp.experiment_id


def runs_by_hash(uri: str, experiment_id: str) -> dict[str, list]:
    """run hash -> MLflow runs carrying that hash, newest first."""
    c = client(uri)
    out: dict[str, list] = {}
    token = None
    while True:
        page = c.search_runs([experiment_id], max_results=5000, page_token=token, order_by=["attributes.start_time DESC"])
        for r in page:
            h = r.data.tags.get(TAG_HASH)
            if h:
                out.setdefault(h, []).append(r)
        token = page.token
        if not token:
            break
    return out


def finished_hashes(uri: str, experiment_id: str) -> set[str]:
    return {h for h, runs in runs_by_hash(uri, experiment_id).items()
            if any(r.info.status == "FINISHED" for r in runs)}


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(world_size: int, device: str) -> dict[str, str]:
    import importlib.metadata as md

    env = {"env.python": platform.python_version(), "env.platform": platform.platform(),
           "env.git_commit": git_commit(), "env.world_size": str(world_size), "env.device": device,
           "env.cpu_count": str(os.cpu_count())}
    for pkg in ("torch", "torchvision", "timm", "deepspeed", "ffcv", "mlflow", "submitit", "numpy"):
        try:
            env[f"env.{pkg}"] = md.version(pkg)
        except md.PackageNotFoundError:
            env[f"env.{pkg}"] = "absent"
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    hw = f"{os.cpu_count()} x {cpu}"
    if device == "cuda":
        import torch

        hw += f"; {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    env["env.hardware"] = hw
    env["env.slurm_job_id"] = os.environ.get("SLURM_JOB_ID", "")
    return env


class RunLogger:
    """Logs one training run. Only rank 0 makes one; other ranks get a NullLogger."""

    def __init__(self, uri: str, experiment_id: str, cfg, run_id: Optional[str] = None):
        from mlflow.entities import Param, RunTag

        self.c = client(uri)
        self.cfg = cfg
        if run_id is None:
            tags = {TAG_HASH: cfg.run_hash(), "hfbench.method": cfg.method, "hfbench.variant": cfg.variant(),
                    "hfbench.model": cfg.model,
                    "hfbench.dataset": cfg.dataset, "hfbench.sweep": cfg.sweep, "mlflow.runName": cfg.run_name()}
            run = self.c.create_run(experiment_id, tags=tags, run_name=cfg.run_name())
            run_id = run.info.run_id
            self._params = {**cfg.flat_params(), "config_hash": cfg.run_hash()}
        else:
            self._params = {}
        self.run_id = run_id
        self._Param, self._RunTag = Param, RunTag

    def log_params(self, extra: dict[str, Any]) -> None:
        params = {**self._params, **{k: str(v) for k, v in extra.items()}}
        items = [self._Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.c.log_batch(self.run_id, params=items[i:i + 100])
        self._params = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric
        import time

        ts = int(time.time() * 1000)
        self.c.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def log_text(self, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_text(text)
            self.c.log_artifact(self.run_id, str(p))

    def set_tag(self, key: str, value: str) -> None:
        self.c.set_tag(self.run_id, key, value[:5000])

    def finish(self, status: str = "FINISHED", error: Optional[str] = None) -> None:
        if error:
            self.set_tag("hfbench.error", error)
        self.c.set_terminated(self.run_id, status=status)


class NullLogger:
    run_id = None

    def log_params(self, *a, **k): pass
    def log_metrics(self, *a, **k): pass
    def log_text(self, *a, **k): pass
    def set_tag(self, *a, **k): pass
    def finish(self, *a, **k): pass


def redact(uri: str) -> str:
    """The URI without a password, for printing."""
    import re

    return re.sub(r"//([^:/@]+):[^@/]+@", r"//\1:***@", uri)
