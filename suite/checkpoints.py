"""A run's folder on disk: checkpoints (written so that a good one always survives), the lock
one training process holds, the done marker a finished run leaves, its final weights and the
digest that tells two trainings' states apart."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from suite.config import RunConfig


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.out_dir) / cfg.run_hash()


def _write_tmp(obj: Any, tmp: Path) -> None:
    """torch.save + fsync to `tmp`; on failure nothing is left behind, and a full disk is
    reported as such (torch.save itself says only 'unexpected pos ...' when a write fails)."""
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except BaseException as e:
        free = None
        if isinstance(e, Exception) and not isinstance(e, OSError):
            try:
                st = os.statvfs(tmp.parent)
                free = st.f_bavail * st.f_frsize
            except OSError:
                pass
        tmp.unlink(missing_ok=True)
        if free is not None and free < 8 << 20:
            import errno

            raise OSError(
                errno.ENOSPC,
                f"No space left on device while writing {tmp.name[1:].split('.tmp')[0]} "
                f"in {tmp.parent} ({free} bytes free; torch.save said: {e})",
            ) from e
        raise


def save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _write_tmp(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(obj: Any, path: Path) -> None:
    """Write a checkpoint so that a good one always survives: the new file is written and
    fsynced under a temporary name; the current one becomes `prev.pt`, then the new one takes
    its place (both renames are atomic). A process killed at any point leaves last.pt or
    prev.pt (or both) complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    _write_tmp(obj, tmp)
    if path.is_file():
        os.replace(path, path.with_name("prev.pt"))
    os.replace(tmp, path)


CHECKPOINT_KEYS = ("run_hash", "epoch", "step", "model", "optimizer", "pruner")


def load_checkpoint(out: Path, run_hash: str, say=print) -> Optional[dict[str, Any]]:
    """The newest readable checkpoint of a run folder (last.pt, else prev.pt), or None if it
    has none. A truncated or corrupt file is reported and passed over. A checkpoint of
    another config is an error (never silently overwritten)."""
    cands = [p for p in (out / "last.pt", out / "prev.pt") if p.is_file()]
    bad = []
    for p in cands:
        try:
            ck = torch.load(p, map_location="cpu", weights_only=True)
            if not isinstance(ck, dict) or any(k not in ck for k in CHECKPOINT_KEYS):
                raise ValueError("not a complete hfbench checkpoint")
        except Exception as e:
            bad.append(f"{p.name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            say(f"[hfbench] WARNING: checkpoint {p} is unreadable ({bad[-1]}); trying the previous one", flush=True)
            continue
        if ck["run_hash"] != run_hash:
            raise RuntimeError(f"{p}: checkpoint belongs to another config ({ck['run_hash']}, this run is {run_hash})")
        if bad:
            say(f"[hfbench] WARNING: resuming from {p} (epoch {ck['epoch']}, step {ck['step']}) instead", flush=True)
        return ck
    if bad:
        raise RuntimeError(f"{out}: no usable checkpoint ({'; '.join(bad)}); delete the folder to start this run over")
    return None


class RunLock:
    """One process trains a run at a time: an exclusive flock on <run folder>/run.lock, held
    for the whole run by rank 0 and released by the OS when the process dies (no stale locks).
    A second launch of the same run (e.g. two sweeps with overlapping grids) waits for the
    first and then returns its result instead of training again."""

    def __init__(self, out: Path):
        import fcntl

        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "run.lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self._fcntl = fcntl

    def try_acquire(self) -> bool:
        try:
            self._fcntl.flock(self.fd, self._fcntl.LOCK_EX | self._fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def acquire(self) -> None:
        self._fcntl.flock(self.fd, self._fcntl.LOCK_EX)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the lock
            self.fd = None


def run_busy(out: Path) -> bool:
    """True while some process holds the run's lock (it is training right now)."""
    if not (out / "run.lock").is_file():
        return False
    lock = RunLock(out)
    try:
        return not lock.try_acquire()
    finally:
        lock.release()


def done_result(out: Path, run_hash: str, experiment_id: Optional[str]) -> Optional[dict[str, Any]]:
    """The result a finished run left in done.json, if it was logged to this experiment."""
    import json

    p = out / "done.json"
    if not p.is_file():
        return None
    try:
        res = json.loads(p.read_text())
    except ValueError:
        return None
    if res.get("run_hash") != run_hash or str(res.get("experiment_id")) != str(experiment_id):
        return None
    return res


def reuse_finished(run, out: Path, cfg: RunConfig, experiment_id: str, say=print) -> dict[str, Any]:
    """This run hash was trained to FINISHED in this experiment by a sweep with another
    out_dir (its MLflow run names the folder). Make this folder look as if it had trained it:
    its final weights (which a dense parent's children load) and its done marker. The other
    folder must be readable from here (a shared file system); if not, say so."""
    import json
    import shutil

    src = Path(run.data.tags.get("hfbench.run_dir", ""))
    done = done_result(src, cfg.run_hash(), experiment_id) if src.name else None
    if done is None or not (src / "final_weights.pt").is_file():
        raise RuntimeError(
            f"{cfg.run_name()} ({cfg.run_hash()}) was trained in this experiment by another sweep "
            f"(MLflow run {run.info.run_id}, folder {src or 'not recorded'}), whose weights and done "
            f"marker this process cannot read; point out_dir at that folder's parent, or copy it here"
        )
    out.mkdir(parents=True, exist_ok=True)
    if src.resolve() != out.resolve():
        tmp = out / f".final_weights.pt.tmp{os.getpid()}"
        shutil.copyfile(src / "final_weights.pt", tmp)
        os.replace(tmp, out / "final_weights.pt")
    res = {**done, "weights": str(out / "final_weights.pt"), "reused_from": str(src)}
    save_text_atomic(json.dumps(res, default=str), out / "done.json")
    say(
        f"[hfbench] {cfg.run_name()} ({cfg.run_hash()}) was trained by another sweep into {src} (MLflow run "
        f"{run.info.run_id}); reusing it, not training it again",
        flush=True,
    )
    return res


def save_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def weights_readable(path: Path) -> bool:
    """A weights file that exists and is a whole zip archive (torch.save's format): a file cut
    short loses its central directory, which is at the end. Cheap enough to ask before trusting
    a finished run's weights."""
    import zipfile

    return path.is_file() and zipfile.is_zipfile(path)


def state_digest(model: nn.Module) -> str:
    """sha256 over every tensor of the model state (weights, masks, gates), in key order."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def load_final(path: Path, run_hash: str) -> tuple[Optional[dict[str, float]], Optional[int]]:
    """The final metrics an earlier attempt of this run computed and logged (final_metrics.json),
    with their timestamp; (None, None) when there are none (or they belong to another run)."""
    import json

    try:
        rec = json.loads(path.read_text())
        if rec.get("run_hash") == run_hash:
            return {k: float(v) for k, v in rec["metrics"].items()}, int(rec["ts"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None, None


def save_final(path: Path, run_hash: str, ts: int, metrics: dict[str, float]) -> None:
    """Record a run's final metrics and the timestamp they are logged with (read by load_final)."""
    import json

    save_text_atomic(json.dumps({"run_hash": run_hash, "ts": ts, "metrics": metrics}), path)
