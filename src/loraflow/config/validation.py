"""Validation of a whole config: every problem found, in one message.

    problems = validate(cfg)                        # [] when the config is usable
"""
from __future__ import annotations

import json
import re
import string

from loraflow.config.schema import FSDP1_ONLY, OPTIONAL_PART, Config, DataConfig

# TrainingArguments.fsdp words FSDP2 takes (transformers.trainer_utils.FSDPOption minus the FSDP1-only ones),
# spelled out so a config loads without importing transformers; a test checks them against FSDPOption.
FSDP_OPTIONS = ("full_shard", "shard_grad_op", "offload", "auto_wrap")
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
