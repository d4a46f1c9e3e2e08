import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

from suite.config import RunConfig
from suite.models import prunable_layers
from suite.pruning import masks, sparsity
from baselines.magnitude import GradualMagnitude, OneShotMagnitude


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


@pytest.mark.parametrize("s", [0.3, 0.5, 0.9, 0.97])
def test_global_magnitude_equals_torch_prune(s):
    a, b = _net(), _net()
    la, lb = prunable_layers(a, "conv_linear"), prunable_layers(b, "conv_linear")
    # ties on purpose: duplicate magnitudes make tie-breaking matter
    with torch.no_grad():
        for (_, m1), (_, m2) in zip(la, lb):
            m1.weight[..., :1] = 0.01
            m2.weight.copy_(m1.weight)
    tprune.global_unstructured([(m, "weight") for _, m in lb], pruning_method=tprune.L1Unstructured, amount=s)
    ours = masks.magnitude_masks([m.weight for _, m in la], s, "global")
    for mine, (_, m) in zip(ours, lb):
        assert torch.equal(mine, m.weight_mask)


def test_one_shot_reaches_target_and_blocks_gradients():
    net = _net()
    layers = prunable_layers(net, "conv_linear")
    cfg = RunConfig(method="magnitude", sparsity=0.8, epochs=1)
    p = OneShotMagnitude(cfg, layers, 10)
    p.attach(net)
    p.on_train_start()
    assert sparsity.sparsity(layers) == pytest.approx(0.8, abs=1 / 2072)
    net(torch.randn(2, 3, 8, 8)).sum().backward()
    for (_, m), par in zip(layers, p.params):
        assert torch.all(masks.stored_weight(m).grad[par.mask == 0] == 0)


def test_gmp_cubic_schedule_and_monotone_masks():
    net = _net()
    layers = prunable_layers(net, "conv_linear")
    cfg = RunConfig(method="gmp", sparsity=0.9, epochs=4, gmp={"start_epoch": 1, "end_epoch": 3, "update_every": 5})
    p = GradualMagnitude(cfg, layers, steps_per_epoch=10)
    p.attach(net)
    assert p.target_at(0) == 0.0 and p.target_at(10) == 0.0
    assert p.target_at(20) == pytest.approx(0.9 - 0.9 * 0.5 ** 3)
    assert p.target_at(30) == pytest.approx(0.9) and p.target_at(40) == pytest.approx(0.9)
    prev = None
    for step in range(1, 41):
        with torch.no_grad():  # weights move between updates
            for _, m in layers:
                masks.stored_weight(m).add_(0.01 * torch.randn_like(m.weight))
        p.after_step(step)
        cur = [par.mask.clone() for par in p.params]
        if prev is not None:
            for a, b in zip(prev, cur):
                assert torch.all(b <= a), "a pruned weight came back"
        prev = cur
    assert sparsity.sparsity(layers) == pytest.approx(0.9, abs=1e-4)
