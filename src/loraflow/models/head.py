"""The LM head computed only at labelled tokens, through forward pre-hooks.

    head_on_labelled_tokens(model)   # True where the model takes such batches
"""
from __future__ import annotations


class LabelledTokensHead:
    """Forward pre-hooks that cut the LM head's input to the tokens with a label (models.head_on_labelled_tokens).

    The model's hook takes a batch's `labelled_positions` mask (rows x kept positions) out of the forward's
    arguments; the head's hook then replaces its input, hidden states at the kept positions of every row, by the
    rows of it the mask selects, as one row. A forward without the mask (generation, a batch whose every kept
    position has a label) leaves the head's input as it is. A module-level class, so a model with the hooks
    still pickles."""

    def __init__(self):
        self.mask = None

    def take_mask(self, module, args, kwargs):
        self.mask = kwargs.pop("labelled_positions", None)
        return args, kwargs

    def cut_input(self, module, args):
        mask, self.mask = self.mask, None
        if mask is None or args[0].shape[:2] != mask.shape:
            return None
        return (args[0][mask.to(args[0].device)].unsqueeze(0), *args[1:])


def head_on_labelled_tokens(model) -> bool:
    """Let batches of data.head_on_labelled_positions(per_token=True) cut `model`'s LM head and loss to the tokens
    that have a label: at SmolLM2's shapes a quarter of the head's positions that the shared logits_to_keep still
    computed. Returns whether `model` takes such batches (once installed, again is a no-op)."""
    if getattr(model, "_labelled_tokens_head", None) is not None:
        return True
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not takes_logits_to_keep(model):
        return False
    hooks = LabelledTokensHead()
    model.register_forward_pre_hook(hooks.take_mask, with_kwargs=True)
    head.register_forward_pre_hook(hooks.cut_input)
    model._labelled_tokens_head = hooks
    return True


def takes_logits_to_keep(model) -> bool:
    """Whether the causal LM under the PEFT wrapper computes logits only at given positions (`logits_to_keep` as a
    tensor of indices, as transformers' Llama, Qwen, Mistral, Gemma... do) with a loss that takes `shift_labels`."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = getattr(base, "forward", None)
    return forward is not None and "logits_to_keep" in inspect.signature(forward).parameters \
        and getattr(base, "loss_type", None) in (None, "ForCausalLM")
