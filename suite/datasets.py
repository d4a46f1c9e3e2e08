"""Dataset registry: what each dataset is (shape, classes, files) and how its files are made.

A run names a dataset; the suite looks up its .beton files in the run's data_dir. Missing
files are either built (when the suite knows how, e.g. Fashion-MNIST from the Debian package)
or reported with the command that makes them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # C, H, W as the model sees it
    files: dict[str, str]  # split -> file name inside data_dir
    make_command: str  # shell command a user runs to create the files
    build: Optional[Callable[[Path], None]] = field(default=None, compare=False)
    check: Optional[Callable[[Path, int], None]] = field(default=None, compare=False)  # (file, classes)

    def paths(self, data_dir: str | Path) -> dict[str, Path]:
        return {split: Path(data_dir) / f for split, f in self.files.items()}

    def missing(self, data_dir: str | Path) -> list[Path]:
        return [p for p in self.paths(data_dir).values() if not p.is_file()]

    def validate(self, data_dir: str | Path) -> None:
        """Refuse truncated, corrupt or mismatched files (shape, label range) before any
        training: raises suite.data.DataError naming the file."""
        if self.check is not None:
            for p in self.paths(data_dir).values():
                self.check(p, self.num_classes)


def _check_fashion_mnist(path: Path, classes: int) -> None:
    from suite.data import check_beton

    check_beton(path, expected_classes=classes)


def _build_fashion_mnist(data_dir: Path) -> None:
    from suite.data import write_fashion_mnist

    write_fashion_mnist(data_dir)


_REGISTRY: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        num_classes=10,
        input_shape=(1, 28, 28),
        files={"train": "fashion_mnist_train.beton", "val": "fashion_mnist_val.beton",
               "test": "fashion_mnist_test.beton"},
        make_command="hfbench data fashion-mnist --out {data_dir}",
        build=_build_fashion_mnist,
        check=_check_fashion_mnist,
    ),
}


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> DatasetSpec:
    if name not in _REGISTRY:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(names())}")
    return _REGISTRY[name]
