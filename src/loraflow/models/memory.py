"""Memory a stage needs, projected from a model's config.json and loraflow's settings before anything loads.

    shape = memory.shape_of(transformers.AutoConfig.from_pretrained(path))
    terms = memory.stage_terms("train", shape, cfg)   # {"weights": bytes, "optimizer": ..., "activations": ...}
    memory.check_training_fits(cfg, path)             # on a CUDA device: LoraflowError when training cannot fit

A stage's peak is the sum of named terms: weights in their stored dtype, LoRA weights and AdamW state, activations,
logits and the KV cache. The *_ELEMENTS constants are fitted on measured peaks (benchmarks/
bench_memory.py --stages; docs/benchmarks.md, "Memory per stage"); the others follow from the code.
"""
from __future__ import annotations

from dataclasses import dataclass

from loraflow import LoraflowError
from loraflow.config import Config
from loraflow.models.loading import compute_dtype

GIB = 1 << 30
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, an 8-bit absmax per 64 weights, an fp32 per 256 absmaxes
INT8_BYTES = 1.0  # bitsandbytes' int8 rows (their fp32 scales add < 0.1%)
LORA_BYTES, ADAMW_BYTES = 4, 12  # LoRA weights in fp32; their fp32 gradient and AdamW's fp32 m and v
VALIDATION_LOGITS_BYTES = 1 << 30  # generation.LOSS_LOGITS_BYTES (models may not import generation)
HEAD_CHUNK_ROWS = 256  # kernels.head_loss.CHUNK_ROWS: training's head and loss take this many tokens at a time
HEAD_CHUNK_BYTES = 10  # per entry of a chunk: logits and their exponentials in fp32, the gradient in 16 bits
LOSS_BYTES = 8  # per logit of transformers' loss beside the head's output: its fp32 upcast and log-softmax
# Fitted: values a training step keeps per token, layer and (hidden + intermediate); with gradient checkpointing,
# per token, layer and hidden (the layer inputs; one layer is recomputed on top); and live in an inference forward
# per token and (hidden + intermediate), one layer at a time.
ACTIVATION_ELEMENTS, CHECKPOINT_ELEMENTS, FORWARD_ELEMENTS = 9.62, 1.84, 5.10
CUDA_CONTEXT_BYTES = GIB // 2  # the CUDA context and kernels: assumed, not measured here


@dataclass(frozen=True)
class Shape:
    """A Llama-like decoder's sizes, as its config.json gives them."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    def linear_params(self) -> int:
        attention = 2 * self.hidden * (self.heads + self.kv_heads) * self.head_dim
        return self.layers * (attention + 3 * self.hidden * self.intermediate)

    def other_params(self) -> int:
        """Embedding, output head (unless tied) and norms: never quantised."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    def params(self) -> int:
        return self.linear_params() + self.other_params()

    def lora_params(self, r: int) -> int:
        """LoRA on every linear layer but the head (all-linear: the most any target list takes)."""
        width = 7 * self.hidden + 2 * (self.heads + self.kv_heads) * self.head_dim + 3 * self.intermediate
        return self.layers * r * width


def shape_of(config) -> Shape | None:
    """The Shape of a transformers config (its text config); None for one that is not a Llama-like decoder."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        heads = int(text.num_attention_heads)
        return Shape(int(text.hidden_size), int(text.num_hidden_layers), heads,
                     int(getattr(text, "num_key_value_heads", None) or heads),
                     int(getattr(text, "head_dim", None) or text.hidden_size // heads), int(text.intermediate_size),
                     int(text.vocab_size), bool(getattr(text, "tie_word_embeddings", False)))
    except (AttributeError, TypeError):
        return None


def weight_bytes(shape: Shape, quantization: str, dtype_bytes: int, others_bytes: int | None = None) -> float:
    """Linear layers per `quantization`, the other weights in `others_bytes` (default: the dtype's)."""
    per_linear = {"nf4": NF4_BYTES, "int8": INT8_BYTES}.get(quantization, dtype_bytes)
    return shape.linear_params() * per_linear + shape.other_params() * (others_bytes or dtype_bytes)


def activation_bytes(shape: Shape, tokens: int, checkpointing: bool, dtype_bytes: int) -> float:
    """What a training step keeps for its backward pass over `tokens` positions."""
    layer = tokens * dtype_bytes * ACTIVATION_ELEMENTS * (shape.hidden + shape.intermediate)
    if checkpointing:
        return tokens * dtype_bytes * CHECKPOINT_ELEMENTS * shape.hidden * shape.layers + layer
    return layer * shape.layers


def kv_cache_bytes(shape: Shape, batch: int, length: int, dtype_bytes: int) -> float:
    """Keys and values of every layer for `batch` sequences of `length` tokens."""
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * length * batch * dtype_bytes


def loss_positions(shape: Shape, rows: int, length: int) -> int:
    """Positions of validation_loss's largest forward: the rows whose fp32 logits stay under VALIDATION_LOGITS_BYTES
    (one at least), every token labelled (continued pretraining; SFT has the head on fewer)."""
    return max(1, min(rows, VALIDATION_LOGITS_BYTES // (length * shape.vocab * 4))) * length


def forward_bytes(shape: Shape, positions: int, dtype_bytes: int) -> float:
    """What an inference forward holds at once over `positions` tokens (one layer at a time)."""
    return positions * dtype_bytes * FORWARD_ELEMENTS * (shape.hidden + shape.intermediate)


def evaluation_bytes(shape: Shape, cfg: Config, dtype_bytes: int, answers: bool = True) -> float:
    """The larger of a validation loss on train.eval_rows (logits and transformers' loss) and, with `answers` for SFT,
    answering eval.batch_size prompts of data.max_length tokens (the KV cache and the prefill)."""
    rows = min(cfg.eval.batch_size, cfg.train.eval_rows or cfg.eval.batch_size)
    positions = loss_positions(shape, rows, cfg.data.max_length)
    logits = positions * shape.vocab * (LOSS_BYTES + (dtype_bytes if dtype_bytes != 4 else 0))
    loss = forward_bytes(shape, positions, dtype_bytes) + logits
    if not answers or cfg.train.objective == "cpt":
        return loss
    batch, prompt = min(cfg.eval.batch_size, cfg.eval.num_samples), cfg.data.max_length
    kv_cache = kv_cache_bytes(shape, batch, prompt + cfg.eval.max_new_tokens, dtype_bytes)
    return max(loss, kv_cache + forward_bytes(shape, batch * prompt, dtype_bytes))


def training_terms(shape: Shape, cfg: Config, dtype_bytes: int = 2) -> dict:
    """The base as prepared for k-bit training (its unquantised weights in fp32), LoRA weights and AdamW state, and
    the larger of a step (activations, a head chunk, the head's weight cast to 16 bits) and an evaluation's loss."""
    quantized = cfg.model.quantization != "none"
    tokens, lora = cfg.train.batch_size * cfg.data.max_length, shape.lora_params(cfg.lora.r)
    head_cast = shape.vocab * shape.hidden * dtype_bytes if quantized and dtype_bytes != 4 else 0
    step = (activation_bytes(shape, tokens, cfg.train.gradient_checkpointing, dtype_bytes)
            + min(tokens, HEAD_CHUNK_ROWS) * shape.vocab * HEAD_CHUNK_BYTES + head_cast)
    return {"weights": weight_bytes(shape, cfg.model.quantization, dtype_bytes, 4 if quantized else None),
            "lora_weights": lora * LORA_BYTES, "optimizer": lora * ADAMW_BYTES,
            "activations": max(step, evaluation_bytes(shape, cfg, dtype_bytes, answers=False))}


def stage_terms(stage: str, shape: Shape, cfg: Config, dtype_bytes: int = 2, stored_bytes: int = 2) -> dict:
    """A stage's peak by term, in bytes: train and train_checkpointed (training_terms); validation_loss and evaluate
    (the base quantised per model.quantization); gate and serve_load (the base unquantised in the served dtype);
    merge (host memory, `dtype_bytes` the merge dtype's)."""
    if stage in ("train", "train_checkpointed"):
        return training_terms(shape, cfg, dtype_bytes)
    lora = {"lora_weights": shape.lora_params(cfg.lora.r) * LORA_BYTES}
    if stage == "merge":  # the base mapped from its checkpoint; each merged layer a new tensor, the rest if recast
        others = shape.other_params() * dtype_bytes if dtype_bytes != stored_bytes else 0
        return {"weights": shape.params() * stored_bytes, "merged_layers": shape.linear_params() * dtype_bytes,
                "recast_others": others, **lora}
    quantization = cfg.model.quantization if stage in ("validation_loss", "evaluate") else "none"
    terms = {"weights": weight_bytes(shape, quantization, dtype_bytes), **lora}
    if stage == "serve_load":
        return terms
    return {**terms, "activations": evaluation_bytes(shape, cfg, dtype_bytes, answers=stage != "validation_loss")}


def device_total_bytes() -> int | None:
    """The current CUDA device's memory; None without one."""
    import torch

    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if torch.cuda.is_available() \
        else None


def check_training_fits(cfg: Config, model_path: str) -> None:
    """Raise LoraflowError before the model loads when training's projected peak exceeds the CUDA device's memory;
    nothing on a CPU, for a config.json not of a Llama-like decoder, or under FSDP or DeepSpeed (split models)."""
    total = device_total_bytes()
    if total is None or cfg.train.fsdp or cfg.train.deepspeed:
        return
    from transformers import AutoConfig

    shape = shape_of(AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code))
    need = shape and sum(training_terms(shape, cfg, compute_dtype(cfg).itemsize).values()) + CUDA_CONTEXT_BYTES
    if need and need > total:
        raise LoraflowError(
            f"training needs about {need / GIB:.1f} GiB of GPU memory, more than this card's {total / GIB:.1f} GiB: "
            f"lower train.batch_size ({cfg.train.batch_size}) or data.max_length ({cfg.data.max_length}), set "
            f"train.gradient_checkpointing: true ({cfg.train.gradient_checkpointing}) or model.quantization: nf4 "
            f"({cfg.model.quantization})")
