"""Loading RGB betons: the recipes (crops, flips, normalisation per dataset) and
:class:`ImageBetonLoader`, the FFCV loader with the recipe's pipeline.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from suite.data.loader import BetonLoader

# --------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """Augmentation of a dataset: ``rrc`` (ImageNet: RandomResizedCrop + flip / resize
    ``crop/ratio`` + centre crop) or ``pad_crop`` (CIFAR: random crop with ``padding`` + flip
    / as is); mean/std in [0, 1] units."""

    kind: str
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    center_ratio: float = 224 / 256
    padding: int = 4


RECIPES = {
    "imagenet": Recipe("rrc", 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": Recipe("pad_crop", 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": Recipe("pad_crop", 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class ImageBetonLoader(BetonLoader):
    """:class:`suite.data.BetonLoader` (order, epochs, distributed sharding, closing)
    over an RGB beton, with the ``recipe``'s decoding/augmentation. Yields float32
    ``(B, 3, crop, crop)`` normalised with the recipe's mean/std (uint8 with ``raw``),
    contiguous NCHW, or channels_last memory with ``channels_last=True``; int64 labels."""

    def __init__(
        self,
        path,
        batch_size,
        train,
        *,
        recipe: str | Recipe = "imagenet",
        crop_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels_last: bool = False,
        **kw,
    ):
        self.recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
        self.crop_size = int(crop_size or self.recipe.crop)
        self.mean = np.asarray(mean if mean is not None else self.recipe.mean, dtype=np.float64)
        self.std = np.asarray(std if std is not None else self.recipe.std, dtype=np.float64)
        self.channels_last = bool(channels_last)
        super().__init__(path, batch_size, train, **kw)

    def _pipelines(self) -> dict[str, Any]:
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import (
            CenterCropRGBImageDecoder,
            RandomResizedCropRGBImageDecoder,
            SimpleRGBImageDecoder,
        )
        from ffcv.transforms import NormalizeImage, ToTensor, ToTorchImage

        from suite.augment import flip_and_translate

        # FFCV's RandomHorizontalFlip / RandomTranslate: same draws and pixels, ~9 s less compiling
        RandomHorizontalFlip, RandomTranslate = flip_and_translate()
        r, s = self.recipe, self.crop_size
        if r.kind == "rrc":
            img = (
                [RandomResizedCropRGBImageDecoder((s, s)), RandomHorizontalFlip()]
                if self.train
                else [CenterCropRGBImageDecoder((s, s), ratio=r.center_ratio)]
            )
        elif r.kind == "pad_crop":
            img = (
                [SimpleRGBImageDecoder(), RandomHorizontalFlip(), RandomTranslate(padding=r.padding)]
                if self.train
                else [SimpleRGBImageDecoder()]
            )
        else:
            raise ValueError(f"unknown recipe kind {r.kind!r}")
        if not self.raw:
            img.append(NormalizeImage(self.mean * 255.0, self.std * 255.0, np.float32))
        img += [ToTensor(), ToTorchImage()]
        return {"image": img, "label": [IntDecoder(), ToTensor()], "index": None}

    def _convert(self, img, lab):
        import torch

        y = torch.from_numpy(lab.numpy().reshape(-1).astype(np.int64))
        a = img.numpy()  # (B, C, H, W) view of FFCV's (B, H, W, C) buffer
        if self.channels_last:
            x = torch.from_numpy(np.ascontiguousarray(a.transpose(0, 2, 3, 1))).permute(0, 3, 1, 2)
        else:
            x = torch.from_numpy(np.ascontiguousarray(a))
        return x, y


def make_image_loader(
    path: str | os.PathLike,
    batch_size: int,
    train: bool,
    seed: int = 0,
    num_workers: int = 1,
    distributed: bool = False,
    drop_last: bool | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    recipe: str | Recipe = "imagenet",
    crop_size: int | None = None,
    raw: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    channels_last: bool = False,
    batches_ahead: int = 3,
    os_cache: bool = True,
) -> ImageBetonLoader:
    """Loader over an RGB beton with the recipe's augmentation (``train``) or evaluation
    transform; same order/sharding/drop_last semantics as :func:`suite.data.make_loader`.
    imagenet: train RandomResizedCrop(crop_size, scale 0.08-1) + flip, eval resize to
    crop_size/0.875 + centre crop; cifar*: train random crop 32 with padding 4 (zeros) +
    flip, eval as is. ``mean``/``std`` (in [0, 1] units) override the recipe's."""
    return ImageBetonLoader(
        path,
        batch_size,
        train,
        recipe=recipe,
        crop_size=crop_size,
        mean=mean,
        std=std,
        channels_last=channels_last,
        seed=seed,
        num_workers=num_workers,
        distributed=distributed,
        drop_last=drop_last,
        indices=indices,
        raw=raw,
        batches_ahead=batches_ahead,
        os_cache=os_cache,
    )
