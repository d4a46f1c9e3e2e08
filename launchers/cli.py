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

from launchers.commands import (  # noqa: F401  (_parse_set: the overrides as the command line reads them)
    _parse_set,
    cmd_config_show,
    cmd_data,
    cmd_fidelity,
    cmd_fit_law,
    cmd_fit_npl,
    cmd_list,
    cmd_models,
    cmd_report,
    cmd_status,
    cmd_sweep,
    cmd_sync,
    cmd_train,
)


def _scale_args(p) -> None:
    p.add_argument(
        "--scale",
        type=float,
        metavar="F",
        help="smoke run: multiply every epoch count by F (0 < F <= 1); runs go to experiment <experiment>-smoke",
    )
    p.add_argument("--steps", type=int, metavar="N", help="smoke run: at most N batches per epoch")


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

    from launchers import bench_cli  # cheap: torch and FFCV are imported when a bench runs

    bench_cli.add_parser(sub)
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
