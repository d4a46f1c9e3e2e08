"""Config validation: every bad field is refused before anything runs, naming the field."""

import json
import textwrap
from pathlib import Path

import pytest

from suite.config import ConfigError, RunConfig, load_run
from suite.sweeps import load_sweep

GOOD = """
name: t
base: {model: fmnist_cnn, epochs: 3, init: dense}
grid: {methods: [dense, hyperflux], sparsities: [0.5], seeds: [0]}
overrides: {hyperflux: {hyperflux: {pruning_end: 2}}}
"""

# (description, yaml text, what the message must name)
BAD = [
    ("unknown top-level key", GOOD + "colour: blue\n", "colour"),
    ("unknown key in base", GOOD.replace("epochs: 3", "epochs: 3, epocs: 4"), "epocs"),
    ("sparsity 1.0", GOOD.replace("sparsities: [0.5]", "sparsities: [1.0]"), "sparsities"),
    ("negative sparsity", GOOD.replace("sparsities: [0.5]", "sparsities: [-0.1]"), "sparsities"),
    ("unknown method", GOOD.replace("[dense, hyperflux]", "[dense, hyperfluxx]"), "hyperfluxx"),
    ("unknown model", GOOD.replace("fmnist_cnn", "resnet9000"), "resnet9000"),
    ("epochs not an int", GOOD.replace("epochs: 3", "epochs: three"), "epochs"),
    ("negative seed", GOOD.replace("seeds: [0]", "seeds: [-1]"), "seeds"),
    ("zero learning rate", GOOD.replace("epochs: 3", "epochs: 3, lr: 0"), "lr"),
    ("unknown key in method section", GOOD.replace("pruning_end: 2", "pruning_end: 2, pruning_ned: 3"), "pruning_ned"),
    ("pruning_end after the last epoch", GOOD.replace("pruning_end: 2", "pruning_end: 9"), "pruning_end"),
    ("unknown executor", GOOD + "launcher: {executor: kubernetes}\n", "launcher.executor"),
    ("parallelism zero", GOOD + "launcher: {parallelism: 0}\n", "launcher.parallelism"),
    ("sweep name with a shell character", GOOD.replace("name: t", "name: 't; rm -rf ~'"), "name"),
    ("method set in base", GOOD.replace("epochs: 3", "epochs: 3, method: gmp"), "base.method"),
    ("unknown dataset", GOOD.replace("epochs: 3", "epochs: 3, dataset: cifar1000"), "cifar1000"),
    ("init dense without a dense run", GOOD.replace("[dense, hyperflux]", "[hyperflux]"), "dense"),
    ("unknown slurm key", GOOD + "launcher: {slurm: {partitoin: gpu}}\n", "partitoin"),
]


@pytest.mark.parametrize("desc,text,names", BAD, ids=[b[0] for b in BAD])
def test_bad_sweep_is_rejected_naming_the_field(tmp_path, desc, text, names):
    p = tmp_path / "sweep.yaml"
    p.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as e:
        load_sweep(p)
    msg = str(e.value)
    assert names in msg, f"{desc}: message does not name {names!r}:\n{msg}"
    assert str(p) in msg


def test_good_sweep_expands_dense_first_with_parent_hash(tmp_path):
    p = tmp_path / "sweep.yaml"
    p.write_text(GOOD)
    runs = load_sweep(p).expand()
    assert [r.method for r in runs] == ["dense", "hyperflux"]
    assert runs[1].init_from == runs[0].run_hash()


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_sweep(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_sweep(bad)
    run = tmp_path / "run.yaml"
    run.write_text("method: gmp\nsparsity: 0\n")
    with pytest.raises(ConfigError, match="sparsity"):
        load_run(run)


def test_run_hash_is_stable_and_semantic():
    a = RunConfig(method="gmp", sparsity=0.9, seed=1)
    b = RunConfig(method="gmp", sparsity=0.9, seed=1, data_dir="/elsewhere", experiment="x", out_dir="o")
    assert a.run_hash() == b.run_hash(), "paths and names must not change a run's identity"
    assert a.run_hash() == RunConfig.model_validate(a.model_dump(mode="json")).run_hash()
    assert a.run_hash() != RunConfig(method="gmp", sparsity=0.9, seed=2).run_hash()
    assert a.run_hash() != RunConfig(method="gmp", sparsity=0.8, seed=1).run_hash()
    # another method's section does not enter the hash
    assert a.run_hash() == RunConfig(method="gmp", sparsity=0.9, seed=1, hyperflux={"step": 0.5}).run_hash()
    # a fixed value, so an accidental change of the hashing scheme is noticed
    assert len(a.run_hash()) == 12 and int(a.run_hash(), 16) >= 0


def test_inputs_of_other_pressure_schedules_do_not_change_identity():
    law = {"c": 0.02, "a0": 0.8, "a1": 0.04}
    ctl = RunConfig(method="hyperflux", sparsity=0.9)
    assert ctl.run_hash() == RunConfig(method="hyperflux", sparsity=0.9, hyperflux={"law": law}).run_hash()
    assert ctl.run_hash() == RunConfig(method="hyperflux", sparsity=0.9, hyperflux={"fixed_gamma": 0.5}).run_hash()
    by_law = RunConfig(method="hyperflux", sparsity=0.9, hyperflux={"schedule": "law", "law": law})
    assert by_law.run_hash() != ctl.run_hash()
    assert (
        by_law.run_hash()
        != RunConfig(
            method="hyperflux", sparsity=0.9, hyperflux={"schedule": "law", "law": {**law, "c": 0.03}}
        ).run_hash()
    )
    fixed = RunConfig(method="hyperflux", sparsity=0.9, hyperflux={"schedule": "fixed", "fixed_gamma": 0.5})
    assert (
        fixed.run_hash()
        != RunConfig(method="hyperflux", sparsity=0.9, hyperflux={"schedule": "fixed", "fixed_gamma": 1.0}).run_hash()
    )
    assert ctl.variant() == "hyperflux" and by_law.variant() == "hyperflux-law" and fixed.variant() == "hyperflux-fixed"
    assert RunConfig(method="gmp", sparsity=0.5, gmp={"criterion": "taylor"}).variant() == "gmp-taylor"


def test_a_set_on_one_method_does_not_reach_its_yaml_aliases():
    """configs/paper share the fine-tuning settings through an alias (&finetune / *finetune): a
    `--set overrides.magnitude.epochs=30` changes magnitude only."""
    from suite.sweeps import load_sweep

    sw = load_sweep("configs/paper/cifar10_resnet50.yaml", {"overrides.magnitude.epochs": 30})
    epochs = {r.method: r.epochs for r in sw.expand() if r.method in ("magnitude", "seb", "ser", "rmt")}
    assert epochs == {"magnitude": 30, "seb": 40, "ser": 40, "rmt": 40}


def test_an_alias_bomb_is_refused_not_expanded(tmp_path):
    from suite.config import ConfigError
    from suite.sweeps import load_sweep
    from suite.validation import MAX_CONFIG_NODES

    lines = ["name: bomb", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    lines.append("base: {model: *a8}")
    (tmp_path / "bomb.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=f"more than {MAX_CONFIG_NODES:,} values"):
        load_sweep(tmp_path / "bomb.yaml")


def test_budget_matched_dense_plans_one_control_per_total_budget(tmp_path):
    from suite.sweeps import load_sweep

    sw = load_sweep("configs/demo.yaml")  # dense 5 x 429 steps + 80 x 25 of every pruning run = 4,145
    matched = [r for r in sw.expand() if r.budget_matched]
    assert [(r.epochs, r.max_steps_per_epoch, r.init) for r in matched] == [(85, 49, "scratch")]
    assert matched[0].variant() == "dense-matched" and matched[0].run_hash() != sw.expand()[0].run_hash()
    # CIFAR recipe: the from-scratch methods train the dense run's 160 epochs (no extra control);
    # fine-tuning 40 epochs after the dense 160 -> 200; Hyperflux's 160 after it -> 320; IMP's levels
    # from scratch -> 480 / 600 / 760
    sw = load_sweep("configs/paper/cifar10_resnet50.yaml", {"grid.budget_matched_dense": True})
    plans = sorted({(r.epochs, tuple(r.lr_milestones)) for r in sw.expand() if r.budget_matched})
    assert plans == [(200, (100, 150)), (320, (160, 240)), (480, (240, 360)), (600, (300, 450)), (760, (380, 570))]
    # a control shorter than the milestones keeps only those inside it, and is validated
    p = tmp_path / "s.yaml"
    p.write_text(
        "name: s\nbase: {epochs: 1, max_steps_per_epoch: 5}\n"
        "grid: {methods: [dense, gmp], sparsities: [0.5], budget_matched_dense: true}\n"
        "overrides: {dense: {epochs: 4, max_steps_per_epoch: 10, lr_schedule: step, "
        "lr_milestones: [2, 3]}, gmp: {gmp: {end_epoch: 1}}}\n"
    )
    (ctl,) = [r for r in load_sweep(p).expand() if r.budget_matched]
    assert (ctl.epochs, ctl.max_steps_per_epoch, ctl.lr_milestones) == (1, 5, [])
    assert not RunConfig(method="dense").budget_matched
    with pytest.raises(ValueError, match="budget_matched"):
        RunConfig(method="gmp", sparsity=0.5, budget_matched=True)


def test_dense_convergence_adds_the_doubled_dense_run_per_seed():
    """grid.dense_convergence: per model and seed one dense run with twice the dense epochs (step
    milestones doubled), a budget-matched plan the report reads as the convergence check; the fair
    protocol also has the equal-budget control, and nothing is added twice."""
    from suite.sweeps import load_sweep

    runs = load_sweep("configs/fmnist_fair.yaml").expand()
    dense = {r.seed: r for r in runs if r.method == "dense" and not r.budget_matched}
    doubled = [r for r in runs if r.budget_matched and r.epochs == 2 * dense[r.seed].epochs]
    assert sorted(r.seed for r in doubled) == [0, 1, 2]
    for r in doubled:
        d = dense[r.seed]
        assert (r.max_steps_per_epoch, r.lr, r.init) == (d.max_steps_per_epoch, d.lr, "scratch")
        assert r.model_dump(exclude={"epochs", "budget_matched"}) == d.model_dump(exclude={"epochs", "budget_matched"})
    controls = [r for r in runs if r.budget_matched and r not in doubled]
    assert len(controls) == 3 and len({r.run_hash() for r in runs}) == len(runs)
    plain = load_sweep("configs/fmnist_fair.yaml", {"grid.dense_convergence": False}).expand()
    assert len(plain) == len(runs) - 3
    sw = load_sweep(
        "configs/fmnist_fair.yaml",
        {
            "grid.dense_convergence": True,
            "overrides.dense.lr_schedule": "step",
            "overrides.dense.lr_milestones": [10, 20],
        },
    )
    (r0,) = [r for r in sw.expand() if r.budget_matched and r.epochs == 60 and r.seed == 0]
    assert r0.lr_milestones == [20, 40]


def test_fair_protocol_gives_every_pruning_run_the_same_budget():
    """configs/fmnist_fair.yaml: every pruning run (IMP included, at every target) trains the same
    optimiser steps from the same dense start of its seed."""
    from suite.sweeps import load_sweep

    runs = load_sweep("configs/fmnist_fair.yaml").expand()
    pruning = [r for r in runs if r.method != "dense"]
    assert len(pruning) == 11 * 5 * 3
    assert {(r.epochs, r.max_steps_per_epoch, r.batch_size, r.init) for r in pruning} == {(80, 25, 128, "dense")}
    dense = {r.seed: r.run_hash() for r in runs if r.method == "dense" and not r.budget_matched}
    assert all(r.init_from == dense[r.seed] for r in pruning)


def test_golden_run_hashes_of_every_committed_config():
    """Run identity is what decides that a finished run is not trained again. Every run of
    every committed config, and each method's default run, must keep the hash recorded in
    tests/golden_hashes.json. Migration rule when this fails: a change that does not alter
    what is trained (a new option, a refactor) must keep the old hashes (a new field enters
    semantic_dict only when set away from its default); a change that does alter training
    gets new hashes on purpose: run `python scripts/golden_hashes.py --write` and say in the
    commit that finished runs of those configs will train again."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "golden", Path(__file__).resolve().parents[1] / "scripts" / "golden_hashes.py"
    )
    golden = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(golden)
    recorded = json.loads(golden.GOLDEN.read_text())
    changed = golden.diff(recorded, golden.current())
    assert not changed, "run hashes changed (see this test's docstring for the rule):\n" + "\n".join(changed[:40])
    assert sum(len(v) for v in recorded.values()) >= 700  # every committed config is in it


def test_status_takes_the_sweeps_overrides_and_finds_its_runs(tmp_path, capsys):
    """Issue 21, case 5: a sweep started with `--set name=... --set base.epochs=...` could not be
    inspected (status had no --set). With the same overrides status finds the finished run,
    whose hash depends on the override; without them it does not."""
    from launchers.cli import main
    from suite import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        textwrap.dedent(f"""
        name: plain
        tracking_uri: {uri}
        data_dir: {tmp_path / "data"}
        out_dir: {tmp_path / "runs"}
        base: {{model: fmnist_cnn, epochs: 3, init: scratch}}
        grid: {{methods: [magnitude], sparsities: [0.5], seeds: [0]}}
        launcher: {{executor: local, folder: {tmp_path / "sub"}}}
    """)
    )
    sets = ["name=renamed", "base.epochs=2"]
    run = load_sweep(str(cfg), {"name": "renamed", "base.epochs": 2}).expand()[0]
    exp = tracking.ensure_experiment(uri, "renamed")
    c = tracking.client(uri)
    r = c.create_run(exp, tags={tracking.TAG_HASH: run.run_hash()})
    c.set_terminated(r.info.run_id, "FINISHED")
    assert main(["status", str(cfg)] + [x for s in sets for x in ("--set", s)]) == 0
    out = capsys.readouterr().out
    assert "1 finished" in out and run.run_hash() in out, out
    assert main(["status", str(cfg)]) == 0
    assert "1 not submitted" in capsys.readouterr().out


VARIANT_SWEEP = """
name: t
base: {model: fmnist_cnn, epochs: 8, init: dense}
grid: {methods: [dense, l0, l0-ref, imp-lrr, gmp-layer], sparsities: [0.5, 0.9], seeds: [0]}
overrides:
  l0: {l0: {lam: 2.0}}
  l0-ref: {l0: {drop_init: 0.3}}
  l0-ref@0.9: {l0: {lam: 7.0}}
"""


def test_every_named_variant_runs_under_its_name():
    from suite.pruning import registry

    for name, (method, preset) in registry.variants().items():
        assert RunConfig(method=method, sparsity=0.5, epochs=16, **{"init": "dense", **preset}).variant() == name
        assert RunConfig(method=method, sparsity=0.5, epochs=16, init="dense").variant() != name


def test_variant_names_in_the_grid_and_overrides_per_target(tmp_path):
    p = tmp_path / "sweep.yaml"
    p.write_text(VARIANT_SWEEP)
    runs = {(r.variant(), r.sparsity): r for r in load_sweep(p).expand()}
    # every listed variant runs under its own name, at every target
    assert set(runs) == {("dense", 0.0)} | {
        (v, s) for v in ("l0", "l0-ref", "imp-lrr", "gmp-layer") for s in (0.5, 0.9)
    }
    assert runs[("l0-ref", 0.5)].l0.mode == "reference" and runs[("l0", 0.5)].l0.mode == "calibrated"
    assert runs[("imp-lrr", 0.5)].imp.rewind == "lr" and runs[("gmp-layer", 0.9)].gmp.scope == "layer"
    # the method's overrides reach its variant; the variant's and the target's own come after
    assert runs[("l0", 0.5)].l0.lam == runs[("l0", 0.9)].l0.lam == 2.0
    assert runs[("l0-ref", 0.5)].l0.lam == 2.0 and runs[("l0-ref", 0.9)].l0.lam == 7.0
    assert runs[("l0-ref", 0.5)].l0.drop_init == 0.3 and runs[("l0", 0.5)].l0.drop_init != 0.3
    # a method's target key reaches its variants' runs at that target too, before the variant's own
    p.write_text(VARIANT_SWEEP.replace("  l0-ref@0.9:", "  l0@0.9: {l0: {beta: 0.5}}\n  l0-ref@0.9:"))
    runs = {(r.variant(), r.sparsity): r for r in load_sweep(p).expand()}
    assert runs[("l0", 0.9)].l0.beta == runs[("l0-ref", 0.9)].l0.beta == 0.5 and runs[("l0", 0.5)].l0.beta != 0.5


@pytest.mark.parametrize(
    "key,names",
    [
        ("l0-reff", "did you mean 'l0-ref'"),
        ("l0-ref@0.8", "'0.8' is not one of grid.sparsities as written in run names (0.5, 0.9)"),
        ("l0-ref@0.90", "'0.90' is not one of grid.sparsities"),
        ("cs-ref", "cs-ref is not in grid.methods, so these values would never apply"),
        ("str@0.9", "str is not in grid.methods"),
    ],
)
def test_bad_override_keys_are_refused_naming_the_key(tmp_path, key, names):
    p = tmp_path / "sweep.yaml"
    p.write_text(VARIANT_SWEEP.replace("l0-ref@0.9:", f"{key}:"))
    with pytest.raises(ConfigError) as e:
        load_sweep(p)
    assert f"overrides.{key}" in str(e.value) and names in str(e.value)


def test_a_bad_value_in_a_target_override_is_placed_there(tmp_path):
    p = tmp_path / "sweep.yaml"
    p.write_text(VARIANT_SWEEP.replace("lam: 7.0", "lam: -1"))
    with pytest.raises(ConfigError) as e:
        load_sweep(p).expand()
    assert "overrides.l0-ref@0.9.l0.lam" in str(e.value)


@pytest.mark.parametrize("k", [0.05, 0.1, 0.3])
def test_scale_keeps_the_cs_reference_rounds_retraining_and_rewind_point(tmp_path, k):
    p = tmp_path / "sweep.yaml"
    p.write_text(
        "name: t\nbase: {model: fmnist_cnn, epochs: 340, init: dense, lr_schedule: step, lr_milestones: [56, 71]}\n"
        "grid: {methods: [dense, cs-ref], sparsities: [0.5, 0.9], seeds: [0]}\n"
        "overrides:\n  dense: {lr_milestones: [80, 120]}\n  cs-ref: {cs: {rewind_epoch: 2}}\n"
    )
    full = [r for r in load_sweep(p).expand() if r.method == "cs"]
    small = [r for r in load_sweep(p, {"scale.epochs": k}).expand() if r.method == "cs"]
    assert full[0].cs.rewind_epoch == 2 and len(small) == len(full) == 2
    from baselines.continuous_sparsification import cs_round_epochs

    for r in small:  # validated, so: every round fits, a retraining remains, the rewind point and the
        epr = cs_round_epochs(r)  # step milestones (counted within a round) are inside round 1
        assert r.cs.rounds * epr < r.epochs < 340 and r.cs.rewind_epoch < epr
        assert all(1 <= m < epr for m in r.lr_milestones)
    assert RunConfig(method="cs", sparsity=0.9, cs={"mode": "reference"}).cs.rewind_epoch == 1  # 10 epochs: rounds of 2
    with pytest.raises(Exception, match="must fall inside the first round"):  # calibrated mode checks it too
        RunConfig(method="cs", sparsity=0.9, epochs=20, cs={"rewind": True, "rewind_epoch": 50})
