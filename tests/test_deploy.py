"""`hfbench bench deploy` (suite/bench_deploy.py): the sparse layers compute what PyTorch's dense
layers compute, the CSR byte count is the closed form, and the command measures every finished
pruned run of an experiment from its final weights and logs it to MLflow."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from mlflow import MlflowClient

from suite.bench_deploy import CSRConv2d, CSRLinear, csr_bytes, deploy_run, first_win, sparsify


def _prune(w: torch.Tensor, s: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w.mul_(torch.rand(w.shape, generator=g) >= s)


@pytest.mark.parametrize(
    "kw",
    [
        {"kernel_size": 3},
        {"kernel_size": 3, "padding": 1},
        {"kernel_size": (3, 5), "stride": 2, "padding": (1, 2)},
        {"kernel_size": 3, "dilation": 2, "padding": 2, "bias": False},
        {"kernel_size": 1},
    ],
)
def test_csr_convolution_computes_what_torchs_conv2d_computes(kw):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, **kw)
    _prune(conv.weight, 0.8)
    x = torch.randn(3, 6, 11, 9)
    torch.testing.assert_close(CSRConv2d(conv)(x), conv(x), rtol=1e-5, atol=1e-5)


def test_csr_linear_computes_what_torchs_linear_computes_on_any_leading_shape():
    torch.manual_seed(0)
    lin = nn.Linear(20, 7)
    _prune(lin.weight, 0.9)
    for shape in [(5, 20), (2, 3, 20), (1, 20)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(CSRLinear(lin)(x), lin(x), rtol=1e-5, atol=1e-5)


def test_csr_bytes_is_values_column_indices_and_row_pointers():
    w = torch.zeros(4, 2, 3, 3)
    w[0, 0, 0, 0] = w[1, 1, 2, 2] = w[3, 0, 1, 1] = 1.0
    # 3 float32 values, 3 int64 column indices, 4 + 1 int64 row pointers
    assert csr_bytes(w) == 3 * 4 + 3 * 8 + 5 * 8


def test_break_even_is_where_the_sparse_kernel_wins_from_then_on():
    assert first_win([(0.5, 0.4), (0.8, 0.9), (0.9, 1.2), (0.95, 1.5), (0.99, 2.0)]) == 0.9
    assert first_win([(0.5, 1.1), (0.8, 0.9), (0.9, 1.2), (0.99, 2.0)]) == 0.9  # a lucky win below does not count
    assert first_win([(0.5, 0.4), (0.9, 0.8), (0.99, 0.9)]) is None
    assert first_win([(0.5, 1.3), (0.9, 1.8)]) == 0.5


def test_deploy_run_counts_the_zeros_and_times_both_models():
    from suite import datasets, models

    spec, ds = models.get("fmnist_cnn"), datasets.get("fashion_mnist")
    net = spec.build(ds.num_classes, ds.input_shape[0])
    names = [n for n, _ in spec.prunable(net)]
    for i, (_, m) in enumerate(spec.prunable(net)):
        _prune(m.weight, 0.9, i)
    zeros = sum(int((net.get_submodule(n).weight == 0).sum()) for n in names)
    numel = sum(net.get_submodule(n).weight.numel() for n in names)
    sp, dense_mb, csr_mb, timings = deploy_run(net, names, ds.input_shape, (1, 4), repeats=2, inner=1, warmup=1)
    assert sp == zeros / numel and dense_mb == numel * 4 / 1e6 and 0 < csr_mb < dense_mb
    assert [t.batch for t in timings] == [1, 4] and all(t.dense_ms > 0 and t.sparse_ms > 0 for t in timings)
    assert all(isinstance(m, (CSRLinear, CSRConv2d)) for n in names for m in [sparsify(net, names).get_submodule(n)])


def test_the_deploy_command_measures_each_finished_pruned_run_and_logs_it(tmp_path, capsys):
    """A store with one finished pruned run (its final weights in its run folder), one finished
    run whose folder is gone and one failed run: the first is measured and logged, the second
    named as skipped, the failed one left out."""
    from launchers.bench_cli import main
    from suite import datasets, models

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("dep", artifact_location=(tmp_path / "art").as_uri())
    spec, ds = models.get("lenet300"), datasets.get("fashion_mnist")
    net = spec.build(ds.num_classes, ds.input_shape[0])
    for i, (_, m) in enumerate(spec.prunable(net)):
        _prune(m.weight, 0.8, i)
    ids = {}
    for name, status, folder in [("ok", "FINISHED", "ok"), ("gone", "FINISHED", "missing"), ("bad", "FAILED", "ok")]:
        d = tmp_path / folder
        if folder == "ok":
            d.mkdir(exist_ok=True)
            torch.save(net.state_dict(), d / "final_weights.pt")
        tags = {
            "hfbench.run_hash": f"{name:0>12}",
            "hfbench.method": "magnitude",
            "hfbench.variant": "magnitude",
            "hfbench.model": "lenet300",
            "hfbench.dataset": "fashion_mnist",
            "hfbench.run_dir": str(d),
        }
        r = c.create_run(exp, tags=tags, run_name=name)
        c.log_param(r.info.run_id, "sparsity", "0.8")
        c.set_terminated(r.info.run_id, status)
        ids[name] = r.info.run_id
    argv = [
        "bench",
        "deploy",
        "--experiment",
        "dep",
        "--tracking-uri",
        uri,
        "--batches",
        "1,8",
        "--repeats",
        "2",
        "--inner",
        "1",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| ok | magnitude |" in out and "| bad |" not in out
    assert "Skipped: gone: no" in out and "Break-even sparsity per layer shape" in out
    bench = c.get_experiment_by_name("bench")
    (run,) = c.search_runs([bench.experiment_id], "tags.`hfbench.bench` = 'deploy'")
    keys = set(run.data.metrics)
    assert {f"speedup_b1.{ids['ok']}", f"speedup_b8.{ids['ok']}", f"theoretical.{ids['ok']}"} <= keys
    assert not any(ids["gone"] in k or ids["bad"] in k for k in keys)
    assert run.data.metrics[f"theoretical.{ids['ok']}"] > 1.0
    # the report shows the measurement beside the theoretical speed-up, for the measured run only
    from reports.build import build_report
    from suite.run_schema import mlflow_key

    rows = ["layer,shape,numel,nonzero"] + [
        f"{n},{'x'.join(map(str, m.weight.shape))},{m.weight.numel()},{int((m.weight != 0).sum())}"
        for n, m in spec.prunable(net)
    ]
    for name in ("ok", "gone"):
        c.log_metric(ids[name], mlflow_key("test_top1"), 0.8)
        c.log_metric(ids[name], mlflow_key("final_density"), 0.2)
        c.log_text(ids[name], "\n".join(rows) + "\n", "layer_density.csv")  # the report's theoretical speed-up
    files = build_report(uri, "dep", tmp_path / "report")
    md = files["report.md"].read_text()
    # measured against theoretical, one point per measured run and batch: the plot is drawn and listed
    plot = files["speedup_fashion_mnist_lenet300.png"]
    assert plot.stat().st_size > 0 and "](speedup_fashion_mnist_lenet300.png)" in md
    assert "Measured vs theoretical inference speed-up" in md
    header = next(ln for ln in md.splitlines() if ln.startswith("| Method |"))
    assert "Measured speed-up, batch 1 (×)" in header and "Measured speed-up, batch 8 (×)" in header
    cols = [c.strip() for c in header.strip("|").split("|")]
    lines = md.splitlines()
    at = lines.index(header)  # the accuracy table: its rows follow the header and the |---| line
    body = []
    for ln in lines[at + 2 :]:
        if not ln.startswith("|"):
            break
        body.append([c.strip() for c in ln.strip("|").split("|")])
    (row,) = body  # one row: the method at its target, two runs, one of them measured
    measured = run.data.metrics["speedup_b8." + ids["ok"]]
    assert row[cols.index("Measured speed-up, batch 8 (×)")] == f"{measured:.2f} (1 of 2 runs)"
    with pytest.raises(SystemExit, match="no MLflow experiment 'nosuch'"):
        main(["bench", "deploy", "--experiment", "nosuch", "--tracking-uri", uri])
