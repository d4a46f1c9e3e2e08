"""What each `hfbench` command does (launchers/cli.py parses the command line and calls one of
these with its arguments)."""

from __future__ import annotations

import sys
from pathlib import Path


def _parse_set(items: list[str]) -> dict:
    import yaml

    from suite.config import ConfigError

    out = {}
    for it in items or []:
        if "=" not in it:
            raise ConfigError(f"--set expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except (yaml.YAMLError, ValueError, RecursionError) as e:
            raise ConfigError(
                f"--set {k.strip()}: value is not valid YAML ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''})"
            ) from None
    return out


def cmd_data(a) -> int:
    from suite.config import ConfigError

    if a.split_seed < 0:
        raise ConfigError(f"--split-seed must be >= 0, got {a.split_seed}")
    if a.val_size < 0:
        raise ConfigError(f"--val-size must be >= 0, got {a.val_size}")
    if not 1 <= a.quality <= 100:  # Pillow's JPEG quality scale (above 95 only grows files)
        raise ConfigError(f"--quality must be between 1 and 100, got {a.quality}")
    out = Path(a.out)
    for parent in [out, *out.parents]:  # the nearest existing folder on the way must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"--out {a.out}: {parent} is not a folder")
            break
    import signal

    def _term(signum, frame):  # like Ctrl-C: the writer process is stopped and nothing is left half-written
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    if a.dataset in ("fashion-mnist", "fashion_mnist"):
        if not 0 < a.val_size < 60000:
            raise ConfigError(
                f"--val-size for fashion_mnist must be between 1 and 59999 (of 60,000 training "
                f"images), got {a.val_size}"
            )
        from suite.data import write_fashion_mnist

        paths = write_fashion_mnist(a.out, val_size=a.val_size, split_seed=a.split_seed, overwrite=a.overwrite)
        for k, p in paths.items():
            print(f"{k}: {p}")
        return 0
    if a.dataset in ("imagefolder", "cifar10", "cifar100"):
        from suite import images

        if a.dataset == "imagefolder":
            if not a.train:
                raise SystemExit("hfbench data imagefolder: --train DIR is required")
            paths = images.write_imagefolder(
                a.out,
                a.train,
                a.val,
                name=a.name,
                max_side=a.max_side,
                quality=a.quality,
                write_mode=a.write_mode,
                skip_bad=a.skip_bad,
                workers=a.workers,
                overwrite=a.overwrite,
            )
        else:
            if not a.src:
                raise SystemExit(f"hfbench data {a.dataset}: --src DIR is required")
            try:
                paths = images.write_cifar(
                    a.dataset,
                    a.src,
                    a.out,
                    val_size=a.val_size,
                    split_seed=a.split_seed,
                    workers=a.workers,
                    overwrite=a.overwrite,
                )
            except ValueError as e:  # e.g. --val-size out of range: names the value
                from suite.data import DataError

                if isinstance(e, DataError):  # a bad source file: main() prints it, exit status 2
                    raise
                raise SystemExit(f"hfbench data {a.dataset}: {e}") from None
        meta = images._read_json(paths["meta"])
        for k, p in paths.items():
            e = meta.get("files", {}).get(k, {})
            skipped = f", {len(e['skipped'])} skipped" if e.get("skipped") else ""
            extra = f" ({e['count']} images{skipped})" if "count" in e else ""
            print(f"{k}: {p}{extra}")
            for sk in e.get("skipped", []):
                print(f"  skipped {sk['path']}: {sk['error']}")
        if a.dataset != "imagefolder" and a.val_size == 0:
            print(
                f"runs train on it with dataset: {images.cifar_full_name(a.dataset)} "
                f"(every training image; val and test read the test set)"
            )
        return 0
    raise SystemExit(
        f"hfbench data: unknown dataset {a.dataset!r} (known: fashion_mnist, imagefolder, cifar10, cifar100)"
    )


def cmd_sweep(a) -> int:
    from launchers.sweep import Sweep
    from suite.sweeps import load_sweep

    overrides = _parse_set(a.set)
    if a.parallelism is not None:
        overrides["launcher.parallelism"] = a.parallelism
    if a.executor:
        overrides["launcher.executor"] = a.executor
    if a.tracking_uri:
        overrides["tracking_uri"] = a.tracking_uri
    _scale_overrides(a, overrides)
    sweep = load_sweep(a.config, overrides)
    if a.dry_run:
        runs = sweep.expand()
        if sweep.launcher.executor in ("local", "debug"):  # what this machine cannot run is refused here too
            from launchers.checks import check_resources

            check_resources(sweep, runs, sweep.launcher.executor)
        for r in runs:
            print(f"{r.run_hash()}  {r.run_name()}")
        print(f"{len(runs)} runs")
        return 0
    import signal

    got: list[int] = []

    def _term(signum, frame):  # `kill` of the sweep behaves like Ctrl-C: running jobs are cancelled
        got.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _term)
    try:
        outcomes = Sweep(sweep).run()
    except KeyboardInterrupt as e:
        from launchers.sweep import SweepInterrupted

        what = "SIGTERM" if got else "Ctrl-C"
        print(
            f"hfbench: {e} ({what})"
            if isinstance(e, SweepInterrupted)
            else f"hfbench: sweep {sweep.name} interrupted ({what}) while no job was running; rerun the same "
            f"command to go on",
            file=sys.stderr,
            flush=True,
        )
        return 128 + (signal.SIGTERM if got else signal.SIGINT)
    return 1 if any(o.state == "failed" for o in outcomes) else 0


def _scale_overrides(a, overrides: dict) -> None:
    if getattr(a, "scale", None) is not None:
        overrides["scale.epochs"] = a.scale
    if getattr(a, "steps", None) is not None:
        overrides["scale.steps_per_epoch"] = a.steps


def cmd_status(a) -> int:
    from launchers.status import format_table, sweep_status
    from suite.sweeps import load_sweep

    overrides = _parse_set(a.set)  # the same overrides as the sweep, so the same runs are found
    _scale_overrides(a, overrides)
    sweep = load_sweep(a.config, overrides)
    from suite import tracking

    uri = a.tracking_uri or sweep.tracking_uri or tracking.default_uri()
    with tracking.bounded(uri, sweep.launcher.tracking_timeout_s) as b:
        rows = b.call(sweep_status, sweep, uri, what="status lookup")
    print(format_table(rows))
    return 0


def _experiment(a, command: str):
    """(MLflow client, experiment) named by --experiment at --tracking-uri, or a clean exit."""
    from suite import tracking

    uri = a.tracking_uri or tracking.default_uri()
    tracking.require_store(uri)
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(a.experiment)
    if exp is None:
        raise SystemExit(f"hfbench {command}: no MLflow experiment {a.experiment!r} at {tracking.redact(uri)}")
    return c, exp


def cmd_fit_law(a) -> int:
    """Fit d(gamma) to the finished runs at a fixed pressure: those whose variant declares a
    per-run ("final") pressure parameter in its method's `dynamics` (Hyperflux's fixed schedule)."""
    from suite.pruning import registry
    from suite.pruning.laws import pressure_law_fit
    from suite.run_schema import internal_key

    c, exp = _experiment(a, "fit-law")
    pts, sections = [], set()
    for r in c.search_runs([exp.experiment_id], max_results=5000):
        p, variant = r.data.params, r.data.tags.get("hfbench.variant", "")
        family = registry.family(variant) if r.info.status == "FINISHED" else ""
        keys = (
            [key for _, kind, key in registry.get(family).dynamics.get(variant, []) if kind == "final"]
            if family
            else []
        )
        m = {internal_key(k): v for k, v in r.data.metrics.items()}  # short names (suite/run_schema.py)
        if keys and p.get(keys[0]) not in (None, "None") and "final_density" in m:
            pts.append((float(p[keys[0]]), m["final_density"]))
            sections.add(registry.get(family).section)
    if not pts:
        raise SystemExit(f"hfbench fit-law: no finished fixed-pressure run in {a.experiment!r}")
    pts.sort()
    law = pressure_law_fit([g for g, _ in pts], [d for _, d in pts])
    print(f"{'gamma':>10} {'density':>9}")
    for g, d in pts:
        print(f"{g:>10.4g} {100 * d:>8.3f}%")
    print(
        f"d(gamma) = {law['c']:.6g} * exp(-({law['a0']:.6g} ln g + {law['a1']:.6g} ln^2 g)),"
        f" R^2 = {law['r2']:.4f} on {law['n']} runs"
    )
    for sec in sorted(s for s in sections if s):
        print(
            f"for a sweep: {sec}: {{schedule: law, law: {{c: {law['c']:.6g}, a0: {law['a0']:.6g}, "
            f"a1: {law['a1']:.6g}}}}}"
        )
    return 0


def cmd_train(a) -> int:
    from suite import tracking
    from suite.config import ConfigError, RunConfig, _validate, load_yaml, set_dotted
    from suite.engine import train

    data = load_yaml(a.config)
    sweep_keys = {"base", "grid", "overrides", "launcher"} & set(data) if isinstance(data, dict) else set()
    if len(sweep_keys) >= 2:  # one such key could be a plugin method's section
        raise ConfigError(
            f"{a.config} is a sweep config (it has {', '.join(sorted(sweep_keys))}): run it "
            f"with `hfbench sweep {a.config}`; `hfbench config show {a.config} --run NAME` prints one run's "
            f"config, which `hfbench train` takes"
        )
    for k, v in _parse_set(a.set).items():
        set_dotted(data, k, v)
    cfg = _validate(RunConfig, data, source=a.config)
    uri = cfg.tracking_uri or tracking.default_uri()
    exp = tracking.ensure_experiment(uri, cfg.experiment)
    res = train(cfg, experiment_id=exp, tracking_uri=uri)
    print({k: v for k, v in res.items()})
    return 0


def cmd_fit_npl(a) -> int:
    """Fit the Neural Pruning Law ln d = ln c - alpha ln s per method and saliency."""
    from reports import records
    from reports.dynamics import npl_points, saliencies
    from suite.pruning.laws import npl_fit

    c, exp = _experiment(a, "fit-npl")
    recs = [r for r in records.load(c, exp.experiment_id) if r.status == "FINISHED"]
    pts = npl_points(c, recs)
    if not pts:
        kinds = sorted({f"{v}: {lab}" for v, specs in saliencies().items() for lab, _, _ in specs})
        raise SystemExit(f"hfbench fit-npl: no finished run in {a.experiment!r} has NPL points ({'; '.join(kinds)})")
    print(
        f"{'method':<16} {'saliency':<22} {'alpha':>8} {'R^2':>7} {'points':>7}   "
        f"(fit where {100 * a.lo:g}% < density <= {100 * a.hi:g}%)"
    )
    for (variant, label), xy in sorted(pts.items()):
        try:
            if not xy:
                raise ValueError("no positive value: a power law needs saliency > 0")
            fit = npl_fit([d for d, _ in xy], [s for _, s in xy], lo=a.lo, hi=a.hi)
            print(f"{variant:<16} {label:<22} {fit['alpha']:>8.4f} {fit['r2']:>7.4f} {fit['n']:>7}")
        except ValueError as e:
            print(f"{variant:<16} {label:<22} {'-':>8} {'-':>7} {len(xy):>7}   {e}")
    return 0


def cmd_sync(a) -> int:
    from suite import mlflow_spool

    paths = [Path(x) for x in a.paths]
    for x in paths:
        if not x.exists():
            raise FileNotFoundError(f"{x}: no such run folder")
    done, left = mlflow_spool.sync(paths, uri_for=(lambda meta: a.tracking_uri) if a.tracking_uri else None)
    print(f"[hfbench] sync: {done} runs delivered, {left} still pending")
    return 0 if left == 0 else 1


def cmd_report(a) -> int:
    from reports.build import build_report
    from suite import tracking

    if a.config and a.experiment:
        print("hfbench report: give a sweep config or --experiment, not both", file=sys.stderr)
        return 2
    if not a.config and not a.experiment:
        print(
            "hfbench report: which experiment? give a sweep config (hfbench report configs/demo.yaml) or "
            "--experiment NAME",
            file=sys.stderr,
        )
        return 2
    cfg_uri = None
    if a.config:
        from suite.sweeps import load_sweep

        overrides = _parse_set(a.set)
        _scale_overrides(a, overrides)  # --scale/--steps: the smoke experiment, as the sweep named it
        sweep = load_sweep(a.config, overrides)
        a.experiment, cfg_uri = sweep.experiment_name(), sweep.tracking_uri
        if a.out is None:
            a.out = str(Path("reports") / a.experiment)
    elif a.set or a.scale is not None or a.steps is not None:
        print("hfbench report: --set/--scale/--steps apply to a sweep config; give the config", file=sys.stderr)
        return 2
    if a.out is None:
        print("hfbench report: --out is missing; give a folder", file=sys.stderr)
        return 2
    uri = a.tracking_uri or cfg_uri or tracking.default_uri()
    if not a.out.strip():
        print("hfbench report: --out is empty; give a folder", file=sys.stderr)
        return 2
    blocked = next((p for p in Path(a.out).parents if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        print(f"hfbench report: --out {a.out}: {blocked} is a file, not a folder", file=sys.stderr)
        return 2
    if Path(a.out).exists() and not Path(a.out).is_dir():
        print(f"hfbench report: --out {a.out} is a file; give a folder (it is created if missing)", file=sys.stderr)
        return 2
    tracking.require_store(uri)
    with tracking.bounded(uri, 60) as b:  # a silent server is named within a minute, not after MLflow's retries
        out = b.call(build_report, uri, a.experiment, Path(a.out), a.title, a.mlflow_ui, what="report's reads")
    for name, p in out.items():
        if name in ("index.html", "report.md", "results.csv"):
            print(f"{name}: {p}")
    return 0


def cmd_models(a) -> int:
    from suite import models

    for name in models.names():
        spec = models.get(name)
        line = f"{name:<16} {spec.policy:<12} {spec.input_size:>4}px  {spec.note}"
        if a.count:
            m = spec.build(1000 if spec.input_size == 224 else 10, 1 if spec.input_size == 28 else 3)
            layers = spec.prunable(m)
            line += f"  [{len(layers)} prunable layers, {sum(mod.weight.numel() for _, mod in layers):,} weights]"
        print(line)
    return 0


def cmd_list(a) -> int:
    """Methods (with the module that holds each), models and datasets the configs can name."""
    import json

    from suite import datasets, models
    from suite.pruning import registry

    what = a.what
    if what in ("all", "methods"):
        print("methods (grid.methods; settings under the section named):")
        for m in registry.names():
            cls = registry.get(m)
            print(f"  {m:<12} section {cls.section or '-':<15} {cls.__module__}.{cls.__name__}")
        print("variants (grid.methods too; a method with the option that makes it another recipe):")
        for v, (m, preset) in sorted(registry.variants().items()):
            print(f"  {v:<12} {m} with {json.dumps(preset, separators=(', ', ': '))}")
    if what in ("all", "models"):
        print("models (base.model / grid.models):")
        for n in models.names():
            spec = models.get(n)
            print(f"  {n:<16} {spec.input_size:>4}px  {spec.note}")
    if what in ("all", "datasets"):
        print("datasets (base.dataset):")
        for n in datasets.names():
            spec = datasets.get(n)
            files = ", ".join(spec.files.values())
            print(f"  {n:<18} {spec.num_classes:>5} classes  {files}")
    return 0


def cmd_config_show(a) -> int:
    """The runs a sweep config expands to (as `sweep --dry-run`, with each run's length and
    start), or one run's resolved config as YAML (--run NAME or hash)."""
    import yaml

    from suite.config import ConfigError
    from suite.sweeps import load_sweep

    overrides = _parse_set(a.set)
    _scale_overrides(a, overrides)
    sweep = load_sweep(a.config, overrides)
    runs = sweep.expand()
    if a.run:
        hit = [r for r in runs if a.run in (r.run_name(), r.run_hash())]
        if not hit:
            from suite.config import did_you_mean

            raise ConfigError(
                f"--run {a.run!r}: no run of {a.config} has that name or hash"
                f"{did_you_mean(a.run, [r.run_name() for r in runs])}"
            )
        print(yaml.safe_dump(hit[0].model_dump(mode="json"), sort_keys=False), end="")
        return 0
    print(f"{'hash':<13} {'run':<44} {'epochs':>6} {'steps/ep':>8} {'init':<10}")
    for r in runs:
        print(
            f"{r.run_hash():<13} {r.run_name():<44} {r.epochs:>6} {str(r.max_steps_per_epoch or 'all'):>8} {r.init:<10}"
        )
    print(
        f"{len(runs)} runs; experiment {sweep.experiment_name()!r}; one run in full: "
        f"hfbench config show {a.config} --run NAME"
    )
    return 0


def cmd_fidelity(a) -> int:
    from suite import fidelity

    problems = fidelity.check_all()
    tables = fidelity.load_tables()
    n = sum(1 for t in tables.values() for _ in fidelity._entries(t))
    for pr in problems:
        print(f"hfbench fidelity: {pr}", file=sys.stderr)
    print(
        f"{len(tables)} reference tables, {n} (config, method, value) entries: "
        f"{'all as listed' if not problems else f'{len(problems)} unlisted differences'}"
    )
    if a.write:
        out = fidelity.ROOT / "docs" / "fidelity.md"
        out.write_text(fidelity.render(tables))
        print(f"wrote {out}")
    return 1 if problems else 0
