"""An exported GGUF against the registered version as served, through transformers' GGUF reader.

    model, tokenizer = load_gguf(Path("tiny-v3-f16.gguf"))
    report = compare(reference, model, sequences)        # {'max_abs_logit_diff', 'top1_agreement', 'positions'}
    same = same_greedy_answers(reference, model, prompts_ids, max_new_tokens=16, eos_ids={2})

The reference is `models.load_served` (the adapter on the base in the version's serve dtype); the GGUF
is read back by transformers, which dequantises it to fp32. Comparisons are teacher-forced: both
models read the same token ids and each position's next-token choice is compared.
"""
from __future__ import annotations

from pathlib import Path


def load_gguf(path: Path):
    """(model, tokenizer) that transformers' GGUF reader makes of the file, in fp32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def logits_of(model, ids: list[int]):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float()


def compare(reference, candidate, sequences: list[list[int]]) -> dict:
    """Teacher-forced over `sequences`: the largest logit difference and the share of positions where both
    models' top-1 next token is the same."""
    same = positions = 0
    worst = 0.0
    for ids in sequences:
        expected, got = logits_of(reference, ids), logits_of(candidate, ids)
        worst = max(worst, float((expected - got).abs().max()))
        same += int((expected.argmax(-1) == got.argmax(-1)).sum())
        positions += len(ids)
    return {"max_abs_logit_diff": worst, "top1_agreement": same / positions, "positions": positions}


def greedy(model, ids: list[int], max_new_tokens: int, eos_ids: set) -> list[int]:
    """The greedy continuation of `ids`, up to an eos id or max_new_tokens (full forwards: tiny and exact)."""
    out = list(ids)
    for _ in range(max_new_tokens):
        token = int(logits_of(model, out)[-1].argmax())
        out.append(token)
        if token in eos_ids:
            break
    return out[len(ids):]


def same_greedy_answers(reference, candidate, prompts_ids: list[list[int]], max_new_tokens: int,
                        eos_ids: set) -> tuple[int, list[list[int]]]:
    """(how many prompts get the same greedy answer from both, the reference's answers)."""
    answers = [greedy(reference, ids, max_new_tokens, eos_ids) for ids in prompts_ids]
    same = sum(greedy(candidate, ids, max_new_tokens, eos_ids) == answer
               for ids, answer in zip(prompts_ids, answers))
    return same, answers
