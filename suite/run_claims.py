"""Run claims: one config trains once per experiment, whatever the sweeps, folders or reruns
that ask for it (a claim is an MLflow registered model named after the run hash)."""

from __future__ import annotations

import os
import socket
import time

from suite.tracking import TAG_HASH, client, redact


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
