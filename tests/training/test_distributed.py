"""`loraflow train --nproc 2`: one run for the job, trained like one process with twice the batch.

    pytest tests/training/test_distributed.py -s     # -s also prints the 1 vs 2 process tokens/s of docs/distributed.md

Two CPU processes (gloo) share this machine's cores; each gets cores // 2 threads (the launcher sets
OMP_NUM_THREADS). Skips where torch.distributed has no gloo backend.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch.distributed
from helpers import assert_one_line_error, runs_of

from loraflow import data, generation, models
from loraflow.config import FSDP1_ONLY, FSDP_OPTIONS, load_config

pytestmark = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

# Both jobs see the same rows in the same order at every step (see test below), so the curves differ only
# by float32 rounding: one batch of 4 against two of 2 (each padded to its own longest row), summed on each
# rank, then the gradients averaged by all-reduce. Measured: under 1e-6 relative; a wrong scaling of the
# gradient (a doubled learning rate, a mean of means) moves the loss by more than 1e-3 within a few steps.
RELATIVE_TOLERANCE = 1e-4


def label_tokens(project: Path) -> int:
    """What train/tokens must be for one epoch: the loss positions (causal labels shifted by one) of every
    training example, from the prepared rows."""
    cfg = load_config(str(project))
    examples = data.training_examples(data.prepare(cfg).splits["train"], models.load_tokenizer(cfg.model.name), cfg)
    return sum(sum(label != data.IGNORE_INDEX for label in e["labels"][1:]) for e in examples)


def curve(run, key: str) -> dict[int, float]:
    return {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, key)}


def test_two_processes_train_like_one_with_twice_the_batch(tiny_llama, write_project, run_cli, tmp_path):
    """One epoch (so both see every training row once) with dropout off and the same seed: per-device batch 2
    on 2 processes against batch 4 in one process."""
    project = write_project(tiny_llama, data={"max_length": 96}, lora={"dropout": 0.0},
                            train={"max_steps": -1, "epochs": 1, "eval_steps": 4, "save_steps": 4})
    code, _, err = run_cli("train", project, "--set", "train.batch_size=4", "--experiment", "one-process")
    assert code == 0, err
    code, _, err = run_cli("train", project, "--nproc", "2", "--set", "train.batch_size=2",
                           "--experiment", "two-processes")
    assert code == 0, err
    [single] = runs_of("train", experiment="one-process")
    [job] = runs_of(experiment="two-processes")  # one run of any kind: the other rank made none
    assert job.info.status == "FINISHED" and job.data.tags["loraflow.stage"] == "train"

    for key in ("train/loss", "eval/loss"):
        expected, got = curve(single, key), curve(job, key)
        assert sorted(got) == sorted(expected) and len(expected) >= 3, key
        for step, value in expected.items():
            assert got[step] == pytest.approx(value, rel=RELATIVE_TOLERANCE), (key, step)
    one, two = single.data.metrics, job.data.metrics
    assert one["train/global_batch_size"] == two["train/global_batch_size"] == 4
    assert (one["train/world_size"], two["train/world_size"]) == (1, 2)
    assert one["train/tokens"] == two["train/tokens"] == label_tokens(project)
    assert two["train/steps"] == one["train/steps"]

    # one set of checkpoints and one adapter, beside the job's one run
    runs_folder = tmp_path / "outputs" / "tiny"
    assert {p.name for p in runs_folder.iterdir()} == {single.info.run_id, job.info.run_id}
    output_dir = Path(job.data.tags["loraflow.output_dir"])
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    last = int(two["train/steps"])
    assert [p.name for p in checkpoints][-1] == f"checkpoint-{last}"
    for folder in checkpoints:
        marker = json.loads((folder / "loraflow_checkpoint.json").read_text())
        assert marker["world_size"] == 2
        assert {p.name for p in folder.glob("rng_state*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert json.loads((checkpoints[-1] / "loraflow_checkpoint.json").read_text())["tokens"] == two["train/tokens"]
    models_logged = mlflow.search_logged_models(experiment_ids=[job.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in models_logged] == [job.info.run_id]

    ratio = two["train/tokens_per_second"] / one["train/tokens_per_second"]
    print(f"\ntrain/tokens_per_second: 1 process {one['train/tokens_per_second']:.0f}, 2 processes "
          f"{two['train/tokens_per_second']:.0f} (ratio {ratio:.2f}; both on the same cores)")


def test_every_epoch_the_ranks_split_one_order(tiny_llama, write_project, run_cli):
    """Rows of unequal length and LoRA dropout: on CPU the dropout of unequal batches moves each rank's random
    generator differently, and group_by_length reshuffles with it before each epoch. Two epochs must still
    train every row twice, no row more often: the ranks split one order."""
    project = write_project(tiny_llama, data={"max_length": 256}, lora={"dropout": 0.1},
                            train={"max_steps": -1, "epochs": 2, "batch_size": 2, "eval_steps": 1000})
    code, _, err = run_cli("train", project, "--nproc", "2")
    assert code == 0, err
    [job] = runs_of("train")
    assert job.data.metrics["train/tokens"] == 2 * label_tokens(project)


def test_an_fsdp_job_logs_the_whole_adapter(tiny_llama, write_project, run_cli, tmp_path):
    """FSDP2 (full_shard) on 2 CPU processes: the best adapter is gathered from both shards, so the logged one
    scores the logged eval/best_loss again."""
    project = write_project(tiny_llama, train={"batch_size": 2, "fsdp": "full_shard auto_wrap"})
    code, _, err = run_cli("train", project, "--nproc", "2")
    assert code == 0, err
    [job] = runs_of("train")
    cfg = load_config(str(project))
    base, tokenizer = models.load_model(cfg, cfg.model.name)
    adapter = models.load_adapter(base, mlflow.artifacts.download_artifacts(run_id=job.info.run_id,
                                                                            artifact_path="adapter",
                                                                            dst_path=str(tmp_path)))
    rows = data.prepare(cfg).splits["validation"][:cfg.train.eval_rows]
    assert generation.validation_loss(adapter, tokenizer, rows, cfg) == pytest.approx(
        job.data.metrics["eval/best_loss"], abs=1e-5)
    assert job.data.metrics["train/trainable_params"] == sum(
        p.numel() for name, p in adapter.named_parameters() if "lora_" in name)


def wait_for(pattern: str, folder: Path, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not list(folder.glob(pattern)):
        assert time.monotonic() < deadline, f"no {pattern} after {seconds} s"
        time.sleep(0.05)


def test_sigterm_ends_the_job_killed_once_and_it_resumes_with_as_many_processes(tiny_llama, write_project,
                                                                                 run_cli, tmp_path,
                                                                                 isolated_tracking):
    """The launcher passes SIGTERM once to each rank: they checkpoint at the same step, rank 0 ends the run
    KILLED and prints the one error line; --resume --nproc 2 finishes it with every step and row counted once."""
    project = write_project(tiny_llama, train={"max_steps": -1, "epochs": 6, "save_steps": 2, "eval_steps": 1000})
    launcher = subprocess.Popen([sys.executable, "-m", "loraflow.cli", "train", str(project), "--nproc", "2"],
                                cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": isolated_tracking},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for("outputs/*/*/checkpoint-2/loraflow_checkpoint.json", tmp_path)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=120)
    assert_one_line_error(launcher.returncode, err, "interrupted by SIGTERM: checkpoint saved")
    assert launcher.returncode == 143
    [killed] = runs_of()
    assert killed.info.status == "KILLED"
    code, _, err = run_cli("train", project, "--resume")  # one process cannot continue a 2-process run
    assert_one_line_error(code, err, "resume it with as many (--nproc 2), not 1")
    code, _, err = run_cli("train", project, "--resume", "--nproc", "2")
    assert code == 0, err
    [run] = runs_of()
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert sorted(curve(run, "train/loss")) == list(range(1, int(run.data.metrics["train/steps"]) + 1))
    assert run.data.metrics["train/tokens"] == 6 * label_tokens(project)


def test_sharding_settings_a_model_cannot_take_are_refused_at_once(tiny_llama, write_project, run_cli, tmp_path):
    """FSDP over nf4 weights, an FSDP1-only strategy and a missing DeepSpeed file: one line names all three,
    before any process starts."""
    project = write_project(tiny_llama, model={"quantization": "nf4"},
                            train={"fsdp": "full_shard auto_wrap hybrid_shard", "deepspeed": "missing.json"})
    code, _, err = run_cli("train", project, "--nproc", "2")
    line = assert_one_line_error(code, err, "train.fsdp: cannot shard model.quantization=nf4")
    assert "train.fsdp: hybrid_shard needs FSDP1" in line and "train.deepspeed: cannot read" in line
    assert "train.fsdp and train.deepspeed both set" in line
    (tmp_path / "zero3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    project = write_project(tiny_llama, "zero3.yaml", model={"quantization": "nf4"},
                            train={"deepspeed": "zero3.json"})
    assert_one_line_error(*run_cli("train", project)[::2], "ZeRO stage 3 cannot partition model.quantization=nf4")
    if importlib.util.find_spec("deepspeed") is None:  # a valid setting, but the package is missing
        (tmp_path / "zero2.json").write_text(json.dumps({"zero_optimization": {"stage": 2}}))
        project = write_project(tiny_llama, "zero2.yaml", train={"deepspeed": "zero2.json"})
        assert_one_line_error(*run_cli("train", project)[::2], "pip install deepspeed")
    assert not runs_of()


def test_fsdp_words_are_transformers_own():
    from transformers.trainer_utils import FSDPOption

    assert set(FSDP_OPTIONS) | set(FSDP1_ONLY) == {option.value for option in FSDPOption}
