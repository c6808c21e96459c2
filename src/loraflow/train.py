"""One LoRA/QLoRA training run (SFT or continued pretraining), tracked in MLflow.

    loraflow train quickstart --set train.max_steps=20
    loraflow train quickstart --resume             # continue the last run from its checkpoint
    result = train.run(cfg)                         # TrainResult(run_id, eval_loss, ...)

The Hugging Face Trainer runs the loop; loraflow logs to MLflow itself: params, `train/loss` per
step, `eval/loss` at intervals, tokens, time, memory and cost, the adapter, and a loss-curve plot.
"""
from __future__ import annotations

import math
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlflow

from loraflow import LoraflowError, data, models, tracking
from loraflow.config import Config

METRIC_NAMES = {"loss": "train/loss", "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm",
                "eval_loss": "eval/loss"}


@dataclass
class TrainResult:
    run_id: str
    eval_loss: float
    adapter_dir: Path
    metrics: dict = field(default_factory=dict)
    model: object = None  # the trained PEFT model, for in-process callers


class LabelTokenCounter:
    """A padding collator that also counts the label (non-padding, non-prompt) tokens it batches."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        self.collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=data.IGNORE_INDEX)
        self.tokens = 0

    def __call__(self, features):
        batch = self.collate(features)
        self.tokens += int((batch["labels"] != data.IGNORE_INDEX).sum())
        return batch


def mlflow_callback(on_eval: Callable[[int, float], None] | None):
    """A TrainerCallback logging Trainer logs as loraflow metrics; `on_eval(step, loss)` can prune."""
    from transformers import TrainerCallback

    class MlflowMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            metrics = {METRIC_NAMES[k]: float(v) for k, v in (logs or {}).items() if k in METRIC_NAMES}
            if metrics:
                mlflow.log_metrics(metrics, step=state.global_step)

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            if on_eval and metrics and "eval_loss" in metrics:
                on_eval(state.global_step, float(metrics["eval_loss"]))

    return MlflowMetrics()


def training_arguments(cfg: Config, output_dir: Path, bf16: bool, has_eval: bool):
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=cfg.train.batch_size,
        per_device_eval_batch_size=cfg.train.batch_size, gradient_accumulation_steps=cfg.train.grad_accum,
        learning_rate=cfg.train.learning_rate, lr_scheduler_type=cfg.train.lr_scheduler,
        warmup_steps=cfg.train.warmup_ratio, weight_decay=cfg.train.weight_decay,
        max_steps=cfg.train.max_steps, num_train_epochs=cfg.train.epochs, seed=cfg.train.seed,
        data_seed=cfg.train.seed, logging_steps=cfg.train.logging_steps,
        eval_strategy="steps" if has_eval else "no", eval_steps=cfg.train.eval_steps,
        save_strategy="steps", save_steps=cfg.train.save_steps, save_total_limit=2,
        bf16=bf16, report_to="none", train_sampling_strategy="group_by_length",
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=False,
        gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(),
    )


def build_trainer(cfg: Config, model, tokenizer, prepared: data.PreparedData, output_dir: Path,
                  on_eval=None):
    """A Trainer on the tokenised splits; returns (trainer, label-token counter)."""
    import datasets
    import torch
    from transformers import Trainer

    train_examples = data.training_examples(prepared.splits["train"], tokenizer, cfg)
    if not train_examples:
        raise LoraflowError("no training examples left after tokenisation (check data.max_length)")
    val_rows = prepared.splits["validation"][:cfg.train.eval_rows or None]
    eval_examples = data.training_examples(val_rows, tokenizer, cfg) if val_rows else []
    counter = LabelTokenCounter(tokenizer)
    trainer = Trainer(
        model=model, args=training_arguments(cfg, output_dir, models.compute_dtype(cfg) == torch.bfloat16,
                                             bool(eval_examples)),
        train_dataset=datasets.Dataset.from_list(train_examples),
        eval_dataset=datasets.Dataset.from_list(eval_examples) if eval_examples else None,
        data_collator=counter, callbacks=[mlflow_callback(on_eval)])
    return trainer, counter


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def find_resumable_run(cfg: Config, run_id: str | None) -> tuple[str, Path]:
    """(run id, checkpoint folder) of `run_id` or of the project's latest training run with a checkpoint."""
    from transformers.trainer_utils import get_last_checkpoint

    client = mlflow.MlflowClient()
    experiment = mlflow.get_experiment_by_name(cfg.name)
    candidates = [client.get_run(run_id)] if run_id else client.search_runs(
        [experiment.experiment_id] if experiment else [], "tags.`loraflow.stage` = 'train'",
        order_by=["attributes.start_time DESC"], max_results=20)
    for run in candidates:
        output_dir = Path(run.data.tags.get("loraflow.output_dir", ""))
        if output_dir.is_dir() and get_last_checkpoint(str(output_dir)):
            return run.info.run_id, Path(get_last_checkpoint(str(output_dir)))
    raise LoraflowError(f"nothing to resume: no training run of '{cfg.name}' has a checkpoint on this machine")


def plot_loss_curve(run_id: str, title: str):
    """Train and eval loss against step, read back from MLflow (so resumed runs plot whole)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = mlflow.MlflowClient()
    figure, axis = plt.subplots(figsize=(7, 4))
    for key, style in (("train/loss", "-"), ("eval/loss", "o-")):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if history:
            axis.plot([m.step for m in history], [m.value for m in history], style, label=key, markersize=4)
    axis.set(xlabel="step", ylabel="loss", title=title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure


def log_adapter(model, tokenizer) -> Path:
    adapter_dir = Path(tempfile.mkdtemp(prefix="loraflow-adapter-")) / "adapter"
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    mlflow.log_artifacts(str(adapter_dir), "adapter")
    return adapter_dir


def final_eval_loss(trainer) -> float:
    """The validation loss at the last step: the Trainer's own if it evaluated there, else evaluate now."""
    last = next((entry for entry in reversed(trainer.state.log_history) if "eval_loss" in entry), None)
    if last is not None and last.get("step") == trainer.state.global_step:
        return float(last["eval_loss"])
    return float(trainer.evaluate()["eval_loss"])


def final_metrics(cfg: Config, trainer, counter: LabelTokenCounter, wall_seconds: float) -> dict:
    trainable, total = trainer.model.get_nb_trainable_parameters()
    metrics = {"train/tokens": counter.tokens, "train/wall_seconds": wall_seconds,
               "train/tokens_per_second": counter.tokens / max(wall_seconds, 1e-9),
               "train/peak_memory_mb": peak_memory_mb(),
               "train/cost_usd": wall_seconds / 3600 * cfg.train.price_per_hour,
               "train/trainable_params": trainable, "train/total_params": total,
               "train/steps": trainer.state.global_step}
    if trainer.eval_dataset is not None:
        eval_loss = final_eval_loss(trainer)
        metrics.update({"eval/loss": eval_loss, "eval/perplexity": math.exp(min(eval_loss, 50))})
    return metrics


def run(cfg: Config, *, resume: bool = False, run_id: str | None = None, nested: bool = False,
        on_eval: Callable[[int, float], None] | None = None, tags: dict | None = None,
        keep_model: bool = False) -> TrainResult:
    """Train one adapter in an MLflow run (a new one, or the resumed one) and return its result."""
    if not cfg.train.enabled:
        raise LoraflowError("train.enabled is false in this config: it evaluates the base model only "
                            "(use `loraflow evaluate` or `loraflow pipeline`)")
    checkpoint = None
    if resume:
        run_id, checkpoint = find_resumable_run(cfg, run_id)
        print(f"loraflow: resuming run {run_id} from {checkpoint.name}", file=sys.stderr)
    prepared = data.prepare(cfg)
    base_path = models.resolve_model_path(cfg.model.name, cfg)
    with tracking.stage_run(cfg, "train", run_id=run_id, nested=nested, tags=tags) as active:
        run_id = active.info.run_id
        output_dir = Path(cfg.train.output_dir).resolve() / cfg.name / run_id
        mlflow.set_tags({"loraflow.output_dir": str(output_dir), "loraflow.base_model_path": base_path})
        if not resume:
            mlflow.log_params(tracking.flat_params(cfg))
            tracking.log_config(cfg)
            data.log_prepared(cfg, prepared)
        model, tokenizer = models.load_model(cfg, base_path)
        model = models.attach_lora(model, cfg)
        trainer, counter = build_trainer(cfg, model, tokenizer, prepared, output_dir, on_eval)
        started = time.perf_counter()
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        metrics = final_metrics(cfg, trainer, counter, time.perf_counter() - started)
        mlflow.log_metrics(metrics, step=trainer.state.global_step)
        adapter_dir = log_adapter(trainer.model, tokenizer)
        tracking.log_figure_png(plot_loss_curve(run_id, f"{cfg.name}: loss"), "plots/loss_curve.png")
    return TrainResult(run_id=run_id, eval_loss=metrics.get("eval/loss", float("nan")), adapter_dir=adapter_dir,
                       metrics=metrics, model=trainer.model if keep_model else None)
