"""Bad input is refused before any job is submitted, with a message naming the field.

A table of bad sweep and run configs goes through the loaders (load_sweep / load_run, which
`hfbench sweep|status|train` use), the launcher's resource check (executor-dependent
conflicts), and a few through the real CLI as a subprocess (exit code, field named, no
traceback). A hypothesis fuzz test feeds random configs built from the real schema and
random YAML text: loading either succeeds or raises ConfigError, never anything else.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from suite.config import ConfigError, RunConfig, load_run, sync_sections
from suite.sweeps import SweepConfig, load_sweep

ROOT = Path(__file__).resolve().parents[1]

GOOD_SWEEP = {
    "name": "t",
    "base": {"model": "fmnist_cnn", "epochs": 3},
    "grid": {"methods": ["dense", "hyperflux", "gmp"], "sparsities": [0.5], "seeds": [0]},
    "overrides": {"hyperflux": {"hyperflux": {"pruning_end": 2}}},
    "launcher": {"executor": "local"},
}
GOOD_RUN = {"method": "gmp", "sparsity": 0.5, "epochs": 3}


def sweep(**changes) -> dict:
    """GOOD_SWEEP with dotted keys set (a value of DELETE removes the key)."""
    d = copy.deepcopy(GOOD_SWEEP)
    for dotted, v in changes.items():
        cur = d
        parts = dotted.split("__")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = v
    return d


def run(**changes) -> dict:
    return {**GOOD_RUN, **changes}


# (id, "sweep" | "run", config dict or raw YAML text, text the message must contain)
CASES = [
    # wrong types
    ("epochs-not-int", "sweep", sweep(base__epochs="three"), "base.epochs"),
    ("parallelism-not-int", "sweep", sweep(launcher__parallelism="many"), "launcher.parallelism"),
    ("seed-not-int", "sweep", sweep(grid__seeds=["zero"]), "grid.seeds"),
    ("methods-not-list", "sweep", sweep(grid__methods="dense"), "grid.methods"),
    ("base-not-mapping", "sweep", sweep(base=[1, 2]), "base"),
    ("lr-not-number", "run", run(lr="fast"), "lr"),
    ("nesterov-not-bool", "run", run(nesterov="sometimes"), "nesterov"),
    ("yaml-date-in-base", "sweep", "name: t\nbase: {epochs: 3, when: 2024-01-01}\n", "base.when"),
    (
        "yaml-duplicate-key",
        "sweep",
        "name: t\nbase: {epochs: 3}\nbase: {epochs: 4}\n",
        "duplicate key 'base' (first on line 2)",
    ),
    (
        "yaml-duplicate-nested-key",
        "sweep",
        "name: t\nbase:\n  lr: 0.1\n  lr: 0.2\n",
        "duplicate key 'lr' (first on line 3)",
    ),
    ("inf-lr-end", "sweep", "name: t\nbase: {lr_end: .inf}\n", "base.lr_end: Input should be a finite number"),
    (
        "nan-hyperflux-step",
        "sweep",
        "name: t\ngrid: {methods: [hyperflux]}\noverrides: {hyperflux: {hyperflux: {step: .nan}}}\n",
        "hyperflux.step: Input should be a finite number",
    ),
    ("yaml-binary-in-override", "sweep", "name: t\noverrides: {dense: {x: !!binary aGk=}}\n", "overrides.dense.x"),
    # unknown keys
    ("unknown-top-level-key", "sweep", sweep(colour="blue"), "colour"),
    ("unknown-engine-key", "sweep", sweep(base__engine={"gpus": 2}), "engine.gpus"),
    ("unknown-slurm-key", "sweep", sweep(launcher__slurm={"partitoin": "gpu"}), "launcher.slurm.partitoin"),
    ("unknown-run-key", "run", run(epocs=3), "epocs"),
    ("unknown-hyperflux-key", "run", run(method="hyperflux", hyperflux={"pruning_ned": 2}), "hyperflux.pruning_ned"),
    # out of range
    ("sparsity-one", "sweep", sweep(grid__sparsities=[1.0]), "sparsities"),
    ("sparsity-negative", "sweep", sweep(grid__sparsities=[0.5, -0.1]), "sparsities[1]"),
    ("sparsity-nan", "sweep", sweep(grid__sparsities=[float("nan")]), "sparsities"),
    ("run-sparsity-zero-for-gmp", "run", run(sparsity=0.0), "sparsity"),
    ("seed-too-big", "sweep", sweep(grid__seeds=[2**31]), "seeds"),
    ("seed-negative-run", "run", run(seed=-3), "seed"),
    ("lr-zero", "sweep", sweep(base__lr=0), "base.lr"),
    ("lr-huge", "run", run(lr=1e6), "lr"),
    ("lr-nan", "run", run(lr=float("nan")), "lr"),
    ("epochs-zero", "sweep", sweep(base__epochs=0), "base.epochs"),
    ("epochs-huge", "run", run(epochs=10**7), "epochs"),
    ("momentum-one", "run", run(momentum=1.0), "momentum"),
    ("gate-lr-too-big", "run", run(method="hyperflux", hyperflux={"gate_lr": 5.0}), "hyperflux.gate_lr"),
    ("imp-prune-fraction-tiny", "run", run(method="imp", imp={"prune_fraction": 1e-300}), "imp.prune_fraction"),
    ("empty-grid-axis", "sweep", sweep(grid__params={"lr": []}), "params.lr"),
    # unknown names
    ("unknown-method", "sweep", sweep(grid__methods=["dense", "hyperfluxx"]), "grid.methods[1]"),
    ("unknown-override-method", "sweep", sweep(overrides={"magnitud": {"epochs": 2}}), "magnitud"),
    ("unknown-model", "sweep", sweep(grid__models=["resnet9000"]), "resnet9000"),
    ("unknown-dataset", "sweep", sweep(base__dataset="cifar1000"), "cifar1000"),
    ("unknown-executor", "sweep", sweep(launcher__executor="kubernetes"), "launcher.executor"),
    ("unknown-device", "run", run(engine={"device": "tpu"}), "engine.device"),
    # more GPUs than a node has
    (
        "world-size-over-gpus-per-node",
        "sweep",
        sweep(base__engine={"world_size": 4, "device": "cuda"}, launcher__slurm={"gpus_per_node": 2}),
        "engine.world_size",
    ),
    (
        "world-size-over-gpus-per-node-auto",
        "sweep",
        sweep(base__engine={"world_size": 3}, launcher__slurm={"gpus_per_node": 2}),
        "launcher.slurm.gpus_per_node",
    ),
    ("gpus-per-node-over-16", "sweep", sweep(launcher__slurm={"gpus_per_node": 64}), "launcher.slurm.gpus_per_node"),
    # conflicting options
    ("init-dense-without-dense", "sweep", sweep(base__init="dense", grid__methods=["gmp"]), "grid.methods"),
    (
        "hyperflux-pruning-end-after-epochs",
        "sweep",
        sweep(overrides__hyperflux__hyperflux__pruning_end=9),
        "hyperflux.pruning_end",
    ),
    ("gmp-end-epoch-after-epochs", "sweep", sweep(overrides__gmp={"gmp": {"end_epoch": 7}}), "gmp.end_epoch"),
    ("gmp-initial-over-target", "run", run(gmp={"initial_sparsity": 0.9}), "gmp.initial_sparsity"),
    ("fixed-schedule-without-gamma", "run", run(method="hyperflux", hyperflux={"schedule": "fixed"}), "fixed_gamma"),
    ("dense-with-sparsity", "run", run(method="dense", sparsity=0.5), "sparsity"),
    ("method-in-base", "sweep", sweep(base__method="gmp"), "base.method"),
    ("dense-run-from-dense", "run", run(method="dense", sparsity=0.0, init="dense"), "init"),
    # names and paths (see tests/test_security.py)
    ("sweep-name-dotdot", "sweep", sweep(name=".."), "name"),
    ("sweep-name-slash", "sweep", sweep(name="a/b"), "name"),
    ("out-dir-climbs", "sweep", sweep(out_dir="../elsewhere"), "out_dir"),
    ("folder-climbs", "sweep", sweep(launcher__folder="runs/../../x"), "launcher.folder"),
    ("data-dir-nul", "sweep", sweep(data_dir="data\0x"), "data_dir"),
    ("slurm-extra-newline", "sweep", sweep(launcher__slurm={"extra": {"comment": "x\ntouch pwned"}}), "extra"),
    ("slurm-extra-bad-key", "sweep", sweep(launcher__slurm={"extra": {"x y": "1"}}), "extra"),
    ("run-experiment-newline", "run", run(experiment="a\nb"), "experiment"),
    # files
    ("not-a-mapping", "sweep", "- just\n- a list\n", "top level must be a mapping"),
    ("broken-yaml", "sweep", "name: [unclosed\n", "not valid YAML"),
    ("impossible-date", "sweep", "name: t\nbase: {when: 2024-13-45}\n", "not valid YAML"),
    ("not-utf8", "run", b"method: \xff\xfe\n", "cannot read"),
]


def _write(tmp_path: Path, cfg) -> Path:
    p = tmp_path / "cfg.yaml"
    if isinstance(cfg, bytes):
        p.write_bytes(cfg)
    elif isinstance(cfg, str):
        p.write_text(cfg)
    else:
        p.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return p


def test_the_good_configs_load(tmp_path):
    runs = load_sweep(_write(tmp_path, GOOD_SWEEP)).expand()
    assert [r.method for r in runs] == ["dense", "hyperflux", "gmp"]
    assert load_run(_write(tmp_path, GOOD_RUN)).method == "gmp"


def test_enough_distinct_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 20


@pytest.mark.parametrize("kind,cfg,field", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_naming_the_field(tmp_path, kind, cfg, field):
    p = _write(tmp_path, cfg)
    with pytest.raises(ConfigError) as e:
        (load_sweep if kind == "sweep" else load_run)(p)
    msg = str(e.value)
    assert field in msg, f"message does not name {field!r}:\n{msg}"
    assert str(p) in msg, f"message does not name the file:\n{msg}"


def test_missing_config_file(tmp_path):
    for load in (load_sweep, load_run):
        with pytest.raises(ConfigError, match="not found"):
            load(tmp_path / "nope.yaml")


# -------------------------------------------------------------------- executor-dependent conflicts
def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize(
    "kind,changes,field",
    [
        ("local", dict(base__engine={"nodes": 2}), "engine.nodes"),
        ("debug", dict(base__engine={"world_size": 2, "device": "cpu"}), "engine.world_size"),
        ("local", dict(base__engine={"world_size": 64, "device": "cuda"}), "engine.world_size"),
        ("local", dict(launcher__slurm={"gpus_per_node": 16}), "launcher.slurm.gpus_per_node"),
    ],
    ids=["local-multi-node", "debug-multi-rank", "local-more-ranks-than-gpus", "local-gpus-per-node"],
)
def test_executor_conflicts_are_refused_before_submission(tmp_path, kind, changes, field, monkeypatch):
    import launchers.checks as sw
    from launchers.checks import check_resources

    # "a cluster can": a cluster with two 64-CPU, 16-GPU nodes (what `scontrol show` would list),
    # whatever SLURM this machine runs (the real test cluster on this machine has neither)
    big = {
        "partition": [{"PartitionName": "gpu", "Default": "YES", "MaxTime": "2-00:00:00"}],
        "node": [
            {
                "NodeName": f"n{i}",
                "CPUTot": "64",
                "RealMemory": "512000",
                "Gres": "gpu:h100:16",
                "Partitions": "gpu",
                "State": "IDLE",
            }
            for i in (1, 2)
        ],
    }
    monkeypatch.setattr(sw, "_scontrol", lambda what: big[what])

    if field == "launcher.slurm.gpus_per_node" and _visible_gpus() >= 16:
        pytest.skip("this machine has 16 GPUs")
    d = sweep(**changes)
    if "gpus_per_node" in str(changes):
        d["base"]["engine"] = {"device": "cpu"}
    s = load_sweep(_write(tmp_path, d))  # statically fine ...
    with pytest.raises(ConfigError) as e:  # ... but this executor cannot place it
        check_resources(s, s.expand(), kind)
    assert field in str(e.value)
    check_resources(s, s.expand(), "slurm")  # a cluster can


def test_a_local_cpu_sweep_passes_the_resource_check(tmp_path):
    from launchers.checks import check_resources

    s = load_sweep(_write(tmp_path, sweep(base__engine={"world_size": 2, "device": "cpu"})))
    check_resources(s, s.expand(), "local")


# -------------------------------------------------------------------- the real CLI
def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HFBENCH_MLFLOW_URI=f"sqlite:///{cwd / 'mlflow.db'}")
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "launchers.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


CLI_CASES = [
    ("bad-sweep-file", sweep(grid__sparsities=[1.5]), [], "grid.sparsities"),
    ("unknown-key", sweep(launcher__slurm={"gpu": 1}), [], "launcher.slurm.gpu"),
    ("parallelism-flag", GOOD_SWEEP, ["--parallelism", "0"], "launcher.parallelism"),
    ("set-flag-range", GOOD_SWEEP, ["--set", "base.lr=-1"], "base.lr"),
    ("set-flag-bad-yaml", GOOD_SWEEP, ["--set", "base.epochs=[3"], "base.epochs"),
    ("executor-flag", GOOD_SWEEP, ["--executor", "kubernetes"], "--executor"),
    # refused by the launcher's resource check: nothing may have been created or submitted
    ("local-multi-node", sweep(base__engine={"nodes": 2, "device": "cpu"}), [], "engine.nodes"),
]


@pytest.mark.parametrize("cfg,flags,field", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_sweep_refuses_cleanly(tmp_path, cfg, flags, field):
    d = copy.deepcopy(cfg)
    d["launcher"] = {**d.get("launcher", {}), "folder": str(tmp_path / "submitit")}
    d["out_dir"] = str(tmp_path / "runs")
    d["data_dir"] = str(tmp_path / "data")
    p = _write(tmp_path, d)
    before = set(os.listdir(tmp_path))
    r = _cli(["sweep", str(p), *flags], tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert field in out, f"the output does not name {field!r}:\n{out}"
    assert "Traceback" not in out, out
    assert len(out.strip().splitlines()) <= 12, f"not a short message:\n{out}"
    # nothing submitted: no job folder, no run folder, no data, no MLflow experiment store
    assert set(os.listdir(tmp_path)) == before, sorted(set(os.listdir(tmp_path)) - before)


def test_cli_missing_file_is_clean(tmp_path):
    r = _cli(["sweep", str(tmp_path / "nope.yaml")], tmp_path)
    assert r.returncode != 0 and "nope.yaml" in r.stderr and "Traceback" not in r.stderr + r.stdout


# -------------------------------------------------------------------- fuzz
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


def _fields(model) -> dict[str, object]:
    """dotted field name -> pydantic model (for nested sections) or None (leaf)."""
    out: dict[str, object] = {}
    for name, f in model.model_fields.items():
        ann = f.annotation
        out[name] = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return out


def _dotted(model, prefix="") -> list[str]:
    names = []
    for name, sub in _fields(model).items():
        names.append(prefix + name)
        if sub is not None:
            names += _dotted(sub, prefix + name + ".")
    return names


sync_sections()  # RunConfig holds each method's section once the registry has loaded the methods
RUN_KEYS = _dotted(RunConfig)
assert {"hyperflux.step", "gmp.scope", "rmt.alpha"} <= set(RUN_KEYS)  # the fuzz reaches the method sections
SWEEP_KEYS = [k for k in _dotted(SweepConfig)]
METHODS = sorted(
    {"dense", "gmp", "hyperflux", "imp", "magnitude", "l0", "str", "cs", "rmt", "seb", "ser", "rmt_hybrid"}
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.dates(),
    st.binary(max_size=4),
    st.integers(min_value=-3, max_value=20),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=0, max_value=1),
    st.text(max_size=12),
    st.sampled_from(
        METHODS
        + [
            "fmnist_cnn",
            "fashion_mnist",
            "cpu",
            "cuda",
            "..",
            "a/b",
            "dense",
            "controller",
            "fixed",
            "law",
            "",
            "\0",
            "x\ny",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(RUN_KEYS), st.text(max_size=6)), inner, max_size=3),
    ),
    max_leaves=8,
)


def _set(d: dict, dotted: str, v) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = cur[p] = {}
        cur = nxt
    cur[parts[-1]] = v


@st.composite
def run_dicts(draw):
    d = {
        "method": draw(st.sampled_from(METHODS)),
        "sparsity": draw(st.sampled_from([0.0, 0.5, 0.9])),
        "epochs": draw(st.integers(1, 12)),
    }
    for _ in range(draw(st.integers(0, 4))):
        _set(d, draw(st.sampled_from(RUN_KEYS)), draw(values))
    return d


@st.composite
def sweep_dicts(draw):
    d = {
        "name": draw(st.sampled_from(["t", "fuzz-1", "a.b"])),
        "base": {"epochs": draw(st.integers(1, 12))},
        "grid": {
            "methods": draw(st.lists(st.sampled_from(METHODS), min_size=1, max_size=3)),
            "sparsities": draw(st.lists(st.sampled_from([0.3, 0.5, 0.9]), min_size=1, max_size=2)),
            "seeds": [0],
        },
        "launcher": {"executor": "local"},
    }
    for _ in range(draw(st.integers(0, 4))):
        where = draw(st.sampled_from(["top", "base", "override", "param"]))
        if where == "top":
            _set(d, draw(st.sampled_from(SWEEP_KEYS)), draw(values))
        elif where == "base":
            _set(d, "base." + draw(st.sampled_from(RUN_KEYS)), draw(values))
        elif where == "override":
            _set(d, f"overrides.{draw(st.sampled_from(METHODS))}.{draw(st.sampled_from(RUN_KEYS))}", draw(values))
        else:  # a grid axis: one key with dots in it
            _set(d, "grid.params.x", None)
            d["grid"]["params"] = {draw(st.sampled_from(RUN_KEYS)): draw(st.lists(values, max_size=2))}
    return d


_FUZZ_DIR = Path(tempfile.mkdtemp(prefix="hfbench-fuzz-"))


def _load_or_config_error(load, text: str | bytes, **kw) -> None:
    p = _FUZZ_DIR / "cfg.yaml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    try:
        cfg = load(p, **kw)
        runs = cfg.expand() if isinstance(cfg, SweepConfig) else [cfg]
    except ConfigError as e:  # anything else propagates and fails the test
        assert str(e).strip() and "Traceback" not in str(e)
        return
    # what was accepted must be sound: no non-finite number anywhere, and each run survives the
    # round trip through its own YAML (what a task receives) with the same identity
    import math

    from suite.config import dump_run

    def floats(x):
        if isinstance(x, dict):
            for v in x.values():
                yield from floats(v)
        elif isinstance(x, list):
            for v in x:
                yield from floats(v)
        elif isinstance(x, float):
            yield x

    for r in runs:
        assert all(math.isfinite(f) for f in floats(r.model_dump(mode="json"))), r.model_dump(mode="json")
        q = _FUZZ_DIR / "run.yaml"
        q.write_text(dump_run(r))
        assert load_run(q).run_hash() == r.run_hash()


def _dump(d) -> str:
    return yaml.safe_dump(d, allow_unicode=True)


@FUZZ
@given(run_dicts())
def test_fuzz_run_configs(d):
    _load_or_config_error(load_run, _dump(d))


@FUZZ
@given(
    sweep_dicts(), st.dictionaries(st.sampled_from(SWEEP_KEYS + ["base." + k for k in RUN_KEYS]), values, max_size=2)
)
def test_fuzz_sweep_configs_and_cli_overrides(d, overrides):
    _load_or_config_error(load_sweep, _dump(d), overrides=overrides)


YAML_BITS = [
    "name: t\n",
    "base:\n",
    "  epochs: ",
    "grid: {methods: [",
    "gmp",
    "dense",
    "]}\n",
    "2024-13-45",
    "!!binary aGk=",
    "!!python/object:os.system",
    "&a [*a]",
    "*a",
    "- ",
    ": ",
    "{",
    "}",
    "[",
    "]",
    "'",
    '"',
    "\t",
    "\n",
    "\xff",
    "1e400",
    ".nan",
    "~",
    "? ",
    "%YAML 1.1\n",
    "---\n",
    "...\n",
]


@FUZZ
@given(
    st.one_of(
        st.text(max_size=80), st.lists(st.sampled_from(YAML_BITS), max_size=20).map("".join), st.binary(max_size=40)
    )
)
def test_fuzz_random_yaml_text(text):
    _load_or_config_error(load_sweep, text)
    _load_or_config_error(load_run, text)


def test_report_refusals_are_one_line_with_exit_2(tmp_path, capsys):
    from launchers.cli import main
    from suite import tracking

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    tracking.ensure_experiment(uri, "another")  # a store that exists, without the experiment asked for
    capsys.readouterr()
    assert (
        main(["report", "--experiment", "no-such-experiment", "--out", str(tmp_path / "r"), "--tracking-uri", uri]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hfbench: MLflow experiment 'no-such-experiment' does not exist"]
    assert not any("Traceback" in ln for ln in err)
    (tmp_path / "file").write_text("x")
    assert main(["report", "--experiment", "e", "--out", str(tmp_path / "file"), "--tracking-uri", uri]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "x"


def test_a_folder_under_a_data_file_name_is_refused_naming_it(tmp_path, capsys):
    from launchers.cli import main

    (tmp_path / "data" / "fashion_mnist_train.beton").mkdir(parents=True)
    cfg = tmp_path / "s.yaml"
    cfg.write_text(
        f"name: d\ndata_dir: {tmp_path / 'data'}\nout_dir: {tmp_path / 'runs'}\nbase: {{epochs: 1}}\n"
        f"launcher: {{executor: local, folder: {tmp_path / 'sub'}}}\n"
    )
    assert main(["sweep", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"hfbench: {tmp_path / 'data' / 'fashion_mnist_train.beton'}: expected a .beton data file, "
        f"found a folder; move it away (the sweep would write the file there)"
    )
    assert (tmp_path / "data" / "fashion_mnist_train.beton").is_dir() and not (tmp_path / "sub").exists()


# ----------------------------------------------------------------------------- hostile round two
# Cases a hostile tester found (issue 16's second round); each used to end in a traceback, a
# hang, or a run that failed later. Each is now one line, exit 2, before anything runs.
HOSTILE = [
    ("tracking-uri-not-a-store", ["--set", "tracking_uri=not a uri"], "tracking_uri"),
    ("tracking-uri-ftp", ["--set", "tracking_uri=ftp://example/x"], "tracking_uri"),
    ("lr-end-huge", ["--set", "base.lr_end=1e300"], "lr_end"),
    (
        "grid-explosion",
        [
            "--set",
            "grid.params={lr: [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08], "
            "weight_decay: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], momentum: [0.1, 0.2, 0.3, 0.4, "
            "0.5, 0.6, 0.7, 0.8], label_smoothing: [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07]}",
        ],
        "grid",
    ),
    ("near-duplicate-sparsities", ["--set", "grid.sparsities=[0.5, 0.500000000001]"], "grid.sparsities"),
    ("set-without-value", ["--set", "foo"], "--set"),
    ("set-nested-too-deep", ["--set", "base.x=" + "[" * 700 + "]" * 700], "--set base.x"),
    ("override-of-a-grid-field", ["--set", "overrides.gmp.sparsity=0.3"], "overrides.gmp.sparsity"),
    ("grid-param-of-a-grid-field", ["--set", "grid.params={seed: [1, 2]}"], "grid.params.seed"),
    ("base-path-the-sweep-sets", ["--set", "base.out_dir=/tmp/elsewhere"], "base.out_dir"),
    ("override-model", ["--set", "overrides.gmp.model=resnet50_cifar"], "overrides.gmp.model"),
    ("unicode-control-in-partition", ["--set", "launcher.slurm.partition=gpu\x9bx"], "partition"),
    ("sqlite-uri-of-a-folder", ["--set", "tracking_uri=sqlite:////tmp"], "tracking_uri"),
    # more FFCV loader threads than numba allows here used to fail inside FFCV at the first step
    (
        "loader-threads-above-the-cpus",
        ["--set", "launcher.executor=local", "--set", f"base.engine.loader_workers={(os.cpu_count() or 1) + 1}"],
        "engine.loader_workers",
    ),
]


@pytest.mark.parametrize("args,field", [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_round_two_is_refused_in_one_line(args, field, tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "launchers.cli", "sweep", "configs/demo.yaml", "--dry-run", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert r.returncode == 2, r.stdout[-500:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr and field in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("field,value", [("out_dir", "{f}/runs"), ("launcher.folder", "{f}/sub"), ("data_dir", "{f}")])
def test_a_folder_under_a_file_is_refused_naming_the_field(tmp_path, field, value):
    import subprocess
    import sys

    f = tmp_path / "afile"
    f.write_text("x")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "launchers.cli",
            "sweep",
            "configs/demo.yaml",
            "--set",
            f"{field}={value.format(f=f)}",
            "--set",
            f"tracking_uri=sqlite:///{tmp_path / 'm.db'}",
            "--set",
            "launcher.executor=local",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert r.returncode == 2 and r.stderr.startswith(f"hfbench: {field}: ") and "is a file" in r.stderr, r.stderr
    assert not (tmp_path / "m.db").exists()


@pytest.mark.parametrize(
    "args,what",
    [
        (["--val-size", "-5"], "--val-size"),
        (["--split-seed", "-1"], "--split-seed"),
        (["--val-size", "60000"], "--val-size"),
        (["--quality", "500"], "--quality"),
    ],
)
def test_data_arguments_are_refused_by_name(tmp_path, args, what):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "launchers.cli", "data", "fashion-mnist", "--out", str(tmp_path / "d"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert r.returncode == 2 and what in r.stderr and "Traceback" not in r.stderr, r.stderr[-1500:]
