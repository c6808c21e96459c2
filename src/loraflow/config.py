"""Typed project configuration: YAML files, dotted overrides, validation that lists every problem.

    cfg = load_config("quickstart", overrides=["train.max_steps=5", "lora.r=4"])
    print(describe_text(cfg))                       # every key: value, default, help, choices
    trial = with_values(cfg, {"lora.r": 16})        # a validated copy with a few keys changed

A project is a folder holding `config.yaml` (and variants), looked up in $LORAFLOW_PROJECTS, then
./projects, then the checkout's projects/; or a path to a YAML file. A variant may start with
`base: config.yaml` to inherit another file and change a few keys. Each field's help is in its
definition (`opt(default, help)`); choices are `Literal` types.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import re
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loraflow import LoraflowError

REPO_ROOT = Path(__file__).resolve().parents[2]
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
    merge_dtype: typing.Literal["fp32", "fp16", "bf16"] = opt("fp32", "dtype of the base the adapter merges into")
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


# --- describing a config ---------------------------------------------------------------------------

def describe(cfg: Config) -> list[dict]:
    """One row per key (`name`, `model.name`, ..., `source`) in definition order:
    {"key", "value", "default", "help", "choices"}; choices is None unless the field is a Literal."""
    rows = []
    for top in dataclasses.fields(Config):
        holder, prefix = (getattr(cfg, top.name), f"{top.name}.") if top.name in SECTIONS else (cfg, "")
        hints = typing.get_type_hints(type(holder))
        for item in dataclasses.fields(holder) if prefix else [top]:
            literal = typing.get_origin(hints[item.name]) is typing.Literal
            rows.append({"key": prefix + item.name, "value": getattr(holder, item.name), "default": default_of(item),
                         "help": item.metadata["help"],
                         "choices": list(typing.get_args(hints[item.name])) if literal else None})
    return rows


def default_of(item: dataclasses.Field):
    return item.default if item.default_factory is dataclasses.MISSING else item.default_factory()


def describe_text(cfg: Config) -> str:
    """`describe` as an aligned table grouped by section; `*` marks a value that differs from its default."""
    rows = describe(cfg)
    key_width = max(len(row["key"]) for row in rows)
    value_width = min(40, max(len(shown(row["value"])) for row in rows))
    headings = {f.name: f.metadata["help"] for f in dataclasses.fields(Config)}
    lines, group = [], None
    for row in rows:
        section = row["key"].split(".")[0] if "." in row["key"] else ""
        if section != group:
            group = section
            lines += [""] + ([f"{section}: {headings[section]}"] if section else [])
        changed = "." in row["key"] and row["value"] != row["default"]  # name and source have no real default
        notes = [row["help"]] + ([f"one of {'|'.join(row['choices'])}"] if row["choices"] else []) \
            + ([f"default {shown(row['default'])}"] if changed else [])
        lines.append(f"{'*' if changed else ' '} {row['key']:<{key_width}}  {shown(row['value']):<{value_width}}  "
                     + "; ".join(notes))
    return "\n".join(lines[1:] + ["", "* differs from the default"])


def shown(value) -> str:
    """A value as `--set` would take it: plain text, else JSON (empty or multi-line text, lists, null)."""
    if isinstance(value, str) and value and value.isprintable() and value.strip() == value:
        return value
    return json.dumps(value, ensure_ascii=False)


# --- reading files and overrides -------------------------------------------------------------------

def project_roots() -> list[Path]:
    """Folders holding projects: each of $LORAFLOW_PROJECTS, ./projects, then the checkout's projects/."""
    roots = [Path(p).expanduser() for p in os.environ.get("LORAFLOW_PROJECTS", "").split(os.pathsep) if p]
    roots.append(Path.cwd() / "projects")
    if (REPO_ROOT / "projects").is_dir():  # a source checkout; an installed wheel has none
        roots.append(REPO_ROOT / "projects")
    return list(dict.fromkeys(root.resolve() for root in roots))


def find_config_file(project: str) -> Path:
    """`quickstart` -> <a project root>/quickstart/config.yaml; a YAML path is taken as it is."""
    candidate = Path(project)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ConfigError(f"config file not found: {project}")
        return candidate.resolve()
    roots = project_roots()
    for root in roots:
        if (root / project / "config.yaml").is_file():
            return (root / project / "config.yaml").resolve()
    if (candidate / "config.yaml").is_file():
        return (candidate / "config.yaml").resolve()
    raise ConfigError(f"unknown project '{project}': no {project}/config.yaml in {', '.join(map(str, roots))} "
                      "(more folders: $LORAFLOW_PROJECTS) and no such YAML file")


def read_yaml_with_base(path: Path, seen: tuple = ()) -> dict:
    """The YAML mapping of `path`, merged over the file named by its `base:` key, if any."""
    if path in seen:
        raise ConfigError(f"config files include each other: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    return deep_merge(read_yaml_with_base((path.parent / base).resolve(), seen + (path,)), data)


def deep_merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[str, object]:
    """`train.max_steps=5` -> ("train.max_steps", 5); values are read as YAML scalars or lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not KEY=VALUE")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if is_string_field(key.strip()) and not isinstance(value, str):
        value = raw  # `data.prompt_template=Title: {title}` is text, not a YAML mapping
    return key.strip(), value


def is_string_field(key: str) -> bool:
    section, _, leaf = key.partition(".")
    hint = typing.get_type_hints(SECTIONS[section]).get(leaf) if section in SECTIONS else None
    return hint is str or typing.get_origin(hint) is typing.Literal


def set_values(data: dict, values: dict) -> dict:
    """A copy of `data` with dotted keys set; a field set this way replaces its side's template."""
    data = copy.deepcopy(data)
    for key, value in values.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': {part} is not a section")
        node[leaf] = value
    for side in ("prompt", "target"):  # data.templates_for prefers the template: clear it (both set: refused)
        if f"data.{side}_field" in values and not values.get(f"data.{side}_template") \
                and isinstance(data.get("data"), dict):
            data["data"][f"{side}_template"] = ""
    return data


def type_problem(key: str, value, annotation) -> str | None:
    """A message if `value` does not fit the field's annotation (a type, union or Literal), else None."""
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        return None if value in choices else f"{key}: {value!r} is not one of {', '.join(map(str, choices))}"
    allowed = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    for kind in allowed:
        origin = typing.get_origin(kind) or kind
        if kind is type(None) and value is None:
            return None
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if origin in (str, bool, list, dict) and isinstance(value, origin):
            return None
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    return f"{key}: expected {names}, got {type(value).__name__} {value!r}"


def packing_bool_problem(value) -> str | None:
    """The one-line problem for data.packing given as a boolean (YAML `true`, or `--set data.packing=true`)."""
    if isinstance(value, str):
        with contextlib.suppress(yaml.YAMLError):
            value = yaml.safe_load(value)
    if not isinstance(value, bool):
        return None
    return (f"data.packing: {str(value).lower()} is not a packing mode: use constant (whole text cut into fixed "
            "blocks, rows see each other) or rows (whole rows per block, each attending only to itself); "
            "none turns packing off")


def build_section(section_name: str, cls, values, problems: list[str]):
    if not isinstance(values, dict):
        problems.append(f"{section_name}: expected a mapping, got {type(values).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    accepted = {}
    for key, value in values.items():
        if key not in hints:
            problems.append(f"{section_name}.{key}: unknown key")
            continue
        if isinstance(value, int) and not isinstance(value, bool) and hints[key] is float:
            value = float(value)
        if isinstance(value, str) and hints[key] is float:
            with contextlib.suppress(ValueError):  # YAML 1.1 reads `1e-4` (no dot) as a string
                value = float(value)
        problem = type_problem(f"{section_name}.{key}", value, hints[key])
        if f"{section_name}.{key}" == "data.packing":
            problem = packing_bool_problem(value) or problem
        if problem:
            problems.append(problem)
        else:
            accepted[key] = value
    return cls(**accepted)


def from_dict(data: dict, *, name: str = "", source: str = "", overrides: dict | None = None) -> Config:
    """Build a Config from a mapping with dotted `overrides` set; raises ConfigError listing every problem."""
    overrides = overrides or {}
    data = set_values(data, overrides)
    problems: list[str] = []
    sections = {}
    for key, values in data.items():
        if key == "name":
            continue
        if key not in SECTIONS:
            problems.append(f"{key}: unknown section (expected one of {', '.join(SECTIONS)})")
            continue
        sections[key] = build_section(key, SECTIONS[key], values, problems)
    cfg = Config(name=str(data.get("name") or name), source=source, **sections)
    problems += validate(cfg) + override_problems(cfg, overrides)
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    return cfg


def load_config(project: str, overrides: list[str] | tuple = ()) -> Config:
    """Load a project's config (folder name or YAML path), apply `--set` overrides, validate."""
    path = find_config_file(project)
    values = dict(parse_override(text) for text in overrides)
    default_name = path.parent.name if path.name == "config.yaml" else f"{path.parent.name}-{path.stem}"
    return from_dict(read_yaml_with_base(path), name=default_name, source=str(path), overrides=values)


def with_values(cfg: Config, values: dict[str, object]) -> Config:
    """A copy of `cfg` with dotted keys set ({"lora.r": 16}), rebuilt and validated like a loaded config."""
    return from_dict(cfg.to_dict(), name=cfg.name, source=cfg.source, overrides=values)


# TrainingArguments.fsdp words FSDP2 takes (transformers.trainer_utils.FSDPOption minus the FSDP1-only ones),
# spelled out so a config loads without importing transformers; a test checks them against FSDPOption.
FSDP_OPTIONS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")
FSDP1_ONLY = ("no_shard", "hybrid_shard", "hybrid_shard_zero2")

# --- validation ------------------------------------------------------------------------------------

POSITIVE = ("lora.r", "lora.alpha", "train.learning_rate", "train.batch_size", "train.grad_accum",
            "train.logging_steps", "train.eval_steps", "train.save_steps", "data.max_length", "eval.max_new_tokens",
            "eval.batch_size", "eval.num_samples", "registry.max_new_tokens_cap")
AT_LEAST = {"data.max_rows": 0, "train.eval_rows": 0, "eval.bootstrap_samples": 1,
            "train.early_stopping_patience": 0, "train.dataloader_workers": 0, "train.store_outage_seconds": 0}
# train.warmup_ratio is passed as warmup_steps, which transformers reads as a ratio only below 1.
UNIT_INTERVAL = ("lora.dropout", "train.warmup_ratio")


def value_of(cfg: Config, key: str):
    section, leaf = key.split(".")
    return getattr(getattr(cfg, section), leaf)


def validate(cfg: Config) -> list[str]:
    """Every problem with the values of a config (types and choices are checked while building it)."""
    problems = [f"{key}: must be > 0, got {value_of(cfg, key)}" for key in POSITIVE if value_of(cfg, key) <= 0]
    problems += [f"{key}: must be >= {low}, got {value_of(cfg, key)}" for key, low in AT_LEAST.items()
                 if value_of(cfg, key) < low]
    problems += [f"{key}: must be in [0, 1), got {value_of(cfg, key)}" for key in UNIT_INTERVAL
                 if not 0 <= value_of(cfg, key) < 1]
    if cfg.train.max_steps <= 0 and cfg.train.epochs <= 0:
        problems.append("train: set train.max_steps > 0 or train.epochs > 0")
    fractions = cfg.data.val_fraction + cfg.data.test_fraction
    if cfg.data.val_fraction < 0 or cfg.data.test_fraction < 0 or fractions >= 1:
        problems.append("data.val_fraction + data.test_fraction must be in [0, 1) and each >= 0")
    if not 0 < cfg.data.train_subset <= 1:
        problems.append(f"data.train_subset: must be in (0, 1], got {cfg.data.train_subset}")
    if cfg.data.base_prompt_template and cfg.train.objective == "cpt":
        problems.append("data.base_prompt_template: cpt has no prompts (raw text, judged by its loss)")
    if cfg.eval.split == "validation" and cfg.data.val_fraction == 0:
        problems.append("eval.split: validation needs validation rows (data.val_fraction > 0)")
    if not cfg.data.path:
        problems.append("data.path: missing (the data file to train on)")
    if not cfg.eval.seeds or not all(isinstance(s, int) for s in cfg.eval.seeds):
        problems.append(f"eval.seeds: expected a non-empty list of integers, got {cfg.eval.seeds!r}")
    if cfg.lora.layers_to_transform is not None and not all(
            isinstance(i, int) and i >= 0 for i in cfg.lora.layers_to_transform):
        problems.append("lora.layers_to_transform: expected a list of layer indices >= 0")
    if cfg.model.kind == "seq2seq" and cfg.train.objective == "cpt":
        problems.append("train.objective: cpt needs model.kind=causal")
    if cfg.train.early_stopping_patience > 0 and cfg.data.val_fraction == 0:
        problems.append("train.early_stopping_patience: needs validation rows (data.val_fraction > 0)")
    if cfg.model.kind == "seq2seq" and cfg.data.packing != "none":
        problems.append(f"data.packing: {cfg.data.packing} needs model.kind=causal (a seq2seq example is an "
                        "encoder input and its decoder labels: there is no text to pack)")
    problems += template_problems(cfg.data) + chat_data_problems(cfg) + where_problems(cfg.data)
    return problems + metric_problems(cfg) + registry_problems(cfg) + tune_problems(cfg) + sharding_problems(cfg)


def template_problems(data: DataConfig) -> list[str]:
    """Templates str.format cannot fill, and optional parts `[[...]]` left open or nested."""
    problems = []
    for key in ("prompt_template", "target_template", "base_prompt_template"):
        template = getattr(data, key)
        outside = OPTIONAL_PART.sub("", template)
        if "[[" in outside or "]]" in outside or any("[[" in part for part in OPTIONAL_PART.findall(template)):
            problems.append(f"data.{key}: an optional part [[...]] is left open or holds another one")
        try:
            for piece in OPTIONAL_PART.split(template):
                list(string.Formatter().parse(piece))
        except ValueError as exc:
            problems.append(f"data.{key}: {exc} (a field is {{name}}; a literal brace is {{{{ or }}}})")
    return problems


def where_problems(data: DataConfig) -> list[str]:
    """data.where entries that are not a field name with a regular expression (a string or number)."""
    problems = []
    for name, pattern in data.where.items():
        if isinstance(pattern, bool) or not isinstance(pattern, (str, int, float)):
            problems.append(f"data.where.{name}: expected a regular expression, got {type(pattern).__name__} "
                            f"{pattern!r}")
            continue
        try:
            re.compile(str(pattern))
        except re.error as exc:
            problems.append(f"data.where.{name}: {pattern!r} is not a regular expression ({exc})")
    return problems


def chat_data_problems(cfg: Config) -> list[str]:
    """data.messages_field needs a causal model's chat template and no prompt/target templates."""
    if not cfg.data.messages_field:
        return []
    problems = [f"data.{key}: set, but data.messages_field renders each conversation with the chat template: "
                "give one" for key in ("prompt_template", "target_template", "base_prompt_template")
                if getattr(cfg.data, key)]
    if cfg.model.kind != "causal" or not cfg.data.chat_template or cfg.train.objective != "sft":
        problems.append("data.messages_field: chat data needs model.kind=causal, data.chat_template=true and "
                        "train.objective=sft (a conversation is rendered by the tokenizer's chat template)")
    return problems


def sharding_problems(cfg: Config) -> list[str]:
    """train.fsdp words FSDP2 does not take, sharding quantised weights, FSDP and DeepSpeed together, and a
    DeepSpeed file that is missing, not JSON, or ZeRO-3 over quantised weights."""
    words, quantized = cfg.train.fsdp.split(), cfg.model.quantization != "none"
    problems = [f"train.fsdp: {word} needs FSDP1, which transformers 5 deprecates; use full_shard or shard_grad_op"
                if word in FSDP1_ONLY else f"train.fsdp: unknown option {word!r} (one of {', '.join(FSDP_OPTIONS)})"
                for word in words if word not in FSDP_OPTIONS]
    if {"full_shard", "shard_grad_op"} <= set(words):
        problems.append("train.fsdp: full_shard and shard_grad_op are two strategies; give one")
    if words and quantized:
        problems.append(f"train.fsdp: cannot shard model.quantization={cfg.model.quantization} weights (bitsandbytes "
                        "keeps them as integers without a float bnb_4bit_quant_storage, which loraflow does not set); "
                        "shard the unquantised model instead, or train nf4 without train.fsdp")
    if words and cfg.train.deepspeed:
        problems.append("train.fsdp and train.deepspeed both set: give one")
    if not cfg.train.deepspeed:
        return problems
    path = cfg.resolve_path(cfg.train.deepspeed)
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return problems + [f"train.deepspeed: cannot read {path} as JSON ({str(exc).splitlines()[0]})"]
    stage = settings.get("zero_optimization", {}).get("stage") if isinstance(settings, dict) else None
    if not isinstance(settings, dict):
        problems.append(f"train.deepspeed: {path} is not a JSON object")
    elif stage == 3 and quantized:
        problems.append(f"train.deepspeed: ZeRO stage 3 cannot partition model.quantization={cfg.model.quantization} "
                        "weights (no float bnb_4bit_quant_storage); use stage 2 or model.quantization=none")
    return problems


def metric_problems(cfg: Config) -> list[str]:
    """Unknown metrics, and a BERTScore model that cannot be found locally."""
    from loraflow.metrics import bertscore_model_path, unknown_metrics

    problems = [f"{key}: unknown metric {name!r}" for key, names in (("eval.metrics", cfg.eval.metrics),
                                                                     ("train.eval_metrics", cfg.train.eval_metrics))
                for name in unknown_metrics(list(names))]
    if cfg.train.eval_metrics and cfg.train.objective == "cpt":
        problems.append("train.eval_metrics: cpt has no prompts to answer; the loss is its measure")
    if "bertscore" in cfg.eval.metrics + cfg.train.eval_metrics:
        try:
            bertscore_model_path(cfg.eval.bertscore_model)
        except ValueError as exc:
            problems.append(f"eval.bertscore_model: {exc}")
    return problems


def registry_problems(cfg: Config) -> list[str]:
    """A gate metric the evaluation will not compute; a model name or alias MLflow's registry refuses."""
    from mlflow.utils import validation  # the checks MLflow itself runs when registering, with its messages

    problems = gate_metric_problems(cfg)
    if not cfg.model_name.strip():
        problems.append("registry.model_name: empty, and the project has no name")
    else:
        problems += mlflow_refusal("registry.model_name", cfg.model_name, validation._validate_model_name)
    return problems + mlflow_refusal("registry.alias", cfg.registry.alias, validation._validate_model_alias_name,
                                     validation._validate_model_alias_name_reserved)


def mlflow_refusal(key: str, value: str, *checks) -> list[str]:
    """The first of MLflow's `checks` that refuses `value`, as a problem."""
    from mlflow.exceptions import MlflowException

    try:
        for check in checks:
            check(value)
    except MlflowException as exc:
        return [f"{key} {value!r}: MLflow refuses it ({exc.message})"]
    return []


def gate_metric_problems(cfg: Config) -> list[str]:
    """registry.gate_metric must be computed: loss always is; a zero-shot config registers nothing."""
    metric = cfg.registry.gate_metric
    if not cfg.train.enabled or metric in ("loss", "perplexity"):
        return []
    if cfg.train.objective == "cpt":
        return [f"registry.gate_metric {metric!r}: continued pretraining is evaluated on loss only; "
                "set registry.gate_metric=loss"]
    if metric not in cfg.eval.metrics:
        return [f"registry.gate_metric {metric!r} is not evaluated: add it to eval.metrics "
                f"({', '.join(map(str, cfg.eval.metrics))}) or use loss"]
    return []


def override_problems(cfg: Config, overrides: dict) -> list[str]:
    """Overridden keys the rest of the config would silently ignore: refused, since the user expects an effect."""
    cpt, chat = cfg.train.objective == "cpt", cfg.data.chat_template and cfg.model.kind == "causal"
    ignored = {"data.system_prompt": (not chat, "it is only sent inside a chat template (data.chat_template=true, "
                                                "model.kind=causal)"),
               "data.text_field": (not cpt, "only train.objective=cpt reads raw text"),
               "data.packing": (cpt, "train.objective=cpt always cuts the text into blocks"),
               "data.builtin_rows": (not cfg.data.path.startswith("builtin:"), "data.path is a file"),
               "tune.pruner_startup_trials": (cfg.tune.pruner != "median", "only tune.pruner=median uses it"),
               "tune.pruner_warmup_steps": (cfg.tune.pruner != "median", "only tune.pruner=median uses it"),
               "tune.pruner_reduction_factor": (cfg.tune.pruner != "successive_halving",
                                                "only tune.pruner=successive_halving uses it")}
    ignored |= {f"data.{key}": (cpt, "train.objective=cpt reads data.text_field only")
                for key in ("prompt_field", "target_field", "prompt_template", "target_template")}
    problems = [f"{key} set, but has no effect: {why}" for key, (unused, why) in ignored.items()
                if key in overrides and unused]
    return problems + [f"data.{side}_field and data.{side}_template both set: give one" for side in ("prompt", "target")
                       if f"data.{side}_field" in overrides and overrides.get(f"data.{side}_template")]


def tune_problems(cfg: Config) -> list[str]:
    """Problems with the tune section's search space and objective (checked even when tune is off)."""
    tune, problems = cfg.tune, []

    def number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (tune.r_choices and all(number(r) and isinstance(r, int) and r > 0 for r in tune.r_choices)):
        problems.append(f"tune.r_choices: expected a non-empty list of integers > 0, got {tune.r_choices!r}")
    if not (tune.alpha_multipliers and all(number(m) and m > 0 for m in tune.alpha_multipliers)):
        problems.append(f"tune.alpha_multipliers: expected a non-empty list of numbers > 0, "
                        f"got {tune.alpha_multipliers!r}")
    if not 0 < tune.lr_low <= tune.lr_high:
        problems.append(f"tune.lr_low, tune.lr_high: need 0 < lr_low <= lr_high, got {tune.lr_low} and {tune.lr_high}")
    if tune.dropout_choices is not None and not (
            tune.dropout_choices and all(number(d) and 0 <= d < 1 for d in tune.dropout_choices)):
        problems.append(f"tune.dropout_choices: expected numbers in [0, 1), got {tune.dropout_choices!r}")
    if tune.target_modules_choices is not None and not (tune.target_modules_choices and all(
            isinstance(c, str) or (isinstance(c, list) and c and all(isinstance(m, str) for m in c))
            for c in tune.target_modules_choices)):
        problems.append("tune.target_modules_choices: expected a non-empty list of module names or lists of them, "
                        f"got {tune.target_modules_choices!r}")
    if tune.layers_choices is not None and not (tune.layers_choices and all(
            isinstance(c, str) and re.fullmatch(r"all|last:[1-9][0-9]*", c) for c in tune.layers_choices)):
        problems.append(f"tune.layers_choices: expected a non-empty list of 'all' or 'last:N', "
                        f"got {tune.layers_choices!r}")
    minimums = {"n_trials": 1, "timeout": 0, "sampler_startup_trials": 0, "pruner_startup_trials": 0,
                "pruner_warmup_steps": 0, "pruner_reduction_factor": 2}
    problems += [f"tune.{key}: must be >= {low}, got {getattr(tune, key)}"
                 for key, low in minimums.items() if getattr(tune, key) < low]
    return problems + tune_objective_problems(cfg)


def tune_objective_problems(cfg: Config) -> list[str]:
    """tune.objective is eval/loss or <base|tuned|delta>/<a metric of eval.metrics>, with a fitting direction."""
    objective, direction = cfg.tune.objective, cfg.tune.direction
    if objective == "eval/loss":
        return [] if direction == "minimize" else ["tune.direction: eval/loss must be minimised"]
    role, _, metric = objective.partition("/")
    if role not in ("base", "tuned", "delta") or metric not in cfg.eval.metrics:
        return [f"tune.objective: {objective!r} is not eval/loss or <base|tuned|delta>/<metric> with a metric "
                f"of eval.metrics ({', '.join(map(str, cfg.eval.metrics))})"]
    if cfg.train.objective == "cpt":
        return [f"tune.objective: {objective} needs generated answers; with train.objective=cpt use eval/loss"]
    return [] if direction == "maximize" else [f"tune.direction: {objective} (higher is better) must be maximised"]


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
