"""Benchmarks: the per-step cost of each pruning method against dense training, and FFCV
against torchvision data loading.

  hfbench bench overhead [--model resnet50 --size 32 --batch 32 --methods ...]
  hfbench bench data [--root TREE] [--size 224 --batch 64 --workers 2]

Overhead: every method gets a fresh model + pruner built exactly as the engine builds them
(`steps.attach_pruner`, `on_train_start` in eval mode, the epoch-1 learning rates) and runs
full training steps on a fixed random batch: forward, cross-entropy + the pruner's loss term,
backward, optimiser step, `after_step`. Dense and the method alternate in blocks of --steps
steps (dense, method, dense, method, ...) for --repeats rounds, so machine drift hits both
alike; the ratio of a round is (method block median) / (dense block median of the same round),
and the report gives the median ratio over rounds with its interquartile range. Peak memory
is measured per method in a fresh subprocess: on CPU the increase of the peak resident set
size (ru_maxrss) from after the imports to after the steps (model, optimiser state,
activations, the allocator's caching included); on CUDA torch.cuda.max_memory_allocated.

Data: a class-folder JPEG tree (generated unless --root), written to a .beton (JPEG fields)
in a separate process, then alternate passes of an FFCV Loader and a torchvision
ImageFolder + DataLoader with the same augmentation (random resized crop, horizontal flip,
float in [0, 1]), batch size and worker count; images/s per pass, medians and their ratio.

Both log one MLflow run per invocation to experiment "bench" (params, metrics
step_ratio.<method>, mem_ratio.<method>, ..., the table as an artifact). The data benchmark is
in suite/bench_data.py; the `hfbench bench` command in launchers/bench_cli.py.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
# per-method settings that put the method in its costly training regime at step 1: Hyperflux's
# controller starts with gamma = 0 (no loss term in epoch 1), so the bench uses a fixed pressure
STEPS_PER_EPOCH = 1000  # what schedule-driven methods (gmp) believe; the bench stays in epoch 1


def _say(*a) -> None:
    print(*a, flush=True)


# ----------------------------------------------------------------------------- statistics
def quartiles(v: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3), linear interpolation; a single value gives it three times."""
    s = sorted(v)
    if not s:
        return (math.nan, math.nan, math.nan)

    def q(p: float) -> float:
        x = p * (len(s) - 1)
        lo = int(math.floor(x))
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (x - lo)

    return q(0.25), q(0.5), q(0.75)


def interleave(a: str, b: str, rounds: int) -> list[str]:
    """[a, b, a, b, ...]: the order in which blocks run."""
    return [x for _ in range(rounds) for x in (a, b)]


# ----------------------------------------------------------------------------- overhead
def bench_config(method: str, model: str, batch: int, sparsity: float = 0.9, sets: Optional[dict] = None):
    from suite.config import RunConfig, _validate, set_dotted
    from suite.pruning import registry

    data: dict[str, Any] = {
        "method": method,
        "model": model,
        "batch_size": batch,
        "epochs": 100,
        "seed": 0,
        "sparsity": 0.0 if method == registry.CONTROL else sparsity,
    }
    # the method's own settings for a representative step (e.g. a constant pressure instead of a controller)
    for k, v in {**registry.get(method).bench_sets, **(sets or {})}.items():
        set_dotted(data, k, v)
    return _validate(RunConfig, data, source=f"bench {method}")


class Trainee:
    """One model + pruner + optimiser, stepped by the engine's own `steps.train_step`."""

    def __init__(
        self, cfg, size: int, device: str, dtype: str = "fp32", channels_last: bool = False, use_deepspeed: bool = False
    ):
        import torch
        import torch.nn as nn

        from suite import models
        from suite.steps import attach_pruner, loss_scaled_gates

        self.device, self.dtype = device, dtype
        mspec = models.get(cfg.model)
        num_classes = 1000 if mspec.input_size == 224 else 10
        in_chans = 1 if mspec.input_size == 28 else 3
        torch.manual_seed(cfg.seed)
        model = mspec.build(num_classes, in_chans)
        layers = mspec.prunable(model)
        self.n_prunable = sum(mod.weight.numel() for _, mod in layers)
        self.pruner, self.opt = attach_pruner(cfg, model, layers, STEPS_PER_EPOCH, device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model
        if use_deepspeed:
            import deepspeed
            import torch.distributed as dist

            from suite.distributed import ds_config

            world = dist.get_world_size() if dist.is_initialized() else 1
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.opt, config=ds_config(cfg, world))
        else:
            self.engine = _Plain(model, self.opt)
        model.eval()  # the engine's order: deepspeed.initialize, then on_train_start in eval mode
        self.pruner.on_train_start()  # one-shot prunes happen here (random init, sparsity from cfg)
        model.train()
        self.opt.set_lrs(*self.pruner.lrs(1))
        self.pruner.start_epoch(1)
        if channels_last:  # after DeepSpeed's broadcast (it views parameters as bytes: needs stride 1)
            model.to(memory_format=fmt)  # in place: optimiser and engine keep the same Parameter objects
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        # fp16: the engine's dynamic gradient scaler, and the gates that scale their pressure gradient alike
        self.scaler = self.opt.use_grad_scaler(device) if dtype == "fp16" else None
        self.gated = loss_scaled_gates(model, self.scaler)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(cfg.batch_size, in_chans, size, size, generator=g).to(device, memory_format=fmt)
        self.y = torch.randint(0, num_classes, (cfg.batch_size,), generator=g).to(device)
        self.steps = 0

    def step(self) -> None:
        from suite.steps import train_step

        self.steps += 1
        train_step(
            self.engine,
            self.pruner,
            self.criterion,
            self.x,
            self.y,
            self.steps,
            device=self.device,
            precision=self.dtype,
            scaler=self.scaler,
            gated=self.gated,
        )

    def timed(self, n: int) -> list[float]:
        """Seconds of each of n steps."""
        import torch

        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            self.step()
            if self.device == "cuda":
                torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
        return out


class _Plain:
    """The three calls train_step makes of a DeepSpeed engine, on a bare model and optimiser."""

    def __init__(self, model, opt):
        self.model, self.opt = model, opt

    def __call__(self, x):
        return self.model(x)

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> None:
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def _setup(device: str, threads: Optional[int], use_deepspeed: bool) -> str:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not threads:
        from suite.config import EngineConfig

        threads = EngineConfig().threads_per_rank  # what a training run uses (default 1)
    if threads:
        torch.set_num_threads(threads)
    if use_deepspeed:
        from suite.distributed import setup_distributed

        setup_distributed(device)
    torch.use_deterministic_algorithms(False)
    return device


def measure_memory(method: str, args: dict[str, Any], timeout: float = 900.0) -> float:
    """Peak memory (MB) of building `method` and running its warmup + steps, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    code = "import sys; from suite.bench import _mem_child; _mem_child(sys.argv[1])"
    p = subprocess.run(
        [sys.executable, "-c", code, json.dumps({**args, "method": method})],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for line in p.stdout.splitlines():
        if line.startswith("HFBENCH_MEM "):
            return float(line.split()[1])
    raise RuntimeError(f"memory probe for {method} failed (exit {p.returncode}): {p.stderr[-2000:]}")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0: write 5 to
    /proc/self/clear_refs); returns the current RSS in KiB. Without that (other systems), the
    baseline is the peak so far (ru_maxrss), which import-time transients can inflate."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss() -> int:
    try:
        return _status_kib("VmHWM")
    except (OSError, KeyError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _mem_child(args_json: str) -> None:
    import gc

    import torch

    a = json.loads(args_json)
    device = _setup(a["device"], a.get("threads"), a.get("deepspeed", False))
    if a.get("deepspeed"):
        import deepspeed  # noqa: F401 - its import is part of the baseline, not of the method
    cfg = bench_config(a["method"], a["model"], a["batch"], a["sparsity"], a.get("sets"))
    gc.collect()
    base = _reset_peak_rss()  # KiB, after every import: the method's model, state and steps only
    t = Trainee(cfg, a["size"], device, a["dtype"], a["channels_last"], a.get("deepspeed", False))
    t.timed(max(1, a["warmup"]) + max(1, a["steps"]))
    if device == "cuda":
        torch.cuda.synchronize()
        mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        mb = (_peak_rss() - base) / 1024
    print(f"HFBENCH_MEM {mb:.3f}", flush=True)


def memory_bandwidth(device: str = "cpu", mib: int = 256, repeats: int = 7) -> float:
    """Bytes per second one fused elementwise pass moves here: c = a + b over fp32 tensors of
    `mib` MiB each (two reads, one write; far larger than the caches), at the current thread
    count; the median of `repeats` passes after one untimed pass."""
    import torch

    n = mib * 2**20 // 4
    a, b = torch.rand(n, device=device), torch.rand(n, device=device)
    c = torch.empty(n, device=device)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        torch.add(a, b, out=c)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return 3 * 4 * n / statistics.median(times)


def add_floors(rows: list[dict[str, Any]], n_weights: int, bandwidth: float) -> None:
    """Each row's floor (in place): the method's declared bytes per prunable weight per step
    (Pruner.floor_bytes) times the prunable weights, at `bandwidth` bytes/s, added to its dense
    step time: floor_ms, floor_ratio (1 + floor_ms / dense step) and to_floor (measured ratio /
    floor_ratio). Rows of methods that declare nothing get NaN."""
    from suite.pruning import registry

    for r in rows:
        fb = 0 if r["method"] == registry.CONTROL else registry.get(r["method"]).floor_bytes
        if fb is None:
            r["floor_bytes"], r["floor_ms"], r["floor_ratio"], r["to_floor"] = math.nan, math.nan, math.nan, math.nan
            continue
        r["floor_bytes"] = fb
        r["floor_ms"] = 1e3 * fb * n_weights / bandwidth
        r["floor_ratio"] = 1.0 + r["floor_ms"] / r["dense_step_ms"]
        r["to_floor"] = r["ratio"] / r["floor_ratio"]


def run_overhead(
    model: str = "resnet50",
    size: int = 32,
    batch: int = 32,
    methods: Optional[list[str]] = None,
    steps: int = 3,
    warmup: int = 2,
    repeats: int = 5,
    device: str = "auto",
    dtype: str = "fp32",
    channels_last: bool = False,
    use_deepspeed: bool = False,
    threads: Optional[int] = None,
    sparsity: float = 0.9,
    memory: bool = True,
    sets: Optional[dict] = None,
    say: Callable[..., None] = _say,
) -> dict[str, Any]:
    """Interleaved dense/method step timings; returns {"params", "rows", "trace"}."""
    import gc

    import torch

    from suite.pruning import registry

    methods = [m for m in (methods or registry.pruning_names()) if m != registry.CONTROL]
    for m in methods:
        registry.get(m)  # unknown names fail before any work
    device = _setup(device, threads, use_deepspeed)
    params = {
        "model": model,
        "size": size,
        "batch": batch,
        "device": device,
        "dtype": dtype,
        "channels_last": channels_last,
        "deepspeed": use_deepspeed,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "sparsity": sparsity,
        "methods": ",".join(methods),
    }
    say(
        f"[bench] overhead: {model} {size}px batch {batch} on {device} ({dtype}"
        f"{', channels_last' if channels_last else ''}{', deepspeed' if use_deepspeed else ''}), "
        f"{torch.get_num_threads()} threads; {repeats} rounds x {steps} steps per block"
    )
    dense = Trainee(bench_config("dense", model, batch, sets=sets), size, device, dtype, channels_last, use_deepspeed)
    bandwidth = memory_bandwidth(device)
    params["bandwidth_gb_s"] = bandwidth / 1e9
    params["prunable_weights"] = dense.n_prunable
    say(f"[bench] memory bandwidth {bandwidth / 1e9:.1f} GB/s (fused c = a + b); {dense.n_prunable:,} prunable weights")
    dense.timed(warmup)
    dense_steps: list[float] = []
    rows: list[dict[str, Any]] = []
    trace: list[str] = []
    per_method: dict[str, dict[str, Any]] = {}
    for mi, m in enumerate(methods):
        t0 = time.time()
        tr = Trainee(bench_config(m, model, batch, sparsity, sets), size, device, dtype, channels_last, use_deepspeed)
        build_s = time.time() - t0
        tr.timed(warmup)
        d_all, m_all, ratios = [], [], []
        for who in interleave("dense", m, repeats):
            trace.append(who)
            ts = (dense if who == "dense" else tr).timed(steps)
            if who == "dense":
                d_block = statistics.median(ts)
                d_all += ts
            else:
                m_all += ts
                ratios.append(statistics.median(ts) / d_block)
        q1, med, q3 = quartiles(ratios)
        dense_steps += d_all
        per_method[m] = {
            "method": m,
            "step_ms": 1e3 * statistics.median(m_all),
            "dense_step_ms": 1e3 * statistics.median(d_all),
            "ratio": med,
            "ratio_q1": q1,
            "ratio_q3": q3,
            "rounds": len(ratios),
            "build_s": build_s,
        }
        say(
            f"[bench] {mi + 1}/{len(methods)} {m}: {per_method[m]['step_ms']:.1f} ms/step vs dense "
            f"{per_method[m]['dense_step_ms']:.1f} -> x{med:.3f} [{q1:.3f}, {q3:.3f}] (setup {build_s:.1f}s)"
        )
        del tr
        gc.collect()
    dense_ms = 1e3 * statistics.median(dense_steps) if dense_steps else 1e3 * statistics.median(dense.timed(steps))
    rows.append(
        {
            "method": "dense",
            "step_ms": dense_ms,
            "dense_step_ms": dense_ms,
            "ratio": 1.0,
            "ratio_q1": 1.0,
            "ratio_q3": 1.0,
            "rounds": repeats,
        }
    )
    rows += [per_method[m] for m in methods]
    for row in rows:
        row["img_s"] = batch / (row["step_ms"] / 1e3)
    add_floors(rows, dense.n_prunable, bandwidth)
    if memory:
        margs = {
            "model": model,
            "size": size,
            "batch": batch,
            "device": device,
            "dtype": dtype,
            "channels_last": channels_last,
            "deepspeed": use_deepspeed,
            "threads": torch.get_num_threads(),
            "sparsity": sparsity,
            "warmup": warmup,
            "steps": steps,
            "sets": sets,
        }
        for row in rows:
            say(f"[bench] peak memory of {row['method']} (fresh process) ...")
            row["mem_mb"] = measure_memory(row["method"], margs)
        for row in rows:
            row["mem_ratio"] = row["mem_mb"] / rows[0]["mem_mb"] if rows[0]["mem_mb"] > 0 else math.nan
    return {"params": params, "rows": rows, "trace": trace}


def overhead_table(res: dict[str, Any]) -> str:
    p = res["params"]
    mem_kind = "CUDA max allocated" if p["device"] == "cuda" else "peak RSS increase"
    lines = [
        f"# overhead: {p['model']} {p['size']}px batch {p['batch']}, {p['device']} {p['dtype']}"
        f"{' channels_last' if p['channels_last'] else ''}{' deepspeed' if p['deepspeed'] else ''}, "
        f"{p['threads']} threads, {p['repeats']} rounds x {p['steps']} steps",
    ]
    if "bandwidth_gb_s" in p:
        lines.append(
            f"floor: the method's per-weight bytes per step (fused) x {p['prunable_weights']:,} prunable weights "
            f"at the measured {p['bandwidth_gb_s']:.1f} GB/s, over dense's step time"
        )
    lines += [
        f"| method | step ms | img/s | ratio to dense [IQR over rounds] | floor B/weight | floor ratio | "
        f"ratio / floor | peak mem MB ({mem_kind}) | mem ratio |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]

    def num(r: dict[str, Any], k: str, fmt: str) -> str:
        v = r.get(k)
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    for r in res["rows"]:
        lines.append(
            f"| {r['method']} | {r['step_ms']:.1f} | {r['img_s']:.1f} | {r['ratio']:.3f} "
            f"[{r['ratio_q1']:.3f}, {r['ratio_q3']:.3f}] | {num(r, 'floor_bytes', 'g')} | "
            f"{num(r, 'floor_ratio', '.3f')} | {num(r, 'to_floor', '.3f')} | {num(r, 'mem_mb', '.0f')} | "
            f"{num(r, 'mem_ratio', '.3f')} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- MLflow
def log_to_mlflow(
    uri: str, kind: str, params: dict[str, Any], metrics: dict[str, float], table: str, payload: dict[str, Any]
) -> str:
    from suite import tracking

    exp = tracking.ensure_experiment(uri, "bench")
    c = tracking.client(uri)
    run = c.create_run(
        exp,
        run_name=f"{kind}-{params.get('model', 'data')}-{time.strftime('%Y%m%d-%H%M%S')}",
        tags={"hfbench.bench": kind},
    )
    rid = run.info.run_id
    try:
        from mlflow.entities import Metric, Param, RunTag

        env = tracking.environment(1, str(params.get("device", "cpu")))  # tags, as on training runs
        c.log_batch(rid, tags=[RunTag(k, v[:5000]) for k, v in env.items()])
        ps = [Param(k, str(v)[:500]) for k, v in params.items()]
        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and math.isfinite(v)]
        for i in range(0, len(ps), 100):
            c.log_batch(rid, params=ps[i : i + 100])
        for i in range(0, len(ms), 500):
            c.log_batch(rid, metrics=ms[i : i + 500])
        c.log_text(rid, table, f"{kind}.md")
        c.log_text(rid, json.dumps(payload, indent=1, default=str), f"{kind}.json")
    except BaseException:
        c.set_terminated(rid, "FAILED")
        raise
    c.set_terminated(rid, "FINISHED")
    return rid
