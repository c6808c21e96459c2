"""`loraflow pipeline`: nested step runs under one parent, reuse of unchanged steps, the serve check,
and running under a run that `mlflow run` created."""
from __future__ import annotations

import tempfile

import mlflow
from helpers import assert_one_line_error, runs_of

STAGES = ("prepare", "train", "evaluate", "register")
FAST = {"train": {"max_steps": 2, "eval_steps": 2, "save_steps": 2, "eval_rows": 4},
        "eval": {"num_samples": 2, "max_new_tokens": 4, "metrics": ["rougeL"], "bootstrap_samples": 50},
        "registry": {"gate_metric": "rougeL", "min_improvement": -1.0}}  # the gate lets random models through


def step_runs(stage: str, status: str | None = None) -> list:
    """Runs the pipeline made for a step (the register stage's gate evaluation is not one), newest first."""
    return [r for r in runs_of(stage, status=status) if "loraflow.step_key" in r.data.tags]


def latest_pipeline_run():
    return runs_of("pipeline")[0]  # newest first


def reused(parent) -> dict:
    return {stage: parent.data.tags.get(f"loraflow.step.{stage}.reused") for stage in STAGES}


def champion_version(name: str = "tiny") -> str:
    return str(mlflow.MlflowClient().get_model_version_by_alias(name, "champion").version)


def test_failed_step_is_fixed_then_finished_steps_are_reused_and_served(tiny_llama, write_project, run_cli,
                                                                         monkeypatch, tmp_path):
    from loraflow import models

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    project = write_project(tiny_llama, **FAST)
    with monkeypatch.context() as patch:  # a fault in the register step, after training and evaluation
        patch.setattr(models, "merge_adapter", disk_full)
        code, _, err = run_cli("pipeline", project)
    assert_one_line_error(code, err, "No space left on device")
    assert latest_pipeline_run().info.status == "FAILED"
    assert [r.info.status for r in step_runs("train")] == ["FINISHED"]
    assert [r.info.status for r in step_runs("register")] == ["FAILED"]
    assert not mlflow.MlflowClient().search_registered_models("name = 'tiny'")

    code, out, err = run_cli("pipeline", project)  # fixed: prepare, train and evaluate are reused
    assert code == 0, err
    parent = latest_pipeline_run()
    assert parent.info.status == "FINISHED"
    assert reused(parent) == {"prepare": "true", "train": "true", "evaluate": "true", "register": "false"}
    version = champion_version()
    assert parent.data.tags["loraflow.registered_version"] == version
    assert "tuned/rougeL" in parent.data.metrics and "eval/loss" in parent.data.metrics
    for stage in STAGES:
        [run] = step_runs(stage, "FINISHED")
    register_run = step_runs("register", "FINISHED")[0]
    assert register_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert f"registered: models:/tiny/{version}" in out and "mlflow ui --backend-store-uri sqlite:///" in out
    assert f"/#/experiments/{parent.info.experiment_id}?workflowType=machine_learning" in out

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    with monkeypatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(scratch))
        code, out, err = run_cli("pipeline", project, "--serve-check")  # nothing changed: everything reused
    assert code == 0, err
    assert not list(scratch.iterdir())  # the server's temp folder and the check's log, once it passed
    rerun = latest_pipeline_run()
    assert rerun.info.run_id != parent.info.run_id and set(reused(rerun).values()) == {"true"}
    assert all(len(step_runs(stage, "FINISHED")) == 1 for stage in STAGES)
    assert champion_version() == version and len(mlflow.MlflowClient().search_model_versions("name='tiny'")) == 1
    assert "REST prediction: '" in out
    prediction = mlflow.artifacts.load_dict(f"runs:/{rerun.info.run_id}/serve_check/prediction.json")
    assert prediction["prompt"].startswith("Describe: ") and isinstance(prediction["prediction"], str)

    mlflow.MlflowClient().delete_model_version("tiny", version)  # a reused step's output is gone: redo it
    code, _, err = run_cli("pipeline", project)
    assert code == 0, err
    assert reused(latest_pipeline_run()) == {"prepare": "true", "train": "true", "evaluate": "true",
                                             "register": "false"}
    assert champion_version() != version


def test_changing_lora_r_reruns_train_onwards_and_reuses_prepare(tiny_llama, write_project, run_cli, monkeypatch):
    project = write_project(tiny_llama, **FAST)
    assert run_cli("pipeline", project)[0] == 0
    first_train = step_runs("train")[0]

    # the second run goes the way `mlflow run . -e pipeline` starts it: inside a run it created
    experiment_id = mlflow.get_experiment_by_name("tiny").experiment_id
    given = mlflow.MlflowClient().create_run(experiment_id, run_name="mlflow-run-entry-point")
    monkeypatch.setenv("MLFLOW_RUN_ID", given.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    code, _, err = run_cli("pipeline", project, "--set", "lora.r=2")
    assert code == 0, err
    parent = mlflow.get_run(given.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["loraflow.stage"] == "pipeline"
    assert reused(parent) == {"prepare": "true", "train": "false", "evaluate": "false", "register": "false"}
    assert len(step_runs("prepare")) == 1
    trains = step_runs("train")
    assert len(trains) == 2 and len(step_runs("evaluate")) == 2 and len(step_runs("register")) == 2
    new_train = next(r for r in trains if r.info.run_id != first_train.info.run_id)
    assert new_train.data.params["lora.r"] == "2" and first_train.data.params["lora.r"] == "4"
    assert new_train.data.tags["mlflow.parentRunId"] == given.info.run_id
    assert {r.info.experiment_id for r in runs_of("pipeline")} == {experiment_id}


def test_tune_step_replaces_train_and_its_best_trial_is_evaluated_and_registered(tiny_llama, write_project, run_cli):
    project = write_project(tiny_llama, **FAST, tune={"enabled": True, "n_trials": 2, "r_choices": [2, 4],
                                                      "pruner": "none"})
    code, out, err = run_cli("pipeline", project)
    assert code == 0, err
    parent = latest_pipeline_run()
    tune_run = mlflow.get_run(parent.data.tags["loraflow.step.tune.run_id"])
    best = tune_run.data.tags["loraflow.best_run_id"]
    assert tune_run.data.tags["loraflow.step_key"] and tune_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert "loraflow.step.train.run_id" not in parent.data.tags
    evaluation = mlflow.get_run(parent.data.tags["loraflow.step.evaluate.run_id"])
    assert evaluation.data.tags["loraflow.evaluated_run_id"] == best
    version = mlflow.MlflowClient().get_model_version_by_alias("tiny", "champion")
    assert version.tags["loraflow.source_run_id"] == best and f"best trial run {best}" in out

    assert run_cli("pipeline", project)[0] == 0  # the study is not searched again
    assert latest_pipeline_run().data.tags["loraflow.step.tune.reused"] == "true"
    assert len(runs_of("tune")) == 1
