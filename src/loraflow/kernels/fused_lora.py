"""LoRA layers that apply their scalings to the rank-r product, not to full-width tensors (models.attach_lora).

    model = models.attach_lora(model, cfg)   # every plain PEFT LoRA Linear then runs fused_lora.forward

PEFT computes base(x) + lora_B(lora_A(dropout(x))) * scaling. The scaling multiplies a tokens x out_features
tensor and dropout's 1 / (1 - p) a tokens x in_features one: each a pass over memory forward and another
backward, hundreds of them in a SmolLM2 training step (in fp32 on an AVX2 CPU, a step takes 1.19x as long
without this: benchmarks/bench_levers.py). Both are scalars and lora_A and lora_B are linear, so here they
multiply lora_A's tokens x r output instead:
lora_B(lora_A(mask * x) * scaling / (1 - p)), the same function up to float rounding, a few hundred times less
memory traffic. (Over an nf4 base PEFT also clones the base output, against in-place changes of it that
this sum does not make.) Where a forward is not the plain one-adapter case (adapters disabled or merged, several
active, extra arguments, a LoRA variant such as DoRA) PEFT's own forward runs. Only the computation changes:
the adapter's weights, `scaling`, merging and saving are PEFT's.
"""
from __future__ import annotations

import functools

import torch

from loraflow.kernels.dropout import SixteenBitDropout


def install(model) -> int:
    """Give every PEFT LoRA Linear of `model` this module's forward, plain or over an nf4 base (QLoRA); returns
    how many. int8 bases, convolutions and embeddings keep PEFT's."""
    from peft.tuners.lora.layer import Linear

    kinds = [Linear]
    try:
        from peft.tuners.lora.bnb import Linear4bit  # only where bitsandbytes is installed
        kinds.append(Linear4bit)
    except ImportError:
        pass
    layers = [module for module in model.modules() if type(module) in kinds]
    for layer in layers:
        layer.forward = functools.partial(forward, layer)
    return len(layers)


def forward(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """`layer`'s output: base(x) + lora_B(lora_A(dropped x) * scalings), or PEFT's forward where it is not that."""
    adapters = layer.active_adapters
    if args or kwargs or layer.disable_adapters or layer.merged or len(adapters) != 1 \
            or adapters[0] not in layer.lora_A or adapters[0] in layer.lora_variant:
        return type(layer).forward(layer, x, *args, **kwargs)
    name = adapters[0]
    result = layer.base_layer(x)
    lora_a, lora_b, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    x = layer._cast_input_dtype(x, lora_a.weight.dtype)
    scaling = layer.scaling[name]
    if isinstance(dropout, SixteenBitDropout) and dropout.draws_mask(x):
        dropped, scaling = dropout.zeroed(x), scaling * dropout.scale
    else:
        dropped = dropout(x)
    return (result + lora_b(lora_a(dropped) * scaling)).to(result.dtype)
