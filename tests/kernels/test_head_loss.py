"""head_loss: the LM head and cross-entropy fused chunk by chunk give transformers' loss and gradients."""
from __future__ import annotations

import copy
import pickle
from unittest import mock

import pytest
import torch

from loraflow import data, models
from loraflow.config import from_dict
from loraflow.kernels import head_loss

BATCH = {"input_ids": torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1]]),
         "attention_mask": torch.ones(2, 8, dtype=torch.long),
         "labels": torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [-100, -100, -100, 5, 4, 3, 2, 1]])}


def config(model_path, dtype: str = "fp32", quantization: str = "none", kind: str = "causal"):
    return from_dict({"name": "m", "data": {"path": "x"},
                      "model": {"name": str(model_path), "dtype": dtype, "quantization": quantization, "kind": kind},
                      "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}})


def lora_model(cfg, fused: bool = True):
    torch.manual_seed(0)
    with mock.patch.object(head_loss, "install", head_loss.install if fused else lambda model, cfg: False):
        model = models.attach_lora(models.load_model(cfg, cfg.model.name)[0], cfg)
    torch.manual_seed(1)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero; give the adapter an effect to differentiate
            torch.nn.init.normal_(parameter, std=0.5)
    return model.train()


def batches(model, cfg):
    """BATCH as it is (the head on every position, labels shifted by the loss) and as loraflow's training
    collator makes it (logits_to_keep, shift_labels, labelled_positions: the head on labelled tokens only)."""
    examples = [{"input_ids": ids.tolist(), "attention_mask": [1] * 8, "labels": labels.tolist()}
                for ids, labels in zip(BATCH["input_ids"], BATCH["labels"])]
    models.head_on_labelled_tokens(model)
    collate = data.head_on_labelled_positions(lambda rows: {k: torch.tensor([r[k] for r in rows]) for k in rows[0]},
                                              per_token=True)
    return {"labels": BATCH, "labelled_tokens": collate(examples)}


def on_device(batch: dict, model) -> dict:
    """`batch` where `model` is: load_model puts an unquantised model on the GPU when one is visible."""
    return {key: value.to(model.device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def loss_and_gradients(model, batch, autocast: bool = False, **extra):
    model.zero_grad()
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=autocast):
        output = model(**on_device(batch, model), **extra)
    output.loss.backward()
    return output, [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("chunk_rows", [3, head_loss.CHUNK_ROWS])
@pytest.mark.parametrize("quantization", ["none", "nf4"])
@pytest.mark.parametrize("kind", ["labels", "labelled_tokens"])
def test_fp32_loss_and_gradients_equal_transformers(tiny_llama, monkeypatch, chunk_rows, quantization, kind):
    monkeypatch.setattr(head_loss, "CHUNK_ROWS", chunk_rows)  # 3: several chunks, the last one short
    cfg = config(tiny_llama, quantization=quantization)
    fused, plain = lora_model(cfg), lora_model(cfg, fused=False)
    assert fused.get_base_model()._fused_head is not None and not hasattr(plain.get_base_model(), "_fused_head")
    output, gradients = loss_and_gradients(fused, batches(fused, cfg)[kind])
    expected, expected_gradients = loss_and_gradients(plain, batches(plain, cfg)[kind])
    assert output.logits is None and expected.logits is not None  # a fused training forward makes no logits
    assert torch.allclose(output.loss, expected.loss, rtol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
               for a, b in zip(gradients, expected_gradients))
    assert all(float(g.abs().max()) > 0 for g in gradients)


def test_num_items_in_batch_divides_the_summed_loss_as_transformers_does(tiny_llama):
    cfg = config(tiny_llama)
    fused, plain = lora_model(cfg), lora_model(cfg, fused=False)
    items = torch.tensor(40)  # the Trainer passes the label count over all accumulated batches
    output, gradients = loss_and_gradients(fused, BATCH, num_items_in_batch=items)
    expected, expected_gradients = loss_and_gradients(plain, BATCH, num_items_in_batch=items)
    labelled = int((BATCH["labels"][:, 1:] != -100).sum())
    mean, _ = loss_and_gradients(plain, BATCH)
    assert torch.allclose(output.loss, expected.loss, rtol=1e-6)
    assert torch.allclose(output.loss, mean.loss * labelled / 40, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(gradients, expected_gradients))


def test_bf16_autocast_gradients_are_transformers_up_to_bf16_rounding(tiny_llama):
    cfg = config(tiny_llama, dtype="bf16")
    fused, plain = lora_model(cfg), lora_model(cfg, fused=False)
    output, gradients = loss_and_gradients(fused, BATCH, autocast=True)
    expected, expected_gradients = loss_and_gradients(plain, BATCH, autocast=True)
    assert torch.allclose(output.loss, expected.loss, rtol=1e-5)
    assert all(torch.allclose(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))
               for a, b in zip(gradients, expected_gradients))


def test_evaluation_no_grad_and_generation_compute_logits_as_before(tiny_llama):
    cfg = config(tiny_llama)
    fused, plain = lora_model(cfg), lora_model(cfg, fused=False)
    with torch.no_grad():
        for mode in ("eval", "train"):  # a validation loss under no_grad, in either mode
            getattr(fused, mode)(), getattr(plain, mode)()
            output, expected = fused(**on_device(BATCH, fused)), plain(**on_device(BATCH, plain))
            assert output.logits.shape == (2, 8, fused.config.vocab_size)
            assert torch.allclose(output.logits, expected.logits, atol=1e-6)
            assert torch.allclose(output.loss, expected.loss, rtol=1e-6)
        fused.eval(), plain.eval()
        prompt = BATCH["input_ids"][:1, :4].to(fused.device)
        assert torch.equal(fused.generate(input_ids=prompt, max_new_tokens=4, do_sample=False),
                           plain.generate(input_ids=prompt, max_new_tokens=4, do_sample=False))


def test_only_where_it_is_the_same_function(tiny_llama, tiny_t5):
    cfg = config(tiny_llama)
    model = lora_model(cfg, fused=False)
    model.get_base_model().lm_head.weight.requires_grad_(True)  # a trained head would need its own gradient
    assert head_loss.install(model, cfg) is False
    model.get_base_model().lm_head.weight.requires_grad_(False)
    model.get_base_model().config.final_logit_softcapping = 30.0  # logits changed after the head
    assert head_loss.install(model, cfg) is False
    del model.get_base_model().config.final_logit_softcapping
    assert head_loss.install(model, cfg) is True and head_loss.install(model, cfg) is True  # once, then as is
    assert len(model.get_base_model()._forward_hooks) == 1
    t5 = config(tiny_t5, kind="seq2seq")
    assert head_loss.install(models.attach_lora(models.load_model(t5, str(tiny_t5))[0], t5), t5) is False


def test_a_model_with_it_still_copies_and_pickles(tiny_llama):
    model = lora_model(config(tiny_llama))
    loss_and_gradients(model, BATCH)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        output, _ = loss_and_gradients(other, BATCH)
        assert output.logits is None and torch.isfinite(output.loss)


@pytest.mark.parametrize("spread", [1.0, 300.0])  # 300: logits 100s apart, exponentials far below fp32's normal range
def test_the_function_alone_equals_cross_entropy_also_where_exponentials_underflow(spread):
    torch.manual_seed(0)
    vocabulary = 49152  # SmolLM2's: a floor that changed many small exponentials would show in their sum
    hidden, weight = torch.randn(70, 16, requires_grad=True), torch.randn(vocabulary, 16) * spread / 16
    labels = torch.randint(0, vocabulary, (70,))
    labels[::5] = -100
    loss = head_loss.ChunkedHeadLoss.apply(hidden, weight, labels, torch.tensor(56.0), torch.float32)
    loss.backward()
    gradient, hidden.grad = hidden.grad, None
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction="sum") / 56
    expected.backward()
    assert torch.allclose(loss, expected, rtol=1e-6)
    assert torch.allclose(gradient, hidden.grad, rtol=1e-5, atol=1e-5 * float(hidden.grad.abs().max()))
    assert float(loss) > (100 if spread > 1 else 0)  # the wide case does have logits far apart
