"""`hfbench bench overhead|data|deploy|nm`: the benchmarks' command line (suite/bench.py, suite/bench_data.py,
suite/bench_deploy.py, suite/bench_nm.py)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional

from suite.bench import log_to_mlflow, overhead_table, run_overhead
from suite.bench_data import data_table, run_data


# ----------------------------------------------------------------------------- CLI
def _parse_sets(items: Optional[list[str]]) -> dict:
    import yaml

    out = {}
    for it in items or []:
        k, sep, v = it.partition("=")
        if not sep:
            raise SystemExit(f"hfbench bench: --set expects KEY=VALUE, got {it!r}")
        out[k.strip()] = yaml.safe_load(v)
    return out


def cmd_overhead(a) -> int:
    methods = [m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else None
    res = run_overhead(
        model=a.model,
        size=a.size,
        batch=a.batch,
        methods=methods,
        steps=a.steps,
        warmup=a.warmup,
        repeats=a.repeats,
        device=a.device,
        dtype=a.dtype,
        channels_last=a.channels_last,
        use_deepspeed=a.deepspeed,
        threads=a.threads,
        sparsity=a.sparsity,
        memory=not a.no_memory,
        sets=_parse_sets(a.set),
    )
    table = overhead_table(res)
    print(table, flush=True)
    if a.json:
        import json

        Path(a.json).write_text(json.dumps(res, indent=1))
        print(f"[bench] results written to {a.json}")
    if not a.no_track:
        from suite import tracking

        metrics: dict[str, float] = {}
        for r in res["rows"]:
            m = r["method"]
            metrics.update(
                {
                    f"step_ms.{m}": r["step_ms"],
                    f"step_ratio.{m}": r["ratio"],
                    f"step_ratio_q1.{m}": r["ratio_q1"],
                    f"step_ratio_q3.{m}": r["ratio_q3"],
                    f"img_s.{m}": r["img_s"],
                }
            )
            if math.isfinite(r.get("floor_ratio", math.nan)):
                metrics.update({f"floor_ratio.{m}": r["floor_ratio"], f"to_floor.{m}": r["to_floor"]})
            if "mem_mb" in r:
                metrics.update({f"mem_mb.{m}": r["mem_mb"], f"mem_ratio.{m}": r["mem_ratio"]})
        uri = a.tracking_uri or tracking.default_uri()
        rid = log_to_mlflow(uri, "overhead", res["params"], metrics, table, res)
        print(f"[bench] logged to MLflow experiment 'bench', run {rid} at {tracking.redact(uri)}")
    return 0


def cmd_data(a) -> int:
    res = run_data(
        root=a.root,
        size=a.size,
        batch=a.batch,
        workers=a.workers,
        passes=a.passes,
        classes=a.classes,
        per_class=a.per_class,
        work_dir=a.work_dir,
    )
    table = data_table(res)
    print(table, flush=True)
    if not a.no_track:
        from suite import tracking

        metrics = {f"img_s.{r['loader']}": r["img_s"] for r in res["rows"]}
        metrics.update(
            {"ratio.ffcv_over_torchvision": res["ratio"], "ratio_q1": res["ratio_q1"], "ratio_q3": res["ratio_q3"]}
        )
        uri = a.tracking_uri or tracking.default_uri()
        payload = {k: v for k, v in res.items() if k != "labels"}
        rid = log_to_mlflow(uri, "data", res["params"], metrics, table, payload)
        print(f"[bench] logged to MLflow experiment 'bench', run {rid} at {tracking.redact(uri)}")
    return 0


def cmd_deploy(a) -> int:
    """Measured inference speed-up of every finished pruned run of an experiment (suite/bench_deploy.py)."""
    import torch

    from reports import flops
    from suite import datasets, models, tracking
    from suite.bench import log_to_mlflow
    from suite.bench_deploy import deploy_run, layer_break_even
    from suite.pruning import registry

    uri = a.tracking_uri or tracking.default_uri()
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(a.experiment)
    if exp is None:
        raise SystemExit(f"hfbench bench deploy: no MLflow experiment {a.experiment!r} at {tracking.redact(uri)}")
    batches = tuple(int(b) for b in a.batches.split(","))
    torch.set_num_threads(a.threads)
    latest: dict[str, object] = {}  # the newest FINISHED run per run hash: its folder holds its weights
    for r in tracking.training_runs(c, exp.experiment_id):
        if r.info.status == "FINISHED" and r.data.tags.get("hfbench.method") != registry.CONTROL:
            h = r.data.tags[tracking.TAG_HASH]
            if h not in latest or r.info.start_time > latest[h].info.start_time:  # type: ignore[attr-defined]
                latest[h] = r
    runs = list(latest.values())
    runs.sort(
        key=lambda r: (
            r.data.tags.get("hfbench.variant", ""),
            float(r.data.params.get("sparsity", 0)),
            r.info.run_name or "",
        )
    )
    if a.max_runs:
        runs = runs[: a.max_runs]
    lines = [
        "| run | method | sparsity % | theoretical x | "
        + " | ".join(f"measured x, batch {b} (IQR)" for b in batches)
        + " | dense MB | CSR MB |",
        "|" + "---|" * (6 + len(batches)),
    ]
    metrics: dict[str, float] = {}
    skipped, shapes_net = [], None
    for i, r in enumerate(runs, 1):
        tags, name = r.data.tags, r.info.run_name or r.info.run_id
        if not tags.get("hfbench.run_dir"):
            skipped.append(f"{name}: no hfbench.run_dir tag")
            continue
        weights = Path(tags["hfbench.run_dir"]) / "final_weights.pt"
        if not weights.is_file():
            skipped.append(f"{name}: no {weights}")
            continue
        try:
            model, dataset = tags["hfbench.model"], tags["hfbench.dataset"]
            spec, ds = models.get(model), datasets.get(dataset)
            net = spec.build(ds.num_classes, ds.input_shape[0])
            net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        except Exception as e:  # one run that cannot be loaded does not stop the others
            skipped.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        net.eval()
        names = [n for n, _ in spec.prunable(net)]
        counts = [
            {"layer": n, "numel": m.weight.numel(), "nonzero": int(torch.count_nonzero(m.weight))}
            for n, m in spec.prunable(net)
        ]
        sp, dense_mb, csr_mb, timings = deploy_run(net, names, ds.input_shape, batches, a.repeats, a.inner, a.warmup)
        theory = flops.run_cost(counts, flops.geometry(model, dataset), 1.0 - sp).speedup
        shapes_net = shapes_net or (net, names, ds.input_shape)
        cells = [f"{t.speedup:.2f} ({t.speedup_q1:.2f}-{t.speedup_q3:.2f})" for t in timings]
        lines.append(
            f"| {name} | {tags.get('hfbench.variant', '')} | {100 * sp:.2f} | "
            + (f"{theory:.2f}" if theory else "-")
            + " | "
            + " | ".join(cells)
            + f" | {dense_mb:.3f} | {csr_mb:.3f} |"
        )
        for t in timings:
            metrics[f"speedup_b{t.batch}.{r.info.run_id}"] = t.speedup
            metrics[f"dense_ms_b{t.batch}.{r.info.run_id}"] = t.dense_ms
            metrics[f"sparse_ms_b{t.batch}.{r.info.run_id}"] = t.sparse_ms
        if theory:
            metrics[f"theoretical.{r.info.run_id}"] = theory
        print(
            f"[deploy] {i}/{len(runs)} {name}: " + ", ".join(f"batch {t.batch} {t.speedup:.2f}x" for t in timings),
            flush=True,
        )
    if not lines[2:]:
        raise SystemExit(f"hfbench bench deploy: no finished pruned run of {a.experiment!r} has its final weights here")
    table = "\n".join(lines)
    if shapes_net is not None and not a.no_break_even:
        net, names, shape = shapes_net
        be = layer_break_even(net, names, shape, max(batches), a.repeats, a.inner)
        ladder = [s for s, _ in be[0][3]] if be else []
        table += "\n\nBreak-even sparsity per layer shape (CSR against dense, batch " + str(max(batches)) + "):\n\n"
        table += "| layer | shape | break-even | " + " | ".join(f"x at {100 * s:g} %" for s in ladder) + " |\n"
        table += "|" + "---|" * (3 + len(ladder)) + "\n"
        for n, text, first, curve in be:
            table += f"| {n} | {text} | " + ("never" if first is None else f"{100 * first:g} %") + " | "
            table += " | ".join(f"{x:.2f}" for _, x in curve) + " |\n"
            metrics[f"break_even.{n}"] = first if first is not None else float("nan")
    if skipped:
        table += "\n\nSkipped: " + "; ".join(skipped)
    print(table, flush=True)
    if not a.no_track:
        params = {
            "experiment": a.experiment,
            "batches": a.batches,
            "threads": a.threads,
            "repeats": a.repeats,
            "device": "cpu",
        }
        rid = log_to_mlflow(uri, "deploy", params, metrics, table, {"experiment": a.experiment})
        print(f"[bench] logged to MLflow experiment 'bench', run {rid} at {tracking.redact(uri)}")
    return 0


def cmd_nm(a) -> int:
    """2:4 inference: dense against semi-structured sparse (CUDA) or CSR (CPU) (suite/bench_nm.py)."""
    import json

    from suite.bench_nm import run_nm_inference

    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    batches = tuple(int(b) for b in a.batches.split(","))
    res = run_nm_inference(
        a.model,
        batches,
        size=a.size,
        dtype=a.dtype,
        device=a.device,
        repeats=a.repeats,
        inner=a.inner,
        warmup=a.warmup,
        backend=a.backend,
        layers=a.layers,
        graphs=a.cuda_graphs,
    )
    p = res["params"]
    theo = res["theoretical_speedup"]
    print(
        f"# 2:4 inference: {p['model']} {p['size']}px {p['dtype']} on {p['device']} {p['gpu']} ({p['backend']}), "
        f"torch {p['torch']}{', CUDA graphs' if p['cuda_graphs'] else ''}\n"
        f"{len(res['converted'])} of {len(res['pruned'])} 2:4 layers run sparse "
        f"({100 * res['sparse_mac_share']:.0f} % of the weight-layer MACs); "
        f"theoretical speed-up {theo:.2f}x (those MACs halved, the rest dense)\n"
    )
    print("| batch | dense ms | 2:4 ms | speed-up (IQR) | dense img/s | 2:4 img/s | max rel. error |")
    print("|---|---|---|---|---|---|---|")
    for t in res["timings"]:
        print(
            f"| {t['batch']} | {t['dense_ms']:.2f} | {t['sparse_ms']:.2f} | {t['speedup']:.3f} "
            f"({t['speedup_q1']:.3f}-{t['speedup_q3']:.3f}) | {t['dense_img_s']:.0f} | {t['sparse_img_s']:.0f} | "
            f"{t['max_rel_err']:.1e} |"
        )
    for name, why in list(res["left_dense"].items())[:5]:
        print(f"left dense: {name}: {why}")
    if len(res["left_dense"]) > 5:
        print(f"left dense: ... {len(res['left_dense']) - 5} more")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
        print(f"[nm] results written to {a.json}")
    return 0


def add_parser(sub) -> None:
    """The `hfbench bench overhead|data|deploy|nm` subcommands."""
    b = sub.add_parser("bench", help="benchmarks: pruning overhead per training step; FFCV vs torchvision loading")
    bs = b.add_subparsers(dest="bench_cmd", required=True)
    o = bs.add_parser("overhead", help="step time and peak memory of each method relative to dense (interleaved)")
    o.add_argument("--model", default="resnet50", help="a registered model (`hfbench list models`)")
    o.add_argument("--size", type=int, default=32, help="input side in pixels (default 32)")
    o.add_argument("--batch", type=int, default=32, help="images per step")
    o.add_argument(
        "--methods",
        help="comma-separated (default: every registered pruning method; `hfbench list methods` lists them); "
        "dense is the reference",
    )
    o.add_argument("--steps", type=int, default=3, help="steps per block (default 3)")
    o.add_argument("--warmup", type=int, default=2, help="untimed steps per model before its first block")
    o.add_argument("--repeats", type=int, default=5, help="rounds of (dense block, method block) per method")
    o.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when present")
    o.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="bf16 / fp16: torch.autocast mixed precision (fp16 with the engine's gradient scaler)",
    )
    o.add_argument("--channels-last", action="store_true", help="NHWC memory format for model and input")
    o.add_argument("--deepspeed", action="store_true", help="step through deepspeed.initialize like the engine")
    o.add_argument("--threads", type=int, help="torch intra-op threads (default on CPU: engine.threads_per_rank, 1)")
    o.add_argument("--sparsity", type=float, default=0.9, help="target sparsity of each method's run config")
    o.add_argument("--set", action="append", metavar="KEY=VALUE", help="run-config override for every model")
    o.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    o.add_argument("--tracking-uri", help="default: HFBENCH_MLFLOW_URI or ./mlflow.db (experiment 'bench')")
    o.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    o.add_argument("--json", help="also write the results to this JSON file")
    o.set_defaults(fn=cmd_overhead)
    d = bs.add_parser("data", help="FFCV vs torchvision ImageFolder loading, images/s (interleaved passes)")
    d.add_argument("--root", help="ImageFolder tree of JPEGs (default: generate one)")
    d.add_argument("--classes", type=int, default=10, help="generated tree: class folders")
    d.add_argument("--per-class", type=int, default=50, help="generated tree: JPEGs per class")
    d.add_argument("--size", type=int, default=224, help="crop side in pixels")
    d.add_argument("--batch", type=int, default=64, help="images per batch")
    d.add_argument("--workers", type=int, default=2, help="FFCV threads = DataLoader worker processes")
    d.add_argument("--passes", type=int, default=5, help="interleaved passes per loader")
    d.add_argument("--work-dir", help="where the tree and .beton go (default: a new temp folder)")
    d.add_argument("--tracking-uri", help="default: HFBENCH_MLFLOW_URI or ./mlflow.db (experiment 'bench')")
    d.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    d.set_defaults(fn=cmd_data)
    y = bs.add_parser(
        "deploy",
        help="measured inference speed-up of each finished pruned run: dense with zeros vs CSR (interleaved)",
    )
    y.add_argument("--experiment", required=True, help="the MLflow experiment whose finished pruned runs are measured")
    y.add_argument("--batches", default="1,256", help="comma-separated batch sizes (default 1,256)")
    y.add_argument("--repeats", type=int, default=7, help="interleaved rounds per batch size (default 7)")
    y.add_argument("--inner", type=int, default=3, help="calls per round and model (default 3)")
    y.add_argument("--warmup", type=int, default=2, help="untimed calls per model first (default 2)")
    y.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    y.add_argument("--max-runs", type=int, help="measure only the first N runs (method, sparsity order)")
    y.add_argument("--no-break-even", action="store_true", help="skip the per-layer-shape break-even sweep")
    y.add_argument("--tracking-uri", help="default: HFBENCH_MLFLOW_URI or ./mlflow.db")
    y.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    y.set_defaults(fn=cmd_deploy)
    n = bs.add_parser(
        "nm",
        help="2:4 inference speed-up of a registry model pruned 2:4: dense vs GPU semi-structured kernels "
        "(CSR on a CPU)",
    )
    n.add_argument("--model", default="resnet50", help="a registered model (random weights, 1000 classes)")
    n.add_argument("--size", type=int, help="input side (default: the model's own)")
    n.add_argument("--batches", default="1,256", help="comma-separated batch sizes (default 1,256)")
    n.add_argument("--dtype", default="fp16", choices=["fp16", "bf16"], help="both models' dtype on CUDA (CPU: fp32)")
    n.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when present")
    n.add_argument("--repeats", type=int, default=7, help="interleaved rounds per batch size (default 7)")
    n.add_argument("--inner", type=int, default=3, help="calls per round and model (default 3)")
    n.add_argument("--warmup", type=int, default=3, help="untimed calls per model first (default 3)")
    n.add_argument("--threads", type=int, help="torch intra-op threads on a CPU")
    n.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "cusparselt", "cutlass"],
        help="CUDA semi-structured kernels (auto: torch's default, CUTLASS if that fails)",
    )
    n.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="time CUDA-graph replays of both models (the GPU's work without the host's per-call cost)",
    )
    n.add_argument("--layers", action="store_true", help="also time each distinct layer product alone (largest batch)")
    n.add_argument("--json", help="also write the results to this JSON file")
    n.set_defaults(fn=cmd_nm)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launchers.bench_cli")
    add_parser(p.add_subparsers(dest="cmd", required=True))
    a = p.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
