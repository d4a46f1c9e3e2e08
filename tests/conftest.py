"""Shared fixtures. The services (SLURM cluster, MLflow server) are started by the test
command (scripts/test.sh) and found through the environment it exports; a test that needs
one and does not find it fails with the command that starts it."""

from __future__ import annotations

import os
from pathlib import Path

# hypothesis's pytest plugin imports hypothesis only when it prints its summary; by then FFCV's
# numba compilation has left CPython 3.11's AST recursion counter off, and pytest's assertion
# rewriting of hypothesis fails with "SystemError: AST constructor recursion depth mismatch"
# (seen running one FFCV test alone). Imported here, before any test, it is rewritten cleanly.
import pytest

try:
    import hypothesis.internal.observability  # noqa: F401
except ImportError:  # a later hypothesis moved it: nothing to pre-import
    pass


@pytest.fixture(scope="session")
def betons(tmp_path_factory):
    """Fashion-MNIST .beton files (train/val/test), written once per session."""
    from suite import data as D

    out = tmp_path_factory.mktemp("fashion_mnist")
    return D.write_fashion_mnist(out, val_size=5000, split_seed=0, progress=False)


@pytest.fixture(scope="session")
def mlflow_server() -> str:
    uri = os.environ.get("HFBENCH_MLFLOW_URI", "")
    if not uri.startswith("http"):
        pytest.fail(
            "no MLflow server: run the tests through scripts/test.sh (make test), or "
            "`scripts/services.sh start` and source the env.sh it prints"
        )
    return uri


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    from launchers.checks import slurm_reachable

    if not slurm_reachable():
        pytest.fail(
            "no SLURM controller answers: run the tests through scripts/test.sh (make test), or "
            "`scripts/services.sh start` and source the env.sh it prints"
        )


# ----------------------------------------------------------------------------- robustness report
# Issue "nothing lost, nobody let in" asks for counts, not impressions: at the end of a session
# the outcome of every fault-injection, bad-input and hostile-value test is summed here.
_GROUPS = {
    "faults injected (process kills, corrupt checkpoint, MLflow outages, concurrent sweeps, "
    "disk full, corrupt data, node failure)": ("tests/test_faults.py::", "tests/test_cluster.py::test_node_failure"),
    "bad inputs refused before submission (config fields, CLI, executor conflicts, fuzz)": (
        "tests/test_bad_input.py::",
    ),
    "hostile values and loading safety (shell, paths, pickles, bind address)": ("tests/test_security.py::",),
}
_OUTCOMES: dict[str, list] = {g: [] for g in _GROUPS}


# ------------------------------------------------------------------------ parallel test workers
# scripts/test.sh runs pytest with pytest-xdist (-n N --dist loadgroup). What may not be spread:
# the SLURM tests share one small cluster and several read its queue (parallelism, pending
# reasons), so they run on one worker, one after another, and first (they are the long pole);
# tests that share a module-scoped fixture stay on one worker, so it is built once.
def _worker_group(item: pytest.Item) -> str | None:
    if "slurm_cluster" in item.fixturenames:
        return "slurm"
    defs = item._fixtureinfo.name2fixturedefs
    if any(d[-1].scope == "module" for d in defs.values()):
        return item.module.__name__
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    groups = {item.nodeid: _worker_group(item) for item in items}
    for item in items:
        if groups[item.nodeid]:
            item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))
    items.sort(key=lambda item: groups[item.nodeid] != "slurm")  # stable: otherwise collection order


def pytest_collection_finish(session):
    """In an xdist worker: every grouped test must carry its group in its id, else xdist spreads
    the group over the workers without a word (pytest 9.2 with xdist 3.8 does)."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    lost = [item.nodeid for item in session.items if _worker_group(item) and "@" not in item.nodeid]
    if lost:
        pytest.exit(
            f"pytest-xdist did not group {len(lost)} tests (e.g. {lost[0]}): the SLURM tests would run "
            "side by side; use the pytest version pyproject.toml pins (make setup)"
        )


def pytest_addoption(parser):
    parser.addoption(
        "--all-methods",
        action="store_true",
        help="recipe smoke runs (tests/test_recipes.py) train every method of every recipe, "
        "not the covering subset make test runs",
    )


_PROMISE_OUTCOMES: dict[str, dict[str, str]] = {}  # promise -> {node id: outcome}


def pytest_runtest_logreport(report):
    if report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
        return
    from tests.reliability import PROMISES

    for promise, _, prefixes in PROMISES:
        if report.nodeid.startswith(prefixes):
            _PROMISE_OUTCOMES.setdefault(promise, {})[report.nodeid] = report.outcome
    for group, prefixes in _GROUPS.items():
        if report.nodeid.startswith(prefixes):
            _OUTCOMES[group].append((report.outcome, report.duration))


def _reliability_table() -> list[str]:
    from tests.reliability import PROMISES

    rows = ["| promise | made in | tests | passed | failed | skipped |", "|---|---|---:|---:|---:|---:|"]
    for promise, where, _ in PROMISES:
        got = list(_PROMISE_OUTCOMES.get(promise, {}).values())
        rows.append(
            f"| {promise} | {where} | {len(got)} | {got.count('passed')} | {got.count('failed')} | "
            f"{got.count('skipped')} |"
        )
    return rows


def _write_reliability_doc(path: str) -> str:
    """docs/reliability.md from this session's outcomes; only when every promise was tried (a
    partial run, e.g. -k, must not overwrite the full table with small counts)."""
    import datetime
    import subprocess

    from tests.reliability import PROMISES

    if any(not _PROMISE_OUTCOMES.get(p) for p, _, _ in PROMISES):
        return "not written: this run did not try every promise"
    commit = (
        subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        ).stdout.strip()
        or "unknown"
    )
    text = "\n".join(
        [
            "# Reliability: each promise and the tests that try to break it",
            "",
            "Written by `make test` (tests/conftest.py, from the promises in tests/reliability.py) at the end",
            f"of a full run: commit {commit}, {datetime.date.today().isoformat()}. A test counts for every",
            "promise it serves. Failed or skipped tests are counted as such, never as passed; a test of",
            "the slow tier needs the services `make test` starts.",
            "",
            *_reliability_table(),
            "",
        ]
    )
    Path(path).write_text(text)
    return f"written to {path}"


def pytest_terminal_summary(terminalreporter):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker sees only its share: the controller reports
        return
    if _PROMISE_OUTCOMES:
        terminalreporter.section("hfbench reliability table")
        for line in _reliability_table():
            terminalreporter.write_line(line)
        doc = os.environ.get("HFBENCH_RELIABILITY_DOC")
        if doc:
            terminalreporter.write_line(f"reliability table {_write_reliability_doc(doc)}")
    if not any(_OUTCOMES.values()):
        return
    tr = terminalreporter
    tr.section("hfbench robustness report")
    total = 0.0
    for group, rows in _OUTCOMES.items():
        if not rows:
            continue
        passed = sum(o == "passed" for o, _ in rows)
        secs = sum(d for _, d in rows)
        total += secs
        tr.write_line(f"{passed}/{len(rows)} passed, {secs:.0f} s: {group}")
    tr.write_line(f"run time of this group: {total:.0f} s")
