"""A read-only fast path for MLflow's sqlite store: the runs of an experiment and metric histories
read with plain SQL, for reports over thousands of runs.

MLflow's API builds an ORM object for every param, tag and metric of every run (about 150,000
for 1,000 runs), which takes seconds; the same rows read with sqlite3 take a fraction of that.
The tables read (runs, tags, params, latest_metrics, metrics) are those of MLflow's SQLAlchemy
store; the answers follow its API: active runs only, oldest first, a NaN metric as NaN. If the
store is not sqlite, or its tables do not look as expected, `open_store` returns None or a query
raises `sqlite3.Error`, and the caller uses MLflow's API instead.
`tests/test_report.py` checks that both paths read the same records and histories.
"""

from __future__ import annotations

import math
import sqlite3
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace

_NEEDED = {
    "runs": {
        "run_uuid",
        "name",
        "status",
        "start_time",
        "end_time",
        "lifecycle_stage",
        "artifact_uri",
        "experiment_id",
    },
    "tags": {"key", "value", "run_uuid"},
    "params": {"key", "value", "run_uuid"},
    "latest_metrics": {"key", "value", "timestamp", "step", "is_nan", "run_uuid"},
    "metrics": {"key", "value", "timestamp", "step", "is_nan", "run_uuid"},
    "experiments": {"experiment_id", "name", "lifecycle_stage"},
}
_CHUNK = 900  # sqlite's default limit on bound parameters is 999


def _tracking_uri(client) -> str:
    uri = getattr(client, "hfbench_uri", None)  # reports.build's LazyClient: without making its client
    if uri is not None:
        return str(uri)
    tc = getattr(client, "_tracking_client", None)
    return str(getattr(tc, "tracking_uri", "") or "")


def open_store(client) -> SqliteRuns | None:
    """The fast reader for this client's store, None when it is not a sqlite file with MLflow's
    tables."""
    uri = _tracking_uri(client)
    if not uri.startswith("sqlite:///"):
        return None
    path = Path(uri[len("sqlite:///") :].split("?", 1)[0])
    if not path.is_file():
        return None
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        for table, cols in _NEEDED.items():
            have = {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
            if not cols <= have:
                con.close()
                return None
    except sqlite3.Error:
        return None
    return SqliteRuns(con)


def _value(value: float, is_nan: int) -> float:
    return math.nan if is_nan else float(value)


class SqliteRuns:
    def __init__(self, con: sqlite3.Connection):
        self.con = con

    def experiment(self, name_or_id: str) -> SimpleNamespace | None:
        """An experiment by name (or, failing that, by id, as the UI shows them), like MLflow's."""
        row = self.con.execute(
            "SELECT experiment_id, name, lifecycle_stage FROM experiments WHERE name = ?", (name_or_id,)
        ).fetchone()
        if row is None and name_or_id.isdigit():
            row = self.con.execute(
                "SELECT experiment_id, name, lifecycle_stage FROM experiments WHERE experiment_id = ?",
                (int(name_or_id),),
            ).fetchone()
        if row is None:
            return None
        return SimpleNamespace(experiment_id=str(row[0]), name=row[1], lifecycle_stage=row[2])

    def runs(self, experiment_id: str, newest_first: bool = False) -> list[SimpleNamespace]:
        """The experiment's active runs, oldest first (or newest first), shaped like MLflow's Run
        (info, data)."""
        order = "DESC" if newest_first else "ASC"
        rows = self.con.execute(
            "SELECT run_uuid, name, status, start_time, end_time, artifact_uri FROM runs "
            f"WHERE experiment_id = ? AND lifecycle_stage = 'active' ORDER BY start_time {order}, run_uuid {order}",
            (int(experiment_id),),
        ).fetchall()
        ids = [r[0] for r in rows]
        tags: dict[str, dict[str, str]] = defaultdict(dict)
        params: dict[str, dict[str, str]] = defaultdict(dict)
        metrics: dict[str, dict[str, float]] = defaultdict(dict)
        for chunk in _chunks(ids):
            marks = ",".join("?" * len(chunk))
            for rid, k, v in self.con.execute(
                f"SELECT run_uuid, key, value FROM tags WHERE run_uuid IN ({marks})", chunk
            ):
                tags[rid][k] = v
            for rid, k, v in self.con.execute(
                f"SELECT run_uuid, key, value FROM params WHERE run_uuid IN ({marks})", chunk
            ):
                params[rid][k] = v
            for rid, k, v, nan in self.con.execute(
                f"SELECT run_uuid, key, value, is_nan FROM latest_metrics WHERE run_uuid IN ({marks})", chunk
            ):
                metrics[rid][k] = _value(v, nan)
        return [
            SimpleNamespace(
                info=SimpleNamespace(
                    run_id=rid,
                    run_name=name or "",
                    status=status,
                    start_time=start,
                    end_time=end,
                    artifact_uri=art or "",
                ),
                data=SimpleNamespace(tags=tags[rid], params=params[rid], metrics=metrics[rid]),
            )
            for rid, name, status, start, end, art in rows
        ]

    def histories(self, run_ids: Iterable[str], key: str) -> dict[str, list[tuple[int, int, float]]]:
        """run id -> every (step, timestamp, value) logged under `key`."""
        out: dict[str, list[tuple[int, int, float]]] = {r: [] for r in run_ids}
        for chunk in _chunks(list(out)):
            marks = ",".join("?" * len(chunk))
            for rid, step, ts, v, nan in self.con.execute(
                f"SELECT run_uuid, step, timestamp, value, is_nan FROM metrics WHERE key = ? AND run_uuid IN ({marks})",
                [key, *chunk],
            ):
                out[rid].append((step, ts, math.nan if nan else v))
        return out


def _chunks(ids: list[str]) -> Iterable[list[str]]:
    for i in range(0, len(ids), _CHUNK):
        yield ids[i : i + _CHUNK]
