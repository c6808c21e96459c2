"""A stage's MLflow run: started with lineage, ended by how the body ended; metric writes that wait out a
busy store; config, figures and artifacts in and out.

    with stage_run(cfg, "train", store) as run:      # FAILED on error, KILLED on interrupt/prune
        ...
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

import mlflow

from loraflow import LoraflowError
from loraflow.config import Config, to_yaml
from loraflow.tracking.lineage import first_line, lineage_tags, redact
from loraflow.tracking.liveness import Heartbeat
from loraflow.tracking.names import Tags
from loraflow.tracking.store import Store, get_run


def run_status_for(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "TrialPruned":
        return "KILLED"
    return "FAILED"


class StoreUnavailable(LoraflowError):
    """The tracking store did not answer for longer than the configured limit."""


class MetricBuffer:
    """Metric writes for one run that wait out a busy store ("database is locked", a server restarting).

    `log(metrics, step)` queues the values and sends everything queued in one batch; when the store
    fails, the values stay queued and go with the next write. Once the store has failed for longer
    than `outage_seconds`, `log` raises StoreUnavailable (the caller checkpoints and stops).
    """

    def __init__(self, run_id: str, outage_seconds: float):
        self.run_id, self.outage_seconds = run_id, outage_seconds
        self.pending: list = []
        self.failing_since: float | None = None

    def log(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), stamp, step) for key, value in metrics.items()]
        self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        try:
            while self.pending:  # in MLflow's batches of at most 1000; a sent batch is never sent again
                mlflow.MlflowClient().log_batch(self.run_id, metrics=self.pending[:1000])
                del self.pending[:1000]
        except Exception as exc:  # noqa: BLE001 - whatever the store raised, the values wait
            self.failing_since = self.failing_since or time.monotonic()
            down = time.monotonic() - self.failing_since
            if down > self.outage_seconds:
                raise StoreUnavailable(f"the tracking store has not answered for {down:.0f} s "
                                       f"({redact(first_line(exc))[:200]})") from None
            return
        self.failing_since = None

    def drain(self) -> None:
        """Send everything still queued, waiting for the store up to the outage limit."""
        self.flush()
        while self.pending:
            time.sleep(1.0)
            self.flush()


@contextlib.contextmanager
def stage_run(cfg: Config, stage: str, store: Store, *, run_id: str | None = None,
              parent_run_id: str | None = None, run_name: str | None = None, tags: dict | None = None,
              system_metrics: bool = False):
    """An MLflow run for one stage, tagged with lineage; ended FAILED (or KILLED) if the body raises.

    `run_id` continues an existing run; `parent_run_id` nests a new one (it must be the active run, if any);
    `system_metrics` has MLflow sample CPU, memory (and GPU) use into system/* metrics.
    """
    nested = mlflow.active_run() is not None
    if run_id:
        run = mlflow.start_run(run_id=run_id, nested=nested, log_system_metrics=system_metrics)
        if Tags.ERROR in run.data.tags:  # the failure of an earlier attempt no longer describes the run
            mlflow.MlflowClient().delete_tag(run_id, Tags.ERROR)
    else:
        run = mlflow.start_run(experiment_id=store.experiment_id, parent_run_id=parent_run_id, nested=nested,
                               run_name=run_name, tags={**lineage_tags(cfg, stage), **(tags or {})},
                               log_system_metrics=system_metrics)
    mlflow.set_tags({Tags.HOST: socket.gethostname(), Tags.PID: str(os.getpid()),
                     Tags.HEARTBEAT: f"{time.time():.0f}"})
    try:
        with Heartbeat(run.info.run_id):
            yield run
    except BaseException as exc:
        mlflow.set_tag(Tags.ERROR, redact(first_line(exc))[:500])
        mlflow.end_run(run_status_for(exc))
        raise
    mlflow.end_run("FINISHED")


def log_config(cfg: Config) -> None:
    mlflow.log_text(redact(to_yaml(cfg)), "config/resolved.yaml")
    mlflow.set_tag(Tags.CONFIG_HASH, cfg.config_hash())


def log_figure_png(figure, artifact_path: str) -> None:
    """Log a matplotlib figure as a PNG artifact and close it."""
    import matplotlib.pyplot as plt

    mlflow.log_figure(figure, artifact_path)
    plt.close(figure)


def download_run_artifacts(run_id: str, path: str, into: Path) -> Path:
    """Download `path` of a run into the caller's folder `into` (MLflow's own temp folders are never removed);
    a clear error if the run or artifact is missing."""
    get_run(run_id)
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(into)))
    except (mlflow.exceptions.MlflowException, OSError):
        raise LoraflowError(f"run {run_id} has no '{path}' artifact") from None


def download_model_uri(model_uri: str, into: Path) -> Path:
    """Download a logged model into the folder `into`; its merged Hugging Face folder (the shallowest one with
    a config.json)."""
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(into)))
    except (mlflow.exceptions.MlflowException, OSError) as exc:
        raise LoraflowError(f"unknown model URI {model_uri!r}: {str(exc).splitlines()[0]}") from None
    folders = sorted((p.parent for p in local.rglob("config.json")), key=lambda p: len(p.parts))
    if not folders:
        raise LoraflowError(f"{model_uri} holds no merged Hugging Face model folder (no config.json)")
    return folders[0]


def model_version_run_id(model_uri: str) -> str | None:
    """The training run behind a registered version (`models:/name@alias` or `models:/name/3`): the
    version's `loraflow.source_run_id` tag (set by the registry stage), else the run that logged it."""
    reference = model_uri.removeprefix("models:/")
    client = mlflow.MlflowClient()
    try:
        if "@" in reference:
            version = client.get_model_version_by_alias(*reference.split("@", 1))
        else:
            version = client.get_model_version(*reference.rsplit("/", 1))
    except (mlflow.exceptions.MlflowException, TypeError):
        return None
    return version.tags.get(Tags.SOURCE_RUN_ID) or version.run_id or None
