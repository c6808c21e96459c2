"""The training kernels on the test's device (CUDA unless LORAFLOW_TEST_DEVICE says otherwise), each against
PEFT's or transformers' own computation there: fused_lora's LoRA forward, head_loss, the LoRA dropout masks."""
from __future__ import annotations

import math

import pytest
import torch

from loraflow import data, models
from loraflow.kernels import head_loss
from loraflow.kernels.dropout import SixteenBitDropout

pytestmark = pytest.mark.gpu

ROWS = {"input_ids": [[1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1]],
        "labels": [[1, 2, 3, 4, 5, 6, 7, 8], [-100, -100, -100, 5, 4, 3, 2, 1]]}


@pytest.fixture
def batch(on_device):
    return on_device({key: torch.tensor(value) for key, value in ROWS.items()})


def loss_and_gradients(model, batch, autocast: bool = False):
    """The training loss of `batch` and the gradients of the trainable parameters, dropout masks drawn from seed 1."""
    model.zero_grad()
    torch.manual_seed(1)
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch).loss
    loss.backward()
    return loss.detach().float(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def with_peft_forward(model) -> int:
    """Take fused_lora's forward off every LoRA layer again, so PEFT's own runs; returns how many."""
    layers = [m for m in model.modules() if "forward" in vars(m) and hasattr(m, "lora_A")]
    for layer in layers:
        del layer.forward
    return len(layers)


def close(ours, theirs, rtol: float) -> bool:
    """Each gradient equal to the other's up to `rtol` of its largest entry."""
    return all(torch.allclose(a.float(), b.float(), rtol=rtol, atol=rtol * float(b.abs().max()))
               for a, b in zip(ours, theirs))


def relative_error(gradients, reference) -> float:
    return float(torch.cat([(a.float() - b.float()).flatten() for a, b in zip(gradients, reference)]).norm()
                 / torch.cat([b.float().flatten() for b in reference]).norm())


def test_fused_lora_gives_pefts_fp32_loss_and_gradients_with_dropout(lora_pair, lora_config, batch):
    ours, _ = lora_pair(lora_config(dropout=0.3))
    fused = loss_and_gradients(ours, batch)
    assert with_peft_forward(ours) == 14  # 2 layers x 7 linear layers
    plain = loss_and_gradients(ours, batch)
    assert torch.allclose(fused[0], plain[0], rtol=1e-5)
    assert close(fused[1], plain[1], rtol=1e-4)
    assert all(float(g.abs().max()) > 0 for g in fused[1])


def test_fused_lora_under_bf16_autocast_is_as_close_to_fp32_as_pefts(lora_pair, lora_config, batch):
    """Both ways round differently under bf16 autocast, so each is compared with the fp32 gradients of the same
    adapter (no dropout: masks drawn for bf16 and fp32 tensors need not be the same on every device)."""
    reference = loss_and_gradients(lora_pair(lora_config("fp32"))[0], batch)
    ours, _ = lora_pair(lora_config("bf16"))
    fused = loss_and_gradients(ours, batch, autocast=True)
    with_peft_forward(ours)
    plain = loss_and_gradients(ours, batch, autocast=True)
    assert relative_error(fused[1], reference[1]) <= 1.5 * relative_error(plain[1], reference[1]) + 0.01
    assert relative_error(fused[1], reference[1]) < 0.2  # the bound of the CPU test (0.04 measured on a CPU)
    assert abs(float(fused[0]) - float(reference[0])) < 0.01 * float(reference[0])


@pytest.mark.parametrize("chunk_rows", [3, head_loss.CHUNK_ROWS])  # 3: several chunks, the last one short
@pytest.mark.parametrize("kind", ["labels", "labelled_tokens"])
def test_head_loss_gives_transformers_loss_and_gradients(lora_pair, lora_config, on_device, monkeypatch,
                                                         chunk_rows, kind):
    """The same model with head_loss on and off (its switch), fed a batch as it is and as loraflow's collator cuts it
    to the labelled tokens."""
    monkeypatch.setattr(head_loss, "CHUNK_ROWS", chunk_rows)
    ours, _ = lora_pair(lora_config())
    fused_head = ours.get_base_model()._fused_head
    if kind == "labelled_tokens":
        assert models.head_on_labelled_tokens(ours)
        collate = data.head_on_labelled_positions(lambda rows: {k: torch.tensor([r[k] for r in rows]) for k in rows[0]},
                                                  per_token=True)
        batch = on_device(collate([{key: ROWS[key][i] for key in ROWS} for i in range(2)]))
        assert "labelled_positions" in batch
    else:
        batch = on_device({key: torch.tensor(value) for key, value in ROWS.items()})
    fused = loss_and_gradients(ours, batch)
    fused_head.enabled = False  # the head's own forward and transformers' ForCausalLMLoss
    plain = loss_and_gradients(ours, batch)
    assert torch.allclose(fused[0], plain[0], rtol=1e-5)
    assert close(fused[1], plain[1], rtol=1e-4)
    assert all(float(g.abs().max()) > 0 for g in fused[1])


def test_head_loss_under_bf16_autocast_is_transformers_up_to_bf16_rounding(lora_pair, lora_config, batch):
    ours, _ = lora_pair(lora_config("bf16"))
    fused = loss_and_gradients(ours, batch, autocast=True)
    ours.get_base_model()._fused_head.enabled = False
    plain = loss_and_gradients(ours, batch, autocast=True)
    assert torch.allclose(fused[0], plain[0], rtol=1e-2)
    assert close(fused[1], plain[1], rtol=5e-2)


@pytest.mark.parametrize("spread", [1.0, 300.0])  # 300: logits 100s apart, exponentials far below fp32's normal range
def test_the_chunked_head_loss_alone_equals_cross_entropy(device, spread):
    torch.manual_seed(0)
    vocabulary = 49152
    hidden = torch.randn(70, 16, device=device, requires_grad=True)
    weight = torch.randn(vocabulary, 16, device=device) * spread / 16
    labels = torch.randint(0, vocabulary, (70,), device=device)
    labels[::5] = -100
    loss = head_loss.ChunkedHeadLoss.apply(hidden, weight, labels, torch.tensor(56.0, device=device), torch.float32)
    loss.backward()
    gradient, hidden.grad = hidden.grad, None
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction="sum") / 56
    expected.backward()
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert torch.allclose(gradient, hidden.grad, rtol=1e-4, atol=1e-4 * float(hidden.grad.abs().max()))


def test_dropout_drops_and_scales_as_torchs_own(device):
    """SixteenBitDropout(p) against torch.nn.Dropout(p) on the device: each drops a share p of the elements (within
    6 standard errors of a binomial share) and scales the kept ones by 1 / (1 - p)."""
    count, p = 4_000_000, 0.05
    ones = torch.ones(count, device=device)
    standard_error = math.sqrt(p * (1 - p) / count)
    for dropout in (SixteenBitDropout(p).train(), torch.nn.Dropout(p).train()):
        out = dropout(ones)
        assert out.device == ones.device and out.shape == ones.shape
        assert abs((out == 0).double().mean().item() - p) < 6 * standard_error
        assert out.unique().tolist() == [0.0, pytest.approx(1 / (1 - p), rel=1e-5)]


def test_dropout_gradients_flow_through_kept_elements_and_a_seed_fixes_the_mask(device):
    dropout = SixteenBitDropout(0.3).train()
    x = torch.randn(64, 96, dtype=torch.bfloat16, device=device, requires_grad=True)
    out = dropout(x)
    out.float().sum().backward()
    kept = out != 0
    assert 0 < kept.float().mean().item() < 1 and out.dtype == torch.bfloat16
    assert torch.equal(x.grad[~kept], torch.zeros_like(x.grad[~kept]))
    assert torch.allclose(x.grad[kept].float(), torch.full_like(x.grad[kept].float(), 1 / 0.7), rtol=1e-2)
    y = torch.randn(8, 16, 32, device=device)
    torch.manual_seed(7)
    first = dropout(y)
    torch.manual_seed(7)
    assert torch.equal(dropout(y), first)
    assert not torch.equal(dropout(y), first)  # the next draw is another mask
    assert dropout.eval()(y) is y and SixteenBitDropout(0.0).train()(y) is y


def test_lora_dropout_is_loraflows_and_checkpointing_replays_its_masks(lora_pair, lora_config, batch):
    """attach_lora swaps every LoRA dropout for SixteenBitDropout; with gradient checkpointing the recomputed forward
    draws the masks the first one drew, so the gradients are those without checkpointing."""
    cfg = lora_config(dropout=0.3)

    def gradients(checkpointing: bool):
        model, _ = lora_pair(cfg)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        dropouts = [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
                    for d in m.lora_dropout.values()]
        assert len(dropouts) == 14 and all(type(d) is SixteenBitDropout and d.p == 0.3 for d in dropouts)
        loss, grads = loss_and_gradients(model, batch)
        model.eval()
        with torch.no_grad():
            evaluated = model(**batch).loss.float()
        return loss, grads, evaluated

    loss, plain, evaluated = gradients(checkpointing=False)
    assert not torch.allclose(loss, evaluated, rtol=1e-4)  # the masks change the training loss
    replayed_loss, replayed, _ = gradients(checkpointing=True)
    assert torch.allclose(replayed_loss, loss, rtol=1e-6)
    assert close(replayed, plain, rtol=1e-5)
