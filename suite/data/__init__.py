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

FFCV (1.0.2) is imported lazily: importing this package is cheap.

The package: ``files.py`` (the source, the split, the checks, FFCV's import), ``writer.py``
(writing the betons in a child process), ``loader.py`` (the batches).
"""

from __future__ import annotations

from suite.data.files import (
    CLASS_NAMES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_ROOT,
    FASHION_MNIST_STD,
    IMAGE_SHAPE,
    META_FILE,
    SPLIT_FILES,
    DataError,
    FashionMNISTSource,
    _import_ffcv,
    _keep_torch_threads,
    check_beton,
    fashion_mnist_source,
    loader_thread_limit,
    split_indices,
)
from suite.data.loader import _HEADER_TYPE, BetonLoader, augment_seed, make_loader
from suite.data.writer import _writer_child_main, write_fashion_mnist

__all__ = [
    "BetonLoader",
    "CLASS_NAMES",
    "DataError",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_ROOT",
    "FASHION_MNIST_STD",
    "FashionMNISTSource",
    "IMAGE_SHAPE",
    "META_FILE",
    "SPLIT_FILES",
    "_HEADER_TYPE",
    "_import_ffcv",
    "_keep_torch_threads",
    "_writer_child_main",
    "augment_seed",
    "check_beton",
    "fashion_mnist_source",
    "loader_thread_limit",
    "make_loader",
    "split_indices",
    "write_fashion_mnist",
]
