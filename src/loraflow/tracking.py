"""The run contract: tag names, metric keys, the store and experiment, finding runs, lineage, artifacts.

    store = tracking.connect("sqlite:///mlflow.db", experiment="quickstart")   # or from the environment
    with tracking.stage_run(cfg, "train", store) as run:      # FAILED on error, KILLED on interrupt/prune
        ...
    runs = tracking.find_runs(store, stage="train", status="FINISHED", config_hash=cfg.config_hash())

Every `loraflow.*` tag is a constant of `Tags`, every metric key is built by the helpers below, and
every search for runs goes through `find_runs`: stages never spell a tag or parse a key themselves.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import yaml

from loraflow import LoraflowError
from loraflow.config import REPO_ROOT, Config, to_yaml


class Tags:
    """The `loraflow.*` run tags (and the gate's model-version tags): one home for every name."""
    STAGE = "loraflow.stage"
    PROJECT = "loraflow.project"
    GIT_SHA = "loraflow.git_sha"
    CONFIG_HASH = "loraflow.config_hash"
    TRAINING_HASH = "loraflow.training_hash"  # of the sections that decide a trained adapter
    DATA_DIGEST = "loraflow.data_digest"
    DATA_SOURCE = "loraflow.data_source"
    BASE_MODEL = "loraflow.base_model"
    BASE_MODEL_PATH = "loraflow.base_model_path"
    OUTPUT_DIR = "loraflow.output_dir"
    ATTENTION = "loraflow.attention"  # the attention implementation training used (models.faster_cpu_attention)
    ADAPTER_MODEL_ID = "loraflow.adapter_model_id"  # the training run's adapter as an MLflow logged model
    ERROR = "loraflow.error"
    HEARTBEAT = "loraflow.heartbeat"  # unix time, refreshed while the stage's process lives
    HOST = "loraflow.host"
    PID = "loraflow.pid"
    STEP_KEY = "loraflow.step_key"
    # tune
    STUDY = "loraflow.study"
    STUDY_RUN_ID = "loraflow.study_run_id"
    TRIAL_NUMBER = "loraflow.trial_number"
    TRIAL_STATE = "loraflow.trial_state"
    OPTUNA_STORAGE = "loraflow.optuna_storage"
    OBJECTIVE = "loraflow.objective"
    BEST_RUN_ID = "loraflow.best_run_id"
    BEST_TRIAL = "loraflow.best_trial"
    # evaluate
    EVALUATED_RUN_ID = "loraflow.evaluated_run_id"
    LATEST_EVALUATION_RUN_ID = "loraflow.latest_evaluation_run_id"
    TUNED_MODEL = "loraflow.tuned_model"
    ZERO_SHOT = "loraflow.zero_shot"
    GATE_FOR_RUN_ID = "loraflow.gate_for_run_id"
    # register (run tags, then model-version tags)
    SOURCE_RUN_ID = "loraflow.source_run_id"
    REGISTER_RUN_ID = "loraflow.register_run_id"
    REGISTERED_VERSION = "loraflow.registered_version"
    GATE = "loraflow.gate"
    GATE_REASON = "loraflow.gate_reason"
    GATE_METRIC = "gate.metric"
    GATE_FORCED = "gate.forced"
    GATE_MIN_IMPROVEMENT = "gate.min_improvement"
    GATE_IMPROVEMENT = "gate.improvement"
    GATE_TUNED_SCORE = "gate.tuned_score"
    GATE_BASE_SCORE = "gate.base_score"
    GATE_DELTA_LOW = "gate.delta_low"
    GATE_DELTA_HIGH = "gate.delta_high"
    # MLflow's own
    PARENT_RUN_ID = "mlflow.parentRunId"
    RUN_NAME = "mlflow.runName"

    @staticmethod
    def step(stage: str, field: str) -> str:
        """The pipeline parent's tag for one step: `loraflow.step.train.run_id`, `...reused`."""
        return f"loraflow.step.{stage}.{field}"


# --- metric keys ---------------------------------------------------------------------------------

TRAIN_LOSS, EVAL_LOSS = "train/loss", "eval/loss"
ROLES = ("base", "tuned", "delta")
SUFFIXES = ("_std", "_ci_low", "_ci_high")


def role_key(role: str, metric: str, suffix: str = "") -> str:
    """`tuned/rougeL`, `delta/rougeL_ci_low`: the evaluation's metric keys."""
    return f"{role}/{metric}{suffix}"


def split_role_key(key: str) -> tuple[str, str, str] | None:
    """("delta", "rougeL", "_ci_low") for `delta/rougeL_ci_low`; None for keys that are not evaluation keys."""
    role, slash, rest = key.partition("/")
    if not slash or role not in ROLES:
        return None
    for suffix in SUFFIXES:
        if rest.endswith(suffix):
            return role, rest.removesuffix(suffix), suffix
    return role, rest, ""


def evaluated_metrics(metrics: dict) -> list[str]:
    """The metric names an evaluation scored (those with a `tuned/<name>` mean), sorted."""
    return sorted({parts[1] for key in metrics if (parts := split_role_key(key)) and parts[0] == "tuned"
                   and not parts[2]})


def evaluation_means(metrics: dict) -> dict:
    """The base/tuned/delta means of an evaluation's metrics, without stds or intervals."""
    return {key: value for key, value in metrics.items() if (parts := split_role_key(key)) and not parts[2]}


# --- the store and the experiment ----------------------------------------------------------------

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


def artifact_location_for(uri: str, experiment: str) -> str | None:
    """Local artifact folder beside a sqlite store; None lets a tracking server decide."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    defaults = local_defaults()
    root = Path(defaults["artifact_root"]) if uri == defaults["tracking_uri"] else db.parent / "artifacts"
    return (root / experiment).resolve().as_uri()


# MLflow 3 knows an experiment's kind from this tag ("finetuning" is a model-training kind). Its UI still
# opens on the GenAI view (traces, judges) unless the link asks for the model-training view:
# experiment_url adds ?workflowType=machine_learning (checked in headless Chromium, MLflow 3.17).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "finetuning"


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


# --- finding runs --------------------------------------------------------------------------------

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


# --- lineage, params and the stage run -----------------------------------------------------------

def git_sha(folder: Path | None = None) -> str:
    """The commit of the code that runs; uncommitted changes to the package add a hash of their diff
    (`<sha>-dirty-<hash>`), so two different edits never pass for each other. Outside git: `loraflow-<version>`."""
    from loraflow import __version__

    def git(*args):
        return subprocess.run(["git", *args], cwd=folder or Path(__file__).parent, capture_output=True, timeout=10)
    try:
        sha = git("rev-parse", "HEAD")
        if sha.returncode != 0:
            return f"loraflow-{__version__}"
        diff = git("diff", "HEAD", "--", ".").stdout  # the package's own code; docs and data do not count
        suffix = f"-dirty-{hashlib.sha256(diff).hexdigest()[:8]}" if diff.strip() else ""
        return sha.stdout.decode().strip() + suffix
    except (OSError, subprocess.SubprocessError):
        return f"loraflow-{__version__}"


TRAINING_SECTIONS = ("model", "data", "lora", "train")


def training_hash(cfg: Config) -> str:
    """A hash of the config sections that decide a trained adapter: evaluate and register look for a run
    trained with the same ones, whatever their own eval/registry settings."""
    values = cfg.to_dict()
    blob = json.dumps({name: values[name] for name in TRAINING_SECTIONS}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def lineage_tags(cfg: Config, stage: str) -> dict:
    return {Tags.STAGE: stage, Tags.PROJECT: cfg.name, Tags.GIT_SHA: git_sha(), Tags.CONFIG_HASH: cfg.config_hash(),
            Tags.TRAINING_HASH: training_hash(cfg), Tags.BASE_MODEL: cfg.model.name}


def redact(text: str) -> str:
    """`scheme://user:***@host` for every password inside a URL in `text`."""
    return re.sub(r"(//[^:/@\s]+):[^@/\s]*@", r"\1:***@", str(text))


def flat_params(cfg: Config) -> dict:
    """Config as MLflow params: dotted keys, lists as JSON, passwords in URLs as ***."""
    params = {}
    for section, values in cfg.to_dict().items():
        if not isinstance(values, dict):
            params[section] = values
            continue
        for key, value in values.items():
            value = json.dumps(value) if isinstance(value, (list, dict)) else value
            params[f"{section}.{key}"] = redact(value) if isinstance(value, str) else value
    return params


def run_status_for(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "TrialPruned":
        return "KILLED"
    return "FAILED"


def first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__


# --- metric writes that survive a busy or restarting store ---------------------------------------

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


# --- heartbeats: telling a killed run from a running one ------------------------------------------

def heartbeat_seconds() -> float:
    return float(os.environ.get("LORAFLOW_HEARTBEAT_SECONDS", "10"))


class Heartbeat:
    """Refreshes the run's heartbeat tag every few seconds from a daemon thread while the stage runs."""

    def __init__(self, run_id: str):
        import threading

        self.run_id, self.stopped = run_id, threading.Event()
        self.thread = threading.Thread(target=self.beat, name=f"heartbeat-{run_id[:8]}", daemon=True)

    def beat(self):
        client = mlflow.MlflowClient()
        while not self.stopped.wait(heartbeat_seconds()):
            with contextlib.suppress(Exception):  # a busy store misses one beat, not the run
                client.set_tag(self.run_id, Tags.HEARTBEAT, f"{time.time():.0f}")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def is_dead(run, now: float) -> bool:
    """A RUNNING run whose process is gone: on this host, its pid no longer exists; elsewhere, its heartbeat
    has been silent for LORAFLOW_STALE_SECONDS (default 30 heartbeats)."""
    tags = run.data.tags
    if Tags.HEARTBEAT not in tags:
        return False  # not started by a loraflow that beats: leave it alone
    if tags.get(Tags.HOST) == socket.gethostname() and tags.get(Tags.PID, "").isdigit():
        return not process_alive(int(tags[Tags.PID]))
    stale = float(os.environ.get("LORAFLOW_STALE_SECONDS", 30 * heartbeat_seconds()))
    return now - float(tags[Tags.HEARTBEAT]) > stale


def reap_dead_runs(uri: str) -> list[str]:
    """Mark RUNNING loraflow runs whose process died (kill -9, out of memory) KILLED; say so; return their ids."""
    client = mlflow.MlflowClient(uri)
    try:
        experiments = [e.experiment_id for e in client.search_experiments()]
        running = client.search_runs(experiments, "attributes.status = 'RUNNING'", max_results=1000) \
            if experiments else []
    except mlflow.exceptions.MlflowException:
        return []
    now, reaped = time.time(), []
    for run in running:
        if is_dead(run, now):
            client.set_tag(run.info.run_id, Tags.ERROR, "its process died without ending the run (killed?)")
            client.set_terminated(run.info.run_id, "KILLED")
            reaped.append(run.info.run_id)
    if reaped:
        from loraflow import say

        say(f"marked {len(reaped)} run(s) whose process died as KILLED: {', '.join(reaped)}")
    return reaped


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


def file_digest(path: Path, extra: str = "") -> str:
    """sha256 (16 hex) of a file's bytes plus `extra` (e.g. the reading settings)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(extra.encode())
    return digest.hexdigest()[:16]
