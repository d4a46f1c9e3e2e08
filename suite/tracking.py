"""MLflow tracking: experiments created once (by the launcher), runs identified by their
config hash, params/metrics/artifacts logged by rank 0 only.

The run schema (which tags, params, metric names and files a run has) is in suite/run_schema.py.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from suite.run_schema import environment as environment  # the engine's and benchmark's entry point
from suite.run_schema import mlflow_key

TAG_HASH = "hfbench.run_hash"


def default_uri() -> str:
    """HFBENCH_MLFLOW_URI, else MLFLOW_TRACKING_URI, else a sqlite file in the working dir."""
    return (
        os.environ.get("HFBENCH_MLFLOW_URI")
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    )


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer in time (named in the message)."""


class TrackingRefused(RuntimeError):
    """The tracking server answered and refused us (no or wrong credentials)."""


class bounded:
    """Within this block, every MLflow HTTP call gives up after `timeout_s` seconds, without
    MLflow's own retries (minutes by default): `call` runs a tracking call and turns a timeout or
    refused connection into TrackingUnavailable naming the URI. The previous settings are
    restored on exit (training tasks keep their own)."""

    KEYS = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")

    def __init__(self, uri: str, timeout_s: float):
        self.uri, self.timeout_s = uri, timeout_s

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.KEYS}
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, int(self.timeout_s)))
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        return self

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        return False

    def call(self, fn, *args, what: str = "tracking call"):
        t0 = time.time()
        try:
            return fn(*args)
        except Exception as e:  # requests' timeouts and connection errors, wrapped by MLflow
            if getattr(e, "error_code", None) in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
                who = os.environ.get("MLFLOW_TRACKING_USERNAME")
                raise TrackingRefused(
                    f"the MLflow server at {redact(self.uri)} refused the {what}: "
                    + (
                        f"user {who!r} is not allowed ({e.error_code}); check MLFLOW_TRACKING_USERNAME / "
                        f"MLFLOW_TRACKING_PASSWORD"
                        if who
                        else "it requires a user and password; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
                        "(scripts/services.sh writes them into its env.sh when it starts the server with "
                        "HFBENCH_MLFLOW_AUTH=1)"
                    )
                ) from None
            text = f"{type(e).__name__}: {e}"
            if any(w in text.lower() for w in ("timed out", "timeout", "connection", "max retries")):
                raise TrackingUnavailable(
                    f"the MLflow server at {redact(self.uri)} did not answer the {what} within "
                    f"{self.timeout_s:g} s ({time.time() - t0:.0f} s spent); is it up? "
                    f"(launcher.tracking_timeout_s sets the limit)"
                ) from None
            raise


# MLflow's sqlite store logs its table creation and migrations at INFO on every new store: quiet
# for every client this process makes (set on import, before MLflow configures its loggers)
for _name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _sqlite_path(uri: str) -> Optional[Path]:
    return Path(uri[len("sqlite:///") :].split("?", 1)[0]) if uri.startswith("sqlite:///") else None


def store_exists(uri: str) -> bool:
    """False only for a sqlite store whose file does not exist (a server or folder may hold runs)."""
    path = _sqlite_path(uri)
    return path is None or path.exists()


def require_store(uri: str) -> None:
    """For commands that only read: a sqlite store that does not exist is named, not created
    (MLflow would create an empty mlflow.db wherever the command was typed)."""
    path = _sqlite_path(uri)
    if path is not None and not path.exists():
        raise FileNotFoundError(
            f"no MLflow store at {path}: nothing was tracked there (run the sweep first, or point "
            f"--tracking-uri at the store it wrote)"
        )


# MLflow 3's UI opens an experiment on its GenAI traces view unless the experiment says it holds
# model training runs
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def ensure_experiment(uri: str, name: str, description: str | None = None) -> str:
    """Create the experiment if needed (call once, before any job starts); return its id. It is
    marked as holding training runs (the UI opens on them), and `description` becomes its note
    when it has none yet."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            exp_id = c.create_experiment(name, tags=dict([EXPERIMENT_KIND]))
        except Exception:  # created meanwhile by someone else
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
        else:
            if description:
                c.set_experiment_tag(exp_id, "mlflow.note.content", description)
            return exp_id
    if exp.lifecycle_stage == "deleted":
        raise RuntimeError(f"MLflow experiment {name!r} exists but is deleted; restore it or pick another name")
    if EXPERIMENT_KIND[0] not in exp.tags:
        c.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    if description and "mlflow.note.content" not in exp.tags:
        c.set_experiment_tag(exp.experiment_id, "mlflow.note.content", description)
    return exp.experiment_id


TAG_SWEEP_PARENT = "hfbench.sweep_parent"  # on the parent run of a sweep: the sweep's name


def ensure_sweep_run(uri: str, experiment_id: str, sweep: str, description: str, tags: dict[str, str]) -> str:
    """The sweep's parent run in the experiment (made on its first launch, reused after): it
    holds no training, only the sweep's description and grid as tags, and its training runs
    name it as their parent (mlflow.parentRunId), so the UI nests them under it. It is closed
    as FINISHED at once: it is a folder, not a job."""
    c = client(uri)
    found = c.search_runs([str(experiment_id)], filter_string=f"tags.`{TAG_SWEEP_PARENT}` = '{sweep}'", max_results=1)
    tags = {**tags, "mlflow.note.content": description}
    if found:
        rid = found[0].info.run_id
        for k, v in tags.items():  # the grid may have grown since the first launch
            c.set_tag(rid, k, v[:5000])
        return rid
    run = c.create_run(
        str(experiment_id),
        run_name=f"sweep {sweep}",
        tags={**{k: v[:5000] for k, v in tags.items()}, TAG_SWEEP_PARENT: sweep, "mlflow.source.name": "hfbench"},
    )
    c.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


def sweep_parent(c, experiment_id: str, sweep: str) -> Optional[str]:
    """The id of the sweep's parent run, None when it has none (a run trained on its own)."""
    if not sweep or "'" in sweep:
        return None
    found = c.search_runs([str(experiment_id)], filter_string=f"tags.`{TAG_SWEEP_PARENT}` = '{sweep}'", max_results=1)
    return found[0].info.run_id if found else None


def runs_by_hash(uri: str, experiment_id: str) -> dict[str, list]:
    """run hash -> MLflow runs carrying that hash, newest first."""
    c = client(uri)
    out: dict[str, list] = {}
    token = None
    while True:
        page = c.search_runs(
            [experiment_id], max_results=5000, page_token=token, order_by=["attributes.start_time DESC"]
        )
        for r in page:
            h = r.data.tags.get(TAG_HASH)
            if h:
                out.setdefault(h, []).append(r)
        token = page.token
        if not token:
            break
    return out


def training_runs(c, experiment_id: str, **search) -> list:
    """The experiment's training runs (those with a run hash): not a sweep's parent run."""
    return [r for r in c.search_runs([str(experiment_id)], **search) if r.data.tags.get(TAG_HASH)]


def finished_hashes(uri: str, experiment_id: str) -> set[str]:
    return {h for h, runs in runs_by_hash(uri, experiment_id).items() if any(r.info.status == "FINISHED" for r in runs)}


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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

    def append(self, rec: dict) -> None:
        import json

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
        import json

        if not self.path.is_file():
            return [], 0
        lines = self.path.read_text().splitlines()
        pos = int(self.cursor.read_text().strip() or 0) if self.cursor.is_file() else 0
        recs = []
        for ln in lines[pos:]:
            try:
                recs.append(json.loads(ln))
            except ValueError:  # a line cut short by a crash while appending: that call never
                recs.append({"op": "skip"})  # completed; passed over, the calls after it still go
        return recs, pos

    def advance(self, pos: int) -> None:
        tmp = self.cursor.with_name(self.cursor.name + ".tmp")
        try:
            tmp.write_text(str(pos))
            os.replace(tmp, self.cursor)
        except OSError:  # a full disk: no partial file left behind
            tmp.unlink(missing_ok=True)
            raise

    def clear(self) -> None:
        import shutil

        for p in (self.path, self.cursor):
            p.unlink(missing_ok=True)
        shutil.rmtree(self.files, ignore_errors=True)


# MLflow error codes that mean "the server answered and refuses this call" (it will refuse it
# again); anything else (no answer, a 5xx, a timeout) is an outage and the call stays pending.
REJECTED = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "INVALID_STATE", "MALFORMED_REQUEST", "RESOURCE_ALREADY_EXISTS"}
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
    import json

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


class RunLogger:
    """Logs one training run. Only rank 0 makes one; other ranks get a NullLogger.

    Creating the run needs the server (retried for up to `connect_s`); after that every call
    goes through the run's Spool, so an MLflow outage during training loses nothing."""

    RETRY_S = 15.0  # while the server is down, try again at most this often
    FINISH_WAITS = (0, 5, 10, 20)  # s: a restarting server gets this long before `hfbench sync` is left to it

    def __init__(
        self,
        uri: str,
        experiment_id: str,
        cfg,
        run_id: Optional[str] = None,
        spool_dir: Optional[Path] = None,
        connect_s: float = 120.0,
        say=print,
    ):
        # fail fast inside MLflow (its default is minutes of retries per call) and retry here
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.c = client(uri)
        self.uri = uri
        self.cfg = cfg
        self.say = say
        self.spool = Spool(spool_dir if spool_dir is not None else Path(tempfile.mkdtemp(prefix="hfbench-spool-")))
        self._down_since: Optional[float] = None
        self._next_try = 0.0
        self._settle_previous(run_id, connect_s)
        if run_id is None:
            tags = {
                TAG_HASH: cfg.run_hash(),
                "hfbench.method": cfg.method,
                "hfbench.variant": cfg.variant(),
                **({"hfbench.run_dir": str(Path(spool_dir).resolve())} if spool_dir is not None else {}),
                "hfbench.model": cfg.model,
                "hfbench.dataset": cfg.dataset,
                "hfbench.sweep": cfg.sweep,
                "mlflow.runName": cfg.run_name(),
                "mlflow.source.name": "hfbench",
                "mlflow.source.type": "JOB",
            }
            commit = git_commit().split("+")[0]
            if (
                commit and commit != "unknown"
            ):  # MLflow's own place for the commit (the UI shows it); dirty trees say so in env.git_commit
                tags["mlflow.source.git.commit"] = commit
            deadline = time.time() + connect_s
            while True:
                try:
                    parent = sweep_parent(self.c, experiment_id, cfg.sweep)
                    if parent:  # the UI nests the run under its sweep
                        tags["mlflow.parentRunId"] = parent
                    run = self.c.create_run(experiment_id, tags=tags, run_name=cfg.run_name())
                    break
                except Exception as e:
                    if time.time() > deadline:
                        raise RuntimeError(
                            f"MLflow at {redact(uri)} did not answer for {connect_s:.0f} s; "
                            f"the run was not started: {type(e).__name__}: {e}"
                        ) from None
                    time.sleep(5)
            run_id = run.info.run_id
            self._params = {**cfg.flat_params(), "config_hash": cfg.run_hash()}
        else:
            self._params = {}
            self._resumed = True
            try:  # the last epoch this run has on the server: a resume from an older checkpoint
                self.logged_upto = max(
                    (m.step for m in self.c.get_metric_history(run_id, mlflow_key("train_loss"))), default=0
                )
            except Exception:
                pass
        self.run_id = run_id
        import json

        self.spool.dir.mkdir(parents=True, exist_ok=True)
        (self.spool.dir / "mlflow_spool.meta.json").write_text(
            json.dumps({"run_id": run_id, "uri": uri, "experiment_id": experiment_id})
        )
        self.flush(force=True)  # calls a previous segment of this run left behind

    def _settle_previous(self, keep: Optional[str], connect_s: float) -> None:
        """A spool left in this folder by another MLflow run (an attempt that failed or was
        killed while the server was down, rerun without `hfbench sync`) belongs to that run:
        deliver it there and give that run its terminal status (FAILED if the attempt died
        without one) before this attempt logs anything. Without the server this attempt does
        not start, so nothing ends up in the wrong run."""
        import json

        meta_p = self.spool.dir / "mlflow_spool.meta.json"
        if not meta_p.is_file():
            return
        try:
            old = json.loads(meta_p.read_text()).get("run_id")
        except ValueError:
            return
        if not old or old == keep:
            return  # the same run continues: its pending calls are its own
        if not self.spool.path.is_file():  # all delivered; but a killed attempt never sent its status
            try:
                if self.c.get_run(old).info.status == "RUNNING":
                    for rec in _closing_calls():
                        apply(self.c, old, rec)
                    self.say(
                        f"[hfbench] the previous attempt (MLflow run {old}) ended without a status; marked it FAILED",
                        flush=True,
                    )
            except Exception:
                pass  # best effort: the new attempt does not depend on it
            return
        recs, _ = self.spool.pending()
        terminated = bool(recs) and recs[-1]["op"] == "terminate"
        if not terminated:  # it died without a status: close it as FAILED, saying why
            for rec in _closing_calls():
                self.spool.append(rec)
        deadline = time.time() + connect_s
        while True:
            try:
                n = deliver(self.c, old, self.spool, say=self.say)  # refusals are set aside, not fatal
                break
            except Exception as e:
                if time.time() > deadline:
                    raise RuntimeError(
                        f"the previous attempt of this run (MLflow run {old}) left logging in {self.spool.path} "
                        f"and MLflow at {redact(self.uri)} did not take it for {connect_s:.0f} s ({type(e).__name__}: "
                        f"{str(e)[:200]}); this attempt was not started. Deliver it with "
                        f"`hfbench sync {self.spool.dir}` or rerun when the server answers"
                    ) from None
                time.sleep(5)
        self.say(
            f"[hfbench] delivered {n} calls the previous attempt (MLflow run {old}) left behind, to that run"
            + ("" if terminated else "; marked it FAILED (it ended without a status)"),
            flush=True,
        )

    # every call: spool first, then try to deliver what is pending
    def _push(self, rec: dict, force: bool = False) -> None:
        try:
            self.spool.append(rec)
        except OSError as e:  # the run folder's disk is full (or gone): send it straight
            self._direct(rec, e)
            return
        self.flush(force=force)

    def _direct(self, rec: dict, why: OSError) -> None:
        if not getattr(self, "_warned_spool", False):
            self._warned_spool = True
            self.say(
                f"[hfbench] WARNING: cannot write the MLflow spool in {self.spool.dir} ({why}); "
                f"logging straight to the server",
                flush=True,
            )
        self.flush(force=True)
        try:
            apply(self.c, self.run_id, rec)
        except Exception as e:
            self.say(
                f"[hfbench] WARNING: MLflow call lost: neither the spool nor the server took it "
                f"({type(e).__name__}: {e})",
                flush=True,
            )

    def flush(self, force: bool = False) -> bool:
        """Deliver pending calls; False (and they stay on disk) if the server does not answer."""
        if not force and time.time() < self._next_try:
            return False
        try:
            n = deliver(self.c, self.run_id, self.spool, say=self.say)
        except Exception as e:
            if self._down_since is None:
                self._down_since = time.time()
                self.say(
                    f"[hfbench] MLflow at {redact(self.uri)} unreachable ({type(e).__name__}); training goes "
                    f"on and its logging waits in {self.spool.path}",
                    flush=True,
                )
            self._next_try = time.time() + self.RETRY_S
            return False
        if self._down_since is not None:
            self.say(
                f"[hfbench] MLflow answers again after {time.time() - self._down_since:.0f} s; "
                f"delivered {n} buffered calls",
                flush=True,
            )
            self._down_since = None
        return True

    def log_params(self, extra: dict[str, Any]) -> None:
        params = {**self._params, **{k: str(v) for k, v in extra.items()}}
        items = [[k, v[:6000]] for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._push({"op": "batch", "params": items[i : i + 100]})
        self._params = {}

    logged_upto = 0  # epochs (steps) of per-epoch metrics already on the server when this process began

    def log_metrics(self, metrics: dict[str, float], step: int, ts: Optional[int] = None) -> None:
        if "train_loss" in metrics and step <= self.logged_upto:
            return  # trained again after a fallback to an older checkpoint: the first record stands
        ts = int(time.time() * 1000) if ts is None else ts
        self._push({"op": "batch", "metrics": [[mlflow_key(k), float(v), ts, step] for k, v in metrics.items()]})

    def log_text(self, text: str, name: str) -> None:
        try:
            kept = self.spool.keep_file(text, name)
        except OSError:  # disk full where the run lives: a copy in the system temp folder
            d = Path(tempfile.mkdtemp(prefix="hfbench-artifact-"))
            (d / name).write_text(text)
            kept = str(d / name)
        self._push({"op": "artifact", "file": kept})

    def set_tag(self, key: str, value: str) -> None:
        self.set_tags({key: value})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._push({"op": "batch", "tags": [[k, str(v)[:5000]] for k, v in tags.items()]})

    def log_input(self, dataset: dict) -> None:
        """A dataset the run reads (suite/run_schema.py dataset_input)."""
        self._push({"op": "input", "dataset": dataset})

    _resumed = False  # this process continues an MLflow run an earlier attempt started

    def finish(self, status: str = "FINISHED", error: Optional[str] = None) -> None:
        if error:
            self.set_tag("hfbench.error", error)
        elif status == "FINISHED" and self._resumed:
            self.set_tag("hfbench.error", "")  # an earlier attempt's failure is not this run's outcome
        rec = {"op": "terminate", "status": status, "end_time": int(time.time() * 1000)}
        try:
            self.spool.append(rec)
        except OSError as e:
            self._direct(rec, e)
            return
        for wait in self.FINISH_WAITS:
            time.sleep(wait)
            if self.flush(force=True):
                return
        self.say(
            f"[hfbench] MLflow still unreachable: this run's logging is kept in {self.spool.path}; "
            f"deliver it with `hfbench sync {self.spool.dir}`",
            flush=True,
        )


def sync(paths: list[Path], uri_for=None, say=print) -> tuple[int, int]:
    """Deliver every spool found under `paths` (run folders or folders of them). Returns
    (runs delivered, runs still pending). The run id and URI come from the spool's meta file."""
    import json

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


def run_in_store(uri: str, run_id: Optional[str], experiment_id: str) -> bool:
    """Whether MLflow run `run_id` exists in this store under this experiment. A run folder
    can outlive its store or be reused by another experiment (same out_dir, same run hash):
    its done marker and checkpoint then belong to a run this experiment does not have. True
    when the server does not answer (an outage is no reason to train again)."""
    if not run_id:
        return False
    try:
        return str(client(uri).get_run(run_id).info.experiment_id) == str(experiment_id)
    except Exception as e:
        return getattr(e, "error_code", None) not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def end_orphaned_runs(
    uri: str, experiment_id: str, run_hash: str, run_dir: Path, status: str, reason: str
) -> list[str]:
    """End the MLflow runs of this hash trained into `run_dir` that are still RUNNING although
    their task is gone (cancelled, killed, out of memory): status KILLED or FAILED, with the
    reason in hfbench.error. Runs of the same hash trained into other folders are not touched.
    Best effort: returns the run ids it ended."""
    ended = []
    try:
        c = client(uri)
        runs = c.search_runs(
            [str(experiment_id)],
            max_results=50,
            filter_string=f"tags.`{TAG_HASH}` = '{run_hash}' and attributes.status = 'RUNNING'",
        )
        for run in runs:
            if run.data.tags.get("hfbench.run_dir") not in (None, str(Path(run_dir).resolve())):
                continue
            c.set_tag(run.info.run_id, "hfbench.error", reason[:5000])
            c.set_terminated(run.info.run_id, status=status)
            ended.append(run.info.run_id)
    except Exception:
        pass
    return ended


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True


class Claim:
    """One training per run hash per experiment, whatever folder a sweep trains into.

    The run folder's lock keeps two processes of one out_dir apart; two sweeps with different
    out_dirs share only the tracking store. The claim is a registered model named after the
    experiment and the run hash: MLflow creates a name once (the second create is refused),
    on a server and in a sqlite store alike, so exactly one process holds it. The holder
    records its run folder and MLflow run; others wait while that run is RUNNING and reuse
    it once FINISHED. The holder drops the claim when its run ends (finished or failed), not
    when it is preempted, so a requeued run keeps it. A claim whose run FAILED or was KILLED,
    or that never named a run within `stale_s`, is taken over."""

    def __init__(
        self,
        uri: str,
        experiment_id: str,
        run_hash: str,
        owner: str,
        say=print,
        poll_s: float = 10.0,
        stale_s: float = 600.0,
    ):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # as RunLogger: fail fast, decide here
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.c = client(uri)
        self.uri, self.experiment_id, self.hash, self.owner = uri, str(experiment_id), run_hash, owner
        self.name = f"hfbench-claim-{experiment_id}-{run_hash}"
        self.say, self.poll_s, self.stale_s = say, poll_s, stale_s
        self.held = False

    def finished_run(self):
        """A FINISHED run of this hash trained into another folder (this folder's own finished
        run is this folder's business: the engine came here because it lacks something)."""
        runs = self.c.search_runs(
            [self.experiment_id],
            max_results=20,
            filter_string=f"tags.`{TAG_HASH}` = '{self.hash}' and attributes.status = 'FINISHED'",
        )
        return next((r for r in runs if r.data.tags.get("hfbench.run_dir") != self.owner), None)

    def acquire(self):
        """Hold the claim (returns None), or return the FINISHED MLflow run of this hash that
        another folder trained. Waits while another folder's attempt is running."""
        from mlflow.exceptions import MlflowException

        told = 0.0
        while True:
            try:
                done = self.finished_run()
            except Exception as e:  # no answer: the run logger's own connect wait decides what happens next
                self.say(
                    f"[hfbench] WARNING: could not check the run claim at {redact(self.uri)} "
                    f"({type(e).__name__}); only the run folder's lock keeps trainings apart",
                    flush=True,
                )
                return None
            if done is not None:
                return done
            try:
                self.c.create_registered_model(
                    self.name,
                    tags={
                        "owner": self.owner,
                        "host": socket.gethostname(),
                        "pid": str(os.getpid()),
                        "since": str(time.time()),
                    },
                    description=f"hfbench: run {self.hash} of experiment {self.experiment_id} is being trained "
                    f"into {self.owner}. Dropped when that run ends.",
                )
                self.held = True
                return self.finished_run()  # finished just before the claim was taken: reuse it
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    self.say(
                        f"[hfbench] WARNING: run claims unavailable at {redact(self.uri)} "
                        f"({e.error_code}); only the run folder's lock keeps trainings apart",
                        flush=True,
                    )
                    return None
            try:
                m = self.c.get_registered_model(self.name)
            except MlflowException:
                continue  # dropped meanwhile: try again
            tags = m.tags or {}
            if tags.get("owner") == self.owner:
                self.held = True  # this folder's own claim (a requeued or rerun attempt; the folder lock is ours)
                return None
            run_id = tags.get("run_id")
            status = None
            if run_id:
                try:
                    status = self.c.get_run(run_id).info.status
                except MlflowException:
                    status = "KILLED"  # the run it named is gone
            age = time.time() - float(tags.get("since", "0") or 0)
            if tags.get("host") == socket.gethostname() and not _alive(tags.get("pid", "")):
                status = status if status in ("FAILED", "KILLED") else "KILLED"  # its process is gone
            if status in ("FAILED", "KILLED") or (status is None and age > self.stale_s):
                try:  # drop it only if it is still the one judged stale (another taker may have replaced it)
                    if (self.c.get_registered_model(self.name).tags or {}).get("since") == tags.get("since"):
                        self.say(
                            f"[hfbench] run {self.hash}: taking over a stale claim of {tags.get('owner')} "
                            f"(its run {run_id or 'never started'}, {status or 'no status'})",
                            flush=True,
                        )
                        self._drop()
                except MlflowException:
                    pass
                continue
            if time.time() - told > 600:
                told = time.time()
                self.say(
                    f"[hfbench] run {self.hash} is being trained by another sweep into {tags.get('owner')} "
                    f"(host {tags.get('host')}, MLflow run {run_id or 'starting'}); waiting for it instead of "
                    f"training it twice. If that process is gone for good, delete the registered model "
                    f"{self.name!r} in MLflow",
                    flush=True,
                )
            time.sleep(self.poll_s)

    def set_run(self, run_id: str) -> None:
        if self.held:
            try:
                self.c.set_registered_model_tag(self.name, "run_id", run_id)
            except Exception as e:
                self.say(f"[hfbench] WARNING: could not record run {run_id} in claim {self.name}: {e}", flush=True)

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                self._drop()
            except Exception as e:  # a claim left behind names a run that ended: the next claimant takes it over
                self.say(f"[hfbench] WARNING: could not drop claim {self.name}: {type(e).__name__}", flush=True)

    def _drop(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.c.delete_registered_model(self.name)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise


class NullLogger:
    run_id = None

    def log_params(self, *a, **k):
        pass

    def log_metrics(self, *a, **k):
        pass

    def log_text(self, *a, **k):
        pass

    def set_tag(self, *a, **k):
        pass

    def set_tags(self, *a, **k):
        pass

    def log_input(self, *a, **k):
        pass

    def finish(self, *a, **k):
        pass


def redact(uri: str) -> str:
    """The URI without a password, for printing."""
    import re

    return re.sub(r"//([^:/@]+):[^@/]+@", r"//\1:***@", uri)
