"""A run's MLflow calls on local disk first: the Spool (a write-ahead log next to the run's
checkpoints), its delivery to the server in order (`deliver`, `apply`), and `sync`, which sends
what runs left behind while the server was down (`hfbench sync`)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from suite.tracking import client, redact


class Spool:
    """Write-ahead log of a run's MLflow calls, on local disk next to its checkpoints.

    Every call is appended here first (one JSON line, fsynced), then delivered in order; a
    cursor file records how many lines the server has. While the server is unreachable the
    calls wait here and training goes on; they are delivered at the next call once it
    answers again, or later by `hfbench sync`. Replaying a line twice is harmless: metrics
    carry their own timestamp and step (MLflow ignores an identical metric), params are
    re-logged with the same value, tags and artifacts are overwritten, so nothing is lost or
    duplicated whichever way a process dies."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.path = self.dir / "mlflow_spool.jsonl"
        self.cursor = self.dir / "mlflow_spool.pos"
        self.files = self.dir / "mlflow_spool_files"
        self._delivered = 0  # this process's cursor, for when the disk cannot take the file's

    def append(self, rec: dict) -> None:

        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():  # a line cut short by a crash mid-append: end it, so it stays one bad line
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write((json.dumps(rec) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())

    def keep_file(self, text: str, name: str) -> str:
        """A copy of an artifact's content that lives until it is delivered."""
        d = self.files / f"{time.time_ns()}"
        d.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text)
        return str(d / name)

    def pending(self) -> tuple[list[dict], int]:

        if not self.path.is_file():
            return [], 0
        lines = self.path.read_text().splitlines()
        pos = int(self.cursor.read_text().strip() or 0) if self.cursor.is_file() else 0
        pos = max(pos, self._delivered)
        recs = []
        for ln in lines[pos:]:
            try:
                recs.append(json.loads(ln))
            except ValueError:  # a line cut short by a crash while appending: that call never
                recs.append({"op": "skip"})  # completed; passed over, the calls after it still go
        return recs, pos

    def advance(self, pos: int) -> None:
        """Record that the server has the first `pos` lines. On a full disk the cursor file
        keeps its old value and this process remembers the new one: delivery goes on (a later
        process may replay some lines, which is harmless), instead of the run's logging being
        held back as if the server were down."""
        self._delivered = pos
        tmp = self.cursor.with_name(self.cursor.name + ".tmp")
        try:
            tmp.write_text(str(pos))
            os.replace(tmp, self.cursor)
        except OSError:  # a full disk: no partial file left behind
            tmp.unlink(missing_ok=True)

    def clear(self) -> None:
        import shutil

        for p in (self.path, self.cursor):
            p.unlink(missing_ok=True)
        self._delivered = 0
        shutil.rmtree(self.files, ignore_errors=True)


# MLflow error codes that mean "the server answered and refuses this call" (it will refuse it
# again); anything else (no answer, a 5xx, a timeout) is an outage and the call stays pending.
REJECTED = {
    "INVALID_PARAMETER_VALUE",
    "BAD_REQUEST",
    "INVALID_STATE",
    "MALFORMED_REQUEST",
    "RESOURCE_ALREADY_EXISTS",
    "ENDPOINT_NOT_FOUND",  # a server older than the call (e.g. no dataset inputs): set aside, not waited for
}
# RESOURCE_DOES_NOT_EXIST is not among them: a server that does not know the run is the wrong
# store (or the run was deleted), and the calls wait for the right one instead of being set aside.


def rejected(e: BaseException) -> bool:
    return getattr(e, "error_code", None) in REJECTED


def deliver(c, run_id: str, spool: Spool, say=print) -> int:
    """Send the spool's pending calls in order; returns how many were sent. Raises on the
    first call the server does not answer (the rest stay pending). A call the server answers
    with a refusal (e.g. a param whose value differs from the one the run already has) is
    set aside in mlflow_spool.rejected.jsonl and reported, and delivery goes on: retrying it
    would fail forever and hold back everything after it. Clears the spool once the run's
    terminal status is delivered."""
    recs, pos = spool.pending()
    sent = 0
    for rec in recs:
        try:
            apply(c, run_id, rec)
        except Exception as e:
            if not rejected(e):
                raise
            _apply_piecewise(c, run_id, rec, spool, say)
        sent += 1
        spool.advance(pos + sent)
    if recs and recs[-1]["op"] == "terminate":
        spool.clear()
    return sent


def _apply_piecewise(c, run_id: str, rec: dict, spool: Spool, say) -> None:
    """A refused call: send what the server takes one piece at a time, set the rest aside."""

    pieces = [rec]
    if rec["op"] == "batch":
        pieces = (
            [{"op": "batch", "metrics": rec.get("metrics", []), "tags": rec.get("tags", [])}]
            if rec.get("metrics") or rec.get("tags")
            else []
        )
        pieces += [{"op": "batch", "params": [p]} for p in rec.get("params", [])]
    for piece in pieces:
        try:
            apply(c, run_id, piece)
        except Exception as e:
            if not rejected(e):
                raise
            why = f"{getattr(e, 'error_code', type(e).__name__)}: {str(e)[:300]}"
            with open(spool.dir / "mlflow_spool.rejected.jsonl", "a") as f:
                f.write(json.dumps({"run_id": run_id, "call": piece, "reason": why}) + "\n")
            say(
                f"[hfbench] WARNING: MLflow refused a call for run {run_id} ({why}); set aside in "
                f"{spool.dir / 'mlflow_spool.rejected.jsonl'}",
                flush=True,
            )


def apply(c, run_id: str, rec: dict) -> None:
    """Send one spooled call."""
    from mlflow.entities import Metric, Param, RunTag

    op = rec["op"]
    if op == "skip":
        return
    if op == "batch":
        c.log_batch(
            run_id,
            metrics=[Metric(k, v, ts, st) for k, v, ts, st in rec.get("metrics", [])],
            params=[Param(k, v) for k, v in rec.get("params", [])],
            tags=[RunTag(k, v) for k, v in rec.get("tags", [])],
        )
    elif op == "artifact":
        c.log_artifact(run_id, rec["file"])
    elif op == "input":  # a dataset (suite/run_schema.py dataset_input)
        from mlflow.entities import Dataset, DatasetInput, InputTag

        d = rec["dataset"]
        ds = Dataset(d["name"], d["digest"], d["source_type"], d["source"], profile=d["profile"])
        c.log_inputs(run_id, datasets=[DatasetInput(ds, tags=[InputTag("mlflow.data.context", d["context"])])])
    elif op == "terminate":
        c.set_terminated(run_id, status=rec["status"], end_time=rec.get("end_time"))
    else:
        raise ValueError(f"unknown spooled call {op!r}")


def _closing_calls() -> list[dict]:
    """The calls that close an attempt which died without a status: its reason, then FAILED."""
    return [
        {
            "op": "batch",
            "tags": [["hfbench.error", "the attempt ended without a status (killed?); a new attempt replaced it"]],
        },
        {"op": "terminate", "status": "FAILED", "end_time": int(time.time() * 1000)},
    ]


def sync(paths: list[Path], uri_for=None, say=print) -> tuple[int, int]:
    """Deliver every spool found under `paths` (run folders or folders of them). Returns
    (runs delivered, runs still pending). The run id and URI come from the spool's meta file."""

    done = left = 0
    for root in paths:
        for spool_file in sorted(Path(root).rglob("mlflow_spool.jsonl")):
            meta_p = spool_file.with_name("mlflow_spool.meta.json")
            if not meta_p.is_file():
                say(f"[hfbench] {spool_file}: no meta file (run id, tracking URI); skipped")
                left += 1
                continue
            try:
                meta = json.loads(meta_p.read_text())
                uri = uri_for(meta) if uri_for else meta["uri"]
                meta["run_id"]
            except (ValueError, KeyError, TypeError) as e:
                say(f"[hfbench] {meta_p}: unreadable meta file ({type(e).__name__}: {e}); kept, skipped")
                left += 1
                continue
            spool = Spool(spool_file.parent)
            try:
                n = deliver(client(uri), meta["run_id"], spool, say=say)
            except Exception as e:
                say(
                    f"[hfbench] {spool_file}: MLflow at {redact(uri)} refused or unreachable "
                    f"({type(e).__name__}: {str(e)[:200]}); kept"
                )
                left += 1
                continue
            say(f"[hfbench] {spool_file.parent}: delivered {n} calls to run {meta['run_id']}")
            done += 1
    return done, left
