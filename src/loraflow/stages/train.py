"""One LoRA/QLoRA training run (SFT or continued pretraining), tracked in MLflow.

    loraflow train quickstart --set train.max_steps=20
    loraflow train quickstart --resume             # continue the interrupted run from its checkpoint
    loraflow train quickstart --nproc 2            # one run trained by 2 processes (docs/distributed.md)
    result = train.run(cfg)                         # TrainResult(run_id, eval_loss, ...)

The Hugging Face Trainer runs the loop; loraflow logs to MLflow itself: params, `train/loss` per
step, `eval/loss` at intervals (the same token-weighted estimator as the evaluate stage), the label
tokens actually trained on, time, memory and cost, the adapter, and a loss-curve plot. SIGTERM or
Ctrl+C saves a checkpoint and ends the run KILLED; `--resume` continues it in the same run. In a
torchrun job (or --nproc) every rank trains and rank 0 alone talks to MLflow: one run for the job.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlflow

from loraflow import LoraflowError, data, models, say, tracking
from loraflow.config import Config
from loraflow.models import memory
from loraflow.tracking import EVAL_LOSS, TRAIN_LOSS, Tags
from loraflow.training.callback import (BEST_MARKER, Interrupted, LoraflowCallback, StopOnSignal, best_so_far,
                                        count_trained_tokens, training_seconds)
from loraflow.training.checkpoints import COMPLETE_MARKER, find_resumable_run, resumed_state
from loraflow.training.distributed import Ranks
from loraflow.training.trainer import build_trainer, peak_memory_mb, reset_peak_memory, training_arguments

NOT_LOGGED = ("training_args.bin", BEST_MARKER)  # what Trainer.save_model and loraflow add to an adapter folder


@dataclass
class TrainResult:
    run_id: str
    eval_loss: float
    adapter_dir: Path  # the logged adapter with its tokenizer, kept in the run's output folder
    metrics: dict = field(default_factory=dict)
    model: object = None  # the trained PEFT model, for in-process callers


def run_output_dir(cfg: Config, run_id: str) -> Path:
    """Where a run keeps its checkpoints and adapters: <train.output_dir>/<name>/<run id>."""
    return Path(cfg.train.output_dir).resolve() / cfg.name / run_id


def plot_loss_curve(run_id: str, title: str):
    """Train and eval loss against step, read back from MLflow (so resumed runs plot whole)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    client = mlflow.MlflowClient()
    figure, axis = plt.subplots(figsize=(7, 4))
    for key, style in ((TRAIN_LOSS, "-"), (EVAL_LOSS, "o-")):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if history:
            axis.plot([m.step for m in history], [m.value for m in history], style, label=key, markersize=4)
    axis.set(xlabel="step", ylabel="loss", title=title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure


def adapter_to_log(state: dict, output_dir: Path) -> Path:
    """The folder of the adapter the run logs: the best on validation loss, else the last one, saved now into
    `output_dir`/last_adapter (on every rank, like keep_best)."""
    if state["eval"]:
        return state["best_dir"]
    last = output_dir / "last_adapter"
    state["save_adapter"](str(last))
    return last


def log_adapter(cfg: Config, source: Path, adapter_dir: Path, tokenizer, run_id: str) -> Path:
    """Write the adapter in `source` with its tokenizer to `adapter_dir` (kept: `loraflow evaluate --adapter`
    takes it) and log it as `adapter/` and as an MLflow logged model of the run, tagged on the run as
    loraflow.adapter_model_id."""
    shutil.rmtree(adapter_dir, ignore_errors=True)  # a resumed run's earlier attempt may have left one
    shutil.copytree(source, adapter_dir, ignore=shutil.ignore_patterns(*NOT_LOGGED))
    tokenizer.save_pretrained(adapter_dir)
    mlflow.log_artifacts(str(adapter_dir), "adapter")
    logged = mlflow.initialize_logged_model(name=f"{cfg.name}-adapter", source_run_id=run_id,
                                            model_type="peft-lora-adapter",
                                            params={k: str(v) for k, v in tracking.flat_params(cfg).items()
                                                    if k.startswith("lora.")})
    mlflow.MlflowClient().log_model_artifacts(logged.model_id, str(adapter_dir))
    mlflow.finalize_logged_model(logged.model_id, "READY")
    mlflow.set_tag(Tags.ADAPTER_MODEL_ID, logged.model_id)
    return adapter_dir


def final_metrics(cfg: Config, trainer, state: dict, world_size: int = 1) -> dict:
    """The end-of-run figures; state["tokens"] and state["peak_memory_mb"] are the job's (summed, largest)
    when several processes trained."""
    wall_seconds = training_seconds(state)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    metrics = {"train/tokens": state["tokens"], "train/wall_seconds": wall_seconds,
               "train/tokens_per_second": state["tokens"] / max(wall_seconds, 1e-9),
               "train/peak_memory_mb": state.get("peak_memory_mb") or peak_memory_mb(),
               "train/world_size": world_size,
               "train/global_batch_size": cfg.train.batch_size * cfg.train.grad_accum * world_size,
               "train/cost_usd": wall_seconds / 3600 * cfg.train.price_per_hour,
               "train/trainable_params": trainable, "train/total_params": total,
               "train/steps": trainer.state.global_step}
    best = best_so_far(state)
    if best is not None:  # the adapter logged is this one
        metrics.update({"eval/best_loss": best["loss"], "eval/best_step": best["step"],
                        "eval/perplexity": math.exp(min(best["loss"], 50))})
    return metrics


def run(cfg: Config, *, store: tracking.Store | None = None, resume: bool = False, run_id: str | None = None,
        parent_run_id: str | None = None, on_eval: Callable[[int, float], None] | None = None,
        tags: dict | None = None, keep_model: bool = False, prepared: data.PreparedData | None = None,
        base_path: str | None = None) -> TrainResult:
    """Train one adapter in an MLflow run (a new one, or the resumed one) and return its result.

    `prepared` and `base_path` let a caller that already prepared the data and resolved the model
    (the pipeline) pass them on; `run_id` without `resume` logs into an existing run (a tune trial).
    In a torchrun job every rank calls this: rank 0 makes (or finds) the run and gives the others its id.
    """
    import torch

    if not cfg.train.enabled:
        raise LoraflowError("train.enabled is false in this config: it evaluates the base model only "
                            "(use `loraflow evaluate` or `loraflow pipeline`)")
    args = training_arguments(cfg, Path(cfg.train.output_dir).resolve() / cfg.name,
                              models.compute_dtype(cfg) == torch.bfloat16)
    device = args.device  # under torchrun: the process group starts here, as the Trainer would start it
    if args.world_size > 1 and device.type == "cpu":
        # accelerate names a CPU rank's device cpu:0, which torch.load refuses as map_location: transformers 5.17
        # resumes a job's optimizer with map_location=args.device, so a CPU job could not resume. Its cached value:
        args.__dict__["_setup_devices"] = device = torch.device("cpu")
    ranks = Ranks(args.process_index, args.world_size, device)
    store = store or tracking.connect(cfg=cfg)
    checkpoint = None
    if resume and ranks.main:
        run_id, checkpoint = find_resumable_run(cfg, store, run_id)
        trained_by = json.loads((checkpoint / COMPLETE_MARKER).read_text()).get("world_size", 1)
        if trained_by != ranks.world_size:  # another global batch and data order: not the same run
            raise LoraflowError(f"{checkpoint.name} was trained by {trained_by} process(es): resume it with as "
                                f"many (--nproc {trained_by}), not {ranks.world_size}")
        say(f"resuming run {run_id} from {checkpoint.name}")
    prepared = prepared or data.prepare(cfg)
    base_path = base_path or models.resolve_model_path(cfg.model.name, cfg)
    opened = tracking.stage_run(cfg, "train", store, run_id=run_id, parent_run_id=parent_run_id, tags=tags,
                                system_metrics=True) if ranks.main else contextlib.nullcontext()
    with opened as active, StopOnSignal() as stopper:
        run_id, checkpoint = ranks.from_main((active.info.run_id, checkpoint) if ranks.main else None)
        args.output_dir = str(run_output_dir(cfg, run_id))  # known only now; the Trainer reads it when saving
        if ranks.main:
            mlflow.set_tags({Tags.OUTPUT_DIR: args.output_dir, Tags.BASE_MODEL_PATH: base_path})
            if not resume:
                mlflow.log_params(tracking.flat_params(cfg))
                tracking.log_config(cfg)
                data.log_prepared(cfg, prepared)
        return train_in_run(cfg, args, ranks, stopper, run_id, checkpoint, prepared, base_path, on_eval, keep_model)


def train_in_run(cfg: Config, args, ranks: Ranks, stopper: StopOnSignal, run_id: str, checkpoint: Path | None,
                 prepared: data.PreparedData, base_path: str, on_eval, keep_model: bool) -> TrainResult:
    """Load, train, sum the ranks' counts; rank 0 logs the figures, the adapter and the loss curve."""
    import transformers

    transformers.set_seed(cfg.train.seed)  # the same LoRA initialisation in every process, run and job
    reset_peak_memory()  # train/peak_memory_mb: this run's, loading included
    memory.check_training_fits(cfg, base_path)  # on a GPU: a clear error now rather than out of memory mid-run
    model, tokenizer = models.load_model(cfg, base_path)
    model = models.attach_lora(model, cfg)
    attention = ranks.from_main(models.faster_cpu_attention(model, cfg) if ranks.main else None)
    if not ranks.main and attention == "eager":
        model.get_base_model().set_attn_implementation("eager")  # every rank computes as rank 0 chose
    if ranks.main:
        mlflow.set_tag(Tags.ATTENTION, attention)
    state = resumed_state(checkpoint, run_id, ranks)
    state["metrics"] = tracking.MetricBuffer(run_id, cfg.train.store_outage_seconds) if ranks.main else None
    state["best_dir"] = Path(args.output_dir) / "best_adapter"  # beside the checkpoints, so a resumed run keeps it
    eval_rows = prepared.splits["validation"][:cfg.train.eval_rows or None]
    callback = LoraflowCallback(cfg, tokenizer, eval_rows, state, stopper, on_eval, ranks)
    trainer = build_trainer(cfg, model, tokenizer, prepared, Path(args.output_dir), callback, args)
    state["save_adapter"] = trainer.save_model
    count_trained_tokens(trainer.model, cfg, state)
    state["started"] = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    signum, store_down = ranks.reduce([stopper.signum or 0, "store_error" in state], "max")  # a late signal too
    if signum:
        raise Interrupted(int(signum), run_id)
    if store_down:
        raise LoraflowError(f"{state.get('store_error', 'rank 0 lost the tracking store')}; checkpoint saved: "
                            f"continue with `loraflow train ... --resume --run-id {run_id}`")
    state["tokens"] = int(ranks.reduce([state["tokens"]])[0])
    state["peak_memory_mb"] = ranks.reduce([peak_memory_mb()], "max")[0]
    if ranks.main:
        state["metrics"].drain()  # values still queued from a busy spell
    metrics = ranks.from_main(final_metrics(cfg, trainer, state, ranks.world_size) if ranks.main else None)
    output_dir = Path(args.output_dir)
    source = adapter_to_log(state, output_dir)
    if ranks.main:
        mlflow.log_metrics(metrics, step=trainer.state.global_step)
        log_adapter(cfg, source, output_dir / "adapter", tokenizer, run_id)
        if source != state["best_dir"]:
            shutil.rmtree(source, ignore_errors=True)  # the last adapter: now in adapter/, with its tokenizer
        tracking.log_figure_png(plot_loss_curve(run_id, f"{cfg.name}: loss"), "plots/loss_curve.png")
    return TrainResult(run_id=run_id, eval_loss=metrics.get("eval/best_loss", float("nan")),
                       adapter_dir=output_dir / "adapter", metrics=metrics, model=trainer.model if keep_model else None)
