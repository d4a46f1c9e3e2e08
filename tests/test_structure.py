"""The structure a newcomer relies on: a method lives in one file, the core names no method,
imports flow one way (the core never imports the launchers or the reports), and a method from
outside the repository runs through the plugin mechanism end to end."""

from __future__ import annotations

import ast
import builtins
import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from suite.pruning import registry

ROOT = Path(__file__).resolve().parents[1]
# the modules that must stay method-agnostic: the run/sweep configuration, the engine and the
# rest of the core machinery, every launcher and every report module
GENERIC = (
    [
        ROOT / "suite" / n
        for n in (
            "config.py",
            "sweeps.py",
            "validation.py",
            "engine.py",
            "steps.py",
            "checkpoints.py",
            "preemption.py",
            "distributed.py",
            "weights.py",
            "batches.py",
            "accounting.py",
            "bench.py",
            "bench_data.py",
            "tracking.py",
            "run_schema.py",
            "run_logger.py",
            "mlflow_spool.py",
            "run_claims.py",
            "data/__init__.py",
            "data/files.py",
            "data/writer.py",
            "data/loader.py",
            "data/rgb.py",
            "data/imagefolder.py",
            "data/cifar.py",
            "data/rgb_loader.py",
            "optim.py",
            "schema.py",
            "images.py",
            "datasets.py",
            "models.py",
        )
    ]
    + sorted((ROOT / "launchers").glob("*.py"))
    + sorted((ROOT / "reports").glob("*.py"))
)


def _method_words() -> set[str]:
    """Every pruning method's name, config section and variant name (the dense control is the
    protocol's reference, not a method: the core may name it)."""
    words = set(registry.pruning_names()) | set(registry.variants())
    words |= {registry.get(m).section for m in registry.pruning_names() if registry.get(m).section}
    return words


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                ids.add(id(first.value))
    return ids


def method_mentions(source: str, words: set[str]) -> list[str]:
    """Where code (not prose) names a method: a string constant that is a method, section or
    variant name, or starts with one followed by '-', '.' or '@' (a variant label, a dotted
    option, a per-target override); an attribute, variable, argument or imported name equal
    to one (builtins such as str excepted)."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            v = node.value
            for w in words:
                if v == w or (v.startswith(w) and len(v) > len(w) and v[len(w)] in "-.@"):
                    out.append(f"line {node.lineno}: string {v!r}")
                    break
        names: list[str] = []
        if isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.Name) and not hasattr(builtins, node.id):
            names = [node.id]
        elif isinstance(node, ast.arg):
            names = [node.arg]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            names = [part for m in mods for part in m.split(".")] + [a.asname or a.name for a in node.names]
        out += [f"line {getattr(node, 'lineno', '?')}: name {n!r}" for n in names if n in words]
    return out


def test_method_mentions_catches_special_cases_and_lets_prose_through():
    words = {"hyperflux", "gmp", "gmp-layer", "str", "soft_threshold"}
    special = (
        'if run.method == "hyperflux": pass\nx = run.hyperflux.step\nlabel = "gmp-taylor"\n'
        'k = "soft_threshold.mode"\nfrom suite.pruning.hyperflux import snap_epoch\n'
        'o = {"gmp@0.9": 1}\n'
    )
    found = method_mentions(special, words)
    assert len(found) == 6, found
    prose = (
        '"""hyperflux: a docstring may name it"""\nn = str(3)\nmsg = "the Hyperflux runs and gmp ones"\n'
        'name = "hyperfluxes"\n'
    )
    assert method_mentions(prose, words) == []


@pytest.mark.parametrize("path", GENERIC, ids=lambda p: str(p.relative_to(ROOT)))
def test_generic_modules_name_no_method(path):
    """A method is one file: the configuration, engine, launchers and reports learn everything
    about a method from its class (suite/pruning/base.py), never by its name."""
    found = method_mentions(path.read_text(), _method_words())
    assert not found, f"{path.relative_to(ROOT)} names a method:\n  " + "\n  ".join(found)


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """Project modules `path` imports (function-local imports too unless top_level_only)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in ("suite", "baselines", "launchers", "reports")}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in ("suite", "baselines", "launchers", "reports"):
        for p in (ROOT / pkg).rglob("*.py"):
            rel = p.relative_to(ROOT).with_suffix("")
            name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
            mods[name] = p
    return mods


def test_the_core_imports_neither_launchers_nor_reports():
    bad = [
        f"{name} imports {m}"
        for name, p in _modules().items()
        if name.split(".")[0] == "suite"
        for m in _imports(p, top_level_only=False)
        if m.split(".")[0] in ("launchers", "reports")
    ]
    assert not bad, bad


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str]:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        state[n] = 2
        stack.pop()
        return []

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return []


def test_no_import_cycle_between_modules_or_packages():
    """Modules: no cycle through import statements at module level (the order Python loads them
    in). Packages: suite <- baselines <- launchers, suite <- reports <- launchers, counting every
    import, function-local ones included."""
    mods = _modules()
    graph = {n: {m for m in _imports(p, top_level_only=True) if m in mods and m != n} for n, p in mods.items()}
    assert _cycle(graph) == [], _cycle(graph)
    pkgs: dict[str, set[str]] = {}
    for n, p in mods.items():
        for m in _imports(p, top_level_only=False):
            if m.split(".")[0] != n.split(".")[0]:
                pkgs.setdefault(n.split(".")[0], set()).add(m.split(".")[0])
    assert pkgs.get("suite", set()) <= set(), pkgs  # the core imports no other package of the project
    assert _cycle(pkgs) == [], pkgs


TOY = '''
"""A toy method for the plugin test: prune a random share of the weights once, at the start."""
import torch
from pydantic import Field

from suite.pruning import registry
from suite.pruning.base import MaskPruner
from suite.schema import Strict


class ToyOptions(Strict):
    salt: int = Field(0, ge=0, description="added to the run's seed for the random scores")


@registry.register
class RandomPruner(MaskPruner):
    name = "toy_random"
    section = "toy_random"
    options = ToyOptions
    summary = "exact: one-shot random pruning (a plugin)"

    def on_train_start(self):
        g = torch.Generator().manual_seed(self.cfg.seed + self.cfg.toy_random.salt)
        scores = [torch.rand(w.shape, generator=g).to(w.device) for w in self.stored()]
        self.prune_to(self.cfg.sparsity, "global", scores)
'''


def _repo_state() -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--ignored=no"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_plugin_method_outside_the_repository_runs_a_sweep_and_is_in_the_report(tmp_path, betons):
    """A pruner written in a folder outside the repository, named in a sweep's `plugins`, trains
    through the local executor (a separate process imports it from the run's config) and the
    report built from MLflow lists it, with no change to any file of the repository."""
    before = _repo_state()
    work = tmp_path / "my_method"
    work.mkdir()
    (work / "toy.py").write_text(TOY)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (work / "sweep.yaml").write_text(
        textwrap.dedent(f"""
        name: plugin-sweep
        plugins: [toy.py]
        tracking_uri: {uri}
        data_dir: {betons["train"].parent}
        out_dir: {tmp_path / "runs"}
        base: {{model: fmnist_cnn, epochs: 1, max_steps_per_epoch: 4, batch_size: 64}}
        grid: {{methods: [dense, toy_random], sparsities: [0.5], seeds: [0]}}
        overrides: {{toy_random: {{toy_random: {{salt: 3}}}}}}
        launcher: {{executor: local, parallelism: 2, folder: {tmp_path / "submitit"}, poll_s: 1}}
    """)
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run(
        [sys.executable, "-m", "launchers.cli", "sweep", "sweep.yaml"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "report"
    # the report of the sweep's config imports its plugins too, so it can say what the method does
    rep = subprocess.run(
        [sys.executable, "-m", "launchers.cli", "report", "sweep.yaml", "--out", str(out)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rep.returncode == 0, rep.stdout[-3000:] + rep.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open(newline="")))
    toy = [r for r in rows if r["method"].split()[0] == "toy_random"]
    assert len(toy) == 1 and toy[0]["status"] == "FINISHED", rows
    # the method pruned what it said: one-shot, exact, by its own (random) scores
    assert float(toy[0]["achieved_sparsity"]) == pytest.approx(0.5, abs=1e-3)
    md = (out / "report.md").read_text()
    assert "\n| toy_random | " in md and "one-shot random pruning (a plugin)" in md
    assert _repo_state() == before


PLUGIN_CHECKS = r"""
import json, os, sys, tempfile, textwrap
from pathlib import Path
d = Path(tempfile.mkdtemp())
def plugin(name, body):
    p = d / name
    p.write_text(textwrap.dedent(body))
    return str(p)
head = "from suite.pruning import registry\nfrom suite.pruning.base import Pruner\nfrom suite.schema import Strict\n"
out = {}
from suite.pruning import registry
from suite.config import RunConfig, load_run, dump_run, ConfigError, _validate
def refused(path):
    try:
        registry.load_plugins([path])
        return ""
    except registry.PluginError as e:
        return str(e)
# a section that would hide a RunConfig method, or a field of every run, or an options class that is no model
out["section_method"] = refused(plugin("a.py", head + "@registry.register\nclass A(Pruner):\n    name='pa'\n    section='run_name'\n    class options(Strict): pass\n"))
out["section_field"] = refused(plugin("b.py", head + "@registry.register\nclass B(Pruner):\n    name='pb'\n    section='epochs'\n    class options(Strict): pass\n"))
out["options_not_model"] = refused(plugin("c.py", head + "@registry.register\nclass C(Pruner):\n    name='pc'\n    section='pc'\n    options=dict\n"))
# a method without a section may not take a built-in name through a variant
out["variant_takeover"] = refused(plugin("e.py", head + "@registry.register\nclass E(Pruner):\n    name='pe'\n    variants={'imp': {'lr': 0.01}}\n"))
out["nul_path"] = refused("x\0.py")
out["names_after"] = sorted(set(registry.names()) & {"pa", "pb", "pc", "pe"})
out["run_name_ok"] = RunConfig(method="gmp", sparsity=0.5).run_name()
# a plugin loaded in this process leaves no trace in the dump of another method's run
registry.load_plugins([plugin("t.py", head + "@registry.register\nclass T(Pruner):\n    name='pt'\n    section='pt'\n    class options(Strict):\n        k: int = 1\n")])
dumped = RunConfig(method="gmp", sparsity=0.5).model_dump(mode="json")
out["foreign_sections"] = sorted(k for k in ("pt", "hyperflux", "cs") if k in dumped)
out["own_section"] = "gmp" in dumped
print(json.dumps(out))
"""


def test_plugin_registration_refuses_what_would_break_every_run():
    """Sections that would hide a run field or method, an options class that is no model and a
    variant that takes a built-in name are refused at registration, one line naming the plugin;
    nothing half-registered stays; and a run's dump carries only its own method's section, so a
    worker need not import the plugins of other methods."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("HFBENCH_PLUGINS", None)
    r = subprocess.run([sys.executable, "-c", PLUGIN_CHECKS], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert "section 'run_name' is not a free name" in out["section_method"]
    assert "section 'epochs' is not a free name" in out["section_field"]
    assert "must be a pydantic model class" in out["options_not_model"]
    assert "variant 'imp' is already a method" in out["variant_takeover"]
    assert "cannot be resolved" in out["nul_path"] and "\n" not in out["nul_path"]
    for key in ("section_method", "section_field", "options_not_model", "variant_takeover"):
        assert out[key].startswith("plugins: plugin '/") and "\n" not in out[key], out[key]
    assert out["names_after"] == [] and out["run_name_ok"] == "fmnist_cnn-gmp-0.5-s0"
    assert out["foreign_sections"] == [] and out["own_section"] is True


def test_a_failing_environment_plugin_fails_every_use_not_just_the_first():
    """A plugin from HFBENCH_PLUGINS that does not import is raised again on every use: the
    registry never hands out a partial list of methods as if it were complete."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "HFBENCH_PLUGINS": "/nonexistent/bad_plugin.py",
    }
    code = (
        "from suite.pruning import registry\n"
        "for _ in range(3):\n"
        "    try:\n        registry.names(); print('LISTED')\n"
        "    except registry.PluginError as e:\n        print('REFUSED', e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3 and all(
        line.startswith("REFUSED HFBENCH_PLUGINS: plugin '/nonexistent/bad_plugin.py'") for line in lines
    ), r.stdout + r.stderr
