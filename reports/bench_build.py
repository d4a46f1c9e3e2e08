"""Time build_report on a large synthetic MLflow experiment.

  python -m reports.bench_build --runs 1000 [--epochs 20] [--keep DIR]

Creates a sqlite MLflow store in a temporary folder (or DIR) holding `--runs` training runs
that follow the schema the engine logs (suite/run_schema.py: tags hfbench.* and env.*, flattened
config params, prunable_weights, steps_per_epoch; per-epoch metrics with step = epoch and
final metrics, under their grouped names;
artifacts config.yaml, layer_density.csv, layer_density_epochs.csv), plus one overhead
benchmark run in experiment "bench", then times build_report on it and prints the time.
`make_store` is also what tests/test_report.py uses for its large-sweep test.

The methods are the registry's (the first N_METHODS pruning methods unless `methods` is given);
what each logs comes from its class: its section's options as flattened params
(<section>.<field>, the defaults), the metrics of its epoch line (`epoch_metrics`) and the
saliencies its `dynamics` declares; a method that is not a 0/1-mask pruner regrows weights and
lands a little short of its target. Accuracies and overheads follow the method's position.
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from suite.run_schema import mlflow_key

EXPERIMENT = "synthetic-sweep"
MODELS = ("fmnist_cnn", "lenet300")
DATASET = "fashion_mnist"
N_METHODS = 4  # the first pruning methods of the registry, by default
SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98)
ENV = {
    "env.git_commit": "0123abcd4567",
    "env.torch": "2.14.1",
    "env.deepspeed": "0.19.8",
    "env.mlflow": "3.17.2",
    "env.python": "3.11.2",
    "env.hardware": "16 x Synthetic CPU",
    "env.world_size": "1",
    "env.device": "cpu",
}
STEPS_PER_EPOCH = 25
BATCH = 128


def layer_shapes(model: str) -> list[tuple[str, tuple[int, ...]]]:
    """(name, weight shape) of the registry model's prunable layers."""
    from suite import datasets, models

    spec = models.get(model)
    ds = datasets.get(DATASET)
    net = spec.build(ds.num_classes, ds.input_shape[0])
    return [(n, tuple(m.weight.shape)) for n, m in spec.prunable(net)]


def _layer_counts(shapes, density: float) -> list[tuple[str, tuple[int, ...], int, int]]:
    """Per-layer (name, shape, numel, nonzero) with the global density `density`: larger
    layers are pruned harder, as global magnitude pruning does."""
    numels = [math.prod(s) for _, s in shapes]
    total = sum(numels)
    raw = [(total / n) ** 0.3 for n in numels]
    scale = density * total / sum(r * n for r, n in zip(raw, numels))
    out = []
    for (name, shape), n, r in zip(shapes, numels, raw):
        d = min(1.0, r * scale)
        out.append((name, shape, n, max(1, int(round(n * d)))))
    return out


def default_methods(n: int = N_METHODS) -> tuple[str, ...]:
    """The first `n` pruning methods of the registry (its order)."""
    from suite.pruning import registry

    return tuple(registry.pruning_names()[:n])


def _accuracy(method: str, drop: float, s: float, seed: int, model: str) -> float:
    base = 0.905 if model == "fmnist_cnn" else 0.885
    rng = random.Random(hash((method, s, seed, model)) & 0xFFFF)
    return base - drop * s**4 + rng.gauss(0, 0.002)


@dataclass(frozen=True)
class _Synthetic:
    """What a method's synthetic runs log, from its class and its position `i` in the sweep."""

    name: str
    i: int
    regrows: bool  # not a 0/1-mask pruner: its pruned weights may come back
    options: dict[str, str]  # <section>.<field> -> the default, as the engine logs its params
    epoch_keys: tuple[str, ...]  # its epoch line's metrics
    saliency_keys: tuple[str, ...]  # per-epoch saliencies its dynamics declare for its own label
    final_keys: tuple[str, ...]  # params its dynamics read once per run

    @property
    def drop(self) -> float:  # top-1 lost at full sparsity (times s^4)
        return 0.03 + 0.01 * self.i

    @property
    def overhead(self) -> tuple[float, float]:  # step-time and peak-memory ratios vs dense
        if self.regrows:  # gates or scores trained beside the weights
            return 1.31 + 0.02 * (self.i % 2), 1.48 + 0.02 * (self.i % 2)
        return 1.01 + 0.01 * self.i, 1.0 + 0.01 * (self.i % 3)

    def metrics(self, ep: int, run_epochs: int, target: float, d: float) -> dict[str, float]:
        frac = ep / run_epochs
        m = {
            k: (1 - target * min(1.0, frac * 1.2) if k == "target_density" else 0.1 * (self.i + 1) * ep)
            for k in self.epoch_keys
        }
        for j, k in enumerate(self.saliency_keys):
            m[k] = 10.0 ** -(2 + (self.i + j) % 2) * d ** -(0.8 + 0.35 * ((self.i + j) % 3))
        return m


def _synthetic(name: str, i: int) -> _Synthetic:
    from suite.pruning import registry
    from suite.pruning.base import MaskPruner

    cls = registry.get(name)
    opts: dict[str, str] = {}

    def walk(prefix: str, obj) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        else:
            opts[prefix] = str(obj)

    if cls.section is not None and cls.options is not None:
        walk(cls.section, cls.options().model_dump(mode="json"))
    specs = cls.dynamics.get(name, [])
    return _Synthetic(
        name,
        i,
        not issubclass(cls, MaskPruner),
        opts,
        tuple(cls.epoch_metrics),
        tuple(dict.fromkeys(k for _, kind, k in specs if kind == "epoch")),
        tuple(k for _, kind, k in specs if kind == "final"),
    )


def make_store(
    uri: str,
    n_runs: int,
    artifact_dir: Path,
    epochs: int = 20,
    failed_every: int = 97,
    bench: bool = True,
    experiment: str = EXPERIMENT,
    methods: tuple[str, ...] | None = None,
) -> list[dict]:
    """Log `n_runs` synthetic runs into experiment `experiment` (the dense control and `methods`,
    registry names; default: `default_methods()`); returns what was logged per run."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    c = MlflowClient(tracking_uri=uri)
    exp_id = c.create_experiment(experiment, artifact_location=Path(artifact_dir).resolve().as_uri())
    shapes = {m: layer_shapes(m) for m in MODELS}
    from suite.pruning import registry

    dense = registry.CONTROL
    names = tuple(default_methods() if methods is None else methods)
    syn = {m: _synthetic(m, i) for i, m in enumerate(names)}
    plan = []
    seed = 0
    while len(plan) < n_runs:
        for model in MODELS:
            plan.append((dense, model, 0.0, seed))
            plan += [(m, model, s, seed) for m in names for s in SPARSITIES]
        seed += 1
    plan = plan[:n_runs]
    logged = []
    ts0 = int(time.time() * 1000)
    for i, (method, model, target, seed) in enumerate(plan):
        status = "FAILED" if failed_every and i % failed_every == failed_every - 1 else "FINISHED"
        sy = syn.get(method)  # None: the dense control
        run_epochs = 5 if sy is None else epochs
        params = {
            "method": method,
            "model": model,
            "dataset": DATASET,
            "sparsity": str(target),
            "seed": str(seed),
            "epochs": str(run_epochs),
            "batch_size": str(BATCH),
            "max_steps_per_epoch": "None" if sy is None else str(STEPS_PER_EPOCH),
            "steps_per_epoch": str(430 if sy is None else STEPS_PER_EPOCH),
            "init": "scratch" if sy is None else "dense",
            "lr": "0.01",
            "config_hash": f"{i:012x}",
        }
        if sy is not None:
            params.update(sy.options)
            params.update({k: f"{2.0 ** -(seed % 5):g}" for k in sy.final_keys})
        run_hash = f"{i:012x}"
        tags = {
            "hfbench.run_hash": run_hash,
            "hfbench.method": method,
            "hfbench.variant": method,
            "hfbench.model": model,
            "hfbench.dataset": DATASET,
            "hfbench.sweep": "synthetic",
            "mlflow.runName": f"{model}-{method}-{target:g}-s{seed}",
            **ENV,
        }
        run = c.create_run(exp_id, tags=tags, run_name=tags["mlflow.runName"], start_time=ts0 + i)
        rid = run.info.run_id
        acc = _accuracy(method, 0.0 if sy is None else sy.drop, target, seed, model)
        achieved = target - 0.002 * (seed % 3) if sy is not None and sy.regrows else target
        counts = (
            _layer_counts(shapes[model], 1.0 - achieved)
            if sy is not None
            else [(n, s, math.prod(s), math.prod(s)) for n, s in shapes[model]]
        )
        nz, tot = sum(x[3] for x in counts), sum(x[2] for x in counts)
        density = nz / tot
        params["prunable_weights"] = str(tot)
        done = run_epochs if status == "FINISHED" else max(1, run_epochs // 2)
        metrics = []
        regrow = 10.0 if sy is not None and sy.regrows else 0.0
        for ep in range(1, done + 1):
            frac = ep / run_epochs
            d = 1.0 - (1.0 - density) * min(1.0, frac * 1.25)
            m = {
                "train_loss": 1.0 / ep,
                "val_top1": acc * (0.9 + 0.1 * frac) + 0.002,
                "test_top1": acc * (0.9 + 0.1 * frac),
                "density": d,
                "sparsity": 1 - d,
                "pruned": 100.0 * (run_epochs - ep),
                "regrown": regrow * (ep % 3),
                "lr": 0.01,
                "epoch_time_s": 1.5,
                "pruned_total": 100.0 * ep,
                "regrown_total": regrow * ep,
            }
            if sy is not None:
                m.update(sy.metrics(ep, run_epochs, target, d))
            metrics += [Metric(mlflow_key(k), float(v), ts0 + 1000 * ep, ep) for k, v in m.items()]
        wall = 60.0 + 3.0 * run_epochs
        if status == "FINISHED":
            fin = {
                "final_test_top1": acc,
                "final_val_top1": acc + 0.002,
                "final_density": density,
                "final_sparsity": 1 - density,
                "train_time_s": wall - 10,
                "wall_time_s": wall,
            }
            metrics += [Metric(mlflow_key(k), v, ts0 + 1000 * run_epochs + 1, run_epochs) for k, v in fin.items()]
        plist = [Param(k, v) for k, v in params.items()]
        for j in range(0, max(len(metrics), len(plist)), 1000):
            c.log_batch(
                rid,
                metrics=metrics[j : j + 1000],
                params=plist[:100] if j == 0 else [],
                tags=[RunTag("hfbench.error", "RuntimeError: synthetic failure")]
                if status == "FAILED" and j == 0
                else [],
            )
        for j in range(100, len(plist), 100):  # MLflow takes at most 100 params a batch
            c.log_batch(rid, params=plist[j : j + 100])
        c.log_text(rid, "".join(f"{k}: {v}\n" for k, v in params.items()), "config.yaml")
        if status == "FINISHED":
            c.log_text(
                rid,
                "layer,shape,numel,nonzero,density\n"
                + "".join(f"{n},{'x'.join(map(str, s))},{k},{z},{z / k:.6f}\n" for n, s, k, z in counts),
                "layer_density.csv",
            )
            c.log_text(
                rid,
                "epoch,layer,density\n"
                + "".join(f"{e},{n},{z / k:.6f}\n" for e in range(1, run_epochs + 1) for n, _, k, z in counts),
                "layer_density_epochs.csv",
            )
        c.set_terminated(rid, status=status)
        logged.append(
            {
                "run_id": rid,
                "method": method,
                "model": model,
                "target": target,
                "seed": seed,
                "status": status,
                "test": acc,
                "density": density,
                "counts": counts,
                "epochs": run_epochs,
                "wall": wall if status == "FINISHED" else None,
            }
        )
    if bench:
        bexp = c.create_experiment("bench", artifact_location=(Path(artifact_dir) / "bench").resolve().as_uri())
        run = c.create_run(bexp, tags={"hfbench.bench": "overhead"}, run_name="overhead-synthetic")
        ms = []
        for k, (sr, mr) in {dense: (1.0, 1.0), **{m: sy.overhead for m, sy in syn.items()}}.items():
            ms += [
                Metric(f"step_ratio.{k}", sr, ts0, 0),
                Metric(f"step_ratio_q1.{k}", sr - 0.01, ts0, 0),
                Metric(f"step_ratio_q3.{k}", sr + 0.01, ts0, 0),
                Metric(f"mem_ratio.{k}", mr, ts0, 0),
                # a floor halfway between dense and the method: the larger overheads end above it
                Metric(f"floor_ratio.{k}", 1.0 + (sr - 1.0) / 2, ts0, 0),
            ]
        c.log_batch(
            run.info.run_id,
            metrics=ms,
            params=[Param("model", "fmnist_cnn"), Param("device", "cpu"), Param("batch", "128")],
        )
        c.set_terminated(run.info.run_id, "FINISHED")
    return logged


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=20, help="epochs of each pruning run (per-epoch metrics)")
    p.add_argument("--keep", help="build the store and report here instead of a temporary folder")
    p.add_argument("--profile", action="store_true", help="print the top of a cProfile of build_report")
    p.add_argument("--reuse", action="store_true", help="with --keep: time the build on the store already there")
    a = p.parse_args(argv)
    from reports.build import build_report

    # tmpfs when there is one: sqlite commits are then not disk syncs
    shm = Path("/dev/shm")
    root = (
        Path(a.keep)
        if a.keep
        else Path(tempfile.mkdtemp(prefix="hfbench-bench-build-", dir=shm if shm.is_dir() else None))
    )
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    if not (a.reuse and (root / "mlflow.db").is_file()):
        t0 = time.perf_counter()
        make_store(uri, a.runs, root / "artifacts", epochs=a.epochs)
        print(f"[bench_build] {a.runs} synthetic runs logged in {time.perf_counter() - t0:.1f} s ({root})", flush=True)
    else:
        import mlflow  # noqa: F401  (import time is not build time; the fresh store path imports it too)
        import torch  # noqa: F401  (likewise)

    if a.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
    t1 = time.perf_counter()
    files = build_report(uri, EXPERIMENT, root / "report")
    t2 = time.perf_counter()
    if a.profile:
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    print(
        f"[bench_build] build_report on {a.runs} runs: {t2 - t1:.2f} s "
        f"({len(files)} files, index.html {files['index.html'].stat().st_size / 1e6:.1f} MB)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
