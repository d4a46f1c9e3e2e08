"""RGB image datasets as FFCV ``.beton`` files: ImageNet-style class folders and the
CIFAR-10/100 python releases; their checks and their training/evaluation loaders.

Writing (``hfbench data imagefolder|cifar10|cifar100``) reuses the Fashion-MNIST machinery
of :mod:`suite.data`: the FFCV writing runs in a child Python process (own session, killed
with its writer workers on timeout/interrupt), every split is written to a temporary name
(``.<file>.tmp-<pid>``), checked, fsynced and renamed, and the meta JSON gains the split's
entry only after the rename. A rerun keeps every split whose file is listed in the meta
with the same settings/source, has the listed size and passes :func:`check_image_beton`;
it rewrites the others (and removes temporary files of dead writers).

Files of a dataset ``NAME`` in ``OUT``: ``NAME_train.beton``, ``NAME_val.beton`` (CIFAR
also ``NAME_test.beton``) and ``NAME_meta.json`` (classes, counts, settings, skipped
files). CIFAR with ``val_size=0`` (``--val-size 0``, the reference setting: train on every
training image, evaluate the test set) writes ``NAME_full_train.beton`` (all training
images), ``NAME_full_test.beton`` and ``NAME_full_meta.json`` instead; the registry dataset
``NAME_full`` reads the test file as its val and test splits. Schema: ``image``
RGBImageField, ``label`` IntField, ``index`` IntField (position of the image in the sorted
file list of its split folder / row in the CIFAR source).

Class folders: class index = position in the sorted train folder names; val uses the same
mapping (a val folder that train lacks is an error). Files with the extensions torchvision's
ImageFolder accepts are images; anything else is reported as ignored (output and meta).
Unreadable images: every image is decoded once before writing (in ``workers`` processes);
by default the write fails with a DataError listing every bad path; with ``skip_bad`` the
rest is written and the skipped paths (with the decoder's error) are printed and listed in
the meta JSON. Decoding twice costs time on ImageNet (the check pass is ~1/3 of the write).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from suite.data import (
    DataError,
    FashionMNISTLoader,
    _ArrayDataset,
    _atomic_write_text,
    _check_alloc_table,
    _dir_lock,
    _import_ffcv,
    _open_beton,
    _publish,
    _run_writer_child,
    _safe_writer_worker,
    _sha256,
    _tmp_name,
)

__all__ = [
    "write_imagefolder",
    "write_cifar",
    "check_image_beton",
    "check_split_file",
    "check_cifar_full_file",
    "cifar_full_name",
    "make_image_loader",
    "ImageBetonLoader",
    "RECIPES",
    "split_file",
    "meta_file",
    "IMG_EXTENSIONS",
]

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
            "suite.images:_imagefolder_child_main",
            f"{name} betons",
            progress,
            timeout,
        )
    return result


# --------------------------------------------------------------------------------------
# CIFAR-10/100 (python pickle releases)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: bytes
    names_key: bytes
    classes: int


CIFAR_LAYOUTS = {
    "cifar10": _CifarLayout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        b"labels",
        b"label_names",
        10,
    ),
    "cifar100": _CifarLayout(
        "cifar-100-python", ("train",), ("test",), "meta", b"fine_labels", b"fine_label_names", 100
    ),
}


def _cifar_root(src: Path, lay: _CifarLayout) -> Path:
    if (src / lay.folder).is_dir():
        return src / lay.folder
    if src.is_dir():
        return src
    raise DataError(f"{src}: folder does not exist (expected the {lay.folder} folder of the python release)")


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: file missing")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - truncated/corrupt pickle
        raise DataError(f"{path}: not a readable CIFAR pickle: {type(e).__name__}: {e}") from e
    if not isinstance(d, dict):
        raise DataError(f"{path}: pickle holds a {type(d).__name__}, expected a dict")
    return d


def cifar_source(src: str | os.PathLike, dataset: str) -> dict[str, Any]:
    """Read and validate a CIFAR python release; returns {"train": (images NHWC uint8,
    labels), "test": (...), "classes": [...], "files": {name: sha256}}. Raises DataError
    naming the bad or missing file."""
    lay = CIFAR_LAYOUTS[dataset]
    root = _cifar_root(Path(src), lay)
    out: dict[str, Any] = {"files": {}}
    m = _unpickle(root / lay.meta)
    names = m.get(lay.names_key)
    if not isinstance(names, list) or len(names) != lay.classes:
        raise DataError(f"{root / lay.meta}: {lay.names_key.decode()} should list {lay.classes} class names")
    out["classes"] = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    out["files"][lay.meta] = _sha256(root / lay.meta)
    for split, files in (("train", lay.train), ("test", lay.test)):
        xs, ys = [], []
        for fn in files:
            p = root / fn
            d = _unpickle(p)
            if b"data" not in d or lay.label_key not in d:
                raise DataError(f"{p}: missing key b'data' or {lay.label_key!r}")
            x = np.asarray(d[b"data"])
            y = np.asarray(d[lay.label_key])
            if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
                raise DataError(f"{p}: b'data' is {x.dtype} {x.shape}, expected uint8 (N, 3072)")
            if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
                raise DataError(f"{p}: {lay.label_key!r} has shape {y.shape}, expected ({x.shape[0]},) integers")
            if y.size and (int(y.min()) < 0 or int(y.max()) >= lay.classes):
                raise DataError(f"{p}: labels span {int(y.min())}..{int(y.max())}, expected 0..{lay.classes - 1}")
            xs.append(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            ys.append(y.astype(np.int64))
            out["files"][fn] = _sha256(p)
        out[split] = (np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys))
    return out


def cifar_full_name(dataset: str) -> str:
    """File prefix / registry name of the full-train (``val_size=0``) files of ``dataset``."""
    return f"{dataset}_full"


def _cifar_rows(n_train: int, n_test: int, val_size: int, split_seed: int | None) -> dict[str, np.ndarray]:
    if val_size == 0:  # reference setting: every training image, no val split
        return {"train": np.arange(n_train), "test": np.arange(n_test)}
    perm = np.random.default_rng(split_seed).permutation(n_train)
    return {"train": np.sort(perm[val_size:]), "val": np.sort(perm[:val_size]), "test": np.arange(n_test)}


def _cifar_body(a: dict[str, Any]) -> None:
    out_dir, name = Path(a["out_dir"]), a["name"]  # name: the file prefix (<dataset>_full with val_size 0)
    src = cifar_source(a["src"], a.get("dataset", name))
    st = a["settings"]
    if src["files"] != st["source_sha256"]:
        raise DataError(f"{a['src']}: the source files changed while writing")
    rows = _cifar_rows(src["train"][0].shape[0], src["test"][0].shape[0], st["val_size"], st["split_seed"])
    for split in a["splits"]:
        x, y = src["test"] if split == "test" else src["train"]
        ds = _ArrayDataset(x, y, rows[split], shape=None)  # (32, 32, 3) HWC as FFCV's RGB field wants
        final = out_dir / split_file(name, split)
        tmp = _tmp_name(final, os.getpid())
        _say(a["progress"], f"[{name}] writing {final} ({len(ds)} images)")
        _write_rgb(tmp, ds, a["workers"], 1 << 21, write_mode="raw")
        info = check_image_beton(tmp, expected_count=len(ds), expected_classes=len(st["classes"]), image_size=(32, 32))
        counts = {st["classes"][k]: v for k, v in sorted(info["label_counts"].items())}
        _finish_split(
            out_dir, name, split, tmp, {"count": len(ds), "source": a["sources"][split], "label_counts": counts}
        )


def _cifar_child_main(args_json: str) -> int:
    return _child_wrapper(args_json, _cifar_body)


def write_cifar(
    dataset: str,
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    val_size: int = 5000,
    split_seed: int = 0,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    timeout: float | None = 3600.0,
) -> dict[str, Path]:
    """Write ``<dataset>_{train,val,test}.beton`` + meta from a CIFAR python release
    (``src`` = the release folder or its parent). ``val`` = ``val_size`` images of the
    training set (the first of ``default_rng(split_seed).permutation(n_train)``), ``train``
    the rest, ``test`` the test set; raw (lossless) 32x32 RGB pixels.

    ``val_size=0``: the reference setting (the Hyperflux code trains on all training images
    and evaluates the test set): ``<dataset>_full_train.beton`` = every training image in
    source order, ``<dataset>_full_test.beton`` = the test set, ``<dataset>_full_meta.json``
    (``split_seed`` unused, stored as None); returns keys train, test, meta. Registry dataset
    ``<dataset>_full`` reads them (val = test). The held-out files are not touched."""
    if dataset not in CIFAR_LAYOUTS:
        raise ValueError(f"unknown CIFAR dataset {dataset!r} (known: {', '.join(CIFAR_LAYOUTS)})")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = cifar_source(src, dataset)  # validates every file before anything is written
    n_train, n_test = source["train"][0].shape[0], source["test"][0].shape[0]
    if not isinstance(val_size, int) or not 0 <= val_size < n_train:
        raise ValueError(
            f"val_size must be an int in 0..{n_train - 1} (0: no val split, train on all {n_train} "
            f"training images), got {val_size!r}"
        )
    full = val_size == 0
    name = cifar_full_name(dataset) if full else dataset  # file prefix
    lay = CIFAR_LAYOUTS[dataset]
    settings = {
        "kind": "cifar",
        "classes": source["classes"],
        "val_size": val_size,
        "split_seed": None if full else int(split_seed),
        "source_sha256": source["files"],
    }
    root = str(_cifar_root(Path(src), lay).resolve())
    sources = {s: root for s in (("train", "test") if full else ("train", "val", "test"))}
    result = {s: out_dir / split_file(name, s) for s in sources}
    result["meta"] = out_dir / meta_file(name)
    del source

    def check(p: Path, count: int):
        return check_image_beton(p, count, lay.classes, image_size=(32, 32))

    with _dir_lock(out_dir, f".{name}.lock"):
        meta, todo = _plan(out_dir, name, settings, sources, overwrite, check)
        if not todo:
            _say(progress, f"[{name}] {out_dir}: betons present and valid, nothing to write")
            return result
        if full:
            meta["source_dataset"] = dataset
            meta["source_counts"] = {"train": n_train, "test": n_test}
            meta["split"] = (
                f"val_size 0 (reference setting): train = every training image, source order; "
                f"no val file; test = the test set (dataset {name} reads it as val and test)"
            )
        else:
            meta["split"] = (
                "val = sorted(np.random.default_rng(split_seed).permutation(n_train)[:val_size]); "
                "train = the other rows, sorted; test = the test set"
            )
        meta["fields"] = {"image": "RGBImageField raw 32x32", "label": "IntField", "index": "IntField, source row"}
        _write_with_child(
            out_dir,
            name,
            meta,
            todo,
            {
                "settings": settings,
                "src": root,
                "sources": sources,
                "dataset": dataset,
                "workers": int(workers or min(os.cpu_count() or 1, 4)),
            },
            "suite.images:_cifar_child_main",
            f"{name} betons",
            progress,
            timeout,
        )
    return result


# --------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """Augmentation of a dataset: ``rrc`` (ImageNet: RandomResizedCrop + flip / resize
    ``crop/ratio`` + centre crop) or ``pad_crop`` (CIFAR: random crop with ``padding`` + flip
    / as is); mean/std in [0, 1] units."""

    kind: str
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    center_ratio: float = 224 / 256
    padding: int = 4


RECIPES = {
    "imagenet": Recipe("rrc", 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": Recipe("pad_crop", 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": Recipe("pad_crop", 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class ImageBetonLoader(FashionMNISTLoader):
    """:class:`suite.data.FashionMNISTLoader` (order, epochs, distributed sharding, closing)
    over an RGB beton, with the ``recipe``'s decoding/augmentation. Yields float32
    ``(B, 3, crop, crop)`` normalised with the recipe's mean/std (uint8 with ``raw``),
    contiguous NCHW, or channels_last memory with ``channels_last=True``; int64 labels."""

    def __init__(
        self,
        path,
        batch_size,
        train,
        *,
        recipe: str | Recipe = "imagenet",
        crop_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels_last: bool = False,
        **kw,
    ):
        self.recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
        self.crop_size = int(crop_size or self.recipe.crop)
        self.mean = np.asarray(mean if mean is not None else self.recipe.mean, dtype=np.float64)
        self.std = np.asarray(std if std is not None else self.recipe.std, dtype=np.float64)
        self.channels_last = bool(channels_last)
        super().__init__(path, batch_size, train, **kw)

    def _pipelines(self) -> dict[str, Any]:
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import (
            CenterCropRGBImageDecoder,
            RandomResizedCropRGBImageDecoder,
            SimpleRGBImageDecoder,
        )
        from ffcv.transforms import NormalizeImage, ToTensor, ToTorchImage

        from suite.augment import flip_and_translate

        # FFCV's RandomHorizontalFlip / RandomTranslate: same draws and pixels, ~9 s less compiling
        RandomHorizontalFlip, RandomTranslate = flip_and_translate()
        r, s = self.recipe, self.crop_size
        if r.kind == "rrc":
            img = (
                [RandomResizedCropRGBImageDecoder((s, s)), RandomHorizontalFlip()]
                if self.train
                else [CenterCropRGBImageDecoder((s, s), ratio=r.center_ratio)]
            )
        elif r.kind == "pad_crop":
            img = (
                [SimpleRGBImageDecoder(), RandomHorizontalFlip(), RandomTranslate(padding=r.padding)]
                if self.train
                else [SimpleRGBImageDecoder()]
            )
        else:
            raise ValueError(f"unknown recipe kind {r.kind!r}")
        if not self.raw:
            img.append(NormalizeImage(self.mean * 255.0, self.std * 255.0, np.float32))
        img += [ToTensor(), ToTorchImage()]
        return {"image": img, "label": [IntDecoder(), ToTensor()], "index": None}

    def _convert(self, img, lab):
        import torch

        y = torch.from_numpy(lab.numpy().reshape(-1).astype(np.int64))
        a = img.numpy()  # (B, C, H, W) view of FFCV's (B, H, W, C) buffer
        if self.channels_last:
            x = torch.from_numpy(np.ascontiguousarray(a.transpose(0, 2, 3, 1))).permute(0, 3, 1, 2)
        else:
            x = torch.from_numpy(np.ascontiguousarray(a))
        return x, y


def make_image_loader(
    path: str | os.PathLike,
    batch_size: int,
    train: bool,
    seed: int = 0,
    num_workers: int = 1,
    distributed: bool = False,
    drop_last: bool | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    recipe: str | Recipe = "imagenet",
    crop_size: int | None = None,
    raw: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    channels_last: bool = False,
    batches_ahead: int = 3,
    os_cache: bool = True,
) -> ImageBetonLoader:
    """Loader over an RGB beton with the recipe's augmentation (``train``) or evaluation
    transform; same order/sharding/drop_last semantics as :func:`suite.data.make_loader`.
    imagenet: train RandomResizedCrop(crop_size, scale 0.08-1) + flip, eval resize to
    crop_size/0.875 + centre crop; cifar*: train random crop 32 with padding 4 (zeros) +
    flip, eval as is. ``mean``/``std`` (in [0, 1] units) override the recipe's."""
    return ImageBetonLoader(
        path,
        batch_size,
        train,
        recipe=recipe,
        crop_size=crop_size,
        mean=mean,
        std=std,
        channels_last=channels_last,
        seed=seed,
        num_workers=num_workers,
        distributed=distributed,
        drop_last=drop_last,
        indices=indices,
        raw=raw,
        batches_ahead=batches_ahead,
        os_cache=os_cache,
    )
