"""`hfbench bench overhead|data`: the benchmarks' command line (suite/bench.py, suite/bench_data.py)."""

from __future__ import annotations

import argparse
import sys
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


def add_parser(sub) -> None:
    """The `hfbench bench overhead|data` subcommands."""
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
    o.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: torch.autocast mixed precision")
    o.add_argument("--channels-last", action="store_true", help="NHWC memory format for model and input")
    o.add_argument("--deepspeed", action="store_true", help="step through deepspeed.initialize like the engine")
    o.add_argument("--threads", type=int, help="torch intra-op threads (default on CPU: engine.threads_per_rank, 1)")
    o.add_argument("--sparsity", type=float, default=0.9, help="target sparsity of each method's run config")
    o.add_argument("--set", action="append", metavar="KEY=VALUE", help="run-config override for every model")
    o.add_argument("--no-memory", action="store_true", help="skip the per-method memory subprocesses")
    o.add_argument("--tracking-uri", help="default: HFBENCH_MLFLOW_URI or ./mlflow.db (experiment 'bench')")
    o.add_argument("--no-track", action="store_true", help="do not log to MLflow")
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


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launchers.bench_cli")
    add_parser(p.add_subparsers(dest="cmd", required=True))
    a = p.parse_args(argv)
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
