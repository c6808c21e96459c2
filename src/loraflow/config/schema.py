"""The config's schema: one dataclass per section, each field with its type (`Literal` for choices),
default and one-line help (`opt(default, help)`).

    cfg = Config(train=TrainConfig(max_steps=5))     # defaults everywhere else; load_config validates
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from loraflow import LoraflowError

REPO_ROOT = Path(__file__).resolve().parents[3]  # src/loraflow/config/schema.py: the checkout
EMBEDDED_MODEL = "smollm2-135m-instruct"
# An optional part of a data template, `[[Input: {input}]]`: left out when a field in it is empty.
OPTIONAL_PART = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)
# transformers.SchedulerType's values, spelled out so a config loads without importing torch
# (~7 s); a test checks the list against the installed transformers.
LrScheduler = typing.Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                             "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr",
                             "cosine_warmup_with_min_lr", "warmup_stable_decay", "greedy"]


class ConfigError(LoraflowError):
    """Bad configuration; the message lists every problem found."""


def opt(default, help: str):
    """A dataclass field with its one-line help; list and section defaults are built fresh per instance."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    if dataclasses.is_dataclass(default):
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name: str = opt(EMBEDDED_MODEL, "HF folder, hub id (online only), .gguf file, or the embedded default")
    kind: typing.Literal["causal", "seq2seq"] = opt("causal", "decoder-only (causal) or encoder-decoder (seq2seq)")
    quantization: typing.Literal["nf4", "int8", "none"] = opt("none", "base weights in training (nf4: QLoRA)")
    dtype: typing.Literal["auto", "bf16", "fp16", "fp32"] = opt(
        "auto", "compute dtype; auto: bf16 where supported; fp16: fp16 mixed precision with loss scaling (no bf16)")
    trust_remote_code: bool = opt(False, "run the model repository's own Python code")


@dataclass
class DataConfig:
    path: str = opt("", "the data: a file (json array, jsonl, csv, txt, parquet, arrow; relative to the YAML), a "
                        "datasets.save_to_disk folder, hf:NAME or hub:NAME[:CONFIG] (the Hub), or builtin:catalogue")
    format: typing.Literal["auto", "json", "jsonl", "csv", "txt", "parquet", "arrow", "hf_disk", "hub"] = opt(
        "auto", "data format; auto: by extension, a folder is hf_disk (save_to_disk), hf:/hub: names are hub")
    split: str = opt("train", "the split read from a DatasetDict folder or a Hub data set (e.g. train, train[:1000])")
    encoding: str = opt("utf-8", "text encoding of data.path, read strictly (a BOM is stripped)")
    strip_html: bool = opt(False, "remove <...> tags from field values (for data scraped from HTML)")
    prompt_field: str = opt("prompt", "the record field that is the prompt, when data.prompt_template is empty")
    target_field: str = opt("target", "the record field that is the answer, when data.target_template is empty")
    prompt_template: str = opt("", 'the prompt from record fields, e.g. "{instruction}[[\\n\\nInput: {input}]]" '
                                   '(a [[...]] part is left out if a field in it is empty); empty: "{<prompt_field>}"')
    target_template: str = opt("", 'the answer from record fields, e.g. "{content}" ([[...]]: optional); '
                                   'empty: "{<target_field>}"')
    messages_field: str = opt("", "chat data: the field holding a conversation ({role, content} or ShareGPT {from, "
                                  "value}), learned on its assistant turns; empty: prompt/target rows")
    chat_template: bool = opt(True, "wrap prompts in the tokenizer's chat template when it has one")
    system_prompt: str = opt("", "system message placed in the chat template (empty: none)")
    text_field: str = opt("text", "the raw text field for train.objective=cpt (txt files: whole lines)")
    where: dict = opt({}, "keep only the records whose fields match, {field: regular expression matched in full}, "
                          "e.g. {task: qa} or {task: \"qa|summari[sz]ation\"}; applied before data.max_rows")
    max_rows: int = opt(0, "read at most this many rows, a random sample seeded by data.split_seed (0: all)")
    min_target_chars: int = opt(1, "drop rows whose answer is shorter than this many characters")
    val_fraction: float = opt(0.1, "share of rows held out for validation (eval/loss)")
    test_fraction: float = opt(0.1, "share of rows held out for testing (generated answers and their metrics)")
    split_seed: int = opt(42, "seed of the shuffle that splits the rows")
    train_subset: float = opt(1.0, "share of the training split trained on, a sample seeded by data.split_seed "
                                   "(1: all); the held-out splits stay whole")
    base_prompt_template: str = opt("", "evaluation: the prompt the base model is asked, from the same fields (e.g. "
                                        "without the tags the tuned model learns); empty: the tuned model's prompt")
    max_length: int = opt(512, "tokens per training example / block")
    packing: typing.Literal["none", "constant", "rows"] = opt(
        "none", "SFT: constant (text cut into max_length blocks; rows see each other) or rows (whole rows, apart)")
    builtin_rows: int = opt(240, "rows generated for builtin:catalogue")


@dataclass
class LoraConfig:
    r: int = opt(8, "LoRA rank")
    alpha: int = opt(16, "LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = opt(0.05, "dropout on the LoRA branch's input, in [0, 1)")
    target_modules: typing.Union[str, list] = opt("all-linear", 'modules to adapt: "all-linear" or a list of names')
    layers_to_transform: typing.Optional[list] = opt(None, "layer indices to adapt (null: every layer)")


@dataclass
class TrainConfig:
    enabled: bool = opt(True, "false: the pipeline trains nothing and evaluates the base model alone (zero-shot)")
    objective: typing.Literal["sft", "cpt"] = opt("sft", "sft (prompt -> answer) or cpt (continued pretraining)")
    learning_rate: float = opt(2e-4, "peak learning rate")
    max_steps: int = opt(-1, "optimiser steps; > 0 overrides train.epochs")
    epochs: float = opt(1.0, "passes over the training split (when train.max_steps <= 0)")
    batch_size: int = opt(4, "examples per device and step")
    grad_accum: int = opt(1, "gradient accumulation steps (effective batch: batch_size * grad_accum)")
    lr_scheduler: LrScheduler = opt("cosine", "learning-rate schedule (transformers SchedulerType)")
    warmup_ratio: float = opt(0.03, "share of the steps spent warming up, in [0, 1)")
    weight_decay: float = opt(0.0, "weight decay of the optimiser")
    seed: int = opt(42, "training seed")
    logging_steps: int = opt(1, "log the training loss every N steps")
    eval_steps: int = opt(20, "compute eval/loss every N steps")
    save_steps: int = opt(50, "save a checkpoint every N steps")
    eval_rows: int = opt(64, "validation rows of the evaluations during training: eval/loss and "
                                  "train.eval_metrics (0: all)")
    gradient_checkpointing: bool = opt(False, "recompute activations in the backward pass to save memory")
    batch_order: typing.Literal["group_by_length", "random"] = opt(
        "group_by_length", "training batches of rows of similar length (less padding) or in random order")
    tf32: bool = opt(False, "TF32 matmuls on an NVIDIA GPU of Ampere or newer (refused elsewhere); fp16 mixed "
                            "precision is model.dtype: fp16")
    eval_metrics: list = opt([], "metrics of answers generated for the eval rows at each evaluation, logged as "
                                 "eval/<metric> per step (e.g. [sacrebleu]; empty: the loss only)")
    price_per_hour: float = opt(0.0, "USD per hour of this machine, for train/cost_usd; 0 on a local CPU")
    early_stopping_patience: int = opt(0, "stop after this many evaluations without a lower eval/loss (0: never); "
                                          "the adapter kept is always the best one")
    dataloader_workers: int = opt(0, "data-loader worker processes (0: load batches in the training process)")
    store_outage_seconds: float = opt(600.0, "how long metric writes wait out an unanswering tracking store before "
                                             "the run checkpoints and fails")
    output_dir: str = opt("outputs", "checkpoints and adapters go to <output_dir>/<name>/<run id>")
    fsdp: str = opt("", "FSDP2 across the job's processes: full_shard or shard_grad_op, optionally with offload and "
                        "auto_wrap (empty: each process holds the whole model)")
    deepspeed: str = opt("", "DeepSpeed config JSON passed to the Trainer (relative to the YAML; empty: none)")


@dataclass
class EvalConfig:
    split: typing.Literal["test", "validation"] = opt("test", "the held-out split whose prompts are answered and "
                                                              "scored (validation: with data.test_fraction 0)")
    seeds: list = opt([0], "sampling seeds: metrics are means with _std over them (greedy uses the first)")
    num_samples: int = opt(16, "rows of eval.split to answer and score")
    max_new_tokens: int = opt(64, "longest generated answer, in tokens")
    metrics: list = opt(["rouge1", "rougeL"], "metrics of the answers: rouge1, rouge2, rougeL, bertscore, "
                                              "sacrebleu, token_f1, exact_match")
    temperature: float = opt(0.0, "sampling temperature (0: greedy)")
    top_p: float = opt(1.0, "nucleus sampling probability mass (when temperature > 0)")
    repetition_penalty: float = opt(1.0, "penalty on repeated tokens (1: none)")
    batch_size: int = opt(16, "prompts generated at once (and validation rows per loss batch)")
    bertscore_model: str = opt("minilm-l6", "BERTScore model: minilm-l6 (pip package) or a local HF folder")
    bootstrap_samples: int = opt(1000, "paired bootstrap resamples for the delta/ confidence intervals")


@dataclass
class TuneConfig:
    enabled: bool = opt(False, "the pipeline runs an Optuna study instead of a single training run")
    n_trials: int = opt(8, "the study's total of trials, shared by every worker on it (a retried trial counts once)")
    timeout: float = opt(0.0, "seconds after which no new trial starts (0: none)")
    direction: typing.Literal["minimize", "maximize"] = opt("minimize", "whether tune.objective is minimised")
    objective: str = opt("eval/loss", "eval/loss or <base|tuned|delta>/<a metric of eval.metrics>")
    r_choices: list = opt([4, 8, 16, 32], "LoRA ranks to try")
    alpha_multipliers: list = opt([1, 2], "lora.alpha = multiplier * lora.r, for each multiplier tried")
    lr_low: float = opt(1e-5, "lowest learning rate tried (log scale)")
    lr_high: float = opt(1e-3, "highest learning rate tried (log scale)")
    dropout_choices: typing.Optional[list] = opt(None, "lora.dropout values to try (null: keep lora.dropout)")
    target_modules_choices: typing.Optional[list] = opt(None, "lora.target_modules values to try (null: keep)")
    layers_choices: typing.Optional[list] = opt(None, 'layers to adapt, e.g. ["all", "last:1"] (null: keep)')
    pruner: typing.Literal["median", "successive_halving", "hyperband", "none"] = opt(
        "median", "how unpromising trials stop early: median (below the finished trials' median at a step), "
        "successive_halving (outside the best 1/N at validations 1, N, N^2, ..., N = pruner_reduction_factor), "
        "hyperband, none")
    sampler_seed: int = opt(0, "seed of the TPE sampler")
    study_name: str = opt("", "Optuna study name (empty: the project's name)")
    storage: str = opt("", "Optuna storage URL or journal file (empty: beside the MLflow store)")
    sampler_startup_trials: int = opt(4, "random trials before TPE models the results")
    pruner_startup_trials: int = opt(2, "trials that must finish before the median pruner prunes")
    pruner_warmup_steps: int = opt(0, "training steps before a trial may be pruned (median pruner)")
    pruner_reduction_factor: int = opt(3, "successive_halving: the best 1/N of the trials at a rung go on; rungs "
                                          "at validations 1, N, N^2, ...")


@dataclass
class RegistryConfig:
    model_name: str = opt("", "registered model name (empty: the project's name)")
    alias: str = opt("champion", "alias of the promoted version")
    gate_metric: str = opt("rougeL", "what must improve to register: loss, perplexity or one of eval.metrics")
    min_improvement: float = opt(0.0, "smallest improvement over the base model that promotes")
    serve_dtype: typing.Literal["auto", "bf16", "fp16", "fp32"] = opt(
        "auto", "dtype a registered version is gated and served in (its adapter on the unquantised base); "
                "auto: model.dtype's compute dtype on the registering machine, recorded with the version")
    merge_dtype: typing.Literal["auto", "fp32", "fp16", "bf16"] = opt(
        "auto", "dtype of the merged folder register saves beside the adapter (merged on the CPU, each layer in "
                "fp32); auto: registry.serve_dtype")
    max_new_tokens_cap: int = opt(512, "most tokens one serving request may generate")


@dataclass
class Config:
    name: str = opt("", "MLflow experiment and default model name (default: the folder[-variant])")
    model: ModelConfig = opt(ModelConfig, "the base model")
    data: DataConfig = opt(DataConfig, "rows, prompts and splits")
    lora: LoraConfig = opt(LoraConfig, "the adapter")
    train: TrainConfig = opt(TrainConfig, "training")
    eval: EvalConfig = opt(EvalConfig, "generation and scoring of held-out answers")
    tune: TuneConfig = opt(TuneConfig, "hyperparameter search")
    registry: RegistryConfig = opt(RegistryConfig, "gate, registration and serving")
    source: str = opt("", "the YAML file this came from (not hashed)")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("source")
        return data

    def config_hash(self) -> str:
        """A short hash of everything that changes a result (the source path excluded)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def resolve_path(self, path: str) -> Path:
        """A path from the config, relative to the YAML file's folder, with $VARS expanded."""
        expanded = Path(os.path.expandvars(os.path.expanduser(path)))
        if expanded.is_absolute() or not self.source:
            return expanded
        return Path(self.source).parent / expanded

    @property
    def model_name(self) -> str:
        return self.registry.model_name or self.name


SECTIONS = {"model": ModelConfig, "data": DataConfig, "lora": LoraConfig, "train": TrainConfig,
            "eval": EvalConfig, "tune": TuneConfig, "registry": RegistryConfig}
FSDP1_ONLY = ("no_shard", "hybrid_shard", "hybrid_shard_zero2")
