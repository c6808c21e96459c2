"""`loraflow train` end to end on the tiny model: run, metrics, artifacts, weights, resume."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch
from helpers import assert_one_line_error, runs_of
from safetensors.torch import load_file

from loraflow import data, generation, models
from loraflow.training.checkpoints import COMPLETE_MARKER
from loraflow.training.trainer import training_arguments, training_collator
from loraflow.config import load_config
from loraflow.stages import train

REPO = Path(__file__).resolve().parents[2]


def test_train_logs_run_metrics_artifacts_and_lineage(tiny_llama, write_project, run_cli):
    code, out, err = run_cli("train", write_project(tiny_llama))
    assert code == 0, err
    [run] = runs_of("train")
    assert run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == "4" and run.data.params["train.max_steps"] == "4"
    client = mlflow.MlflowClient()
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4]
    assert client.get_metric_history(run.info.run_id, "eval/loss")
    for key in ("train/tokens", "train/tokens_per_second", "train/wall_seconds", "train/cost_usd",
                "train/peak_memory_mb", "data/rows_kept", "data/rows_train"):
        assert key in run.data.metrics, key
    assert run.data.metrics["train/tokens"] > 0
    for tag in ("loraflow.git_sha", "loraflow.config_hash", "loraflow.data_digest", "loraflow.base_model"):
        assert run.data.tags[tag], tag
    assert run.data.tags["loraflow.attention"] in ("sdpa", "eager")  # models.faster_cpu_attention's choice
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for d in ("adapter", "plots", "config") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "plots/loss_curve.png",
            "config/resolved.yaml"} <= artifacts
    assert [i.dataset.name for i in run.inputs.dataset_inputs]


def test_lora_weights_change_and_base_weights_do_not(tiny_llama, write_project):
    from transformers import AutoModelForCausalLM

    result = train.run(load_config(str(write_project(tiny_llama))), keep_model=True)
    adapter = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k), "lora_B is still all zero"
    original = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    trained = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
               for k, v in result.model.state_dict().items() if "lora_" not in k}
    for key, value in original.items():
        assert torch.equal(trained[key].to(value.dtype), value), key


@pytest.mark.parametrize("val_fraction", [0.2, 0.0])  # the best adapter on validation; the last one
def test_the_logged_adapter_is_kept_in_the_runs_output_folder_and_nothing_in_the_temp_dir(
        tiny_llama, write_project, tmp_path, monkeypatch, val_fraction):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    result = train.run(load_config(str(write_project(tiny_llama, data={"val_fraction": val_fraction}))))
    output_dir = Path(mlflow.get_run(result.run_id).data.tags["loraflow.output_dir"])
    assert result.adapter_dir == output_dir / "adapter"
    logged = {a.path.removeprefix("adapter/") for a in
              mlflow.MlflowClient().list_artifacts(result.run_id, "adapter")}
    assert logged == {p.name for p in result.adapter_dir.iterdir()}
    assert {"adapter_model.safetensors", "tokenizer_config.json"} <= logged
    assert not (output_dir / "last_adapter").exists()
    assert (output_dir / "best_adapter").is_dir() == (val_fraction > 0)
    assert not list(scratch.iterdir())


def trained_label_tokens(project) -> int:
    """What train/tokens must be for one epoch: the loss positions of every training example (causal
    labels shifted by one), computed from the prepared rows."""
    cfg = load_config(str(project))
    tokenizer = models.load_tokenizer(cfg.model.name)
    examples = data.training_examples(data.prepare(cfg).splits["train"], tokenizer, cfg)
    return sum(sum(label != data.IGNORE_INDEX for label in e["labels"][1:]) for e in examples)


def test_tokens_count_what_the_optimizer_trained_on(tiny_llama, write_project, run_cli):
    """Evaluating every step or only at the end logs the same train/tokens: the label tokens of one epoch."""
    project = write_project(tiny_llama, train={"max_steps": -1, "epochs": 1})
    for experiment, eval_steps in (("every-step", 1), ("at-the-end", 1000)):
        assert run_cli("train", project, "--set", f"train.eval_steps={eval_steps}", "--experiment", experiment)[0] == 0
    counted = {run.data.metrics["train/tokens"] for run in runs_of("train")}
    assert counted == {trained_label_tokens(project)}
    [run] = runs_of("train", experiment="every-step")
    assert run.data.metrics["train/tokens_per_second"] == pytest.approx(
        run.data.metrics["train/tokens"] / run.data.metrics["train/wall_seconds"])


def send_when_checkpointed(signum: int, pid: int, folder: Path, step: int = 2) -> threading.Thread:
    """A thread that sends `signum` to `pid` once a complete checkpoint-`step` exists under `folder`."""
    def watch():
        pattern = f"outputs/*/*/checkpoint-{step}/{COMPLETE_MARKER}"
        for _ in range(6000):
            if list(folder.glob(pattern)):
                os.kill(pid, signum)
                return
            time.sleep(0.02)
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def steps_logged(run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient().get_metric_history(run_id, key))


def test_sigterm_checkpoints_ends_killed_and_resume_finishes_the_same_run(tiny_llama, write_project, run_cli,
                                                                           tmp_path):
    project = write_project(tiny_llama, train={"max_steps": 40, "save_steps": 2, "eval_steps": 10})
    send_when_checkpointed(signal.SIGTERM, os.getpid(), tmp_path)
    code, _, err = run_cli("train", project)
    assert code == 143, err
    assert_one_line_error(code, err, "--resume")
    [killed] = runs_of("train")
    assert killed.info.status == "KILLED" and "interrupted by SIGTERM" in killed.data.tags["loraflow.error"]
    code, _, err = run_cli("train", project, "--resume")
    assert code == 0, err
    [run] = runs_of("train")
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert "loraflow.error" not in run.data.tags  # the interruption no longer describes the finished run
    assert steps_logged(run.info.run_id) == list(range(1, 41))
    assert steps_logged(run.info.run_id, "eval/loss") == [10, 20, 30, 40]
    assert run_cli("train", project, "--experiment", "uninterrupted")[0] == 0
    [whole] = runs_of("train", experiment="uninterrupted")
    assert run.data.metrics["train/tokens"] == whole.data.metrics["train/tokens"]
    code, _, err = run_cli("train", project, "--resume", "--run-id", run.info.run_id)
    assert_one_line_error(code, err, "is FINISHED")


def test_kill_9_is_marked_killed_and_resumes_from_the_newest_complete_checkpoint(tiny_llama, write_project,
                                                                                 run_cli, tmp_path, isolated_tracking):
    project = write_project(tiny_llama, train={"max_steps": 60, "save_steps": 2, "eval_steps": 1000})
    process = subprocess.Popen([sys.executable, "-m", "loraflow.cli", "train", str(project)], cwd=tmp_path,
                               env={**os.environ, "MLFLOW_TRACKING_URI": isolated_tracking},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    send_when_checkpointed(signal.SIGKILL, process.pid, tmp_path).join(timeout=300)
    assert process.wait(timeout=60) == -signal.SIGKILL
    [dead] = runs_of("train")
    assert dead.info.status == "RUNNING"
    output_dir = Path(dead.data.tags["loraflow.output_dir"])
    (output_dir / "checkpoint-59").mkdir()  # a save cut short: no completion marker
    code, _, err = run_cli("train", project, "--resume")
    assert code == 0, err
    assert f"marked 1 run(s) whose process died as KILLED: {dead.info.run_id}" in err
    assert "checkpoint-59 was not written to the end" in err
    [run] = runs_of("train")
    assert run.info.run_id == dead.info.run_id and run.info.status == "FINISHED"
    assert steps_logged(run.info.run_id) == list(range(1, 61))


def test_cpt_objective_trains_on_raw_text_blocks(tiny_llama, write_project, tmp_path, run_cli):
    text = tmp_path / "book.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the red mug sits on an oak desk near a lamp." for i in range(40)))
    project = write_project(tiny_llama, data={"path": str(text), "max_length": 32}, train={"objective": "cpt"},
                            registry={"gate_metric": "loss"})
    code, _, err = run_cli("train", project)
    assert code == 0, err
    [run] = runs_of("train")
    assert run.data.metrics["train/tokens"] > 0


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_training_runs(tiny_llama, write_project, run_cli, quantization):
    project = write_project(tiny_llama, model={"quantization": quantization, "dtype": "bf16"},
                            train={"max_steps": 2})
    code, _, err = run_cli("train", project)
    assert code == 0, err
    assert runs_of("train")[0].info.status == "FINISHED"


def test_amazon_titles_real_data(sample_data, tiny_llama, write_project, run_cli):
    project = write_project(tiny_llama, data={"path": str(sample_data / "amazon_titles" / "trn_sample.jsonl"),
                                              "prompt_template": "Title: {title}", "target_template": "{content}",
                                              "max_rows": 120, "max_length": 64}, train={"max_steps": 2})
    code, _, err = run_cli("train", project)
    assert code == 0, err
    [run] = runs_of("train")
    metrics = run.data.metrics
    assert metrics["data/rows_read"] == 120
    dropped = sum(v for k, v in metrics.items() if k.startswith("data/rows_dropped_"))
    assert metrics["data/rows_kept"] == 120 - dropped
    sample = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/data/sample_train.jsonl")
    assert "&#8217;" not in sample and "&amp;" not in sample  # HTML entities were unescaped


def test_passwords_in_urls_are_recorded_as_stars(tiny_llama, write_project, run_cli):
    project = write_project(tiny_llama, train={"max_steps": 1},
                            tune={"storage": "postgresql://trainer:hunter2@db.example/optuna"})
    assert run_cli("train", project)[0] == 0
    [run] = runs_of("train")
    recorded = json.dumps([run.data.params, run.data.tags]) + mlflow.artifacts.load_text(
        f"runs:/{run.info.run_id}/config/resolved.yaml")
    assert "hunter2" not in recorded
    assert run.data.params["tune.storage"] == "postgresql://trainer:***@db.example/optuna"


def failing_log_batch(monkeypatch, failures: int | None):
    """Make the per-step metric writes of training fail like a locked sqlite store: the first `failures`
    of them (None: all)."""
    original, calls = mlflow.MlflowClient.log_batch, {"n": 0}

    def locked(self, run_id, metrics=(), *args, **kwargs):
        if not any(m.key in ("train/loss", "eval/loss") for m in metrics):
            return original(self, run_id, metrics, *args, **kwargs)
        calls["n"] += 1
        if failures is None or calls["n"] <= failures:
            raise mlflow.exceptions.MlflowException("(sqlite3.OperationalError) database is locked")
        return original(self, run_id, metrics, *args, **kwargs)
    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", locked)
    return calls


def test_a_locked_store_delays_metrics_and_loses_none(tiny_llama, write_project, run_cli, monkeypatch):
    project = write_project(tiny_llama, train={"max_steps": 6, "eval_steps": 2})
    calls = failing_log_batch(monkeypatch, failures=4)
    code, _, err = run_cli("train", project)
    assert code == 0, err
    assert calls["n"] > 4
    [run] = runs_of("train")
    assert run.info.status == "FINISHED"
    assert steps_logged(run.info.run_id) == [1, 2, 3, 4, 5, 6]
    assert steps_logged(run.info.run_id, "eval/loss") == [2, 4, 6]


def test_a_store_gone_too_long_checkpoints_and_fails_the_run(tiny_llama, write_project, run_cli, monkeypatch):
    project = write_project(tiny_llama, train={"max_steps": 6, "save_steps": 100, "store_outage_seconds": 0})
    failing_log_batch(monkeypatch, failures=None)
    code, _, err = run_cli("train", project)
    assert_one_line_error(code, err, "the tracking store has not answered")
    [run] = runs_of("train")
    assert run.info.status == "FAILED"
    checkpoints = list(Path(run.data.tags["loraflow.output_dir"]).glob(f"checkpoint-*/{COMPLETE_MARKER}"))
    assert len(checkpoints) == 1, "the run stops at the first failed write, after saving a checkpoint"


def test_the_best_adapter_is_kept_and_early_stopping_stops(tiny_llama, write_project, run_cli, tmp_path):
    """A learning rate far too high makes the loss climb after the first evaluations: training stops after
    `patience` evaluations without a new best, and the adapter logged is the best one."""
    project = write_project(tiny_llama, train={"max_steps": 40, "eval_steps": 1, "learning_rate": 0.5,
                                               "early_stopping_patience": 2, "warmup_ratio": 0.0})
    assert run_cli("train", project)[0] == 0
    [run] = runs_of("train")
    history = {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "eval/loss")}
    best_step = min(history, key=history.get)
    assert run.data.metrics["eval/best_step"] == best_step
    assert run.data.metrics["eval/best_loss"] == pytest.approx(history[best_step])
    assert max(history) == best_step + 2 < 40, "stopped two evaluations after the best one"
    cfg = load_config(str(project))
    base, tokenizer = models.load_model(cfg, cfg.model.name)
    adapter = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="adapter",
                                                  dst_path=str(tmp_path))
    logged = models.load_adapter(base, adapter)
    rows = data.prepare(cfg).splits["validation"][:cfg.train.eval_rows]
    assert generation.validation_loss(logged, tokenizer, rows, cfg) == pytest.approx(history[best_step], abs=1e-5)
    [model] = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list")
    assert model.source_run_id == run.info.run_id and run.data.tags["loraflow.adapter_model_id"] == model.model_id


def test_cost_is_hours_times_the_price_of_the_experiments_machine():
    """ptbr-llama31-cpt-sft's CPT ran 2.35 h on an RTX 4090 at 0.30 USD/h and reports 0.71 USD."""
    from types import SimpleNamespace

    cfg = load_config(str(REPO / "projects" / "ptbr-llama31-cpt-sft" / "cpt.yaml"))
    trainer = SimpleNamespace(model=SimpleNamespace(get_nb_trainable_parameters=lambda: (1, 10)),
                              state=SimpleNamespace(global_step=1))
    state = {"tokens": 0, "eval": {}, "seconds": 2.35 * 3600, "started": time.perf_counter(),
             "best_dir": Path("/nonexistent")}
    metrics = train.final_metrics(cfg, trainer, state)
    assert metrics["train/cost_usd"] == pytest.approx(2.35 * 0.30, abs=1e-3)  # 0.705: "0.71 USD" in the report


def test_generated_answer_metrics_are_logged_at_each_evaluation(tiny_llama, write_project, run_cli, tmp_path):
    """train.eval_metrics: eval/sacrebleu (and token_f1) at every step eval/loss is logged, each the corpus score
    of what the adapter of that step answers; generating leaves the training itself as it was."""
    sections = {"lora": {"r": 4, "alpha": 8, "dropout": 0.1}}  # dropout draws random numbers: generation must not
    plain = write_project(tiny_llama, "plain.yaml", **sections)
    scored = write_project(tiny_llama, "scored.yaml", **sections, train={"eval_metrics": ["sacrebleu", "token_f1"],
                                                                         "eval_rows": 6, "save_steps": 100})
    assert run_cli("train", plain)[0] == 0
    code, _, err = run_cli("train", scored)
    assert code == 0, err
    without, with_scores = runs_of("train", oldest_first=True)
    client = mlflow.MlflowClient()

    def history(run, key):
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
    assert history(with_scores, "train/loss") == history(without, "train/loss")
    assert history(with_scores, "eval/loss") == history(without, "eval/loss")
    steps = sorted(history(with_scores, "eval/loss"))
    assert steps == [2, 4]
    assert sorted(history(with_scores, "eval/sacrebleu")) == sorted(history(with_scores, "eval/token_f1")) == steps
    assert not history(without, "eval/sacrebleu")

    # the score logged at the best step is the corpus BLEU of the logged (best) adapter's answers
    cfg = load_config(str(scored))
    best = int(with_scores.data.metrics["eval/best_step"])
    rows = data.prepare(cfg).splits["validation"][:cfg.train.eval_rows]
    adapter = Path(mlflow.artifacts.download_artifacts(run_id=with_scores.info.run_id, artifact_path="adapter",
                                                        dst_path=str(tmp_path)))
    base, tokenizer = models.load_model(cfg, str(tiny_llama))
    model = models.load_adapter(base, str(adapter)).eval()
    answers = generation.generate(model, tokenizer, [r["prompt"] for r in rows], cfg, seed=0, progress=False)
    from loraflow import metrics
    expected = metrics.corpus_scores(["sacrebleu"], answers, [r["target"] for r in rows])["sacrebleu"]
    assert history(with_scores, "eval/sacrebleu")[best] == pytest.approx(expected, abs=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without TF32")
def test_tf32_is_refused_where_the_machine_has_none(tiny_llama, write_project, run_cli):
    code, _, err = run_cli("train", write_project(tiny_llama), "--set", "train.tf32=true")
    assert_one_line_error(code, err, "train.tf32: needs an NVIDIA GPU of Ampere or newer")
    assert runs_of("train") == []  # refused before a run was made


def test_fp16_compute_trains_with_fp16_mixed_precision(tiny_llama, write_project, run_cli):
    """model.dtype: fp16 (a GPU without bf16, e.g. a T4) is the Trainer's fp16 autocast with loss scaling."""
    project = write_project(tiny_llama, model={"dtype": "fp16"})
    arguments = training_arguments(load_config(str(project)), Path("out"), bf16=False)
    assert arguments.fp16 and not arguments.bf16
    code, _, err = run_cli("train", project)
    assert code == 0, err
    [run] = runs_of("train")
    assert run.data.params["model.dtype"] == "fp16" and 0 < run.data.metrics["train/loss"] < 20
    bf16 = load_config(str(write_project(tiny_llama, "bf16.yaml", model={"dtype": "bf16"})))
    arguments = training_arguments(bf16, Path("out"), bf16=True)
    assert arguments.bf16 and not arguments.fp16


def test_the_head_and_loss_skip_positions_without_labels(tiny_llama, write_project):
    """Batches carry the positions whose next token is a label in some row, and which rows have one there: the LM
    head computes logits at those tokens only, and the loss equals the loss over every position (whose other
    labels are ignored anyway), as it does with the head on the shared positions alone."""
    cfg = load_config(str(write_project(tiny_llama, data={"max_length": 256})))  # prompts of their own lengths
    model, tokenizer = models.load_model(cfg, str(tiny_llama))
    model = models.attach_lora(model, cfg)
    collate = training_collator(cfg, model, tokenizer)
    examples = data.training_examples(data.prepare(cfg).splits["train"], tokenizer, cfg)
    by_prompt_length = {e["labels"].count(data.IGNORE_INDEX): e for e in examples}  # rows whose labels start apart
    assert len(by_prompt_length) >= 2
    batch = {key: value.to(model.device) if isinstance(value, torch.Tensor) else value  # the GPU, where visible
             for key, value in collate(list(by_prompt_length.values())[:4]).items()}
    labelled = (batch["labels"][:, 1:] != data.IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    assert torch.equal(batch["logits_to_keep"], labelled) and len(labelled) < batch["input_ids"].shape[1] - 1
    kept_labels = batch["labels"][:, 1:][:, labelled]
    tokens = kept_labels != data.IGNORE_INDEX  # within the kept positions, the rows' own labelled tokens
    assert torch.equal(batch["labelled_positions"], tokens) and not bool(tokens.all())
    assert torch.equal(batch["shift_labels"], kept_labels[tokens].unsqueeze(0))
    shared = {key: value for key, value in batch.items() if key != "labelled_positions"}
    shared["shift_labels"] = kept_labels
    every_position = {key: value for key, value in shared.items() if key not in ("logits_to_keep", "shift_labels")}
    model.eval()
    with torch.no_grad():
        per_token, kept, full = model(**batch), model(**shared), model(**every_position)
    assert per_token.logits.shape[:2] == (1, int(tokens.sum())) and kept.logits.shape[1] == len(labelled)
    assert full.logits.shape[1] == batch["input_ids"].shape[1]
    assert float(per_token.loss) == pytest.approx(float(full.loss), rel=1e-6)
    assert float(kept.loss) == pytest.approx(float(full.loss), rel=1e-6)
    assert torch.allclose(per_token.logits[0], full.logits[:, :-1][batch["labels"][:, 1:] != data.IGNORE_INDEX],
                          atol=1e-5)
    with torch.no_grad():  # the next forward without the mask (generation) computes the head everywhere again
        assert model(**every_position).logits.shape[1] == batch["input_ids"].shape[1]
    assert not models.takes_logits_to_keep(torch.nn.Linear(2, 2))  # a model without it keeps every position


@pytest.mark.parametrize("key, value, attribute, expected", [
    ("train.learning_rate", 3e-4, "learning_rate", 3e-4), ("train.batch_size", 3, "per_device_train_batch_size", 3),
    ("train.grad_accum", 5, "gradient_accumulation_steps", 5), ("train.lr_scheduler", "linear", "lr_scheduler_type",
                                                                 "linear"),
    ("train.warmup_ratio", 0.25, "warmup_steps", 0.25), ("train.weight_decay", 0.1, "weight_decay", 0.1),
    ("train.seed", 7, "seed", 7), ("train.logging_steps", 3, "logging_steps", 3), ("train.save_steps", 9,
                                                                                  "save_steps", 9),
    ("train.dataloader_workers", 2, "dataloader_num_workers", 2), ("train.epochs", 3.0, "num_train_epochs", 3.0),
    ("train.max_steps", 11, "max_steps", 11), ("train.batch_order", "random", "train_sampling_strategy", "random"),
])
def test_each_training_key_reaches_the_trainer(tiny_llama, write_project, key, value, attribute, expected):
    cfg = load_config(str(write_project(tiny_llama)), [f"{key}={value}"])
    arguments = training_arguments(cfg, Path("out"), bf16=False)
    assert getattr(arguments, attribute) == expected
    default = training_arguments(load_config(str(write_project(tiny_llama, "default.yaml"))), Path("out"), False)
    assert getattr(default, attribute) != expected  # the value above is not the default: the check can fail


def test_gradient_checkpointing_recomputes_and_trains_the_same(tiny_llama, write_project, run_cli):
    """train.gradient_checkpointing: the model recomputes activations in the backward pass; the losses are those of
    a run without it (dropout off: the same arithmetic, only kept for less time)."""
    cfg = load_config(str(write_project(tiny_llama, train={"gradient_checkpointing": True})))
    model, _ = models.load_model(cfg, str(tiny_llama))
    assert models.attach_lora(model, cfg).is_gradient_checkpointing
    assert run_cli("train", write_project(tiny_llama, "plain.yaml"))[0] == 0
    assert run_cli("train", write_project(tiny_llama, "recompute.yaml", train={"gradient_checkpointing": True}))[0] == 0
    plain, recomputed = runs_of("train", oldest_first=True)
    client = mlflow.MlflowClient()

    def losses(run):
        return [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert losses(recomputed) == pytest.approx(losses(plain), rel=1e-5) and len(losses(plain)) == 4


def resident_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the resident high-water mark resets on Linux")
def test_peak_memory_is_the_runs_own_not_the_process_high_water_mark(tiny_llama, write_project, run_cli):
    """A tune trial or pipeline step trains in a process that did other work first: 1.5 GiB touched and freed
    before this run is not part of its train/peak_memory_mb (ru_maxrss would keep it for the process's life)."""
    import numpy

    before = resident_mb()
    spike = numpy.ones(1536 * 2**20 // 8)  # every page written: resident
    assert resident_mb() > before + 1400
    del spike
    code, _, err = run_cli("train", write_project(tiny_llama))
    assert code == 0, err
    [run] = runs_of("train")
    peak = run.data.metrics["train/peak_memory_mb"]
    assert before * 0.5 < peak < before + 1000, (before, peak)
