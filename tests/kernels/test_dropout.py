"""SixteenBitDropout: the drop rate and scale it promises, torch's RNG seeding, and that LoRA training uses it."""
from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

from loraflow import models
from loraflow.config import from_dict
from loraflow.kernels.dropout import LastMask, SixteenBitDropout


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


def test_a_shared_last_mask_hands_the_same_copy_only_for_the_same_unchanged_input_and_p():
    shared = LastMask()
    first, second, other_p = (SixteenBitDropout(p, shared).train() for p in (0.5, 0.5, 0.25))
    x = torch.randn(64, 64)
    dropped = first(x)
    assert second(x) is dropped
    assert not torch.equal(second(x.clone()), dropped)  # another tensor, even of the same values: a fresh mask
    dropped = first(x)
    assert not torch.equal(other_p(x), dropped)  # another p
    dropped = first(x)
    x.mul_(1)  # changed in place
    assert not torch.equal(second(x), dropped)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lora_layers_fed_the_same_input_share_its_mask_and_checkpointing_replays_it(tiny_llama, dtype, monkeypatch):
    """q, k and v (and gate and up) get one dropped copy of their common input: 4 masks a layer, not 7; with
    gradient checkpointing the recomputed forward draws the same masks, so the gradients are the same."""
    cfg = from_dict({"name": "m", "data": {"path": "x"}, "model": {"name": str(tiny_llama), "quantization": "none",
                                                                    "dtype": dtype},
                     "lora": {"r": 2, "dropout": 0.3, "target_modules": "all-linear"}})
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), "labels": torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])}
    draws, first_outputs = [], {}
    kept, masked = SixteenBitDropout.kept, SixteenBitDropout.masked
    monkeypatch.setattr(SixteenBitDropout, "kept", lambda self, shape: draws.append(shape) or kept(self, shape))

    def recorded(self, x, scaled):  # each module's first dropped copy (fused_lora calls this, not forward)
        output = masked(self, x, scaled)
        first_outputs.setdefault(self, output)
        return output
    monkeypatch.setattr(SixteenBitDropout, "masked", recorded)

    def gradients_and_outputs(checkpointing: bool):
        torch.manual_seed(0)
        # on the CPU: elsewhere SixteenBitDropout is torch's dropout, with no sixteen-bit masks to count or share
        model = models.attach_lora(models.load_model(cfg, str(tiny_llama), device="cpu")[0], cfg).train()
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero, where dropout would change no gradient of A
                torch.nn.init.normal_(parameter, std=0.5)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        draws.clear()
        first_outputs.clear()
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        outputs = {name: first_outputs[module] for name, module in model.named_modules() if module in first_outputs}
        return [p.grad for p in model.parameters() if p.requires_grad], outputs, len(draws)

    gradients, outputs, count = gradients_and_outputs(checkpointing=False)
    assert count == 8  # 2 layers x (attention input, o_proj input, MLP input, down_proj input)
    for layer in (0, 1):
        def out(proj):
            return next(o for name, o in outputs.items() if f"layers.{layer}." in name and f".{proj}." in name)
        assert out("q_proj") is out("k_proj") is out("v_proj") and out("gate_proj") is out("up_proj")
        assert 0 < (out("q_proj") == 0).float().mean() < 0.6 and 0 < (out("down_proj") == 0).float().mean() < 0.6
    replayed, _, count = gradients_and_outputs(checkpointing=True)
    assert count == 16  # the forward and its replay in the backward
    assert all(torch.equal(a, b) for a, b in zip(gradients, replayed))


def test_a_model_copied_or_pickled_after_a_training_forward_gets_an_empty_shared_mask():
    shared = LastMask()
    model = torch.nn.Sequential(SixteenBitDropout(0.5, shared), SixteenBitDropout(0.5, shared)).train()
    model(torch.randn(4, 8, requires_grad=True) * 2)  # the held copy is part of an autograd graph
    assert shared.output is not None
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert copied[0].shared is copied[1].shared and copied[0].shared is not shared
        assert copied[0].shared.output is None
