"""The CLI guides (issue 19): help on bare `hfbench`, --version, a listing of what configs can
name, `config show`, `report` taking a sweep config, and config errors that name every problem
at the place it was written, with the closest known name."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from launchers.cli import main
from suite import run_logger
from suite.config import RunConfig
from suite.sweeps import load_sweep


def test_bare_hfbench_prints_the_commands_and_exits_0():
    p = subprocess.run([sys.executable, "-m", "launchers.cli"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for cmd in ("sweep", "status", "report", "list", "config", "data", "train"):
        assert f"    {cmd} " in p.stdout
    assert "error" not in p.stderr


def test_version_names_the_package_version_and_commit(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"hfbench {metadata.version('hyperflux-bench')} (git ")


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["data", "--help"])
    out = capsys.readouterr().out
    assert "(default: 5000)" in out and "(default: data)" in out


def test_list_names_every_registered_method_model_and_dataset(capsys):
    from suite import datasets, models
    from suite.pruning import registry

    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    named = {ln.split()[0] for ln in lines if ln.startswith("  ")}
    assert set(registry.names()) | set(registry.variants()) | set(models.names()) | set(datasets.names()) <= named
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    assert "hyperflux" in out and "fmnist_cnn" not in out


def test_config_show_lists_the_sweeps_runs_and_one_run_round_trips(capsys):
    assert main(["config", "show", "configs/demo.yaml"]) == 0
    out = capsys.readouterr().out.splitlines()
    runs = load_sweep("configs/demo.yaml").expand()
    assert {ln.split()[0] for ln in out[1:-1]} == {r.run_hash() for r in runs}
    assert out[-1].startswith(f"{len(runs)} runs;")
    gmp = next(r for r in runs if r.run_name() == "fmnist_cnn-gmp-0.9-s0")
    assert main(["config", "show", "configs/demo.yaml", "--run", gmp.run_name()]) == 0
    again = RunConfig.model_validate(yaml.safe_load(capsys.readouterr().out))
    assert again.run_hash() == gmp.run_hash() and again.init_from == gmp.init_from
    assert main(["config", "show", "configs/demo.yaml", "--run", "fmnist_cnn-gmp-0.9-s9"]) == 2
    assert "did you mean 'fmnist_cnn-gmp-0.9-s0'" in capsys.readouterr().err


def test_config_errors_name_every_problem_where_it_was_written_with_the_closest_name(tmp_path, capsys):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text(
        textwrap.dedent("""
        name: t
        base: {model: fmnist_cnn, epochs: 3, hyperflux: {pruning_edn: 3}}
        grid: {methods: [dense, hyperflx, magnitde], sparsities: [0.5]}
        overrides: {dense: {lrr: 0.1}}
    """)
    )
    assert main(["sweep", str(cfg), "--dry-run"]) == 2
    err = capsys.readouterr().err
    lines = [ln.strip() for ln in err.splitlines()[1:]]
    assert lines[0] == "grid.methods[1]: unknown method 'hyperflx' (did you mean 'hyperflux'?)"
    assert lines[1].startswith("grid.methods[2]: unknown method 'magnitde' (did you mean 'magnitude'?)")
    assert "base.hyperflux.pruning_edn: unknown key (did you mean 'pruning_end'?)" in lines
    assert "overrides.dense.lrr: unknown key (did you mean 'lr'?)" in lines
    assert "Value error" not in err and "{'name'" not in err and "Traceback" not in err
    cfg.write_text("name: t\nbase: {model: fmnist_cnnn}\ngrid: {methods: [dense]}\n")
    assert main(["sweep", str(cfg), "--dry-run"]) == 2
    assert "unknown model 'fmnist_cnnn' (did you mean 'fmnist_cnn'?)" in capsys.readouterr().err


def test_report_takes_a_sweep_config_and_writes_under_reports(tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = tmp_path / "s.yaml"
    cfg.write_text(f"name: tiny\nexperiment: tiny-exp\ntracking_uri: {uri}\ngrid: {{methods: [dense]}}\n")
    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment("tiny-exp")
    r = c.create_run(exp, tags={"hfbench.run_hash": "0" * 12, "hfbench.method": "dense"})
    c.log_batch(
        r.info.run_id,
        metrics=[Metric("final_test_top1", 0.9, int(time.time() * 1000), 1)],
        params=[
            Param("method", "dense"),
            Param("model", "fmnist_cnn"),
            Param("dataset", "fashion_mnist"),
            Param("sparsity", "0.0"),
            Param("seed", "0"),
            Param("epochs", "1"),
        ],
    )
    c.set_terminated(r.info.run_id, "FINISHED")
    monkeypatch.chdir(tmp_path)
    assert main(["report", str(cfg)]) == 0
    assert (tmp_path / "reports" / "tiny-exp" / "report.md").is_file()
    capsys.readouterr()
    assert main(["report"]) == 2
    assert "give a sweep config" in capsys.readouterr().err
    assert main(["report", str(cfg), "--experiment", "x"]) == 2
    assert "not both" in capsys.readouterr().err
    # --scale names the smoke experiment, as `sweep --scale` does
    assert main(["report", str(cfg), "--scale", "0.5"]) == 2
    assert "'tiny-exp-smoke' does not exist" in capsys.readouterr().err


def test_sweep_progress_counts_the_whole_sweep_with_elapsed_time_and_eta(monkeypatch, capsys):
    """A log-file progress line counts every run of the sweep (a later stage goes on from the
    runs an earlier one settled: 9 dense runs then 165 pruning runs read 10/174, not 1/165) and
    gives the elapsed time and an ETA from the mean time per settled run."""
    import launchers.outcomes as S

    now = [1000.0]
    monkeypatch.setattr(S.time, "time", lambda: now[0])
    monkeypatch.setattr(S.sys.stderr, "isatty", lambda: False, raising=False)
    bar = S._Progress(174, "sweep fair", done=9, t0=900.0)
    bar.update(1)
    now[0] = 1000.0
    bar.status("failed 0; running: -")
    line = capsys.readouterr().err.strip()
    # 100 s for 10 runs: 10 s a run, 164 to go
    assert line == "[hfbench] sweep fair: 10/174 done (elapsed 1m 40s, ETA ~27m 20s); failed 0; running: -"
    assert S._dur(3 * 3600 + 125) == "3h 02m" and S._dur(59) == "59s"


def test_mlflow_experiment_opens_on_training_runs_with_a_note_and_runs_carry_the_git_commit(tmp_path):
    """MLflow as its users expect (issue 19): the experiment is marked as model training (MLflow 3
    opens it on the runs, not the GenAI traces view) and carries a note saying what the sweep
    compares; each run has the commit in MLflow's standard tag, the sha `git rev-parse HEAD` gives."""
    from pathlib import Path

    from launchers.outcomes import describe
    from suite import tracking

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    sweep = load_sweep("configs/demo.yaml")
    runs = sweep.expand()
    exp = tracking.ensure_experiment(uri, "described", describe(sweep, runs))
    tags = MlflowClient(tracking_uri=uri).get_experiment(exp).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    note = tags["mlflow.note.content"]
    assert note.startswith("hfbench sweep `demo`: dense, magnitude, gmp, hyperflux on fashion_mnist / fmnist_cnn")
    assert "50 %, 80 %, 90 %, 95 % sparsity" in note and f"{len(runs)} runs" in note
    # an experiment made before keeps its own note and gains the kind
    c = MlflowClient(tracking_uri=uri)
    old = c.create_experiment("older")
    c.set_experiment_tag(old, "mlflow.note.content", "mine")
    tracking.ensure_experiment(uri, "older", "theirs")
    t = c.get_experiment(old).tags
    assert t["mlflow.note.content"] == "mine" and t["mlflow.experimentKind"] == "custom_model_development"
    logger = run_logger.RunLogger(uri, exp, runs[0], spool_dir=tmp_path / "run")
    head = subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    logger.finish("FINISHED")
    run = c.get_run(logger.run_id)
    assert run.data.tags["mlflow.source.git.commit"] == head and len(head) == 40


def test_config_errors_point_at_base_or_overrides_by_where_the_value_was_written(tmp_path, capsys):
    """Hostile review: `--set base.imp.prune_fraction=null` was reported under overrides.dense;
    sweep-level typos had no did-you-mean."""
    assert main(["config", "show", "configs/demo.yaml", "--set", "base.imp.prune_fraction=null"]) == 2
    err = capsys.readouterr().err
    assert "  base.imp: imp.prune_fraction null" in err and "overrides.dense" not in err
    assert main(["config", "show", "configs/demo.yaml", "--set", "overrides.gmp.gmp.end_epoch=900"]) == 2
    assert "  overrides.gmp: gmp.end_epoch must be in" in capsys.readouterr().err
    cfg = tmp_path / "t.yaml"
    cfg.write_text(
        "name: t\nexperimnt: x\ngrid: {methods: [dense], dense_convergnce: true}\nlauncher: {paralelism: 2}\n"
    )
    assert main(["sweep", str(cfg), "--dry-run"]) == 2
    err = capsys.readouterr().err
    for line in (
        "grid.dense_convergnce: unknown key (did you mean 'dense_convergence'?)",
        "launcher.paralelism: unknown key (did you mean 'parallelism'?)",
        "experimnt: unknown key (did you mean 'experiment'?)",
    ):
        assert line in err


def test_read_only_commands_never_create_a_store_where_they_are_typed(tmp_path, monkeypatch, capsys):
    """`status` before a sweep ran lists every run as not submitted; `report` and `fit-law` name
    the missing store in one line (exit 2). None of them leaves an empty mlflow.db behind, which
    MLflow creates on first contact."""
    from pathlib import Path

    demo = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    monkeypatch.chdir(tmp_path)
    for var in ("HFBENCH_MLFLOW_URI", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    assert main(["status", demo]) == 0
    out = capsys.readouterr().out
    n = len(load_sweep(demo).expand())
    assert n > 0 and out.count("not submitted") == n + 1 and f"{n} not submitted" in out  # rows + summary
    for argv in (
        ["report", "--experiment", "nosuch", "--out", "r"],
        ["report", demo],
        ["fit-law", "--experiment", "x"],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert (
            err == f"hfbench: no MLflow store at {tmp_path / 'mlflow.db'}: nothing was tracked there (run the "
            "sweep first, or point --tracking-uri at the store it wrote)\n"
        ), (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_train_on_a_sweep_config_says_what_it_is_in_one_line(capsys):
    from pathlib import Path

    demo = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
    assert main(["train", str(demo)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a sweep config (it has base, grid, launcher, overrides)" in err
    assert f"hfbench sweep {demo}" in err and "unknown key" not in err


def test_an_epochs_override_that_breaks_a_schedule_points_to_scale(capsys):
    """--set base.epochs=40 on the demo leaves GMP's end at epoch 60: refused, naming the field,
    with a pointer to --scale, which shrinks the schedules with the run."""
    from pathlib import Path

    demo = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    assert main(["sweep", demo, "--dry-run", "--set", "base.epochs=40"]) == 2
    err = capsys.readouterr().err
    assert "gmp.end_epoch" in err and "--scale F shrinks every epoch count together" in err
    # no hint for a value that is not a number of epochs, nor when --scale is already given
    assert main(["sweep", demo, "--dry-run", "--set", "base.epochs=abc"]) == 2
    assert "--scale" not in capsys.readouterr().err
    assert main(["sweep", demo, "--dry-run", "--scale", "1", "--set", "base.epochs=40"]) == 2
    err = capsys.readouterr().err
    assert "gmp.end_epoch" in err and "--scale F" not in err and err.count("\n") == 2
    assert main(["sweep", demo, "--dry-run", "--set", "base.lr=0.1"]) == 0  # no hint without an error
    assert main(["sweep", demo, "--dry-run", "--scale", "0.1"]) == 0


def test_a_new_store_is_created_without_mlflows_info_lines(tmp_path):
    code = f"from suite import tracking; tracking.ensure_experiment('sqlite:///{tmp_path / 'm.db'}', 'quiet')"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "m.db").exists()
    assert "INFO" not in p.stderr and "Creating initial MLflow database tables" not in p.stderr, p.stderr


def test_every_option_of_every_command_has_help():
    """`hfbench X --help` explains every argument (defaults are shown by the formatter)."""
    import argparse

    from launchers.cli import build_parser

    bare: list[str] = []

    def walk(parser: argparse.ArgumentParser, path: str) -> int:
        n = 0
        for act in parser._actions:
            if isinstance(act, argparse._SubParsersAction):
                for name, sp in act.choices.items():
                    n += walk(sp, f"{path} {name}")
            elif not isinstance(act, argparse._HelpAction):
                n += 1
                if not act.help:
                    bare.append(f"{path} {'/'.join(act.option_strings) or act.dest}")
        return n

    assert walk(build_parser(), "hfbench") > 60
    assert bare == []
