"""MLflow tracking: experiments created once (by the launcher), runs identified by their
config hash, params/metrics/artifacts logged by rank 0 only.

The run schema (which tags, params, metric names and files a run has) is in suite/run_schema.py.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Optional

from suite.run_schema import environment as environment  # the engine's and benchmark's entry point

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
    rid = sweep_parent(c, experiment_id, sweep)
    tags = {**tags, "mlflow.note.content": description}
    if rid:
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


def redact(uri: str) -> str:
    """The URI without a password, for printing."""
    import re

    return re.sub(r"//([^:/@]+):[^@/]+@", r"//\1:***@", uri)
