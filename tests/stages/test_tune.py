"""`loraflow tune` on the tiny model: nested trial runs, the best run, pruning, failures, resume,
worker processes sharing one study (one of them killed mid-trial), and bad input refused before
anything starts."""
from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from helpers import assert_one_line_error, runs_of

from loraflow import LoraflowError, studies
from loraflow.training.callback import Interrupted
from loraflow.training.checkpoints import COMPLETE_MARKER
from loraflow.config import load_config
from loraflow.stages import train, tune


@pytest.fixture
def tune_project(tiny_llama, write_project):
    """project(train=None, **tune) -> a tiny project YAML whose trials train 2 steps with a validation loss
    at each (unless `train` says otherwise)."""
    def project(train=None, **tune_section):
        return write_project(tiny_llama, train={"max_steps": 2, "eval_steps": 1, "save_steps": 50, "eval_rows": 4,
                                                **(train or {})},
                             tune={"r_choices": [2, 4], "alpha_multipliers": [1, 2], "lr_low": 1e-3,
                                   "lr_high": 1e-2, "pruner": "none", **tune_section})
    return project


def trial_run(number: int, study: str = "tiny"):
    [run] = [r for r in runs_of("train") if r.data.tags.get("loraflow.study") == study
             and r.data.tags.get("loraflow.trial_number") == str(number)]
    return run


def test_trials_are_nested_runs_and_the_study_run_names_the_best(tune_project, run_cli):
    code, out, err = run_cli("tune", tune_project(), "--n-trials", "3")
    assert code == 0, err
    [study_run] = runs_of("tune")
    trials = runs_of("train", oldest_first=True)
    assert len(trials) == 3
    for run in trials:
        assert run.data.tags["mlflow.parentRunId"] == study_run.info.run_id
        assert run.info.status == "FINISHED" and run.data.tags["loraflow.trial_state"] == "COMPLETE"
        assert run.data.tags["loraflow.study"] == "tiny"
    assert sorted(r.data.tags["loraflow.trial_number"] for r in trials) == ["0", "1", "2"]
    losses = {run.info.run_id: run.data.metrics["eval/loss"] for run in trials}
    best = study_run.data.tags["loraflow.best_run_id"]
    assert best == min(losses, key=losses.get)
    assert study_run.data.metrics["best/value"] == pytest.approx(losses[best])
    assert study_run.data.metrics["best/eval/loss"] == pytest.approx(losses[best])
    assert study_run.data.metrics["tune/trials_complete"] == 3 and study_run.data.metrics["tune/trials_failed"] == 0
    best_run = mlflow.get_run(best)
    assert study_run.data.params["best/lora.r"] == best_run.data.params["lora.r"]
    assert study_run.data.params["best/lora.alpha"] == best_run.data.params["lora.alpha"]
    plots = {a.path for a in mlflow.MlflowClient().list_artifacts(study_run.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/parallel_coordinate.png",
            "plots/intermediate_values.png"} <= plots
    assert studies.best_trial_run_id("tiny") == best
    assert all(run_id in out for run_id in losses)  # the table of trials


def test_a_pruned_trial_is_killed_in_mlflow_and_pruned_in_optuna(tune_project, monkeypatch):
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda trial: trial.number == 0)
    result = tune.run(load_config(str(tune_project(pruner="median"))), n_trials=2)
    study = studies.load_study("tiny")
    assert [t.state.name for t in study.trials] == ["PRUNED", "COMPLETE"]
    assert list(study.trials[0].intermediate_values) == [1]  # pruned at its first validation
    pruned = trial_run(0)
    assert pruned.info.status == "KILLED" and pruned.data.tags["loraflow.trial_state"] == "PRUNED"
    assert study.trials[0].user_attrs["mlflow_run_id"] == pruned.info.run_id
    assert result.best_trial == 1 and result.counts["PRUNED"] == 1
    [study_run] = runs_of("tune")
    assert study_run.data.metrics["tune/trials_pruned"] == 1


def test_trials_skip_the_starting_heap_in_their_garbage_collections(tune_project, monkeypatch):
    freeze_counts = []  # objects frozen while each trial trains: what the per-trial collections skip
    train_run = train.run
    monkeypatch.setattr(train, "run", lambda *args, **kwargs: freeze_counts.append(gc.get_freeze_count())
                        or train_run(*args, **kwargs))
    tune.run(load_config(str(tune_project())), n_trials=2)
    assert len(freeze_counts) == 2 and min(freeze_counts) > 10_000  # torch, transformers, mlflow, ... imported
    assert gc.get_freeze_count() == 0  # thawed when the study ends


def test_trials_leave_their_adapters_in_their_runs_and_nothing_on_disk(tune_project, tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    project = tune_project(train={"save_steps": 1})  # a checkpoint at every step
    tune.run(load_config(str(project)), n_trials=2)
    assert not list(scratch.iterdir())
    for number in (0, 1):
        run = trial_run(number)
        assert not Path(run.data.tags["loraflow.output_dir"]).exists()  # no checkpoints, no best adapter
        assert len(mlflow.MlflowClient().list_artifacts(run.info.run_id, "adapter")) > 1


def pruning_decisions(pruner, finished: list[dict], reports: dict) -> list[bool]:
    """Whether `pruner` stops a new trial at each of its `reports` ({step: loss}), after `finished` trials
    (each {step: loss}, its last loss its value, asked at each report as tune's trials are) in a fresh
    in-memory study."""
    study = optuna.create_study(pruner=pruner)
    for losses in finished:
        trial = study.ask()
        for step, loss in losses.items():
            trial.report(loss, step)
            trial.should_prune()
        study.tell(trial, list(losses.values())[-1])
    trial, decisions = study.ask(), []
    for step, loss in reports.items():
        trial.report(loss, step)
        decisions.append(trial.should_prune())
    return decisions


@pytest.mark.parametrize("settings, finished, reports, expected", [
    # the median of the finished trials' losses at a step, once pruner_startup_trials have finished
    ({"pruner": "median"}, [{1: 1.0}, {1: 1.2}], {1: 1.5}, [True]),
    ({"pruner": "median"}, [{1: 1.0}, {1: 1.2}], {1: 1.05}, [False]),
    ({"pruner": "median", "pruner_startup_trials": 3}, [{1: 1.0}, {1: 1.2}], {1: 1.5}, [False]),
    ({"pruner": "median", "pruner_warmup_steps": 2}, [{1: 1.0, 2: 1.0}, {1: 1.2, 2: 1.2}], {1: 1.5, 2: 1.5},
     [False, True]),
    # successive halving: the best third goes on at validations 1, 3, 9; of the first two, only the better
    ({"pruner": "successive_halving"}, [{1: 1.0}], {1: 1.2}, [True]),
    ({"pruner": "successive_halving"}, [{1: 1.0}], {1: 0.9, 2: 5.0}, [False, False]),
    ({"pruner": "successive_halving"}, [{1: 1.0, 3: 0.5}], {1: 0.9, 2: 5.0, 3: 0.6}, [False, False, True]),
    ({"pruner": "successive_halving"}, [{1: 1.0}, {1: 0.8}, {1: 1.1}, {1: 1.2}, {1: 1.3}], {1: 0.9},
     [False]),  # second of six: within the best third
    ({"pruner": "successive_halving", "pruner_reduction_factor": 4}, [{1: 1.0}, {1: 0.8}, {1: 1.1}, {1: 1.2},
                                                                      {1: 1.3}], {1: 0.9}, [True]),  # not the best
    ({"pruner": "successive_halving", "pruner_reduction_factor": 2}, [{1: 1.0, 2: 0.5}], {1: 0.9, 2: 0.6},
     [False, True]),  # rungs at validations 1 and 2
    ({"pruner": "none"}, [{1: 1.0}, {1: 1.2}], {1: 9.0}, [False]),
])
def test_each_pruner_setting_stops_the_trials_it_says(tune_project, settings, finished, reports, expected):
    cfg = load_config(str(tune_project(**settings)))
    assert pruning_decisions(studies.make_pruner(cfg), finished, reports) == expected


def test_successive_halving_counts_its_rungs_in_validations(tune_project):
    cfg = load_config(str(tune_project(train={"eval_steps": 2}, pruner="successive_halving")))
    # validations at steps 2, 6, 18: a worse loss at step 1 (no validation yet) goes on, at step 2 it stops
    assert pruning_decisions(studies.make_pruner(cfg), [{2: 1.0}], {1: 1.5, 2: 1.5}) == [False, True]


def test_a_failing_trial_is_recorded_failed_and_the_study_goes_on(tune_project, run_cli, monkeypatch):
    real_run, calls = train.run, []

    def fails_first(cfg, **kwargs):
        calls.append(cfg)
        if len(calls) == 1:
            raise RuntimeError("simulated out of memory")
        return real_run(cfg, **kwargs)
    monkeypatch.setattr(train, "run", fails_first)
    code, out, err = run_cli("tune", tune_project(), "--n-trials", "2")
    assert code == 0, err
    assert "trial 0 failed" in err and "simulated out of memory" in err
    assert [t.state.name for t in studies.load_study("tiny").trials] == ["FAIL", "COMPLETE"]
    failed = trial_run(0)
    assert failed.info.status == "FAILED" and failed.data.tags["loraflow.trial_state"] == "FAILED"
    assert "simulated out of memory" in failed.data.tags["loraflow.error"]
    [study_run] = runs_of("tune")
    assert study_run.info.status == "FINISHED"
    assert study_run.data.tags["loraflow.best_run_id"] == trial_run(1).info.run_id
    assert study_run.data.metrics["tune/trials_failed"] == 1 and study_run.data.metrics["tune/trials_complete"] == 1


def test_a_study_where_no_trial_completes_fails(tune_project, run_cli, monkeypatch):
    def always_fails(cfg, **kwargs):
        raise RuntimeError("broken")
    monkeypatch.setattr(train, "run", always_fails)
    code, _, err = run_cli("tune", tune_project(), "--n-trials", "2")
    assert code == 2
    assert err.strip().splitlines()[-1] == "error: no trial of study 'tiny' completed (first failure: broken)"
    [study_run] = runs_of("tune")
    assert study_run.info.status == "FAILED"
    assert {run.info.status for run in runs_of("train")} == {"FAILED"}


def test_an_evaluation_metric_objective_evaluates_each_trial_in_a_nested_run(tune_project):
    cfg = load_config(str(tune_project(objective="tuned/rougeL", direction="maximize")))
    result = tune.run(cfg, n_trials=1)
    [trial], [evaluation], [study_run] = runs_of("train"), runs_of("evaluate"), runs_of("tune")
    assert evaluation.data.tags["mlflow.parentRunId"] == trial.info.run_id
    assert trial.info.status == evaluation.info.status == "FINISHED"
    assert result.best_run_id == trial.info.run_id
    assert result.best_value == pytest.approx(evaluation.data.metrics["tuned/rougeL"])
    assert trial.data.metrics["tuned/rougeL"] == pytest.approx(result.best_value)
    assert study_run.data.metrics["best/tuned/rougeL"] == pytest.approx(result.best_value)


def test_resuming_a_study_adds_trials_from_the_whole_search_space(tune_project, run_cli):
    project = tune_project(r_choices=[4], alpha_multipliers=[0.5], dropout_choices=[0.1],
                           target_modules_choices=[["q_proj", "v_proj"]], layers_choices=["last:1"])
    for total in (1, 2, 1):  # --n-trials is the study's total: the third call finds it past its target
        code, _, err = run_cli("tune", project, "--study", "again", "--n-trials", str(total))
        assert code == 0, err
    assert "study 'again' already holds 2 trials (finished or running), and its target is 1" in err
    study = studies.load_study("again")
    assert [t.number for t in study.trials] == [0, 1] and {t.state.name for t in study.trials} == {"COMPLETE"}
    assert len(runs_of("tune")) == 3 and len(runs_of("train")) == 2
    for run in runs_of("train", oldest_first=True):
        params = run.data.params
        assert (params["lora.r"], params["lora.alpha"], params["lora.dropout"]) == ("4", "2", "0.1")
        assert json.loads(params["lora.target_modules"]) == ["q_proj", "v_proj"]
        assert json.loads(params["lora.layers_to_transform"]) == [1]  # the last of the tiny Llama's 2 layers
        assert 1e-3 <= float(params["train.learning_rate"]) <= 1e-2


def start_worker(project: Path, study: str, n_trials: int, name: str) -> subprocess.Popen:
    """`loraflow tune` in its own process (one of two on this machine: LORAFLOW_TUNE_WORKERS=2), output
    to <name>.out / <name>.err beside the project (files, not pipes: a full pipe would block it)."""
    folder = project.parent
    command = [sys.executable, "-m", "loraflow.cli", "tune", str(project), "--n-trials", str(n_trials),
               "--study", study]
    with open(folder / f"{name}.out", "w") as out, open(folder / f"{name}.err", "w") as err:
        return subprocess.Popen(command, cwd=folder, stdout=out, stderr=err, text=True,
                                env={**os.environ, "LORAFLOW_TUNE_WORKERS": "2"})


def output_of(worker: subprocess.Popen, project: Path, name: str, timeout: float = 600) -> tuple[str, str]:
    """Wait for the worker; (stdout, stderr), after checking it exited 0."""
    code = worker.wait(timeout=timeout)
    out, err = ((project.parent / f"{name}.{stream}").read_text() for stream in ("out", "err"))
    assert code == 0, err[-3000:]
    return out, err


def test_two_worker_processes_share_one_study(tune_project):
    project = tune_project()
    workers = [start_worker(project, "shared", 4, f"worker{i}") for i in range(2)]
    outputs = [output_of(worker, project, f"worker{i}") for i, worker in enumerate(workers)]
    study = studies.load_study("shared")
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]  # --n-trials 4 is the study's total
    assert {t.state.name for t in study.trials} == {"COMPLETE"}
    assert {t.user_attrs["worker_pid"] for t in study.trials} <= {worker.pid for worker in workers}
    assert all("Traceback" not in err for _, err in outputs)
    # the libraries' chatter each trial repeated: MLflow's system-metrics lines, bitsandbytes' kernel search
    assert all("system_metrics_monitor" not in err and "kernels-community" not in err for _, err in outputs)
    run_ids = {t.user_attrs["mlflow_run_id"] for t in study.trials}
    assert run_ids == {run.info.run_id for run in runs_of("train")}
    assert {run.info.status for run in runs_of("train")} == {"FINISHED"}
    study_runs = runs_of("tune")
    assert len(study_runs) == 2 and {run.data.tags["loraflow.study"] for run in study_runs} == {"shared"}


@pytest.mark.parametrize("args, expected", [
    (["--set", "tune.lr_low=0.1", "--set", "tune.lr_high=0.01"], ["need 0 < lr_low <= lr_high"]),
    (["--set", "tune.r_choices=[]", "--set", "tune.lr_low=0"], ["tune.r_choices", "0 < lr_low"]),
    (["--set", "tune.objective=tuned/bleu"], ["tune.objective"]),
    (["--set", "tune.pruner=successive_halving", "--set", "tune.pruner_reduction_factor=1"],
     ["tune.pruner_reduction_factor: must be >= 2, got 1"]),
    (["--set", "tune.layers_choices=[last:3]"], ["last:3 but the model has 2 layers"]),
    (["--storage", "postgresql://nobody@127.0.0.1:1/none"], ["Optuna storage postgresql://nobody@127.0.0.1:1/none"]),
    (["--storage", "sqlite:////no/such/folder/optuna.db"], ["cannot open Optuna storage sqlite:////no/such/folder"]),
])
def test_bad_input_is_one_error_line_before_any_run(tune_project, run_cli, tmp_path, args, expected):
    code, out, err = run_cli("tune", tune_project(), *args)
    assert code == 2, err
    line = assert_one_line_error(code, err)
    assert err.strip().endswith(line), err
    for text in expected:
        assert text in line
    store_created = (tmp_path / "mlflow.db").exists()  # config errors stop before the store is opened
    assert not store_created or not runs_of()
    journal = tmp_path / "optuna-journal.log"
    assert not journal.exists() or not optuna.study.get_all_study_names(studies.open_storage(str(journal)))


def test_a_study_keeps_its_direction(tune_project, run_cli, tmp_path):
    optuna.create_study(study_name="tiny", direction="maximize",
                        storage=studies.open_storage(str(tmp_path / "optuna-journal.log")))
    code, _, err = run_cli("tune", tune_project(), "--n-trials", "1")
    assert code == 2 and "study 'tiny' was created to maximize, but tune.direction is minimize" in err
    assert not runs_of()


def checkpointed_trial(study_name: str, pid: int):
    """The RUNNING trial of worker `pid` once its training run wrote a complete checkpoint, else None."""
    try:
        trials = studies.load_study(study_name).get_trials(states=(optuna.trial.TrialState.RUNNING,))
    except LoraflowError:  # the study is not created yet
        return None
    for trial in trials:
        if trial.user_attrs.get("worker_pid") == pid and "mlflow_run_id" in trial.user_attrs:
            output_dir = mlflow.get_run(trial.user_attrs["mlflow_run_id"]).data.tags.get("loraflow.output_dir")
            if output_dir and any(Path(output_dir).glob(f"checkpoint-*/{COMPLETE_MARKER}")):
                return trial
    return None


def test_a_worker_killed_mid_trial_has_its_trial_failed_killed_and_retried(tune_project):
    project = tune_project(train={"max_steps": 50, "eval_steps": 50, "save_steps": 1})  # killed at its first checkpoint
    doomed, survivor = start_worker(project, "kill", 2, "doomed"), start_worker(project, "kill", 2, "survivor")
    deadline = time.monotonic() + 300
    while (killed := checkpointed_trial("kill", doomed.pid)) is None:
        assert doomed.poll() is None, (project.parent / "doomed.err").read_text()[-3000:]
        assert time.monotonic() < deadline, "the doomed worker never checkpointed a trial"
        with contextlib.suppress(subprocess.TimeoutExpired):
            doomed.wait(timeout=0.2)  # the pause between two looks; returns at once should it exit
    os.kill(doomed.pid, signal.SIGKILL)
    assert doomed.wait(timeout=60) == -signal.SIGKILL
    workers = {"survivor": survivor}
    out, _ = output_of(survivor, project, "survivor")
    if any(t.state.name in ("RUNNING", "WAITING") for t in studies.load_study("kill").trials):
        # the survivor ended its trials while the doomed worker still lived: a restarted worker retries
        workers["restarted"] = start_worker(project, "kill", 2, "restarted")
        out, _ = output_of(workers["restarted"], project, "restarted")
    last_worker = list(workers.values())[-1]

    trials = studies.load_study("kill").trials
    assert sorted(t.number for t in trials) == [0, 1, 2]  # 2 counted trials and the dead one: nothing lost
    [dead] = [t for t in trials if t.number == killed.number]
    assert dead.state.name == "FAIL" and dead.user_attrs["worker_pid"] == doomed.pid
    [retry] = [t for t in trials if t.user_attrs.get("retried_from") == dead.number]  # retried exactly once
    assert retry.params == dead.params and retry.state.name == "COMPLETE"
    assert retry.user_attrs["worker_pid"] in {worker.pid for worker in workers.values()}
    assert sorted(t.state.name for t in trials if t.number != dead.number) == ["COMPLETE", "COMPLETE"]
    dead_run = mlflow.get_run(dead.user_attrs["mlflow_run_id"])
    assert dead_run.info.status == "KILLED" and dead_run.data.tags["loraflow.trial_state"] == "FAILED"
    assert not Path(dead_run.data.tags["loraflow.output_dir"]).exists()  # its checkpoint: removed by its reaper
    assert {r.info.run_id for r in runs_of("train")} == {t.user_attrs["mlflow_run_id"] for t in trials}
    assert {r.info.status for r in runs_of("train") if r.info.run_id != dead_run.info.run_id} == {"FINISHED"}
    study_runs = {run.data.tags["loraflow.pid"]: run for run in runs_of("tune")}
    assert study_runs[str(doomed.pid)].info.status == "KILLED"  # the dead worker's study run too
    last_run = study_runs[str(last_worker.pid)]
    assert last_run.info.status == "FINISHED"
    metrics = {key.removeprefix("tune/trials_"): value for key, value in last_run.data.metrics.items()
               if key.startswith("tune/trials_")}
    assert metrics == {"complete": 2, "pruned": 0, "failed": 0, "retried": 1, "unfinished": 0, "total": 3}
    table_numbers = [int(line.split()[0]) for line in out.splitlines() if line.split() and line.split()[0].isdigit()]
    assert sorted(table_numbers) == [0, 1, 2]  # each trial one line of the table
    assert f"(retried as trial {retry.number})" in out and f"(retry of trial {dead.number})" in out
    reaper_err = "".join((project.parent / f"{name}.err").read_text() for name in workers)
    assert f"trial {dead.number}: its worker (pid {doomed.pid} on " in reaper_err
    assert "its parameters are queued to run again" in reaper_err


def test_an_interrupted_trial_runs_again_in_the_next_worker(tune_project, monkeypatch):
    cfg = load_config(str(tune_project()))
    real_run = train.run

    def interrupted(cfg, **kwargs):
        raise Interrupted(signal.SIGTERM, kwargs["run_id"])
    monkeypatch.setattr(train, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tune.run(cfg, n_trials=1)
    monkeypatch.setattr(train, "run", real_run)
    result = tune.run(cfg, n_trials=1)  # the study's total is 1: the retry of the interrupted trial is it
    first, second = studies.load_study("tiny").trials
    assert (first.state.name, second.state.name) == ("FAIL", "COMPLETE")
    assert second.user_attrs["retried_from"] == 0 and second.params == first.params
    interrupted_run = trial_run(0)
    assert interrupted_run.info.status == "KILLED" and interrupted_run.data.tags["loraflow.trial_state"] == "FAILED"
    assert result.best_trial == 1 and result.counts["RETRIED"] == 1 and result.counts["COMPLETE"] == 1
    metrics = runs_of("tune")[0].data.metrics  # the second worker's study run
    assert (metrics["tune/trials_retried"], metrics["tune/trials_failed"], metrics["tune/trials_total"]) == (1, 0, 2)


def test_a_database_study_hands_stale_trials_to_the_same_retry(tmp_path, monkeypatch):
    """RDBStorage: Optuna's heartbeat (LORAFLOW_HEARTBEAT_SECONDS, grace LORAFLOW_STALE_SECONDS) and, for a
    trial it finds stale, what optuna.storages.fail_stale_trials does: FAIL, then the storage's callback."""
    monkeypatch.setenv("LORAFLOW_HEARTBEAT_SECONDS", "2")
    monkeypatch.setenv("LORAFLOW_STALE_SECONDS", "7")
    storage = studies.open_storage(f"sqlite:///{tmp_path}/optuna.db")
    assert (storage.get_heartbeat_interval(), storage.grace_period) == (2, 7)
    study = optuna.create_study(storage=storage, study_name="db")
    trial = study.ask()
    r = trial.suggest_categorical("lora.r", [2, 4, 8])
    client = mlflow.MlflowClient()
    run = client.create_run(client.create_experiment("db"), tags={"loraflow.trial_state": "RUNNING"})
    trial.set_user_attr("mlflow_run_id", run.info.run_id)
    trial.set_user_attr("worker_host", "elsewhere")
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name("db"), 0)
    storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
    storage.get_heartbeat_stale_trial_callback()(study, storage.get_trial(trial_id))
    dead_run = client.get_run(run.info.run_id)
    assert dead_run.info.status == "KILLED" and dead_run.data.tags["loraflow.trial_state"] == "FAILED"
    retry = study.ask()
    assert retry.suggest_categorical("lora.r", [2, 4, 8]) == r
    assert retry.user_attrs == {"retried_from": 0, "retries": 1}  # not the dead worker's host, pid or run


def test_workers_share_the_cores_and_a_bad_worker_count_is_refused(tune_project, run_cli, monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LORAFLOW_TUNE_WORKERS", "2")
    assert studies.worker_threads() == max(1, cores // 2)
    monkeypatch.setenv("LORAFLOW_TUNE_WORKERS", "1")
    assert studies.worker_threads() is None  # one worker: torch's own default
    monkeypatch.setenv("LORAFLOW_TUNE_WORKERS", "two")
    code, _, err = run_cli("tune", tune_project(), "--n-trials", "1")
    assert_one_line_error(code, err, "LORAFLOW_TUNE_WORKERS: expected a number of workers >= 1, got 'two'")
    assert not runs_of()


def test_a_trial_whose_worker_on_another_host_went_silent_is_failed_and_queued_again(tmp_path):
    storage = studies.open_storage(str(tmp_path / "optuna-journal.log"))
    study = optuna.create_study(storage=storage, study_name="hosts")
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("hosts")
    silent_for = {"silent": studies.stale_seconds() + 60, "beating": 0, "just started": None}
    for name, seconds in silent_for.items():
        trial = study.ask()
        trial.suggest_categorical("lora.r", [2, 4, 8])
        if seconds is None:  # asked, but its worker has not written who it is yet
            continue
        output_dir = tmp_path / "trials" / name  # on a disk both hosts share
        (output_dir / "checkpoint-1").mkdir(parents=True)
        tags = {"loraflow.host": "elsewhere", "loraflow.pid": "1", "loraflow.trial_state": "RUNNING",
                "loraflow.heartbeat": f"{time.time() - seconds:.0f}", "loraflow.output_dir": str(output_dir)}
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        trial.set_user_attr("worker_host", "elsewhere")
        trial.set_user_attr("worker_pid", 1)
    assert studies.fail_dead_trials(study, storage) == [0]
    assert studies.fail_dead_trials(study, storage) == []  # failed once: nothing left to claim
    silent, beating, just_started, retry = study.trials
    assert (silent.state.name, beating.state.name, just_started.state.name) == ("FAIL", "RUNNING", "RUNNING")
    assert silent.user_attrs["fail_reason"] == "its worker (pid 1 on elsewhere) died mid-trial"
    assert retry.state.name == "WAITING" and retry.user_attrs == {"retried_from": 0, "retries": 1}
    silent_run = client.get_run(silent.user_attrs["mlflow_run_id"])
    assert silent_run.info.status == "KILLED" and silent_run.data.tags["loraflow.trial_state"] == "FAILED"
    assert client.get_run(beating.user_attrs["mlflow_run_id"]).info.status == "RUNNING"
    assert sorted(p.name for p in (tmp_path / "trials").iterdir()) == ["beating"]  # the dead trial's folder is gone
    assert studies.trial_counts(study.trials) == {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0, "RETRIED": 1, "RUNNING": 2,
                                               "WAITING": 1}
