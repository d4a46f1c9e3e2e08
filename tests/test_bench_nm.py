"""`hfbench bench nm` (suite/bench_nm.py): 2:4 pruning keeps the two largest weights of every
group, a 1x1 convolution as a matrix product computes what Conv2d computes, the converter
swaps exactly the matrix-product layers, and the CPU path (CSR) measures a registry model.
The CUDA path (torch.sparse.to_sparse_semi_structured, CUDA graphs) needs a GPU: the GPU
script runs it (scripts/gpu_bench.sh); here it is the same code with another converter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from suite import bench
from suite.bench_nm import MatmulConv1x1, layer_speedups, matmul_layer, prune_nm, run_nm_inference, to_matmul_sparse
from suite.pruning.masks import nm_violations


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_1x1_convolution_as_matrix_product_computes_what_conv2d_computes(stride, channels_last, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 1, stride=stride, bias=bias)
    x = torch.randn(3, 8, 7, 9)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    mm = MatmulConv1x1(conv, conv.weight.detach().reshape(12, 8))
    torch.testing.assert_close(mm(x), conv(x), rtol=1e-5, atol=1e-5)


def test_only_plain_matrix_products_are_matmul_layers():
    assert matmul_layer(nn.Linear(4, 4))
    assert matmul_layer(nn.Conv2d(4, 4, 1, stride=2))
    assert not matmul_layer(nn.Conv2d(4, 4, 3))
    assert not matmul_layer(nn.Conv2d(4, 4, 1, padding=1))
    assert not matmul_layer(nn.Conv2d(4, 4, 1, groups=2))
    with pytest.raises(ValueError, match="1x1 Conv2d"):
        MatmulConv1x1(nn.Conv2d(4, 4, 3), torch.zeros(4, 36))


def test_prune_nm_keeps_the_two_largest_of_every_group_of_four():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 10), nn.Linear(10, 6))
    before = {n: m.weight.detach().clone() for n, m in net.named_children() if hasattr(m, "weight")}
    done = prune_nm(net, ["0", "2", "3"])
    assert done == ["0", "2"]  # the last layer's rows (10 weights) do not divide into groups of 4
    torch.testing.assert_close(net[3].weight, before["3"])
    for n in done:
        w0 = before[n].reshape(-1, 4).numpy()
        w = net.get_submodule(n).weight.detach().reshape(-1, 4).numpy()
        # independently: numpy's argsort of |w| per group, the two largest kept as they were
        top = np.argsort(-np.abs(w0), axis=1, kind="stable")[:, :2]
        want = np.zeros_like(w0)
        np.put_along_axis(want, top, np.take_along_axis(w0, top, axis=1), axis=1)
        np.testing.assert_array_equal(w, want)
        assert nm_violations(net.get_submodule(n).weight, 2, 4) == 0


def test_converter_swaps_the_matrix_products_and_says_why_others_stay_dense():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 1, stride=2), nn.Flatten(), nn.Linear(16 * 4 * 4, 12)
    ).eval()
    x = torch.randn(2, 3, 8, 8)

    def convert(w):  # a dense copy, but refusing one shape as a kernel would
        if w.shape[0] == 12:
            raise RuntimeError("shape (12, 256) not supported\nmore")
        return w.clone()

    out, done, left = to_matmul_sparse(net, ["0", "1", "3"], convert)
    assert done == ["1"]
    assert isinstance(out[1], MatmulConv1x1) and isinstance(net[1], nn.Conv2d)  # the original is untouched
    assert "is not a matrix product" in left["0"]
    assert left["3"] == "(12, 256): shape (12, 256) not supported"
    with torch.no_grad():
        torch.testing.assert_close(out(x), net(x), rtol=1e-5, atol=1e-5)


def test_layer_speedups_one_row_per_distinct_product_with_its_rows():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 16, 1, stride=2)).eval()
    x = torch.randn(2, 8, 6, 6)
    sparse, done, _ = to_matmul_sparse(net, ["0", "1", "2"], lambda w: w.clone())
    rows = layer_speedups(net, sparse, done, x, repeats=1, inner=1, warmup=0)
    # layers 0 and 1 are the same (72 x 8) @ (8 x 8)^T product; layer 2 runs on 2*3*3 vectors
    assert [(r["layer"], r["rows"], r["out"], r["in"]) for r in rows] == [("0", 72, 8, 8), ("2", 18, 16, 8)]
    assert all(r["speedup"] > 0 and r["max_rel_err"] <= 1e-4 for r in rows)


def test_cpu_path_measures_a_registry_model_in_csr():
    res = run_nm_inference(
        "fmnist_cnn", (1, 3), size=28, device="cpu", repeats=2, inner=1, warmup=0, say=lambda *a: None
    )
    p = res["params"]
    assert (p["device"], p["dtype"], p["backend"]) == ("cpu", "fp32", "CSR (CPU)")
    assert res["converted"] and set(res["converted"]) <= set(res["pruned"])
    assert [t["batch"] for t in res["timings"]] == [1, 3]
    for t in res["timings"]:
        assert t["max_rel_err"] <= 1e-4 and t["dense_ms"] > 0 and t["sparse_ms"] > 0
        assert t["speedup_q1"] <= t["speedup"] <= t["speedup_q3"]


def test_cli_nm_writes_json_with_the_closed_form_theoretical_speedup(tmp_path, capsys):
    from launchers.bench_cli import main

    out = tmp_path / "nm.json"
    argv = ["bench", "nm", "--model", "fmnist_cnn", "--size", "28", "--batches", "2", "--device", "cpu"]
    assert main(argv + ["--repeats", "1", "--inner", "1", "--warmup", "0", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    share = res["sparse_mac_share"]
    assert 0 < share <= 1
    # the converted layers' MACs halved, the rest dense: 1 / (1 - share / 2)
    assert res["theoretical_speedup"] == pytest.approx(1 / (1 - share / 2))
    printed = capsys.readouterr().out
    assert "| batch | dense ms | 2:4 ms |" in printed and "CSR (CPU)" in printed


def test_fp16_overhead_bench_steps_with_the_engines_gradient_scaler():
    cfg = bench.bench_config("hyperflux", "fmnist_cnn", 4)
    fp16 = bench.Trainee(cfg, 28, "cpu", dtype="fp16")
    bf16 = bench.Trainee(cfg, 28, "cpu", dtype="bf16")
    assert bf16.scaler is None and bf16.gated == []
    assert isinstance(fp16.scaler, torch.amp.GradScaler) and fp16.gated
    fp16.step()
    # the gates were handed this step's loss scale (the scaler's initial 2**16), as in the engine
    assert all(float(g.loss_scale) == fp16.scaler.get_scale() == 2.0**16 for g in fp16.gated)


def test_sparse_products_come_back_row_major_in_the_inputs_dtype():
    """A sparse product that returns another dtype (fp32 from fp16 on some PyTorch builds) or a
    column-major result (torch's semi-structured products) is handed on row-major in the input's
    dtype, as a dense layer's output, and what it returned is kept."""
    from suite.bench_nm import MatmulLinear, _as_input_dtype

    lin = nn.Linear(4, 3)
    mod = MatmulLinear(lin.weight.detach().clone(), lin.bias)
    x = torch.randn(2, 4)
    torch.testing.assert_close(mod(x), lin(x))
    assert mod.out_dtype == torch.float32
    other = MatmulLinear(lin.weight.detach().clone(), lin.bias)
    y = _as_input_dtype(torch.ones(2, 3, dtype=torch.float64), x, other)
    assert y.dtype == torch.float32 and other.out_dtype == torch.float64 and other.out_contiguous
    third = MatmulLinear(lin.weight.detach().clone(), lin.bias)
    col_major = torch.arange(6.0).reshape(3, 2).t()  # (2, 3), strides (1, 2)
    y = _as_input_dtype(col_major, x, third)
    assert y.is_contiguous() and torch.equal(y, col_major) and third.out_contiguous is False
