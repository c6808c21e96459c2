"""`loraflow tune` on the tiny model: nested trial runs, the best run, pruning, failures, resume,
two worker processes on one study, and bad input refused before anything starts."""
from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import optuna
import pytest
from helpers import assert_one_line_error, runs_of

from loraflow import train, tune
from loraflow.config import load_config


@pytest.fixture
def tune_project(tiny_llama, write_project):
    """project(**tune) -> a tiny project YAML whose trials train 2 steps with a validation loss at each."""
    def project(**tune_section):
        return write_project(tiny_llama, train={"max_steps": 2, "eval_steps": 1, "save_steps": 50, "eval_rows": 4},
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
    assert tune.best_trial_run_id("tiny") == best
    assert all(run_id in out for run_id in losses)  # the table of trials


def test_a_pruned_trial_is_killed_in_mlflow_and_pruned_in_optuna(tune_project, monkeypatch):
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda trial: trial.number == 0)
    result = tune.run(load_config(str(tune_project(pruner="median"))), n_trials=2)
    study = tune.load_study("tiny")
    assert [t.state.name for t in study.trials] == ["PRUNED", "COMPLETE"]
    assert list(study.trials[0].intermediate_values) == [1]  # pruned at its first validation
    pruned = trial_run(0)
    assert pruned.info.status == "KILLED" and pruned.data.tags["loraflow.trial_state"] == "PRUNED"
    assert study.trials[0].user_attrs["mlflow_run_id"] == pruned.info.run_id
    assert result.best_trial == 1 and result.counts["PRUNED"] == 1
    [study_run] = runs_of("tune")
    assert study_run.data.metrics["tune/trials_pruned"] == 1


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
    assert [t.state.name for t in tune.load_study("tiny").trials] == ["FAIL", "COMPLETE"]
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
    for _ in range(2):
        code, _, err = run_cli("tune", project, "--study", "again", "--n-trials", "1")
        assert code == 0, err
    study = tune.load_study("again")
    assert [t.number for t in study.trials] == [0, 1] and {t.state.name for t in study.trials} == {"COMPLETE"}
    assert len(runs_of("tune")) == 2 and len(runs_of("train")) == 2
    for run in runs_of("train", oldest_first=True):
        params = run.data.params
        assert (params["lora.r"], params["lora.alpha"], params["lora.dropout"]) == ("4", "2", "0.1")
        assert json.loads(params["lora.target_modules"]) == ["q_proj", "v_proj"]
        assert json.loads(params["lora.layers_to_transform"]) == [1]  # the last of the tiny Llama's 2 layers
        assert 1e-3 <= float(params["train.learning_rate"]) <= 1e-2


def test_two_worker_processes_share_one_study(tune_project, tmp_path):
    command = [sys.executable, "-m", "loraflow.cli", "tune", str(tune_project()), "--n-trials", "2",
               "--study", "shared"]
    workers = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], [err[-2000:] for _, err in outputs]
    study = tune.load_study("shared")
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    assert {t.state.name for t in study.trials} == {"COMPLETE"}
    run_ids = {t.user_attrs["mlflow_run_id"] for t in study.trials}
    assert run_ids == {run.info.run_id for run in runs_of("train")}
    assert {run.info.status for run in runs_of("train")} == {"FINISHED"}
    study_runs = runs_of("tune")
    assert len(study_runs) == 2 and {run.data.tags["loraflow.study"] for run in study_runs} == {"shared"}


@pytest.mark.parametrize("args, expected", [
    (["--set", "tune.lr_low=0.1", "--set", "tune.lr_high=0.01"], ["need 0 < lr_low <= lr_high"]),
    (["--set", "tune.r_choices=[]", "--set", "tune.lr_low=0"], ["tune.r_choices", "0 < lr_low"]),
    (["--set", "tune.objective=tuned/bleu"], ["tune.objective"]),
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
    assert not journal.exists() or not optuna.study.get_all_study_names(tune.open_storage(str(journal)))


def test_a_study_keeps_its_direction(tune_project, run_cli, tmp_path):
    optuna.create_study(study_name="tiny", direction="maximize",
                        storage=tune.open_storage(str(tmp_path / "optuna-journal.log")))
    code, _, err = run_cli("tune", tune_project(), "--n-trials", "1")
    assert code == 2 and "study 'tiny' was created to maximize, but tune.direction is minimize" in err
    assert not runs_of()
