"""Model registry. Each entry builds a model and declares which layers are prunable.

Prunable-layer policy (hyperflux.md section 1), the same for every method:
- "conv_linear": every Conv2d and Linear weight, first conv, downsample convs and classifier
  included. Biases and norm parameters are never prunable and never counted.
- "vit_blocks": only the transformer blocks' qkv, attention proj, mlp.fc1 and mlp.fc2; the
  patch embedding, head, norms and cls/pos embeddings stay dense.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[int, int], nn.Module]  # (num_classes, in_chans) -> model
    policy: str  # "conv_linear" | "vit_blocks"
    input_size: int  # the spatial size the model is meant for
    note: str = ""

    def prunable(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return prunable_layers(model, self.policy)


def prunable_layers(model: nn.Module, policy: str) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every layer whose `weight` is prunable, in module order."""
    out = []
    for name, mod in model.named_modules():
        if policy == "conv_linear":
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                out.append((name, mod))
        elif policy == "vit_blocks":
            if (
                isinstance(mod, nn.Linear)
                and ".blocks." in f".{name}."
                and name.split(".")[-1] in ("qkv", "proj", "fc1", "fc2")
            ):
                out.append((name, mod))
        else:
            raise ValueError(f"unknown prunable-layer policy {policy!r}")
    return out


# ----------------------------------------------------------------------------- small models
class FMNISTCNN(nn.Module):
    """Small CNN for 28x28 grey images, sized for CPU runs: two strided convolutions
    (5x5/2 and 3x3/2) and two dense layers. About 0.2 M weights, ~90 % dense top-1 on
    Fashion-MNIST after a few epochs."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, w, 5, stride=2, padding=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * w * 7 * 7, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class LeNet300(nn.Module):
    """LeNet-300-100, the classic fully connected pruning benchmark."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, side: int = 28):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_chans * side * side, 300),
            nn.ReLU(inplace=True),
            nn.Linear(300, 100),
            nn.ReLU(inplace=True),
            nn.Linear(100, num_classes),
        )

    def forward(self, x):
        return self.net(x)


# ----------------------------------------------------------------------------- paper models
_VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]


class CifarVGG19(nn.Module):
    """VGG-19 as in the Hyperflux CIFAR code: 16 bias-free 3x3 conv + BN + ReLU, max-pool after
    blocks 1-4, a 2x2 average pool, one linear layer 512 -> classes."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_chans
        for v in _VGG19:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        layers.append(nn.AvgPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


def _cifar_resnet50(num_classes: int, in_chans: int) -> nn.Module:
    """torchvision ResNet-50 with the CIFAR stem: 3x3 stride-1 first conv and no max-pool."""
    from torchvision.models import resnet50

    m = resnet50(weights=None, num_classes=num_classes)
    m.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    return m


def _tv_resnet50(num_classes: int, in_chans: int) -> nn.Module:
    from torchvision.models import resnet50

    m = resnet50(weights=None, num_classes=num_classes)
    if in_chans != 3:
        m.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
    return m


def _timm(name: str, **kw) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int, in_chans: int) -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kw)

    return build


_DEIT_DROP = dict(drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.1)

_REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec(
            "fmnist_cnn", lambda nc, ic: FMNISTCNN(nc, ic), "conv_linear", 28, "small CNN for Fashion-MNIST (CPU demo)"
        ),
        ModelSpec("lenet300", lambda nc, ic: LeNet300(nc, ic), "conv_linear", 28, "LeNet-300-100 MLP"),
        ModelSpec("cifar_resnet50", _cifar_resnet50, "conv_linear", 32, "ResNet-50, CIFAR stem (paper)"),
        ModelSpec("cifar_vgg19", lambda nc, ic: CifarVGG19(nc, ic), "conv_linear", 32, "VGG-19, CIFAR (paper)"),
        ModelSpec("resnet50", _tv_resnet50, "conv_linear", 224, "torchvision ResNet-50 (ImageNet)"),
        ModelSpec("timm_resnet50", _timm("resnet50"), "conv_linear", 224, "timm ResNet-50 (ImageNet)"),
        ModelSpec("deit_tiny", _timm("deit_tiny_patch16_224", **_DEIT_DROP), "vit_blocks", 224, "DeiT-T (timm)"),
        ModelSpec("deit_small", _timm("deit_small_patch16_224", **_DEIT_DROP), "vit_blocks", 224, "DeiT-S (timm)"),
    ]
}


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(names())}")
    return _REGISTRY[name]


def build(name: str, num_classes: int, in_chans: int) -> nn.Module:
    return get(name).build(num_classes, in_chans)
