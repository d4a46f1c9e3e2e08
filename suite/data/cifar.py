"""The CIFAR-10/100 python releases as FFCV ``.beton`` files (``hfbench data cifar10|cifar100``),
with a val split drawn from the training set or none (``_full``: the reference setting).
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from suite.data.files import DataError, _sha256
from suite.data.rgb import (
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
    _ArrayDataset,
    _dir_lock,
    _tmp_name,
)

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
            "suite.data.cifar:_cifar_child_main",
            f"{name} betons",
            progress,
            timeout,
        )
    return result
