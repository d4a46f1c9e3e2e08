"""The `hfbench` command line.

hfbench data fashion_mnist --out data/       FFCV files from the Debian Fashion-MNIST package
hfbench data imagefolder --name imagenet --train T --val V --out data/   ImageNet-style class folders
hfbench data cifar10|cifar100 --src DIR --out data/   CIFAR python releases
hfbench sweep configs/demo.yaml              run a sweep (SLURM array if reachable, else local)
hfbench status configs/demo.yaml             state, epoch, metrics, requeues, errors of each run
hfbench train run.yaml                       one run in this process (debugging)
hfbench report --experiment demo --out reports/demo
hfbench fit-law --experiment fmnist-pressure   gamma-density law of fixed-pressure runs
hfbench fit-npl --experiment fmnist-npl        Neural Pruning Law per method and saliency
hfbench models                               the model registry and its prunable layers
hfbench bench overhead|data                  step cost per method vs dense; FFCV vs torchvision
"""

from __future__ import annotations

import argparse
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


def _scale_args(p) -> None:
    p.add_argument(
        "--scale",
        type=float,
        metavar="F",
        help="smoke run: multiply every epoch count by F (0 < F <= 1); runs go to experiment <experiment>-smoke",
    )
    p.add_argument("--steps", type=int, metavar="N", help="smoke run: at most N batches per epoch")


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


class _DefaultsHelp(argparse.HelpFormatter):
    """Help that shows each option's default, unless the help already says it or there is none."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h.lower() or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return h
        return h + " (default: %(default)s)"


def _version() -> str:
    from importlib import metadata

    try:
        dist = metadata.packages_distributions().get("launchers", [""])[0]  # the project's installed name
        v = metadata.version(dist) if dist else "unknown"
    except metadata.PackageNotFoundError:
        v = "unknown"
    from suite.tracking import git_commit

    return f"hfbench {v} (git {git_commit() or 'unknown'})"


def build_parser() -> argparse.ArgumentParser:
    """The `hfbench` command line: every command, every option with its help and default."""
    p = argparse.ArgumentParser(
        prog="hfbench",
        description="Pruning benchmark suite: Hyperflux against baselines.",
        epilog="start here: hfbench sweep configs/demo.yaml, then hfbench report configs/demo.yaml",
        formatter_class=_DefaultsHelp,
    )
    p.add_argument("--version", action="version", version=_version(), help="print the version and git commit")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    _sub_add = sub.add_parser

    def add_parser(name, **kw):  # every command shows its defaults in --help
        kw.setdefault("formatter_class", _DefaultsHelp)
        return _sub_add(name, **kw)

    sub.add_parser = add_parser

    d = sub.add_parser("data", help="write FFCV .beton files")
    d.add_argument("dataset", help="fashion_mnist | imagefolder | cifar10 | cifar100 (fashion-mnist works too)")
    d.add_argument("--out", default="data", help="output folder")
    d.add_argument(
        "--val-size",
        type=int,
        default=5000,
        help="images held out of train for validation; cifar10/cifar100: 0 = none, train on all "
        "50,000 (the reference setting): files <name>_full_*, dataset <name>_full",
    )
    d.add_argument(
        "--split-seed", type=int, default=0, help="seed of the train/val split (the same seed, the same split)"
    )
    d.add_argument("--overwrite", action="store_true", help="rewrite files that exist and check as valid")
    d.add_argument("--train", help="imagefolder: train class folders (ROOT/<class>/<image>)")
    d.add_argument("--val", help="imagefolder: val class folders (same class names)")
    d.add_argument("--name", default="imagefolder", help="imagefolder: file prefix (imagenet for dataset: imagenet)")
    d.add_argument(
        "--max-side", type=int, default=512, help="imagefolder: resize longer side to at most this (0: keep)"
    )
    d.add_argument("--quality", type=int, default=90, help="imagefolder: JPEG quality")
    d.add_argument(
        "--write-mode",
        default="jpg",
        choices=["jpg", "proportion", "raw"],
        help="imagefolder: FFCV's image storage (jpg: compressed; raw: decoded pixels, larger and faster to read)",
    )
    d.add_argument(
        "--skip-bad",
        action="store_true",
        help="imagefolder: write without unreadable images (listed in the output and meta JSON)",
    )
    d.add_argument("--src", help="cifar10/cifar100: the python release folder (or its parent)")
    d.add_argument("--workers", type=int, help="writer processes")
    d.set_defaults(fn=cmd_data)

    s = sub.add_parser("sweep", help="run a sweep config")
    s.add_argument("config", help="a sweep config (YAML), e.g. configs/demo.yaml")
    s.add_argument(
        "--executor",
        choices=["auto", "slurm", "local", "debug"],
        help="where the runs go (default: the config's launcher.executor; auto: SLURM if a controller "
        "answers, else local processes; debug: in this process)",
    )
    s.add_argument("--parallelism", type=int, help="runs at once (SLURM array limit)")
    s.add_argument("--tracking-uri", help="MLflow tracking URI (default: HFBENCH_MLFLOW_URI or ./mlflow.db)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a sweep field, e.g. grid.seeds=[0,1]")
    _scale_args(s)
    s.add_argument("--dry-run", action="store_true", help="validate and list the runs, submit nothing")
    s.add_argument(
        "--resume",
        action="store_true",
        help="submit only runs that are missing or failed (this is always what a sweep does: "
        "runs whose hash already FINISHED in the experiment are skipped)",
    )
    s.set_defaults(fn=cmd_sweep)

    st = sub.add_parser("status", help="state of every run of a sweep (MLflow + SLURM accounting)")
    st.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="the same overrides the sweep was started with (e.g. name=..., out_dir=...)",
    )
    st.add_argument("config", help="the sweep config the runs were started from")
    st.add_argument(
        "--tracking-uri",
        help="default: the config's tracking_uri, HFBENCH_MLFLOW_URI, MLFLOW_TRACKING_URI or ./mlflow.db",
    )
    _scale_args(st)
    st.set_defaults(fn=cmd_status)

    fl = sub.add_parser("fit-law", help="fit the gamma-density law to fixed-pressure Hyperflux runs")
    fl.add_argument("--experiment", required=True, help="the MLflow experiment of the fixed-pressure sweep")
    fl.add_argument("--tracking-uri", help="default: HFBENCH_MLFLOW_URI, MLFLOW_TRACKING_URI or ./mlflow.db")
    fl.set_defaults(fn=cmd_fit_law)

    fn = sub.add_parser("fit-npl", help="fit the Neural Pruning Law (density vs minimum surviving saliency)")
    fn.add_argument("--experiment", required=True, help="the MLflow experiment whose finished runs are fitted")
    fn.add_argument("--tracking-uri", help="default: HFBENCH_MLFLOW_URI, MLFLOW_TRACKING_URI or ./mlflow.db")
    fn.add_argument("--lo", type=float, default=0.005, help="fit only densities above this")
    fn.add_argument("--hi", type=float, default=0.5, help="and at most this")
    fn.set_defaults(fn=cmd_fit_npl)

    t = sub.add_parser("train", help="train one run config in this process")
    t.add_argument("config", help="one run's config (YAML), e.g. from `hfbench config show SWEEP --run NAME`")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a run field, e.g. lr=0.1")
    t.set_defaults(fn=cmd_train)

    sy = sub.add_parser("sync", help="deliver MLflow logging that runs kept on disk while the server was down")
    sy.add_argument("paths", nargs="+", help="run folders, or folders holding them (e.g. runs/demo)")
    sy.add_argument("--tracking-uri", help="deliver to this server instead of the one each run used")
    sy.set_defaults(fn=cmd_sync)

    r = sub.add_parser("report", help="build reports from an MLflow experiment")
    r.add_argument("config", nargs="?", help="a sweep config: report its experiment (instead of --experiment)")
    r.add_argument("--experiment", help="the MLflow experiment to report on")
    r.add_argument("--out", help="output folder (default with a config: reports/<experiment>)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="the overrides the sweep was started with")
    r.add_argument(
        "--tracking-uri",
        help="default: the config's tracking_uri, HFBENCH_MLFLOW_URI, MLFLOW_TRACKING_URI or ./mlflow.db",
    )
    r.add_argument("--title", help="report title (default: the experiment name)")
    r.add_argument(
        "--mlflow-ui",
        metavar="URL",
        help="the MLflow UI the table rows link to (default: the tracking server, or http://127.0.0.1:5000 "
        "where `mlflow ui` serves a local store); '' for no links",
    )
    _scale_args(r)
    r.set_defaults(fn=cmd_report)

    ls = sub.add_parser("list", help="the methods, models and datasets a config can name")
    ls.add_argument(
        "what", nargs="?", default="all", choices=["all", "methods", "models", "datasets"], help="what to list"
    )
    ls.set_defaults(fn=cmd_list)

    cf = sub.add_parser("config", help="inspect a sweep config")
    cfs = cf.add_subparsers(dest="config_cmd", metavar="show", required=True)
    show = cfs.add_parser(
        "show", help="the runs a sweep config expands to, or one run's resolved config", formatter_class=_DefaultsHelp
    )
    show.add_argument("config", help="a sweep config (YAML)")
    show.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a sweep field, as sweep does")
    show.add_argument("--run", help="print this run's resolved config (run name or hash) as YAML")
    _scale_args(show)
    show.set_defaults(fn=cmd_config_show)

    fi = sub.add_parser("fidelity", help="check the paper recipes against the reference tables (docs/reference)")
    fi.add_argument("--write", action="store_true", help="also write docs/fidelity.md from the tables")
    fi.set_defaults(fn=cmd_fidelity)

    m = sub.add_parser("models", help="list the model registry")
    m.add_argument("--count", action="store_true", help="build each model and count prunable weights")
    m.set_defaults(fn=cmd_models)

    from suite import bench  # cheap: torch and FFCV are imported when a bench runs

    bench.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    if a.cmd is None:  # bare `hfbench`: the commands, not an argparse error
        p.print_help()
        return 0
    from suite.config import ConfigError

    try:
        return a.fn(a)
    except BrokenPipeError:  # the reader went away (`hfbench list | head`): nothing more to say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(
            f"hfbench {a.cmd}: interrupted; nothing half-written is kept, run the same command again", file=sys.stderr
        )
        return 130
    except ConfigError as e:
        msg = str(e)
        epochs_set = [
            k
            for k in (getattr(a, "set", None) or [])
            if "=" in k
            and k.split("=", 1)[0].strip().endswith("epochs")
            and not k.strip().startswith("scale.")
            and k.split("=", 1)[1].strip().isdigit()
        ]
        if epochs_set and "epoch" in msg.split(":", 1)[-1] and getattr(a, "scale", 0) is None:
            # a shorter run by hand breaks the schedules tied to its length; --scale shrinks them together
            msg += (
                f"\n  (--set {epochs_set[0]} leaves the schedules that depend on the run's length as they "
                f"are; --scale F shrinks every epoch count together, e.g. --scale 0.1)"
            )
        print(f"hfbench: {msg}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"hfbench: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from reports.build import ReportError
        from suite.data import DataError
        from suite.tracking import TrackingUnavailable

        if isinstance(e, TrackingUnavailable):  # an environment problem, said in one line
            print(f"hfbench: {e}", file=sys.stderr)
            return 1
        from suite.tracking import TrackingRefused

        if isinstance(e, TrackingRefused):  # missing or wrong credentials: the user's to fix
            print(f"hfbench: {e}", file=sys.stderr)
            return 2

        if isinstance(e, (DataError, ReportError)):  # a bad data file or experiment, named in the message
            print(f"hfbench: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
