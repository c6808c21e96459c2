"""The attention implementation that trains fastest on this CPU, measured at the training shape.

    faster_cpu_attention(model, cfg)   # "eager" or what the model has
"""
from __future__ import annotations

import functools
import math
import time

from loraflow.config import Config
from loraflow.models.loading import compute_dtype


def faster_cpu_attention(model, cfg: Config) -> str:
    """The attention implementation to train `model` with: "eager" where, on this CPU, it runs a causal attention
    forward and backward at the training shape at least 1.2x faster than "sdpa" (eager_is_faster), else what the
    model has. Measured on an AVX-512 BF16 CPU: in bf16 eager takes half of sdpa's time (its flash-attention
    kernel is slow there), in fp32 sdpa is faster. GPUs and other implementations are left as they are."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    current = getattr(config, "_attn_implementation", None)
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if cfg.model.kind != "causal" or current != "sdpa" or torch.cuda.is_available() or not heads or not hidden:
        return current or "default"
    shape = (cfg.train.batch_size, heads, cfg.data.max_length, getattr(config, "head_dim", None) or hidden // heads)
    if eager_is_faster(compute_dtype(cfg), shape):
        base.set_attn_implementation("eager")
        return "eager"
    return current


@functools.lru_cache(maxsize=None)  # once per process and shape: tune trials and pipelines train many times
def eager_is_faster(dtype, shape: tuple[int, int, int, int], budget_seconds: float = 2.0) -> bool:
    """Whether eager causal attention (forward and backward) at (batch, heads, positions, head_dim) in `dtype` is
    at least 1.2x faster than torch's sdpa on this CPU: best of 3 each after a warm-up, within `budget_seconds`."""
    import torch

    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    causal = torch.ones(shape[2], shape[2], dtype=torch.bool).tril()

    def sdpa():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    def eager():  # what transformers' eager attention computes: scores, mask, fp32 softmax, weighted values
        scores = (q @ k.transpose(-1, -2)) * shape[3] ** -0.5
        weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1, dtype=torch.float32)
        (weights.to(dtype) @ v).sum().backward()

    deadline, best = time.perf_counter() + budget_seconds, {"sdpa": math.inf, "eager": math.inf}
    with torch.enable_grad():
        for counted in (False, True, True, True):  # the first round warms both up
            for name, step in (("sdpa", sdpa), ("eager", eager)):
                started = time.perf_counter()
                step()
                if counted:
                    best[name] = min(best[name], time.perf_counter() - started)
            if time.perf_counter() > deadline:
                break
    return best["eager"] * 1.2 <= best["sdpa"]
