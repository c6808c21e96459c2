"""loraflow: tracked LoRA/QLoRA fine-tuning of language models with MLflow.

    pip install -e . && loraflow pipeline quickstart
"""
import os

# Quiet by default: no telemetry from MLflow or the Hugging Face libraries.
for _name, _value in {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                      "TOKENIZERS_PARALLELISM": "false", "DISABLE_MLFLOW_INTEGRATION": "TRUE"}.items():
    os.environ.setdefault(_name, _value)

__version__ = "0.1.0"


class LoraflowError(Exception):
    """An error the user can fix (bad input, missing file, unknown run); shown as one line."""
