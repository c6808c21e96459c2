"""Typed project configuration: YAML files, dotted overrides, validation that lists every problem.

    cfg = load_config("quickstart", overrides=["train.max_steps=5", "lora.r=4"])
    print(describe_text(cfg))                       # every key: value, default, help, choices
    trial = with_values(cfg, {"lora.r": 16})        # a validated copy with a few keys changed

schema: the sections as dataclasses; loading: files, variants and overrides; validation: every
problem at once; describe: `loraflow config`. The names below are the package's interface.
"""
from loraflow.config.describe import describe, describe_text
from loraflow.config.loading import find_config_file, from_dict, load_config, to_yaml, with_values
from loraflow.config.schema import (EMBEDDED_MODEL, FSDP1_ONLY, OPTIONAL_PART, REPO_ROOT, SECTIONS, Config, ConfigError,
                                    DataConfig, EvalConfig, LoraConfig, LrScheduler, ModelConfig, RegistryConfig,
                                    TrainConfig, TuneConfig)
from loraflow.config.validation import FSDP_OPTIONS, tune_problems, validate

__all__ = ["describe", "describe_text", "find_config_file", "from_dict", "load_config", "to_yaml", "with_values",
           "EMBEDDED_MODEL", "FSDP1_ONLY", "OPTIONAL_PART", "REPO_ROOT", "SECTIONS", "Config", "ConfigError",
           "DataConfig", "EvalConfig", "LoraConfig", "LrScheduler", "ModelConfig", "RegistryConfig", "TrainConfig",
           "TuneConfig", "FSDP_OPTIONS", "tune_problems", "validate"]
