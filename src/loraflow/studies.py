"""Optuna storages and studies, and the workers that share one: what the tune stage and register use.

    storage = studies.open_storage(studies.storage_url(None, cfg))    # journal file or database
    study = studies.open_study(cfg, "quickstart", storage)
    run_id = studies.best_trial_run_id("quickstart", cfg=cfg)           # what `register --from-study` uses

Several workers. Every process started on a study (at once, or later) is a worker with its own study
run; the best trial and counts it logs are the whole study's. `--n-trials N` (tune.n_trials) is the
study's total: a worker starts trials until the study holds N trials that finished (COMPLETE, PRUNED,
FAIL) or run in a live worker, so two workers with --n-trials 8 share 8 trials, and --n-trials 12 on a
study of 8 adds 4. Workers finishing at the same instant may each start one last trial (at most
workers - 1 beyond N). A worker killed mid-trial (kill -9, the OOM killer, a lost machine): its
trial becomes FAIL, its MLflow run KILLED, its output folder is removed (where this host sees it), and its
parameters are queued again (MAX_RETRIES times) as
a new trial with user attr `retried_from`, which a surviving worker or the next one started runs; the
dead trial does not count toward N (tune/trials_retried), its retry does. A trial interrupted by
SIGTERM or Ctrl+C is queued again the same way. How a dead worker is seen, before each trial:
- any storage: each trial records its worker's host and pid (user attrs worker_host, worker_pid);
  a RUNNING trial is dead when, on this host, that pid is gone, or, from another host, its MLflow
  run's heartbeat is stale (tracking.is_dead); a worker fails it (set_trial_state_values: of workers
  reaping at once, one wins) and queues it again. This is the journal file's heartbeat, which Optuna
  does not provide.
- a database (RDBStorage) also runs Optuna's heartbeat (every LORAFLOW_HEARTBEAT_SECONDS, grace
  LORAFLOW_STALE_SECONDS): Optuna fails trials it finds stale and hands them to the same retry.
LORAFLOW_TUNE_WORKERS=k, set when starting k workers on one machine, makes each use its share of the
cores (torch.set_num_threads(cores // k)) instead of every worker taking them all.
"""
from __future__ import annotations

import os
import shutil
import socket
import time
import warnings
from pathlib import Path

import mlflow

from loraflow import LoraflowError, tracking, warn
from loraflow.config import Config
from loraflow.tracking import Tags, first_line, redact

# Each trial is counted in one of these: Optuna's states, but a FAIL whose parameters run again is RETRIED.
STATES = ("COMPLETE", "PRUNED", "FAIL", "RETRIED", "RUNNING", "WAITING")
MAX_RETRIES = 1  # a trial killed again after its retry counts as FAIL: it may be what kills (the OOM killer)


# --- storage and study ------------------------------------------------------------------------

def storage_url(storage: str | None = None, cfg: Config | None = None) -> str:
    """--storage, else tune.storage, else a journal file beside the MLflow sqlite store or the local default."""
    if storage:
        return storage
    if cfg is not None and cfg.tune.storage:
        return cfg.tune.storage if "://" in cfg.tune.storage else str(cfg.resolve_path(cfg.tune.storage))
    uri, defaults = mlflow.get_tracking_uri(), tracking.local_defaults()
    if uri.startswith("sqlite:///") and uri != defaults["tracking_uri"]:
        return str(Path(uri.removeprefix("sqlite:///")).parent / "optuna-journal.log")
    return defaults["optuna_storage"]


def open_storage(url: str):
    """An Optuna storage: a journal file for a path ending in .log, else a database URL (RDBStorage)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if "://" not in url and not url.endswith(".log"):
        raise LoraflowError(f"Optuna storage {url!r}: expected a database URL (sqlite:///..., postgresql://...) "
                            "or a journal file path ending in .log")
    try:
        if "://" not in url:
            path = Path(url).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        with warnings.catch_warnings():  # the heartbeat arguments are experimental in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=max(1, round(tracking.heartbeat_seconds())),
                                              grace_period=stale_seconds(),
                                              heartbeat_stale_trial_callback=retry_dead_trial)
    except ImportError as exc:
        raise LoraflowError(f"Optuna storage {redact(url)}: its database driver is not installed "
                            f"({first_line(exc)})") from None
    except Exception as exc:  # unreachable server, bad URL, unwritable file: all one line for the user
        raise LoraflowError(f"cannot open Optuna storage {redact(url)}: {first_line(exc)}") from None


def seeded_sampler(cfg: Config, trial_number: int):
    """TPE seeded by tune.sampler_seed + the trial number: reproducible, and neither a resumed study
    nor a second worker on the same study draws the same points again."""
    import optuna

    return optuna.samplers.TPESampler(seed=cfg.tune.sampler_seed + trial_number,
                                      n_startup_trials=cfg.tune.sampler_startup_trials)


def make_pruner(cfg: Config):
    """tune.pruner as Optuna's pruner; rungs count training steps, so they start at the first validation."""
    import optuna

    if cfg.tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.tune.pruner_startup_trials,
                                           n_warmup_steps=cfg.tune.pruner_warmup_steps)
    if cfg.tune.pruner == "successive_halving":  # rungs at validations 1, N, N^2, ...; the best 1/N goes on
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, cfg.train.eval_steps),
                                                      reduction_factor=cfg.tune.pruner_reduction_factor)
    if cfg.tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, cfg.train.eval_steps),
                                              max_resource=cfg.train.max_steps if cfg.train.max_steps > 0 else "auto")
    return optuna.pruners.NopPruner()


def open_study(cfg: Config, study_name: str, storage):
    """Create the study, or load it (resume) when it exists; it must keep its direction and objective."""
    import optuna

    study = optuna.create_study(storage=storage, study_name=study_name, direction=cfg.tune.direction,
                                sampler=seeded_sampler(cfg, 0), pruner=make_pruner(cfg), load_if_exists=True)
    if study.direction.name.lower() != cfg.tune.direction:
        raise LoraflowError(f"study {study_name!r} was created to {study.direction.name.lower()}, but tune.direction "
                            f"is {cfg.tune.direction}: use another --study")
    objective = study.user_attrs.get("objective")
    if objective and objective != cfg.tune.objective:
        raise LoraflowError(f"study {study_name!r} optimises {objective}, but tune.objective is "
                            f"{cfg.tune.objective}: use another --study")
    if not objective:
        study.set_user_attr("objective", cfg.tune.objective)
    return study


def load_study(study_name: str, storage: str | None = None, cfg: Config | None = None):
    import optuna

    url = storage_url(storage, cfg)
    try:
        return optuna.load_study(study_name=study_name, storage=open_storage(url))
    except KeyError:
        raise LoraflowError(f"no Optuna study named {study_name!r} in {redact(url)}") from None


def best_trial_run_id(study_name: str, storage: str | None = None, cfg: Config | None = None) -> str:
    """The MLflow run id of the best completed trial of a study (what `register --from-study` uses)."""
    study = load_study(study_name, storage, cfg)
    try:
        best = study.best_trial
    except ValueError:
        raise LoraflowError(f"study {study_name!r} has no completed trial yet") from None
    if not best.user_attrs.get("mlflow_run_id"):
        raise LoraflowError(f"study {study_name!r}: trial {best.number} has no MLflow run id")
    return best.user_attrs["mlflow_run_id"]


def end_trial_run(client, run_id: str, state: str, reason: str | None = None, status: str = "FINISHED") -> None:
    """Tag the trial's state (and `reason`); end its run with `status` if training did not end it."""
    client.set_tag(run_id, Tags.TRIAL_STATE, state)
    run = client.get_run(run_id)
    if reason and Tags.ERROR not in run.data.tags:
        client.set_tag(run_id, Tags.ERROR, redact(reason)[:500])
    if run.info.status == "RUNNING":
        client.set_terminated(run_id, status)



# --- several workers: dead workers' trials, retries, the study's target -------------------------

def stale_seconds() -> int:
    """Silence after which a worker on another host is dead: tracking.is_dead's threshold, for both storages."""
    return max(1, round(float(os.environ.get("LORAFLOW_STALE_SECONDS", 30 * tracking.heartbeat_seconds()))))


def worker_gone(trial, client, now: float) -> bool:
    """Whether a RUNNING trial's worker is gone: on this host its pid is not alive; on another, the
    heartbeat of the trial's MLflow run is stale. Unknown (the trial has just started): alive."""
    host, pid = trial.user_attrs.get("worker_host"), trial.user_attrs.get("worker_pid")
    if host == socket.gethostname() and isinstance(pid, int):
        return not tracking.process_alive(pid)
    if host is None or "mlflow_run_id" not in trial.user_attrs:
        return False
    try:
        return tracking.is_dead(client.get_run(trial.user_attrs["mlflow_run_id"]), now)
    except mlflow.exceptions.MlflowException:
        return False


def queue_retry(study, number: int, params: dict, user_attrs: dict, why: str) -> None:
    """Queue trial `number`'s parameters as a new trial (user attrs retried_from, retries), up to MAX_RETRIES
    runs after the first; the new trial inherits nothing else (not the dead worker's host and pid)."""
    retries = user_attrs.get("retries", 0)
    if retries >= MAX_RETRIES:
        warn(f"trial {number}: {why}; not retried, its parameters already ran {retries + 1} times")
        return
    study.enqueue_trial(params, user_attrs={"retried_from": number, "retries": retries + 1})
    warn(f"trial {number}: {why}; its parameters are queued to run again")


def died_reason(trial) -> str:
    host, pid = trial.user_attrs.get("worker_host", "?"), trial.user_attrs.get("worker_pid", "?")
    return f"its worker (pid {pid} on {host}) died mid-trial"


def retry_dead_trial(study, trial) -> None:
    """For a trial already failed because its worker died: end its MLflow run KILLED, remove its output folder
    (checkpoints, best adapter: its retry starts afresh) and queue it again.

    Also the RDB heartbeat's stale-trial callback: what Optuna's RetryHeartbeatStaleTrialCallback does,
    with the MLflow run ended and loraflow's retry attrs, the same for both storages.
    """
    if trial.user_attrs.get("mlflow_run_id"):
        client = mlflow.MlflowClient()
        try:
            end_trial_run(client, trial.user_attrs["mlflow_run_id"], "FAILED", died_reason(trial), status="KILLED")
            remove_output_folder(client, trial.user_attrs["mlflow_run_id"])
        except mlflow.exceptions.MlflowException as exc:
            warn(f"trial {trial.number}: cannot end its MLflow run or find its output folder: {first_line(exc)}")
    queue_retry(study, trial.number, trial.params, trial.user_attrs, died_reason(trial))


def remove_output_folder(client, run_id: str) -> None:
    """Remove the folder a dead trial's run trained in (its loraflow.output_dir tag), where this host sees it:
    on the dead worker's host, or any host sharing its disk. A trial that died before training has none."""
    folder = client.get_run(run_id).data.tags.get(Tags.OUTPUT_DIR)
    if folder and Path(folder).is_dir():
        shutil.rmtree(folder, ignore_errors=True)


def fail_dead_trials(study, storage) -> list[int]:
    """Fail the study's RUNNING trials whose worker is gone and queue them again; the numbers this worker failed.

    set_trial_state_values is the claim: of several workers reaping at once, one fails the trial and
    queues its retry, the others get UpdateFinishedTrialError.
    """
    import optuna

    client, now = mlflow.MlflowClient(), time.time()
    dead = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if worker_gone(t, client, now)]
    if not dead:
        return []
    try:
        tracking.reap_dead_runs(mlflow.get_tracking_uri())  # the dead workers' study and trial runs: KILLED
    except mlflow.exceptions.MlflowException as exc:  # a busy store: retry_dead_trial still ends the trial's run
        warn(f"could not mark dead workers' runs KILLED: {first_line(exc)}")
    study_id, failed = storage.get_study_id_from_name(study.study_name), []
    for trial in dead:
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            storage.set_trial_user_attr(trial_id, "fail_reason", died_reason(trial))
            storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first, or it ended meanwhile
        retry_dead_trial(study, storage.get_trial(trial_id))
        failed.append(trial.number)
    return failed


def trial_counts(trials: list) -> dict:
    """STATES -> trials, each trial once: a FAIL whose parameters were queued again is RETRIED."""
    retried = {t.user_attrs["retried_from"] for t in trials if "retried_from" in t.user_attrs}
    counts = dict.fromkeys(STATES, 0)
    for trial in trials:
        counts["RETRIED" if trial.number in retried else trial.state.name] += 1
    return counts


def trials_toward_target(trials: list) -> int:
    """What --n-trials counts: finished trials and running ones, not a retried trial (its retry counts)."""
    counts = trial_counts(trials)
    return counts["COMPLETE"] + counts["PRUNED"] + counts["FAIL"] + counts["RUNNING"]


def target_keeper(storage, target: int):
    """Optuna's callback after each trial: fail dead workers' trials (queueing them again), then stop once
    the study holds `target`."""
    def between_trials(study, finished_trial) -> None:
        fail_dead_trials(study, storage)
        if trials_toward_target(study.get_trials(deepcopy=False)) >= target:
            study.stop()
    return between_trials


def worker_threads() -> int | None:
    """Torch threads for one of LORAFLOW_TUNE_WORKERS workers on this machine (None when unset or 1)."""
    raw = os.environ.get("LORAFLOW_TUNE_WORKERS", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise LoraflowError(f"LORAFLOW_TUNE_WORKERS: expected a number of workers >= 1, got {raw!r}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(raw)) if int(raw) > 1 else None


