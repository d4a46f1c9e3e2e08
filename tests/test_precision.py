"""Engine options the reference recipes need: fp16 with a dynamic gradient scaler, the step LR
schedule (milestones), weight decay on conv/linear weights only. Fast, no services."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from suite.config import RunConfig
from suite.optim import WeightsAndGates
from suite.pruning import masks
from suite.pruning.base import weight_lr
from suite.steps import _weight_groups
from suite.sweeps import load_sweep


def _opt(model, gates=()):
    return WeightsAndGates(
        _weight_groups(model, {id(g) for g in gates}),
        list(gates),
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        nesterov=False,
        gate_lr=1e-3,
    )


def test_fp16_scaler_skips_the_update_on_inf_gradients_and_halves_the_scale():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = _opt(model)
    scaler = opt.use_grad_scaler("cpu")
    scaler.scale(torch.ones(()))  # what the engine does to the loss before backward
    s0 = scaler.get_scale()
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # no update
    assert scaler.get_scale() == s0 * 0.5 and opt.skipped_steps == 1
    assert opt.state_dict()["skipped_steps"] == 1


def test_fp16_scaler_step_equals_plain_sgd_on_the_unscaled_gradients():
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    opt = _opt(a)
    scaler = opt.use_grad_scaler("cpu")
    ref = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for _ in range(3):
        for m in (a, b):
            m.zero_grad()
        (scaler.scale(nn.functional.cross_entropy(a(x), y))).backward()
        nn.functional.cross_entropy(b(x), y).backward()
        opt.step()
        ref.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert opt.skipped_steps == 0 and scaler.get_scale() == 2.0**16  # growth only after 2000 good steps


def test_step_schedule_matches_torch_multisteplr():
    cfg = RunConfig(epochs=12, lr=0.1, lr_schedule="step", lr_milestones=[4, 9], lr_gamma=0.1)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[4, 9], gamma=0.1)
    want = []
    for _ in range(12):  # the reference steps its scheduler once per epoch, after the epoch
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    got = [weight_lr(cfg, e) for e in range(1, 13)]
    assert got == pytest.approx(want, rel=1e-12)
    assert got[3] == pytest.approx(0.1) and got[4] == pytest.approx(0.01) and got[9] == pytest.approx(0.001)


def test_step_schedule_milestones_are_checked_and_enter_the_hash():
    with pytest.raises(ValueError, match="lr_milestones"):
        RunConfig(epochs=10, lr_schedule="step", lr_milestones=[5, 3])
    with pytest.raises(ValueError, match="lr_milestones"):
        RunConfig(epochs=10, lr_schedule="step", lr_milestones=[10])
    with pytest.raises(ValueError, match="lr_milestones"):
        RunConfig(epochs=10, lr_milestones=[5])  # cosine ignores them: refused, not silently dropped
    base = RunConfig(epochs=10)
    step = RunConfig(epochs=10, lr_schedule="step", lr_milestones=[5])
    assert step.run_hash() != base.run_hash()
    assert "lr_schedule" not in base.semantic_dict()  # older runs keep their hashes


def test_scale_knob_keeps_milestones_inside_the_shortened_run():
    sw = load_sweep("configs/paper/cifar10_resnet50.yaml", {"scale.epochs": 0.05})
    (dense,) = [r for r in sw.expand() if r.method == "dense" and r.seed == 0]
    assert dense.epochs == 8 and dense.lr_milestones == [4, 6]
    sw = load_sweep("configs/paper/cifar10_resnet50.yaml", {"scale.epochs": 0.01})
    (dense,) = [r for r in sw.expand() if r.method == "dense" and r.seed == 0]
    assert dense.epochs == 2 and dense.lr_milestones == [1]


def test_weight_decay_on_conv_linear_leaves_norms_and_biases_undecayed():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    masks.attach(model[0], masks.MaskedWeight(model[0].weight.shape))  # a pruner's parametrization
    groups = _weight_groups(model, set(), "conv_linear")
    decayed = {id(p) for p in groups[0]["params"]}
    assert decayed == {id(masks.stored_weight(model[0])), id(model[3].weight)}
    assert groups[1]["weight_decay"] == 0.0
    assert {id(p) for p in groups[1]["params"]} == {
        id(model[0].bias),
        id(model[1].weight),
        id(model[1].bias),
        id(model[3].bias),
    }
    assert len(_weight_groups(model, set())) == 1  # default: one group, decay on everything


def test_fp16_is_refused_with_zero_partitioning():
    with pytest.raises(ValueError, match="fp16"):
        RunConfig(engine={"precision": "fp16", "zero_stage": 1})


def test_fp16_loss_scaling_leaves_the_hyperflux_pressure_gradient_unchanged():
    """The pressure gradient gamma/N is added inside the gate's backward, not through the loss: under a
    loss scale S it must be scaled by S too, or unscaling would divide the pressure by S (65536)."""
    torch.manual_seed(0)
    w, x = torch.randn(6, 5), torch.randn(3, 5)

    def gate_grad(pressure, loss_scale):
        g = masks.GatedWeight(torch.linspace(-0.5, 0.5, 30).reshape(6, 5), 0.25)
        g.pressure = pressure
        g.loss_scale = loss_scale
        loss = (x @ g(w).t()).square().sum()
        s = 1.0 if loss_scale is None else loss_scale
        (loss * s).backward()
        return g.gate.grad / s

    S = torch.tensor(65536.0)
    torch.testing.assert_close(gate_grad(0.37, S), gate_grad(0.37, None), rtol=1e-6, atol=1e-6)
    # after unscaling, the pressure adds exactly gamma / N to every gate
    torch.testing.assert_close(gate_grad(0.37, S) - gate_grad(0.0, S), torch.full((6, 5), 0.37), rtol=1e-6, atol=1e-5)


def test_reference_boundary_has_its_own_hash_and_keeps_a_regrowth_epoch_when_scaled():
    on = RunConfig(
        method="hyperflux", sparsity=0.5, epochs=6, hyperflux={"pruning_end": 3, "quirks": ["phase_off_by_one"]}
    )
    # the quirk was redefined to match the reference exactly: runs of the old meaning keep other hashes
    assert on.semantic_dict()["hyperflux"]["quirks"] == ["phase_off_by_one@9aaed27"]
    for scale in (0.01, 0.02, 0.05):
        sw = load_sweep("configs/paper/cifar10_resnet50.yaml", {"scale.epochs": scale})
        for r in sw.expand():
            if r.method == "hyperflux":  # epoch P + 1 still prunes: regrowth needs P + 2
                assert r.epochs >= r.hyperflux.pruning_end + 2, (scale, r.epochs, r.hyperflux.pruning_end)


def test_settings_that_would_be_silently_wrong_are_refused():
    with pytest.raises(ValueError, match="taylor"):
        RunConfig(method="gmp", sparsity=0.5, gmp={"criterion": "taylor"}, engine={"precision": "fp16"})
    for method in ("hyperflux", "imp"):
        with pytest.raises(ValueError, match="lr_schedule"):
            RunConfig(method=method, sparsity=0.5, epochs=10, lr_schedule="step", lr_milestones=[3])
    # integral float milestones (as YAML may write them) scale like ints
    sw = load_sweep(
        "configs/paper/cifar10_resnet50.yaml", {"overrides.dense.lr_milestones": [80.0, 120.0], "scale.epochs": 0.05}
    )
    (dense,) = [r for r in sw.expand() if r.method == "dense" and r.seed == 0]
    assert dense.lr_milestones == [4, 6]
