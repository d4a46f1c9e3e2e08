import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

from baselines.magnitude import GradualMagnitude, IterativeMagnitude, OneShotMagnitude
from suite.config import RunConfig
from suite.models import prunable_layers
from suite.pruning import masks, sparsity


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
    assert p.target_at(20) == pytest.approx(0.9 - 0.9 * 0.5**3)
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


def test_gmp_per_layer_prunes_every_layer_to_the_cubic_schedule_as_the_references():
    """gmp.scope layer (variant gmp-layer: STR main.py:349-357, Distiller and TF prune every layer to
    the same rate): at every update each layer holds exactly its share of the schedule's sparsity,
    s_t = s_f (1 - (1 - t / n)^3) (Zhu & Gupta; TF model_pruning _setup_sparsity), computed here
    from the formula, and within a layer the smallest |w| of the still-active weights go first."""
    net = _net()
    layers = prunable_layers(net, "conv_linear")
    cfg = RunConfig(
        method="gmp",
        sparsity=0.8,
        epochs=3,
        gmp={"start_epoch": 0, "end_epoch": 2, "update_every": 4, "scope": "layer"},
    )
    assert cfg.variant() == "gmp-layer"
    p = GradualMagnitude(cfg, layers, steps_per_epoch=10)
    p.attach(net)
    for step in range(1, 31):
        before = [par.mask.clone() for par in p.params]
        p.after_step(step)
        if step <= 20 and (step % 4 == 0 or step == 20):
            s_t = 0.8 * (1 - (1 - step / 20) ** 3)
            for (_, m), par, old in zip(layers, p.params, before):
                w = masks.stored_weight(m).detach().abs()
                assert int((par.mask == 0).sum()) == round(s_t * w.numel())  # this layer's own share
                alive = w[par.mask.bool()]
                gone = w[(old.bool()) & (par.mask == 0)]
                if gone.numel() and alive.numel():
                    assert float(gone.max()) <= float(alive.min())


# ----------------------------------------------------------------------------- IMP
@pytest.mark.parametrize("s,levels", [(0.5, 4), (0.8, 8), (0.9, 11), (0.95, 14)])
def test_imp_levels_and_epochs_follow_the_target(s, levels):
    cfg = RunConfig(method="imp", sparsity=s, epochs=3, imp={"epochs_per_level": 2})
    assert IterativeMagnitude(cfg, prunable_layers(_net(), "conv_linear"), 5).levels == levels
    assert cfg.epochs == (levels + 1) * 2  # the run's length follows from its levels


def _imp_steps(p, net, layers, epochs, spe, opt):
    """Drive the hooks as the engine does, with weights moving at each step."""
    step = 0
    for epoch in range(1, epochs + 1):
        for _ in range(spe):
            with torch.no_grad():
                for _, m in layers:
                    masks.stored_weight(m).add_(0.05 * torch.randn_like(m.weight))
            opt[masks.stored_weight(layers[0][1])]["momentum_buffer"] = torch.ones(1)
            step += 1
            p.after_step(step)
        p.end_epoch(epoch, sparsity.density(layers))
        yield epoch


@pytest.mark.parametrize("rewind_step", [0, 7])
def test_imp_prunes_a_fifth_per_level_and_rewinds_exactly(rewind_step):
    net = _net()
    layers = prunable_layers(net, "conv_linear")
    cfg = RunConfig(method="imp", sparsity=0.6, epochs=1, imp={"epochs_per_level": 2, "rewind_step": rewind_step})
    p = IterativeMagnitude(cfg, layers, steps_per_epoch=5)
    p.attach(net)

    from suite.optim import WeightsAndGates

    Opt = WeightsAndGates(
        [{"params": list(net.parameters())}], [], lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=False, gate_lr=1e-3
    )  # what the engine binds
    p.bind_optimizer(Opt)
    p.on_train_start()
    saved = None
    prev_mask = [par.mask.clone() for par in p.params]
    for epoch in _imp_steps(p, net, layers, cfg.epochs, 5, Opt.sgd.state):
        if saved is None and p.snapshot is not None:
            saved = {k: v.clone() for k, v in p.snapshot.items()}
        if epoch % 2 == 0 and epoch < cfg.epochs:  # a level ended: pruned, rewound, momentum cleared
            level = epoch // 2
            expect = 0.6 if level == p.levels else 1 - 0.8**level
            assert sparsity.sparsity(layers) == pytest.approx(expect, abs=1e-3)
            for a, b in zip(prev_mask, [par.mask for par in p.params]):
                assert torch.all(b <= a), "IMP revived a pruned weight"
            prev_mask = [par.mask.clone() for par in p.params]
            state = net.state_dict()
            for k, v in saved.items():
                assert torch.equal(state[k], v), f"{k} not rewound exactly"
            assert len(Opt.sgd.state) == 0
    assert p.levels == 5 and cfg.epochs == 12
    assert sparsity.sparsity(layers) == pytest.approx(0.6, abs=1e-3)


def test_imp_rejects_a_rewind_point_beyond_the_first_segment():
    cfg = RunConfig(method="imp", sparsity=0.5, epochs=1, imp={"epochs_per_level": 1, "rewind_step": 11})
    with pytest.raises(ValueError, match="rewind_step"):
        IterativeMagnitude(cfg, prunable_layers(_net(), "conv_linear"), steps_per_epoch=10)


def test_imp_restarts_the_lr_schedule_each_level():
    cfg = RunConfig(method="imp", sparsity=0.5, epochs=1, lr=0.1, imp={"epochs_per_level": 3})
    p = IterativeMagnitude(cfg, prunable_layers(_net(), "conv_linear"), steps_per_epoch=10)
    lrs = [p.lrs(e)[0] for e in range(1, cfg.epochs + 1)]
    assert lrs[0] == lrs[3] == lrs[6] == pytest.approx(0.1)
    assert lrs[1] < lrs[0] and lrs[2] < lrs[1]


@pytest.mark.parametrize("s", [0.5, 0.9, 0.98])
def test_imp_equal_share_per_level_lands_on_the_target_in_a_fixed_budget(s):
    """imp.prune_fraction null with imp.levels: every level prunes the same share of what is
    left, f = 1 - (1 - s)^(1 / levels), so the run has levels + 1 segments at every target (the
    fair protocol's equal budget) and level k leaves 1 - (1 - s)^(k / levels)."""
    cfg = RunConfig(
        method="imp", sparsity=s, epochs=3, imp={"levels": 4, "prune_fraction": None, "epochs_per_level": 2}
    )
    assert cfg.epochs == 10  # the same at every target
    p = IterativeMagnitude(cfg, prunable_layers(_net(), "conv_linear"), 5)
    got = [p.level_sparsity(k) for k in range(5)]
    assert got == pytest.approx([1 - (1 - s) ** (k / 4) for k in range(5)], abs=1e-12)
    assert got[4] == s
    shares = [(got[k + 1] - got[k]) / (1 - got[k]) for k in range(4)]
    assert shares == pytest.approx([shares[0]] * 4)


def test_imp_null_fraction_needs_levels():
    with pytest.raises(Exception, match="prune_fraction null"):
        RunConfig(method="imp", sparsity=0.9, imp={"prune_fraction": None})


def test_imp_learning_rate_rewinding_keeps_the_trained_weights():
    """imp.rewind: lr (Renda et al. 2020, variant imp-lrr): at each level the survivors keep the
    values they were trained to (masked), the optimiser state is cleared and the LR restarts; no
    rewind point is stored. Weight rewinding (the default) puts them back to the start."""
    results = {}
    for mode in ("weights", "lr"):
        torch.manual_seed(0)
        net = _net()
        layers = prunable_layers(net, "conv_linear")
        cfg = RunConfig(method="imp", sparsity=0.6, epochs=1, imp={"epochs_per_level": 2, "rewind": mode})
        p = IterativeMagnitude(cfg, layers, steps_per_epoch=5)
        p.attach(net)

        from suite.optim import WeightsAndGates

        Opt = WeightsAndGates(
            [{"params": list(net.parameters())}],
            [],
            lr=0.1,
            momentum=0.9,
            weight_decay=0.0,
            nesterov=False,
            gate_lr=1e-3,
        )
        p.bind_optimizer(Opt)
        p.on_train_start()
        start = [masks.stored_weight(m).detach().clone() for _, m in layers]
        for _ in _imp_steps(p, net, layers, 2, 5, Opt.sgd.state):
            pass
        # after epoch 2 the first level was pruned: compare the survivors with the start
        now = [masks.stored_weight(m).detach().clone() for _, m in layers]
        results[mode] = (start, now, p, Opt)
        assert sparsity.sparsity(layers) == pytest.approx(1 - 0.8, abs=1e-3)
        assert len(Opt.sgd.state) == 0
    start, now, p, _ = results["weights"]
    assert all(torch.equal(a, b) for a, b in zip(start, now)) and p.snapshot is not None
    start, now, p, _ = results["lr"]
    assert all(not torch.equal(a, b) for a, b in zip(start, now)) and p.snapshot is None
    assert RunConfig(method="imp", sparsity=0.6, imp={"rewind": "lr"}).variant() == "imp-lrr"
    assert p.lrs(3) == p.lrs(1)  # the LR schedule restarts with the level
