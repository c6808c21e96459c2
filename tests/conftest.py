"""Shared fixtures: a tiny random Llama (and T5) with a tokenizer trained on the spot, one sqlite
MLflow store per test, and helpers to write a project config and call the real CLI."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer Llama, hidden size 64 (the smallest bitsandbytes 4-bit CPU kernels take), with a BPE
    tokenizer trained on the spot and a chat template."""
    from loraflow.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    """A flan-t5-shaped tiny seq2seq model (gated-gelu, wi_0/wi_1/wo) with a BPE tokenizer."""
    from loraflow.tiny import build_tiny_t5

    return build_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables made once; tests copy it instead of migrating anew."""
    import mlflow

    db = tmp_path_factory.mktemp("store-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{db}").search_experiments(max_results=1)
    return db


@pytest.fixture(scope="session", autouse=True)
def quantized_copies(tmp_path_factory):
    """Quantised copies of the tests' models go to a folder of this session, not the user's cache."""
    folder = tmp_path_factory.mktemp("quantized")
    previous = os.environ.get("LORAFLOW_QUANTIZED_CACHE")
    os.environ["LORAFLOW_QUANTIZED_CACHE"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("LORAFLOW_QUANTIZED_CACHE", None)
    else:
        os.environ["LORAFLOW_QUANTIZED_CACHE"] = previous


@pytest.fixture(autouse=True)
def isolated_tracking(tmp_path, monkeypatch, empty_store):
    """Each test: its own sqlite MLflow store and working folder; never the user's store."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(empty_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for name in ("LORAFLOW_DEBUG", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    import mlflow
    from mlflow.tracking import fluent

    mlflow.set_tracking_uri(uri)
    fluent._active_experiment_id = None  # a test's mlflow.set_experiment must not leak into the next store
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


def tiny_config(model_path: Path, **sections) -> dict:
    """A project config for the tiny model on the built-in catalogue; `sections` update it."""
    config = {
        "name": "tiny",
        "model": {"name": str(model_path), "quantization": "none", "dtype": "fp32"},
        "data": {"path": "builtin:catalogue", "builtin_rows": 60, "prompt_template": "Describe: {title}",
                 "target_template": "{content}", "max_length": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 4, "batch_size": 4, "learning_rate": 5e-3, "eval_steps": 2, "save_steps": 2,
                  "eval_rows": 8, "warmup_ratio": 0.0},
        "eval": {"num_samples": 4, "max_new_tokens": 8, "metrics": ["rouge1", "rougeL"], "batch_size": 4,
                 "bootstrap_samples": 100},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            config.setdefault(section, {}).update(values)
        else:
            config[section] = values
    return config


@pytest.fixture
def write_project(tmp_path):
    """write_project(model_path, name="x.yaml", **sections) -> path of a project YAML in tmp_path."""
    def write(model_path: Path, filename: str = "project.yaml", **sections) -> Path:
        path = tmp_path / filename
        path.write_text(yaml.safe_dump(tiny_config(model_path, **sections)))
        return path
    return write


@pytest.fixture
def run_cli(capsys):
    """run_cli("train", "proj.yaml", "--set", "k=v") -> (exit_code, stdout, stderr) through loraflow's main."""
    from loraflow.cli import main

    def run(*args):
        capsys.readouterr()
        try:
            main(list(map(str, args)))
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture
def sample_data() -> Path:
    """The repository's sample data sets (data/, sources and licences in its README)."""
    return REPO_DATA
