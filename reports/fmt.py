"""Formatting helpers shared by the report modules: percentages, times, file names, paths and
URIs as the report prints them."""

from __future__ import annotations

import datetime as _dt
import os
import re
from urllib.parse import urlsplit, urlunsplit


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100.0 * x:.2f}"


def fmt_time(ms: int | None) -> str:
    if ms is None:
        return ""
    return _dt.datetime.fromtimestamp(ms / 1000.0, tz=_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def slug(text: str) -> str:
    """A file-name-safe version of a dataset/model name."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return s or "unknown"


def safe_uri(uri: str) -> str:
    """Drop any user:password part of a tracking URI before printing it."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return uri


def portable(path: str) -> str:
    """A local path as the report shows it: relative to the folder the report was built from when
    it lies below it (a committed report then names no machine's folders), else unchanged."""
    try:
        return os.path.relpath(os.path.realpath(path), _cwd()) if _below(os.path.realpath(path)) else path
    except (ValueError, OSError):
        return path


def _cwd() -> str:
    return os.path.realpath(os.getcwd())


def _below(real: str) -> bool:
    cwd = _cwd()
    return real == cwd or real.startswith(cwd.rstrip(os.sep) + os.sep)


def portable_uri(uri: str) -> str:
    """sqlite:////abs/below/cwd/x.db -> sqlite:///x.db (relative), file:// paths likewise; others as is."""
    for prefix in ("sqlite:///", "file://"):
        if uri.startswith(prefix) and uri[len(prefix) :].startswith("/"):
            rel = portable(uri[len(prefix) :])
            if not rel.startswith("/"):
                return ("sqlite:///" if prefix == "sqlite:///" else "") + rel
    return uri


def local_path(uri: str) -> str | None:
    """The directory of a file:// (or plain path) artifact URI; None for remote stores."""
    if not uri:
        return None
    if uri.startswith("file://"):
        from urllib.parse import unquote

        return unquote(urlsplit(uri).path)
    if uri.startswith("/"):
        return uri
    return None


def one_line(text: str, limit: int | None = None) -> str:
    s = " ".join(str(text).split())
    if limit is not None and len(s) > limit:
        s = s[: limit - 1] + "…"
    return s


def sparsity_key(s: float | None) -> float:
    # Target sparsities are parsed from strings like "0.9"; round so that 0.9 and 0.90 group.
    return -1.0 if s is None else round(s, 6)


DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store by default


def ui_base(tracking_uri: str) -> str:
    """The MLflow UI that shows the runs of `tracking_uri`: the server itself (without
    credentials), or for a local store the address `mlflow ui` serves it at by default."""
    if tracking_uri.startswith(("http://", "https://")):
        return safe_uri(tracking_uri).rstrip("/")
    return DEFAULT_UI


# MLflow 3's UI shows its GenAI pages unless the link (or the user's last choice) asks for the
# model-training ones, whatever the experiment's kind tag says
_TRAINING_VIEW = "?workflowType=machine_learning"


def run_url(ui: str, experiment_id: str, run_id: str) -> str:
    """The page of one run in the MLflow UI at `ui`."""
    return f"{ui}/#/experiments/{experiment_id}/runs/{run_id}{_TRAINING_VIEW}"


def experiment_url(ui: str, experiment_id: str) -> str:
    """The runs table of an experiment in the MLflow UI at `ui`."""
    return f"{ui}/#/experiments/{experiment_id}/runs{_TRAINING_VIEW}"
