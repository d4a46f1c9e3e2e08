"""ImageNet-style class folders as FFCV ``.beton`` files (``hfbench data imagefolder``): scan
the tree, decode every image once, write each split (see suite/images.py for the rules).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from suite.data.files import DataError
from suite.data.rgb import (
    _MAX_LISTED,
    IMG_EXTENSIONS,
    _child_wrapper,
    _finish_split,
    _plan,
    _say,
    _write_rgb,
    _write_with_child,
    check_image_beton,
    meta_file,
    split_file,
)
from suite.data.writer import (
    _dir_lock,
    _tmp_name,
)

# --------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------


def class_folders(root: Path) -> list[str]:
    if not root.is_dir():
        raise DataError(f"{root}: image folder does not exist")
    names = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise DataError(f"{root}: no class sub-folders (expected ROOT/<class>/<image>)")
    return names


def scan_split(root: Path, classes: list[str], split: str) -> tuple[list[tuple[str, int]], list[str]]:
    """([(path, label)] sorted by (class, file name), [ignored non-image paths])."""
    found = class_folders(root)
    extra = sorted(set(found) - set(classes))
    if extra:
        raise DataError(
            f"{root}: class folders not in the train folder: {', '.join(extra[:20])}{' ...' if len(extra) > 20 else ''}"
        )
    items, ignored = [], []
    for label, c in enumerate(classes):
        d = root / c
        if not d.is_dir():
            continue
        n_c = 0
        for f in sorted(os.scandir(d), key=lambda e: e.name):
            if f.name.lower().endswith(IMG_EXTENSIONS) and not f.name.startswith(".") and f.is_file():
                items.append((f.path, label))
                n_c += 1
            else:
                ignored.append(f.path)
        if split == "train" and n_c == 0:
            raise DataError(f"{d}: class folder without images")
    if not items:
        raise DataError(f"{root}: no images ({', '.join(IMG_EXTENSIONS)})")
    return items, ignored


def _load_rgb(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _probe(path: str) -> tuple[str, str | None, int, int]:
    """(path, error or None, height, width): decodes the whole image."""
    try:
        a = _load_rgb(path)
        if a.ndim != 3 or a.shape[2] != 3 or not a.size:
            return path, f"decoded to shape {a.shape}", 0, 0
        return path, None, int(a.shape[0]), int(a.shape[1])
    except Exception as e:  # noqa: BLE001 - every decoder failure is a bad file
        return path, f"{type(e).__name__}: {e}", 0, 0


def _verify(items: list[tuple[str, int]], workers: int, progress: bool, tag: str):
    """[(path, error)] of the unreadable images, and the largest (h, w) product seen."""
    import multiprocessing as mp

    n = len(items)
    every = max(1000, n // 20)
    bad, max_px, done = [], 0, 0
    t0 = time.time()
    paths = [p for p, _ in items]
    ctx = mp.get_context("fork")
    with ctx.Pool(max(1, workers)) as pool:
        for path, err, h, w in pool.imap(_probe, paths, chunksize=32):
            done += 1
            if err:
                bad.append((path, err))
            max_px = max(max_px, h * w)
            if done % every == 0 or done == n:
                _say(
                    progress,
                    f"[{tag}] checked {done}/{n} images ({len(bad)} unreadable, "
                    f"{done / max(time.time() - t0, 1e-9):.0f} img/s)",
                )
    return bad, max_px


class _FileDataset:
    """(HWC uint8 RGB image, label, index) of the readable files, for FFCV's writer."""

    def __init__(self, items: list[tuple[str, int, int]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label, index = self.items[i]
        try:
            return _load_rgb(path), label, index
        except Exception as e:  # noqa: BLE001 - name the file (the check pass read it fine)
            raise DataError(f"{path}: cannot decode while writing: {type(e).__name__}: {e}") from e


def _imagefolder_body(a: dict[str, Any]) -> None:
    out_dir, name = Path(a["out_dir"]), a["name"]
    classes, progress, workers = a["settings"]["classes"], a["progress"], a["workers"]
    st = a["settings"]
    tag = f"imagefolder {name}"
    for split in a["splits"]:
        root = Path(a["roots"][split])
        items, ignored = scan_split(root, classes, split)
        if ignored:
            _say(progress, f"[{tag}] {split}: ignoring {len(ignored)} non-image files, e.g. {ignored[0]}")
        _say(progress, f"[{tag}] {split}: decoding {len(items)} images under {root} to check them")
        bad, max_px = _verify(items, workers, progress, tag)
        if bad and not st["skip_bad"]:
            listing = out_dir / f"{name}_{split}_unreadable.txt"
            listing.write_text("".join(f"{p}\t{e}\n" for p, e in bad))
            shown = "\n".join(f"  {p}: {e}" for p, e in bad[:_MAX_LISTED])
            more = f"\n  ... and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
            raise DataError(
                f"{root}: {len(bad)} unreadable image(s) (all listed in {listing}); fix or "
                f"remove them, or rerun with --skip-bad to write the rest:\n{shown}{more}"
            )
        for p, e in bad:
            _say(progress, f"[{tag}] {split}: SKIPPED unreadable {p}: {e}")
        badset = {p for p, _ in bad}
        good = [(p, lab, i) for i, (p, lab) in enumerate(items) if p not in badset]
        if not good:
            raise DataError(f"{root}: no readable images")
        side = st["max_side"] or 0
        raw_bytes = max_px * 3 if not side else min(max_px, side * side) * 3
        page = max(1 << 21, 1 << int(2 * raw_bytes + 4096 - 1).bit_length())
        final = out_dir / split_file(name, split)
        tmp = _tmp_name(final, os.getpid())
        _say(progress, f"[{tag}] {split}: writing {len(good)} images to {final}")
        kw = {
            "write_mode": st["write_mode"],
            "max_resolution": st["max_side"] or None,
            "jpeg_quality": st["quality"],
            "compress_probability": st["compress_probability"],
        }
        _write_rgb(tmp, _FileDataset(good), workers, page, **kw)
        info = check_image_beton(
            tmp, expected_count=len(good), expected_classes=len(classes), max_side=st["max_side"] or None
        )
        counts = {classes[k]: v for k, v in sorted(info["label_counts"].items())}
        _finish_split(
            out_dir,
            name,
            split,
            tmp,
            {
                "count": len(good),
                "source": a["sources"][split],
                "label_counts": counts,
                "skipped": [{"path": p, "error": e} for p, e in bad],
                "ignored": ignored[:1000],
                "ignored_count": len(ignored),
            },
        )


def _imagefolder_child_main(args_json: str) -> int:
    return _child_wrapper(args_json, _imagefolder_body)


def write_imagefolder(
    out_dir: str | os.PathLike,
    train: str | os.PathLike,
    val: str | os.PathLike | None = None,
    *,
    name: str = "imagefolder",
    max_side: int | None = 512,
    quality: int = 90,
    write_mode: str = "jpg",
    compress_probability: float = 0.5,
    skip_bad: bool = False,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    timeout: float | None = None,
) -> dict[str, Path]:
    """Write ``<name>_train.beton`` (and ``<name>_val.beton`` when ``val`` is given) plus
    ``<name>_meta.json`` from class folders; returns ``{split: path, "meta": path}``.
    ``write_mode`` 'jpg' | 'proportion' (JPEG with probability ``compress_probability``,
    else raw, as ffcv-imagenet) | 'raw'; ``max_side`` resizes larger images (None/0: keep).
    See the module docstring for resuming and unreadable images."""
    if write_mode not in ("jpg", "proportion", "raw"):
        raise ValueError(f"write_mode must be jpg, proportion or raw, got {write_mode!r}")
    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad dataset name {name!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    roots = {"train": Path(train).resolve()}
    if val is not None:
        roots["val"] = Path(val).resolve()
    classes = class_folders(roots["train"])
    settings = {
        "kind": "imagefolder",
        "classes": classes,
        "write_mode": write_mode,
        "max_side": int(max_side or 0),
        "quality": int(quality),
        "compress_probability": float(compress_probability) if write_mode == "proportion" else None,
        "skip_bad": bool(skip_bad),
    }
    sources = {s: str(r) for s, r in roots.items()}
    result = {s: out_dir / split_file(name, s) for s in roots}
    result["meta"] = out_dir / meta_file(name)
    workers = int(workers or min(os.cpu_count() or 1, 8))

    def check(p: Path, count: int):
        return check_image_beton(p, count, len(classes), max_side=settings["max_side"] or None)

    with _dir_lock(out_dir, f".{name}.lock"):
        meta, todo = _plan(out_dir, name, settings, sources, overwrite, check)
        if not todo:
            _say(progress, f"[imagefolder {name}] {out_dir}: betons present and valid, nothing to write")
            return result
        kept = sorted(set(roots) - set(todo))
        if kept:
            _say(
                progress, f"[imagefolder {name}] keeping complete split(s) {', '.join(kept)}; writing {', '.join(todo)}"
            )
        meta["class_to_index"] = {c: i for i, c in enumerate(classes)}
        meta["fields"] = {
            "image": f"RGBImageField {write_mode}, longer side <= {max_side or 'any'}",
            "label": "IntField, index of the class in `classes` (sorted train folder names)",
            "index": "IntField, position of the file in its split's sorted (class, name) listing",
        }
        _write_with_child(
            out_dir,
            name,
            meta,
            todo,
            {"settings": settings, "roots": sources, "sources": sources, "workers": workers},
            "suite.data.imagefolder:_imagefolder_child_main",
            f"{name} betons",
            progress,
            timeout,
        )
    return result
