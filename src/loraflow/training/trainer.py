"""The Hugging Face Trainer as loraflow runs it: its arguments (mixed precision, sharding), the collator
that keeps the LM head to labelled positions, and the training split tokenised and packed.

    trainer = build_trainer(cfg, model, tokenizer, prepared, output_dir, callback)
"""
from __future__ import annotations

import resource
from pathlib import Path

from loraflow import LoraflowError, data, models, warn
from loraflow.config import Config


CLEAR_REFS, PROC_STATUS = "/proc/self/clear_refs", "/proc/self/status"

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


def reset_peak_memory() -> None:
    """Start this process's peak-memory figure afresh, so each run in one process (tune trials, pipeline steps)
    reports its own: torch's peak statistics on a GPU; on Linux the resident high-water mark, VmHWM, which
    writing 5 to /proc/self/clear_refs resets (getrusage's ru_maxrss never goes down)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        with open(CLEAR_REFS, "w") as handle:
            handle.write("5")
    except OSError:  # not Linux, or not allowed: peak_memory_mb falls back to the process's whole life
        pass


def peak_memory_mb() -> float:
    """Peak memory since reset_peak_memory: allocated GPU memory on a GPU, else the resident set's high-water mark
    (VmHWM; ru_maxrss, the whole process's, where /proc is missing)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open(PROC_STATUS) as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024