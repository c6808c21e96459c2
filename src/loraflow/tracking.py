"""MLflow plumbing shared by every stage: tracking URI, experiments, runs, lineage tags, artifacts.

    uri = tracking.use_tracking(cli_uri)           # --tracking-uri, MLFLOW_TRACKING_URI, or local default
    with tracking.stage_run(cfg, "train") as run:  # FAILED on error, KILLED on interrupt or prune
        ...
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

import mlflow
import yaml

from loraflow import LoraflowError
from loraflow.config import REPO_ROOT, Config, to_yaml

LOCAL_CONFIG = REPO_ROOT / "mlruns_config" / "local.yaml"


def local_defaults() -> dict:
    """The local tracking set-up of mlruns_config/local.yaml with {cwd} filled in."""
    raw = yaml.safe_load(LOCAL_CONFIG.read_text()) if LOCAL_CONFIG.is_file() else {}
    defaults = {"tracking_uri": "sqlite:///{cwd}/.mlruns/mlflow.db", "artifact_root": "{cwd}/.mlruns/artifacts",
                "optuna_storage": "{cwd}/.mlruns/optuna-journal.log", **(raw or {})}
    return {key: str(value).replace("{cwd}", str(Path.cwd())) for key, value in defaults.items()}


def use_tracking(cli_uri: str | None = None) -> str:
    """Point MLflow at --tracking-uri, else MLFLOW_TRACKING_URI, else the local default; return the URI."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_defaults()["tracking_uri"]
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        create_store_once(Path(uri.removeprefix("sqlite:///")))
    return uri


def create_store_once(db: Path) -> None:
    """Open a sqlite store under a file lock, so processes started at once on a new store do not race
    in MLflow's table creation (e.g. several `loraflow tune` workers)."""
    import fcntl

    try:
        with open(db.parent / f"{db.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            mlflow.MlflowClient().search_experiments(max_results=1)
    except (OSError, mlflow.exceptions.MlflowException) as exc:
        raise LoraflowError(f"tracking store sqlite:///{db}: {str(exc).splitlines()[0]}") from None


def artifact_location_for(uri: str, experiment: str) -> str | None:
    """Local artifact folder beside a sqlite store; None lets a tracking server decide."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    root = Path(local_defaults()["artifact_root"]) if uri == local_defaults()["tracking_uri"] else db.parent / "artifacts"
    return (root / experiment).resolve().as_uri()


def use_experiment(name: str) -> str:
    """Get or create the experiment `name` and make it current; returns its id."""
    uri = mlflow.get_tracking_uri()
    try:
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = mlflow.create_experiment(name, artifact_location=artifact_location_for(uri, name))
            except mlflow.exceptions.MlflowException:
                experiment = mlflow.get_experiment_by_name(name)  # created meanwhile by another process?
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        else:
            experiment_id = experiment.experiment_id
        mlflow.set_experiment(experiment_id=experiment_id)
    except mlflow.exceptions.MlflowException as exc:
        raise LoraflowError(f"tracking store {uri}: {str(exc).splitlines()[0]}") from None
    return experiment_id


def experiment_chosen() -> bool:
    """Whether an experiment was set (use_experiment, MLFLOW_EXPERIMENT_* variables) in this process."""
    from mlflow.tracking import fluent

    return bool(fluent._active_experiment_id or os.environ.get("MLFLOW_EXPERIMENT_NAME")
                or os.environ.get("MLFLOW_EXPERIMENT_ID"))


def git_sha() -> str:
    """The commit of the code that runs, with '-dirty' when the work tree has changes; 'unknown' outside git."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    try:
        sha = git("rev-parse", "HEAD")
        if sha.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def lineage_tags(cfg: Config, stage: str) -> dict:
    return {"loraflow.stage": stage, "loraflow.project": cfg.name, "loraflow.git_sha": git_sha(),
            "loraflow.config_hash": cfg.config_hash(), "loraflow.base_model": cfg.model.name}


def flat_params(cfg: Config) -> dict:
    """Config as MLflow params: dotted keys, lists as JSON."""
    params = {}
    for section, values in cfg.to_dict().items():
        if not isinstance(values, dict):
            params[section] = values
            continue
        for key, value in values.items():
            params[f"{section}.{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else value
    return params


def run_status_for(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "TrialPruned":
        return "KILLED"
    return "FAILED"


@contextlib.contextmanager
def stage_run(cfg: Config, stage: str, *, run_id: str | None = None, nested: bool = False,
              run_name: str | None = None, tags: dict | None = None):
    """An MLflow run for one stage, tagged with lineage; ended FAILED (or KILLED) if the body raises."""
    if not nested and run_id is None and not experiment_chosen():
        use_experiment(cfg.name)
    run = mlflow.start_run(run_id=run_id, nested=nested, run_name=run_name,
                           tags=None if run_id else {**lineage_tags(cfg, stage), **(tags or {})})
    try:
        yield run
    except BaseException as exc:
        mlflow.set_tag("loraflow.error", str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__)
        mlflow.end_run(run_status_for(exc))
        raise
    mlflow.end_run("FINISHED")


def log_config(cfg: Config) -> None:
    mlflow.log_text(to_yaml(cfg), "config/resolved.yaml")
    mlflow.set_tag("loraflow.config_hash", cfg.config_hash())


def log_figure_png(figure, artifact_path: str) -> None:
    """Log a matplotlib figure as a PNG artifact and close it."""
    import matplotlib.pyplot as plt

    mlflow.log_figure(figure, artifact_path)
    plt.close(figure)


def download_run_artifacts(run_id: str, path: str) -> Path:
    """Download `path` of a run to a temporary folder; a clear error if the run or artifact is missing."""
    client = mlflow.MlflowClient()
    try:
        client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise LoraflowError(f"unknown run id '{run_id}' in {mlflow.get_tracking_uri()}") from None
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                        dst_path=tempfile.mkdtemp(prefix="loraflow-")))
    except (mlflow.exceptions.MlflowException, OSError):
        raise LoraflowError(f"run {run_id} has no '{path}' artifact") from None


def file_digest(path: Path, extra: str = "") -> str:
    """sha256 (16 hex) of a file's bytes plus `extra` (e.g. the reading settings)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(extra.encode())
    return digest.hexdigest()[:16]
