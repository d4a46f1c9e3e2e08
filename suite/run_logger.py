"""Logging one training run to MLflow: RunLogger on rank 0 (every call spooled on local disk
first, so a server outage loses nothing), NullLogger on the other ranks."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from suite.mlflow_spool import Spool, _closing_calls, apply, deliver
from suite.run_schema import mlflow_key
from suite.tracking import TAG_HASH, client, git_commit, redact, sweep_parent


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
                self.logged_upto = max(  # under either name: a run begun before the metric groups
                    (
                        m.step
                        for k in sorted({mlflow_key("train_loss"), "train_loss"})
                        for m in self.c.get_metric_history(run_id, k)
                    ),
                    default=0,
                )
            except Exception:
                pass
        self.run_id = run_id

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
