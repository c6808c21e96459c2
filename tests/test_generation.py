"""Generation's teacher-forced validation loss: the same figure however its batches are cut."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from loraflow import data, generation, models
from loraflow.config import from_dict


def cpt_config(tiny_llama):
    return from_dict(tiny_config(tiny_llama, train={"objective": "cpt"}, eval={"batch_size": 6},
                                 data={"max_length": 32, "text_field": "content"}, registry={"gate_metric": "loss"}))


def test_validation_loss_cuts_batches_whose_logits_would_pass_the_budget(tiny_llama, monkeypatch):
    """Continued pretraining labels every token, so a batch's fp32 logits are rows x positions x vocabulary; with
    room for one row's, each forward takes one row, and the loss per token is the whole batch's."""
    cfg = cpt_config(tiny_llama)
    model, tokenizer = models.load_model(cfg, str(tiny_llama))
    model.eval()
    rows = data.prepare(cfg).splits["validation"][:6]
    whole = generation.validation_loss(model, tokenizer, rows, cfg)
    sizes = []
    original = model.forward

    def recording(*args, **kwargs):
        sizes.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", recording)
    monkeypatch.setattr(generation, "LOSS_LOGITS_BYTES", 32 * generation.vocabulary_size(model) * 4)
    cut = generation.validation_loss(model, tokenizer, rows, cfg)
    assert sizes and max(sizes) == 1 and sum(sizes) == len(data.training_examples(rows, tokenizer, cfg))
    assert cut == pytest.approx(whole, rel=1e-6)


def test_loss_batches_keep_each_batch_within_the_budget():
    rows = [{"input_ids": [0] * n, "labels": [-100] * (n - 2) + [1, 1]} for n in (10, 10, 10, 4)]
    vocabulary = 100
    budget = 20 * vocabulary * 4  # two rows of 10 positions
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(generation, "LOSS_LOGITS_BYTES", budget)
        padded = generation.loss_batches(rows, 4, vocabulary)
        labelled = generation.loss_batches(rows, 4, vocabulary, labelled_only=True)
    assert [len(b) for b in padded] == [2, 2]  # every row is padded to the longest, 10
    assert [len(b) for b in labelled] == [4]  # 8 labelled positions in all
    assert [len(b) for b in generation.loss_batches(rows, 3, vocabulary)] == [3, 1]  # eval.batch_size still cuts
    assert torch.tensor([len(b) for b in padded]).sum() == 4
