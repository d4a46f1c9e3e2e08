"""What a run reports about itself besides accuracy and sparsity: its startup costs, the
settings its first step really ran with, the optimiser state each rank holds, and the
training budget it used (its own and counting the run it starts from)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from suite.config import RunConfig


def observed_settings(model: nn.Module, logits: torch.Tensor) -> dict[str, str]:
    """What the first training step really ran with, read off its tensors (not the config): the
    forward's compute dtype (bf16/fp16 autocast shows in the logits) and the memory format of the
    convolution weights. A precision or channels_last flag that did not take effect shows here."""
    convs = [p for p in model.parameters() if p.dim() == 4]
    return {
        "observed.compute_dtype": str(logits.dtype).replace("torch.", ""),
        # a weight with one input channel or a 1x1 kernel is in both formats at once
        "observed.channels_last": str(
            all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
            and any(not p.is_contiguous() for p in convs)
        ),
    }


def optimizer_state_numel(opt: Any) -> int:
    """Elements of optimiser state (momentum, Adam moments) this rank holds: all of it without
    ZeRO, about 1/world of it with ZeRO stage 1 or 2, which partitions that state over the ranks
    (DeepSpeed's ZeRO optimiser wraps the client optimiser as `.optimizer`)."""
    base = getattr(opt, "optimizer", opt)
    parts = [o for o in (getattr(base, "sgd", None), getattr(base, "adam", None)) if o is not None] or [base]
    return sum(
        int(t.numel())
        for o in parts
        for st in o.state.values()
        for t in st.values()
        if torch.is_tensor(t) and t.dim() > 0
    )


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
    names = [
        "startup_import_s",
        "startup_dist_s",
        "startup_mlflow_s",
        "startup_data_s",
        "startup_model_s",
        "startup_first_step_s",
    ]
    out = {n: marks[b] - marks[a] for n, a, b in zip(names, order, order[1:]) if a in marks and b in marks}
    out["startup_total_s"] = marks["first_step"] - marks["process"]
    return out


BUDGET_KEYS = ("steps", "images", "epochs", "device_s")


def budget(cfg: RunConfig, steps: int, world: int, n_train: int, train_time: float, say=print) -> dict[str, float]:
    """What this run cost and what it cost in all, counting the run it starts from.

    Own: optimiser steps, training images seen (steps x batch x ranks), dense-equivalent epochs
    (images / training-set size) and device-seconds (training time x ranks, evaluation excluded).
    Total: own plus the parent's total, read from the parent's done.json (written when it
    finished) for `init: dense`. A pretrained weights file, or a parent whose record is missing,
    adds nothing it can count: budget_parent_counted is 0 then (1 when counted, or no parent)."""
    images = float(steps * cfg.batch_size * world)
    own = {
        "steps": float(steps),
        "images": images,
        "epochs": images / max(n_train, 1),
        "device_s": float(train_time * world),
    }
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
            say(
                f"[hfbench] {cfg.run_name()}: no budget record of the dense run it starts from ({rec}); "
                f"its total budget counts this run only"
            )
    out = {f"budget_{k}": v for k, v in own.items()}
    out.update({f"budget_total_{k}": v + parent.get(k, 0.0) for k, v in own.items()})
    out["budget_parent_counted"] = counted
    return out
