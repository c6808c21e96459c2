"""Optuna search over LoRA rank, alpha, learning rate (dropout, modules, layers); every trial a nested
MLflow training run under one study run.

    loraflow tune quickstart --n-trials 8
    loraflow tune quickstart --study wide --n-trials 12    # bring the study `wide` to 12 trials (resume, or join)
    loraflow tune quickstart --storage postgresql://user@db/optuna
    result = tune.run(cfg, n_trials=4)                     # TuneResult(best_run_id, best_value, ...)

The search space is `tune.*` (lora.alpha = a multiplier times lora.r; layers "all" or "last:N").
The objective is the final `eval/loss` (minimised) or a metric of the evaluate stage such as
`delta/rougeL` (maximised; the evaluation nests under the trial's run). Validation losses during
training feed the pruner (negated when maximising). Pruned trials' runs end KILLED, failed ones
FAILED, and the study goes on; trial runs carry loraflow.study/.trial_number/.trial_state tags.
Storage: --storage, else tune.storage, else a journal file beside the MLflow sqlite store (locally
.mlruns/optuna-journal.log).

Several workers share one study: see studies.py (the study-wide trial total, dead workers' trials
failed and retried once, LORAFLOW_TUNE_WORKERS).
"""
from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import socket
import time
import traceback
import warnings
from dataclasses import dataclass, field

import mlflow

from loraflow import LoraflowError, models, say, tracking, warn
from loraflow.config import Config, tune_problems, with_values
from loraflow.stages import train
from loraflow.studies import (end_trial_run, fail_dead_trials, open_storage, open_study, queue_retry, seeded_sampler,
                              storage_url, target_keeper, trial_counts, trials_toward_target, worker_threads)
from loraflow.tracking import EVAL_LOSS, Tags, first_line, redact


@dataclass
class TuneResult:
    run_id: str  # this process's study run
    study_name: str
    best_run_id: str | None
    best_trial: int | None
    best_value: float | None
    best_config: dict = field(default_factory=dict)  # dotted key -> value the best trial trained with
    counts: dict = field(default_factory=dict)  # STATES -> trials of the whole study, each counted once
    table: str = ""  # one line per trial of the study
    objective: str = ""
    storage: str = ""  # the storage URL, password hidden

    def summary_line(self) -> str:
        return (f"best: trial {self.best_trial}, run {self.best_run_id}, {self.objective}={self.best_value:.4f} "
                f"(study {self.study_name!r}, {self.storage})")


# --- search space -----------------------------------------------------------------------------

def layer_count(cfg: Config) -> int | None:
    """The base model's number of layers when a `last:N` choice needs it, else None."""
    choices = cfg.tune.layers_choices or []
    if not any(str(c).startswith("last:") for c in choices):
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(models.resolve_model_path(cfg.model.name, cfg),
                                            trust_remote_code=cfg.model.trust_remote_code)
        count = int(config.get_text_config().num_hidden_layers)
    except (OSError, ValueError, AttributeError) as exc:
        raise LoraflowError(f"tune.layers_choices: cannot read the layer count of {cfg.model.name}: "
                            f"{first_line(exc)}") from None
    too_deep = [c for c in choices if c.startswith("last:") and int(c.split(":")[1]) > count]
    if too_deep:
        raise LoraflowError(f"tune.layers_choices: {', '.join(too_deep)} but the model has {count} layers")
    return count


def suggest_config(trial, cfg: Config, num_layers: int | None) -> dict:
    """The trial's config values (dotted key -> value) drawn from the search space of tune.*."""
    tune = cfg.tune
    r = trial.suggest_categorical("lora.r", tune.r_choices)
    multiplier = trial.suggest_categorical("lora.alpha_multiplier", tune.alpha_multipliers)
    values = {"lora.r": r, "lora.alpha": max(1, round(multiplier * r)),
              "train.learning_rate": trial.suggest_float("train.learning_rate", tune.lr_low, tune.lr_high, log=True)}
    if tune.dropout_choices:
        values["lora.dropout"] = trial.suggest_categorical("lora.dropout", tune.dropout_choices)
    if tune.target_modules_choices:
        by_label = {c if isinstance(c, str) else ",".join(c): c for c in tune.target_modules_choices}
        values["lora.target_modules"] = by_label[trial.suggest_categorical("lora.target_modules", list(by_label))]
    if tune.layers_choices:
        layers = trial.suggest_categorical("lora.layers", tune.layers_choices)
        values["lora.layers_to_transform"] = None if layers == "all" else list(
            range(num_layers - int(layers.split(":")[1]), num_layers))
    return values


# --- one trial --------------------------------------------------------------------------------

def pruning_callback(trial, maximize: bool):
    """train.run's on_eval: report each validation loss (negated when maximising) and maybe prune."""
    import optuna

    reported = set()

    def on_eval(step: int, eval_loss: float) -> None:
        if step in reported:  # the final evaluation repeats the last step's
            return
        reported.add(step)
        trial.report(-eval_loss if maximize else eval_loss, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} (eval/loss {eval_loss:.4f})")
    return on_eval


def trial_tags(study_name: str, study_run_id: str, number: int) -> dict:
    return {Tags.STUDY: study_name, Tags.STUDY_RUN_ID: study_run_id, Tags.TRIAL_NUMBER: str(number)}


def start_trial_run(trial_cfg: Config, store: tracking.Store, study_run, study_name: str, number: int) -> str:
    """Create the trial's run (nested under the study run) before training, so every trial has one; it
    names its process from the start, so a worker killed before training began is still seen dead."""
    tags = {**tracking.lineage_tags(trial_cfg, "train"), **trial_tags(study_name, study_run.info.run_id, number),
            Tags.PARENT_RUN_ID: study_run.info.run_id, Tags.TRIAL_STATE: "RUNNING",
            Tags.HOST: socket.gethostname(), Tags.PID: str(os.getpid()), Tags.HEARTBEAT: f"{time.time():.0f}"}
    run = store.client().create_run(study_run.info.experiment_id, run_name=f"trial-{number}", tags=tags)
    return run.info.run_id


def train_and_score(trial, trial_cfg: Config, store: tracking.Store, run_id: str, tags: dict) -> float:
    """Train in the trial's run; the objective is its eval/loss or a metric of a nested evaluation."""
    objective = trial_cfg.tune.objective
    result = train.run(trial_cfg, store=store, run_id=run_id,  # the run exists, tagged: train logs into it
                       on_eval=pruning_callback(trial, trial_cfg.tune.direction == "maximize"))
    if objective == EVAL_LOSS:
        if math.isnan(result.eval_loss):
            raise LoraflowError("no validation rows for eval/loss: set data.val_fraction > 0")
        return result.eval_loss
    from loraflow.stages import evaluate  # the objective is the evaluate stage's metric, run nested in the trial

    with mlflow.start_run(run_id=run_id, nested=True):
        summary = evaluate.run(trial_cfg, store=store, run_id=run_id, parent_run_id=run_id, tags=tags).summary
    if objective not in summary:
        raise LoraflowError(f"the evaluation gave no {objective} (it gave {', '.join(sorted(summary))})")
    if not objective.startswith("delta/"):  # evaluate copies the deltas onto the training run itself
        store.client().log_metric(run_id, objective, summary[objective])
    return float(summary[objective])


@contextlib.contextmanager
def trial_folder_removed(trial_cfg: Config, run_id: str):
    """Remove the trial's output folder (checkpoints, best adapter) when it ends, however it ends: its run holds
    the adapter, and a trial run again starts afresh. Each would otherwise stay: two checkpoints with their
    optimizer state and the best adapter for every trial of every study."""
    try:
        yield
    finally:
        shutil.rmtree(train.run_output_dir(trial_cfg, run_id), ignore_errors=True)


def run_trial(trial, *, cfg: Config, store: tracking.Store, study_run, num_layers: int | None) -> float:
    """Optuna's objective: one nested training run; a failure is logged and scored NaN (Optuna: FAIL)."""
    import optuna

    trial.set_user_attr("worker_host", socket.gethostname())  # first: who runs it, should it die
    trial.set_user_attr("worker_pid", os.getpid())
    trial.study.sampler = seeded_sampler(cfg, trial.number)
    values = suggest_config(trial, cfg, num_layers)
    trial_cfg = with_values(cfg, values)  # validated like a user's values: a bad one fails the trial
    run_id = start_trial_run(trial_cfg, store, study_run, trial.study.study_name, trial.number)
    trial.set_user_attr("mlflow_run_id", run_id)
    trial.set_user_attr("config", values)
    client = store.client()
    try:
        with tracking.Heartbeat(run_id), trial_folder_removed(trial_cfg, run_id):
            value = train_and_score(trial, trial_cfg, store, run_id,
                                    trial_tags(trial.study.study_name, study_run.info.run_id, trial.number))
    except optuna.TrialPruned as exc:
        end_trial_run(client, run_id, "PRUNED", first_line(exc), status="KILLED")
        raise
    except Exception as exc:
        end_trial_run(client, run_id, "FAILED", first_line(exc), status="FAILED")
        trial.set_user_attr("fail_reason", first_line(exc))
        warn(f"trial {trial.number} failed (run {run_id}): {first_line(exc)}")
        if os.environ.get("LORAFLOW_DEBUG"):
            traceback.print_exc()
        return float("nan")
    except BaseException as exc:  # interrupted: the trial's run ends KILLED, the study run too; it runs again
        end_trial_run(client, run_id, "FAILED", first_line(exc), status=tracking.run_status_for(exc))
        queue_retry(trial.study, trial.number, trial.params, trial.user_attrs, "it was interrupted")
        raise
    end_trial_run(client, run_id, "COMPLETE")
    return value


# --- the study's outcome ----------------------------------------------------------------------

def log_outcome(cfg: Config, study_name: str, trials: list, study_run_id: str) -> TuneResult:
    """Trial counts, the best trial's run, config and value (of the study's `trials`) on the study run.

    Each trial is counted once: complete + pruned + failed + retried + unfinished = total.
    """
    counts = trial_counts(trials)
    mlflow.log_metrics({"tune/trials_complete": counts["COMPLETE"], "tune/trials_pruned": counts["PRUNED"],
                        "tune/trials_failed": counts["FAIL"], "tune/trials_retried": counts["RETRIED"],
                        "tune/trials_unfinished": counts["RUNNING"] + counts["WAITING"],
                        "tune/trials_total": len(trials)})
    result = TuneResult(run_id=study_run_id, study_name=study_name, best_run_id=None, best_trial=None,
                        best_value=None, counts=counts)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    if not complete:
        return result
    best = (max if cfg.tune.direction == "maximize" else min)(complete, key=lambda t: t.value)
    result.best_run_id, result.best_trial = best.user_attrs.get("mlflow_run_id"), best.number
    result.best_value = best.value
    result.best_config = best.user_attrs.get("config", best.params)
    mlflow.set_tags({Tags.BEST_RUN_ID: result.best_run_id or "", Tags.BEST_TRIAL: best.number})
    mlflow.log_params({f"best/{key}": json.dumps(value) if isinstance(value, (list, dict)) or value is None else value
                       for key, value in result.best_config.items()})
    mlflow.log_metrics({"best/value": best.value, f"best/{cfg.tune.objective}": best.value})
    return result


def log_plots(study) -> None:
    """Optuna's matplotlib plots as plots/*.png; a plot the study cannot make yet is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as optuna_plots

    trials = study.get_trials(deepcopy=False)
    complete = sum(t.state.name == "COMPLETE" for t in trials)
    plots = {"optimization_history": (optuna_plots.plot_optimization_history, complete >= 1),
             "param_importances": (optuna_plots.plot_param_importances, complete >= 2),
             "parallel_coordinate": (optuna_plots.plot_parallel_coordinate, complete >= 1),
             "intermediate_values": (optuna_plots.plot_intermediate_values, any(t.intermediate_values for t in trials))}
    for name, (plot, possible) in plots.items():
        if not possible:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot(study)
        except Exception as exc:  # e.g. importances of a study whose parameters never varied
            warn(f"skipped plots/{name}.png: {first_line(exc)}")
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        tracking.log_figure_png(figure, f"plots/{name}.png")


def format_value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else json.dumps(value) if not isinstance(value, str) else value


def trials_table(trials: list) -> str:
    """One line per trial: number, state, value, MLflow run id, the config it trained with, and retries."""
    retried_as = {t.user_attrs["retried_from"]: t.number for t in trials if "retried_from" in t.user_attrs}
    lines = [f"{'trial':>5}  {'state':<8}  {'value':>10}  {'run id':<32}  config"]
    for trial in trials:
        value = "-" if trial.value is None else f"{trial.value:.4f}"
        if trial.state.name == "PRUNED" and trial.intermediate_values:  # the value it was pruned at, and when
            value = f"{trial.intermediate_values[trial.last_step]:.4f}@{trial.last_step}"
        config = trial.user_attrs.get("config", trial.params)
        lines.append(f"{trial.number:>5}  {trial.state.name:<8}  {value:>10}  "
                     f"{trial.user_attrs.get('mlflow_run_id', '-'):<32}  "
                     + " ".join(f"{key.split('.')[-1]}={format_value(v)}" for key, v in config.items())
                     + (f"  (retried as trial {retried_as[trial.number]})" if trial.number in retried_as else "")
                     + (f"  (retry of trial {trial.user_attrs['retried_from']})" if "retried_from" in trial.user_attrs
                        else ""))
    return "\n".join(lines)


@contextlib.contextmanager
def heap_frozen():
    """Freeze what the process holds now (imported modules, config, store) until the block ends.

    Optuna collects garbage after each trial and accelerate before each Trainer's loop; each full collection
    walks every tracked object, which with torch, transformers and MLflow imported took 0.4 s, twice a trial.
    Frozen objects are skipped, so the collections walk only what the trials made.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# --- the stage --------------------------------------------------------------------------------

def check_inputs(cfg: Config, n_trials: int, url: str):
    """(storage, layer count, torch threads) or one LoraflowError listing every problem, before any run starts."""
    problems = list(tune_problems(cfg))
    if n_trials < 1:
        problems.append(f"--n-trials: must be >= 1, got {n_trials}")
    storage = num_layers = threads = None
    try:
        threads = worker_threads()
    except LoraflowError as exc:
        problems.append(str(exc))
    try:
        storage = open_storage(url)
    except LoraflowError as exc:
        problems.append(str(exc))
    try:
        num_layers = layer_count(cfg)
    except LoraflowError as exc:
        problems.append(str(exc))
    if problems:
        raise LoraflowError("cannot tune: " + "; ".join(problems))
    return storage, num_layers, threads


def run(cfg: Config, *, store: tracking.Store | None = None, n_trials: int | None = None,
        study_name: str | None = None, storage: str | None = None, parent_run_id: str | None = None,
        tags: dict | None = None) -> TuneResult:
    """Run trials of the study (created, or resumed when it exists) until it holds n_trials, with any other
    workers on it; return its best."""
    store = store or tracking.connect(cfg=cfg)
    n_trials = n_trials or cfg.tune.n_trials
    study_name = study_name or cfg.tune.study_name or cfg.name
    url = storage_url(storage, cfg)
    optuna_storage, num_layers, threads = check_inputs(cfg, n_trials, url)
    study = open_study(cfg, study_name, optuna_storage)
    if threads:
        import torch

        torch.set_num_threads(threads)  # one of LORAFLOW_TUNE_WORKERS workers: its share of the cores
    run_tags = {Tags.STUDY: study_name, Tags.OPTUNA_STORAGE: redact(url), Tags.OBJECTIVE: cfg.tune.objective,
                **(tags or {})}
    with tracking.stage_run(cfg, "tune", store, parent_run_id=parent_run_id, run_name=study_name,
                            tags=run_tags) as study_run:
        mlflow.log_params(tracking.flat_params(cfg))
        tracking.log_config(cfg)
        fail_dead_trials(study, optuna_storage)  # a restarted worker first retries what dead ones left RUNNING
        held = trials_toward_target(study.get_trials(deepcopy=False))
        if held < n_trials:
            # n_trials bounds this worker's own trials (it never needs more); the callback stops it at the target
            with heap_frozen():
                study.optimize(lambda trial: run_trial(trial, cfg=cfg, store=store, study_run=study_run,
                                                       num_layers=num_layers),
                               n_trials=n_trials, timeout=cfg.tune.timeout or None, catch=(Exception,),
                               callbacks=[target_keeper(optuna_storage, n_trials)], gc_after_trial=True,
                               show_progress_bar=True)
        else:
            say(f"study {study_name!r} already holds {held} trials (finished or running), and its target is "
                f"{n_trials}: nothing to run")
        trials = study.get_trials()  # one snapshot: other workers may still be adding trials
        result = log_outcome(cfg, study_name, trials, study_run.info.run_id)
        result.table, result.objective, result.storage = trials_table(trials), cfg.tune.objective, redact(url)
        log_plots(study)
        if result.best_run_id is None:
            failures = [t.user_attrs["fail_reason"] for t in trials if "fail_reason" in t.user_attrs]
            raise LoraflowError(f"no trial of study {study_name!r} completed"
                                + (f" (first failure: {failures[0]})" if failures else ""))
    return result
