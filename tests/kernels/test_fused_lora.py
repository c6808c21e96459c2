"""fused_lora: the same outputs and gradients as PEFT's LoRA forward, with the scalings at rank r."""
from __future__ import annotations

import pytest
import torch

from loraflow import models
from loraflow.config import from_dict
from loraflow.kernels import fused_lora
from loraflow.kernels.dropout import SixteenBitDropout

BATCH = {"input_ids": torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1]]),
         "labels": torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [-100, -100, -100, 5, 4, 3, 2, 1]])}


def lora_model(tiny_llama, dtype: str = "fp32", dropout: float = 0.3, quantization: str = "none",
               device: str | None = None):
    cfg = from_dict({"name": "m", "data": {"path": "x"}, "model": {"name": str(tiny_llama),
                                                                    "quantization": quantization, "dtype": dtype},
                     "lora": {"r": 4, "alpha": 8, "dropout": dropout, "target_modules": "all-linear"}})
    torch.manual_seed(0)
    model = models.attach_lora(models.load_model(cfg, str(tiny_llama), device=device)[0], cfg)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, where the LoRA path would add nothing to compare
            torch.nn.init.normal_(parameter, std=0.5)
    return model


def fused_layers(model) -> list:
    """The LoRA layers of `model` that run fused_lora's forward (head_loss gives the LM head one of its own)."""
    return [m for m in model.modules() if "forward" in vars(m) and hasattr(m, "lora_A")]


def with_peft_forward(model) -> int:
    """Take fused_lora's forward off every layer again, so PEFT's own runs; returns how many."""
    layers = fused_layers(model)
    for layer in layers:
        del layer.forward
    return len(layers)


def on_device(model) -> dict:
    """BATCH where `model` is: load_model puts an unquantised model on the GPU when one is visible."""
    return {key: value.to(model.device) for key, value in BATCH.items()}


def loss_and_gradients(model, autocast: bool = False):
    model.zero_grad()
    torch.manual_seed(1)  # the same dropout masks for both forwards
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(**on_device(model)).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_fp32_training_loss_and_gradients_match_peft_with_dropout_drawn_the_same(tiny_llama, quantization):
    model = lora_model(tiny_llama, quantization=quantization).train()
    fused = loss_and_gradients(model)
    assert with_peft_forward(model) == 14  # 2 layers x 7 linear layers
    plain = loss_and_gradients(model)
    assert torch.allclose(fused[0], plain[0], rtol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))  # float rounding (3e-5 over nf4)
               for a, b in zip(fused[1], plain[1]))
    assert all(float(g.abs().max()) > 0 for g in fused[1])


def test_bf16_gradients_are_no_further_from_fp32_ones_than_pefts(tiny_llama):
    """Under bf16 autocast both ways round differently (PEFT rounds the scaled full-width tensors to bf16), so
    each is compared with the fp32 gradients of the same adapter and masks."""
    reference = loss_and_gradients(lora_model(tiny_llama, "fp32").train())
    model = lora_model(tiny_llama, "bf16").train()
    fused = loss_and_gradients(model, autocast=True)
    with_peft_forward(model)
    plain = loss_and_gradients(model, autocast=True)

    def error(run) -> float:
        return float(torch.cat([(a.float() - b).flatten() for a, b in zip(run[1], reference[1])]).norm()
                     / torch.cat([b.flatten() for b in reference[1]]).norm())
    assert error(fused) <= error(plain) < 0.2
    assert abs(float(fused[0]) - float(reference[0])) < 0.01 * float(reference[0])


def test_dropout_is_still_drawn_shared_and_scaled_in_training_and_off_in_eval(tiny_llama, monkeypatch):
    draws = []
    kept = SixteenBitDropout.kept
    monkeypatch.setattr(SixteenBitDropout, "kept", lambda self, shape: draws.append(shape) or kept(self, shape))
    model = lora_model(tiny_llama, device="cpu").train()  # the sixteen-bit masks are drawn on the CPU only
    torch.manual_seed(1)
    first = model(**BATCH).loss
    assert len(draws) == 8  # 2 layers x 4 inputs: q, k and v (and gate and up) share a mask
    torch.manual_seed(2)
    assert not torch.allclose(model(**BATCH).loss, first)  # other masks, another loss
    model.eval()
    with torch.no_grad():
        evaluated = model(**BATCH).logits
        with_peft_forward(model)
        assert torch.allclose(evaluated, model(**BATCH).logits, rtol=1e-5, atol=1e-6)
    assert len(draws) == 16


def test_disabled_merged_and_other_cases_run_peft_forward(tiny_llama):
    model = lora_model(tiny_llama, dropout=0.0).eval()
    batch = on_device(model)
    with torch.no_grad():
        fused = model(**batch).logits
        with model.disable_adapter():
            base = model(**batch).logits
        assert not torch.allclose(fused, base, atol=1e-4)  # the adapter changes the output
        model.merge_adapter()
        assert torch.allclose(model(**batch).logits, fused, rtol=1e-4, atol=1e-5)
        model.unmerge_adapter()
        merged = model.merge_and_unload()
        assert [m for m in merged.modules() if "forward" in vars(m)] == [merged.get_output_embeddings()]  # head_loss
        assert torch.allclose(merged(**batch).logits, fused, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("quantization,layers", [("none", 14), ("nf4", 14), ("int8", 0)])
def test_plain_and_nf4_lora_linear_layers_get_it_int8_ones_keep_pefts(tiny_llama, quantization, layers):
    model = lora_model(tiny_llama, quantization=quantization)
    assert len(fused_layers(model)) == layers
    assert fused_lora.install(model) == layers
