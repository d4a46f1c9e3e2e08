"""The paper recipes against the reference tables (docs/reference/*.yaml, suite/fidelity.py): every
config resolved as `hfbench sweep` resolves it, every value compared. Fast, no services."""

from __future__ import annotations

from pathlib import Path

from suite import fidelity
from suite.sweeps import load_sweep

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
C10 = "configs/paper/cifar10_resnet50.yaml"


def test_every_paper_config_matches_the_reference_tables():
    problems = fidelity.check_all()
    assert problems == [], "\n".join(map(str, problems))


def test_a_changed_recipe_value_is_caught_naming_field_and_source():
    problems = fidelity.check_all({C10: {"overrides.hyperflux.label_smoothing": 0.05}})
    assert len(problems) == 1, "\n".join(map(str, problems))
    p = problems[0]
    assert (p.config, p.method, p.field) == (C10, "hyperflux", "label_smoothing")
    assert "train_pruned_commons.py:174" in p.message and "0.05" in p.message
    # a Hyperflux constant, the dense schedule and a baseline's starting point, each caught alone
    for key, value, field, method in (
        ("overrides.hyperflux.hyperflux.step", 0.3, "hyperflux.step", "hyperflux"),
        ("overrides.dense.lr_milestones", [60, 120], "lr_milestones", "dense"),
        ("overrides.gmp.init", "dense", "init", "gmp"),
        ("base.engine.precision", "bf16", "engine.precision", None),
    ):
        got = fidelity.check_all({C10: {key: value}})
        assert got and all(p.field == field and p.config == C10 for p in got), (key, [str(p) for p in got])
        if method:
            assert {p.method for p in got} == {method}


def test_a_deliberate_difference_is_pinned_to_its_listed_value():
    """A value listed as deliberate must stay at the listed suite value: changing it is caught too."""
    got = fidelity.check_all({C10: {"overrides.magnitude.epochs": 30}})
    assert [(p.method, p.field) for p in got] == [("magnitude", "epochs")]


def test_every_hyperflux_and_baseline_run_of_the_paper_recipes_is_in_a_table():
    covered = {(cfg, m) for t in fidelity.load_tables().values() for cfg, m, _ in fidelity._entries(t)}
    for path in PAPER:
        rel = str(path.relative_to(ROOT))
        methods = set(load_sweep(path).grid.methods) - {"dense"}
        if not methods:
            continue  # the dense-only ImageNet recipe: the reference has no dense ImageNet script
        missing = {m for m in methods if (rel, m) not in covered}
        assert not missing, (rel, sorted(missing))


def test_fidelity_md_is_the_rendering_of_the_tables():
    assert (ROOT / "docs" / "fidelity.md").read_text() == fidelity.render(), (
        "docs/fidelity.md is stale: run `hfbench fidelity --write`"
    )


def test_option_status_applies_its_line_and_bad_entries_are_reported():
    table = {
        "recipes": [
            {
                "config": C10,
                "method": "hyperflux",
                "values": [
                    {
                        "field": "engine.precision",
                        "reference": "bf16",
                        "suite": "fp16",
                        "status": "option",
                        "option": "base.engine.precision=bf16",
                        "source": "x.py:1",
                    },
                    {
                        "field": "engine.precision",
                        "reference": "fp32",
                        "suite": "fp16",
                        "status": "option",
                        "option": "base.engine.precision=bf16",
                        "source": "x.py:2",
                    },  # the line does not give the reference
                    {
                        "field": "lr",
                        "reference": 0.2,
                        "suite": 0.1,
                        "status": "deliberate",
                        "source": "x.py:3",
                    },  # no reason
                    {"field": "no_such_field", "reference": 1, "status": "same", "source": "x.py:4"},
                ],
            }
        ]
    }
    got = [(p.field, p.message) for p in fidelity.check_table("t", table)]
    assert len(got) == 3, got
    assert got[0][0] == "engine.precision" and "does not" not in got[0][1] and "bf16" in got[0][1]
    assert got[1] == ("lr", "status deliberate needs a reason")
    assert got[2] == ("no_such_field", "not a run field")


def test_a_field_the_complete_table_does_not_name_fails():
    """hyperflux.yaml is complete: dropping one of its entries, or a config changing a field the
    table covers only through a derived value (ranks per run -> global batch), is caught."""
    table = fidelity.load_tables()["hyperflux"]
    for block in table["recipes"]:
        block["values"] = [e for e in block["values"] if e.get("field") != "hyperflux.step"]
    got = fidelity.check_coverage("hyperflux", table)
    assert got and all("hyperflux.step" in p.field for p in got)
    assert {p.method for p in got} == {"hyperflux"}
    got = fidelity.check_all({C10: {"base.engine.world_size": 4, "launcher.slurm.gpus_per_node": 4}})
    every = set(load_sweep(ROOT / C10).grid.methods)
    assert {(p.method, p.field) for p in got} == {(m, "total_batch_size") for m in every}


def test_the_baseline_table_is_complete_and_catches_a_changed_baseline_value():
    """baselines.yaml is complete too: every field of every baseline run is listed, so dropping an
    entry fails, and a changed recipe value of a baseline is caught naming its reference line."""
    table = fidelity.load_tables()["baselines"]
    assert table["complete"] is True
    for block in table["recipes"]:
        block["values"] = [e for e in block["values"] if e.get("field") != "cs.beta_final"]
    got = fidelity.check_coverage("baselines", table)
    assert got and {p.method for p in got} == {"cs"} and all("cs.beta_final" in p.field for p in got)
    for key, value, method, field, source in (
        ("overrides.cs.cs.beta_final", 100.0, "cs", "cs.beta_final", "main.py:27"),
        ("overrides.imp.imp.prune_fraction", 0.3, "imp", "imp.prune_fraction", "sparse_global.py:17"),
        ("overrides.l0.l0.beta", 0.5, "l0", "l0.beta", "l0_layers.py:15"),
        ("base.rmt.alpha", 0.2, None, "rmt.alpha", "prune.py:38"),
    ):
        got = fidelity.check_all({C10: {key: value}})
        assert got and all(p.field == field and source in p.message for p in got), (key, [str(p) for p in got])
        assert {p.method for p in got} == ({method} if method else {"seb", "ser", "rmt_hybrid", "rmt"})
