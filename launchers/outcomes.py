"""What a sweep says while and after it runs: each run's Outcome, the experiment's note, the
progress bar (elapsed time, ETA, what each running job is at), the launch costs and the summary
table."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from suite.config import RunConfig


@dataclass
class Outcome:
    cfg: RunConfig
    state: str  # finished | failed | skipped
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    job_id: str = ""


def describe(sweep, runs) -> str:
    """The experiment's note in MLflow: what the sweep compares, under which protocol."""
    g = sweep.grid
    models = sorted({r.model for r in runs})
    data = sorted({r.dataset for r in runs})
    return (
        f"hfbench sweep `{sweep.name}`: {', '.join(g.methods)} on {', '.join(data)} / {', '.join(models)} at "
        f"{', '.join(f'{100 * s:g} %' for s in g.sparsities)} sparsity, seeds {', '.join(map(str, g.seeds))}; "
        f"{len(runs)} runs. Each run's config is its `config.yaml` artifact; `hfbench report` turns this "
        f"experiment into tables and plots."
    )


class _Progress:
    """A tqdm bar on a terminal; on a log file, one plain status line every 30 s."""

    def __init__(self, total: int, desc: str, done: int = 0, t0: float | None = None):
        """`total` runs of the whole sweep, `done` of them settled in earlier stages, since `t0`."""
        self.tty = sys.stderr.isatty()
        self.total, self.n, self.desc, self.last = total, done, desc, 0.0
        self.t0 = t0 if t0 is not None else time.time()
        self.n0 = done
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=desc, unit="run", file=sys.stderr, dynamic_ncols=True)

    def timing(self) -> str:
        """'elapsed 12m 05s, ETA ~31m' (the ETA from the mean time per settled run so far)."""
        el = time.time() - self.t0
        txt = f"elapsed {_dur(el)}"
        if self.n > 0 and self.n < self.total:
            txt += f", ETA ~{_dur(el / self.n * (self.total - self.n))}"
        return txt

    def write(self, msg: str) -> None:
        if self.tty:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def update(self, k: int) -> None:
        self.n += k
        if self.tty:
            self.bar.update(k)

    def status(self, text: str) -> None:
        if self.tty:
            self.bar.set_postfix_str(text)
        elif time.time() - self.last > 30:
            self.last = time.time()
            print(
                f"[hfbench] {self.desc}: {self.n}/{self.total} done ({self.timing()}); {text}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.tty:
            self.bar.close()


def _dur(s: float) -> str:
    s = int(round(s))
    h, m, sec = s // 3600, (s % 3600) // 60, s % 60
    return f"{h}h {m:02d}m" if h else f"{m}m {sec:02d}s" if m else f"{sec}s"


_REASONS: dict[str, tuple[float, str]] = {}  # job id -> (when asked, "pending: <reason>")


def _queued_reason(job_id: str) -> str:
    """SLURM's reason for a queued job (asked at most every 30 s per job)."""
    t, reason = _REASONS.get(job_id, (0.0, ""))
    if time.time() - t > 30:
        from launchers.status import _pending_reason

        reason = _pending_reason(job_id)
        _REASONS[job_id] = (time.time(), reason)
    return reason


def _progress(running) -> str:
    """'hyperflux-0.9 e7/20, gmp-0.5 e3/20' from the last epoch line of each running job's log."""
    import re

    parts = []
    for r, job in running[:4]:
        ep = "starting"
        try:
            text = Path(job.paths.stdout).read_text(errors="replace")[-4000:]
            found = re.findall(r" epoch (\d+/\d+) ", text)
            if found:
                ep = "e" + found[-1]
        except (OSError, AttributeError):
            pass
        if ep == "starting" and type(job).__name__ == "SlurmJob":
            ep = _queued_reason(str(job.job_id)) or ep
        label = r.run_name().removeprefix(f"{r.model}-").removesuffix(f"-s{r.seed}")
        parts.append(f"{label} {ep}")
    return "running: " + (", ".join(parts) if parts else "-") + (" ..." if len(running) > 4 else "")


def launch_costs(outcomes: list[Outcome], t0: float) -> str:
    """What launching cost this sweep, from the tasks' startup timelines (suite.engine):
    `hfbench sweep` start -> first training step of the first task, and the median fixed cost
    per task with its parts."""
    # only runs this sweep trained: a run reused from an earlier training (another sweep's claim,
    # a folder already done) carries that training's timeline, from before this sweep began
    res = [
        o.result
        for o in outcomes
        if o.state == "finished"
        and "startup_total_s" in o.result
        and not o.result.get("reused")
        and not o.result.get("reused_from")
    ]
    if not res:
        return ""
    import statistics

    first = min(r["first_step_unix"] for r in res) - t0
    med = {k: statistics.median(r[k] for r in res if k in r) for k in res[0] if k.startswith("startup_")}
    parts = ", ".join(
        f"{k.removeprefix('startup_').removesuffix('_s')} {v:.1f}" for k, v in med.items() if k != "startup_total_s"
    )
    return (
        f"[hfbench] launch cost: first training step {first:.1f} s after the sweep started; per task "
        f"(median of {len(res)}, last segment) {med['startup_total_s']:.1f} s from process start to "
        f"the end of the first step ({parts} s)"
    )


def summary_table(outcomes: list[Outcome]) -> str:
    head = f"{'run':<36} {'hash':<12} {'state':<8} {'target':>7} {'achieved':>8} {'test top-1':>10}"
    lines = [head, "-" * len(head)]
    for o in outcomes:
        r = o.result
        ach = f"{100 * r['final_sparsity']:.2f}%" if "final_sparsity" in r else "-"
        acc = f"{100 * r['final_test_top1']:.2f}%" if "final_test_top1" in r else "-"
        line = f"{o.cfg.run_name():<36} {o.cfg.run_hash():<12} {o.state:<8} {100 * o.cfg.sparsity:>6.1f}% {ach:>8} {acc:>10}"
        if o.error:
            line += f"  {o.error}"
        lines.append(line)
    n_f = sum(o.state == "failed" for o in outcomes)
    lines.append(
        f"{len(outcomes)} runs: {sum(o.state == 'finished' for o in outcomes)} finished, "
        f"{sum(o.state == 'skipped' for o in outcomes)} skipped (already done), {n_f} failed"
    )
    return "\n".join(lines)
