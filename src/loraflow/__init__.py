"""loraflow: tracked LoRA/QLoRA fine-tuning of language models with MLflow.

    pip install -e . && loraflow pipeline quickstart
"""
import sys

__version__ = "0.1.0"


class LoraflowError(Exception):
    """An error the user can fix (bad input, missing file, unknown run); shown as one line."""


def say(message: str) -> None:
    """Progress for the person at the terminal: `loraflow: ...` on stderr (stdout is for results)."""
    print(f"loraflow: {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    say(f"warning: {message}")
