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
import resource
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlflow

from loraflow import LoraflowError, data, generation, metrics, models, say, tracking, warn
from loraflow.config import Config
from loraflow.distributed import Ranks
from loraflow.tracking import EVAL_LOSS, TRAIN_LOSS, Tags

TRAINER_METRICS = {"loss": TRAIN_LOSS, "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm"}
COMPLETE_MARKER = "loraflow_checkpoint.json"  # written after everything else: a checkpoint without it is partial
BEST_MARKER = "loraflow_best.json"  # step and validation loss of the adapter kept as the best
NOT_LOGGED = ("training_args.bin", BEST_MARKER)  # what Trainer.save_model and loraflow add to an adapter folder


@dataclass
class TrainResult:
    run_id: str
    eval_loss: float
    adapter_dir: Path  # the logged adapter with its tokenizer, kept in the run's output folder
    metrics: dict = field(default_factory=dict)
    model: object = None  # the trained PEFT model, for in-process callers


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGTERM/SIGINT after saving a checkpoint; the run ends KILLED."""

    def __init__(self, signum: int, run_id: str):
        super().__init__(f"interrupted by {signal.Signals(signum).name}: checkpoint saved; continue with "
                         f"`loraflow train ... --resume --run-id {run_id}`")
        self.exit_code = 128 + signum


class StopOnSignal:
    """While active, SIGTERM/SIGINT only set a flag; the training callback saves and stops at the step's end."""

    def __init__(self):
        self.signum = None
        self.previous = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            return self
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.previous[signum] = signal.signal(signum, self.note)
        return self

    def note(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)



def loraflow_callback(cfg: Config, tokenizer, eval_rows: list[dict], state: dict, stopper: StopOnSignal,
                      on_eval: Callable[[int, float], None] | None, ranks: Ranks | None = None):
    """The TrainerCallback that logs, evaluates (token-weighted), keeps the best adapter, stops early,
    counts tokens and honours signals.

    `state` holds {"tokens": label tokens this process trained on (plus, on rank 0, those of the earlier
    processes of a resumed run), "eval": {step: loss}, "seconds": training time before this process}; the
    checkpoint saves them, so a resumed run keeps counting. state["best_dir"] holds the adapter of the lowest
    validation loss so far (its step and loss beside it). In a job, rank 0 decides and logs; the ranks agree
    at each step's end (and log) on whether to save and stop, so that they all leave the loop together.
    """
    from transformers import TrainerCallback

    ranks = ranks or Ranks()

    def write(metrics: dict, step: int) -> None:
        """Buffered: a busy store delays the values; one gone too long stops training after a checkpoint."""
        try:
            state["metrics"].log(metrics, step)
        except tracking.StoreUnavailable as exc:
            state["store_error"] = exc

    def agree_to_stop(control, early: bool = False):
        signum, store_down, early = ranks.reduce([stopper.signum or 0, "store_error" in state, early], "max")
        if signum or store_down:
            control.should_save = control.should_training_stop = True
        if early:
            control.should_training_stop = True
        return control

    class LoraflowCallback(TrainerCallback):
        def on_epoch_begin(self, args, trainer_state, control, **kwargs):
            # group_by_length shuffles with the global CPU generator, on each rank, before every epoch; on CPU the
            # LoRA dropout of unequal batches moves it unequally, so the ranks would split different orders.
            if ranks.world_size > 1:
                import torch

                torch.set_rng_state(ranks.from_main(torch.get_rng_state()))

        def on_log(self, args, trainer_state, control, logs=None, **kwargs):
            metrics = {TRAINER_METRICS[k]: float(v) for k, v in (logs or {}).items() if k in TRAINER_METRICS}
            if ranks.main and metrics and trainer_state.global_step > state["logged_through"]:  # never a step twice
                write(metrics, trainer_state.global_step)
            return agree_to_stop(control)

        def on_step_end(self, args, trainer_state, control, model=None, **kwargs):
            step, early = trainer_state.global_step, False
            if eval_rows and (step % cfg.train.eval_steps == 0 or step >= trainer_state.max_steps):
                # Every rank evaluates the same rows (a sharded model's forward needs them all); rank 0's figure counts.
                loss, scores = evaluate_now(model, tokenizer, eval_rows, cfg), answer_scores_now(model, tokenizer,
                                                                                                 eval_rows, cfg)
                loss, scores, improved = ranks.from_main((loss, scores, ranks.main and improves(state, loss)))
                state["eval"][step] = loss
                if improved:
                    keep_best(state, step, ranks)
                if ranks.main:
                    if step > state["logged_through"]:
                        write({EVAL_LOSS: loss, **scores}, step)
                    early = stop_early(cfg, state, step)
                if on_eval:
                    on_eval(step, loss)
            return agree_to_stop(control, early)

        def on_save(self, args, trainer_state, control, **kwargs):
            # The sum is also a barrier: every rank has written its part of the checkpoint before the marker.
            saved = {"tokens": int(ranks.reduce([state["tokens"]])[0]), "eval": state["eval"],
                     "seconds": training_seconds(state), "world_size": ranks.world_size}
            if args.should_save:  # the process that wrote the checkpoint
                folder = Path(args.output_dir) / f"checkpoint-{trainer_state.global_step}"
                (folder / COMPLETE_MARKER).write_text(json.dumps(saved))

    return LoraflowCallback()


def best_so_far(state: dict) -> dict | None:
    """{"step", "loss"} of the adapter kept in state["best_dir"], or None before the first evaluation."""
    marker = state["best_dir"] / BEST_MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def improves(state: dict, loss: float) -> bool:
    """True when `loss` is the lowest validation loss yet (asked on rank 0, which writes the marker)."""
    best = best_so_far(state)
    return best is None or loss < best["loss"]


def keep_best(state: dict, step: int, ranks: Ranks) -> None:
    """Save the adapter as the best (a LoRA adapter is small) through Trainer.save_model, on every rank: under
    FSDP or ZeRO-3 gathering the weights takes them all; the main process writes."""
    state["save_adapter"](str(state["best_dir"]))
    if ranks.main:
        (state["best_dir"] / BEST_MARKER).write_text(json.dumps({"step": step, "loss": state["eval"][step]}))


def stop_early(cfg: Config, state: dict, step: int) -> bool:
    """True once train.early_stopping_patience evaluations in a row have not beaten the best (0: never)."""
    patience, best = cfg.train.early_stopping_patience, best_so_far(state)
    if patience <= 0 or best is None:
        return False
    return sum(1 for evaluated in state["eval"] if best["step"] < evaluated <= step) >= patience


def training_seconds(state: dict) -> float:
    """Wall-clock training time of the whole run: earlier processes' (resume) plus this one's."""
    return state["seconds"] + time.perf_counter() - state["started"]


def evaluate_now(model, tokenizer, rows: list[dict], cfg: Config) -> float:
    """Validation loss per target token, in eval mode (no dropout), then back to training."""
    model.eval()
    try:
        return generation.validation_loss(model, tokenizer, rows, cfg)
    finally:
        model.train()


def answer_scores_now(model, tokenizer, rows: list[dict], cfg: Config) -> dict[str, float]:
    """train.eval_metrics of the answers to the eval rows' prompts, as {"eval/<metric>": corpus value}: decoded
    as the evaluate stage decodes (eval.*, its first seed), in eval mode, leaving training's random state as it was."""
    if not cfg.train.eval_metrics or not rows:
        return {}
    with kept_random_state():
        model.eval()
        try:
            answers = generation.generate(model, tokenizer, [row["prompt"] for row in rows], cfg,
                                          seed=cfg.eval.seeds[0], progress=False)
        finally:
            model.train()
    scores = metrics.corpus_scores(cfg.train.eval_metrics, answers, [row["target"] for row in rows],
                                   bertscore_model=cfg.eval.bertscore_model)
    return {f"eval/{name}": float(value) for name, value in scores.items()}


@contextlib.contextmanager
def kept_random_state():
    """Python's, NumPy's and torch's (CPU and GPU) random state restored on leaving: the dropout masks and data
    order of the training run do not depend on what was generated in between."""
    import random

    import numpy
    import torch

    python, legacy = random.getstate(), numpy.random.get_state()
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(python)
            numpy.random.set_state(legacy)


def count_trained_tokens(model, cfg: Config, state: dict):
    """A forward pre-hook adding each training batch's label tokens to state["tokens"].

    It counts only forwards in training mode (not evaluation, not a batch the loader prefetched but
    never trained on), and only positions the loss uses: causal labels are shifted by one.
    """
    causal = cfg.model.kind == "causal"

    def hook(module, args, kwargs):
        labels = kwargs.get("labels")
        if module.training and labels is not None:
            used = labels[:, 1:] if causal else labels
            state["tokens"] += int((used != data.IGNORE_INDEX).sum())
    return model.register_forward_pre_hook(hook, with_kwargs=True)


def run_output_dir(cfg: Config, run_id: str) -> Path:
    """Where a run keeps its checkpoints and adapters: <train.output_dir>/<name>/<run id>."""
    return Path(cfg.train.output_dir).resolve() / cfg.name / run_id


def training_arguments(cfg: Config, output_dir: Path, bf16: bool):
    """The Trainer's arguments; under torchrun, reading their .device starts the process group (gloo on CPU,
    nccl on GPU: ddp_backend None lets accelerate choose by device). Mixed precision: bf16 autocast when `bf16`,
    else fp16 autocast with loss scaling when the compute dtype is fp16 (model.dtype: fp16, e.g. a T4)."""
    import torch
    from transformers.utils import is_torch_tf32_available

    if cfg.train.tf32 and not is_torch_tf32_available():
        raise LoraflowError("train.tf32: needs an NVIDIA GPU of Ampere or newer (and CUDA), which this machine does "
                            "not have; set train.tf32=false here")
    fp16 = not bf16 and models.compute_dtype(cfg) == torch.float16
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum,
        learning_rate=cfg.train.learning_rate, lr_scheduler_type=cfg.train.lr_scheduler,
        warmup_steps=cfg.train.warmup_ratio,  # transformers 5 reads a float < 1 here as a ratio of the steps
        weight_decay=cfg.train.weight_decay,
        max_steps=cfg.train.max_steps, num_train_epochs=cfg.train.epochs, seed=cfg.train.seed,
        data_seed=cfg.train.seed, logging_steps=cfg.train.logging_steps, eval_strategy="no",
        save_strategy="steps", save_steps=cfg.train.save_steps, save_total_limit=2,
        bf16=bf16, fp16=fp16, tf32=True if cfg.train.tf32 else None, report_to="none",
        train_sampling_strategy=cfg.train.batch_order,
        remove_unused_columns=False, dataloader_num_workers=cfg.train.dataloader_workers, disable_tqdm=False,
        gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(),
        ddp_find_unused_parameters=False,  # every LoRA weight is in every forward: no search for unused ones
        **sharding_arguments(cfg),
    )


def sharding_arguments(cfg: Config) -> dict:
    """FSDP2 (train.fsdp, given as fsdp_config: transformers 5 deprecates the string form) or DeepSpeed."""
    import importlib.util

    words = cfg.train.fsdp.split()
    if words:  # auto_wrap is FSDP2's default: each decoder layer (the model's _no_split_modules) is a unit
        return {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": "shard_grad_op" not in words,
                                              "cpu_offload": "offload" in words}}
    if cfg.train.deepspeed:
        if importlib.util.find_spec("deepspeed") is None:
            raise LoraflowError("train.deepspeed needs the deepspeed package: pip install deepspeed")
        return {"deepspeed": str(cfg.resolve_path(cfg.train.deepspeed))}
    return {}


def build_trainer(cfg: Config, model, tokenizer, prepared: data.PreparedData, output_dir: Path, callback=None,
                  args=None):
    """A Trainer on the tokenised (and per data.packing packed) training split, with loraflow's callback attached
    (and `args` if made already, else training_arguments for `output_dir`).

    The plain transformers Trainer, not TRL's SFTTrainer: see training_collator."""
    import datasets
    import torch
    from transformers import Trainer

    train_examples = data.packed_training_examples(prepared.splits["train"], tokenizer, cfg)
    if not train_examples:
        raise LoraflowError("no training examples left after tokenisation (check data.max_length)")
    return Trainer(
        model=model, args=args or training_arguments(cfg, output_dir, models.compute_dtype(cfg) == torch.bfloat16),
        train_dataset=datasets.Dataset.from_list(train_examples),
        data_collator=training_collator(cfg, model, tokenizer), callbacks=[callback] if callback else [])


def training_collator(cfg: Config, model, tokenizer):
    """Batches of examples padded per row (labels -100), or of `rows` blocks with their position ids; for a causal
    model that takes them, with the LM head and loss kept to labelled positions (head_on_labelled_positions).

    TRL is not used (and not a dependency): its bfd packing forces its padding-free collator, which flattens a
    batch into one row (a (batch x block)^2 mask on eager/sdpa, loraflow's CPU default); its `num_tokens` counts
    input tokens, not the label tokens `train/tokens` reports; and SFTTrainer swaps in a fused LM head for the loss.
    """
    import functools

    from transformers import DataCollatorForSeq2Seq

    if cfg.data.packing != "rows" or cfg.train.objective == "cpt":
        collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=data.IGNORE_INDEX)
    else:
        attention = getattr(model.config, "_attn_implementation", "") or ""
        if attention.startswith("flash") and cfg.train.batch_size > 1:
            warn(f"{attention} keeps packed rows apart only with train.batch_size=1: with "
                 f"{cfg.train.batch_size} blocks a batch, a row attends to the rows before it in its block")
        collate = functools.partial(data.pad_row_blocks, pad_token_id=tokenizer.pad_token_id)
    if cfg.model.kind == "causal" and models.takes_logits_to_keep(model):
        return data.head_on_labelled_positions(collate, per_token=models.head_on_labelled_tokens(model))
    return collate


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- resuming ------------------------------------------------------------------------------------

def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoints that were written to the end (they hold the marker), newest first."""
    found = [p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted((p for p in found if (p / COMPLETE_MARKER).is_file()), key=lambda p: -int(p.name.split("-")[-1]))


def newest_complete_checkpoint(output_dir: Path) -> Path | None:
    complete = complete_checkpoints(output_dir)
    partial = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p not in complete]
    newest = complete[0] if complete else None
    for folder in partial:
        if newest is None or int(folder.name.split("-")[-1]) > int(newest.name.split("-")[-1]):
            warn(f"{folder.name} was not written to the end; resuming from "
                 f"{newest.name if newest else 'nothing'} instead")
    return newest


def find_resumable_run(cfg: Config, store: tracking.Store, run_id: str | None) -> tuple[str, Path]:
    """(run id, checkpoint) of `run_id`, else of the newest unfinished training run of this config."""
    if run_id:
        candidates = [tracking.get_run(run_id, store)]
    else:
        candidates = [run for run in tracking.find_runs(store, stage="train", project=cfg.name,
                                                        config_hash=cfg.config_hash(), trials=False)
                      if run.info.status != "FINISHED"]
    for run in candidates:
        if run.info.status == "FINISHED":
            raise LoraflowError(f"run {run.info.run_id} is FINISHED: there is nothing to resume")
        checkpoint = newest_complete_checkpoint(Path(run.data.tags.get(Tags.OUTPUT_DIR, "")))
        if checkpoint is not None:
            return run.info.run_id, checkpoint
    raise LoraflowError(f"nothing to resume: no unfinished training run of '{cfg.name}' with this config "
                        "has a complete checkpoint on this machine (or pass --run-id)")


def resumed_state(checkpoint: Path | None, run_id: str, ranks: Ranks | None = None) -> dict:
    """The counts saved with the checkpoint, and the last step the run logged (a process killed after its
    last checkpoint logged steps the resumed one repeats: those are not logged again). The saved token count
    is the job's: rank 0 carries it on, so the sum over the ranks stays the run's total."""
    ranks = ranks or Ranks()
    saved = json.loads((checkpoint / COMPLETE_MARKER).read_text()) if checkpoint else {}
    history = mlflow.MlflowClient().get_metric_history(run_id, TRAIN_LOSS) if checkpoint and ranks.main else []
    return {"logged_through": max((m.step for m in history), default=0),
            "tokens": int(saved.get("tokens", 0)) if ranks.main else 0,
            "eval": {int(k): v for k, v in saved.get("eval", {}).items()},
            "seconds": float(saved.get("seconds", 0.0)), "started": time.perf_counter()}


# --- outputs -------------------------------------------------------------------------------------

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
    callback = loraflow_callback(cfg, tokenizer, eval_rows, state, stopper, on_eval, ranks)
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
