"""The MLflow run schema (suite/run_schema.py): grouped metric names that read back to the names
the code uses, and stores written before the groups that still read the same."""

from __future__ import annotations

import time

from reports import records
from suite import run_logger, tracking
from suite.pruning import registry
from suite.run_schema import GROUPS, dataset_input, internal_key, mlflow_key

# every metric name the engine logs itself (the pruners' own come from the registry below)
ENGINE_METRICS = (
    "train_loss lr gate_lr img_per_s epoch_time_s grad_scale skipped_steps val_top1 test_top1 density "
    "sparsity pruned regrown pruned_total regrown_total probe_time_s flux_active flux_active_min flux_pruned "
    "npl_min_abs_w npl_min_taylor startup_import_s startup_dist_s startup_mlflow_s startup_data_s "
    "startup_model_s startup_first_step_s startup_total_s final_test_top1 final_val_top1 final_density "
    "final_sparsity train_time_s wall_time_s budget_steps budget_images budget_epochs budget_device_s "
    "budget_total_steps budget_total_images budget_total_epochs budget_total_device_s budget_parent_counted"
).split()


def _method_metrics() -> set[str]:
    out: set[str] = set()
    for name in registry.names():
        out |= set(registry.get(name).epoch_metrics)
    return out


def test_every_metric_is_logged_in_a_group_and_reads_back_to_its_name():
    names = set(ENGINE_METRICS) | _method_metrics() | set(records.BUDGET_METRICS)
    logged = {n: mlflow_key(n) for n in names}
    for n, k in logged.items():
        group, _, rest = k.partition("/")
        assert group in GROUPS and rest, (n, k)
        assert internal_key(k) == n, (n, k)
    assert len(set(logged.values())) == len(logged)  # no two names share a logged name


def test_target_and_achieved_sparsity_have_different_names():
    assert mlflow_key("sparsity") == "prune/achieved_sparsity"
    assert mlflow_key("final_sparsity") == "final/achieved_sparsity"
    assert mlflow_key("target_density") == "method/target_density"  # Hyperflux's trajectory


def test_a_name_without_a_group_reads_as_itself():
    for n in ENGINE_METRICS:  # a store from before the groups
        assert internal_key(n) == n
    assert internal_key("step_ratio.hyperflux") == "step_ratio.hyperflux"  # the bench experiment's


def _run(c, exp, metrics: dict[str, list[float]], params: dict[str, str], tags: dict[str, str], name: str) -> str:
    from mlflow.entities import Metric, Param, RunTag

    run = c.create_run(exp, tags={tracking.TAG_HASH: name, "hfbench.variant": "magnitude", **tags})
    rid = run.info.run_id
    ts = int(time.time() * 1000)
    ms = [Metric(k, v, ts + i, i + 1) for k, vs in metrics.items() for i, v in enumerate(vs)]
    c.log_batch(rid, metrics=ms, params=[Param(k, v) for k, v in params.items()], tags=[RunTag("x", "y")])
    c.set_terminated(rid, "FINISHED")
    return rid


def test_records_read_a_grouped_store_and_an_old_store_alike(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    exp = tracking.ensure_experiment(uri, "schema")
    c = tracking.client(uri)
    short = {
        "train_loss": [1.0, 0.5],
        "density": [0.8, 0.5],
        "sparsity": [0.2, 0.5],
        "target_density": [0.7, 0.5],
        "final_test_top1": [0.9],
        "final_sparsity": [0.5],
        "final_density": [0.5],
        "wall_time_s": [12.0],
    }
    params = {"method": "magnitude", "model": "lenet300", "dataset": "fashion_mnist", "sparsity": "0.5", "seed": "0"}
    env = {"env.torch": "2.14.1", "env.world_size": "1"}
    old = _run(c, exp, short, {**params, **env}, {}, "old")  # env.* as params, short names
    new = _run(c, exp, {mlflow_key(k): v for k, v in short.items()}, params, env, "new")
    tracking.ensure_sweep_run(uri, exp, "schema", "a parent", {})  # not a training run: not a record
    recs = {r.run_hash: r for r in records.load(c, exp)}
    assert set(recs) == {"old", "new"}
    a, b = recs["old"], recs["new"]
    assert a.metrics == b.metrics and a.env == b.env == env
    assert (b.test_top1, b.achieved_sparsity, b.target_sparsity, b.final_density) == (0.9, 0.5, 0.5, 0.5)
    hist = records.Histories(c)
    for rs in ([a], [b], [a, b]):
        hist.prefetch_records(rs, "density")
    for fast in (True, False):  # prefetch by run id alone: grouped name first, then the short one
        by_id = records.Histories(c, fast=fast)
        by_id.prefetch([old, new], "train_loss")
        assert by_id.history(old, "train_loss") == by_id.history(new, "train_loss") == [(1, 1.0), (2, 0.5)]
    for key in ("density", "target_density", "train_loss"):
        want = [(1, short[key][0]), (2, short[key][1])]
        assert records.history(c, old, key) == records.history(c, new, key) == want
        assert hist.history(old, key) == hist.history(new, key) == want


def test_a_sweep_has_one_parent_run_and_its_runs_name_it(tmp_path):
    from suite.config import RunConfig

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    exp = tracking.ensure_experiment(uri, "parent")
    first = tracking.ensure_sweep_run(uri, exp, "mysweep", "first note", {"hfbench.grid.seeds": "0"})
    again = tracking.ensure_sweep_run(uri, exp, "mysweep", "second note", {"hfbench.grid.seeds": "0, 1"})
    assert first == again  # a relaunch reuses it, with its grid updated
    c = tracking.client(uri)
    parent = c.get_run(first)
    assert parent.info.status == "FINISHED" and parent.data.tags["mlflow.note.content"] == "second note"
    assert parent.data.tags["hfbench.grid.seeds"] == "0, 1"
    cfg = RunConfig(method="magnitude", sparsity=0.5, epochs=1, sweep="mysweep", out_dir=str(tmp_path / "runs"))
    log = run_logger.RunLogger(uri, exp, cfg, spool_dir=tmp_path / "spool", say=lambda *a, **k: None)
    log.finish()
    assert c.get_run(log.run_id).data.tags["mlflow.parentRunId"] == first
    alone = cfg.model_copy(update={"sweep": "other"})  # no parent run of that sweep: no parent
    log2 = run_logger.RunLogger(uri, exp, alone, spool_dir=tmp_path / "spool2", say=lambda *a, **k: None)
    log2.finish()
    assert "mlflow.parentRunId" not in c.get_run(log2.run_id).data.tags
    assert [r.info.run_id for r in tracking.training_runs(c, exp)] and first not in {
        r.info.run_id for r in tracking.training_runs(c, exp)
    }


def test_the_dataset_input_names_the_files_and_changes_when_a_file_changes(tmp_path, betons):
    import os

    paths = dict(betons)
    d1 = dataset_input("fashion_mnist", paths)
    assert d1["name"] == "fashion_mnist" and len(d1["digest"]) == 16
    import json

    prof = json.loads(d1["profile"])
    assert set(prof) == set(paths) and all(v["samples"] > 0 and v["bytes"] > 0 for v in prof.values())
    copy = tmp_path / paths["test"].name
    copy.write_bytes(paths["test"].read_bytes())
    st = paths["test"].stat()
    os.utime(copy, (st.st_atime, st.st_mtime))
    assert dataset_input("fashion_mnist", {**paths, "test": copy})["digest"] == d1["digest"]  # same file
    os.utime(copy, (st.st_atime, st.st_mtime + 10))
    assert dataset_input("fashion_mnist", {**paths, "test": copy})["digest"] != d1["digest"]  # rewritten
