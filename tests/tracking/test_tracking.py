"""The run contract: experiment resolution, the one run search, metric keys, redaction, reaping dead runs."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import mlflow
import pytest

from loraflow import LoraflowError, tracking
from loraflow.config import from_dict
from loraflow.tracking import Tags


@pytest.fixture
def cfg():
    return from_dict({"name": "proj", "data": {"path": "builtin:catalogue"}})


def test_connect_picks_the_named_experiment_else_the_project_and_marks_it_model_training(cfg, isolated_tracking):
    named = tracking.connect(isolated_tracking, "chosen", cfg)
    default = tracking.connect(None, None, cfg)
    assert named.uri == default.uri == isolated_tracking
    assert mlflow.get_experiment(named.experiment_id).name == "chosen"
    assert mlflow.get_experiment(default.experiment_id).name == "proj"
    assert mlflow.get_experiment(default.experiment_id).tags["mlflow.experimentKind"] == "finetuning"
    with mlflow.start_run(experiment_id=named.experiment_id):  # a nested stage inherits the active run's
        assert tracking.connect(None, None, cfg).experiment_id == named.experiment_id


def test_find_runs_filters_by_every_field_and_leaves_out_trials_when_asked(cfg):
    store = tracking.connect(cfg=cfg)

    def make(status="FINISHED", **tags):
        with mlflow.start_run(experiment_id=store.experiment_id, tags=tags) as run:
            mlflow.end_run(status)
        return run.info.run_id
    train = make(**{Tags.STAGE: "train", Tags.PROJECT: "proj", Tags.CONFIG_HASH: "a"})
    trial = make(**{Tags.STAGE: "train", Tags.PROJECT: "proj", Tags.CONFIG_HASH: "a", Tags.TRIAL_NUMBER: "0"})
    failed = make("FAILED", **{Tags.STAGE: "train", Tags.PROJECT: "proj", Tags.CONFIG_HASH: "a"})
    other = make(**{Tags.STAGE: "train", Tags.PROJECT: "proj", Tags.CONFIG_HASH: "b"})
    make(**{Tags.STAGE: "evaluate", Tags.PROJECT: "proj"})

    def ids(**filters):
        return [run.info.run_id for run in tracking.find_runs(store, **filters)]
    assert ids(stage="train") == [other, failed, trial, train]  # newest first
    assert ids(stage="train", status="FINISHED", config_hash="a") == [trial, train]
    assert ids(stage="train", status="FINISHED", config_hash="a", trials=False) == [train]
    assert ids(stage="train", status="FAILED") == [failed]
    with pytest.raises(LoraflowError, match="unknown run id 'nope'"):
        tracking.get_run("nope", store)


def test_metric_keys_round_trip():
    assert tracking.role_key("delta", "rougeL", "_ci_low") == "delta/rougeL_ci_low"
    assert tracking.split_role_key("delta/rougeL_ci_low") == ("delta", "rougeL", "_ci_low")
    assert tracking.split_role_key("tuned/token_f1_std") == ("tuned", "token_f1", "_std")
    assert tracking.split_role_key("train/loss") is None
    summary = {"base/rougeL": 0.1, "tuned/rougeL": 0.2, "tuned/rougeL_std": 0.0, "delta/rougeL_ci_high": 0.3,
               "tuned/loss": 1.0, "eval/loss": 2.0}
    assert tracking.evaluated_metrics(summary) == ["loss", "rougeL"]
    assert tracking.evaluation_means(summary) == {"base/rougeL": 0.1, "tuned/rougeL": 0.2, "tuned/loss": 1.0}


def test_passwords_in_urls_are_redacted():
    assert tracking.redact("postgresql://me:s3cret@db:5432/x and http://u:p@h/") == \
        "postgresql://me:***@db:5432/x and http://u:***@h/"
    assert tracking.redact("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"


def test_a_run_whose_process_died_is_marked_killed_and_a_live_one_is_not(cfg):
    store = tracking.connect(cfg=cfg)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def running(pid: int, host: str = socket.gethostname(), beat: float = time.time()) -> str:
        run = store.client().create_run(store.experiment_id, tags={
            Tags.HOST: host, Tags.PID: str(pid), Tags.HEARTBEAT: f"{beat:.0f}"})
        return run.info.run_id
    gone, alive = running(dead.pid), running(os.getpid())
    silent_elsewhere, beating_elsewhere = running(1, "another-host", time.time() - 10_000), running(1, "another-host")
    reaped = tracking.reap_dead_runs(store.uri)
    assert sorted(reaped) == sorted([gone, silent_elsewhere])
    statuses = {run_id: store.client().get_run(run_id).info.status
                for run_id in (gone, alive, silent_elsewhere, beating_elsewhere)}
    assert statuses == {gone: "KILLED", alive: "RUNNING", silent_elsewhere: "KILLED", beating_elsewhere: "RUNNING"}


def test_code_version_hashes_uncommitted_changes_so_two_edits_never_match(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-qm", "one")
    head = git("rev-parse", "HEAD")
    assert tracking.git_sha(tmp_path) == head
    (tmp_path / "code.py").write_text("x = 2\n")
    first = tracking.git_sha(tmp_path)
    (tmp_path / "code.py").write_text("x = 3\n")
    second = tracking.git_sha(tmp_path)
    assert first.startswith(f"{head}-dirty-") and second.startswith(f"{head}-dirty-") and first != second
    (tmp_path / "code.py").write_text("x = 1\n")
    assert tracking.git_sha(tmp_path) == head
