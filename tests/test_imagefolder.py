"""suite.images: class folders / CIFAR pickles -> FFCV betons -> recipe loaders.

Small generated data only (a few hundred JPEGs of 40..300 px, fake CIFAR pickles of the
real layout). Writers run in child processes; tests that iterate FFCV loaders or spawn
writers carry a timeout, so a hang fails instead of blocking the run.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from suite import bench_data, datasets
from suite import images as I
from suite.data import DataError

TIMEOUT = pytest.mark.timeout(300)


def _tree_labels(root: Path) -> list[int]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    return [classes.index(p.parent.name) for p in sorted(root.rglob("*.JPEG"))]


def _collect(loader):
    xs, ys = [], []
    for x, y in loader:
        xs.append(x)
        ys.append(y)
    import torch

    return torch.cat(xs), torch.cat(ys)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    base = tmp_path_factory.mktemp("imagefolder")
    train = bench_data.make_jpeg_tree(base / "train", classes=10, per_class=30, seed=0, min_side=40, max_side=300)
    val = bench_data.make_jpeg_tree(base / "val", classes=10, per_class=4, seed=1, min_side=40, max_side=300)
    out = base / "out"
    paths = I.write_imagefolder(out, train, val, name="tree", max_side=128, workers=2, progress=False, timeout=300)
    return {"train": train, "val": val, "out": out, "paths": paths}


@TIMEOUT
def test_imagefolder_meta_and_check(folder):
    meta = json.loads(folder["paths"]["meta"].read_text())
    assert meta["classes"] == [f"n{c:08d}" for c in range(10)]
    assert meta["class_to_index"]["n00000003"] == 3
    assert meta["settings"]["max_side"] == 128 and meta["settings"]["quality"] == 90
    assert meta["files"]["train"]["count"] == 300 and meta["files"]["val"]["count"] == 40
    assert meta["files"]["train"]["label_counts"] == {f"n{c:08d}": 30 for c in range(10)}
    assert meta["files"]["train"]["skipped"] == []
    for split in ("train", "val"):
        info = I.check_split_file(folder["paths"][split], 10, "tree")
        assert info["num_samples"] == meta["files"][split]["count"]
    with pytest.raises(DataError, match="tree_meta.json: 10 classes, dataset tree expects 1000"):
        I.check_split_file(folder["paths"]["val"], 1000, "tree")
    assert not list(folder["out"].glob(".*.tmp-*"))


@TIMEOUT
def test_imagefolder_loaders_labels_and_shapes(folder):
    import torch

    want = _tree_labels(folder["train"])
    train = I.make_image_loader(
        folder["paths"]["train"], 32, train=True, seed=0, drop_last=False, recipe="imagenet", crop_size=64
    )
    x, y = _collect(train)
    assert x.shape == (300, 3, 64, 64) and x.dtype == torch.float32 and x.is_contiguous()
    assert Counter(y.tolist()) == Counter(want)
    assert -3.0 < float(x.mean()) < 3.0 and float(x.std()) > 0.1  # normalised, not [0, 255]
    train.close()
    # evaluation: centre crop, sequential order = the sorted file listing
    val = I.make_image_loader(folder["paths"]["val"], 16, train=False, recipe="imagenet", crop_size=56)
    xv, yv = _collect(val)
    assert xv.shape == (40, 3, 56, 56) and yv.tolist() == _tree_labels(folder["val"])
    raw = I.make_image_loader(
        folder["paths"]["val"], 16, train=False, recipe="imagenet", crop_size=56, raw=True, channels_last=True
    )
    xr, _ = _collect(raw)
    assert xr.dtype == torch.uint8 and xr.shape == (40, 3, 56, 56)
    assert xr.is_contiguous(memory_format=torch.channels_last)
    # the normalised batch is the raw one through the recipe's mean/std
    m = torch.tensor(I.RECIPES["imagenet"].mean).view(1, 3, 1, 1)
    s = torch.tensor(I.RECIPES["imagenet"].std).view(1, 3, 1, 1)
    assert torch.allclose(xv, (xr.float() / 255 - m) / s, atol=1e-4)


@TIMEOUT
def test_an_evaluation_pass_over_fewer_images_than_a_batch_sizes_ffcvs_buffers_to_them(folder):
    """An evaluation loader asked for batches of 500 over 40 images gives one batch of 40, the
    same one a batch of exactly 40 gives, with FFCV's buffers sized for 40 (they were sized for
    500: 1.5 GB at 224 px). Under deterministic algorithms (the engine's default) torch fills new
    memory with NaN; the loader skips that fill for FFCV's buffers only and restores the flag."""
    import torch

    big = I.make_image_loader(folder["paths"]["val"], 500, train=False, recipe="imagenet", crop_size=56)
    exact = I.make_image_loader(folder["paths"]["val"], 40, train=False, recipe="imagenet", crop_size=56)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert torch.utils.deterministic.fill_uninitialized_memory
        [(xb, yb)], [(xe, ye)] = list(big), list(exact)
        assert torch.utils.deterministic.fill_uninitialized_memory  # restored after the pass
        assert torch.isnan(torch.empty(4)).all()  # the fill still works for every other allocation
    finally:
        torch.use_deterministic_algorithms(was)
    assert len(big) == 1 and xb.shape == (40, 3, 56, 56)
    assert torch.equal(xb, xe) and torch.equal(yb, ye)
    assert big.ffcv.batch_size == 40 and big.batch_size == 500
    # a training loader keeps its batch size (drop_last: a short split gives no batch)
    tr = I.make_image_loader(folder["paths"]["train"], 32, train=True, recipe="imagenet", crop_size=56)
    assert tr.ffcv.batch_size == 32
    for ld in (big, exact, tr):
        ld.close()


def _small_tree(root: Path) -> Path:
    return bench_data.make_jpeg_tree(root, classes=3, per_class=4, seed=2, min_side=40, max_side=80)


@TIMEOUT
def test_unreadable_images_named_then_skipped(tmp_path):
    tree = _small_tree(tmp_path / "t")
    good = next((tree / "n00000001").iterdir()).read_bytes()
    trunc = tree / "n00000001" / "truncated.jpg"
    trunc.write_bytes(good[: len(good) // 3])
    text = tree / "n00000002" / "notes.jpg"
    text.write_text("this is not a JPEG\n")
    (tree / "n00000000" / "README.txt").write_text("ignored, and reported as such")
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        I.write_imagefolder(out, tree, name="bad", workers=1, progress=False, timeout=300)
    msg = str(e.value)
    assert str(trunc) in msg and str(text) in msg and "2 unreadable" in msg and "--skip-bad" in msg
    assert not (out / "bad_train.beton").exists() and not list(out.glob(".*.tmp-*"))
    assert (out / "bad_train_unreadable.txt").read_text().count("\n") == 2

    paths = I.write_imagefolder(out, tree, name="bad", workers=1, progress=False, skip_bad=True, timeout=300)
    meta = json.loads(paths["meta"].read_text())
    entry = meta["files"]["train"]
    assert entry["count"] == 12
    assert sorted(s["path"] for s in entry["skipped"]) == sorted([str(trunc), str(text)])
    assert entry["ignored"] == [str(tree / "n00000000" / "README.txt")]
    assert I.check_image_beton(paths["train"], 12, 3)["num_samples"] == 12


@TIMEOUT
def test_one_corrupt_file_among_300_is_named(folder, tmp_path):
    tree = tmp_path / "train"
    shutil.copytree(folder["train"], tree)
    victim = sorted((tree / "n00000007").iterdir())[5]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    out = tmp_path / "out"
    with pytest.raises(DataError) as e:
        I.write_imagefolder(out, tree, name="big", max_side=128, workers=2, progress=False, timeout=300)
    assert str(victim) in str(e.value) and "1 unreadable" in str(e.value)
    assert not (out / "big_train.beton").exists()
    paths = I.write_imagefolder(
        out, tree, name="big", max_side=128, workers=2, progress=False, skip_bad=True, timeout=300
    )
    entry = json.loads(paths["meta"].read_text())["files"]["train"]
    assert entry["count"] == 299 and [s["path"] for s in entry["skipped"]] == [str(victim)]
    assert entry["label_counts"] == {f"n{c:08d}": 29 if c == 7 else 30 for c in range(10)}


def test_ffcv_import_leaves_numba_typed_dict_alone():
    """suite.data imports FFCV with a plain dict standing in for numba's typed Dict (its one
    use, a table read from Python, costs ~7 s of compilation per process); afterwards numba's
    own Dict is back in place."""
    import numba.typed

    from suite.data import _import_ffcv

    _import_ffcv()
    from ffcv.fields import rgb_image

    assert dict(rgb_image.IMAGE_MODES) == {"jpg": 0, "raw": 1}
    assert numba.typed.Dict is not dict and numba.typed.Dict.__module__.startswith("numba")


@TIMEOUT
@pytest.mark.parametrize("op", ["flip", "translate"])
def test_flip_and_translate_write_the_same_pixels_as_ffcv(op):
    """suite.augment's loops against FFCV's own RandomHorizontalFlip / RandomTranslate, both
    compiled by FFCV's compiler and run from the same numba random state on the same batch:
    the outputs are equal pixel for pixel (so loader batches, and every number trained on
    them, do not depend on which of the two the pipeline holds)."""
    from ffcv.pipeline.compiler import Compiler
    from ffcv.transforms import RandomHorizontalFlip, RandomTranslate
    from numba import njit

    from suite.augment import flip_and_translate

    @njit
    def seed(s):  # numba's generator is its own, apart from numpy's
        np.random.seed(s)

    Flip, Translate = flip_and_translate()
    images = np.random.default_rng(0).integers(0, 256, (32, 9, 11, 3), dtype=np.uint8)
    if op == "flip":
        ours, theirs, canvas = Flip(0.5), RandomHorizontalFlip(0.5), images.shape
    else:
        ours, theirs = Translate(3, (7, 8, 9)), RandomTranslate(3, (7, 8, 9))
        canvas = (32, 9 + 6, 11 + 6, 3)
    outs = []
    threads = Compiler.num_threads  # an FFCV loader of another test may have left it at 2:
    Compiler.num_threads = 1  # FFCV's ops would then compile parallel, drawing on unseeded threads
    try:
        for operation in (ours, theirs):
            fn = Compiler.compile(operation.generate_code())
            seed(5)
            outs.append(fn(images.copy(), np.zeros(canvas, np.uint8)).copy())
    finally:
        Compiler.num_threads = threads
    assert np.array_equal(outs[0], outs[1])
    # the operation did something, and not the same thing to every image
    changed = [not np.array_equal(a, b) for a, b in zip(outs[0], images)]
    assert 0 < sum(changed) < len(changed) if op == "flip" else sum(changed) > len(changed) // 2
    if op == "translate":  # the fill colour shows at the borders the shift uncovered
        assert any((outs[0][i] == (7, 8, 9)).all(axis=-1).any() for i in range(32))


@pytest.mark.slow  # a writer process killed mid-file, then a second run
def test_interrupted_write_then_rerun(folder, tmp_path):
    out = tmp_path / "out"
    # a writer killed (SIGKILL) mid-way: no file under a final name, nothing listed in the meta
    err: list[BaseException] = []

    def run():
        try:
            I.write_imagefolder(
                out, folder["train"], folder["val"], name="k", max_side=128, workers=2, progress=False, timeout=300
            )
        except BaseException as e:  # noqa: BLE001
            err.append(e)

    t = threading.Thread(target=run)
    t.start()
    killed = False
    deadline = time.time() + 200
    while t.is_alive() and time.time() < deadline and not killed:
        for p in out.glob(".k_train.beton.tmp-*") if out.is_dir() else []:
            try:
                os.killpg(int(p.name.rsplit("-", 1)[1]), signal.SIGKILL)
                killed = True
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    t.join(240)
    assert not t.is_alive()
    print(f"writer killed mid-way: {killed}")
    if killed:
        assert err and isinstance(err[0], RuntimeError)
        assert not (out / "k_train.beton").exists() and not (out / "k_val.beton").exists()
        assert not list(out.glob(".*.tmp-*"))
        assert json.loads((out / "k_meta.json").read_text())["files"] == {}
    paths = I.write_imagefolder(
        out, folder["train"], folder["val"], name="k", max_side=128, workers=2, progress=False, timeout=300
    )
    assert I.check_split_file(paths["train"], 10, "k")["num_samples"] == 300

    # a stale temporary of a dead writer + a val file cut short: val is redone, train kept
    train_stat = paths["train"].stat()
    stale = out / ".k_val.beton.tmp-999999999"
    stale.write_bytes(b"partial")
    data = paths["val"].read_bytes()
    paths["val"].write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="k_val.beton"):
        I.check_split_file(paths["val"], 10, "k")
    I.write_imagefolder(
        out, folder["train"], folder["val"], name="k", max_side=128, workers=2, progress=False, timeout=300
    )
    assert not stale.exists()
    assert paths["train"].stat().st_ino == train_stat.st_ino and paths["train"].stat().st_mtime == train_stat.st_mtime
    assert I.check_split_file(paths["val"], 10, "k")["num_samples"] == 40


# --------------------------------------------------------------------------------- CIFAR
def _fake_cifar(root: Path, dataset: str, n_batch: int = 20, n_test: int = 30, seed: int = 0) -> dict:
    lay = I.CIFAR_LAYOUTS[dataset]
    rng = np.random.default_rng(seed)
    d = root / lay.folder
    d.mkdir(parents=True)
    arrays = {}
    for fn in lay.train + lay.test:
        n = n_test if fn in lay.test else n_batch
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = rng.integers(0, lay.classes, size=n).tolist()
        with open(d / fn, "wb") as f:
            pickle.dump({b"batch_label": fn.encode(), b"data": x, lay.label_key: y, b"filenames": [b"x.png"] * n}, f)
        arrays[fn] = (x, np.asarray(y))
    with open(d / lay.meta, "wb") as f:
        pickle.dump({lay.names_key: [f"class{i}".encode() for i in range(lay.classes)]}, f)
    return arrays


_DIGEST = """
import hashlib, sys
from suite import images as I
ld = I.make_image_loader(sys.argv[1], 8, train=True, seed=3, recipe="cifar10")
print(hashlib.sha256(b"".join(x.numpy().tobytes() for x, _ in ld)).hexdigest())
"""


@pytest.mark.slow  # several FFCV pipelines compiled, two threads and a second process
@TIMEOUT
def test_cifar_augmentation_depends_only_on_seed_epoch_and_position(tmp_path):
    """FFCV's random crops, flips and shifts draw from numba's generator, per thread and seeded
    from the OS unless seeded in compiled code. suite.data seeds it for each pass of a loader
    from (seed, epoch, rank): an epoch read twice gives the same batches, two loader threads
    give the same pixels as one (the CIFAR flips and shifts draw outside the parallel loop), a
    stream resumed mid-epoch (suite.batches.Stream, as after a preemption) replays the same
    augmented batches, and another process computes the same pixels."""
    import hashlib
    import subprocess
    import sys

    import torch

    from suite.batches import Stream

    _fake_cifar(tmp_path / "src", "cifar10", n_batch=8, n_test=4)
    paths = I.write_cifar("cifar10", tmp_path / "src", tmp_path / "data", val_size=4, workers=1, progress=False)

    def loader(workers=1):
        return I.make_image_loader(paths["train"], 8, train=True, seed=3, recipe="cifar10", num_workers=workers)

    def same(a, b):
        return len(a) == len(b) == 4 and all(torch.equal(x, y) for x, y in zip(a, b))

    ld = loader()
    first = [x for x, _ in ld]
    ld.set_epoch(0)
    assert same(first, [x for x, _ in ld])
    # not equal for want of randomness: the same images in the same order, drawn from another
    # augmentation seed, come out otherwise
    ld.set_epoch(0)
    ld.ffcv.augment_base = 4
    assert not any(torch.equal(a, b) for a, b in zip(first, (x for x, _ in ld)))
    assert same(first, [x for x, _ in loader(workers=2)])
    whole = Stream(loader())
    taken = [whole.next()[0] for _ in range(6)]  # the first pass and 2 batches of the next
    resumed = Stream(loader())
    resumed.restore({"pass": 1, "pos": 1})
    assert torch.equal(resumed.next()[0], taken[5])
    out = subprocess.run(
        [sys.executable, "-c", _DIGEST, str(paths["train"])],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(Path(I.__file__).resolve().parents[1])},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    mine = hashlib.sha256(b"".join(x.numpy().tobytes() for x in first)).hexdigest()
    assert out.stdout.split()[-1] == mine


@TIMEOUT
def test_cifar10_round_trip_exact(tmp_path):
    import torch

    arrays = _fake_cifar(tmp_path / "src", "cifar10")
    paths = I.write_cifar("cifar10", tmp_path / "src", tmp_path / "data", val_size=10, workers=1, progress=False)
    meta = json.loads(paths["meta"].read_text())
    assert {s: meta["files"][s]["count"] for s in ("train", "val", "test")} == {"train": 90, "val": 10, "test": 30}
    datasets.get("cifar10").validate(tmp_path / "data")
    # test split through the non-augmenting loader: pixels and labels exact, source order
    x, y = arrays["test_batch"]
    ld = I.make_image_loader(paths["test"], 7, train=False, recipe="cifar10", raw=True)
    xs, ys = _collect(ld)
    assert torch.equal(xs, torch.from_numpy(x.reshape(-1, 3, 32, 32)))
    assert ys.tolist() == y.tolist()
    # train + val = the training batches, labels intact; train batches augmented to 3x32x32
    train_y = np.concatenate([arrays[f"data_batch_{i}"][1] for i in range(1, 6)])
    tr = I.make_image_loader(paths["train"], 16, train=True, drop_last=False, recipe="cifar10")
    xt, yt = _collect(tr)
    _, yv = _collect(I.make_image_loader(paths["val"], 16, train=False, recipe="cifar10"))
    assert xt.shape == (90, 3, 32, 32) and xt.dtype == torch.float32
    assert Counter(yt.tolist() + yv.tolist()) == Counter(train_y.tolist())
    # a rerun keeps everything
    before = {s: paths[s].stat().st_mtime for s in ("train", "val", "test")}
    I.write_cifar("cifar10", tmp_path / "src", tmp_path / "data", val_size=10, workers=1, progress=False)
    assert before == {s: paths[s].stat().st_mtime for s in ("train", "val", "test")}


def test_cifar_bad_and_missing_files_named(tmp_path):
    _fake_cifar(tmp_path / "a", "cifar100", n_batch=12, n_test=5)
    d = tmp_path / "a" / "cifar-100-python"
    (d / "test").unlink()
    with pytest.raises(DataError, match=f"{d / 'test'}: file missing"):
        I.cifar_source(tmp_path / "a", "cifar100")
    (d / "test").write_bytes(b"\x80\x04truncated")
    with pytest.raises(DataError, match=f"{d / 'test'}: not a readable CIFAR pickle"):
        I.cifar_source(d, "cifar100")
    with open(d / "test", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3000), np.uint8), b"fine_labels": [0] * 4}, f)
    with pytest.raises(DataError, match=r"test: b'data' is uint8 \(4, 3000\)"):
        I.cifar_source(d, "cifar100")
    with open(d / "train", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"fine_labels": [0, 1, 2, 100]}, f)
    with pytest.raises(DataError, match=f"{d / 'train'}: labels span 0..100"):
        I.cifar_source(d, "cifar100")


def test_registry_entries():
    inet = datasets.get("imagenet")
    assert inet.num_classes == 1000 and inet.input_shape == (3, 224, 224)
    assert inet.files["test"] == inet.files["val"] == "imagenet_val.beton"
    assert "--name imagenet" in inet.make_command
    for name, k in (("cifar10", 10), ("cifar100", 100)):
        s = datasets.get(name)
        assert s.num_classes == k and s.input_shape == (3, 32, 32) and s.loader is not None
    assert datasets.get("fashion_mnist").loader is None  # Fashion-MNIST keeps suite.data.make_loader
    # the reference setting: all training images, val = test = the test set, the same recipe
    from suite.config import RunConfig

    for name, k in (("cifar10", 10), ("cifar100", 100)):
        s, f = datasets.get(name), datasets.get(f"{name}_full")
        assert (f.num_classes, f.input_shape) == (s.num_classes, s.input_shape) == (k, (3, 32, 32))
        assert f.files == {
            "train": f"{name}_full_train.beton",
            "val": f"{name}_full_test.beton",
            "test": f"{name}_full_test.beton",
        }
        assert f.make_command.endswith("--val-size 0") and f"hfbench data {name} " in f.make_command
        assert RunConfig(dataset=f"{name}_full", model="cifar_resnet50").dataset == f"{name}_full"


@TIMEOUT
def test_imagenet_validate_names_the_file(tmp_path):
    with pytest.raises(DataError, match="imagenet_meta.json: meta file missing"):
        (tmp_path / "imagenet_train.beton").write_bytes(b"x" * 100)
        (tmp_path / "imagenet_val.beton").write_bytes(b"x" * 100)
        datasets.get("imagenet").validate(tmp_path)
    tree = _small_tree(tmp_path / "t")
    shutil.rmtree(tmp_path / "t" / "n00000002")
    out = tmp_path / "data"
    I.write_imagefolder(out, tree, tree, name="imagenet", workers=1, progress=False, timeout=300)
    with pytest.raises(DataError, match="imagenet_meta.json: 2 classes, dataset imagenet expects 1000"):
        datasets.get("imagenet").validate(out)


# ------------------------------------------------------------- CIFAR, reference setting (no val split)
@pytest.mark.slow  # end to end, ~15-35 s of training on 2 cores: `make test` runs it, not the fast tier
@TIMEOUT
def test_cifar10_full_train_through_cli_and_engine(tmp_path, capsys):
    """`hfbench data cifar10 --val-size 0`: cifar10_full_train.beton holds every training image
    (source order), cifar10_full_test.beton the test set; dataset cifar10_full trains on the
    first with the cifar10 recipe and reads the second as val and test, through the sweep's
    data check and the engine's loaders."""
    import torch

    from launchers import cli
    from launchers.checks import ensure_data
    from suite.config import RunConfig
    from suite.engine import make_loaders

    arrays = _fake_cifar(tmp_path / "src", "cifar10")
    data = tmp_path / "data"
    cfg = RunConfig(dataset="cifar10_full", model="cifar_resnet50", data_dir=str(data), batch_size=20)
    with pytest.raises(FileNotFoundError, match="cifar10_full_train.beton.*--val-size 0"):
        ensure_data([cfg], build=False)
    assert (
        cli.main(
            ["data", "cifar10", "--src", str(tmp_path / "src"), "--out", str(data), "--val-size", "0", "--workers", "1"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"train: {data / 'cifar10_full_train.beton'} (100 images)" in out and "dataset: cifar10_full" in out
    assert sorted(p.name for p in data.iterdir() if not p.name.startswith(".")) == [
        "cifar10_full_meta.json",
        "cifar10_full_test.beton",
        "cifar10_full_train.beton",
    ]
    meta = json.loads((data / "cifar10_full_meta.json").read_text())
    assert meta["settings"]["val_size"] == 0 and meta["settings"]["split_seed"] is None
    assert {s: e["count"] for s, e in meta["files"].items()} == {"train": 100, "test": 30}
    assert meta["source_counts"] == {"train": 100, "test": 30}

    spec = datasets.get("cifar10_full")
    assert spec.paths(data)["val"] == spec.paths(data)["test"] == data / "cifar10_full_test.beton"
    ensure_data([cfg], build=False)  # the sweep's check: validates the full files
    _, train, val, test = make_loaders(cfg, world=1)
    assert train.recipe is I.RECIPES["cifar10"] and val.recipe is I.RECIPES["cifar10"]
    train_x = np.concatenate([arrays[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_y = np.concatenate([arrays[f"data_batch_{i}"][1] for i in range(1, 6)])
    xt, yt = _collect(train)  # augmented (pad-crop + flip), normalised; 5 batches of 20, drop_last drops none
    assert xt.shape == (100, 3, 32, 32) and xt.dtype == torch.float32 and -3 < float(xt.mean()) < 3
    assert Counter(yt.tolist()) == Counter(train_y.tolist())
    for ld in (val, test):
        assert _collect(ld)[1].tolist() == arrays["test_batch"][1].tolist()
    for ld in (train, val, test):
        ld.close()
    # pixels exact, every training row in source order (the registry loader without augmentation)
    xr, yr = _collect(spec.loader(spec.paths(data)["train"], 32, train=False, raw=True))
    assert torch.equal(xr, torch.from_numpy(train_x.reshape(-1, 3, 32, 32))) and yr.tolist() == train_y.tolist()

    # resumable: a rerun writes nothing; the held-out setting writes its own files beside
    before = {p.name: p.stat().st_mtime_ns for p in data.glob("cifar10_full_*.beton")}
    I.write_cifar("cifar10", tmp_path / "src", data, val_size=0, split_seed=7, workers=1, progress=False)
    assert before == {p.name: p.stat().st_mtime_ns for p in data.glob("cifar10_full_*.beton")}
    I.write_cifar("cifar10", tmp_path / "src", data, val_size=10, workers=1, progress=False)
    datasets.get("cifar10").validate(data)
    spec.validate(data)
    assert before == {p.name: p.stat().st_mtime_ns for p in data.glob("cifar10_full_*.beton")}

    # the check names the file: a subset of the training set, a file cut short
    mpath = data / "cifar10_full_meta.json"
    good = mpath.read_text()
    bad = json.loads(good)
    bad["source_counts"]["train"] = 50000
    mpath.write_text(json.dumps(bad))
    with pytest.raises(
        DataError,
        match=r"cifar10_full_train.beton: 100 images, the train split of the source "
        r"has 50000",
    ):
        spec.validate(data)
    bad = json.loads(good)
    bad["settings"]["val_size"] = 10
    mpath.write_text(json.dumps(bad))
    with pytest.raises(DataError, match="cifar10_full_meta.json: settings kind='cifar' val_size=10"):
        spec.validate(data)
    mpath.write_text(good)
    blob = (data / "cifar10_full_test.beton").read_bytes()
    (data / "cifar10_full_test.beton").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="cifar10_full_test.beton"):
        ensure_data([cfg], build=False)


@TIMEOUT
def test_cifar100_full_and_bad_val_size(tmp_path, capsys):
    from launchers import cli

    arrays = _fake_cifar(tmp_path / "src", "cifar100", n_batch=12, n_test=5)
    for bad in (-1, 12, 2.5):
        with pytest.raises(
            ValueError,
            match=rf"val_size must be an int in 0\.\.11 \(0: no val split, train on all "
            rf"12 training images\), got {bad}",
        ):
            I.write_cifar("cifar100", tmp_path / "src", tmp_path / "data", val_size=bad, progress=False)
    assert (
        cli.main(
            ["data", "cifar100", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "data"), "--val-size", "-3"]
        )
        == 2
    )  # refused by name, before any file is read
    assert "--val-size must be >= 0, got -3" in capsys.readouterr().err
    assert not (tmp_path / "data").exists() or not list((tmp_path / "data").iterdir())
    paths = I.write_cifar("cifar100", tmp_path / "src", tmp_path / "data", val_size=0, workers=1, progress=False)
    assert sorted(paths) == ["meta", "test", "train"]
    assert paths["train"].name == "cifar100_full_train.beton"
    spec = datasets.get("cifar100_full")
    spec.validate(tmp_path / "data")
    info = I.check_image_beton(spec.paths(tmp_path / "data")["train"], 12, 100, image_size=(32, 32))
    assert info["label_counts"] == dict(Counter(arrays["train"][1].tolist()))
    assert spec.paths(tmp_path / "data")["val"].name == "cifar100_full_test.beton"
    ld = spec.loader(spec.paths(tmp_path / "data")["val"], 4, train=False)
    assert ld.recipe is I.RECIPES["cifar100"] and _collect(ld)[1].tolist() == arrays["test"][1].tolist()
    # the held-out dataset is another set of files
    assert [p.name for p in datasets.get("cifar100").missing(tmp_path / "data")] == [
        "cifar100_train.beton",
        "cifar100_val.beton",
        "cifar100_test.beton",
    ]
