"""RGB image datasets as FFCV ``.beton`` files: what the JPEG-tree (imagefolder.py) and CIFAR
(cifar.py) writers share: file names, the checks of a written file, and the writer machinery
(a child process per write, temporary names, atomic renames; see suite/images.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from suite.data.files import DataError, _check_alloc_table, _import_ffcv, _open_beton
from suite.data.writer import (
    _atomic_write_text,
    _publish,
    _run_writer_child,
    _safe_writer_worker,
    _tmp_name,
)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
META_VERSION = 1
_MAX_LISTED = 100  # bad paths listed in an error message (all of them go to a file next to the betons)


def split_file(name: str, split: str) -> str:
    return f"{name}_{split}.beton"


def meta_file(name: str) -> str:
    return f"{name}_meta.json"


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(msg, file=sys.stderr, flush=True)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


# --------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------


def check_image_beton(
    path: str | os.PathLike,
    expected_count: int | None = None,
    expected_classes: int | None = None,
    image_size: tuple[int, int] | None = None,
    max_side: int | None = None,
) -> dict[str, Any]:
    """Cheaply validate an RGB image beton (header, fields, per-sample metadata, allocation
    table; not the pixel pages): ``image`` RGBImageField, ``label`` IntField, the sample
    count, labels in ``0..expected_classes-1``, every image ``image_size`` (H, W) or at most
    ``max_side`` on its longer side, raw images exactly H*W*3 bytes. Raises DataError
    naming ``path``. Returns ``{"path", "num_samples", "label_counts"}``."""
    path = Path(path)
    reader, n, alloc_ptr, desc_end = _open_beton(path)
    from ffcv.fields import IntField, RGBImageField
    from ffcv.fields.rgb_image import IMAGE_MODES

    handlers = reader.handlers
    img, lab = handlers.get("image"), handlers.get("label")
    if not isinstance(img, RGBImageField):
        raise DataError(f"{path}: field 'image' is {img!r}, expected RGBImageField")
    if not isinstance(lab, IntField):
        raise DataError(f"{path}: field 'label' is {lab!r}, expected IntField")
    if expected_count is not None and n != expected_count:
        raise DataError(f"{path}: {n} samples, expected {expected_count}")
    _check_alloc_table(path, reader, n, alloc_ptr, desc_end, "image", ptr_key="data_ptr")
    meta = reader.metadata
    col = {name: meta.dtype.names[i] for i, name in enumerate(handlers)}
    counts: dict[int, int] = {}
    if n:
        im = meta[col["image"]]
        h, w, mode = im["height"].astype(np.int64), im["width"].astype(np.int64), im["mode"]
        if (h <= 0).any() or (w <= 0).any() or not np.isin(mode, list(IMAGE_MODES.values())).all():
            raise DataError(f"{path}: corrupt image metadata (zero size or unknown mode)")
        if image_size is not None and ((h != image_size[0]) | (w != image_size[1])).any():
            raise DataError(f"{path}: images of size other than {image_size[0]}x{image_size[1]}")
        if max_side is not None and int(np.maximum(h, w).max()) > max_side:
            raise DataError(
                f"{path}: an image has a side of {int(np.maximum(h, w).max())} px, "
                f"more than the max side {max_side} it was written with"
            )
        table = reader.alloc_table
        sizes = table["size"][np.argsort(table["sample_id"])].astype(np.int64)
        raw = mode == IMAGE_MODES["raw"]
        if (sizes[raw] != (h * w * 3)[raw]).any():
            raise DataError(f"{path}: raw image sizes disagree with their allocations")
        labels = np.asarray(meta[col["label"]])
        lo, hi = int(labels.min()), int(labels.max())
        if expected_classes is not None and (lo < 0 or hi >= expected_classes):
            raise DataError(f"{path}: labels span {lo}..{hi}, expected 0..{expected_classes - 1}")
        vals, cnt = np.unique(labels, return_counts=True)
        counts = {int(v): int(c) for v, c in zip(vals, cnt)}
    return {"path": str(path), "num_samples": n, "label_counts": counts}


def check_split_file(
    path: str | os.PathLike, num_classes: int, name: str, image_size: tuple[int, int] | None = None
) -> dict[str, Any]:
    """The registry check of one split file of dataset ``name``: the file must be listed
    in ``<name>_meta.json`` next to it (written by ``hfbench data``), with as many samples
    and classes as the meta says, and ``num_classes`` classes."""
    path = Path(path)
    mpath = path.parent / meta_file(name)
    if not path.is_file():
        raise DataError(f"{path}: beton file missing")
    if not mpath.is_file():
        raise DataError(f"{mpath}: meta file missing (it is written by `hfbench data` with the betons)")
    meta = _read_json(mpath)
    if not meta:
        raise DataError(f"{mpath}: unreadable meta JSON")
    entry = next((e for e in meta.get("files", {}).values() if e.get("name") == path.name), None)
    if entry is None:
        raise DataError(f"{path}: not listed in {mpath} (unfinished write? rerun `hfbench data`)")
    classes = meta.get("classes") or []
    if len(classes) != num_classes:
        raise DataError(f"{mpath}: {len(classes)} classes, dataset {name} expects {num_classes}")
    if path.stat().st_size != entry.get("bytes"):
        raise DataError(f"{path}: {path.stat().st_size} bytes, {mpath} says {entry.get('bytes')}")
    max_side = meta.get("settings", {}).get("max_side") or None
    return check_image_beton(
        path, expected_count=entry.get("count"), expected_classes=num_classes, image_size=image_size, max_side=max_side
    )


def check_cifar_full_file(
    path: str | os.PathLike, num_classes: int, name: str, image_size: tuple[int, int] | None = (32, 32)
) -> dict[str, Any]:
    """The registry check of a file of ``<cifar>_full`` (written by ``write_cifar`` with
    ``val_size=0``): :func:`check_split_file`, and ``<name>_meta.json`` must say ``val_size``
    0 and the file must hold every image of its source split (train: all training images,
    50,000 for the real releases; test: the test set)."""
    path = Path(path)
    info = check_split_file(path, num_classes, name, image_size=image_size)
    mpath = path.parent / meta_file(name)
    meta = _read_json(mpath)
    st = meta.get("settings") or {}
    if st.get("kind") != "cifar" or st.get("val_size") != 0:
        raise DataError(
            f"{mpath}: settings kind={st.get('kind')!r} val_size={st.get('val_size')!r}; dataset "
            f"{name} needs the whole training set (written by `hfbench data ... --val-size 0`)"
        )
    split = next(s for s, e in meta.get("files", {}).items() if e.get("name") == path.name)
    want = (meta.get("source_counts") or {}).get(split)
    if info["num_samples"] != want:
        raise DataError(
            f"{path}: {info['num_samples']} images, the {split} split of the source has {want} (per {mpath})"
        )
    return info


# --------------------------------------------------------------------------------------
# resumable split writing (shared by imagefolder and CIFAR)
# --------------------------------------------------------------------------------------


def _plan(
    out_dir: Path,
    name: str,
    settings: dict[str, Any],
    sources: dict[str, Any],
    overwrite: bool,
    check: Callable[[Path, int], Any],
) -> tuple[dict[str, Any], list[str]]:
    """(meta with the splits that can be kept, splits to write)."""
    old = _read_json(out_dir / meta_file(name))
    keep: dict[str, Any] = {}
    if not overwrite and old.get("meta_version") == META_VERSION and old.get("settings") == settings:
        for split, src in sources.items():
            e = old.get("files", {}).get(split)
            p = out_dir / split_file(name, split)
            if not e or e.get("source") != src or not p.is_file() or p.stat().st_size != e.get("bytes"):
                continue
            try:
                check(p, e["count"])
            except DataError:
                continue
            keep[split] = e
    meta = {
        "meta_version": META_VERSION,
        "dataset": name,
        "settings": settings,
        "classes": settings.get("classes"),
        "files": keep,
    }
    return meta, [s for s in sources if s not in keep]


def _remove_dead_tmp(out_dir: Path, names: Sequence[str]) -> None:
    """Temporary files of writers that are no longer running (killed with SIGKILL)."""
    for n in names:
        for p in out_dir.glob(f".{n}.tmp-*"):
            try:
                os.kill(int(p.name.rsplit("-", 1)[1]), 0)
            except (ValueError, ProcessLookupError):
                p.unlink(missing_ok=True)
            except PermissionError:
                pass


def _finish_split(out_dir: Path, name: str, split: str, tmp: Path, entry: dict[str, Any]) -> None:
    """fsync + rename the checked temporary file, then list it in the meta JSON."""
    final = out_dir / split_file(name, split)
    _publish(tmp, final)
    mpath = out_dir / meta_file(name)
    meta = _read_json(mpath)
    meta.setdefault("files", {})[split] = {"name": final.name, "bytes": final.stat().st_size, **entry}
    meta["updated_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _atomic_write_text(mpath, json.dumps(meta, indent=1) + "\n")


def _child_wrapper(args_json: str, body: Callable[[dict[str, Any]], None]) -> int:
    args = json.loads(args_json)
    res_file = Path(args["result_file"])
    try:
        body(args)
        res_file.write_text(json.dumps({"ok": True}))
        return 0
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        import traceback

        if not isinstance(e, DataError):
            traceback.print_exc()
        out_dir = Path(args["out_dir"])
        for s in args["splits"]:
            _tmp_name(out_dir / split_file(args["name"], s), os.getpid()).unlink(missing_ok=True)
        res_file.write_text(json.dumps({"ok": False, "error_type": type(e).__name__, "message": str(e)}))
        return 1


def _write_with_child(
    out_dir: Path,
    name: str,
    meta: dict[str, Any],
    todo: list[str],
    args: dict[str, Any],
    entry: str,
    what: str,
    progress: bool,
    timeout: float | None,
) -> None:
    names = [split_file(name, s) for s in todo]
    _remove_dead_tmp(out_dir, names)
    _atomic_write_text(out_dir / meta_file(name), json.dumps(meta, indent=1) + "\n")
    _run_writer_child(
        {**args, "out_dir": str(out_dir), "name": name, "splits": todo, "progress": bool(progress)},
        progress=progress,
        timeout=timeout,
        entry=entry,
        what=what,
        files=names,
    )


def _write_rgb(path: Path, ds, num_workers: int, page_size: int, **field_kw) -> None:
    _import_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.utils import chunks
    from ffcv.writer import DatasetWriter

    fields = {"image": RGBImageField(**field_kw), "label": IntField(), "index": IntField()}
    writer = DatasetWriter(str(path), fields, page_size=page_size, num_workers=num_workers)
    indices = list(enumerate(range(len(ds))))
    writer._write_common(len(indices), chunks(indices, 100), _safe_writer_worker, (ds,))
