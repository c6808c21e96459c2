"""Checkpoints and resuming: which checkpoints were written to the end, the run to resume, its counts.

    run_id, checkpoint = find_resumable_run(cfg, store, run_id=None)   # the newest unfinished run
    state = resumed_state(checkpoint, run_id)
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow

from loraflow import LoraflowError, tracking, warn
from loraflow.config import Config
from loraflow.tracking import TRAIN_LOSS, Tags
from loraflow.training.distributed import Ranks

COMPLETE_MARKER = "loraflow_checkpoint.json"  # written after everything else: a checkpoint without it is partial


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints that were written to the end (they hold the marker), newest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted((p for p in found if (p / COMPLETE_MARKER).is_file()), key=lambda p: -int(p.name.split("-")[-1]))


def newest_complete_checkpoint(output_dir: Path) -> Path | None:
    complete = complete_checkpoints(output_dir)
    partial = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p not in complete]
    newest = complete[0] if complete else None
    for folder in partial:
        if newest is None or int(folder.name.split("-")[-1]) > int(newest.name.split("-")[-1]):
            warn(f"{folder.name} was not written to the end; resuming from "
                 f"{newest.name if newest else 'nothing'} instead")
    return newest


def find_resumable_run(cfg: Config, store: tracking.Store, run_id: str | None) -> tuple[str, Path]:
    """(run id, checkpoint) of `run_id`, else of the newest unfinished training run of this config."""
    if run_id:
        candidates = [tracking.get_run(run_id, store)]
    else:
        candidates = [run for run in tracking.find_runs(store, stage="train", project=cfg.name,
                                                        config_hash=cfg.config_hash(), trials=False)
                      if run.info.status != "FINISHED"]
    for run in candidates:
        if run.info.status == "FINISHED":
            raise LoraflowError(f"run {run.info.run_id} is FINISHED: there is nothing to resume")
        checkpoint = newest_complete_checkpoint(Path(run.data.tags.get(Tags.OUTPUT_DIR, "")))
        if checkpoint is not None:
            return run.info.run_id, checkpoint
    raise LoraflowError(f"nothing to resume: no unfinished training run of '{cfg.name}' with this config "
                        "has a complete checkpoint on this machine (or pass --run-id)")


def resumed_state(checkpoint: Path | None, run_id: str, ranks: Ranks | None = None) -> dict:
    """The counts saved with the checkpoint, and the last step the run logged (a process killed after its
    last checkpoint logged steps the resumed one repeats: those are not logged again). The saved token count
    is the job's: rank 0 carries it on, so the sum over the ranks stays the run's total."""
    ranks = ranks or Ranks()
    saved = json.loads((checkpoint / COMPLETE_MARKER).read_text()) if checkpoint else {}
    history = mlflow.MlflowClient().get_metric_history(run_id, TRAIN_LOSS) if checkpoint and ranks.main else []
    return {"logged_through": max((m.step for m in history), default=0),
            "tokens": int(saved.get("tokens", 0)) if ranks.main else 0,
            "eval": {int(k): v for k, v in saved.get("eval", {}).items()},
            "seconds": float(saved.get("seconds", 0.0)), "started": time.perf_counter()}
