"""The LM head and its cross-entropy computed together, a chunk of tokens at a time, in training.

    model = models.attach_lora(model, cfg)   # a Llama, Mistral or Qwen causal LM then trains through head_loss

A causal LM's training forward computes logits = lm_head(hidden) for every kept token (49,152 of them a token
for SmolLM2), copies them to fp32, and takes the cross-entropy; its backward then writes a zero tensor of the
same size, scatters the labels into it, runs log-softmax's backward and casts the result back to the head's
dtype: about ten passes over a tokens x vocabulary fp32 tensor (100 MB for 518 tokens) that never fits in a
cache. Here the head and the loss run as one autograd function over chunks of CHUNK_ROWS tokens: each chunk's
logits are made, turned into the loss and, while that chunk is at hand, into the gradient
of the hidden states ((softmax - one-hot) / the token count, times the head's weight), which backward only
scales by its incoming gradient. No full-size logits are kept, the head's matmul runs once each way as before,
and the numbers are those of transformers' ForCausalLMLoss (logits rounded to the compute dtype, log-softmax in
fp32, sum over labelled tokens divided by num_items_in_batch or their count) up to float rounding: a test
compares loss and gradients. The training forward then returns no logits (nothing in training reads them).

It applies only where it is the same function: model types whose forward is logits = lm_head(hidden) with no
logit scaling or soft-capping after it (FUSED_MODEL_TYPES), a plain frozen nn.Linear head without bias, and a
forward in training mode with labels and gradients on. Evaluation, generation and validation losses compute
logits as transformers does.
"""
from __future__ import annotations

import torch

CHUNK_ROWS = 256  # 50 MB of fp32 logits for SmolLM2; each chunk reads the head's weight once each way (113 MB
# in fp32), so smaller chunks cost more than they save in cache: at 64, an fp32 SFT step was 1.05x slower
FUSED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
IGNORE_INDEX = -100
# An exponential below exp(-87) = 1.6e-38 is kept at that value. fp32's smallest normal number is 1.2e-38, and
# torch's CPU exp takes 20-60x as long on arguments below about -87.3 (subnormal or zero results): logits that
# far below the top one are the rule once a model predicts its tokens well, and made this loss 3x slower than
# transformers' on such text. The change is below 1.6e-38 per entry (49,152 of them add < 1e-33 to a sum >= 1),
# far under any loss's or gradient's rounding.
EXPONENT_FLOOR = -87.0


class ChunkedHeadLoss(torch.autograd.Function):
    """sum over labelled tokens of cross_entropy(hidden @ weight.T, labels) / count; the gradient for `hidden`
    is computed in the forward, chunk by chunk (`weight` is frozen: it gets none)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, count, dtype):
        wants_gradient = ctx.needs_input_grad[0]
        with torch.autocast(hidden.device.type, enabled=False):
            loss, gradient = chunked_loss(hidden.to(dtype), weight.to(dtype), labels, count, wants_gradient)
        ctx.save_for_backward(gradient.to(hidden.dtype) if wants_gradient else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (gradient,) = ctx.saved_tensors
        return (gradient * grad_loss.to(gradient.dtype) if gradient is not None else None), None, None, None, None


def chunked_loss(hidden, weight, labels, count, wants_gradient: bool):
    """(loss, gradient of the loss for `hidden` or None): hidden (tokens x hidden size) and weight (vocabulary x
    hidden size) in the compute dtype, labels (tokens,) with IGNORE_INDEX where a token has none."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    log_count = torch.log(count)
    gradient = torch.empty_like(hidden) if wants_gradient else None
    for start in range(0, hidden.shape[0], CHUNK_ROWS):
        rows, targets = slice(start, start + CHUNK_ROWS), labels[start:start + CHUNK_ROWS]
        logits = (hidden[rows] @ weight.T).float()  # rounded to the compute dtype first, as the head's output is
        labelled = targets != IGNORE_INDEX
        safe_targets = torch.where(labelled, targets, 0)
        target_logits = logits.gather(1, safe_targets[:, None]).squeeze(1)
        log_normaliser = log_sum_exp(logits)
        total += torch.where(labelled, log_normaliser - target_logits, 0).sum()
        if wants_gradient:  # d loss / d logits = (softmax - one-hot) / count, then back through the head
            exponents = logits.sub_((log_normaliser + log_count)[:, None]).clamp_(min=EXPONENT_FLOOR)
            scaled = exponents.exp_()  # softmax / count, never subnormal (see EXPONENT_FLOOR)
            scaled[torch.arange(len(targets), device=targets.device), safe_targets] -= 1 / count
            scaled.mul_(labelled[:, None])
            gradient[rows] = scaled.to(weight.dtype) @ weight
    return total / count, gradient


def log_sum_exp(logits):
    """torch.logsumexp over the last dimension, its exponentials kept at or above exp(EXPONENT_FLOOR)."""
    top = logits.amax(dim=-1, keepdim=True)
    return top.squeeze(-1) + (logits - top).clamp_(min=EXPONENT_FLOOR).exp_().sum(dim=-1).log()


class FusedHead:
    """The hooks and loss function that route a model's training forward through ChunkedHeadLoss.

    A pre-hook on the causal LM notes whether this forward is a training one with labels and gradients; the
    head then hands its input through unchanged (after any hook that cut it to the labelled tokens) and says
    so, the model's loss_function computes ChunkedHeadLoss on it, and a forward hook drops the logits field,
    which held hidden states. Any other forward runs the head and transformers' loss as they are. A module-level
    class, so a model with it still pickles."""

    def __init__(self, head, default_loss):
        self.head, self.default_loss, self.active, self.passed = head, default_loss, False, False
        self.head_forward = type(head).forward
        self.enabled = True  # False: every forward runs the head and transformers' loss (an ablation's switch)

    def note_forward(self, module, args, kwargs):
        self.passed = False
        self.active = self.enabled and module.training and torch.is_grad_enabled() and (
            kwargs.get("labels") is not None or kwargs.get("shift_labels") is not None)

    def drop_logits(self, module, args, kwargs, output):
        if self.passed and hasattr(output, "logits"):
            output.logits = None
        self.active = self.passed = False
        return output

    def forward_head(self, hidden):
        self.passed = self.active
        return hidden if self.active else self.head_forward(self.head, hidden)

    def loss(self, logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = IGNORE_INDEX,
             shift_labels=None, **kwargs):
        if not self.passed:  # the head made logits (not active, or its forward was replaced since)
            return self.default_loss(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                                     ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        hidden = logits  # forward_head passed the head's input through
        if shift_labels is None:
            shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        targets = shift_labels.reshape(-1).to(hidden.device)
        targets = torch.where(targets == ignore_index, IGNORE_INDEX, targets)
        count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
        count = torch.as_tensor(count, device=hidden.device, dtype=torch.float32)
        weight = self.head.weight
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        return ChunkedHeadLoss.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets, count, dtype)


def install(model, cfg) -> bool:
    """Route `model`'s training forward through ChunkedHeadLoss where it computes the same loss (see the module
    docstring); returns whether it does (once installed, again is a no-op)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base, "_fused_head", None) is not None:
        return True
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not computes_the_same_loss(base, head, cfg):
        return False
    fused = FusedHead(head, base.loss_function)
    base.register_forward_pre_hook(fused.note_forward, with_kwargs=True)
    base.register_forward_hook(fused.drop_logits, with_kwargs=True)
    head.forward = fused.forward_head
    base.loss_function = fused.loss
    base._fused_head = fused
    return True


def computes_the_same_loss(base, head, cfg) -> bool:
    """Whether ChunkedHeadLoss is `base`'s own training loss: a frozen plain nn.Linear head whose output is the
    logits (no soft-capping), transformers' causal-LM loss, and no sharded training (train.fsdp, train.deepspeed
    keep transformers' way)."""
    config = getattr(base, "config", None)
    plain_head = type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
    logits_are_its_output = getattr(config, "model_type", None) in FUSED_MODEL_TYPES \
        and not getattr(config, "final_logit_softcapping", None)
    causal_loss = getattr(base, "loss_type", None) in (None, "ForCausalLM")
    return plain_head and logits_are_its_output and causal_loss and not (cfg.train.fsdp or cfg.train.deepspeed)
