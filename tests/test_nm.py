"""N:M semi-structured sparsity (2:4, 4:8) for one-shot magnitude, GMP and Hyperflux: the pattern
holds in every group of every layer that can hold it, the kept weights are the ones a plain
per-group sort keeps, layers that cannot hold it are named and left unstructured, and a run
whose target is not the pattern's sparsity is refused at the right field."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from pydantic import ValidationError

from baselines.magnitude import GradualMagnitude, OneShotMagnitude
from suite.config import RunConfig
from suite.models import prunable_layers
from suite.pruning import masks, sparsity
from suite.pruning.hyperflux import Hyperflux


def _net(seed=0):
    torch.manual_seed(seed)
    # row lengths: 27 (3*3*3, no group of 4 or 8 fits), 72 and 128 (both fit)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def _reference_keep(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per-group sort in plain Python: the n highest scores of each group of m along each row of
    scores.reshape(out, -1) (earlier entry first on ties)."""
    rows = scores.reshape(scores.shape[0], -1).tolist()
    out = []
    for row in rows:
        kept = []
        for g in range(0, len(row), m):
            group = row[g : g + m]
            order = sorted(range(m), key=lambda i: (-group[i], i))[:n]
            kept += [1.0 if i in order else 0.0 for i in range(m)]
        out.append(kept)
    return torch.tensor(out).reshape(scores.shape)


def _groups(w: torch.Tensor, m: int) -> torch.Tensor:
    return (w.detach().reshape(-1, m) != 0).sum(dim=1)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_keep_keeps_the_n_highest_of_every_group_as_a_plain_sort_does(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    for shape in [(6, 16), (4, 8, 2, 2), (3, 24)]:
        scores = torch.randn(shape, generator=g)
        scores[0, :4] = 0.5  # ties
        keep = masks.nm_keep(scores, n, m)
        assert torch.equal(keep, _reference_keep(scores, n, m)), shape
        assert torch.all(keep.reshape(-1, m).sum(dim=1) == n)


def test_pattern_parsing_and_which_layers_can_hold_it():
    assert masks.parse_pattern("unstructured") is None
    assert masks.parse_pattern("2:4") == (2, 4) and masks.parse_pattern("4:8") == (4, 8)
    with pytest.raises(ValueError, match="0 < N < M"):
        masks.parse_pattern("4:4")
    assert masks.nm_eligible((8, 8, 3, 3), 4) and masks.nm_eligible((10, 128), 8)
    assert not masks.nm_eligible((8, 3, 3, 3), 4) and not masks.nm_eligible((16, 1, 5, 5), 4)


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_one_shot_magnitude_nm_holds_the_pattern_in_every_group_of_every_layer(pattern, n, m):
    net = _net()
    layers = prunable_layers(net, "conv_linear")
    before = [masks.effective_weight(mod).detach().clone() for _, mod in layers]
    cfg = RunConfig(method="magnitude", sparsity=1 - n / m, epochs=1, magnitude={"pattern": pattern})
    assert cfg.variant() == f"magnitude-{n}of{m}"
    p = OneShotMagnitude(cfg, layers, 10)
    p.attach(net)
    p.on_train_start()
    patterned = 0
    for (name, mod), w0 in zip(layers, before):
        w = masks.effective_weight(mod)
        if masks.nm_eligible(w.shape, m):
            patterned += w.numel()
            assert torch.all(_groups(w, m) == n), name  # exactly N of every M (no weight was 0)
            assert masks.nm_violations(w, n, m) == 0
            assert torch.equal((w != 0).float(), _reference_keep(w0.abs(), n, m)), name
        else:  # the 27-long rows of the first conv: left dense
            assert name == "0" and torch.count_nonzero(w) == w.numel()
    total = sum(mod.weight.numel() for _, mod in layers)
    assert sparsity.sparsity(layers) == pytest.approx(patterned * (1 - n / m) / total)


def test_gmp_nm_shrinks_each_groups_budget_along_the_cubic_schedule_to_exactly_n():
    net = _net()
    layers = prunable_layers(net, "conv_linear")
    cfg = RunConfig(
        method="gmp",
        sparsity=0.5,
        epochs=4,
        gmp={"pattern": "2:4", "start_epoch": 1, "end_epoch": 3, "update_every": 2},
    )
    assert cfg.variant() == "gmp-2of4"
    p = GradualMagnitude(cfg, layers, steps_per_epoch=10)
    p.attach(net)
    p.on_train_start()
    prev = [par.mask.clone() for par in p.params]
    budgets = set()
    for step in range(1, 41):
        with torch.no_grad():  # weights move between updates
            for _, mod in layers:
                masks.stored_weight(mod).add_(0.05 * torch.randn_like(mod.weight))
        p.after_step(step)
        keep = 4 - round(p.current * 4)
        budgets.add(keep)
        for (name, mod), par, old in zip(layers, p.params, prev):
            assert torch.all(par.mask <= old), (step, name)  # pruned stay pruned
            if masks.nm_eligible(mod.weight.shape, 4):
                assert int(_groups(mod.weight, 4).max()) <= keep, (step, name)
            else:
                assert torch.all(par.mask == 1), name
        prev = [par.mask.clone() for par in p.params]
    assert budgets == {4, 3, 2}  # the schedule passed through every whole-weight budget
    for _, mod in layers:
        if masks.nm_eligible(mod.weight.shape, 4):
            assert torch.all(_groups(mod.weight, 4) == 2)


def test_hyperflux_nm_keeps_a_weight_only_if_its_gate_is_nonnegative_and_among_its_groups_top_n():
    net = _net()
    layers = prunable_layers(net, "conv_linear")
    cfg = RunConfig(method="hyperflux", sparsity=0.6, epochs=10, hyperflux={"pattern": "2:4", "pruning_end": 8})
    assert cfg.variant() == "hyperflux-2of4"
    p = Hyperflux(cfg, layers, 10)
    p.attach(net)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for par in p.params:
            par.gate.copy_(torch.randn(par.gate.shape, generator=g))  # some gates negative
    out = net(torch.randn(2, 3, 8, 8))
    out.sum().backward()
    for (name, mod), par in zip(layers, p.params):
        w, gate = masks.effective_weight(mod), par.gate.detach()
        expect = (gate >= 0).float()
        if masks.nm_eligible(w.shape, 4):
            expect = expect * _reference_keep(gate, 2, 4)
            assert masks.nm_violations(w, 2, 4) == 0, name
        else:
            assert par.nm is None, name
        assert torch.equal((w != 0).float(), expect * (masks.stored_weight(mod) != 0).float()), name
        assert par.gate.grad is not None and torch.count_nonzero(par.gate.grad) > 0.9 * gate.numel()


def test_a_target_that_is_not_the_patterns_sparsity_is_refused_at_its_field():
    with pytest.raises(ValidationError, match=r"magnitude\.pattern 2:4 .*sparsity must be 0\.5, got 0\.8"):
        RunConfig(method="magnitude", sparsity=0.8, epochs=1, magnitude={"pattern": "2:4"})
    with pytest.raises(ValidationError, match=r"gmp\.pattern 4:8 .*sparsity must be 0\.5"):
        RunConfig(method="gmp", sparsity=0.9, epochs=4, gmp={"pattern": "4:8"})
    with pytest.raises(ValidationError, match=r"hyperflux\.pattern 2:4 .*at least 0\.5, got 0\.4"):
        RunConfig(method="hyperflux", sparsity=0.4, epochs=10, hyperflux={"pattern": "2:4", "pruning_end": 8})
    with pytest.raises(ValidationError, match="pattern"):
        RunConfig(method="magnitude", sparsity=0.5, epochs=1, magnitude={"pattern": "3:4"})
    with pytest.raises(ValidationError, match=r"gmp\.scope layer means nothing with gmp\.pattern 2:4"):
        RunConfig(method="gmp", sparsity=0.5, epochs=4, gmp={"pattern": "2:4", "scope": "layer"})


def test_the_unstructured_default_keeps_every_earlier_run_hash():
    for method, extra in [("magnitude", {}), ("gmp", {"epochs": 4}), ("hyperflux", {"epochs": 10})]:
        kw = {"method": method, "sparsity": 0.5, "epochs": 1, **extra}
        plain = RunConfig(**kw)
        explicit = RunConfig(**kw, **{method: {"pattern": "unstructured"}})
        nm = RunConfig(**kw, **{method: {"pattern": "2:4"}})
        assert plain.run_hash() == explicit.run_hash() != nm.run_hash(), method


def test_hyperflux_nm_starts_from_the_magnitude_mask_with_the_papers_gate_values():
    """The gates of an N:M layer start rearranged within each group by |w|: the first mask is
    the magnitude 2:4 mask of the starting weights (not a random one), and each group holds the
    same gate values as an unstructured run's gates (the paper's U[low, high] draw)."""
    net, ref = _net(), _net()
    layers, ref_layers = prunable_layers(net, "conv_linear"), prunable_layers(ref, "conv_linear")
    start = [masks.effective_weight(mod).detach().clone() for _, mod in layers]
    kw = {"sparsity": 0.5, "epochs": 10}
    p = Hyperflux(RunConfig(method="hyperflux", **kw, hyperflux={"pattern": "2:4", "pruning_end": 8}), layers, 10)
    p.attach(net)
    plain = Hyperflux(RunConfig(method="hyperflux", **kw, hyperflux={"pruning_end": 8}), ref_layers, 10)
    plain.attach(ref)
    net(torch.randn(2, 3, 8, 8))
    for (name, mod), w0, par, par0 in zip(layers, start, p.params, plain.params):
        if not masks.nm_eligible(w0.shape, 4):
            assert torch.equal(par.gate, par0.gate), name  # an unpatterned layer: the paper's gates
            continue
        assert torch.equal((masks.effective_weight(mod) != 0).float(), _reference_keep(w0.abs(), 2, 4)), name
        g, g0 = par.gate.detach().reshape(-1, 4), par0.gate.detach().reshape(-1, 4)
        assert torch.equal(g.sort(dim=1).values, g0.sort(dim=1).values), name


def test_nm_masks_follow_the_logical_layout_of_a_channels_last_weight():
    w = torch.randn(8, 4, 3, 3)
    cl = w.contiguous(memory_format=torch.channels_last)
    assert torch.equal(masks.nm_keep(cl.abs(), 2, 4), _reference_keep(w.abs(), 2, 4))
    net = _net().to(memory_format=torch.channels_last)
    layers = prunable_layers(net, "conv_linear")
    p = OneShotMagnitude(
        RunConfig(method="magnitude", sparsity=0.5, epochs=1, magnitude={"pattern": "2:4"}), layers, 10
    )
    p.attach(net)
    p.on_train_start()
    for _, mod in layers:
        if masks.nm_eligible(mod.weight.shape, 4):
            assert masks.nm_violations(masks.effective_weight(mod), 2, 4) == 0
