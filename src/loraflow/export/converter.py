"""A merged Hugging Face folder (safetensors) to one GGUF file, tensor by tensor.

    info = write_gguf(Path("merged"), Path("out/model-v3-f16.gguf"), "f16", vocab)   # GGUFInfo(tensors=..., ...)

The file is written with the `gguf` package's GGUFWriter and named by its tensor-name map; what is
loraflow's own is the plan: which architectures (the llama family and qwen2), which hyperparameters,
the q/k row order llama.cpp's rotary embedding expects, Llama 3's `rope_freqs`, no `output.weight`
for tied embeddings, and the type of each tensor per quantization. The first pass reads only the
safetensors headers; the second loads, converts and writes one tensor at a time, so a model never
sits whole in memory. Pickled checkpoints (`*.bin`) are refused, never loaded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from loraflow import LoraflowError

ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}  # config.json model_type
SUPPORTED = "the llama family (SmolLM2, TinyLlama, Llama 3.x) and qwen2"
QUANTIZATIONS = ("f16", "q8_0", "f32")
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
ROPE_TYPES = ("default", "llama3", "linear")
SKIPPED = (".rotary_emb.inv_freq",)  # buffers older checkpoints saved; recomputed by every reader


@dataclass
class Planned:
    """One tensor of the GGUF file: where it comes from and what it becomes."""
    gguf_name: str
    hf_name: str | None  # None: computed (rope_freqs)
    shape: tuple
    kind: gguf.GGMLQuantizationType
    heads: int = 0  # > 0: the q/k rows are reordered for this many heads


@dataclass
class GGUFInfo:
    path: Path
    architecture: str
    quantization: str
    tensors: list[str] = field(default_factory=list)
    bytes: int = 0


def read_config(model_dir: Path) -> dict:
    """config.json of the merged folder; a one-line error for seq2seq and unsupported architectures."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise LoraflowError(f"cannot read {model_dir / 'config.json'}: {exc}") from None
    model_type = config.get("model_type", "?")
    if config.get("is_encoder_decoder"):
        raise LoraflowError(f"cannot export the seq2seq model '{model_type}': GGUF export supports {SUPPORTED}")
    if model_type not in ARCHITECTURES:
        raise LoraflowError(f"cannot export architecture '{model_type}': GGUF export supports {SUPPORTED}")
    return config


def rope_settings(config: dict) -> dict:
    """rope_theta and the scaling (rope_parameters in transformers 5, rope_scaling before)."""
    settings = dict(config.get("rope_parameters") or {})
    settings.update(config.get("rope_scaling") or {})
    settings.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    settings["rope_type"] = settings.get("rope_type") or settings.get("type") or "default"
    if settings["rope_type"] not in ROPE_TYPES:
        raise LoraflowError(f"cannot export RoPE scaling '{settings['rope_type']}' (supported: {', '.join(ROPE_TYPES)})")
    return settings


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def rope_freq_factors(config: dict) -> np.ndarray:
    """Llama 3's RoPE scaling as llama.cpp reads it: per frequency, the factor the base frequency is divided by
    (transformers' own llama3 frequencies against the unscaled ones)."""
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    settings, dim = rope_settings(config), head_dim(config)
    unscaled = 1.0 / (settings["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**config))
    return (unscaled / scaled).numpy().astype(np.float32)


def permute_for_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q/k projection from Hugging Face's half-split rotary layout to llama.cpp's interleaved pairs:
    within each head, row i of the first half and row i of the second half become rows 2i and 2i+1."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def tensor_kind(shape: tuple, quantization: str) -> gguf.GGMLQuantizationType:
    """f32: all; f16: matrices in f16, vectors (norms, biases) in f32; q8_0: matrices whose rows split into
    blocks of 32 in q8_0 (the rest as f16)."""
    types = gguf.GGMLQuantizationType
    if quantization == "f32" or len(shape) < 2:
        return types.F32
    block = gguf.GGML_QUANT_SIZES[types.Q8_0][0]
    return types.Q8_0 if quantization == "q8_0" and shape[-1] % block == 0 else types.F16


def safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in model_dir.glob("*.bin"))
        raise LoraflowError(f"{model_dir} holds no safetensors weights"
                            + (f" (only {', '.join(pickled)}: pickles are never loaded)" if pickled else ""))
    return files


def tensor_shapes(model_dir: Path) -> dict[str, tuple[Path, tuple]]:
    """{HF tensor name: (file, shape)} from the safetensors headers, nothing loaded."""
    from safetensors import safe_open

    shapes = {}
    for file in safetensors_files(model_dir):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = (file, tuple(handle.get_slice(name).get_shape()))
    return shapes


def plan_tensors(config: dict, shapes: dict, quantization: str) -> list[Planned]:
    """Every tensor of the file in order, from the HF names through gguf's tensor-name map."""
    arch = ARCHITECTURES[config["model_type"]]
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    tied = config.get("tie_word_embeddings", False)
    heads = {"q_proj": config["num_attention_heads"],
             "k_proj": config.get("num_key_value_heads") or config["num_attention_heads"]}
    plan = []
    for hf_name, (_, shape) in shapes.items():
        if hf_name.endswith(SKIPPED) or (tied and hf_name == "lm_head.weight"):
            continue  # tied: the reader uses token_embd for the output
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise LoraflowError(f"no GGUF name for tensor '{hf_name}' of {config['model_type']}")
        projection = hf_name.split(".")[-2]
        permuted = heads.get(projection, 0) if arch == gguf.MODEL_ARCH.LLAMA else 0
        plan.append(Planned(gguf_name, hf_name, shape, tensor_kind(shape, quantization), permuted))
    if not tied and not any(p.gguf_name == "output.weight" for p in plan):
        raise LoraflowError("the model has untied embeddings but no lm_head.weight")
    if rope_settings(config)["rope_type"] == "llama3":
        plan.append(Planned(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", None,
                            (head_dim(config) // 2,), gguf.GGMLQuantizationType.F32))
    return plan


def add_hyperparameters(writer: gguf.GGUFWriter, config: dict, quantization: str) -> None:
    """The architecture's keys (`llama.*` / `qwen2.*`) as llama.cpp and transformers' GGUF reader read them."""
    rope = rope_settings(config)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(head_dim(config))
    if head_dim(config) != config["hidden_size"] // config["num_attention_heads"]:
        writer.add_key_length(head_dim(config))
        writer.add_value_length(head_dim(config))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(FILE_TYPES[quantization])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def stored_bytes(planned: Planned) -> int:
    if planned.kind == gguf.GGMLQuantizationType.Q8_0:
        return int(np.prod(gguf.quant_shape_to_byte_shape(planned.shape, planned.kind)))
    return int(np.prod(planned.shape)) * (2 if planned.kind == gguf.GGMLQuantizationType.F16 else 4)


def converted(planned: Planned, weight: np.ndarray) -> np.ndarray:
    """One tensor as it is stored: rows reordered for RoPE where planned, then cast or quantized."""
    if planned.heads:
        weight = permute_for_rope(weight, planned.heads)
    if planned.kind == gguf.GGMLQuantizationType.Q8_0:
        return gguf.quants.quantize(weight, planned.kind)
    return weight.astype(np.float16 if planned.kind == gguf.GGMLQuantizationType.F16 else np.float32)


def load_tensor(planned: Planned, shapes: dict, config: dict) -> np.ndarray:
    """The tensor as float32 numpy, read alone from its safetensors file (or computed: rope_freqs)."""
    from safetensors import safe_open

    if planned.hf_name is None:
        return rope_freq_factors(config)
    with safe_open(str(shapes[planned.hf_name][0]), framework="pt") as handle:
        return handle.get_tensor(planned.hf_name).float().numpy()


def write_gguf(model_dir: Path, path: Path, quantization: str, vocab, name: str = "") -> GGUFInfo:
    """Write the merged folder `model_dir` as the GGUF file `path` in `quantization`, with `vocab`'s tokenizer
    metadata (export.vocab.Vocab) and general.name `name`."""
    if quantization not in QUANTIZATIONS:
        raise LoraflowError(f"unknown quantization {quantization!r} (choose {', '.join(QUANTIZATIONS)})")
    config = read_config(model_dir)
    shapes = tensor_shapes(model_dir)
    plan = plan_tensors(config, shapes, quantization)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[ARCHITECTURES[config["model_type"]]])
    try:
        writer.add_name(name or model_dir.name)
        add_hyperparameters(writer, config, quantization)
        vocab.add_to(writer, config["vocab_size"])
        for planned in plan:
            writer.add_tensor_info(planned.gguf_name, planned.shape, np.dtype(np.float32), stored_bytes(planned),
                                   raw_dtype=planned.kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for planned in plan:
            writer.write_tensor_data(converted(planned, load_tensor(planned, shapes, config)))
    finally:
        writer.close()
    return GGUFInfo(path, config["model_type"], quantization, [p.gguf_name for p in plan], path.stat().st_size)
