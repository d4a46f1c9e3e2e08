"""Screenshots of a report and of the MLflow UI on its experiment, taken in headless Chromium.

  python -m reports.screenshots --report reports/demo --experiment demo \\
      [--tracking-uri sqlite:///mlflow.db] [--out docs/screenshots]

Writes report.png (the top of index.html: the grid and the first tables), and from the MLflow
UI, served for the occasion by `mlflow server` on a free loopback port unless the tracking URI
is already a server: mlflow_runs.png (the experiment's training runs, nested under the sweep's
parent run) and mlflow_run.png (the run the report's first row links to: its parent, source
commit, dataset, environment tags and grouped metrics). Chromium renders pages with virtual
time, so a screenshot waits for the page's own requests, not for a guessed number of seconds.
Needs Debian's chromium (scripts/setup.sh installs it).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reports.fmt import experiment_url


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("screenshots: chromium is not installed (apt-get install chromium)")


def shoot(url: str, png: Path, width: int = 1400, height: int = 1000, budget_ms: int = 30000) -> Path:
    """A screenshot of `url` once its requests have settled (at most `budget_ms` of virtual time)."""
    with tempfile.TemporaryDirectory(prefix="hfbench-chromium-") as profile:
        cmd = [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={png}",
            url,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot of {url} (exit {done.returncode}): {done.stderr[-1500:]}")
    return png


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ui_server:
    """`mlflow server` on a free loopback port for a local store (a server URI is used as is)."""

    def __init__(self, tracking_uri: str, log: Path):
        self.uri, self.log, self.proc = tracking_uri, log, None

    def __enter__(self) -> str:
        if self.uri.startswith(("http://", "https://")):
            return self.uri.rstrip("/")
        port = _free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                self.uri,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        import urllib.request

        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}); see {self.log}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2):
                    return base
            except OSError:
                time.sleep(1)
        raise RuntimeError(f"mlflow server did not answer within 120 s; see {self.log}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=30)


def take(report: Path, experiment: str, tracking_uri: str, out: Path) -> dict[str, Path]:
    """The three screenshots (report, the experiment's runs, the first row's run) into `out`."""
    from suite import tracking

    out.mkdir(parents=True, exist_ok=True)
    shots = {"report.png": shoot((report / "index.html").resolve().as_uri(), out / "report.png", height=1600)}
    exp = tracking.client(tracking_uri).get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"screenshots: no experiment {experiment!r} at {tracking.redact(tracking_uri)}")
    first = re.search(r"#/experiments/[^/]+/runs/([0-9a-f]+)", (report / "index.html").read_text(encoding="utf-8"))
    with ui_server(tracking_uri, out / "mlflow_server.log") as base:
        shots["mlflow_runs.png"] = shoot(experiment_url(base, exp.experiment_id), out / "mlflow_runs.png")
        if first:
            url = f"{base}/#/experiments/{exp.experiment_id}/runs/{first.group(1)}?workflowType=machine_learning"
            shots["mlflow_run.png"] = shoot(url, out / "mlflow_run.png", height=1400)
    (out / "mlflow_server.log").unlink(missing_ok=True)
    return shots


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--report", required=True, type=Path, help="the report folder (its index.html)")
    p.add_argument("--experiment", required=True, help="the MLflow experiment the report was built from")
    p.add_argument(
        "--tracking-uri", default=None, help="default: HFBENCH_MLFLOW_URI, MLFLOW_TRACKING_URI or ./mlflow.db"
    )
    p.add_argument("--out", type=Path, default=Path("docs/screenshots"), help="folder for the PNGs")
    a = p.parse_args(argv)
    from suite import tracking

    uri = a.tracking_uri or tracking.default_uri()
    tracking.require_store(uri)
    for name, path in take(a.report, a.experiment, uri, a.out).items():
        print(f"{name}: {path} ({path.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
