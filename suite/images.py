"""RGB image datasets as FFCV ``.beton`` files: ImageNet-style class folders and the
CIFAR-10/100 python releases; their checks and their training/evaluation loaders.

This module is their public face; the code lives in suite/data/: ``rgb.py`` (file names,
checks, the shared writer machinery), ``imagefolder.py``, ``cifar.py``, ``rgb_loader.py``.

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

from suite.data.cifar import CIFAR_LAYOUTS, cifar_full_name, cifar_source, write_cifar
from suite.data.imagefolder import write_imagefolder
from suite.data.rgb import (
    IMG_EXTENSIONS,
    _read_json,
    check_cifar_full_file,
    check_image_beton,
    check_split_file,
    meta_file,
    split_file,
)
from suite.data.rgb_loader import RECIPES, ImageBetonLoader, make_image_loader

__all__ = [
    "CIFAR_LAYOUTS",
    "IMG_EXTENSIONS",
    "RECIPES",
    "ImageBetonLoader",
    "_read_json",
    "check_cifar_full_file",
    "check_image_beton",
    "check_split_file",
    "cifar_full_name",
    "cifar_source",
    "make_image_loader",
    "meta_file",
    "split_file",
    "write_cifar",
    "write_imagefolder",
]
