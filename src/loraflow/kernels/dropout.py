"""Dropout for LoRA inputs whose CPU mask costs a quarter of torch's random draws (models.attach_lora uses it).

    model = models.attach_lora(model, cfg)   # PEFT's nn.Dropout(p) of every LoRA input becomes SixteenBitDropout(p)

On the CPU torch draws one random number per element of a dropout mask: about 8 ms for 8 x 128 x 576
elements on 2 cores, so the 210 LoRA inputs of SmolLM2 took a quarter of a training step. Here one
64-bit draw gives four 16-bit numbers; an element is dropped when its number is below p's share of
2**16. The drop probability is therefore p rounded to a multiple of 1/65536 (0.05 -> 0.0500031), and
kept elements are scaled by 1 / (1 - that probability), so the expected value is kept exactly. The
draws come from torch's default generator (transformers.set_seed seeds it; gradient checkpointing
replays it). Elsewhere than on the CPU, where dropout is one fused kernel, it is torch's own dropout.

The dropouts of one model share a LastMask: LoRA layers fed the same input tensor (q, k and v of an
attention block; gate and up of an MLP) get one dropped copy of it instead of one each, so a
SmolLM2 layer computes four masks, not seven. Each adapter still sees its input dropped with
probability p; the three attention adapters see the same elements dropped.
"""
from __future__ import annotations

import weakref

import torch

SIXTEEN_BITS = 2**16


class SixteenBitDropout(torch.nn.Module):
    """nn.Dropout(p) with a mask drawn 16 bits an element (see the module docstring)."""

    def __init__(self, p: float, shared: LastMask | None = None):
        super().__init__()
        self.p = p
        self.shared = shared
        self.threshold = round(p * SIXTEEN_BITS)  # an element is dropped when its draw is among the lowest this many
        self.drop_probability = self.threshold / SIXTEEN_BITS
        self.scale = 1 / (1 - self.drop_probability) if self.threshold < SIXTEEN_BITS else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        if x.device.type != "cpu" or self.threshold >= SIXTEEN_BITS:
            return torch.nn.functional.dropout(x, self.p, training=True)
        return self.masked(x, scaled=True)

    def draws_mask(self, x: torch.Tensor) -> bool:
        """Whether a forward on `x` draws a sixteen-bit mask: in training, on the CPU, with 0 < p < 1."""
        return self.training and x.device.type == "cpu" and 0 < self.threshold < SIXTEEN_BITS

    def zeroed(self, x: torch.Tensor) -> torch.Tensor:
        """x with this forward's mask applied but the kept elements not scaled: for a caller that multiplies by
        `scale` further on, where it costs less (fused_lora does it at the LoRA rank). Needs draws_mask(x)."""
        return self.masked(x, scaled=False)

    def masked(self, x: torch.Tensor, scaled: bool) -> torch.Tensor:
        if self.shared is not None:
            return self.shared.output_for(x, self, scaled)
        return self.dropped(x, scaled)

    def dropped(self, x: torch.Tensor, scaled: bool = True) -> torch.Tensor:
        """x with a fresh mask applied (and the kept elements scaled, if `scaled`)."""
        kept = self.kept(x.shape)
        return torch.where(kept, x * self.scale, 0) if scaled else torch.where(kept, x, 0)

    def kept(self, shape: torch.Size) -> torch.Tensor:
        """A boolean mask of `shape`, each element True with probability 1 - drop_probability."""
        count = shape.numel()
        draws = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # all 64 bits random
        sixteen = draws.view(torch.int16)[:count].view(shape)  # values -2**15 .. 2**15 - 1, uniform
        return sixteen >= self.threshold - SIXTEEN_BITS // 2

    def extra_repr(self) -> str:
        return f"p={self.p}, drops {self.drop_probability:.7g}"


class LastMask:
    """The last input a model's SixteenBitDropouts dropped and its dropped copy, handed again for the same input.

    The input is held by weak reference (a dead one never matches a new tensor at its address), the copy
    strongly (one activation, replaced at the next input), so sharing also works under gradient
    checkpointing, which keeps no activations: there the recomputed input is a new tensor, and the replayed
    forward draws its masks in the order the first one did. An input changed in place (a new _version), or
    met by a dropout of another p or asking for the other of scaled and unscaled, gets a fresh mask. A copy or
    pickle of the model gets an empty one: the held copy belongs to an autograd graph, which torch cannot
    deep-copy.
    """

    def __init__(self):
        self.input = self.output = self.key = None

    def __reduce__(self):
        return LastMask, ()

    def output_for(self, x: torch.Tensor, dropout: SixteenBitDropout, scaled: bool = True) -> torch.Tensor:
        key = (x._version, dropout.threshold, torch.is_grad_enabled(), scaled)
        if self.input is not None and self.input() is x and self.key == key:
            return self.output
        output = dropout.dropped(x, scaled)
        self.input, self.output, self.key = weakref.ref(x), output, key
        return output
