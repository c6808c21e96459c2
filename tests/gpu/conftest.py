"""Fixtures of the `gpu` tests, which need only torch, transformers and peft (no mlflow, no bitsandbytes).

    pytest -m gpu tests/gpu                            # on CUDA; every test skips where no GPU is visible
    LORAFLOW_TEST_DEVICE=cpu pytest -m gpu tests/gpu   # the same code paths on the CPU

Each test compares loraflow's model code with PEFT's or transformers' own on one device: the `device` fixture,
cuda unless LORAFLOW_TEST_DEVICE names another. The tiny Llama is the one the CPU tests use (loraflow.tiny). A test
marked `gpu` skips where it would run on CUDA and none is visible; tests here without the mark need no GPU.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEVICE = os.environ.get("LORAFLOW_TEST_DEVICE", "cuda")
NO_GPU = "no CUDA GPU visible (LORAFLOW_TEST_DEVICE=cpu runs these tests on the CPU)"


@pytest.fixture
def isolated_tracking():
    """Replaces tests/conftest.py's autouse fixture of the same name, which gives each test an MLflow store: these
    tests log nothing, and must run where mlflow is not installed."""
    return None


def pytest_runtest_setup(item):
    """A `gpu` test skips, before its fixtures build anything, where it would run on CUDA and none is visible (raised
    here rather than in a fixture, so that pytest -ra reports every such skip on one line)."""
    if item.get_closest_marker("gpu") and DEVICE.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            pytest.skip(NO_GPU)


@pytest.fixture(scope="session")
def device():
    """The device the tests run on: cuda, or what LORAFLOW_TEST_DEVICE names."""
    import torch

    return torch.device(DEVICE)


@pytest.fixture(scope="session")
def tiny_llama(device, tmp_path_factory):
    """A 2-layer Llama (hidden size 64) with random weights, a BPE tokenizer trained on the spot and a chat template."""
    from loraflow.tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("gpu-tiny-llama"))


@pytest.fixture
def lora_config(tiny_llama):
    """lora_config(dtype="fp32", dropout=0.0) -> a loraflow Config for LoRA on every linear layer of the tiny Llama,
    unquantised (nf4 needs bitsandbytes); scaling 6 / 4, not a power of two, so that it rounds in bf16.

    Built from the schema's sections, not config.from_dict: validating a config asks MLflow whether the registry
    would take the model name, and mlflow is not installed here."""
    from loraflow.config import Config, DataConfig, EvalConfig, LoraConfig, ModelConfig

    def make(dtype: str = "fp32", dropout: float = 0.0):
        return Config(name="gpu", model=ModelConfig(name=str(tiny_llama), quantization="none", dtype=dtype),
                      data=DataConfig(path="builtin:catalogue", builtin_rows=60, prompt_template="Describe: {title}",
                                      target_template="{content}", max_length=64),
                      lora=LoraConfig(r=4, alpha=6, dropout=dropout, target_modules="all-linear"),
                      eval=EvalConfig(batch_size=3, max_new_tokens=12))
    return make


@pytest.fixture
def base_model(device):
    """base_model(cfg) -> (model, tokenizer): models.load_model on the test's device, in eval mode."""
    from loraflow import models

    def load(cfg):
        model, tokenizer = models.load_model(cfg, cfg.model.name, device=str(device))
        assert model.device.type == device.type
        return model.eval(), tokenizer
    return load


@pytest.fixture
def lora_pair(base_model):
    """lora_pair(cfg) -> (loraflow's, PEFT's): the same base and the same LoRA weights (B random, as PEFT starts it
    at zero, where the adapter would change nothing), once through models.attach_lora (loraflow's dropout,
    fused_lora and head_loss) and once through plain peft.get_peft_model, both in training mode."""
    import peft
    import torch

    from loraflow import models

    def make(cfg):
        torch.manual_seed(0)  # lora_A's initial values: the same for every model a test makes
        ours = models.attach_lora(base_model(cfg)[0], cfg)
        theirs = peft.get_peft_model(base_model(cfg)[0], models.lora_config(cfg))
        randomise_lora_b(ours)
        theirs.load_state_dict(ours.state_dict())
        return ours.train(), theirs.train()
    return make


def randomise_lora_b(model, seed: int = 1) -> None:
    """Every lora_B weight drawn anew, std 0.5 (PEFT starts B at zero, where the adapter would change nothing): drawn
    in fp32 by the CPU's generator, so models of every dtype on every device get the same values."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


@pytest.fixture
def on_device(device):
    """on_device(batch) -> the batch with each tensor moved to the test's device, as the Trainer moves it."""
    import torch

    def move(batch: dict) -> dict:
        return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    return move
