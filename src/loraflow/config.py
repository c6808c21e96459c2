"""Typed project configuration: YAML files, dotted overrides, validation that lists every problem.

    cfg = load_config("quickstart", overrides=["train.max_steps=5", "lora.r=4"])

A project is a folder under `projects/` holding `config.yaml` (and variants), or a path to a YAML
file. A variant may start with `base: config.yaml` to inherit another file and change a few keys.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loraflow import LoraflowError

REPO_ROOT = Path(__file__).resolve().parents[2]
EMBEDDED_MODEL = "smollm2-135m-instruct"


class ConfigError(LoraflowError):
    """Bad configuration; the message lists every problem found."""


@dataclass
class ModelConfig:
    name: str = EMBEDDED_MODEL  # HF folder, hub id, .gguf path, or the embedded default
    kind: str = "causal"  # causal | seq2seq
    quantization: str = "none"  # nf4 (QLoRA) | int8 | none
    dtype: str = "auto"  # compute dtype: auto (bf16 where the hardware has it) | bf16 | fp16 | fp32
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    path: str = ""  # json array, jsonl, csv, txt; or builtin:catalogue
    format: str = "auto"  # auto | json | jsonl | csv | txt
    encoding: str = "utf-8"  # text encoding of data.path, read strictly (a BOM is stripped)
    strip_html: bool = False  # remove <...> tags from field values (for data scraped from HTML)
    prompt_field: str = "prompt"
    target_field: str = "target"
    prompt_template: str = ""  # e.g. "Title: {title}"; default "{<prompt_field>}"
    target_template: str = ""  # e.g. "Description: {content}"; default "{<target_field>}"
    chat_template: bool = True  # wrap prompts in the tokenizer's chat template when it has one
    system_prompt: str = ""
    text_field: str = "text"  # the raw text field for train.objective=cpt (txt files: whole lines)
    max_rows: int = 0  # 0 = all rows
    min_target_chars: int = 1
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 42
    max_length: int = 512  # tokens per training example / block
    packing: bool = False  # concatenate SFT examples into max_length blocks instead of grouping
    builtin_rows: int = 240  # rows generated for builtin:catalogue


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: typing.Union[str, list] = "all-linear"
    layers_to_transform: typing.Optional[list] = None  # None = every layer


@dataclass
class TrainConfig:
    enabled: bool = True  # false: the pipeline trains nothing and evaluates the base model alone (zero-shot)
    objective: str = "sft"  # sft | cpt
    learning_rate: float = 2e-4
    max_steps: int = -1  # > 0 overrides epochs
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    seed: int = 42
    logging_steps: int = 1
    eval_steps: int = 20
    save_steps: int = 50
    eval_rows: int = 64  # validation rows used for eval/loss during training (0 = all)
    gradient_checkpointing: bool = False
    price_per_hour: float = 0.0  # USD per hour of this machine; 0 on a local CPU
    output_dir: str = "outputs"


@dataclass
class EvalConfig:
    seeds: list = field(default_factory=lambda: [0])
    num_samples: int = 16
    max_new_tokens: int = 64
    metrics: list = field(default_factory=lambda: ["rouge1", "rougeL"])
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    batch_size: int = 8
    bertscore_model: str = "minilm-l6"
    bootstrap_samples: int = 1000


@dataclass
class TuneConfig:
    enabled: bool = False
    n_trials: int = 8
    timeout: float = 0.0  # seconds, 0 = none
    direction: str = "minimize"
    objective: str = "eval/loss"
    r_choices: list = field(default_factory=lambda: [4, 8, 16, 32])
    alpha_multipliers: list = field(default_factory=lambda: [1, 2])
    lr_low: float = 1e-5
    lr_high: float = 1e-3
    dropout_choices: typing.Optional[list] = None
    target_modules_choices: typing.Optional[list] = None
    layers_choices: typing.Optional[list] = None  # e.g. ["all", "last:1"]
    pruner: str = "median"  # median | hyperband | none
    sampler_seed: int = 0
    study_name: str = ""
    storage: str = ""
    sampler_startup_trials: int = 4  # random trials before TPE models the results
    pruner_startup_trials: int = 2  # trials that must finish before the median pruner prunes
    pruner_warmup_steps: int = 0  # training steps before a trial may be pruned (median pruner)


@dataclass
class RegistryConfig:
    model_name: str = ""  # default: the project's name
    alias: str = "champion"
    gate_metric: str = "rougeL"
    min_improvement: float = 0.0
    merge_dtype: str = "fp32"  # fp32 | fp16 | bf16
    max_new_tokens_cap: int = 512


@dataclass
class Config:
    name: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    source: str = ""  # the YAML file this came from (not hashed)

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

CHOICES = {
    "model.kind": ("causal", "seq2seq"),
    "model.quantization": ("nf4", "int8", "none"),
    "model.dtype": ("auto", "bf16", "fp16", "fp32"),
    "data.format": ("auto", "json", "jsonl", "csv", "txt"),
    "train.objective": ("sft", "cpt"),
    "tune.direction": ("minimize", "maximize"),
    "tune.pruner": ("median", "hyperband", "none"),
    "registry.merge_dtype": ("fp32", "fp16", "bf16"),
}


def find_config_file(project: str) -> Path:
    """`quickstart` -> projects/quickstart/config.yaml; a YAML path is taken as it is."""
    candidate = Path(project)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ConfigError(f"config file not found: {project}")
        return candidate.resolve()
    for root in (Path.cwd() / "projects", REPO_ROOT / "projects"):
        if (root / project / "config.yaml").is_file():
            return (root / project / "config.yaml").resolve()
    if (candidate / "config.yaml").is_file():
        return (candidate / "config.yaml").resolve()
    raise ConfigError(f"unknown project '{project}': no projects/{project}/config.yaml and no such YAML file")


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
    return section in SECTIONS and typing.get_type_hints(SECTIONS[section]).get(leaf) is str


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        key, value = parse_override(text)
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': {part} is not a section")
        node[leaf] = value
    return data


def type_problem(key: str, value, annotation) -> str | None:
    """A message if `value` does not fit the field's annotation, else None."""
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
        if origin in (str, bool, list) and isinstance(value, origin):
            return None
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    return f"{key}: expected {names}, got {type(value).__name__} {value!r}"


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
        if problem:
            problems.append(problem)
        else:
            accepted[key] = value
    return cls(**accepted)


def from_dict(data: dict, *, name: str = "", source: str = "") -> Config:
    """Build a Config from a mapping; raises ConfigError listing every problem."""
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
    problems += validate(cfg)
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    return cfg


def load_config(project: str, overrides: list[str] | tuple = ()) -> Config:
    """Load a project's config (folder name or YAML path), apply `--set` overrides, validate."""
    path = find_config_file(project)
    data = apply_overrides(read_yaml_with_base(path), list(overrides))
    default_name = path.parent.name if path.name == "config.yaml" else f"{path.parent.name}-{path.stem}"
    return from_dict(data, name=default_name, source=str(path))


def validate(cfg: Config) -> list[str]:
    """Every problem with the values of a config (types are checked while building it)."""
    problems = []
    for key, choices in CHOICES.items():
        section, leaf = key.split(".")
        value = getattr(getattr(cfg, section), leaf)
        if value not in choices:
            problems.append(f"{key}: {value!r} is not one of {', '.join(choices)}")
    positive = {"lora.r": cfg.lora.r, "lora.alpha": cfg.lora.alpha, "train.learning_rate": cfg.train.learning_rate,
                "train.batch_size": cfg.train.batch_size, "train.grad_accum": cfg.train.grad_accum,
                "train.logging_steps": cfg.train.logging_steps, "train.eval_steps": cfg.train.eval_steps,
                "train.save_steps": cfg.train.save_steps, "data.max_length": cfg.data.max_length,
                "eval.max_new_tokens": cfg.eval.max_new_tokens, "eval.batch_size": cfg.eval.batch_size,
                "eval.num_samples": cfg.eval.num_samples}
    problems += [f"{key}: must be > 0, got {value}" for key, value in positive.items() if value <= 0]
    if not 0 <= cfg.lora.dropout < 1:
        problems.append(f"lora.dropout: must be in [0, 1), got {cfg.lora.dropout}")
    if cfg.train.max_steps <= 0 and cfg.train.epochs <= 0:
        problems.append("train: set train.max_steps > 0 or train.epochs > 0")
    fractions = cfg.data.val_fraction + cfg.data.test_fraction
    if cfg.data.val_fraction < 0 or cfg.data.test_fraction < 0 or fractions >= 1:
        problems.append("data.val_fraction + data.test_fraction must be in [0, 1) and each >= 0")
    if not cfg.data.path:
        problems.append("data.path: missing (the data file to train on)")
    if not cfg.eval.seeds or not all(isinstance(s, int) for s in cfg.eval.seeds):
        problems.append(f"eval.seeds: expected a non-empty list of integers, got {cfg.eval.seeds!r}")
    if cfg.lora.layers_to_transform is not None and not all(
            isinstance(i, int) and i >= 0 for i in cfg.lora.layers_to_transform):
        problems.append("lora.layers_to_transform: expected a list of layer indices >= 0")
    if cfg.model.kind == "seq2seq" and cfg.train.objective == "cpt":
        problems.append("train.objective: cpt needs model.kind=causal")
    problems += metric_problems(cfg)
    problems += tune_problems(cfg)
    return problems


def metric_problems(cfg: Config) -> list[str]:
    from loraflow.metrics import unknown_metrics

    unknown = unknown_metrics(list(cfg.eval.metrics))
    return [f"eval.metrics: unknown metric {name!r}" for name in unknown]


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
                "pruner_warmup_steps": 0}
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
