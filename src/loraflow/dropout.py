"""Dropout for LoRA inputs whose CPU mask costs a quarter of torch's random draws (models.attach_lora uses it).

    model = models.attach_lora(model, cfg)   # PEFT's nn.Dropout(p) of every LoRA input becomes SixteenBitDropout(p)

On the CPU torch draws one random number per element of a dropout mask: about 8 ms for 8 x 128 x 576
elements on 2 cores, so the 210 LoRA inputs of SmolLM2 took a quarter of a training step. Here one
64-bit draw gives four 16-bit numbers; an element is dropped when its number is below p's share of
2**16. The drop probability is therefore p rounded to a multiple of 1/65536 (0.05 -> 0.0500031), and
kept elements are scaled by 1 / (1 - that probability), so the expected value is kept exactly. The
draws come from torch's default generator (transformers.set_seed seeds it; gradient checkpointing
replays it). Elsewhere than on the CPU, where dropout is one fused kernel, it is torch's own dropout.
"""
from __future__ import annotations

import torch

SIXTEEN_BITS = 2**16


class SixteenBitDropout(torch.nn.Module):
    """nn.Dropout(p) with a mask drawn 16 bits an element (see the module docstring)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p
        self.threshold = round(p * SIXTEEN_BITS)  # an element is dropped when its draw is among the lowest this many
        self.drop_probability = self.threshold / SIXTEEN_BITS
        self.scale = 1 / (1 - self.drop_probability) if self.threshold < SIXTEEN_BITS else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        if x.device.type != "cpu" or self.threshold >= SIXTEEN_BITS:
            return torch.nn.functional.dropout(x, self.p, training=True)
        return torch.where(self.kept(x.shape), x * self.scale, 0)

    def kept(self, shape: torch.Size) -> torch.Tensor:
        """A boolean mask of `shape`, each element True with probability 1 - drop_probability."""
        count = shape.numel()
        draws = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-2**63, None)  # all 64 bits random
        sixteen = draws.view(torch.int16)[:count].view(shape)  # values -2**15 .. 2**15 - 1, uniform
        return sixteen >= self.threshold - SIXTEEN_BITS // 2

    def extra_repr(self) -> str:
        return f"p={self.p}, drops {self.drop_probability:.7g}"
