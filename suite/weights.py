"""Starting weights: a dense run's final weights (init 'dense'), or a pretrained file on
local disk (init 'pretrained'); both loaded without executing code."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from suite.config import RunConfig


def load_start(model: nn.Module, cfg: RunConfig, say=print) -> None:
    """Load the starting weights `cfg.init` asks for into `model` (nothing for 'scratch')."""
    if cfg.init == "dense":
        if not cfg.init_checkpoint:
            raise ValueError("init is 'dense' but no init_checkpoint was resolved (run it through a sweep)")
        model.load_state_dict(load_weights(cfg.init_checkpoint))
    elif cfg.init == "pretrained":
        load_pretrained(model, cfg.pretrained, say=say)


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
        raise ValueError(
            f"pretrained weights {path}: unreadable as torch weights ({type(e).__name__}: {first})"
        ) from None
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
        say(
            f"[hfbench] pretrained {Path(path).name}: classifier {head[0]} has another shape "
            f"({tuple(sd[shape_diff[0]].shape)} vs {tuple(own[shape_diff[0]].shape)}); it starts fresh"
        )
        for k in shape_diff:
            sd[k] = own[k]
        shape_diff = []
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected or shape_diff:

        def few(keys):
            return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")

        parts = [
            f"{what}: {few(keys)}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", shape_diff))
            if keys
        ]
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
        raise ValueError(
            f"starting weights {p} are unreadable ({type(e).__name__}: {str(e)[:200]}); "
            f"delete the file (or its run folder) to train them again"
        ) from None
    return obj.get("model", obj) if isinstance(obj, dict) and "model" in obj else obj
