"""The CLI's contract: --help explains, bad input gives one `error:` line, a non-zero exit and no
FINISHED run; MLproject entry points run through `mlflow run`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_one_line_error, runs_of

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "train", "evaluate", "tune", "register", "serve", "pipeline")


def last_line(err: str) -> str:
    """The last stderr line that is not an MLflow INFO log line: the error comes last."""
    return [line for line in err.strip().splitlines() if " INFO " not in line][-1]


@pytest.mark.parametrize("stage", STAGES)
def test_help_explains_each_stage(run_cli, stage):
    code, out, _ = run_cli(stage, "--help")
    assert code == 0 and "--set KEY=VALUE" in out and "--tracking-uri" in out and "PROJECT" in out


def test_missing_data_file(tiny_llama, write_project, run_cli):
    code, _, err = run_cli("train", write_project(tiny_llama, data={"path": "nowhere.jsonl"}))
    assert assert_one_line_error(code, err, "data file not found") == last_line(err), err
    assert not runs_of(status="FINISHED")


def test_unreadable_format(tiny_llama, write_project, run_cli, tmp_path):
    (tmp_path / "rows.jsonl").write_text("this is not json\nnor this\n")
    code, _, err = run_cli("train", write_project(tiny_llama, data={"path": "rows.jsonl"}))
    assert assert_one_line_error(code, err, "cannot read") == last_line(err), err
    assert not runs_of(status="FINISHED")


def test_field_that_does_not_exist(tiny_llama, write_project, run_cli):
    code, _, err = run_cli("prepare", write_project(tiny_llama, data={"prompt_template": "{nope}"}))
    assert assert_one_line_error(code, err, "field 'nope' not found") == last_line(err), err
    assert not runs_of(status="FINISHED")


def test_empty_after_filtering(tiny_llama, write_project, run_cli, tmp_path):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"title": "a", "content": ""}) + "\n")
    code, _, err = run_cli("train", write_project(tiny_llama, data={"path": "rows.jsonl"}))
    assert assert_one_line_error(code, err, "no usable rows") == last_line(err), err
    assert not runs_of(status="FINISHED")


def test_invalid_config_values_are_reported_together(tiny_llama, write_project, run_cli):
    code, _, err = run_cli("train", write_project(tiny_llama), "--set", "lora.r=0", "--set",
                           "train.learning_rate=-1", "--set", "model.quantization=nf3", "--set", "lora.rank=4")
    assert assert_one_line_error(code, err, "invalid config") == last_line(err), err
    for part in ("lora.r: must be > 0", "train.learning_rate: must be > 0", "model.quantization", "lora.rank"):
        assert part in err


def test_model_that_cannot_be_found(write_project, run_cli, tmp_path):
    code, _, err = run_cli("train", write_project(tmp_path / "no-such-model"))
    assert assert_one_line_error(code, err, "model not found") == last_line(err), err
    assert not runs_of(status="FINISHED")


def test_unknown_project(run_cli):
    code, _, err = run_cli("train", "no-such-project")
    assert assert_one_line_error(code, err, "unknown project 'no-such-project'") == last_line(err), err


def test_mlflow_run_train_entry_point(tiny_llama, write_project, isolated_tracking):
    project = write_project(tiny_llama, train={"max_steps": 2})
    env = {**os.environ, "MLFLOW_TRACKING_URI": isolated_tracking, "PATH": f"{Path(sys.executable).parent}:"
           + os.environ["PATH"]}
    done = subprocess.run([sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "train", "--env-manager",
                           "local", "--experiment-name", "via-mlproject", "-P", f"project={project}",
                           "-P", "overrides=train.max_steps=2 lora.r=2"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [run] = runs_of(experiment="via-mlproject")
    assert run.info.status == "FINISHED" and run.data.params["lora.r"] == "2"
    assert run.data.tags["loraflow.stage"] == "train" and "train/loss" in run.data.metrics
