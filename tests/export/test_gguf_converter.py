"""The converter: the q/k permutation, tied embeddings, Llama 3's rope_freqs, qwen2's biases, one tensor at a time,
and what it refuses. Files are read back by gguf's reader and transformers' GGUF loader."""
from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from loraflow import LoraflowError, export, tiny
from loraflow.export import converter, verify

TEXT = "Describe: Oak desk 1200 x 600 mm, 3 drawers, it's 19.99"


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    return tiny.build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


@pytest.fixture(scope="module")
def tiny_llama3(tmp_path_factory) -> Path:
    return tiny.build_tiny_llama3(tmp_path_factory.mktemp("tiny-llama3"))


@pytest.fixture(scope="module")
def tiny_smollm(tmp_path_factory) -> Path:
    return tiny.build_tiny_smollm(tmp_path_factory.mktemp("tiny-smollm"))


def convert(folder: Path, out: Path, quantization: str = "f32") -> Path:
    path = out / f"{folder.name}-{quantization}.gguf"
    export.write_gguf(folder, path, quantization, export.Vocab.of(folder))
    return path


def tensors(path: Path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def rotate_half(x: np.ndarray, position: int) -> np.ndarray:
    """Hugging Face's rotary embedding of one head at `position`: the first half pairs with the second half."""
    half = x.shape[-1] // 2
    angles = position * 10000.0 ** (-np.arange(half) / half)
    cos, sin = np.cos(angles), np.sin(angles)
    return np.concatenate([x[:half] * cos - x[half:] * sin, x[half:] * cos + x[:half] * sin])


def rotate_pairs(x: np.ndarray, position: int) -> np.ndarray:
    """llama.cpp's rotary embedding for llama (its 'normal' mode) at `position`: elements 2i and 2i+1 pair up."""
    half = x.shape[-1] // 2
    angles = position * 10000.0 ** (-np.arange(half) / half)
    cos, sin = np.cos(angles), np.sin(angles)
    out = np.empty_like(x)
    out[0::2] = x[0::2] * cos - x[1::2] * sin
    out[1::2] = x[1::2] * cos + x[0::2] * sin
    return out


def test_the_permutation_makes_llama_cpps_rotary_give_hugging_faces_attention_scores():
    rng = np.random.default_rng(0)
    heads, dim, hidden = 3, 8, 12
    wq, wk = rng.normal(size=(heads * dim, hidden)), rng.normal(size=(heads * dim, hidden))
    x, y = rng.normal(size=hidden), rng.normal(size=hidden)
    pq, pk = export.permute_for_rope(wq, heads), export.permute_for_rope(wk, heads)
    for h in range(heads):
        rows = slice(h * dim, (h + 1) * dim)
        expected = rotate_half(wq[rows] @ x, 7) @ rotate_half(wk[rows] @ y, 2)  # a query at 7, a key at 2
        assert np.isclose(rotate_pairs(pq[rows] @ x, 7) @ rotate_pairs(pk[rows] @ y, 2), expected)
        assert not np.isclose(rotate_pairs(wq[rows] @ x, 7) @ rotate_pairs(wk[rows] @ y, 2), expected)  # unpermuted


def test_llama_q_and_k_are_permuted_and_read_back_exactly(tiny_llama, tmp_path):
    path = convert(tiny_llama, tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    stored = tensors(path)
    q = reference.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    k = reference.model.layers[0].self_attn.k_proj.weight.detach().numpy()
    assert np.array_equal(stored["blk.0.attn_q.weight"].data, export.permute_for_rope(q, 4))
    assert np.array_equal(stored["blk.0.attn_k.weight"].data, export.permute_for_rope(k, 2))
    model, tokenizer = verify.load_gguf(path)
    ids = [tokenizer(TEXT)["input_ids"]]
    assert verify.compare(reference, model, ids)["max_abs_logit_diff"] < 1e-4


def test_qwen2_keeps_its_biases_and_row_order(tiny_qwen2, tmp_path):
    path = convert(tiny_qwen2, tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(tiny_qwen2).eval()
    stored = tensors(path)
    attention = reference.model.layers[1].self_attn
    assert np.array_equal(stored["blk.1.attn_q.weight"].data, attention.q_proj.weight.detach().numpy())
    assert np.array_equal(stored["blk.1.attn_k.bias"].data, attention.k_proj.bias.detach().numpy())
    assert "output.weight" not in stored  # Qwen2's small models tie their embeddings
    model, tokenizer = verify.load_gguf(path)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.tie_word_embeddings
    assert verify.compare(reference, model, [tokenizer(TEXT)["input_ids"]])["max_abs_logit_diff"] < 1e-4


def test_tinyllamas_sentencepiece_shape_reads_back_exactly(tmp_path):
    folder = tiny.build_tiny_tinyllama(tmp_path / "tinyllama")
    model, tokenizer = verify.load_gguf(convert(folder, tmp_path))
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.num_key_value_heads == 2 and not model.config.tie_word_embeddings
    assert verify.compare(reference, model, [[1, *tokenizer(TEXT)["input_ids"]]])["max_abs_logit_diff"] < 1e-4


def test_tied_embeddings_have_no_output_weight(tiny_smollm, tiny_llama, tmp_path):
    assert "output.weight" not in tensors(convert(tiny_smollm, tmp_path))
    assert "output.weight" in tensors(convert(tiny_llama, tmp_path))  # untied: TinyLlama's shape
    model, _ = verify.load_gguf(tmp_path / f"{tiny_smollm.name}-f32.gguf")
    reference = AutoModelForCausalLM.from_pretrained(tiny_smollm).eval()
    assert model.config.tie_word_embeddings and model.config.head_dim == 16
    assert verify.compare(reference, model, [[1, 5, 9, 40, 200, 33]])["max_abs_logit_diff"] < 1e-4


def test_llama3_rope_freqs_divide_the_base_frequencies_into_the_scaled_ones(tiny_llama3, tmp_path):
    path = convert(tiny_llama3, tmp_path, "f16")
    factors = tensors(path)["rope_freqs.weight"].data
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama3)
    dim, theta = 16, 500000.0
    unscaled = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    assert np.allclose(unscaled / factors, reference.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)
    assert factors[0] == 1.0 and factors[-1] == 8.0  # high frequencies kept, the lowest divided by `factor`
    assert "rope_freqs.weight" not in tensors(convert(tiny.build_tiny_smollm(tmp_path / "plain"), tmp_path))


def test_the_types_per_quantization(tiny_llama, tmp_path):
    kinds = {q: {name: t.tensor_type for name, t in tensors(convert(tiny_llama, tmp_path, q)).items()}
             for q in ("f32", "f16", "q8_0")}
    types = gguf.GGMLQuantizationType
    assert set(kinds["f32"].values()) == {types.F32}
    assert kinds["f16"]["blk.0.attn_q.weight"] == types.F16 and kinds["f16"]["blk.0.attn_norm.weight"] == types.F32
    assert kinds["q8_0"]["blk.0.ffn_down.weight"] == types.Q8_0 and kinds["q8_0"]["output_norm.weight"] == types.F32
    sizes = {q: (tmp_path / f"{tiny_llama.name}-{q}.gguf").stat().st_size for q in kinds}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_one_tensor_at_a_time(tiny_llama, tmp_path, monkeypatch):
    alive, most = [], []
    original = converter.load_tensor

    def tracked(planned, shapes, config):
        weight = original(planned, shapes, config)
        alive.append(weakref.ref(weight))
        most.append(sum(ref() is not None for ref in alive))
        return weight
    monkeypatch.setattr(converter, "load_tensor", tracked)
    convert(tiny_llama, tmp_path)
    assert len(most) == len(tensors(tmp_path / f"{tiny_llama.name}-f32.gguf")) and max(most) == 1


def test_unsupported_architectures_seq2seq_and_pickles_are_refused(tiny_t5, tiny_llama, tmp_path):
    with pytest.raises(LoraflowError, match="seq2seq.*llama family.*qwen2"):
        converter.read_config(tiny_t5)
    other = tmp_path / "neox"
    shutil.copytree(tiny_llama, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(LoraflowError, match="architecture 'gpt_neox'.*llama family"):
        convert(other, tmp_path)
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_llama, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(LoraflowError, match="pickles are never loaded"):
        convert(pickled, tmp_path)
