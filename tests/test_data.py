"""suite.data: Fashion-MNIST IDX source -> FFCV betons -> loaders.

The betons are written once per session (about 10-30 s: the writer runs in a child
process that imports FFCV). Tests that iterate FFCV loaders or spawn writers carry a
timeout, so a hang fails instead of blocking the run.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from suite import data as D

ROOT = Path(D.FASHION_MNIST_ROOT)
needs_source = pytest.mark.skipif(not ROOT.is_dir(), reason=f"{ROOT} absent: apt-get install dataset-fashion-mnist")
TIMEOUT = pytest.mark.timeout(300)


@pytest.fixture(scope="session")
def source():
    return D.fashion_mnist_source()


def _collect(loader):
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    import torch

    return torch.cat(xs).numpy(), torch.cat(ys).numpy()


def _source_rows(path):
    """The 'index' field (row in the source IDX file) of every sample, in file order."""
    D._import_ffcv()  # a bare `import ffcv` sets torch.set_num_threads(1)
    from ffcv.reader import Reader

    r = Reader(str(path))
    return np.asarray(r.metadata[r.metadata.dtype.names[r.field_names.index("index")]])


def _rows_as_bytes(images):
    flat = np.ascontiguousarray(images.reshape(images.shape[0], -1))
    return np.sort(flat.view(np.dtype((np.void, flat.shape[1]))).ravel())


def _ffcv_threads():
    return [t for t in threading.enumerate() if t.is_alive() and type(t).__name__ == "_EpochIterator"]


# ---------------------------------------------------------------------------------------
# IDX source
# ---------------------------------------------------------------------------------------


@needs_source
def test_source_arrays(source):
    assert source.train_images.shape == (60000, 28, 28) and source.train_images.dtype == np.uint8
    assert source.test_images.shape == (10000, 28, 28) and source.test_images.dtype == np.uint8
    assert source.train_labels.shape == (60000,) and source.test_labels.shape == (10000,)
    assert np.bincount(source.train_labels, minlength=10).tolist() == [6000] * 10
    assert np.bincount(source.test_labels, minlength=10).tolist() == [1000] * 10
    mean = source.train_images.mean() / 255
    std = source.train_images.std() / 255
    assert abs(mean - D.FASHION_MNIST_MEAN) < 1e-3 and abs(std - D.FASHION_MNIST_STD) < 1e-3


def test_source_folder_missing(tmp_path):
    with pytest.raises(D.DataError, match=r"apt-get install dataset-fashion-mnist"):
        D.fashion_mnist_source(tmp_path / "nowhere")


def _fake_root(tmp_path, **overrides):
    """A copy of the source folder (symlinks) with some files replaced by raw bytes."""
    root = tmp_path / "fm"
    root.mkdir()
    for p in ROOT.iterdir():
        (root / p.name).symlink_to(p)
    for name, payload in overrides.items():
        (root / name).unlink(missing_ok=True)
        if payload is not None:
            with gzip.open(root / name, "wb") as f:
                f.write(payload)
    return root


def _idx(magic, dims, payload):
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + payload


@needs_source
@pytest.mark.parametrize(
    "name,payload,pattern",
    [
        ("train-labels-idx1-ubyte.gz", _idx(0x803, [60000], bytes(60000)), "bad IDX magic"),
        ("train-labels-idx1-ubyte.gz", _idx(0x801, [59999], bytes(59999)), "IDX shape"),
        ("train-labels-idx1-ubyte.gz", _idx(0x801, [60000], bytes(59000)), "data bytes"),
        ("t10k-labels-idx1-ubyte.gz", _idx(0x801, [10000], bytes([10]) * 10000), "outside 0..9"),
        ("t10k-images-idx3-ubyte.gz", None, "file missing"),
    ],
)
def test_source_validation_names_file(tmp_path, name, payload, pattern):
    root = _fake_root(tmp_path, **{name: payload})
    with pytest.raises(D.DataError, match=pattern) as exc:
        D.fashion_mnist_source(root)
    assert str(root / name) in str(exc.value)


@needs_source
def test_source_not_gzip_names_file(tmp_path):
    root = _fake_root(tmp_path)
    bad = root / "t10k-images-idx3-ubyte.gz"
    bad.unlink()
    bad.write_bytes(b"definitely not gzip")
    with pytest.raises(D.DataError, match="cannot read") as exc:
        D.fashion_mnist_source(root)
    assert str(bad) in str(exc.value)


def test_split_indices():
    tr, va = D.split_indices(5000, 0)
    assert len(va) == 5000 and len(tr) == 55000
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(60000))
    tr1, va1 = D.split_indices(5000, 1)
    assert not np.array_equal(va, va1)
    with pytest.raises(ValueError):
        D.split_indices(0, 0)


# ---------------------------------------------------------------------------------------
# writing + check_beton
# ---------------------------------------------------------------------------------------


@needs_source
@TIMEOUT
def test_write_outputs_and_meta(betons):
    assert set(betons) == {"train", "val", "test", "meta"}
    out = betons["meta"].parent
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        list(D.SPLIT_FILES.values()) + [D.META_FILE]
    )
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # no temporaries left
    meta = json.loads(betons["meta"].read_text())
    assert meta["counts"] == {"train": 55000, "val": 5000, "test": 10000}
    assert meta["split_seed"] == 0 and meta["val_size"] == 5000
    assert meta["class_names"][0] == "T-shirt/top" and len(meta["class_names"]) == 10
    assert set(meta["source"]["files"]) == {p.name for p in ROOT.iterdir()}
    assert all(len(v["sha256"]) == 64 for v in meta["source"]["files"].values())
    for split, n in meta["counts"].items():
        info = D.check_beton(betons[split], expected_count=n)
        assert info["num_samples"] == n and info["has_index"]
        assert meta["files"][split]["bytes"] == betons[split].stat().st_size


@needs_source
@TIMEOUT
def test_write_again_skips_valid_files(betons):
    stamps = {k: betons[k].stat().st_mtime_ns for k in D.SPLIT_FILES}
    t0 = time.perf_counter()
    again = D.write_fashion_mnist(betons["meta"].parent, progress=False)
    assert time.perf_counter() - t0 < 10  # no child process, no FFCV import of the writer
    assert again == betons
    assert {k: betons[k].stat().st_mtime_ns for k in D.SPLIT_FILES} == stamps


@needs_source
@TIMEOUT
def test_check_beton_truncated(betons, tmp_path):
    src = betons["val"]
    size = src.stat().st_size
    for cut in (10, 100, 5000, size // 2, size - 1):
        bad = tmp_path / f"cut_{cut}.beton"
        shutil.copyfile(src, bad)
        with open(bad, "r+b") as f:
            f.truncate(cut)
        with pytest.raises(D.DataError) as exc:
            D.check_beton(bad, expected_count=5000)
        assert str(bad) in str(exc.value), exc.value


@needs_source
@TIMEOUT
def test_check_beton_wrong_count_and_unfinished(betons, tmp_path):
    with pytest.raises(D.DataError, match="5000 samples, expected 4999") as exc:
        D.check_beton(betons["val"], expected_count=4999)
    assert str(betons["val"]) in str(exc.value)
    # a writer killed before finalising leaves alloc_table_ptr = 0 in the header
    bad = tmp_path / "unfinished.beton"
    shutil.copyfile(betons["val"], bad)
    header = np.fromfile(bad, dtype=D._HEADER_TYPE, count=1)
    header["alloc_table_ptr"] = 0
    with open(bad, "r+b") as f:
        f.write(header.tobytes())
    with pytest.raises(D.DataError, match="unfinished") as exc:
        D.check_beton(bad)
    assert str(bad) in str(exc.value)


def test_check_beton_missing(tmp_path):
    missing = tmp_path / "nope" / "fashion_mnist_val.beton"
    with pytest.raises(D.DataError, match="missing") as exc:
        D.check_beton(missing)
    assert str(missing) in str(exc.value)
    with pytest.raises(D.DataError) as exc:
        D.make_loader(missing, 64, train=False)
    assert str(missing) in str(exc.value)


def test_header_type_matches_ffcv():
    D._import_ffcv()
    from ffcv.types import HeaderType

    assert D._HEADER_TYPE == HeaderType


@needs_source
@TIMEOUT
def test_writer_error_propagates_and_leaves_nothing(tmp_path):
    root = _fake_root(tmp_path, **{"train-labels-idx1-ubyte.gz": _idx(0x803, [60000], bytes(60000))})
    out = tmp_path / "out"
    with pytest.raises(D.DataError, match="bad IDX magic"):
        D.write_fashion_mnist(out, root=root, progress=False)
    assert [p.name for p in out.iterdir() if not p.name.startswith(".fashion_mnist.lock")] == []


# ---------------------------------------------------------------------------------------
# round trips through the loader
# ---------------------------------------------------------------------------------------


@needs_source
@TIMEOUT
def test_roundtrip_test_split_exact(betons, source):
    loader = D.make_loader(betons["test"], 1000, train=False, raw=True)
    assert len(loader) == 10
    x, y = _collect(loader)
    assert x.dtype == np.uint8 and x.shape == (10000, 1, 28, 28)
    assert y.dtype == np.int64 and y.shape == (10000,)
    assert np.array_equal(_source_rows(betons["test"]), np.arange(10000))
    assert np.array_equal(x[:, 0], source.test_images)
    assert np.array_equal(y, source.test_labels)


@needs_source
@TIMEOUT
def test_roundtrip_train_plus_val_exact(betons, source):
    rows, xs, ys = [], [], []
    for split in ("train", "val"):
        x, y = _collect(D.make_loader(betons[split], 1024, train=False, raw=True, num_workers=2))
        r = _source_rows(betons[split])
        assert x.shape[0] == y.shape[0] == r.shape[0] == D.check_beton(betons[split])["num_samples"]
        rows.append(r), xs.append(x[:, 0]), ys.append(y)
    tr_rows, va_rows = rows
    # disjoint, and together exactly the 60k source rows, in the documented split
    assert np.intersect1d(tr_rows, va_rows).size == 0
    assert np.array_equal(np.sort(np.concatenate(rows)), np.arange(60000))
    exp_tr, exp_va = D.split_indices(5000, 0)
    assert np.array_equal(tr_rows, exp_tr) and np.array_equal(va_rows, exp_va)
    # every pixel and label, matched by row ...
    allrows, allx, ally = np.concatenate(rows), np.concatenate(xs), np.concatenate(ys)
    assert np.array_equal(allx, source.train_images[allrows])
    assert np.array_equal(ally, source.train_labels[allrows])
    # ... and as multisets, without trusting the index field
    assert np.array_equal(_rows_as_bytes(allx), _rows_as_bytes(source.train_images))
    assert np.array_equal(np.sort(ally), np.sort(source.train_labels))


@needs_source
@TIMEOUT
def test_normalised_batches(betons, source):
    import torch

    loader = D.make_loader(betons["test"], 256, train=False)
    assert len(loader) == math.ceil(10000 / 256)
    x, y = _collect(loader)
    assert x.dtype == np.float32 and x.shape == (10000, 1, 28, 28)
    raw = source.test_images[:, None].astype(np.float64)
    expected = ((raw / 255.0 - 0.2860) / 0.3530).astype(np.float32)
    assert np.array_equal(x, expected)
    # undoing the normalisation gives back the pixels exactly
    assert np.array_equal(np.rint((x.astype(np.float64) * 0.3530 + 0.2860) * 255), raw)
    assert np.array_equal(y, source.test_labels)
    # train: full batches only (drop_last defaults to True), tensors of the right kind
    tl = D.make_loader(betons["train"], 256, train=True)
    assert len(tl) == 55000 // 256
    n = 0
    for xb, yb in tl:
        assert isinstance(xb, torch.Tensor) and xb.shape == (256, 1, 28, 28)
        assert xb.dtype == torch.float32 and yb.dtype == torch.int64 and yb.shape == (256,)
        n += 1
    assert n == len(tl)


@needs_source
@TIMEOUT
def test_random_order_is_seeded_per_epoch(betons):
    def epoch(loader):
        x, y = _collect(loader)
        return x.reshape(len(x), -1), y

    a = D.make_loader(betons["val"], 500, train=True, seed=3, drop_last=False, raw=True)
    assert len(a) == 10
    x0, y0 = epoch(a)
    x1, y1 = epoch(a)
    assert x0.shape == (5000, 784)
    assert not np.array_equal(x0, x1)  # reshuffled
    assert np.array_equal(_rows_as_bytes(x0), _rows_as_bytes(x1))  # same samples
    assert np.array_equal(np.sort(y0), np.sort(y1))
    b = D.make_loader(betons["val"], 500, train=True, seed=3, drop_last=False, raw=True)
    assert np.array_equal(epoch(b)[0], x0)  # same seed, same order
    b.set_epoch(1)
    assert np.array_equal(epoch(b)[0], x1)  # resumable per epoch
    c = D.make_loader(betons["val"], 500, train=True, seed=4, drop_last=False, raw=True)
    assert not np.array_equal(epoch(c)[0], x0)


@needs_source
@TIMEOUT
def test_indices_subset(betons, source):
    rows = np.arange(0, 10000, 7)
    x, y = _collect(D.make_loader(betons["test"], 100, train=False, raw=True, indices=rows))
    assert np.array_equal(x[:, 0], source.test_images[rows])
    assert np.array_equal(y, source.test_labels[rows])


@needs_source
@TIMEOUT
def test_abandoned_epoch_releases_ffcv_thread(betons):
    import torch

    n_threads = torch.get_num_threads()
    loader = D.make_loader(betons["val"], 64, train=True)
    for i, _ in enumerate(loader):
        if i == 2:
            break
    deadline = time.time() + 15
    while _ffcv_threads() and time.time() < deadline:
        time.sleep(0.1)
    assert not _ffcv_threads()
    it = iter(loader)
    next(it)
    assert _ffcv_threads()
    again = sum(1 for _ in loader)  # a new epoch closes the abandoned one
    assert again == len(loader)
    assert not _ffcv_threads()
    assert torch.get_num_threads() == n_threads  # FFCV sets torch threads; we restore them
    del it


@needs_source
@TIMEOUT
@pytest.mark.slow  # writes the 70,000-image dataset twice (~18 s): `make test` runs it, not the fast tier
def test_write_while_a_loader_is_half_consumed(betons, tmp_path):
    """The platform trap: writing after a half-consumed loader must not deadlock (the
    writer runs in a child process). Also: a new split rewrites train/val, not test."""
    loader = D.make_loader(betons["val"], 64, train=True)
    it = iter(loader)
    next(it)  # keep it half consumed while writing
    out = tmp_path / "other"
    first = D.write_fashion_mnist(out, val_size=1000, split_seed=1, progress=False)
    assert D.check_beton(first["val"])["num_samples"] == 1000
    assert D.check_beton(first["train"])["num_samples"] == 59000
    test_inode = first["test"].stat().st_ino
    val_rows_1 = _source_rows(first["val"])
    second = D.write_fashion_mnist(out, val_size=1000, split_seed=2, progress=False)
    assert second["test"].stat().st_ino == test_inode  # untouched
    assert not np.array_equal(_source_rows(second["val"]), val_rows_1)
    meta = json.loads(second["meta"].read_text())
    assert meta["split_seed"] == 2 and meta["counts"]["train"] == 59000
    next(it)  # the old iterator still works
    del it


_DIST_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, torch, torch.distributed as dist
    from suite.data import make_loader
    rank, world, init, path, out = int(sys.argv[1]), 2, sys.argv[2], sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    loader = make_loader(path, 128, train=True, distributed=True, drop_last=False, raw=True)
    xs = [x.numpy() for x, _ in loader]
    ev = make_loader(path, 128, train=False, distributed=True)
    n_eval = sum(len(y) for _, y in ev)
    np.savez(out, x=np.concatenate(xs), n_batches=len(loader), n_eval=n_eval, eval_len=len(ev))
    dist.barrier()
    dist.destroy_process_group()
""")


@pytest.mark.slow  # two processes over gloo
@needs_source
@TIMEOUT
def test_distributed_gloo_two_ranks(betons, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(_DIST_SCRIPT)
    init = f"file://{tmp_path / 'pg_init'}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(D.__file__).resolve().parents[2]))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), init, str(betons["val"]), str(tmp_path / f"r{r}.npz")], env=env
        )
        for r in range(2)
    ]
    try:
        for p in procs:
            assert p.wait(timeout=240) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    r0, r1 = (np.load(tmp_path / f"r{r}.npz") for r in range(2))
    for r in (r0, r1):
        assert int(r["n_batches"]) == math.ceil(2500 / 128) == int(r["eval_len"])
        assert r["x"].shape == (2500, 1, 28, 28) and int(r["n_eval"]) == 2500
    both = np.concatenate([r0["x"], r1["x"]])
    x_all, _ = _collect(D.make_loader(betons["val"], 1000, train=False, raw=True))
    # the two shards are disjoint and cover the val split
    assert np.array_equal(_rows_as_bytes(both), _rows_as_bytes(x_all))


@needs_source
@TIMEOUT
def test_dead_ffcv_thread_raises_instead_of_hanging(betons):
    loader = D.make_loader(betons["val"], 100, train=False)

    def boom(**_):
        raise ZeroDivisionError("injected")

    loader.ffcv.code = ([(boom, [])], [])  # what EpochIterator.run_pipeline executes
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match="thread died.*injected"):
        next(iter(loader))
    assert time.perf_counter() - t0 < 30
    assert not _ffcv_threads()


@needs_source
@TIMEOUT
def test_writer_timeout_kills_child_and_leaves_nothing(tmp_path):
    out = tmp_path / "killed"
    with pytest.raises(RuntimeError, match="killed"):
        D.write_fashion_mnist(out, progress=False, timeout=1.0)
    left = [p.name for p in out.iterdir() if p.name != ".fashion_mnist.lock"]
    assert left == []  # neither final nor temporary files
