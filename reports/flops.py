"""Per-layer multiply-accumulates (MACs) of a registry model, and a run's theoretical speed-up.

What is counted (per image, one forward pass):

* a Conv2d layer: out_h * out_w * numel(weight) (groups are already in numel(weight));
* a Linear layer: tokens * numel(weight), where tokens is how many vectors the layer is applied
  to per image (1 for a classifier or an MLP on a flat image, 197 for a ViT-B/16 block);
* the prunable layers (the registry's policy) scaled by their density for the pruned model;
* the non-prunable Conv2d / Linear layers (e.g. a ViT's patch embedding and head) dense, the
  same in the dense and the pruned model;
* nothing else: attention score / value matmuls, normalisation, activations, pooling and
  additions are excluded (they are not weight layers and pruning does not change them).

Output sizes come from one forward pass with hooks on the model built from suite.models at the
dataset's input size (suite.datasets, or the table below for datasets the suite cannot build
yet), computed once per (model, dataset) and cached.
"""

from __future__ import annotations

import csv
import functools
import io
from dataclasses import dataclass, field

# Datasets suite.datasets does not (yet) know: (channels, height, width), classes.
_KNOWN_DATASETS: dict[str, tuple[tuple[int, int, int], int]] = {
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
    "imagenet": ((3, 224, 224), 1000),
    "imagenet1k": ((3, 224, 224), 1000),
}


@dataclass
class Geometry:
    """MACs per image of every weight layer of one model at one input size."""

    model: str
    dataset: str
    input_shape: tuple[int, int, int]
    num_classes: int
    prunable: dict[str, tuple[int, int]]  # layer -> (tokens or out_h*out_w, numel(weight))
    rest_macs: int  # non-prunable Conv2d/Linear layers, dense
    error: str = ""
    rest_layers: list[str] = field(default_factory=list)

    @property
    def prunable_macs(self) -> int:
        return sum(pos * n for pos, n in self.prunable.values())


def dataset_shape(dataset: str) -> tuple[tuple[int, int, int], int] | None:
    try:
        from suite import datasets

        spec = datasets.get(dataset)
        return tuple(spec.input_shape), spec.num_classes
    except (KeyError, ImportError):
        return _KNOWN_DATASETS.get(dataset.lower().replace("-", "").replace("_", ""))


@functools.cache
def geometry(model: str, dataset: str) -> Geometry:
    """Hook pass on the registry model; a Geometry with `error` set when it cannot be built."""
    shape = dataset_shape(dataset)
    try:
        from suite import models

        spec = models.get(model)
    except KeyError:
        return Geometry(model, dataset, (0, 0, 0), 0, {}, 0, error=f"model {model!r} is not in suite.models")
    if shape is None:
        side = spec.input_size
        shape = ((1 if side == 28 else 3, side, side), 1000 if side == 224 else 10)
    (c, h, w), classes = shape
    try:
        import torch
        import torch.nn as nn

        net = spec.build(classes, c).eval()
        prunable_names = {n for n, _ in spec.prunable(net)}
        positions: dict[str, int] = {}
        hooks = []

        def hook(name):
            def fn(mod, _inp, out):
                if isinstance(mod, nn.Conv2d):
                    positions[name] = int(out.shape[-1] * out.shape[-2])
                else:  # Linear: vectors it was applied to, per image
                    positions[name] = int(out.numel() // out.shape[0] // mod.out_features)

            return fn

        weights: dict[str, int] = {}
        for name, mod in net.named_modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                weights[name] = mod.weight.numel()
                hooks.append(mod.register_forward_hook(hook(name)))
        with torch.no_grad():
            net(torch.zeros(1, c, h, w))
        for hk in hooks:
            hk.remove()
    except Exception as e:  # a model that needs a missing package (timm), or a bad input size
        return Geometry(
            model,
            dataset,
            (c, h, w),
            classes,
            {},
            0,
            error=f"could not run {model} at {c}x{h}x{w}: {type(e).__name__}: {e}",
        )
    prunable = {n: (positions.get(n, 0), weights[n]) for n in weights if n in prunable_names}
    rest = [n for n in weights if n not in prunable_names]
    return Geometry(
        model,
        dataset,
        (c, h, w),
        classes,
        prunable,
        sum(positions.get(n, 0) * weights[n] for n in rest),
        rest_layers=rest,
    )


def parse_layer_density(text: str) -> list[dict]:
    """Rows of a layer_density.csv artifact: layer, shape, numel (int), nonzero (int)."""
    out = []
    for row in csv.DictReader(io.StringIO(text)):
        try:
            out.append(
                {
                    "layer": row["layer"],
                    "shape": row.get("shape", ""),
                    "numel": int(row["numel"]),
                    "nonzero": int(row["nonzero"]),
                }
            )
        except (KeyError, TypeError, ValueError):
            continue
    return out


@dataclass
class RunCost:
    compression: float | None = None  # prunable weights / remaining
    speedup: float | None = None  # (prunable + rest MACs) dense / pruned
    speedup_prunable: float | None = None  # prunable layers only
    dense_macs: int | None = None
    remaining_macs: float | None = None
    note: str = ""


def run_cost(layers: list[dict] | None, geo: Geometry | None, final_density: float | None) -> RunCost:
    """Compression ratio and theoretical speed-up of one run from its per-layer counts."""
    cost = RunCost()
    if layers:
        total = sum(r["numel"] for r in layers)
        nz = sum(r["nonzero"] for r in layers)
        cost.compression = total / nz if nz else float("inf")
    elif final_density:
        cost.compression = 1.0 / final_density
    if not layers:
        cost.note = "no layer_density.csv"
        return cost
    if geo is None or geo.error:
        # Without the model, only an all-Linear model applied once per image can be counted.
        if all(len(r["shape"].split("x")) == 2 for r in layers):
            dense = sum(r["numel"] for r in layers)
            rem = sum(r["nonzero"] for r in layers)
            cost.dense_macs, cost.remaining_macs = dense, rem
            cost.speedup = cost.speedup_prunable = dense / rem if rem else float("inf")
            cost.note = "Linear layers only, assumed applied once per image"
        else:
            cost.note = geo.error if geo is not None else "no model geometry"
        return cost
    dense_p = rem_p = 0.0
    for r in layers:
        pos_numel = geo.prunable.get(r["layer"])
        if pos_numel is None or pos_numel[1] != r["numel"]:
            cost.note = f"layer {r['layer']} does not match the registry model"
            return cost
        dense_p += pos_numel[0] * r["numel"]
        rem_p += pos_numel[0] * r["nonzero"]
    cost.dense_macs = int(dense_p + geo.rest_macs)
    cost.remaining_macs = rem_p + geo.rest_macs
    cost.speedup = cost.dense_macs / cost.remaining_macs if cost.remaining_macs else float("inf")
    cost.speedup_prunable = dense_p / rem_p if rem_p else float("inf")
    return cost
