"""The store and the experiment, and the one way to find runs.

    store = connect("sqlite:///mlflow.db", experiment="quickstart")   # or from the environment
    runs = find_runs(store, stage="train", status="FINISHED", config_hash=cfg.config_hash())
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mlflow
import yaml

from loraflow import LoraflowError
from loraflow.config import REPO_ROOT, Config
from loraflow.tracking.lineage import first_line, redact
from loraflow.tracking.liveness import reap_dead_runs
from loraflow.tracking.names import Tags


@dataclass(frozen=True)
class Store:
    """Where runs go: the tracking URI and the experiment every stage of this command uses."""
    uri: str
    experiment_id: str

    def client(self) -> mlflow.MlflowClient:
        return mlflow.MlflowClient(self.uri)


def local_config_file() -> Path | None:
    """mlruns_config/local.yaml in the working folder, else in the checkout loraflow runs from."""
    for root in (Path.cwd(), REPO_ROOT):
        if (root / "mlruns_config" / "local.yaml").is_file():
            return root / "mlruns_config" / "local.yaml"
    return None


def local_defaults() -> dict:
    """The local tracking set-up of mlruns_config/local.yaml (built-in defaults without one), {cwd} filled in."""
    path = local_config_file()
    raw = (yaml.safe_load(path.read_text()) or {}) if path else {}
    defaults = {"tracking_uri": "sqlite:///{cwd}/.mlruns/mlflow.db", "artifact_root": "{cwd}/.mlruns/artifacts",
                "optuna_storage": "{cwd}/.mlruns/optuna-journal.log", **raw}
    return {key: str(value).replace("{cwd}", str(Path.cwd())) for key, value in defaults.items()}


def connect(uri: str | None = None, experiment: str | None = None, cfg: Config | None = None) -> Store:
    """Point MLflow at `uri` (else MLFLOW_TRACKING_URI, else the local default) and pick the experiment.

    The experiment is `experiment` if given, else the active run's (a nested stage), else one named by
    MLFLOW_EXPERIMENT_ID / MLFLOW_EXPERIMENT_NAME (what `mlflow run` sets), else the project's name
    (MLflow's Default experiment without a config).
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or local_defaults()["tracking_uri"]
    mlflow.set_tracking_uri(uri)
    if not is_main_process():  # a torchrun job's other ranks leave the store to rank 0
        return Store(uri, os.environ.get("MLFLOW_EXPERIMENT_ID", ""))
    if uri.startswith("sqlite:///"):
        create_store_once(Path(uri.removeprefix("sqlite:///")))
    active = mlflow.active_run()
    reap_dead_runs(uri)
    if experiment:
        experiment_id = get_or_create_experiment(uri, experiment)
    elif active is not None:
        experiment_id = active.info.experiment_id
    elif os.environ.get("MLFLOW_EXPERIMENT_ID"):
        experiment_id = os.environ["MLFLOW_EXPERIMENT_ID"]
    else:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or (cfg.name if cfg else "Default")
        experiment_id = get_or_create_experiment(uri, name)
    return Store(uri, experiment_id)


def is_main_process() -> bool:
    """False in ranks > 0 of a torchrun job (its RANK and WORLD_SIZE): only rank 0 talks to MLflow."""
    return int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get("RANK", "0") == "0"


def create_store_once(db: Path) -> None:
    """Open a sqlite store under a file lock, so processes started at once on a new store do not race
    in MLflow's table creation (e.g. several `loraflow tune` workers)."""
    from filelock import FileLock

    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(db.parent / f"{db.name}.lock")):
            mlflow.MlflowClient(f"sqlite:///{db}").search_experiments(max_results=1)
    except (OSError, mlflow.exceptions.MlflowException) as exc:
        raise LoraflowError(f"tracking store sqlite:///{db}: {first_line(exc)}") from None


# MLflow 3 knows an experiment's kind from this tag ("finetuning" is a model-training kind). Its UI still
# opens on the GenAI view (traces, judges) unless the link asks for the model-training view:
# experiment_url adds ?workflowType=machine_learning (checked in headless Chromium, MLflow 3.17).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "finetuning"


def artifact_location_for(uri: str, experiment: str) -> str | None:
    """Local artifact folder beside a sqlite store; None lets a tracking server decide."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    defaults = local_defaults()
    root = Path(defaults["artifact_root"]) if uri == defaults["tracking_uri"] else db.parent / "artifacts"
    return (root / experiment).resolve().as_uri()


def experiment_url(store: "Store", ui: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI page of the store's experiment in the model-training view (runs, charts, models)."""
    root = store.uri if store.uri.startswith("http") else ui
    return f"{redact(root).rstrip('/')}/#/experiments/{store.experiment_id}?workflowType=machine_learning"


def get_or_create_experiment(uri: str, name: str) -> str:
    """The id of experiment `name` in the store at `uri`, created (with a local artifact folder) if new."""
    client = mlflow.MlflowClient(uri)
    try:
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_location_for(uri, name),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except mlflow.exceptions.MlflowException:
            experiment = client.get_experiment_by_name(name)  # created meanwhile by another process?
            if experiment is None:
                raise
            return experiment.experiment_id
    except mlflow.exceptions.MlflowException as exc:
        raise LoraflowError(f"tracking store {redact(uri)}: {first_line(exc)}") from None


def find_runs(store: Store, *, stage: str | None = None, status: str | None = None, project: str | None = None,
              config_hash: str | None = None, data_digest: str | None = None, parent: str | None = None,
              tags: dict | None = None, trials: bool = True, max_results: int = 1000) -> list:
    """Runs of the store's experiment matching every given filter, newest first.

    `trials=False` leaves out tune trials (runs with a trial number), which are training runs too.
    """
    wanted = {Tags.STAGE: stage, Tags.PROJECT: project, Tags.CONFIG_HASH: config_hash,
              Tags.DATA_DIGEST: data_digest, Tags.PARENT_RUN_ID: parent, **(tags or {})}
    clauses = [f"tags.`{key}` = '{value}'" for key, value in wanted.items() if value is not None]
    if status:
        clauses.append(f"attributes.status = '{status}'")
    runs = store.client().search_runs([store.experiment_id], " and ".join(clauses),
                                      order_by=["attributes.start_time DESC"], max_results=max_results)
    return [run for run in runs if trials or Tags.TRIAL_NUMBER not in run.data.tags]


def get_run(run_id: str, store: Store | None = None):
    """The run `run_id`; the one "unknown run id" error when the store has no such run."""
    client = store.client() if store else mlflow.MlflowClient()
    try:
        return client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        uri = store.uri if store else mlflow.get_tracking_uri()
        raise LoraflowError(f"unknown run id '{run_id}' in {redact(uri)}") from None
