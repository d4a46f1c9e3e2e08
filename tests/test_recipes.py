"""Paper-scale recipes (configs/paper/): the scale knob, dense starting points from local
weight files, mixed precision / channels_last / throughput in the engine, and every committed
recipe's smoke run through the real SLURM launcher, FFCV and DeepSpeed on generated data of
the real layouts (CIFAR python releases, a 1000-class ImageNet JPEG tree)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from suite import bench_data, models, tracking
from suite.config import ConfigError, RunConfig
from suite.pruning import registry
from suite.run_schema import mlflow_key
from suite.sweeps import load_sweep

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "paper").glob("*.yaml"))


# ------------------------------------------------------------------------------ scale knob
def test_scale_knob_shrinks_every_phase_and_keeps_runs_apart():
    path = ROOT / "configs/paper/cifar10_resnet50.yaml"
    full = {r.run_name(): r for r in load_sweep(path).expand()}
    small_sweep = load_sweep(path, {"scale.epochs": 0.05, "scale.steps_per_epoch": 3})
    small = {r.run_name(): r for r in small_sweep.expand()}
    assert small.keys() == full.keys()
    assert small_sweep.experiment_name() == full["cifar_resnet50-dense-s0"].experiment + "-smoke"
    for name, r in small.items():
        f = full[name]
        assert r.run_hash() != f.run_hash(), name  # a smoke run never stands in for a full one
        assert r.max_steps_per_epoch == 3
        if r.method == "hyperflux":  # P scaled (8 of 160 -> at least what the target needs), regrowth kept
            assert r.hyperflux.pruning_end < r.epochs < f.epochs
        elif r.method == "imp":
            assert r.imp.epochs_per_level == 2 and r.imp.rewind_step <= 2 * 3
        elif r.method == "gmp":
            assert 0 < r.gmp.end_epoch <= r.epochs == 8
        else:  # SER and the hybrid keep the epochs their selection and fine-tune need
            assert r.epochs == max(1, round(f.epochs * 0.05), registry.get(r.method).min_epochs), name
        assert r.eval_every == max(1, round(f.eval_every * 0.05)), name  # scaled, not clamped


def _eval_epochs(r) -> list[int]:
    """The epochs after which the engine evaluates (suite/engine.py: every eval_every, and the last)."""
    return [e for e in range(1, r.epochs + 1) if e % r.eval_every == 0 or e == r.epochs]


def test_scaled_eval_every_follows_the_epochs_a_method_keeps():
    """eval_every is scaled like every epoch count and not clamped to the plain scaled length: a
    method that lengthens a scaled run afterwards (Hyperflux keeps its phases: 100 epochs at 0.01
    -> 6 or 7; IMP derives its length from its levels) evaluates as asked, here after the last
    epoch only. Clamped to the 1 epoch of the plain scaling, it evaluated after every epoch."""
    path = ROOT / "configs/paper/imagenet_resnet50.yaml"
    over = {"base.eval_every": 10000, "scale.epochs": 0.01, "grid.sparsities": [0.9]}
    for r in load_sweep(path, over).expand():
        assert _eval_epochs(r) == [r.epochs], (r.run_name(), r.epochs, r.eval_every)
    by = {r.method: r for r in load_sweep(path, over).expand()}
    assert by["hyperflux"].epochs > 1 and by["imp"].epochs > 2
    # a scaled value below the run's length is kept: 300 x 0.01 = every 3 epochs
    over["base.eval_every"] = 300
    hf = {r.method: r for r in load_sweep(path, over).expand()}["hyperflux"]
    assert hf.eval_every == 3 and _eval_epochs(hf) == [e for e in range(3, hf.epochs, 3)] + [hf.epochs]


def test_scale_knob_from_the_cli_lists_the_smoke_runs(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "launchers.cli",
            "sweep",
            str(ROOT / "configs/paper/imagenet_resnet50.yaml"),
            "--dry-run",
            "--scale",
            "0.02",
            "--steps",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("34 runs") and "resnet50-hyperflux-0.965-s0" in out.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "launchers.cli",
            "sweep",
            str(ROOT / "configs/paper/imagenet_resnet50.yaml"),
            "--dry-run",
            "--scale",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert bad.returncode != 0 and "scale.epochs" in bad.stderr and "Traceback" not in bad.stderr


# ------------------------------------------------------------------------------ pretrained weights
def _save_fmnist(path: Path, num_classes: int = 10, extra: dict | None = None) -> dict:
    torch.manual_seed(3)
    sd = models.build("fmnist_cnn", num_classes, 1).state_dict()
    torch.save({"model": {**sd, **(extra or {})}}, path)
    return sd


def test_pretrained_weights_load_and_a_classifier_of_another_size_starts_fresh(tmp_path, capsys):
    from suite.engine import load_pretrained

    sd = _save_fmnist(tmp_path / "w.pth")
    m = models.build("fmnist_cnn", 10, 1)
    load_pretrained(m, tmp_path / "w.pth")
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    m7 = models.build("fmnist_cnn", 7, 1)  # another class count: everything but the last Linear loads
    fresh = {k: v.clone() for k, v in m7.state_dict().items()}
    load_pretrained(m7, tmp_path / "w.pth")
    head = [n for n, mod in m7.named_modules() if isinstance(mod, torch.nn.Linear)][-1]
    for k, v in m7.state_dict().items():
        assert torch.equal(v, fresh[k] if k.startswith(head + ".") else sd[k]), k
    assert "starts fresh" in capsys.readouterr().out


def test_pretrained_weights_that_do_not_fit_are_refused_naming_the_keys(tmp_path):
    from suite.engine import load_pretrained

    _save_fmnist(tmp_path / "extra.pth", extra={"stray.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"extra.pth do not fit the model; unexpected: stray.weight"):
        load_pretrained(models.build("fmnist_cnn", 10, 1), tmp_path / "extra.pth")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "few.pth")
    with pytest.raises(ValueError, match=r"few.pth do not fit the model; missing: .*other shape: features.0.weight"):
        load_pretrained(models.build("fmnist_cnn", 10, 1), tmp_path / "few.pth")
    with pytest.raises(FileNotFoundError, match="pretrained weights not found"):
        load_pretrained(models.build("fmnist_cnn", 10, 1), tmp_path / "nope.pth")


def test_pretrained_pickle_that_would_run_code_is_refused(tmp_path):
    from suite.engine import load_pretrained
    from tests.test_security import _evil_checkpoint  # unpickling it would create `mark`

    mark = tmp_path / "pwned"
    with pytest.raises(ValueError, match=r"evil.pth: unreadable as torch weights \(UnpicklingError: Weights only"):
        load_pretrained(models.build("fmnist_cnn", 10, 1), _evil_checkpoint(tmp_path / "evil.pth", mark))
    assert not mark.exists()


def test_pretrained_file_that_is_not_torch_weights_is_named(tmp_path):
    """A file of another kind, or one cut short, used to end in torch's own error, which does
    not name the file."""
    from suite.engine import load_pretrained

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all" * 10)
    _save_fmnist(tmp_path / "cut.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "cut.pth").read_bytes()[:5000])
    for name in ("junk.pth", "cut.pth"):
        with pytest.raises(ValueError, match=rf"pretrained weights .*{name}: unreadable as torch weights"):
            load_pretrained(models.build("fmnist_cnn", 10, 1), tmp_path / name)


def test_pretrained_needs_its_file_before_anything_is_submitted(tmp_path):
    from launchers.sweep import Sweep

    with pytest.raises(ValueError, match="exactly when init is 'pretrained'"):
        RunConfig(init="pretrained")
    p = tmp_path / "s.yaml"
    p.write_text(f"""
name: pre
data_dir: {tmp_path}
out_dir: {tmp_path / "runs"}
tracking_uri: sqlite:///{tmp_path / "m.db"}
base: {{init: pretrained, pretrained: {tmp_path / "missing.pth"}}}
grid: {{methods: [dense, magnitude], sparsities: [0.5]}}
launcher: {{executor: local, folder: {tmp_path / "sub"}}}
""")
    with pytest.raises(ConfigError, match=r"pretrained: weights file .*missing.pth not found"):
        Sweep(load_sweep(p)).run()
    assert not (tmp_path / "sub").exists() and not (tmp_path / "m.db").exists()


def test_weights_file_counts_by_name_in_the_run_hash(tmp_path):
    a = RunConfig(init="pretrained", pretrained=str(tmp_path / "a" / "w.pth"))
    b = RunConfig(init="pretrained", pretrained=str(tmp_path / "b" / "w.pth"))
    c = RunConfig(init="pretrained", pretrained=str(tmp_path / "a" / "other.pth"))
    assert a.run_hash() == b.run_hash() != c.run_hash()
    # fields added in session 4 enter the hash only when set: older runs keep their hashes
    assert RunConfig(engine={"loader_workers": 4}).run_hash() == RunConfig().run_hash()
    assert RunConfig(engine={"precision": "bf16"}).run_hash() != RunConfig().run_hash()


# ------------------------------------------------------------------------------ engine
@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_channels_last_pretrained_run_logs_throughput(tmp_path, betons, precision):
    """One real Hyperflux run through `hfbench train` (its own process: DeepSpeed keeps one process
    group per process): bf16 autocast, or fp16 autocast with the gradient scaler (its scale logged
    each epoch; the pressure under scaling: tests/test_precision.py), channels_last, 2 loader
    threads, starting from a weights file; img/s per epoch in MLflow."""
    from suite.config import dump_run

    _save_fmnist(tmp_path / "dense.pth")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = RunConfig(
        method="hyperflux",
        sparsity=0.5,
        epochs=3,
        max_steps_per_epoch=4,
        batch_size=32,
        eval_every=3,
        hyperflux={"pruning_end": 2},
        init="pretrained",
        pretrained=str(tmp_path / "dense.pth"),
        engine={"precision": precision, "channels_last": True, "loader_workers": 2, "device": "cpu"},
        data_dir=str(betons["train"].parent),
        out_dir=str(tmp_path / "runs"),
        experiment=precision,
        tracking_uri=uri,
    )
    (tmp_path / "run.yaml").write_text(dump_run(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    out = subprocess.run(
        [sys.executable, "-m", "launchers.cli", "train", str(tmp_path / "run.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=500,
        env=env,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    c = tracking.client(uri)
    (run,) = tracking.training_runs(c, c.get_experiment_by_name(precision).experiment_id)
    assert run.info.status == "FINISHED" and 0.0 <= run.data.metrics[mlflow_key("final_test_top1")] <= 1.0
    assert run.data.params["engine.precision"] == precision
    # the flags took effect: the first step's logits came out of autocast in that dtype, and every
    # convolution weight was in channels_last memory format (read off the tensors by the engine)
    assert run.data.params["observed.compute_dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[precision]
    assert run.data.params["observed.channels_last"] == "True"
    hist = c.get_metric_history(run.info.run_id, mlflow_key("img_per_s"))
    assert sorted(h.step for h in hist) == [1, 2, 3] and all(h.value > 0 for h in hist)
    scale = c.get_metric_history(run.info.run_id, mlflow_key("grad_scale"))
    if precision == "fp16":  # the scaler ran: a power of two, logged every epoch
        assert sorted(h.step for h in scale) == [1, 2, 3]
        assert all(math.log2(h.value) == int(math.log2(h.value)) for h in scale)
    else:
        assert scale == []


# ------------------------------------------------------------------------------ every recipe, smoke
def _fake_cifar_release(root: Path, dataset: str) -> Path:
    from tests.test_imagefolder import _fake_cifar

    _fake_cifar(root, dataset, n_batch=24, n_test=4, seed=1)
    return root


@pytest.fixture(scope="module")
def paper_data(tmp_path_factory):
    """data_dir with cifar10, cifar100 and imagenet betons (generated, real layouts) and the
    pretrained weight files the ImageNet recipes name."""
    from suite.images import write_cifar, write_imagefolder

    base = tmp_path_factory.mktemp("paper")
    data = base / "data"
    for ds in ("cifar10", "cifar100"):
        write_cifar(ds, _fake_cifar_release(base / f"src-{ds}", ds), data, val_size=4, progress=False)
    train = bench_data.make_jpeg_tree(
        base / "inet" / "train", classes=1000, per_class=1, seed=0, min_side=40, max_side=96
    )
    val = bench_data.make_jpeg_tree(base / "inet" / "val", classes=4, per_class=1, seed=1, min_side=40, max_side=96)
    write_imagefolder(data, train, val, name="imagenet", max_side=96, progress=False)
    weights = {}
    for m in ("resnet50", "deit_tiny", "deit_small"):
        torch.manual_seed(0)
        weights[m] = base / f"{m}-dense.pth"
        torch.save(models.build(m, 1000, 3).state_dict(), weights[m])
    return data, weights


# Which methods each recipe's smoke run trains in `make test`: dense everywhere (the fine-tuning
# methods start from it), every other method at least once on a CIFAR network and once on an
# ImageNet one, Hyperflux on every model: 33 runs (about 19 minutes on 2 cores) instead of 85.
# `make test-recipes` (pytest --all-methods) trains every method of every recipe.
CI_METHODS = {
    "cifar10_resnet50": ["dense", "hyperflux", "magnitude", "gmp"],
    "cifar100_resnet50": ["dense", "imp", "seb", "l0"],
    "cifar10_vgg19": ["dense", "hyperflux", "ser", "rmt_hybrid", "str"],
    "cifar100_vgg19": ["dense", "rmt", "cs"],
    "imagenet_resnet50": ["dense", "hyperflux", "magnitude", "imp", "rmt"],
    "imagenet_deit_tiny": ["dense", "hyperflux", "gmp", "l0", "ser", "cs"],
    "imagenet_deit_small": ["dense", "hyperflux", "str", "seb", "rmt_hybrid"],
    "imagenet_dense_resnet50": ["dense"],
}


def test_ci_subset_covers_every_method_on_both_kinds_of_data():
    assert sorted(CI_METHODS) == sorted(p.stem for p in RECIPES)
    for kind in ("cifar", "imagenet"):
        grids = {p.stem: load_sweep(p).grid.methods for p in RECIPES if p.stem.startswith(kind)}
        for stem, methods in grids.items():
            assert set(CI_METHODS[stem]) <= set(methods), stem
            assert "dense" in CI_METHODS[stem], stem
        covered = {m for stem in grids for m in CI_METHODS[stem]}
        assert covered == {m for ms in grids.values() for m in ms}, kind


@pytest.mark.slow
@pytest.mark.recipes
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_smoke_run_through_slurm(recipe, tmp_path, paper_data, mlflow_server, slurm_cluster, request):
    """The recipe as committed, shrunk by the scale knob (epochs x 0.01, one batch per epoch,
    batch 2, CPU, one rank), first sparsity and seed, the CI subset of its methods (every method
    with --all-methods): one SLURM array through `hfbench sweep`, FFCV loaders and DeepSpeed;
    every run FINISHED in MLflow with its throughput logged, the one-shot magnitude run exactly
    at its target."""
    data, weights = paper_data
    # checkpoints and weights of these full-size models take ~0.5 GB per run: deleted when the
    # recipe is done (passed or not); logs, results and MLflow records stay
    request.addfinalizer(lambda: [p.unlink() for p in (tmp_path / "runs").rglob("*.pt")])
    sw = load_sweep(recipe)
    first = sw.grid.sparsities[:1]
    methods = sw.grid.methods if request.config.getoption("--all-methods") else CI_METHODS[recipe.stem]
    sets = {
        "data_dir": data,
        "out_dir": tmp_path / "runs",
        "launcher.folder": tmp_path / "submitit",
        "launcher.parallelism": 2,
        "launcher.poll_s": 1,
        "launcher.slurm.gpus_per_node": 0,
        "launcher.slurm.mem_gb": "null",
        "launcher.slurm.cpus_per_task": 1,
        "launcher.slurm.time_min": 30,
        "launcher.slurm.signal_delay_s": 60,
        "base.batch_size": 2,
        "base.engine.device": "cpu",
        "base.engine.world_size": 1,
        "base.engine.precision": "fp32",
        "base.engine.loader_workers": 1,
        # accuracy and flux statistics after the last epoch only: every code path still runs
        # once per run, at a fraction of the smoke run's time (they were half of it)
        "base.eval_every": 10000,
        "base.flux_every": 10000,
        "grid.seeds": "[0]",
        "grid.sparsities": "[" + ",".join(map(str, first)) + "]",
        "grid.methods": "[" + ",".join(methods) + "]",
    }
    if sw.base.get("init") == "pretrained":
        sets["base.pretrained"] = weights[sw.base["model"]]
    cmd = [
        sys.executable,
        "-m",
        "launchers.cli",
        "sweep",
        str(recipe),
        "--scale",
        "0.01",
        "--steps",
        "1",
        "--executor",
        "slurm",
        "--tracking-uri",
        mlflow_server,
    ]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    t0 = time.time()
    # started as if from inside a torchrun job: the tasks must not inherit its rendezvous
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1700, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    from launchers.cli import _parse_set  # the sweep exactly as the command line built it

    overrides = {
        **_parse_set([f"{k}={v}" for k, v in sets.items()]),
        "scale.epochs": 0.01,
        "scale.steps_per_epoch": 1,
        "tracking_uri": mlflow_server,
    }
    expected = {r.run_hash(): r for r in load_sweep(recipe, overrides).expand()}
    n = len(expected)
    assert n == len(methods)  # one sparsity, one seed: a run per method
    c = tracking.client(mlflow_server)
    exp = c.get_experiment_by_name(sw.experiment_name() + "-smoke")
    runs = [r for r in tracking.training_runs(c, exp.experiment_id) if r.info.status == "FINISHED"]
    by_hash = {r.data.tags.get(tracking.TAG_HASH): r for r in runs}
    assert set(expected) <= set(by_hash), sorted(expected[h].run_name() for h in set(expected) - set(by_hash))
    for h, cfg in expected.items():
        r = by_hash[h]
        # trained by this test, not found finished from an earlier session on the same server
        assert r.info.start_time >= 1000 * t0 - 1000, cfg.run_name()
        assert c.get_metric_history(r.info.run_id, mlflow_key("img_per_s")), cfg.run_name()
        if cfg.method == "magnitude":
            assert abs(r.data.metrics[mlflow_key("final_sparsity")] - first[0]) < 1e-4
    print(f"{recipe.stem}: {n} runs ({', '.join(methods)}) in {time.time() - t0:.0f} s")
