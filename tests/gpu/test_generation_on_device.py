"""Batched generation on the test's device (CUDA unless LORAFLOW_TEST_DEVICE says otherwise): generation.generate's
sorted, left-padded batches give the answers of transformers' generate called one prompt at a time there."""
from __future__ import annotations

import pytest
import torch

from loraflow import data, generation

pytestmark = pytest.mark.gpu

PROMPTS = ["mug", "Describe: Red ceramic mug with a wide handle and a glossy glaze, made for coffee lovers",
           "oak desk", "lamp " * 12, "Describe: blue cotton shirt", "a b"]


@pytest.mark.parametrize("adapter", [False, True])
def test_batched_greedy_answers_are_one_prompt_at_a_times(lora_config, base_model, lora_pair, adapter):
    """Of the base model, and of loraflow's LoRA model against PEFT's own (the same weights) as the reference."""
    cfg = lora_config()  # eval.batch_size 3: two batches of prompts of several lengths
    if adapter:
        model, reference = (m.eval() for m in lora_pair(cfg))
    else:
        model = reference = base_model(cfg)[0]
    tokenizer = base_model(cfg)[1]
    batched = generation.generate(model, tokenizer, PROMPTS, cfg, progress=False)
    for prompt, answer in zip(PROMPTS, batched):
        ids = torch.tensor([data.prompt_token_ids(tokenizer, prompt, cfg)], device=reference.device)
        with torch.inference_mode():
            output = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=cfg.eval.max_new_tokens, do_sample=False,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        assert output.device.type == model.device.type
        assert answer == tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert any(batched)  # something was generated
