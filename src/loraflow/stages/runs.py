"""`loraflow runs PROJECT`: the project's training runs side by side, as a table in the terminal.

    loraflow runs quickstart                     # training runs of the experiment, newest first
    loraflow runs ptbr-llama31-cpt-sft --evaluations --json tasks.json   # one row per evaluation, across tasks
    rows = compare.training_rows(store, limit=20)

One row per training run (tune trials included, marked with their study and trial): the config values
that differ between the runs, eval/loss, the evaluation deltas copied onto the run with their
intervals (from its latest evaluation), tokens/s and cost. With --evaluations: one row per finished
evaluation (e.g. one per task of a multi-task extrinsic evaluation): its data, the run it judged, and per
metric `base mean ± std -> tuned mean ± std` over the evaluation's seeds.
"""
from __future__ import annotations

from pathlib import Path

from loraflow import tracking
from loraflow.tracking import EVAL_LOSS, Tags

FIGURES = (EVAL_LOSS, "train/tokens_per_second", "train/cost_usd")


def differing_params(runs: list) -> list[str]:
    """The params whose values are not the same in every run (what tells the runs apart)."""
    keys = sorted({key for run in runs for key in run.data.params})
    return [key for key in keys if len({run.data.params.get(key) for run in runs}) > 1]


def delta_cells(store: tracking.Store, run) -> dict:
    """`delta/<m>` with its interval, from the run's latest evaluation (its id is tagged on the run)."""
    evaluation_id = run.data.tags.get(Tags.LATEST_EVALUATION_RUN_ID)
    if not evaluation_id:
        return {}
    summary = store.client().get_run(evaluation_id).data.metrics
    cells = {}
    for name in tracking.evaluated_metrics(summary):
        low = summary.get(tracking.role_key("delta", name, "_ci_low"))
        high = summary.get(tracking.role_key("delta", name, "_ci_high"))
        delta = summary.get(tracking.role_key("delta", name))
        if delta is not None:
            interval = f" [{low:+.3f}, {high:+.3f}]" if low is not None and high is not None else ""
            cells[f"delta/{name}"] = f"{delta:+.3f}{interval}"
    return cells


def training_rows(store: tracking.Store, limit: int = 20) -> list[dict]:
    """One dict per training run of the experiment (newest first): id, status, trial, differing params, figures."""
    runs = tracking.find_runs(store, stage="train", max_results=limit)
    params = differing_params(runs)
    rows = []
    for run in runs:
        tags = run.data.tags
        trial = f"{tags[Tags.STUDY]}#{tags[Tags.TRIAL_NUMBER]}" if Tags.TRIAL_NUMBER in tags else ""
        row = {"run": run.info.run_id[:12], "status": run.info.status, "trial": trial}
        row.update({key: run.data.params.get(key, "") for key in params})
        row.update({key: f"{run.data.metrics[key]:.4g}" for key in FIGURES if key in run.data.metrics})
        row.update(delta_cells(store, run))
        rows.append(row)
    return rows


def table_text(rows: list[dict], empty: str = "no training runs in this experiment yet") -> str:
    """An aligned plain-text table; columns in first-seen order."""
    if not rows:
        return empty
    columns = list(dict.fromkeys(key for row in rows for key in row))
    widths = {c: max(len(c), *(len(str(row.get(c, ""))) for row in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(row.get(c, "")).ljust(widths[c]) for c in columns) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def evaluation_rows(store: tracking.Store, limit: int = 20) -> list[dict]:
    """One dict per FINISHED evaluation of the experiment (newest first): data, judged run, and per metric
    base and tuned means with their stds over seeds, and the delta."""
    rows = []
    for run in tracking.find_runs(store, stage="evaluate", status="FINISHED", max_results=limit):
        metrics, tags = run.data.metrics, run.data.tags
        row = {"run": run.info.run_id[:12], "data": Path(tags.get(Tags.DATA_SOURCE, "?")).name,
               "judged": tags.get(Tags.EVALUATED_RUN_ID, "")[:12]}
        for name in tracking.evaluated_metrics(metrics):
            row[name] = " -> ".join(
                f"{metrics[tracking.role_key(role, name)]:.4f}"
                + (f" ± {metrics[tracking.role_key(role, name, '_std')]:.4f}"
                   if tracking.role_key(role, name, "_std") in metrics else "")
                for role in ("base", "tuned") if tracking.role_key(role, name) in metrics)
        rows.append(row)
    return rows


def evaluation_summary(store: tracking.Store, limit: int = 20) -> list[dict]:
    """The same evaluations as numbers, for a JSON file: {run_id, data, judged_run_id, metrics: {name: {...}}}."""
    summary = []
    for run in tracking.find_runs(store, stage="evaluate", status="FINISHED", max_results=limit):
        metrics = run.data.metrics
        summary.append({"run_id": run.info.run_id, "data": run.data.tags.get(Tags.DATA_SOURCE),
                        "judged_run_id": run.data.tags.get(Tags.EVALUATED_RUN_ID),
                        "metrics": {name: {key: metrics[tracking.role_key(role, name, suffix)]
                                           for role in tracking.ROLES for suffix in ("", "_std")
                                           if tracking.role_key(role, name, suffix) in metrics
                                           for key in [f"{role}{suffix}"]}
                                    for name in tracking.evaluated_metrics(metrics)}})
    return summary
