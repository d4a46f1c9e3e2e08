"""The data benchmark (`hfbench bench data`): a class-folder JPEG tree (generated unless given),
written to a .beton, then alternate passes of an FFCV Loader and a torchvision ImageFolder +
DataLoader with the same augmentation, batch size and worker count; images/s per pass, medians
and their ratio (see suite/bench.py for the overhead benchmark)."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from suite.bench import _say, interleave, quartiles


# ----------------------------------------------------------------------------- data
def make_jpeg_tree(
    root: str | os.PathLike,
    classes: int = 10,
    per_class: int = 50,
    seed: int = 0,
    min_side: int = 160,
    max_side: int = 400,
) -> Path:
    """An ImageNet-style tree root/<class>/<n>.JPEG of smooth random images of varied sizes."""
    import numpy as np
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"n{c:08d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
            small = Image.fromarray(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8))
            img = np.asarray(small.resize((w, h), Image.BICUBIC)).astype(np.int16)
            img = np.clip(img + rng.integers(-12, 13, size=img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{c}_{i}.JPEG", quality=90)
    return root


def write_beton(tree: str | os.PathLike, path: str | os.PathLike, workers: int = 2, timeout: float = 1800.0) -> Path:
    """Write the tree to an FFCV .beton (JPEG q90 image field, no resizing, int label) with the
    one imagefolder writer (suite.images, in a child process); returns the file written:
    ``<stem>_train.beton`` next to ``path``."""
    from suite.images import write_imagefolder

    path = Path(path)
    return write_imagefolder(
        path.parent, tree, name=path.stem, max_side=None, quality=90, workers=workers, progress=False, timeout=timeout
    )["train"]


def ffcv_loader(beton: str | os.PathLike, size: int, batch: int, workers: int, seed: int = 0):
    """FFCV loader (suite.images, imagenet recipe): random resized crop + flip, float in [0, 1]
    (NCHW), int64 labels."""
    from suite.images import make_image_loader

    return make_image_loader(
        beton,
        batch,
        train=True,
        seed=seed,
        num_workers=workers,
        drop_last=False,
        recipe="imagenet",
        crop_size=size,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    )


def torchvision_loader(tree: str | os.PathLike, size: int, batch: int, workers: int, seed: int = 0):
    """ImageFolder + DataLoader with the same augmentation as ffcv_loader."""
    import torch
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(
        str(tree), transform=T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor()])
    )
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        drop_last=False,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


def one_pass(loader) -> tuple[int, list[int], float]:
    """(images, labels, seconds) of one full pass; the iterator is always consumed to its end."""
    import torch

    from suite.data import _keep_torch_threads

    n, labels = 0, []
    t0 = time.perf_counter()
    with _keep_torch_threads():
        for x, y in loader:
            n += int(x.shape[0])
            labels += torch.as_tensor(y).reshape(-1).tolist()
    return n, labels, time.perf_counter() - t0


def run_data(
    root: Optional[str] = None,
    size: int = 224,
    batch: int = 64,
    workers: int = 2,
    passes: int = 5,
    classes: int = 10,
    per_class: int = 50,
    work_dir: Optional[str] = None,
    say: Callable[..., None] = _say,
) -> dict[str, Any]:
    import torch

    keep = tempfile.mkdtemp(prefix="hfbench-bench-data-") if work_dir is None else work_dir
    Path(keep).mkdir(parents=True, exist_ok=True)
    tree = Path(root) if root else Path(keep) / "tree"
    if not root:
        say(f"[bench] data: generating {classes} classes x {per_class} JPEGs under {tree}")
        make_jpeg_tree(tree, classes, per_class)
    n_files = sum(1 for p in tree.rglob("*") if p.is_file())
    t0 = time.time()
    beton = write_beton(tree, Path(keep) / "tree.beton", workers)
    write_s = time.time() - t0
    say(f"[bench] data: {n_files} files -> {beton} ({beton.stat().st_size / 2**20:.1f} MB, {write_s:.1f}s)")
    threads = torch.get_num_threads()
    loaders = {
        "ffcv": ffcv_loader(beton, size, batch, workers),
        "torchvision": torchvision_loader(tree, size, batch, workers),
    }
    counts: dict[str, int] = {}
    label_sets: dict[str, list[int]] = {}
    for name, ld in loaders.items():  # warmup: FFCV's numba compilation, DataLoader's worker start
        n, labels, s = one_pass(ld)
        counts[name], label_sets[name] = n, sorted(labels)
        say(f"[bench] data warmup {name}: {n} images in {s:.2f}s")
    rates: dict[str, list[float]] = {"ffcv": [], "torchvision": []}
    trace = []
    for i, name in enumerate(interleave("ffcv", "torchvision", passes)):
        n, _, s = one_pass(loaders[name])
        trace.append(name)
        rates[name].append(n / s)
        say(f"[bench] data pass {i // 2 + 1}/{passes} {name}: {n / s:.1f} img/s")
    ratios = [f / t for f, t in zip(rates["ffcv"], rates["torchvision"])]
    q1, med, q3 = quartiles(ratios)
    rows = [
        {
            "loader": k,
            "img_s": statistics.median(v),
            "img_s_q1": quartiles(v)[0],
            "img_s_q3": quartiles(v)[2],
            "images": counts[k],
        }
        for k, v in rates.items()
    ]
    params = {
        "root": str(tree),
        "generated": not root,
        "files": n_files,
        "size": size,
        "batch": batch,
        "workers": workers,
        "passes": passes,
        "threads": threads,
        "beton_mb": beton.stat().st_size / 2**20,
        "write_s": write_s,
    }
    return {
        "params": params,
        "rows": rows,
        "ratio": med,
        "ratio_q1": q1,
        "ratio_q3": q3,
        "trace": trace,
        "labels": label_sets,
        "beton": str(beton),
    }


def data_table(res: dict[str, Any]) -> str:
    p = res["params"]
    lines = [
        f"# data loading: {p['files']} JPEGs ({'generated' if p['generated'] else p['root']}), crop {p['size']}px,"
        f" batch {p['batch']}, {p['workers']} workers, {p['passes']} interleaved passes each",
        "| loader | img/s (median) | IQR | images per pass |",
        "|---|---:|---|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['loader']} | {r['img_s']:.1f} | [{r['img_s_q1']:.1f}, {r['img_s_q3']:.1f}] | {r['images']} |"
        )
    lines.append(
        f"\nffcv / torchvision: x{res['ratio']:.3f} [IQR {res['ratio_q1']:.3f}, {res['ratio_q3']:.3f}] "
        f"(per-pass ratios)"
    )
    return "\n".join(lines) + "\n"
