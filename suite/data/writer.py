"""Writing Fashion-MNIST as FFCV ``.beton`` files: :func:`write_fashion_mnist` writes
``fashion_mnist_{train,val,test}.beton`` plus ``fashion_mnist_meta.json``. The writing runs in a
separate Python process (FFCV's DatasetWriter forks; forking a process that has live Loader
threads can deadlock); every file is written under a temporary name, checked, then atomically
renamed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import numpy as np

from suite.data.files import (
    CLASS_NAMES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_ROOT,
    FASHION_MNIST_STD,
    IMAGE_SHAPE,
    META_FILE,
    META_VERSION,
    N_TEST_SOURCE,
    N_TRAIN_SOURCE,
    SPLIT_FILES,
    DataError,
    _check_val_size,
    _import_ffcv,
    _sha256,
    _source_paths,
    check_beton,
    fashion_mnist_source,
    split_indices,
)

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
    entry: str = "suite.data.writer:_writer_child_main",
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
    pkg_root = str(Path(__file__).resolve().parents[2])  # the checkout that holds suite/
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
