"""Fashion-MNIST as FFCV ``.beton`` files.

- :func:`fashion_mnist_source` reads the IDX ``.gz`` files of the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) and validates them.
- :func:`write_fashion_mnist` writes ``fashion_mnist_{train,val,test}.beton`` plus
  ``fashion_mnist_meta.json``. The writing runs in a separate Python process (FFCV's
  DatasetWriter forks; forking a process that has live Loader threads can deadlock), every
  file is written under a temporary name, checked, then atomically renamed.
- :func:`check_beton` validates a file cheaply (header, fields, allocation table, labels).
- :func:`make_loader` returns an FFCV-backed loader yielding ``(x, y)``: float32
  ``(B, 1, 28, 28)`` normalised with the Fashion-MNIST train mean/std, int64 ``(B,)``.

Schema of every beton: ``image`` NDArrayField uint8 (1, 28, 28) (raw pixels, lossless),
``label`` IntField (0..9), ``index`` IntField (row of the sample in its source IDX file, so
train/val can be traced back to the original 60k training set).

FFCV (1.0.2) is imported lazily: importing this module is cheap.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import queue
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

__all__ = [
    "DataError",
    "FashionMNISTSource",
    "FashionMNISTLoader",
    "fashion_mnist_source",
    "write_fashion_mnist",
    "check_beton",
    "make_loader",
    "FASHION_MNIST_ROOT",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "CLASS_NAMES",
    "SPLIT_FILES",
    "META_FILE",
]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SHAPE = (1, 28, 28)
N_TRAIN_SOURCE = 60000
N_TEST_SOURCE = 10000
SPLIT_FILES = {
    "train": "fashion_mnist_train.beton",
    "val": "fashion_mnist_val.beton",
    "test": "fashion_mnist_test.beton",
}
META_FILE = "fashion_mnist_meta.json"
META_VERSION = 1

# IDX: magic = 0x00 0x00 <type 0x08 = ubyte> <ndim>
_IDX_MAGIC_IMAGES = 0x00000803
_IDX_MAGIC_LABELS = 0x00000801
_SOURCE_FILES = {
    # key: (file stem, magic, expected shape)
    "train_images": ("train-images-idx3-ubyte", _IDX_MAGIC_IMAGES, (N_TRAIN_SOURCE, 28, 28)),
    "train_labels": ("train-labels-idx1-ubyte", _IDX_MAGIC_LABELS, (N_TRAIN_SOURCE,)),
    "test_images": ("t10k-images-idx3-ubyte", _IDX_MAGIC_IMAGES, (N_TEST_SOURCE, 28, 28)),
    "test_labels": ("t10k-labels-idx1-ubyte", _IDX_MAGIC_LABELS, (N_TEST_SOURCE,)),
}
_INSTALL_HINT = "install the Debian package dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`)"


class DataError(ValueError):
    """A data file is missing, truncated, corrupt or not what was expected."""


# --------------------------------------------------------------------------------------
# IDX source
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FashionMNISTSource:
    """The validated Fashion-MNIST arrays (uint8, as stored in the IDX files)."""

    train_images: np.ndarray  # (60000, 28, 28) uint8
    train_labels: np.ndarray  # (60000,) uint8, 0..9
    test_images: np.ndarray  # (10000, 28, 28) uint8
    test_labels: np.ndarray  # (10000,) uint8, 0..9
    files: dict[str, Path] = field(default_factory=dict)  # key -> IDX file read


def _source_paths(root: str | os.PathLike) -> dict[str, Path]:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST folder {root} does not exist: {_INSTALL_HINT}")
    paths = {}
    for key, (stem, _, _) in _SOURCE_FILES.items():
        for name in (stem + ".gz", stem):
            if (root / name).is_file():
                paths[key] = root / name
                break
        else:
            raise DataError(f"{root / (stem + '.gz')}: file missing (folder {root} is incomplete; re-{_INSTALL_HINT})")
    return paths


def _read_idx(path: Path, magic: int, shape: tuple[int, ...]) -> np.ndarray:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: cannot read/decompress: {e}") from e
    ndim = len(shape)
    head = 4 + 4 * ndim
    if len(data) < head:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes)")
    got_magic = int.from_bytes(data[:4], "big")
    if got_magic != magic:
        raise DataError(f"{path}: bad IDX magic number 0x{got_magic:08x}, expected 0x{magic:08x}")
    dims = struct.unpack(">" + "I" * ndim, data[4:head])
    if tuple(dims) != tuple(shape):
        raise DataError(f"{path}: IDX shape {tuple(dims)}, expected {tuple(shape)}")
    payload = len(data) - head
    if payload != math.prod(shape):
        raise DataError(
            f"{path}: {payload} data bytes, expected {math.prod(shape)} "
            f"for shape {tuple(shape)} (truncated or trailing data)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=head).reshape(shape).copy()


def fashion_mnist_source(root: str | os.PathLike = FASHION_MNIST_ROOT) -> FashionMNISTSource:
    """Read and validate the four Fashion-MNIST IDX files under ``root``.

    Raises :class:`DataError` naming the offending file on a missing file, bad magic
    number, wrong shape, truncated data or a label outside 0..9.
    """
    paths = _source_paths(root)
    arrays = {}
    for key, (_, magic, shape) in _SOURCE_FILES.items():
        arr = _read_idx(paths[key], magic, shape)
        if key.endswith("labels") and arr.size and int(arr.max()) > 9:
            bad = int(np.argmax(arr > 9))
            raise DataError(f"{paths[key]}: label {int(arr[bad])} at row {bad} is outside 0..9")
        arrays[key] = arr
    return FashionMNISTSource(files=paths, **arrays)


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def split_indices(val_size: int, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_rows, val_rows) of the 60k source training set, each sorted ascending.

    val = the first ``val_size`` entries of ``np.random.default_rng(split_seed).permutation(60000)``.
    """
    _check_val_size(val_size)
    perm = np.random.default_rng(split_seed).permutation(N_TRAIN_SOURCE)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def _check_val_size(val_size: int) -> None:
    if not isinstance(val_size, (int, np.integer)) or not 0 < val_size < N_TRAIN_SOURCE:
        raise ValueError(f"val_size must be an int in 1..{N_TRAIN_SOURCE - 1}, got {val_size!r}")


# --------------------------------------------------------------------------------------
# check_beton
# --------------------------------------------------------------------------------------


def check_beton(
    path: str | os.PathLike, expected_count: int | None = None, expected_classes: int | None = 10
) -> dict[str, Any]:
    """Cheaply validate a Fashion-MNIST ``.beton`` (reads header, field descriptors,
    per-sample metadata and the allocation table; not the pixel pages).

    Raises :class:`DataError` naming ``path`` when the file is missing, truncated, not an
    FFCV v2 file, was never finalised, has the wrong schema, has ``num_samples !=
    expected_count``, or labels outside ``0..expected_classes-1`` (and, for files with
    at least 50 samples per class, when a class is absent). Returns
    ``{"path", "num_samples", "label_counts", "has_index"}``.
    Corruption inside the pixel pages (bit flips) is not detected.
    """
    path = Path(path)
    reader, n, alloc_ptr, desc_end = _open_beton(path)

    from ffcv.fields import IntField, NDArrayField

    handlers = reader.handlers
    img, lab = handlers.get("image"), handlers.get("label")
    if not (
        isinstance(img, NDArrayField)
        and img.dtype == np.uint8
        and tuple(int(s) for s in img.shape) in (IMAGE_SHAPE, IMAGE_SHAPE[1:])
    ):
        raise DataError(f"{path}: field 'image' is {img!r}, expected NDArrayField uint8 {IMAGE_SHAPE}")
    if not isinstance(lab, IntField):
        raise DataError(f"{path}: field 'label' is {lab!r}, expected IntField")
    names = list(handlers)
    meta = reader.metadata
    col = {name: meta.dtype.names[i] for i, name in enumerate(names)}

    if expected_count is not None and n != expected_count:
        raise DataError(f"{path}: {n} samples, expected {expected_count}")

    # Every image is one allocation of 784 bytes inside the data region.
    _check_alloc_table(path, reader, n, alloc_ptr, desc_end, "image", size=int(np.prod(img.shape)) * img.dtype.itemsize)

    labels = np.asarray(meta[col["label"]])
    counts: dict[int, int] = {}
    if n:
        lo, hi = int(labels.min()), int(labels.max())
        if expected_classes is not None and (lo < 0 or hi >= expected_classes):
            raise DataError(f"{path}: labels span {lo}..{hi}, expected 0..{expected_classes - 1}")
        vals, cnt = np.unique(labels, return_counts=True)
        counts = {int(v): int(c) for v, c in zip(vals, cnt)}
        if expected_classes is not None and n >= 50 * expected_classes and len(counts) != expected_classes:
            raise DataError(f"{path}: {len(counts)} distinct labels in {n} samples, expected {expected_classes}")
    has_index = "index" in handlers
    if has_index and n:
        idx = np.asarray(meta[col["index"]])
        if idx.min() < 0 or np.unique(idx).shape[0] != n:
            raise DataError(f"{path}: field 'index' has negative or repeated source rows")
    return {"path": str(path), "num_samples": n, "label_counts": counts, "has_index": has_index}


def _open_beton(path: Path):
    """Header, field descriptors, per-sample metadata and allocation table of any FFCV v2
    file, checked for truncation and unfinished writes; returns ``(reader, num_samples,
    alloc_table_ptr, end_of_field_descriptors)``. Raises DataError naming ``path``."""
    if not path.exists():
        raise DataError(f"{path}: beton file missing")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    _import_ffcv()
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType

    size = path.stat().st_size
    if size < HeaderType.itemsize:
        raise DataError(f"{path}: truncated ({size} bytes, smaller than the FFCV header)")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if int(header["version"]) != CURRENT_VERSION:
        raise DataError(f"{path}: not an FFCV v{CURRENT_VERSION} beton (header version {int(header['version'])})")
    n = int(header["num_samples"])
    n_fields = int(header["num_fields"])
    page = int(header["page_size"])
    alloc_ptr = int(header["alloc_table_ptr"])
    if not (1 <= n_fields <= 16) or page <= 0 or page & (page - 1):
        raise DataError(f"{path}: corrupt header (num_fields={n_fields}, page_size={page})")
    desc_end = HeaderType.itemsize + n_fields * FieldDescType.itemsize
    if size < desc_end:
        raise DataError(f"{path}: truncated ({size} bytes) inside the field descriptors")
    if alloc_ptr == 0:
        raise DataError(f"{path}: unfinished write (no allocation table in the header)")
    if alloc_ptr > size:
        raise DataError(f"{path}: truncated ({size} bytes; allocation table expected at byte {alloc_ptr})")
    if (size - alloc_ptr) % ALLOC_TABLE_TYPE.itemsize:
        raise DataError(
            f"{path}: truncated or corrupt allocation table ({size - alloc_ptr} bytes is not a whole number of entries)"
        )
    try:
        from ffcv.reader import Reader

        reader = Reader(str(path))
    except Exception as e:  # noqa: BLE001 - anything FFCV raises means "unreadable"
        raise DataError(f"{path}: unreadable FFCV file: {type(e).__name__}: {e}") from e
    if reader.metadata.shape[0] != n or desc_end + reader.metadata.nbytes > alloc_ptr:
        raise DataError(f"{path}: truncated or corrupt per-sample metadata")
    return reader, n, alloc_ptr, desc_end


def _check_alloc_table(
    path: Path,
    reader,
    n: int,
    alloc_ptr: int,
    desc_end: int,
    field: str,
    size: int | None = None,
    ptr_key: str | None = None,
) -> None:
    """Every sample has exactly one allocation (``field``'s data) inside the data region,
    at the pointer its per-sample metadata holds (column ``field``, or its sub-field
    ``ptr_key``); ``size``: the byte size every allocation must have (None: any > 0)."""
    meta = reader.metadata
    col = meta.dtype.names[list(reader.handlers).index(field)]
    table = reader.alloc_table
    if table.shape[0] != n:
        raise DataError(f"{path}: allocation table has {table.shape[0]} entries for {n} samples")
    if not n:
        return
    bad_size = (table["size"] != size).any() if size is not None else (table["size"] <= 0).any()
    if (
        bad_size
        or int((table["ptr"] + table["size"]).max()) > alloc_ptr
        or int(table["ptr"].min()) < desc_end + meta.nbytes
    ):
        raise DataError(f"{path}: corrupt allocation table (sizes/pointers out of range)")
    ids = np.sort(table["sample_id"])
    if not np.array_equal(ids, np.arange(n, dtype=ids.dtype)):
        raise DataError(f"{path}: corrupt allocation table (sample ids are not 0..{n - 1})")
    order = np.argsort(table["sample_id"])
    ptrs = meta[col][ptr_key] if ptr_key else meta[col]
    if not np.array_equal(ptrs, table["ptr"][order]):
        raise DataError(f"{path}: {field} pointers disagree with the allocation table")


# --------------------------------------------------------------------------------------
# Writing (in a child process)
# --------------------------------------------------------------------------------------


def _expected_counts(val_size: int) -> dict[str, int]:
    return {"train": N_TRAIN_SOURCE - val_size, "val": val_size, "test": N_TEST_SOURCE}


@contextmanager
def _dir_lock(out_dir: Path, name: str = ".fashion_mnist.lock"):
    """Serialise concurrent writers of the same folder (e.g. several jobs on a cluster)."""
    import fcntl

    fd = os.open(out_dir / name, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_fashion_mnist(
    out_dir: str | os.PathLike,
    val_size: int = 5000,
    split_seed: int = 0,
    progress: bool = True,
    *,
    overwrite: bool = False,
    root: str | os.PathLike = FASHION_MNIST_ROOT,
    num_workers: int | None = None,
    timeout: float | None = 1800.0,
) -> dict[str, Path]:
    """Write the Fashion-MNIST betons into ``out_dir``; return ``{"train", "val", "test",
    "meta"} -> Path``.

    ``val`` holds ``val_size`` images of the 60k training set chosen by
    :func:`split_indices` (``split_seed``); ``train`` the rest; ``test`` the 10k test set.
    Rows keep their source order. A file that already exists, passes :func:`check_beton`
    and matches the meta json (same source sha256s, and same val_size/split_seed for
    train/val) is kept unless ``overwrite=True``. The FFCV writing runs in a child Python
    process (own session; killed with its writer workers on ``timeout`` seconds or on
    KeyboardInterrupt); each file is written to a temporary name in ``out_dir``, checked,
    fsynced and renamed, so a killed write never leaves a partial file under a final name.
    """
    _check_val_size(val_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src_paths = _source_paths(root)
    src_info = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in src_paths.values()}
    expected = _expected_counts(val_size)
    result = {split: out_dir / name for split, name in SPLIT_FILES.items()}
    result["meta"] = out_dir / META_FILE

    with _dir_lock(out_dir):
        old_meta: dict[str, Any] = {}
        if result["meta"].is_file():
            try:
                old_meta = json.loads(result["meta"].read_text())
            except (OSError, ValueError):
                old_meta = {}
        same_source = old_meta.get("source", {}).get("files") == src_info
        same_split = old_meta.get("val_size") == val_size and old_meta.get("split_seed") == split_seed
        todo = []
        for split in SPLIT_FILES:
            ok = (
                not overwrite and same_source and (split == "test" or same_split) and split in old_meta.get("files", {})
            )
            if ok:
                try:
                    check_beton(result[split], expected[split])
                except DataError:
                    ok = False
            if not ok:
                todo.append(split)
        if not todo:
            if progress:
                print(
                    f"[fashion-mnist] {out_dir}: betons present and valid, nothing to write",
                    file=sys.stderr,
                    flush=True,
                )
            return result

        # until the new meta is written, no stale meta may vouch for a replaced file
        result["meta"].unlink(missing_ok=True)
        t0 = time.perf_counter()
        _run_writer_child(
            {
                "root": str(root),
                "out_dir": str(out_dir),
                "splits": todo,
                "val_size": int(val_size),
                "split_seed": int(split_seed),
                "num_workers": num_workers,
                "progress": bool(progress),
            },
            progress=progress,
            timeout=timeout,
        )
        elapsed = time.perf_counter() - t0

        files = dict(old_meta.get("files", {})) if (same_source and same_split) else {}
        for split in SPLIT_FILES:
            if split in todo or split not in files:
                p = result[split]
                files[split] = {
                    "name": p.name,
                    "count": expected[split],
                    "bytes": p.stat().st_size,
                    "sha256": _sha256(p),
                }
        meta = {
            "meta_version": META_VERSION,
            "dataset": "fashion-mnist",
            "counts": dict(expected),
            "val_size": int(val_size),
            "split_seed": int(split_seed),
            "split": (
                "val = sorted(np.random.default_rng(split_seed).permutation(60000)[:val_size]);"
                " train = the other rows, sorted"
            ),
            "fields": {
                "image": "NDArrayField uint8 (1, 28, 28), raw pixels",
                "label": "IntField 0..9",
                "index": "IntField, row in the source IDX file",
            },
            "class_names": list(CLASS_NAMES),
            "mean": FASHION_MNIST_MEAN,
            "std": FASHION_MNIST_STD,
            "source": {"root": str(Path(root)), "package": "dataset-fashion-mnist", "files": src_info},
            "files": files,
            "write_seconds": round(elapsed, 2),
            "written": sorted(todo),
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _atomic_write_text(result["meta"], json.dumps(meta, indent=2) + "\n")
    return result


def _run_writer_child(
    args: dict[str, Any],
    progress: bool,
    timeout: float | None,
    *,
    entry: str = "suite.data:_writer_child_main",
    what: str = "Fashion-MNIST betons",
    files: Sequence[str] = tuple(SPLIT_FILES.values()),
) -> None:
    """Run ``entry(args_json)`` (``module:function``, returns an exit status and writes
    ``{"ok": ...}`` to ``args["result_file"]``) in a child Python process in its own
    session; on timeout/interrupt/failure kill its process group and remove the
    temporary files (:func:`_tmp_name`) of ``files`` in ``args["out_dir"]``."""
    import signal

    out_dir = Path(args["out_dir"])
    mod, fn = entry.split(":")
    fd, res_path = tempfile.mkstemp(dir=out_dir, prefix=".fashion_mnist_result.", suffix=".json")
    os.close(fd)
    args = dict(args, result_file=res_path)
    pkg_root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    code = f"import sys; from {mod} import {fn}; sys.exit({fn}(sys.argv[1]))"
    capture = None if progress else subprocess.PIPE
    proc = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(args)],
        env=env,
        stdout=capture,
        stderr=subprocess.STDOUT if capture else None,
        start_new_session=True,
    )  # own process group: kill writer workers too
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException as e:  # timeout, KeyboardInterrupt, ...
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        _cleanup_tmp(out_dir, proc.pid, files)
        Path(res_path).unlink(missing_ok=True)
        if isinstance(e, subprocess.TimeoutExpired):
            raise RuntimeError(
                f"writing {what} into {out_dir} took more than {timeout} s; the writer was killed"
            ) from None
        raise
    try:
        res = json.loads(Path(res_path).read_text() or "{}")
    except (OSError, ValueError):
        res = {}
    finally:
        Path(res_path).unlink(missing_ok=True)
    if proc.returncode == 0 and res.get("ok"):
        return
    # the child's own process group may hold orphaned writer workers after a crash
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    _cleanup_tmp(out_dir, proc.pid, files)
    tail = (out or b"").decode(errors="replace")[-3000:]
    msg = res.get("message") or f"writer process exited with status {proc.returncode}"
    detail = f"\n--- writer output (tail) ---\n{tail}" if tail else ""
    if res.get("error_type") == "DataError":
        raise DataError(msg + detail)
    raise RuntimeError(f"writing {what} into {out_dir} failed: {msg}{detail}")


def _publish(tmp: Path, final: Path) -> None:
    """fsync a finished temporary file, rename it to its final name, fsync the folder."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dfd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _tmp_name(final: Path, pid: int) -> Path:
    return final.parent / f".{final.name}.tmp-{pid}"


def _cleanup_tmp(out_dir: Path, pid: int, files: Sequence[str] = tuple(SPLIT_FILES.values())) -> None:
    for name in files:
        _tmp_name(out_dir / name, pid).unlink(missing_ok=True)


class _ArrayDataset:
    """Indexable (image, label, source row) over in-memory arrays for FFCV's DatasetWriter;
    images are reshaped to `shape` (Fashion-MNIST's (1, 28, 28)) unless it is None."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, rows: np.ndarray, shape: Optional[tuple[int, ...]] = IMAGE_SHAPE
    ):
        self.images, self.labels, self.rows, self.shape = images, labels, rows, shape

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def __getitem__(self, i: int):
        r = int(self.rows[i])
        img = self.images[r]
        return (img.reshape(self.shape) if self.shape is not None else img), int(self.labels[r]), r


def _safe_writer_worker(*args):
    """FFCV's writer waits forever for a worker that died; kill the whole group instead."""
    import signal
    import traceback

    _import_ffcv()
    from ffcv.writer import worker_job_indexed_dataset

    try:
        worker_job_indexed_dataset(*args)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os.killpg(os.getpgid(0), signal.SIGTERM)
        raise


def _write_split(path: Path, ds: _ArrayDataset, num_workers: int) -> None:
    _import_ffcv()
    from ffcv.fields import IntField, NDArrayField
    from ffcv.utils import chunks
    from ffcv.writer import DatasetWriter

    fields = {"image": NDArrayField(np.dtype("uint8"), IMAGE_SHAPE), "label": IntField(), "index": IntField()}
    # smallest page FFCV allows (2 MiB): each writer worker pads its last page, so the
    # default 8 MiB pages would triple the size of the 4-8 MB val/test files
    writer = DatasetWriter(str(path), fields, page_size=1 << 21, num_workers=num_workers)
    indices = list(enumerate(range(len(ds))))
    # same as DatasetWriter.from_indexed_dataset, with a worker that cannot hang the writer
    writer._write_common(len(indices), chunks(indices, 1000), _safe_writer_worker, (ds,))


def _writer_child_main(args_json: str) -> int:
    args = json.loads(args_json)
    out_dir = Path(args["out_dir"])
    res_file = Path(args["result_file"])
    pid = os.getpid()
    try:
        src = fashion_mnist_source(args["root"])
        train_rows, val_rows = split_indices(args["val_size"], args["split_seed"])
        datasets = {
            "train": _ArrayDataset(src.train_images, src.train_labels, train_rows),
            "val": _ArrayDataset(src.train_images, src.train_labels, val_rows),
            "test": _ArrayDataset(src.test_images, src.test_labels, np.arange(N_TEST_SOURCE)),
        }
        nw = args.get("num_workers") or min(os.cpu_count() or 1, 4)
        for split in args["splits"]:
            final = out_dir / SPLIT_FILES[split]
            tmp = _tmp_name(final, pid)
            ds = datasets[split]
            if args.get("progress"):
                print(f"[fashion-mnist] writing {final} ({len(ds)} images)", file=sys.stderr, flush=True)
            _write_split(tmp, ds, nw)
            check_beton(tmp, expected_count=len(ds))
            _publish(tmp, final)
        res_file.write_text(json.dumps({"ok": True}))
        return 0
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        import traceback

        traceback.print_exc()
        _cleanup_tmp(out_dir, pid)
        res_file.write_text(json.dumps({"ok": False, "error_type": type(e).__name__, "message": str(e)}))
        return 1


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

_FFCV_CLASSES: dict[str, Any] = {}
# float32((v / 255 - mean) / std) for every uint8 value v (computed in float64)
_NORMALISE_LUT = ((np.arange(256) / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD).astype(np.float32)
# ffcv.types.HeaderType (format version 2), copied so that reading a header is import-free
_HEADER_TYPE = np.dtype(
    [
        ("version", "<u2"),
        ("num_fields", "<u2"),
        ("page_size", "<u4"),
        ("num_samples", "<u8"),
        ("alloc_table_ptr", "<u8"),
    ],
    align=True,
)


def _ffcv_classes() -> dict[str, Any]:
    """Build (once) the Loader/EpochIterator subclasses; imports FFCV."""
    if _FFCV_CLASSES:
        return _FFCV_CLASSES
    _import_ffcv()
    from ffcv.loader import Loader
    from ffcv.loader.epoch_iterator import EpochIterator

    class _EpochIterator(EpochIterator):
        """Seeds the augmentations' random draws, then runs FFCV's pipeline. Keeps the
        exception that killed the worker thread; the consumer re-raises it (chained, with its
        traceback) instead of waiting forever on the output queue."""

        error: BaseException | None = None

        def __init__(self, loader, order, augment_seed: int):
            import torch

            self.augment_seed = augment_seed  # before FFCV's __init__ starts the thread
            # FFCV allocates its batch buffers here, every pass, with torch.empty; under
            # torch.use_deterministic_algorithms torch fills new memory with NaN, which cost
            # ~1 s per pass of a 224 px evaluation loader (1.5 GB of buffers). FFCV writes every
            # element it hands out, so the fill is skipped for these buffers
            fill = torch.utils.deterministic.fill_uninitialized_memory
            torch.utils.deterministic.fill_uninitialized_memory = False
            try:
                super().__init__(loader, order)
            finally:
                torch.utils.deterministic.fill_uninitialized_memory = fill

        def run(self):
            try:
                # FFCV's random augmentations (crops, flips, shifts) draw from numba's generator,
                # which is per thread and seeded from the OS unless seeded in compiled code: seeded
                # here, in the thread that runs the pipeline, the draws of a pass depend only on
                # (seed, pass, rank), and a resumed run replays them (suite/batches.py). Not so
                # for ImageNet with several loader threads: FFCV's random-resized-crop decoder
                # draws inside its parallel loop, on whichever threads run its parts
                _seed_numba(self.augment_seed)
                super().run()
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                self.error = e

    class _Loader(Loader):
        def __iter__(self):  # ffcv 1.0.2 Loader.__iter__ with our iterator class
            from ffcv.pipeline.compiler import Compiler

            Compiler.set_num_threads(self.num_workers)
            order = self.next_traversal_order()
            selected_order = order[: len(self) * self.batch_size]
            seed = augment_seed(self.augment_base, self.next_epoch, self.augment_rank)
            self.next_epoch += 1
            if self.code is None or self.recompile:
                self.generate_code()
            return _EpochIterator(self, selected_order, seed)

    _FFCV_CLASSES.update(Loader=_Loader, EpochIterator=_EpochIterator)
    return _FFCV_CLASSES


def augment_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of numba's generator for one pass of a loader: a function of the run's seed,
    the pass and the rank only (ranks draw differently, as they see different images)."""
    return int(np.random.SeedSequence([seed, epoch, rank, 0xA06]).generate_state(1)[0])


_NUMBA_SEED: list[Any] = []


def _seed_numba(seed: int) -> None:
    """Seed numba's random generator of the calling thread (a numpy call from Python would
    seed numpy's, not numba's)."""
    if not _NUMBA_SEED:
        from numba import njit

        @njit
        def seed_(s):
            np.random.seed(s)

        _NUMBA_SEED.append(seed_)
    _NUMBA_SEED[0](seed)


def _import_ffcv() -> None:
    """Import FFCV once. ``import ffcv`` runs ``Compiler.set_num_threads(1)``, which calls
    ``torch.set_num_threads(1)`` for the whole process: undo that."""
    if "ffcv.loader" in sys.modules:
        return
    import numba.typed

    # ffcv/fields/rgb_image.py fills a numba typed Dict at import time ({'jpg': 0, 'raw': 1}),
    # read only from Python; creating it compiles numba's dict code, which is never cached:
    # ~7 s of every process's startup on a 2-core machine. A plain dict serves the same reads.
    typed_dict = numba.typed.Dict
    numba.typed.Dict = dict
    try:
        with _keep_torch_threads():
            import ffcv.loader  # noqa: F401
    finally:
        numba.typed.Dict = typed_dict


@contextmanager
def _keep_torch_threads():
    """FFCV calls torch.set_num_threads(num_workers) on Loader creation and every epoch;
    keep the caller's setting (training on CPU would otherwise run on 1 thread)."""
    import torch

    n = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def loader_thread_limit() -> int:
    """FFCV's loader threads are numba's, which allows at most NUMBA_NUM_THREADS (by default the
    CPU count) per process: the most engine.loader_workers can be on this machine."""
    import numba

    return int(numba.config.NUMBA_NUM_THREADS)


class FashionMNISTLoader:
    """Iterable over ``(x, y)`` batches of a Fashion-MNIST beton (see :func:`make_loader`).

    The FFCV Loader is built on first use (``.ffcv``), so creating this object is cheap.
    Each ``iter()`` is one epoch; RANDOM order reshuffles per epoch with seed
    ``seed + epoch`` (``set_epoch`` to resume); random augmentations (RGB datasets) draw from
    numba's generator seeded with :func:`augment_seed` (seed, epoch, rank): the same pixels
    for every number of loader threads, except ImageNet's crops with more than one. Batches
    are fresh tensors (not views of FFCV's reused buffers), so they may be kept. Abandoning an epoch half way (``break``)
    stops and joins FFCV's worker thread; so does starting the next epoch or ``close()``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        batch_size: int,
        train: bool,
        seed: int = 0,
        num_workers: int = 1,
        distributed: bool = False,
        drop_last: bool | None = None,
        indices: Sequence[int] | np.ndarray | None = None,
        raw: bool = False,
        batches_ahead: int = 3,
        os_cache: bool = True,
    ):
        self.path = Path(path)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.distributed = bool(distributed)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.raw = bool(raw)
        self.batches_ahead = int(batches_ahead)
        self.os_cache = bool(os_cache)
        self._num_samples = self._read_num_samples()
        if indices is not None:
            indices = np.asarray(indices, dtype=np.int64).reshape(-1)
            if indices.size and (indices.min() < 0 or indices.max() >= self._num_samples):
                raise IndexError(f"{self.path}: indices must lie in 0..{self._num_samples - 1}")
        self.indices = indices
        if self.distributed:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    "distributed=True needs an initialised torch.distributed "
                    "process group (e.g. init_process_group('gloo'))"
                )
            self._world, self._rank = dist.get_world_size(), dist.get_rank()
        else:
            self._world, self._rank = 1, 0
        self._epoch = 0
        self._ffcv = None
        self._active: weakref.ref | None = None

    def _read_num_samples(self) -> int:
        # header only, without importing FFCV (~10 s: torch, numba, cv2); see check_beton()
        if not self.path.is_file():
            raise DataError(f"{self.path}: beton file missing")
        if self.path.stat().st_size < _HEADER_TYPE.itemsize:
            raise DataError(f"{self.path}: truncated (smaller than the FFCV header)")
        header = np.fromfile(self.path, dtype=_HEADER_TYPE, count=1)[0]
        if int(header["version"]) != 2:
            raise DataError(f"{self.path}: not an FFCV v2 beton")
        return int(header["num_samples"])

    # --- size ------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Samples this process visits per epoch (before drop_last)."""
        n = self._num_samples if self.indices is None else int(self.indices.shape[0])
        if self.distributed:  # DistributedSampler(drop_last=False) pads to a multiple
            n = math.ceil(n / self._world)
        return n

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    # --- FFCV ------------------------------------------------------------------------
    @property
    def ffcv(self):
        """The underlying ffcv.loader.Loader (built on first access)."""
        if self._ffcv is None:
            _import_ffcv()
            from ffcv.loader import OrderOption

            Loader = _ffcv_classes()["Loader"]
            # an evaluation pass over fewer samples than a batch is one batch of all of them:
            # FFCV sizes its buffers (batches_ahead + 2 batches) by the batch size it is given
            ffcv_batch = self.batch_size if self.drop_last else max(1, min(self.batch_size, self.num_samples))
            with _keep_torch_threads():
                self._ffcv = Loader(
                    str(self.path),
                    batch_size=ffcv_batch,
                    num_workers=self.num_workers,
                    os_cache=self.os_cache,
                    order=OrderOption.RANDOM if self.train else OrderOption.SEQUENTIAL,
                    distributed=self.distributed,
                    seed=self.seed,
                    indices=self.indices,
                    pipelines=self._pipelines(),
                    drop_last=self.drop_last,
                    batches_ahead=self.batches_ahead,
                )
            self._ffcv.next_epoch = self._epoch
            self._ffcv.augment_base, self._ffcv.augment_rank = self.seed, self._rank
            if len(self._ffcv) != len(self):
                raise RuntimeError(f"internal: FFCV says {len(self._ffcv)} batches, expected {len(self)}")
        return self._ffcv

    def _pipelines(self) -> dict[str, Any]:
        """FFCV pipelines per field (subclasses: other datasets/augmentations)."""
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.ndarray import NDArrayDecoder
        from ffcv.transforms import ToTensor

        return {"image": [NDArrayDecoder(), ToTensor()], "label": [IntDecoder(), ToTensor()], "index": None}

    def _convert(self, img, lab) -> tuple[Any, Any]:
        """FFCV's batch -> fresh ``(x, y)`` tensors (FFCV reuses its output buffers)."""
        import torch

        # numpy, single-threaded, into fresh arrays: FFCV reuses its output buffers
        # a few batches later, and torch ops here would use torch's intra-op pool
        # (which competes with FFCV's numba threads: measured 5-7x slower)
        y = torch.from_numpy(lab.numpy().reshape(-1).astype(np.int64))
        u8 = img.numpy()
        x = torch.from_numpy(u8.copy() if self.raw else np.take(_NORMALISE_LUT, u8))
        return x, y

    def set_epoch(self, epoch: int) -> None:
        """Epoch number used for the next iteration's RANDOM order (seed + epoch)."""
        self._epoch = int(epoch)
        if self._ffcv is not None:
            self._ffcv.next_epoch = self._epoch

    @property
    def epoch(self) -> int:
        """Epoch number the next ``iter()`` will use."""
        return self._ffcv.next_epoch if self._ffcv is not None else self._epoch

    # --- iteration -------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        self.close()  # an epoch left half way keeps FFCV's thread (and its buffers) busy
        gen = self._epoch_gen()
        # weak: dropping the caller's iterator (``break``, ``del``) must finalise it
        self._active = weakref.ref(gen)
        return gen

    def close(self) -> None:
        """Stop a running epoch (if any) and join FFCV's worker thread."""
        ref, self._active = self._active, None
        gen = ref() if ref is not None else None
        if gen is not None:
            gen.close()

    def _epoch_gen(self):
        import torch

        loader = self.ffcv
        n_threads = torch.get_num_threads()
        with _keep_torch_threads():
            it = iter(loader)
        self._epoch = loader.next_epoch
        try:
            while True:
                batch = _next_batch(it, self.path)
                # FFCV's thread calls torch.set_num_threads(num_workers) when it starts,
                # which is process-wide: give the caller its setting back
                if torch.get_num_threads() != n_threads:
                    torch.set_num_threads(n_threads)
                if batch is None:
                    return
                yield self._convert(*batch)
        finally:
            it.close()  # the thread notices within ~0.5 s (FFCV polls its queue)
            if it is not threading.current_thread():
                it.join(timeout=10.0)
            if torch.get_num_threads() != n_threads:
                torch.set_num_threads(n_threads)

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __enter__(self) -> FashionMNISTLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, batch_size={self.batch_size}, "
            f"train={self.train}, seed={self.seed}, num_workers={self.num_workers}, "
            f"distributed={self.distributed}, drop_last={self.drop_last}, raw={self.raw}, "
            f"batches={len(self)})"
        )


def _next_batch(it, path: Path, poll: float = 0.5):
    """EpochIterator.__next__ that raises if FFCV's worker thread died (instead of
    blocking forever on its output queue)."""
    while True:
        try:
            item = it.output_queue.get(timeout=poll)
            break
        except queue.Empty:
            if not it.is_alive():
                try:
                    item = it.output_queue.get_nowait()
                    break
                except queue.Empty:
                    err = getattr(it, "error", None)
                    raise RuntimeError(
                        f"{path}: FFCV loader thread died mid-epoch: {type(err).__name__ if err else 'unknown'}: {err}"
                    ) from err
    if item is None:
        return None
    slot, result = item
    if getattr(it, "current_stream", None) is not None:  # FFCV's CUDA stream handshake
        it.current_stream.wait_stream(it.cuda_streams[slot])
    return result


def make_loader(
    path: str | os.PathLike,
    batch_size: int,
    train: bool,
    seed: int = 0,
    num_workers: int = 1,
    distributed: bool = False,
    drop_last: bool | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    raw: bool = False,
    batches_ahead: int = 3,
    os_cache: bool = True,
) -> FashionMNISTLoader:
    """Loader over a Fashion-MNIST beton, CPU only.

    Yields ``(x, y)``: ``x`` float32 ``(B, 1, 28, 28)`` = ``(pixel / 255 - 0.2860) / 0.3530``
    (or the uint8 pixels when ``raw=True``), ``y`` int64 ``(B,)``. ``train=True``: RANDOM
    order (seed + epoch), ``drop_last`` defaults to True; ``train=False``: SEQUENTIAL,
    ``drop_last`` defaults to False. ``distributed=True`` shards like PyTorch's
    DistributedSampler (needs an initialised process group; pads with repeated samples
    to a multiple of the world size). ``indices`` restricts to a subset of rows.
    ``num_workers`` is FFCV's numba thread count. The first epoch in a process pays a
    few seconds of numba compilation.
    """
    return FashionMNISTLoader(
        path,
        batch_size,
        train,
        seed=seed,
        num_workers=num_workers,
        distributed=distributed,
        drop_last=drop_last,
        indices=indices,
        raw=raw,
        batches_ahead=batches_ahead,
        os_cache=os_cache,
    )
