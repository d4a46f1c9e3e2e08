"""What the benchmark commands logged to MLflow experiment "bench", read back for a report: the
latest `hfbench bench overhead` run (step-time, memory and floor ratios per method) and the
latest `hfbench bench deploy` run of an experiment (measured inference speed-up per run)."""

from __future__ import annotations

from collections import defaultdict

from reports.sqlite_store import open_store


def overhead(client) -> dict | None:
    """The latest FINISHED run of experiment "bench" with step_ratio.<method> metrics:
    {"run_id", "params", "step": {method: (ratio, q1, q3)}, "mem": {method: ratio},
    "floor": {method: floor ratio}} (floor: empty for runs logged before floors existed)."""
    try:
        store = open_store(client)
        if store is not None:  # a sqlite store: plain SQL, as in `load`
            exp = store.experiment("bench")
            if exp is None:
                return None
            runs = [r for r in store.runs(exp.experiment_id, newest_first=True) if r.info.status == "FINISHED"][:200]
        else:
            exp = client.get_experiment_by_name("bench")
            if exp is None:
                return None
            runs = client.search_runs(
                [exp.experiment_id],
                filter_string="attributes.status = 'FINISHED'",
                max_results=200,
                order_by=["attributes.start_time DESC"],
            )
    except Exception:
        return None
    for run in runs:
        m = run.data.metrics
        step = {
            k.split(".", 1)[1]: (
                v,
                m.get(f"step_ratio_q1.{k.split('.', 1)[1]}"),
                m.get(f"step_ratio_q3.{k.split('.', 1)[1]}"),
            )
            for k, v in m.items()
            if k.startswith("step_ratio.")
        }
        if step:
            mem = {k.split(".", 1)[1]: v for k, v in m.items() if k.startswith("mem_ratio.")}
            floor = {k.split(".", 1)[1]: v for k, v in m.items() if k.startswith("floor_ratio.")}
            params = dict(run.data.params)
            return {"run_id": run.info.run_id, "params": params, "step": step, "mem": mem, "floor": floor}
    return None


def deploy_speedups(client, experiment: str) -> dict[str, dict[int, float]]:
    """{training run id: {batch: measured speed-up}} from the latest FINISHED `hfbench bench
    deploy` run of `experiment` (experiment "bench", tag hfbench.bench = deploy, param
    experiment); {} when there is none."""
    try:
        store = open_store(client)
        if store is not None:
            exp = store.experiment("bench")
            runs = [] if exp is None else store.runs(exp.experiment_id, newest_first=True)
        else:
            exp = client.get_experiment_by_name("bench")
            runs = (
                []
                if exp is None
                else client.search_runs(
                    [exp.experiment_id],
                    filter_string="tags.`hfbench.bench` = 'deploy'",
                    max_results=200,
                    order_by=["attributes.start_time DESC"],
                )
            )
    except Exception:
        return {}
    for run in runs:
        if (
            run.info.status != "FINISHED"
            or run.data.tags.get("hfbench.bench") != "deploy"
            or run.data.params.get("experiment") != experiment
        ):
            continue
        out: dict[str, dict[int, float]] = defaultdict(dict)
        for k, v in run.data.metrics.items():
            head, _, rid = k.partition(".")
            if head.startswith("speedup_b") and head[9:].isdigit():
                out[rid][int(head[9:])] = v
        return dict(out)
    return {}
