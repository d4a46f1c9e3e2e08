"""The four Marchenko-Pastur pruners (baselines/rmt.py, baselines/rmt_classical.py): SEB, SER, hybrid magnitude-SER and
classical RMT, driven through the suite's Pruner hooks on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from baselines import marchenko_pastur as mp
from baselines.rmt import HybridMagnitudeSER, SpectralEdgeRestore
from baselines.rmt_classical import ClassicalRMT, denoise_noise_components
from suite.config import RunConfig
from suite.models import prunable_layers
from suite.optim import WeightsAndGates
from suite.pruning import masks, registry, sparsity


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mlp(seed=0, scales=(1.0, 2.0, 0.5)):
    """Three Linear layers; different weight scales give different MP edges."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        for m, c in zip([net[0], net[2], net[4]], scales):
            m.weight.mul_(c)
    return net


def _data(seed=1, n=6, bs=32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 32, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(n)]


def _setup(method, s, epochs=3, steps=6, rmt=None, seed=0, scales=(1.0, 2.0, 0.5)):
    net = _mlp(seed, scales)
    layers = prunable_layers(net, "conv_linear")
    cfg = RunConfig(method=method, sparsity=s, epochs=epochs, lr=0.05, rmt=rmt or {})
    p = registry.get(method)(cfg, layers, steps)
    p.attach(net)
    opt = WeightsAndGates(
        [{"params": list(net.parameters())}],
        [],
        lr=cfg.lr,
        momentum=0.9,
        weight_decay=5e-4,
        nesterov=False,
        gate_lr=1e-3,
    )
    p.bind_optimizer(opt)
    return net, layers, p, opt


def _epoch(net, layers, p, opt, epoch, data, step0=0, end=True):
    w_lr, g_lr = p.lrs(epoch)
    opt.set_lrs(w_lr, g_lr)
    p.start_epoch(epoch)
    step = step0
    for x, y in data:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        extra = p.loss_term()
        (loss + extra if extra is not None else loss).backward()
        opt.step()
        step += 1
        p.after_step(step)
    dens = sparsity.density(layers)
    out = p.end_epoch(epoch, dens) if end else {}
    return dens, out, step


def _zeros(layers):
    return sum(int((m.weight == 0).sum()) for _, m in layers)


def _n(layers):
    return sum(m.weight.numel() for _, m in layers)


# ----------------------------------------------------------------------------- SEB
@pytest.mark.parametrize("s", [0.3, 0.5, 0.8, 0.9])
def test_seb_exact_target_and_large_edge_layer_pruned_harder(s):
    net, layers, p, _ = _setup("seb", s, scales=(1.0, 1.5, 1.0))
    dense = [w.detach().clone() for w in p.stored()]
    p.on_train_start()
    assert _zeros(layers) == round(s * _n(layers))
    fits = [mp.mp_edge_fit(w) for w in dense]
    big = max(range(3), key=lambda i: fits[i].sv_edge)
    small = min(range(3), key=lambda i: fits[i].sv_edge)
    mag = masks.magnitude_masks(dense, s, "global")
    seb = [par.mask for par in p.params]
    share = lambda m: 1 - float(m.mean())  # noqa: E731
    # the largest-edge layer loses more than plain global magnitude takes, the smallest-edge less
    assert share(seb[big]) > share(mag[big])
    assert share(seb[small]) <= share(mag[small])
    # threshold = the smallest surviving |W| / w_l
    sc = mp.seb_scores(dense, p.wl)
    alive = torch.cat([c[m.bool()] for c, m in zip(sc, seb)])
    assert p.threshold == pytest.approx(float(alive.min()))
    assert "npl_threshold" in p.end_epoch(1, 1 - s)


@pytest.mark.parametrize(
    "s,b,s_d", [(0.2, 0.0, 1.0), (0.3, 1.0, 0.5), (0.4, 1.0, 0.5), (0.5, 1.25, 0.7), (0.55, 1.25, 0.7)]
)
def test_seb_paper_regime_picks_the_papers_b_and_s_d_by_target(s, b, s_d):
    """seb_regime paper against the regimes of arXiv 2606.02608 (methodology.tex:1079-1085,
    1179-1183): the pruner's masks are those of seb_masks with the paper's (b, s_d) given by hand."""
    net, layers, p, _ = _setup("seb", s, rmt={"seb_regime": "paper"}, scales=(1.0, 1.5, 1.0))
    dense = [w.detach().clone() for w in p.stored()]
    p.on_train_start()
    fits = [mp.mp_edge_fit(w) for w in dense]
    want = mp.seb_masks(dense, fits, s, b=b, s_d=s_d, p=1.0)
    assert all(torch.equal(par.mask, m) for par, m in zip(p.params, want))
    assert _zeros(layers) == round(s * _n(layers))
    if s < 0.3:  # plain global magnitude below 0.30
        assert all(torch.equal(a, c) for a, c in zip(want, masks.magnitude_masks(dense, s, "global")))


def test_seb_paper_regime_weights_layer_types_above_055():
    names = ["patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.mlp.fc1", "head", "layer1.0.conv1"]
    b, s_d = mp.seb_paper_regime(0.7, names)
    assert (b, s_d) == ([1.5, 1.0, 2.0, 1.5, 1.5], 0.85)
    from types import SimpleNamespace

    fits = [SimpleNamespace(sv_edge=e) for e in (1.0, 2.0, 3.0, 4.0, 5.0)]  # only the edge is read
    z = [-1.414213562373095, -0.7071067811865475, 0.0, 0.7071067811865475, 1.414213562373095]
    d = 1 - 0.7 / 0.85
    assert mp.seb_layer_weights(fits, 0.7, b=b, s_d=s_d) == pytest.approx(
        [max(0.1, 1 + bl * d * zl) for bl, zl in zip(b, z)]
    )
    assert (
        RunConfig(method="seb", sparsity=0.7).run_hash()
        != RunConfig(method="seb", sparsity=0.7, rmt={"seb_regime": "paper"}).run_hash()
    )


# ----------------------------------------------------------------------------- SER
def test_ser_selection_trains_only_removed_entries_and_restores_exactly():
    s = 0.5
    net, layers, p, opt = _setup("ser", s, epochs=2, rmt={"ser_rho": 1.3})
    dense = [w.detach().clone() for w in p.stored()]
    p.on_train_start()
    N = _n(layers)
    over = [o.clone() for o in p.over]
    res = [r.clone() for r in p.reservoir]
    # over-pruned by the SEB score with the final target's layer weights
    assert sum(int((o == 0).sum()) for o in over) == round(min(1.3 * s, 0.999) * N)
    ref = mp.seb_masks(dense, p.fits, 1.3 * s, budget_sparsity=s)
    assert all(torch.equal(o, r) for o, r in zip(over, ref))
    assert all(torch.equal(r, o == 0) for r, o in zip(res, over))
    # at the start of selection the reservoir's effective weights are 0 but trainable (mask 1)
    for (_, m), par, r in zip(layers, p.params, res):
        assert torch.all(par.mask[r] == 1) and torch.all(m.weight[r] == 0)
    dens, _, step = _epoch(net, layers, p, opt, 1, _data(), end=False)
    W = [w.detach().clone() for w in p.stored()]
    for w, d, o, r in zip(W, dense, over, res):
        assert torch.equal(w[o.bool()], d[o.bool()]), "a survivor moved during selection"
        assert float((w[r] != 0).float().mean()) > 0.9, "the removed entries did not train"
    # the ruler sees the selection state in epoch 1 (reservoir active), honest
    assert dens > 1 - s
    # restore: exactly s, and the restored ones are the largest |dw| w_l(s) of the reservoir
    out = p.end_epoch(1, dens)
    assert _zeros(layers) == round(s * N)
    n_restore = round(1.3 * s * N) - round(s * N)
    assert out["ser_restored"] == n_restore
    flat = torch.cat([(w.abs() * wl * r).reshape(-1) for w, wl, r in zip(W, p.wl, res)])
    expect = torch.zeros_like(flat, dtype=torch.bool)
    expect[torch.topk(flat, n_restore).indices] = True
    got = torch.cat([x.reshape(-1) for x in p.restored])
    assert torch.equal(got, expect)
    # restored entries keep their trained value; survivors are bit-identical to dense
    for (_, m), w, d, o, rr in zip(layers, W, dense, over, p.restored):
        assert torch.equal(m.weight[rr], w[rr])
        assert torch.equal(m.weight.detach()[o.bool()], d[o.bool()])
    # fine-tune with the mask frozen: sparsity stays exact, pruned stay pruned
    final = [par.mask.clone() for par in p.params]
    dens2, _, _ = _epoch(net, layers, p, opt, 2, _data(seed=2), step0=step)
    assert _zeros(layers) == round(s * N) and dens2 == pytest.approx(1 - round(s * N) / N)
    assert all(torch.equal(a, par.mask) for a, par in zip(final, p.params))


def test_ser_resume_mid_selection_keeps_survivors_frozen():
    s = 0.6
    net, layers, p, opt = _setup("ser", s, epochs=2)
    dense = [w.detach().clone() for w in p.stored()]
    p.on_train_start()
    data = _data()
    _, _, step = _epoch(net, layers, p, opt, 1, data[:3], end=False)
    ckpt_model, ckpt_p = net.state_dict(), p.state_dict()
    # a fresh pruner on a fresh model, resumed
    net2, layers2, p2, opt2 = _setup("ser", s, epochs=2, seed=5)
    net2.load_state_dict(ckpt_model)
    p2.load_state_dict(ckpt_p)
    assert p2.phase == "select"
    _, _, _ = _epoch(net2, layers2, p2, opt2, 1, data[3:], step0=step, end=False)
    over = [o.clone() for o in p2.over]
    for w, d, o in zip(p2.stored(), dense, over):
        assert torch.equal(w.detach()[o.bool()], d[o.bool()])
    p2.end_epoch(1, 0.0)
    assert _zeros(layers2) == round(s * _n(layers2)) and p2.phase == "finetune"


def test_ser_needs_a_fine_tune_epoch():
    net = _mlp()
    with pytest.raises(ValueError, match="epochs"):
        SpectralEdgeRestore(RunConfig(method="ser", sparsity=0.5, epochs=1), prunable_layers(net, "conv_linear"), 5)


# ----------------------------------------------------------------------------- hybrid
def test_hybrid_below_switch_is_one_shot_magnitude():
    s = 0.15
    net, layers, p, opt = _setup("rmt_hybrid", s, epochs=2)
    dense = [w.detach().clone() for w in p.stored()]
    p.on_train_start()
    assert not p.use_ser and p.phase == "magnitude"
    ref = masks.magnitude_masks(dense, s, "global")
    assert all(torch.equal(par.mask, r) for par, r in zip(p.params, ref))
    _epoch(net, layers, p, opt, 1, _data())
    _epoch(net, layers, p, opt, 2, _data(seed=3))
    assert _zeros(layers) == round(s * _n(layers))


def test_hybrid_above_switch_magnitude_prefix_then_ser():
    s = 0.7
    net, layers, p, opt = _setup("rmt_hybrid", s, epochs=3)
    dense = [w.detach().clone() for w in p.stored()]
    p.on_train_start()
    N = _n(layers)
    assert p.use_ser and p.phase == "prefix"
    prefix = masks.magnitude_masks(dense, 0.2, "global")
    assert all(torch.equal(par.mask, r) for par, r in zip(p.params, prefix))
    assert _zeros(layers) == round(0.2 * N)
    dens, _, step = _epoch(net, layers, p, opt, 1, _data())
    assert dens == pytest.approx(1 - round(0.2 * N) / N)
    assert p.phase == "select"
    # the magnitude-pruned 20 % are not in the reservoir and stay masked
    for r, pre, par in zip(p.reservoir, prefix, p.params):
        assert not torch.any(r & (pre == 0))
        assert torch.all(par.mask[pre == 0] == 0)
    assert sum(int((o == 0).sum()) for o in p.over) == round(min(1.1 * s, 0.999) * N)
    _, _, step = _epoch(net, layers, p, opt, 2, _data(seed=2), step0=step)
    assert p.phase == "finetune" and _zeros(layers) == round(s * N)
    for par, pre in zip(p.params, prefix):
        assert torch.all(par.mask[pre == 0] == 0), "a magnitude-pruned weight came back"
    _epoch(net, layers, p, opt, 3, _data(seed=3), step0=step)
    assert _zeros(layers) == round(s * N)


def test_hybrid_ser_path_needs_three_epochs():
    net = _mlp()
    L = prunable_layers(net, "conv_linear")
    with pytest.raises(ValueError, match="epochs"):
        HybridMagnitudeSER(RunConfig(method="rmt_hybrid", sparsity=0.5, epochs=2), L, 5)
    HybridMagnitudeSER(RunConfig(method="rmt_hybrid", sparsity=0.2, epochs=1), L, 5)  # magnitude path


# ----------------------------------------------------------------------------- classical RMT
def _spiked(N, M, k, sigma, seed, mult=3.0):
    g = torch.Generator().manual_seed(seed)
    Z = sigma * torch.randn(N, M, generator=g)
    if k == 0:
        return Z, torch.zeros(N, M)
    U, _ = torch.linalg.qr(torch.randn(N, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(M, k, generator=g))
    edge = sigma * (math.sqrt(N) + math.sqrt(M))
    theta = edge * torch.linspace(mult, mult + 2, k)
    S = (U * theta) @ V.T
    return Z + S, S


def _three_layer_net(ks=(0, 6, 20), sigma=0.05):
    net = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 48))
    with torch.no_grad():
        for m, k, sd in zip([net[0], net[2], net[4]], ks, (1, 2, 3)):
            m.weight.copy_(_spiked(*m.weight.shape, k, sigma, sd)[0])
    return net


@pytest.mark.parametrize("s", [0.5, 0.9])
def test_classical_rmt_exact_target_and_shares_grow_with_noise_fraction(s):
    net = _three_layer_net()
    layers = prunable_layers(net, "conv_linear")
    p = ClassicalRMT(RunConfig(method="rmt", sparsity=s, epochs=2), layers, 5)
    p.attach(net)
    p.on_train_start()
    assert _zeros(layers) == round(s * _n(layers))
    fb, sh = p.frac_below, p.layer_sparsity
    assert fb[0] > fb[1] > fb[2]  # pure noise, 6 spikes, 20 spikes
    assert sh[0] + 1e-3 >= sh[1] > sh[2]  # at 0.9 the first two sit at the cap (integer counts)
    assert max(sh) < 1.0


def test_classical_rmt_denoise_keeps_signal_components():
    W, S = _spiked(64, 128, 4, 0.05, seed=7)
    fit = mp.mp_edge_fit(W)
    assert fit.n_above == 4
    Wd = denoise_noise_components(W, fit, tau=1.0)
    s0 = torch.linalg.svdvals(W.double())
    U0 = torch.linalg.svd(W.double(), full_matrices=False)[0]
    # the signal components are kept: zeroing entries of the sub-edge vectors leaks only a
    # little into the top-4 subspace, so its singular values and directions barely move
    sd = torch.linalg.svdvals(Wd.double())
    assert torch.allclose(sd[:4], s0[:4], rtol=2e-3)
    Ud = torch.linalg.svd(Wd.double(), full_matrices=False)[0][:, :4]
    assert float(torch.linalg.svdvals(U0[:, :4].T @ Ud).min()) > 0.999
    # and the noise part did change (entries of the sub-edge vectors were zeroed)
    assert float((Wd - W).norm()) > 1e-3 * float(W.norm())


def test_classical_rmt_pruned_layer_keeps_the_signal():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(128, 64))
    W, S = _spiked(64, 128, 3, 0.05, seed=11, mult=4.0)
    with torch.no_grad():
        net[0].weight.copy_(W)
    layers = prunable_layers(net, "conv_linear")
    p = ClassicalRMT(RunConfig(method="rmt", sparsity=0.5, epochs=2), layers, 5)
    p.attach(net)
    p.on_train_start()
    assert _zeros(layers) == round(0.5 * W.numel())
    sv_sig = torch.linalg.svdvals(S.double())[:3]
    sv_out = torch.linalg.svdvals(net[0].weight.detach().double())[:3]
    assert torch.allclose(sv_out, sv_sig, rtol=0.1), (sv_out, sv_sig)
    # the signal directions survive: the top-3 left subspace stays aligned with the signal's
    Us = torch.linalg.svd(S.double(), full_matrices=False)[0][:, :3]
    Uo = torch.linalg.svd(net[0].weight.detach().double(), full_matrices=False)[0][:, :3]
    assert float(torch.linalg.svdvals(Us.T @ Uo).min()) > 0.95


def test_classical_rmt_regularised_then_plain_fine_tune():
    s = 0.6
    net, layers, p, opt = _setup("rmt", s, epochs=3, rmt={"regularised_epochs": 1, "l1": 1e-4})
    p.on_train_start()
    m0 = [par.mask.clone() for par in p.params]
    p.start_epoch(1)
    t = p.loss_term()
    assert t is not None and float(t.detach()) == pytest.approx(
        1e-4 * sum(float(m.weight.detach().abs().sum()) for _, m in layers)
    )
    _, out, step = _epoch(net, layers, p, opt, 1, _data())
    assert out["rmt_regularised"] == 1.0
    p.start_epoch(2)
    assert p.loss_term() is None
    _epoch(net, layers, p, opt, 2, _data(seed=2), step0=step)
    assert _zeros(layers) == round(s * _n(layers))
    assert all(torch.equal(a, par.mask) for a, par in zip(m0, p.params))


# ----------------------------------------------------------------------------- all, via hooks
@pytest.mark.parametrize("method", ["seb", "ser", "rmt_hybrid", "rmt"])
@pytest.mark.parametrize("s", [0.5, 0.9])
def test_each_method_through_its_hooks_hits_the_target(method, s):
    net, layers, p, opt = _setup(method, s, epochs=3)
    p.on_train_start()
    step = 0
    data = _data()
    for epoch in range(1, 4):
        dens, out, step = _epoch(net, layers, p, opt, epoch, data, step0=step)
        assert all(math.isfinite(v) for v in out.values())
    assert _zeros(layers) == round(s * _n(layers))
    assert 1 - sparsity.density(layers) == pytest.approx(s, abs=1 / _n(layers))
    assert all(torch.isfinite(m.weight).all() for _, m in layers)
    # the pruner's state round-trips
    st = p.state_dict()
    q = registry.get(method)(p.cfg, layers, 6)
    q.params = p.params
    q.load_state_dict(st)


def test_ser_reinsert_over_prunes_by_an_absolute_share_as_the_released_code():
    """rmt.ser_reinsert 0.03 (the released code's prune-then-restore 3 %): the over-pruned
    sparsity is s + 0.03, not rho * s; SER still ends on the target."""
    s = 0.5
    net, layers, p, opt = _setup("ser", s, epochs=2, rmt={"ser_reinsert": 0.03})
    assert p.over_target() == pytest.approx(0.53)
    p.on_train_start()
    N = _n(layers)
    assert sum(int((o == 0).sum()) for o in p.over) == round(0.53 * N)
    assert (
        RunConfig(method="ser", sparsity=0.5, rmt={"ser_reinsert": 0.03}).run_hash()
        != RunConfig(method="ser", sparsity=0.5).run_hash()
    )


def test_mp_fit_quantile_offset_reproduces_the_public_codes_i_over_p():
    """rmt.quantile_offset 0 puts the i-th smallest eigenvalue at quantile i / p (the public code);
    sigma^2 is then the least-squares scale against those quantiles, computed here directly."""
    import numpy as np

    torch.manual_seed(0)
    W = torch.randn(200, 80, dtype=torch.float64)
    s = torch.linalg.svdvals(W).numpy()
    n, p = 200, 80
    lam = np.sort(s**2 / n)
    lo, hi = int(0.25 * p), int(0.75 * p)
    idx = np.arange(lo, hi)
    for off in (0.0, 0.5):
        q = mp.mp_quantile((idx + off) / p, p / n)
        want = float(np.dot(q, lam[idx]) / np.dot(q, q))
        got = mp.mp_edge_fit(W, deflate=False, quantile_offset=off).sigma2
        assert got == pytest.approx(want, rel=1e-12)
    assert mp.mp_edge_fit(W, deflate=False, quantile_offset=0.0).sigma2 != mp.mp_edge_fit(W, deflate=False).sigma2


# ----------------------------------------------------------------------------- classical RMT, gradual
def test_cycle_path_follows_the_public_codes_growing_share_and_lands_on_the_target():
    from baselines.rmt_classical import cycle_path

    path = cycle_path(0.9, 34)
    assert len(path) == 34 and path[-1] == 0.9 and all(b > a for a, b in zip(path, path[1:]))
    # cycle i removes c 1.02^i of what remains (RMT_pruning_ViT prune.py:106): the ratio of
    # successive removed shares is 1.02 (the last is set to the target exactly)
    dens = [1.0] + [1 - p for p in path]
    shares = [1 - dens[i + 1] / dens[i] for i in range(33)]
    assert all(b / a == pytest.approx(1.02, rel=1e-9) for a, b in zip(shares, shares[1:]))
    assert cycle_path(0.9, 1) == [0.9]


def test_classical_rmt_in_cycles_prunes_along_the_path_and_never_revives():
    s, cycles = 0.8, 4
    net, layers, p, opt = _setup("rmt", s, epochs=4, steps=6, rmt={"cycles": cycles})
    assert p.cycle_every() == (4 * 6) // 2 // 4  # 3 steps: the first half of the run
    p.on_train_start()
    n = _n(layers)
    seen = [_zeros(layers)]
    assert seen[0] == round(p.path[0] * n)
    data = _data(n=6)
    step = 0
    masks_before = [par.mask.clone() for par in p.params]
    for epoch in (1, 2):
        _, out, step = _epoch(net, layers, p, opt, epoch, data, step)
        for a, par in zip(masks_before, p.params):
            assert bool(((a == 0) <= (par.mask == 0)).all())  # pruned stay pruned
        masks_before = [par.mask.clone() for par in p.params]
    assert p.cycle == cycles and out["rmt_cycle"] == cycles
    assert _zeros(layers) == round(s * n)  # the last cycle lands on the target exactly
    st = p.state_dict()
    q = _setup("rmt", s, epochs=4, steps=6, rmt={"cycles": cycles})[2]
    q.load_state_dict(st)
    assert q.cycle == cycles  # a resumed run does not prune again
    assert (
        RunConfig(method="rmt", sparsity=s).run_hash()
        != RunConfig(method="rmt", sparsity=s, rmt={"cycles": 34}).run_hash()
    )


@pytest.mark.parametrize("channels_last", [False, True])
def test_classical_rmt_l1_term_gives_autograds_gradient_values(channels_last):
    """The L1 term's fused form (|W| . M, backward sign(W) M) leaves the stored weight with the
    same gradient values (a zero may differ in sign) as l1 * sum |W * M| differentiated by
    autograd through the mask, so recorded classical-RMT runs reproduce."""
    import torch.nn as nn

    from baselines.rmt_classical import masked_l1
    from suite.pruning import masks

    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3)
    m = masks.attach(conv, masks.MaskedWeight(conv.weight.shape))
    m.mask.copy_((torch.rand(m.mask.shape) > 0.7).float())
    with torch.no_grad():
        masks.stored_weight(conv).view(-1)[:8] = 0.0  # sign(0) = 0 on both paths
    if channels_last:
        conv.to(memory_format=torch.channels_last)
    x = torch.randn(4, 16, 9, 9)
    got = []
    for fused in (False, True):
        w = masks.stored_weight(conv)
        w.grad = None
        l1 = masked_l1(conv) if fused else masks.effective_weight(conv).abs().sum()
        (conv(x).square().mean() + 1e-3 * l1).backward()
        got.append((w.grad.clone(), l1.detach()))
    assert torch.equal(got[0][0], got[1][0])
    assert got[1][1].item() == pytest.approx(got[0][1].item(), rel=1e-6)
