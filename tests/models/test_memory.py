"""The memory projection: its terms on cases whose answers are known, and the error before a run that cannot fit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import assert_one_line_error, runs_of

from loraflow import LoraflowError, generation, models
from loraflow.config import from_dict, load_config
from loraflow.kernels import head_loss
from loraflow.models import memory

REPO = Path(__file__).resolve().parents[2]
LLAMA_8B = REPO / "benchmarks" / "shapes" / "llama-3.1-8b.json"
SMALL = memory.Shape(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=100, tied=False)


def llama_8b_config():
    from transformers import LlamaConfig

    values = json.loads(LLAMA_8B.read_text())
    return LlamaConfig(**{k: v for k, v in values.items() if not k.startswith("_")})


def test_llama_31_8b_has_its_published_parameter_count():
    shape = memory.shape_of(llama_8b_config())
    assert shape == memory.Shape(4096, 32, 32, 8, 128, 14336, 128256, False)
    assert shape.params() == 8_030_261_248  # Llama-3.1-8B's safetensors hold 8,030,261,248 parameters


def test_the_shape_counts_a_models_parameters_and_its_lora_parameters(tiny_llama):
    cfg = from_dict({"name": "m", "data": {"path": "x"}, "model": {"name": str(tiny_llama), "quantization": "none",
                                                                  "dtype": "fp32"},
                     "lora": {"r": 4, "target_modules": "all-linear"}})
    model, _ = models.load_model(cfg, str(tiny_llama))
    shape = memory.shape_of(model.config)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    model = models.attach_lora(model, cfg)
    assert shape.lora_params(4) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_kv_cache_and_loss_positions_by_hand():
    # keys and values (2) x 2 layers x 2 KV heads x 16 dims x 10 tokens x 3 sequences x 2 bytes
    assert memory.kv_cache_bytes(SMALL, batch=3, length=10, dtype_bytes=2) == 2 * 2 * 2 * 16 * 10 * 3 * 2 == 7680
    assert memory.loss_positions(SMALL, rows=16, length=10) == 160  # 160 x 100 fp32 logits: far under 1 GiB
    big_vocab = memory.Shape(4096, 32, 32, 8, 128, 14336, 128256, False)
    # one 2048-token row of a 128k vocabulary is 1.05e9 bytes of fp32 logits: only one row fits under 1 GiB
    assert memory.loss_positions(big_vocab, rows=16, length=2048) == 2048
    assert memory.loss_positions(big_vocab, rows=16, length=4096) == 4096  # one row at least, even over the cap


def test_weights_and_optimizer_terms_by_hand():
    linear = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)  # q, o; k, v; gate, up, down; in 2 layers
    others = 2 * 100 * 64 + 5 * 64  # embedding and head (untied), 5 norms
    assert SMALL.linear_params() == linear and SMALL.other_params() == others
    assert memory.weight_bytes(SMALL, "none", 2) == (linear + others) * 2
    assert memory.weight_bytes(SMALL, "nf4", 2, others_bytes=4) == pytest.approx(linear * 0.51587 + others * 4, 1e-4)
    cfg = from_dict({"name": "m", "data": {"path": "x"}, "lora": {"r": 8}})
    terms = memory.training_terms(SMALL, cfg, dtype_bytes=2)
    assert terms["optimizer"] == SMALL.lora_params(8) * 12 and terms["lora_weights"] == SMALL.lora_params(8) * 4


def test_checkpointing_keeps_one_layer_and_the_layer_inputs():
    tokens, width = 10, SMALL.hidden + SMALL.intermediate
    without = memory.activation_bytes(SMALL, tokens, checkpointing=False, dtype_bytes=2)
    with_checkpoints = memory.activation_bytes(SMALL, tokens, checkpointing=True, dtype_bytes=2)
    assert without == pytest.approx(tokens * 2 * memory.ACTIVATION_ELEMENTS * width * SMALL.layers)
    assert with_checkpoints == pytest.approx(tokens * 2 * (memory.CHECKPOINT_ELEMENTS * SMALL.hidden * SMALL.layers
                                                           + memory.ACTIVATION_ELEMENTS * width))


def test_the_constants_copied_from_other_modules_and_fitted_by_the_benchmark_agree():
    assert memory.VALIDATION_LOGITS_BYTES == generation.LOSS_LOGITS_BYTES
    assert memory.HEAD_CHUNK_ROWS == head_loss.CHUNK_ROWS
    fitted = json.loads((REPO / "benchmarks" / "results" / "memory-stages.json").read_text())["constants"]
    for name, value in fitted.items():
        assert getattr(memory, name) == pytest.approx(value, abs=0.01), name  # rerun the benchmark, copy them


def test_a_run_that_cannot_fit_the_card_fails_before_loading_naming_the_settings(tmp_path, monkeypatch):
    llama_8b_config().save_pretrained(tmp_path)  # config.json only: nothing to load
    cfg = load_config(str(REPO / "projects" / "ptbr-llama31-cpt-sft" / "cpt.yaml"))
    need = sum(memory.training_terms(memory.shape_of(llama_8b_config()), cfg, 2).values()) + memory.CUDA_CONTEXT_BYTES
    monkeypatch.setattr(memory, "device_total_bytes", lambda: 4 * memory.GIB)
    with pytest.raises(LoraflowError) as raised:
        memory.check_training_fits(cfg, str(tmp_path))
    message = str(raised.value)
    assert "\n" not in message and f"about {need / memory.GIB:.1f} GiB" in message and "card's 4.0 GiB" in message
    for setting in ("train.batch_size (4)", "data.max_length (2048)", "train.gradient_checkpointing",
                    "model.quantization"):
        assert setting in message
    monkeypatch.setattr(memory, "device_total_bytes", lambda: 80 * memory.GIB)  # an 80 GB card holds it
    memory.check_training_fits(cfg, str(tmp_path))


def test_on_a_cpu_nothing_is_read_or_raised(monkeypatch):
    cfg = load_config(str(REPO / "projects" / "ptbr-llama31-cpt-sft" / "cpt.yaml"))
    monkeypatch.setattr(memory, "device_total_bytes", lambda: None)
    memory.check_training_fits(cfg, "/no/such/model")  # returns before reading any config.json


def test_loraflow_train_stops_with_one_line_before_the_model_loads(tiny_llama, write_project, run_cli, monkeypatch):
    monkeypatch.setattr(memory, "device_total_bytes", lambda: 1 << 20)  # a 1 MiB card: nothing fits

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", never)
    code, _, err = run_cli("train", write_project(tiny_llama))
    assert_one_line_error(code, err, "GiB of GPU memory, more than this card's 0.0 GiB")
    [run] = runs_of("train")
    assert run.info.status == "FAILED"
