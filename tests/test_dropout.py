"""SixteenBitDropout: the drop rate and scale it promises, torch's RNG seeding, and that LoRA training uses it."""
from __future__ import annotations

import math

import pytest
import torch

from loraflow import models
from loraflow.config import from_dict
from loraflow.dropout import SixteenBitDropout


def test_p_is_rounded_to_sixteen_bits_and_kept_elements_keep_the_expected_value():
    dropout = SixteenBitDropout(0.05).train()
    assert dropout.threshold == 3277 and dropout.drop_probability == 3277 / 65536  # 0.05 -> 0.0500031
    count = 4_000_000
    out = dropout(torch.ones(count))
    dropped = (out == 0).double().mean().item()
    standard_error = math.sqrt(dropout.drop_probability * (1 - dropout.drop_probability) / count)
    assert abs(dropped - dropout.drop_probability) < 6 * standard_error  # a binomial share, 6 standard errors
    assert out.unique().tolist() == [0.0, pytest.approx(1 / (1 - 3277 / 65536))]
    assert abs(out.double().mean().item() - 1) < 6 * standard_error / (1 - dropout.drop_probability)


def test_the_gradient_flows_only_through_kept_elements_scaled():
    dropout = SixteenBitDropout(0.3).train()
    x = torch.randn(64, 96, dtype=torch.bfloat16, requires_grad=True)
    out = dropout(x)
    out.float().sum().backward()
    kept = out != 0
    assert 0 < kept.float().mean().item() < 1
    assert torch.equal(x.grad[~kept], torch.zeros_like(x.grad[~kept]))
    assert torch.allclose(x.grad[kept].float(), torch.full_like(x.grad[kept].float(), dropout.scale), rtol=1e-2)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape


def test_a_seed_fixes_the_mask_eval_mode_and_p_zero_change_nothing():
    x = torch.randn(8, 16, 32)
    dropout = SixteenBitDropout(0.5).train()
    torch.manual_seed(7)
    first = dropout(x)
    torch.manual_seed(7)
    assert torch.equal(dropout(x), first)
    assert not torch.equal(dropout(x), first)  # the next draw is another mask
    assert dropout.eval()(x) is x
    assert SixteenBitDropout(0.0).train()(x) is x


@pytest.mark.parametrize("dropout_p,swapped", [(0.05, 14), (0.0, 0)])  # the tiny Llama: 2 layers x 7 linears
def test_attach_lora_swaps_every_lora_dropout_and_the_adapter_keeps_its_p(tiny_llama, tmp_path, dropout_p, swapped):
    cfg = from_dict({"name": "m", "data": {"path": "x"}, "model": {"name": str(tiny_llama), "quantization": "none",
                                                                    "dtype": "fp32"},
                     "lora": {"r": 2, "dropout": dropout_p, "target_modules": "all-linear"}})
    model, _ = models.load_model(cfg, str(tiny_llama))
    model = models.attach_lora(model, cfg)
    dropouts = [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
                for d in m.lora_dropout.values()]
    assert len(dropouts) == 14
    assert sum(isinstance(d, SixteenBitDropout) and d.p == dropout_p for d in dropouts) == swapped
    assert not any(type(d) is torch.nn.Dropout for d in dropouts)
    model.save_pretrained(tmp_path / "adapter")
    assert f'"lora_dropout": {dropout_p}' in (tmp_path / "adapter" / "adapter_config.json").read_text()
