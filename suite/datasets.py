"""Dataset registry: what each dataset is (shape, classes, files) and how its files are made.

A run names a dataset; the suite looks up its .beton files in the run's data_dir. Missing
files are either built (when the suite knows how, e.g. Fashion-MNIST from the Debian package)
or reported with the command that makes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # C, H, W as the model sees it
    files: dict[str, str]  # split -> file name inside data_dir
    make_command: str  # shell command a user runs to create the files
    build: Optional[Callable[[Path], None]] = field(default=None, compare=False)
    check: Optional[Callable[[Path, int], None]] = field(default=None, compare=False)  # (file, classes)
    # make_loader(path, batch_size, train=..., seed=..., num_workers=..., distributed=...); None: Fashion-MNIST's
    loader: Optional[Callable[..., Any]] = field(default=None, compare=False)
    # training images with the default split (an estimate for planning, e.g. budget-matched dense
    # runs; what a run really saw is measured and logged as budget_images)
    train_images: Optional[int] = field(default=None, compare=False)

    def paths(self, data_dir: str | Path) -> dict[str, Path]:
        return {split: Path(data_dir) / f for split, f in self.files.items()}

    def missing(self, data_dir: str | Path) -> list[Path]:
        return [p for p in self.paths(data_dir).values() if not p.is_file()]

    def validate(self, data_dir: str | Path) -> None:
        """Refuse truncated, corrupt or mismatched files (shape, label range) before any
        training: raises suite.data.DataError naming the file."""
        if self.check is not None:
            for p in dict.fromkeys(self.paths(data_dir).values()):  # a file serving two splits: once
                self.check(p, self.num_classes)


def _check_fashion_mnist(path: Path, classes: int) -> None:
    from suite.data import check_beton

    check_beton(path, expected_classes=classes)


def _build_fashion_mnist(data_dir: Path) -> None:
    from suite.data import write_fashion_mnist

    write_fashion_mnist(data_dir)


def _image_check(name: str, image_size: Optional[tuple[int, int]] = None):
    def check(path: Path, classes: int) -> None:
        from suite.images import check_split_file

        check_split_file(path, classes, name, image_size=image_size)

    return check


def _image_loader(recipe: str):
    def make(path, batch_size, train, **kw):
        from suite.images import make_image_loader

        return make_image_loader(path, batch_size, train, recipe=recipe, **kw)

    return make


def _cifar_spec(name: str, classes: int) -> DatasetSpec:
    return DatasetSpec(
        name=name,
        num_classes=classes,
        input_shape=(3, 32, 32),
        files={s: f"{name}_{s}.beton" for s in ("train", "val", "test")},
        make_command=f"hfbench data {name} --src CIFAR_PYTHON_FOLDER --out {{data_dir}}",
        check=_image_check(name, (32, 32)),
        loader=_image_loader(name),
        train_images=45_000,
    )


def _cifar_full_check(name: str):
    def check(path: Path, classes: int) -> None:
        from suite.images import check_cifar_full_file

        check_cifar_full_file(path, classes, name, image_size=(32, 32))

    return check


def _cifar_full_spec(base: str, classes: int) -> DatasetSpec:
    """The reference setting of ``base`` (cifar10/cifar100): train on all 50,000 training
    images, no held-out split; val and test both read the test set (as ``imagenet`` does).
    Own files ``<base>_full_{train,test}.beton`` + ``<base>_full_meta.json`` (written by
    ``hfbench data <base> --val-size 0``); the same classes, input shape and loader recipe
    (``<base>``: identical augmentation and normalisation) as ``base``."""
    name = f"{base}_full"
    return DatasetSpec(
        name=name,
        num_classes=classes,
        input_shape=(3, 32, 32),
        files={"train": f"{name}_train.beton", "val": f"{name}_test.beton", "test": f"{name}_test.beton"},
        make_command=f"hfbench data {base} --src CIFAR_PYTHON_FOLDER --out {{data_dir}} --val-size 0",
        check=_cifar_full_check(name),
        loader=_image_loader(base),
        train_images=50_000,
    )


_REGISTRY: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        num_classes=10,
        input_shape=(1, 28, 28),
        files={
            "train": "fashion_mnist_train.beton",
            "val": "fashion_mnist_val.beton",
            "test": "fashion_mnist_test.beton",
        },
        make_command="hfbench data fashion-mnist --out {data_dir}",
        build=_build_fashion_mnist,
        check=_check_fashion_mnist,
        train_images=55_000,
    ),
    # ImageNet-1k from class folders (hfbench data imagefolder --name imagenet). The public
    # val set is the test set of the papers: split "test" reads imagenet_val.beton too, so
    # val_top1 == test_top1 (no held-out split of train).
    "imagenet": DatasetSpec(
        name="imagenet",
        num_classes=1000,
        input_shape=(3, 224, 224),
        files={"train": "imagenet_train.beton", "val": "imagenet_val.beton", "test": "imagenet_val.beton"},
        make_command="hfbench data imagefolder --name imagenet --train IMAGENET/train --val IMAGENET/val "
        "--out {data_dir}",
        check=_image_check("imagenet"),
        loader=_image_loader("imagenet"),
        train_images=1_281_167,
    ),
    # CIFAR: val = 5000 images held out of the 50k training set (split_seed 0), test = the test set
    "cifar10": _cifar_spec("cifar10", 10),
    "cifar100": _cifar_spec("cifar100", 100),
    # CIFAR as the Hyperflux reference code trains it: all 50k training images, val = test = the test set
    "cifar10_full": _cifar_full_spec("cifar10", 10),
    "cifar100_full": _cifar_full_spec("cifar100", 100),
}


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> DatasetSpec:
    if name not in _REGISTRY:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(names())}")
    return _REGISTRY[name]
