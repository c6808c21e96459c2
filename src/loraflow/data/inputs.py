"""Prepared data in the record: counts, the digest and each split as a run's dataset input.

    log_prepared(cfg, prepared)        # in the active run
"""
from __future__ import annotations

import json
from pathlib import Path

from loraflow.config import Config
from loraflow.data.rows import PreparedData


def log_split_input(cfg: Config, prepared: PreparedData, split: str) -> None:
    """One split as an MLflow dataset input of the active run (context `train`, `eval` or `test`)."""
    import mlflow
    import pandas as pd

    source = prepared.source if Path(prepared.source).is_file() else None
    dataset = mlflow.data.from_pandas(pd.DataFrame(prepared.splits[split]), source=source, name=f"{cfg.name}-{split}")
    context = split if split != "validation" else "eval"
    try:
        mlflow.log_input(dataset, context=context)
    except mlflow.exceptions.MlflowException:
        # The store looks the dataset up by (experiment, name, digest), then inserts it: a worker that stored
        # the same split in between makes the insert a duplicate key. Asked again, the store finds it.
        mlflow.log_input(dataset, context=context)


def log_prepared(cfg: Config, prepared: PreparedData) -> None:
    """Counts as metrics, the digest as a tag, each split as an MLflow dataset input and a JSONL artifact."""
    import mlflow

    from loraflow.tracking import Tags

    mlflow.log_metrics({f"data/{key}": value for key, value in prepared.counts.items()})
    mlflow.set_tags({Tags.DATA_DIGEST: prepared.digest, Tags.DATA_SOURCE: prepared.source})
    for split, rows in prepared.splits.items():
        if not rows:
            continue
        log_split_input(cfg, prepared, split)
        mlflow.log_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:20]) + "\n",
                        f"data/sample_{split}.jsonl")
