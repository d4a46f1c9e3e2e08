"""Model registry: every entry builds, runs a forward pass and declares its prunable layers."""

import pytest
import torch
import torch.nn as nn

from suite import models
from suite.pruning import sparsity


@pytest.mark.parametrize("name", models.names())
def test_entry_builds_and_declares_prunable_layers(name):
    spec = models.get(name)
    small = spec.input_size <= 32
    nc, ic = (10, 1 if spec.input_size == 28 else 3) if small else (1000, 3)
    model = spec.build(nc, ic)
    layers = spec.prunable(model)
    assert layers, f"{name}: no prunable layers"
    if spec.policy == "conv_linear":
        convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert len(layers) == len(convs), "every Conv2d and Linear must be prunable"
    else:
        kinds = {n.split(".")[-1] for n, _ in layers}
        assert kinds == {"qkv", "proj", "fc1", "fc2"}
        assert all(n.startswith("blocks.") for n, _ in layers)
        assert not any("patch_embed" in n or n == "head" for n, _ in layers)
    assert sparsity.density(layers) > 0.99
    if small:  # the big ones are only built here; they are trained on a cluster
        model.eval()
        with torch.no_grad():
            out = model(torch.randn(2, ic, spec.input_size, spec.input_size))
        assert out.shape == (2, nc)


def test_paper_architectures():
    vgg = models.build("cifar_vgg19", 10, 3)
    convs = [m for m in vgg.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16 and all(c.bias is None and c.kernel_size == (3, 3) for c in convs)
    lin = [m for m in vgg.modules() if isinstance(m, nn.Linear)]
    assert len(lin) == 1 and lin[0].in_features == 512
    r50 = models.build("cifar_resnet50", 100, 3)
    assert r50.conv1.kernel_size == (3, 3) and r50.conv1.stride == (1, 1)
    assert isinstance(r50.maxpool, nn.Identity) and r50.fc.out_features == 100
