"""What one training run looks like in MLflow: the names written by the engine and read back by
the reports, the status command and the tests.

  tags     identity: hfbench.run_hash, hfbench.method, hfbench.variant (the report's label),
           hfbench.model, hfbench.dataset, hfbench.sweep, hfbench.error (failures only),
           mlflow.parentRunId (the sweep's parent run), mlflow.source.git.commit;
           environment: env.python, env.torch, env.hardware, env.git_commit ... (see `environment`)
  params   the flattened resolved config (dotted keys; ``sparsity`` is the TARGET), config_hash,
           the prunable set (prunable_*), steps_per_epoch, observed.* (what the first step ran)
  metrics  grouped by prefix, so that MLflow's UI shows one section per group:
             train/    loss, lr, gate_lr, img_per_s, epoch_time_s (+ grad_scale, skipped_steps)
             eval/     val_top1, test_top1
             prune/    achieved_density, achieved_sparsity (the suite's ruler), pruned, regrown
             method/   what the pruner reports (Hyperflux: gamma, target_density, ...)
             flux/     diagnostics on the epoch's last batch
             startup/  start-up costs of each segment
             final/    test_top1, val_top1, achieved_sparsity, train_time_s, wall_time_s at the
                       last step; budget/ the training budget spent
  inputs   the dataset (name, source folder, sizes), context "train"
  files    config.yaml, layer_density.csv, layer_density_epochs.csv

Inside the code a metric keeps its short name (``train_loss``, ``density``, ``final_sparsity``);
`mlflow_key` gives the logged name and `internal_key` reads it back. A store written before the
groups existed has the short names, which `internal_key` returns unchanged, so old experiments
still read.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# short name -> logged name, where the rules in mlflow_key would not give it
_EXPLICIT = {
    "train_loss": "train/loss",
    "density": "prune/achieved_density",
    "sparsity": "prune/achieved_sparsity",
    "final_density": "final/achieved_density",
    "final_sparsity": "final/achieved_sparsity",
    "train_time_s": "final/train_time_s",
    "wall_time_s": "final/wall_time_s",
    "probe_time_s": "flux/probe_time_s",
}
_GROUP_OF = {
    **dict.fromkeys(("lr", "gate_lr", "img_per_s", "epoch_time_s", "grad_scale", "skipped_steps"), "train"),
    **dict.fromkeys(("val_top1", "test_top1", "test_top5"), "eval"),
    **dict.fromkeys(("pruned", "regrown", "pruned_total", "regrown_total"), "prune"),
}
# short-name prefixes that become a group: (short prefix, group, kept in the logged name)
_PREFIXES = (
    ("final_", "final", ""),
    ("startup_", "startup", ""),
    ("budget_", "budget", ""),
    ("flux_", "flux", ""),
    ("npl_", "flux", "npl_"),
)
_INVERSE = {v: k for k, v in _EXPLICIT.items()}
GROUPS = ("train", "eval", "prune", "method", "flux", "startup", "final", "budget")


def mlflow_key(name: str) -> str:
    """The name a metric is logged under: its group, a slash, its name in the group."""
    if name in _EXPLICIT:
        return _EXPLICIT[name]
    if name in _GROUP_OF:
        return f"{_GROUP_OF[name]}/{name}"
    for short, group, keep in _PREFIXES:
        if name.startswith(short) and len(name) > len(short):
            return f"{group}/{keep}{name[len(short) :]}"
    return f"method/{name}"  # anything else is the pruner's own


def internal_key(key: str) -> str:
    """The short name of a logged metric (a name without a group is already short)."""
    if key in _INVERSE:
        return _INVERSE[key]
    group, sep, rest = key.partition("/")
    if not sep or group not in GROUPS:
        return key
    if group == "flux":
        return rest if rest.startswith("npl_") else "flux_" + rest
    if group in ("final", "startup", "budget"):
        return f"{group}_{rest}"
    return rest


def environment(world_size: int, device: str) -> dict[str, str]:
    """The run's environment, logged as tags (env.*): versions, hardware, commit, SLURM job."""
    import importlib.metadata as md

    from suite.tracking import git_commit

    env = {
        "env.python": platform.python_version(),
        "env.platform": platform.platform(),
        "env.git_commit": git_commit(),
        "env.world_size": str(world_size),
        "env.device": device,
        "env.cpu_count": str(os.cpu_count()),
    }
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
    job = os.environ.get("SLURM_JOB_ID", "")
    if job:  # an empty tag would only be noise in the UI
        env["env.slurm_job_id"] = job
    return env


def _samples(path: Path) -> int | None:
    """The sample count in an FFCV file's header (None when it cannot be read)."""
    try:
        import numpy as np
        from ffcv.types import HeaderType

        return int(np.fromfile(path, dtype=HeaderType, count=1)[0]["num_samples"])
    except Exception:
        return None


def dataset_input(name: str, paths: dict[str, Path]) -> dict:
    """The run's dataset as MLflow's inputs show it: its name, the folder of its files, a digest
    of their names, sizes and modification times (changes when a file is rewritten), and a
    profile with each split's file, bytes and samples. A JSON-able record for the spool."""
    import hashlib
    import json

    splits, h = {}, hashlib.sha256()
    for split, p in sorted(paths.items()):
        p = Path(p).resolve()
        try:
            st = p.stat()
            size, mtime = st.st_size, int(st.st_mtime)
        except OSError:
            size, mtime = -1, 0
        h.update(f"{split}:{p.name}:{size}:{mtime};".encode())
        splits[split] = {"file": p.name, "bytes": size, "samples": _samples(p)}
    folders = sorted({str(Path(p).resolve().parent) for p in paths.values()})
    return {
        "name": name,
        "digest": h.hexdigest()[:16],
        "source_type": "local",
        "source": json.dumps({"uri": folders[0] if len(folders) == 1 else folders}),  # one folder, as a rule
        "profile": json.dumps(splits),
        "context": "train",
    }
