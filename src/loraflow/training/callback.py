"""What loraflow adds to the Trainer's loop: logging, token-weighted validation, the best adapter, early
stopping, the trained-token count and signals.

    callback = LoraflowCallback(cfg, tokenizer, eval_rows, state, stopper, on_eval=None)
    count_trained_tokens(trainer.model, cfg, state)      # state["tokens"]: label tokens trained on
"""
from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback

from loraflow import data, generation, metrics, tracking
from loraflow.config import Config
from loraflow.tracking import EVAL_LOSS, TRAIN_LOSS
from loraflow.training.checkpoints import COMPLETE_MARKER
from loraflow.training.distributed import Ranks

TRAINER_METRICS = {"loss": TRAIN_LOSS, "learning_rate": "train/learning_rate", "grad_norm": "train/grad_norm"}
BEST_MARKER = "loraflow_best.json"  # step and validation loss of the adapter kept as the best


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


class LoraflowCallback(TrainerCallback):
    """The TrainerCallback that logs, evaluates (token-weighted), keeps the best adapter, stops early,
    counts tokens and honours signals.

    `state` holds {"tokens": label tokens this process trained on (plus, on rank 0, those of the earlier
    processes of a resumed run), "eval": {step: loss}, "seconds": training time before this process}; the
    checkpoint saves them, so a resumed run keeps counting. state["best_dir"] holds the adapter of the lowest
    validation loss so far (its step and loss beside it). In a job, rank 0 decides and logs; the ranks agree
    at each step's end (and log) on whether to save and stop, so that they all leave the loop together.
    """

    def __init__(self, cfg: Config, tokenizer, eval_rows: list[dict], state: dict, stopper: StopOnSignal,
                 on_eval: Callable[[int, float], None] | None, ranks: Ranks | None = None):
        self.cfg, self.tokenizer, self.eval_rows, self.state = cfg, tokenizer, eval_rows, state
        self.stopper, self.on_eval, self.ranks = stopper, on_eval, ranks or Ranks()

    def write(self, metrics: dict, step: int) -> None:
        """Buffered: a busy store delays the values; one gone too long stops training after a checkpoint."""
        try:
            self.state["metrics"].log(metrics, step)
        except tracking.StoreUnavailable as exc:
            self.state["store_error"] = exc

    def agree_to_stop(self, control, early: bool = False):
        """Every rank saves and stops on a signal or a lost store anywhere; stops (without saving) when rank 0
        stops early."""
        signum, store_down, early = self.ranks.reduce([self.stopper.signum or 0, "store_error" in self.state, early],
                                                      "max")
        if signum or store_down:
            control.should_save = control.should_training_stop = True
        if early:
            control.should_training_stop = True
        return control

    def on_epoch_begin(self, args, trainer_state, control, **kwargs):
        # group_by_length shuffles with the global CPU generator, on each rank, before every epoch; on CPU the
        # LoRA dropout of unequal batches moves it unequally, so the ranks would split different orders.
        if self.ranks.world_size > 1:
            import torch

            torch.set_rng_state(self.ranks.from_main(torch.get_rng_state()))

    def on_log(self, args, trainer_state, control, logs=None, **kwargs):
        metrics = {TRAINER_METRICS[k]: float(v) for k, v in (logs or {}).items() if k in TRAINER_METRICS}
        if self.ranks.main and metrics and trainer_state.global_step > self.state["logged_through"]:  # never twice
            self.write(metrics, trainer_state.global_step)
        return self.agree_to_stop(control)

    def on_step_end(self, args, trainer_state, control, model=None, **kwargs):
        step = trainer_state.global_step
        due = self.eval_rows and (step % self.cfg.train.eval_steps == 0 or step >= trainer_state.max_steps)
        return self.agree_to_stop(control, bool(due) and self.validate(model, step))

    def validate(self, model, step: int) -> bool:
        """Validation loss and answer scores at `step`, logged; the best adapter kept. Returns whether to stop
        early. Every rank evaluates the same rows (a sharded model's forward needs them all); rank 0's figure
        counts."""
        ranks, state = self.ranks, self.state
        loss = evaluate_now(model, self.tokenizer, self.eval_rows, self.cfg)
        scores = answer_scores_now(model, self.tokenizer, self.eval_rows, self.cfg)
        loss, scores, improved = ranks.from_main((loss, scores, ranks.main and improves(state, loss)))
        state["eval"][step] = loss
        if improved:
            keep_best(state, step, ranks)
        early = False
        if ranks.main:
            if step > state["logged_through"]:
                self.write({EVAL_LOSS: loss, **scores}, step)
            early = stop_early(self.cfg, state, step)
        if self.on_eval:
            self.on_eval(step, loss)
        return early

    def on_save(self, args, trainer_state, control, **kwargs):
        # The sum is also a barrier: every rank has written its part of the checkpoint before the marker.
        saved = {"tokens": int(self.ranks.reduce([self.state["tokens"]])[0]), "eval": self.state["eval"],
                 "seconds": training_seconds(self.state), "world_size": self.ranks.world_size}
        if args.should_save:  # the process that wrote the checkpoint
            folder = Path(args.output_dir) / f"checkpoint-{trainer_state.global_step}"
            (folder / COMPLETE_MARKER).write_text(json.dumps(saved))


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
