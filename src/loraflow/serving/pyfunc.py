"""Logging a registered version as loraflow's pyfunc: signature, requirements, code.

    info = log_model(cfg, merged_dir, adapter_dir)   # in the active run; register registers info.model_uri

The model is logged from code (served_model.py) with loraflow's own source as code_paths, so the
serving environment needs only the pip requirements, not loraflow. There is no chat flavour: the
server answers chat completions on its OpenAI routes (docs/architecture.md says why), and MLflow 3
deprecates the ChatModel one would need.
"""
from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd  # mlflow.pyfunc has imported it already

from loraflow.config import Config
from loraflow.serving.requests import GENERATION_DEFAULTS, PARAM_TYPES
from loraflow.serving.text_model import one_model_while_logging, saved_settings

SERVING_DIR = Path(__file__).resolve().parent  # the files MLflow loads a model from (models from code)
PACKAGE_DIR = SERVING_DIR.parent  # loraflow's source, logged with every model as code_paths


def model_signature(cfg: Config):
    """Input: a string `prompt` column; output: a string; params: the generation settings."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    max_new_tokens = min(cfg.eval.max_new_tokens, cfg.registry.max_new_tokens_cap)
    defaults = {**GENERATION_DEFAULTS, "max_new_tokens": max_new_tokens, "temperature": cfg.eval.temperature,
                "top_p": cfg.eval.top_p, "do_sample": cfg.eval.temperature > 0}
    params = ParamSchema([ParamSpec(name, PARAM_TYPES[name], value) for name, value in defaults.items()])
    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string")]),
                          params=params)


def pip_requirements() -> list[str]:
    """The serving environment: the installed versions of what `TextGenerator` imports (peft: the served adapter)."""
    from importlib.metadata import version

    def base(name):
        return version(name).split("+")[0]
    return [f"mlflow=={base('mlflow')}", f"torch=={base('torch')}", f"transformers=={base('transformers')}",
            f"peft=={base('peft')}", f"tokenizers=={base('tokenizers')}", f"safetensors=={base('safetensors')}",
            "pandas", "pyyaml", "tqdm"]


def model_artifacts(merged_dir: str | Path, adapter_dir: str | Path | None) -> dict:
    """The pyfunc's artifacts: `model`, the merged folder, and `adapter`, what is served on the base when the
    server finds it (serving.text_model.load_served_model)."""
    return {"model": str(merged_dir), **({"adapter": str(adapter_dir)} if adapter_dir else {})}


def log_model(cfg: Config, merged_dir: str | Path, adapter_dir: str | Path | None = None, name: str = "model"):
    """Log the merged folder and the adapter as a `TextGenerator` pyfunc in the active run; returns the ModelInfo.

    The model is logged from code (served_model.py) with an input example; loraflow's own source goes
    along as code_paths, so the serving environment needs only the pip requirements, not loraflow.
    """
    with one_model_while_logging():
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(SERVING_DIR / "served_model.py"),
            artifacts=model_artifacts(merged_dir, adapter_dir),
            signature=model_signature(cfg), input_example=pd.DataFrame({"prompt": ["Hello"]}),
            pip_requirements=pip_requirements(), model_config=saved_settings(cfg), code_paths=[str(PACKAGE_DIR)])
