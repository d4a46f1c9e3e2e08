"""Reference fidelity: every paper recipe checked, value by value, against the reference tables.

The tables live in docs/reference/*.yaml, one per method family. Each names the reference code
or paper it was read from and lists, per recipe config and method, the values the reference
uses, each with its source (file:line at a commit, or a paper section) and a status:

- ``same``        the suite's value equals the reference value;
- ``option``      the suite's default differs on purpose and ``option`` is the one `--set`
                  line that gives the reference value (the check applies it and verifies);
- ``deliberate``  the suite keeps a different value (``suite``) for the ``reason`` given;
- ``note``        a reference behaviour that is not a run field (``field`` omitted): stated,
                  not checkable by resolving a config.

A table marked ``complete: true`` must also name every field that decides what its runs train
(`check_coverage`), listing the ones that are not recipe values under ``unchecked`` with a reason.

`check_table` resolves every run of each listed (config, method) with the sweep loader, as
`hfbench sweep` would, and reports any value that differs from the table without being listed.
`render` writes docs/fidelity.md from the tables (`hfbench fidelity --write`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from suite.config import RunConfig
from suite.sweeps import load_sweep

ROOT = Path(__file__).resolve().parent.parent
TABLES = ROOT / "docs" / "reference"
STATUSES = ("same", "option", "deliberate", "note")


@dataclass
class Problem:
    table: str
    config: str
    method: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.table}: {self.config} [{self.method}] {self.field}: {self.message}"


def load_tables(folder: Path = TABLES) -> dict[str, dict[str, Any]]:
    """Every reference table, by file stem."""
    out = {}
    for p in sorted(folder.glob("*.yaml")):
        out[p.stem] = yaml.safe_load(p.read_text())
    return out


def resolve(run: RunConfig, field: str) -> Any:
    """A dotted run field's value (e.g. 'hyperflux.pruning_end', 'engine.precision'), or one derived
    value: 'total_batch_size' = batch_size x engine.world_size x engine.nodes (images per step)."""
    if field == "total_batch_size":
        return run.batch_size * run.engine.world_size * run.engine.nodes
    cur: Any = run.model_dump(mode="json")
    for part in field.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(field)
        cur = cur[part]
    return cur


def equal(a: Any, b: Any) -> bool:
    """Values equal as a recipe means them: numbers to 1e-6 relative, lists element-wise."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def _entries(table: dict[str, Any]):
    """(config path, method, entry) for every value entry; a block may list several configs and
    methods that share its values."""
    for block in table.get("recipes", []):
        configs = block["configs"] if "configs" in block else [block["config"]]
        methods = block["methods"] if "methods" in block else [block["method"]]
        for cfg in configs:
            for method in methods:
                for e in block.get("values", []):
                    yield cfg, method, e


def _validate_entry(name: str, cfg: str, method: str, e: dict[str, Any]) -> Optional[str]:
    st = e.get("status")
    if st not in STATUSES:
        return f"status {st!r} is not one of {', '.join(STATUSES)}"
    if not e.get("source"):
        return "no source (file:line of the reference code, or a paper section)"
    if st == "note":
        return None if e.get("text") else "a note needs its text"
    if "field" not in e or "reference" not in e:
        return "needs field and reference"
    if st == "option" and not e.get("option"):
        return "status option needs the `--set` line that gives the reference value"
    if st in ("option", "deliberate") and "suite" not in e:
        return f"status {st} needs the suite's value (suite:)"
    if st == "deliberate" and not e.get("reason"):
        return "status deliberate needs a reason"
    return None


_EXPANDED: dict[tuple[str, str], list[RunConfig]] = {}


def _runs(config: str, method: str, overrides: Optional[dict[str, Any]] = None) -> list[RunConfig]:
    """The config's runs of `method`, resolved as `hfbench sweep` would (each sweep expanded once
    per set of overrides and config file content)."""
    path = ROOT / config
    key = (config, json.dumps(overrides or {}, sort_keys=True, default=str) + path.read_text())
    if key not in _EXPANDED:
        _EXPANDED[key] = load_sweep(path, overrides).expand()
    return [r for r in _EXPANDED[key] if r.method == method]


def _parse_option(option: str) -> tuple[str, Any]:
    key, _, value = option.partition("=")
    return key.strip(), yaml.safe_load(value)


def check_table(
    name: str, table: dict[str, Any], overrides: Optional[dict[str, dict[str, Any]]] = None
) -> list[Problem]:
    """Every difference between the resolved paper configs and the table that the table does not
    list. `overrides` maps a config path to extra `--set` values (used by the tests to change a
    recipe value and see it caught)."""
    problems: list[Problem] = []
    cache: dict[tuple[str, str], list[RunConfig]] = {}
    for cfg, method, e in _entries(table):
        field = e.get("field", "(note)")
        bad = _validate_entry(name, cfg, method, e)
        if bad:
            problems.append(Problem(name, cfg, method, field, bad))
            continue
        if e["status"] == "note":
            continue
        key = (cfg, method)
        if key not in cache:
            cache[key] = _runs(cfg, method, (overrides or {}).get(cfg))
            if not cache[key]:
                problems.append(Problem(name, cfg, method, field, "the config has no run of this method"))
        want = e["reference"] if e["status"] == "same" else e["suite"]
        for run in cache[key]:
            try:
                got = resolve(run, field)
            except KeyError:
                problems.append(Problem(name, cfg, method, field, "not a run field"))
                break
            if not equal(got, want):
                what = "the reference" if e["status"] == "same" else f"the suite's listed ({e['status']}) value"
                problems.append(
                    Problem(
                        name,
                        cfg,
                        method,
                        field,
                        f"{run.run_name()} has {got!r}, {what} is {want!r} "
                        f"(reference {e['reference']!r}, {e['source']})",
                    )
                )
                break
        if e["status"] == "option":  # the one line that gives the reference value really does
            k, v = _parse_option(e["option"])
            runs = _runs(cfg, method, {**(overrides or {}).get(cfg, {}), k: v})
            for run in runs:
                if not equal(resolve(run, field), e["reference"]):
                    problems.append(
                        Problem(
                            name,
                            cfg,
                            method,
                            field,
                            f"option `{e['option']}` gives {resolve(run, field)!r}, "
                            f"not the reference {e['reference']!r}",
                        )
                    )
                    break
    return problems


# run fields that say what is trained, not how: never reference values
NOT_RECIPE = {"method", "sparsity", "seed", "init_from", "pretrained"}
# a derived value that stands for the fields it is computed from (IMP's run length is
# (levels + 1) x imp.epochs_per_level, set by the config, not given)
DERIVED = {"total_batch_size": {"batch_size", "engine.world_size", "engine.nodes"}, "imp.epochs_per_level": {"epochs"}}


def _leaves(d: dict[str, Any], prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= _leaves(v, key + ".")
        else:
            out.add(key)
    return out


def check_coverage(
    name: str, table: dict[str, Any], overrides: Optional[dict[str, dict[str, Any]]] = None
) -> list[Problem]:
    """For a table marked `complete: true`: every field that decides what a listed run trains (its
    run hash content, RunConfig.semantic_dict) is listed, or named under `unchecked` with a reason.
    A new recipe value, or a field a config sets that the table never mentions, fails here."""
    if not table.get("complete"):
        return []
    listed: dict[tuple[str, str], set[str]] = {}
    skip = {
        (cfg, m)
        for block in table.get("recipes", [])
        if block.get("coverage") is False
        for cfg in (block["configs"] if "configs" in block else [block["config"]])
        for m in (block["methods"] if "methods" in block else [block["method"]])
    }
    for cfg, method, e in _entries(table):
        if (cfg, method) in skip:
            continue
        fields = listed.setdefault((cfg, method), set())
        if e.get("field"):
            fields.add(e["field"])
            fields |= DERIVED.get(e["field"], set())
    unchecked = table.get("unchecked") or {}
    problems = []
    for (cfg, method), fields in listed.items():
        runs = _runs(cfg, method, (overrides or {}).get(cfg))
        leaves = set().union(*(_leaves(r.semantic_dict()) for r in runs)) if runs else set()
        missing = sorted(leaves - fields - NOT_RECIPE - set(unchecked))  # over every run of the pair
        if missing:
            problems.append(
                Problem(
                    name,
                    cfg,
                    method,
                    ", ".join(missing),
                    "run fields the table neither lists nor names under `unchecked`",
                )
            )
    return problems


def check_all(overrides: Optional[dict[str, dict[str, Any]]] = None) -> list[Problem]:
    return [
        p
        for name, t in load_tables().items()
        for p in check_table(name, t, overrides) + check_coverage(name, t, overrides)
    ]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def render(tables: Optional[dict[str, dict[str, Any]]] = None) -> str:
    """docs/fidelity.md: one section per table, one row per value."""
    tables = tables if tables is not None else load_tables()
    lines = [
        "# Reference fidelity",
        "",
        "Generated by `hfbench fidelity --write` from `docs/reference/*.yaml`; checked by",
        "`tests/test_fidelity.py` (every paper config resolved and compared). Status: **same** (the",
        "suite uses the reference value), **option** (the suite's default differs; the `--set` line gives",
        "the reference), **deliberate** (kept different, with the reason), **note** (not a config value).",
        "",
    ]
    for name, t in tables.items():
        lines += [f"## {t.get('title', name)}", "", t.get("reference", ""), ""]
        for block in t.get("recipes", []):
            configs = block["configs"] if "configs" in block else [block["config"]]
            methods = block["methods"] if "methods" in block else [block["method"]]
            lines += [f"### {', '.join(methods)} in {', '.join(Path(c).stem for c in configs)}", ""]
            if block.get("about"):
                lines += [block["about"], ""]
            lines += ["| value | reference | source | status | suite / how |", "|---|---|---|---|---|"]
            for e in block.get("values", []):
                st = e["status"]
                how = {
                    "same": "",
                    "option": f"default {_fmt(e.get('suite'))}; `--set {e.get('option')}`"
                    + (f": {e['reason']}" if e.get("reason") else ""),
                    "deliberate": f"{_fmt(e.get('suite'))}: {e.get('reason', '')}",
                    "note": e.get("text", ""),
                }[st]
                field = f"`{e['field']}`" if e.get("field") else "-"
                ref = _fmt(e.get("reference", "")) if st != "note" else ""
                lines.append(f"| {field} | {ref} | {e['source']} | {st} | {how} |".replace("\n", " "))
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
