"""The prepare stage: read, normalise, count bad rows and split the data, in an MLflow run.

    loraflow prepare quickstart
    prepared = prepare.run(cfg)          # PreparedData: rows per split, counts, digest

The work is the data library's (`data.prepare`); this stage records it: the counts as metrics, the
digest as a tag, each split as a dataset input and a sample artifact.
"""
from __future__ import annotations

import mlflow

from loraflow import data, tracking
from loraflow.config import Config


def run(cfg: Config, store: tracking.Store | None = None) -> data.PreparedData:
    """`loraflow prepare`: prepare the data in an MLflow run and log counts, samples and the dataset."""
    store = store or tracking.connect(cfg=cfg)
    with tracking.stage_run(cfg, "prepare", store):
        mlflow.log_params(tracking.flat_params(cfg))
        prepared = data.prepare(cfg)
        data.log_prepared(cfg, prepared)
    return prepared
