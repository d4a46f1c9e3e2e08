"""Fashion-MNIST's source files and the checks of every FFCV ``.beton`` file.

- :func:`fashion_mnist_source` reads the IDX ``.gz`` files of the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) and validates them;
  :func:`split_indices` draws the train/val split.
- :func:`check_beton` validates a file cheaply (header, fields, allocation table, labels).
- FFCV's import (:func:`_import_ffcv`, once, cheaply) and the thread settings it must not
  change (:func:`_keep_torch_threads`, :func:`loader_thread_limit`).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import struct
import sys
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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
