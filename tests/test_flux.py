"""Flux statistics, regrowth, the Taylor criterion, the reference-code quirks and the Neural
Pruning Law fit, on tiny tensors with values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from suite.config import RunConfig
from suite.optim import WeightsAndGates
from suite.pruning import flux, masks, sparsity
from suite.pruning.registry import get as get_pruner


def _half_mse(out, y):
    return 0.5 * ((out - y) ** 2).sum()


def test_flux_statistics_on_hand_computed_layer():
    # W = [2, 3], mask [1, 0]: W_eff = [2, 0]; x = [1, 1], y = 0 -> out = 2, dL/dout = 2,
    # G = dL/dW_eff = [2, 2]; phi = -w * G = [-4, -6]
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, 3.0]]))
    p = masks.attach(lin, masks.MaskedWeight(lin.weight.shape))
    p.mask.copy_(torch.tensor([[1.0, 0.0]]))
    layers = [("lin", lin)]
    parts = flux.flux_and_grad(lin, layers, torch.ones(1, 2), torch.zeros(1, 1), _half_mse)
    ((w, g, act),) = parts
    assert g.tolist() == [[2.0, 2.0]] and act.tolist() == [[True, False]] and w.tolist() == [[2.0, 3.0]]
    st = flux.statistics(parts)
    assert st["flux_active_min"] == -4.0
    assert all(st[f"flux_pruned_q{q:02d}"] == -6.0 for q in (5, 25, 50, 75, 95))
    assert st["npl_min_abs_w"] == 2.0 and st["npl_min_taylor"] == 4.0
    assert masks.stored_weight(lin).grad is None  # the probe leaves .grad alone


def test_flux_quantiles_match_numpy_and_probe_leaves_training_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    layers = [("0", model[0]), ("3", model[3])]
    for _, mod in layers:
        p = masks.attach(mod, masks.MaskedWeight(mod.weight.shape))
        p.mask.copy_((torch.rand(mod.weight.shape) > 0.4).float())
    model.train()
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    bn_before = model[1].running_mean.clone()
    parts = flux.flux_and_grad(model, layers, x, y, nn.CrossEntropyLoss())
    assert model.training and torch.equal(model[1].running_mean, bn_before)  # eval-mode probe
    # the same numbers by hand, in eval mode
    model.eval()
    effs = [m.weight.detach().clone().requires_grad_(True) for _, m in layers]
    h = torch.relu(model[1](x @ effs[0].T + model[0].bias))
    loss = nn.CrossEntropyLoss()(h @ effs[1].T + model[3].bias, y)
    grads = torch.autograd.grad(loss, effs)
    model.train()
    phi = np.concatenate(
        [(-(masks.stored_weight(m) * g)).detach().reshape(-1).numpy() for (_, m), g in zip(layers, grads)]
    )
    act = np.concatenate([(m.weight != 0).reshape(-1).numpy() for _, m in layers])
    st = flux.statistics(parts)
    for q in (5, 25, 50, 75, 95):
        assert st[f"flux_active_q{q:02d}"] == pytest.approx(np.quantile(phi[act], q / 100), rel=1e-5, abs=1e-9)
        assert st[f"flux_pruned_q{q:02d}"] == pytest.approx(np.quantile(phi[~act], q / 100), rel=1e-5, abs=1e-9)
    assert st["flux_active_min"] == pytest.approx(phi[act].min(), rel=1e-6)


def _hyperflux_linear(target_w1_sign: float, gate1: float, gamma: float):
    """Linear(2 -> 1) with gates; the data need w1 * target_w1_sign; weight 1 starts pruned."""
    cfg = RunConfig(
        method="hyperflux",
        sparsity=0.5,
        epochs=6,
        hyperflux={"pruning_end": 5, "gate_lr": 0.05, "schedule": "fixed", "fixed_gamma": max(gamma, 1e-9)},
    )
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 1.0]]))
    layers = [("lin", lin)]
    pruner = get_pruner("hyperflux")(cfg, layers, steps_per_epoch=1)
    pruner.attach(lin)
    pruner.gamma = gamma
    with torch.no_grad():
        pruner.params[0].gate.copy_(torch.tensor([[0.3, gate1]]))
    opt = WeightsAndGates(
        [{"params": [masks.stored_weight(lin)]}],
        pruner.gate_parameters(),
        lr=0.0,
        momentum=0.9,
        weight_decay=0.0,
        nesterov=False,
        gate_lr=0.05,
    )
    gen = torch.Generator().manual_seed(0)

    def step():
        x = torch.randn(16, 2, generator=gen)
        y = x[:, :1] + target_w1_sign * x[:, 1:]
        loss = _half_mse(lin(x), y) / 16
        extra = pruner.loss_term()
        opt.zero_grad()
        (loss + extra if extra is not None else loss).backward()
        opt.step()

    return lin, layers, step


def test_pruned_weight_with_positive_flux_regrows_after_pressure_drops():
    lin, layers, step = _hyperflux_linear(+1.0, gate1=-0.05, gamma=0.0)
    before = sparsity.active(layers)
    assert before[0].tolist() == [[True, False]]
    # its flux: removing it costs, so phi > 0 (and the gate's gradient 0.25 * w * G < 0)
    ((w, g, _),) = flux.flux_and_grad(lin, layers, torch.eye(2), torch.tensor([[1.0], [1.0]]), _half_mse)
    assert float(-(w * g)[0, 1]) > 0
    for _ in range(20):
        step()
    pruned, regrown = sparsity.flips(before, sparsity.active(layers))
    assert (pruned, regrown) == (0, 1)


def test_pruned_weight_with_negative_flux_stays_pruned_and_pressure_prunes():
    # restoring weight 1 would hurt (the data want -w1): it stays pruned without pressure
    lin, layers, step = _hyperflux_linear(-1.0, gate1=-0.05, gamma=0.0)
    before = sparsity.active(layers)
    for _ in range(20):
        step()
    assert sparsity.flips(before, sparsity.active(layers)) == (0, 0)
    # a useless active weight (the data ignore x1... here it is harmful) under strong pressure is pruned
    lin, layers, step = _hyperflux_linear(0.0, gate1=0.05, gamma=50.0)
    before = sparsity.active(layers)
    for _ in range(20):
        step()
    pruned, regrown = sparsity.flips(before, sparsity.active(layers))
    assert pruned >= 1 and regrown == 0


def test_gmp_taylor_ranks_by_w_times_grad_not_magnitude():
    # |w| = [3, 1, 2], inputs scale the gradients by [0.01, 5, 1]: |w * G| = 7.03 * [0.03, 5, 2]
    def prune(criterion):
        cfg = RunConfig(
            method="gmp",
            sparsity=1 / 3,
            epochs=1,
            gmp={"start_epoch": 0, "end_epoch": 1, "update_every": 1, "criterion": criterion},
        )
        lin = nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor([[3.0, 1.0, 2.0]]))
        pr = get_pruner("gmp")(cfg, [("lin", lin)], steps_per_epoch=1)
        pr.attach(lin)
        x = torch.tensor([[0.01, 5.0, 1.0]])
        _half_mse(lin(x), torch.zeros(1, 1)).backward()  # out = 7.03, G = 7.03 * x
        pr.after_step(1)
        return lin.weight.detach().ne(0).tolist()[0], pr.end_epoch(1, 2 / 3)["npl_threshold"]

    kept, thr = prune("magnitude")
    assert kept == [True, False, True] and thr == 2.0
    kept, thr = prune("taylor")
    assert kept == [False, True, True]
    assert thr == pytest.approx(2.0 * 7.03 * 1.0, rel=1e-6)  # smallest surviving |w * G|


def test_quirks_are_off_by_default_and_do_what_they_say():
    assert RunConfig(method="hyperflux", sparsity=0.5).hyperflux.quirks == []
    for quirks, bn_frozen, extra_epoch in (([], False, False), (["frozen_bn_scale", "phase_off_by_one"], True, True)):
        cfg = RunConfig(
            method="hyperflux", sparsity=0.5, epochs=6, hyperflux={"pruning_end": 3, "step": 0.2, "quirks": quirks}
        )
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(18, 2))
        pr = get_pruner("hyperflux")(cfg, [("0", model[0]), ("3", model[3])], steps_per_epoch=1)
        pr.attach(model)
        assert model[1].weight.requires_grad is (not bn_frozen)
        for e in (1, 2, 3):
            pr.end_epoch(e, density=1.0)  # far above the trajectory: the controller raises the pressure
        if extra_epoch:
            assert pr.gamma > 0  # epoch P + 1 still runs with the last pressure
            pr.end_epoch(4, density=1.0)
        assert pr.gamma == 0.0


def test_fit_npl_recovers_a_planted_power_law(tmp_path, capsys):
    from launchers.cli import main
    from suite import tracking

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    exp = tracking.ensure_experiment(uri, "npl")
    c = tracking.client(uri)
    alpha, c0 = 1.5, 0.002
    for variant in ["gmp", "gmp-taylor"]:
        run = c.create_run(exp, tags={"hfbench.variant": variant, "hfbench.method": "gmp"})
        for step, s in enumerate(np.geomspace(0.02, 0.5, 12), start=1):
            d = c0 * s ** (-alpha) * (1 + 0.01 * math.sin(step))  # a little noise
            c.log_metric(run.info.run_id, "density", d, step=step)
            c.log_metric(run.info.run_id, "npl_threshold", s, step=step)
        c.set_terminated(run.info.run_id, "FINISHED")
    assert main(["fit-npl", "--experiment", "npl", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("gmp")]
    assert [r[0] for r in rows] == ["gmp", "gmp-taylor"]
    for r in rows:
        a, r2, n = r[-3:]
        assert float(a) == pytest.approx(alpha, abs=0.05) and float(r2) > 0.99 and int(n) >= 3
