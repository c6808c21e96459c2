"""Text generation and teacher-forced loss, shared by evaluate, the register gate, serving and benchmarks.

    answers = generation.generate(model, tokenizer, ["Describe: a red mug"], cfg)
    answers = generation.generate(model, tokenizer, prompts, cfg, seed=1, deadline=time.monotonic() + 60)
    loss = generation.validation_loss(model, tokenizer, rows, cfg)   # mean loss per target token

Prompts are encoded exactly as in training (data.prompt_token_ids); batches are sorted by length and
left-padded for causal models, so greedy answers equal one-prompt-at-a-time generation.
"""
from __future__ import annotations

import time

from loraflow import data, models
from loraflow.config import Config

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
# fp32 logits one validation-loss forward may make (transformers' loss adds about two copies of them)
LOSS_LOGITS_BYTES = 1 << 30

def stop_token_ids(model, tokenizer) -> list[int]:
    """eos ids of the generation config and tokenizer plus any end-of-turn token the vocabulary has."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids += [vocab[token] for token in END_OF_TURN_TOKENS if token in vocab]
    return sorted({int(i) for i in ids if i is not None})


def generation_settings(model, tokenizer, cfg: Config) -> dict:
    """model.generate keywords: greedy when eval.temperature == 0, else nucleus sampling."""
    settings = {"max_new_tokens": cfg.eval.max_new_tokens, "repetition_penalty": cfg.eval.repetition_penalty,
                "eos_token_id": stop_token_ids(model, tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if cfg.eval.temperature > 0:
        return {**settings, "do_sample": True, "temperature": cfg.eval.temperature, "top_p": cfg.eval.top_p}
    return {**settings, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def encode_prompts(tokenizer, prompts: list[str], cfg: Config) -> list[list[int]]:
    """Token ids per prompt, exactly as in training (seq2seq inputs truncated to data.max_length there too)."""
    if cfg.model.kind == "seq2seq":
        texts = [data.format_prompt(tokenizer, p, cfg) for p in prompts]
        return tokenizer(texts, truncation=True, max_length=cfg.data.max_length)["input_ids"]
    return [data.prompt_token_ids(tokenizer, p, cfg) for p in prompts]


def pad_batch(sequences: list[list[int]], pad_id: int, left: bool):
    """(input_ids, attention_mask) tensors, padded on the left for causal models."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        start = width - len(sequence) if left else 0
        ids[row, start:start + len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, start:start + len(sequence)] = 1
    return ids, mask


def deadline_criteria(deadline: float | None):
    """A StoppingCriteriaList that ends generation once time.monotonic() passes `deadline` (None: never)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class PastDeadline(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            import torch

            return torch.full((input_ids.shape[0],), time.monotonic() >= deadline, dtype=torch.bool,
                              device=input_ids.device)

    return StoppingCriteriaList([PastDeadline()] if deadline is not None else [])


class DeadlinePassed(TimeoutError):
    """Generation stopped at its deadline; `answers` holds what was produced by then."""

    def __init__(self, answers: list[str]):
        super().__init__("generation stopped at its deadline")
        self.answers = answers


def generate(model, tokenizer, prompts: list[str], cfg: Config, *, seed: int | None = None,
             deadline: float | None = None, progress: bool = True) -> list[str]:
    """Answers to raw prompts (formatted here with data.format_prompt), in the order given.

    Prompts are sorted by length into batches of eval.batch_size; causal batches are left-padded
    with an attention mask, so greedy answers equal one-prompt-at-a-time generation. Only new
    tokens are decoded (seq2seq models output only new tokens). `seed` seeds sampling. Past
    `deadline` (a time.monotonic() value) generation stops and DeadlinePassed is raised.
    """
    try:
        new_ids = generate_encoded(model, tokenizer, encode_prompts(tokenizer, prompts, cfg), cfg, seed=seed,
                                   deadline=deadline, progress=progress)
    except DeadlinePassed as passed:
        raise DeadlinePassed([decoded(tokenizer, ids) for ids in passed.answers]) from None
    return [decoded(tokenizer, ids) for ids in new_ids]


def decoded(tokenizer, new_ids: list[int]) -> str:
    """An answer's text as evaluation scores it: special tokens dropped, whitespace stripped."""
    return tokenizer.decode(new_ids, skip_special_tokens=True).strip()


def generate_encoded(model, tokenizer, encoded: list[list[int]], cfg: Config, *, seed: int | None = None,
                     deadline: float | None = None, progress: bool = False, stop_strings: list[str] | None = None,
                     stopping: list | None = None, streamer=None,
                     adapter_names: list[str] | None = None) -> list[list[int]]:
    """The new token ids after each encoded prompt, in the order given: `generate`'s batches and decoding.

    A row's ids end with its stop token when one was generated (the padding after it is dropped);
    `stop_strings` also end a row (transformers' StopStringCriteria), `stopping` adds criteria (each
    answering per row), `streamer` receives the tokens (one row at a time: a streamer takes batches
    of one), `adapter_names` gives each row's PEFT adapter (a mixed batch). Past `deadline`, DeadlinePassed
    carries the ids generated so far.
    """
    import torch
    import transformers
    from tqdm.auto import tqdm

    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    size = 1 if streamer is not None else cfg.eval.batch_size
    batches = [order[start:start + size] for start in range(0, len(order), size)]
    settings = generation_settings(model, tokenizer, cfg)
    if stop_strings:
        settings = {**settings, "stop_strings": stop_strings, "tokenizer": tokenizer}
    criteria = deadline_criteria(deadline)
    criteria.extend(stopping or [])
    causal = cfg.model.kind == "causal"
    if seed is not None:
        transformers.set_seed(seed)
    answers: list[list[int]] = [[] for _ in encoded]
    for batch in tqdm(batches, desc="generating", unit="batch", leave=False, disable=not progress):
        input_ids, attention_mask = pad_batch([encoded[i] for i in batch], tokenizer.pad_token_id, left=causal)
        rows = {"adapter_names": [adapter_names[i] for i in batch]} if adapter_names else {}
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids.to(model.device),
                                    attention_mask=attention_mask.to(model.device),
                                    stopping_criteria=criteria, streamer=streamer, **settings, **rows)
        new_tokens = output[:, input_ids.shape[1]:] if causal else output[:, 1:]
        for index, tokens in zip(batch, new_tokens):
            answers[index] = ended_at_stop(tokens.tolist(), settings["eos_token_id"], tokenizer.pad_token_id)
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlinePassed(answers)
    return answers


def ended_at_stop(tokens: list[int], stop_ids: list[int], pad_id: int | None) -> list[int]:
    """A row's new ids up to and including its first stop token; without one, less the padding after an end."""
    stops = set(stop_ids)
    for position, token in enumerate(tokens):
        if token in stops:
            return tokens[:position + 1]
    while tokens and pad_id is not None and tokens[-1] == pad_id:
        tokens = tokens[:-1]
    return tokens


def validation_loss(model, tokenizer, rows: list[dict], cfg: Config) -> float:
    """Teacher-forced mean loss per target token, labels masked as in training (token-weighted)."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    examples = data.training_examples(rows, tokenizer, cfg)
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=data.IGNORE_INDEX)
    per_token = False
    if cfg.model.kind == "causal" and models.takes_logits_to_keep(model):
        # the same loss, without the head on prompt positions
        per_token = models.head_on_labelled_tokens(model)
        collate = data.head_on_labelled_positions(collate, per_token=per_token)
    total, count = 0.0, 0
    for rows in loss_batches(examples, cfg.eval.batch_size, vocabulary_size(model), labelled_only=per_token):
        batch = {k: v.to(model.device) for k, v in collate(rows).items()}
        with torch.inference_mode():
            loss = model(**batch).loss
        labels = batch["labels"] if cfg.model.kind == "seq2seq" else batch["labels"][:, 1:]
        tokens = int((labels != data.IGNORE_INDEX).sum())
        total, count = total + float(loss) * tokens, count + tokens
    return total / count if count else float("nan")


def vocabulary_size(model) -> int:
    """Logits per position: the output embedding's rows (the text config's vocab_size where there is none)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return int(head.weight.shape[0])
    return int(model.config.get_text_config().vocab_size)


def loss_batches(examples: list[dict], batch_size: int, vocabulary: int, labelled_only: bool = False) -> list:
    """`examples` in batches of eval.batch_size rows, a batch cut into fewer rows where its fp32 logits would pass
    LOSS_LOGITS_BYTES: every padded position has logits, or with `labelled_only` (the head on labelled tokens
    alone) only the labelled ones. Continued pretraining labels every token: at 2048 positions and a 128k
    vocabulary one row's logits take 1 GiB, so 16 rows would take 17 GB, plus the loss's copies."""
    batches = []
    for start in range(0, len(examples), batch_size):
        rows = examples[start:start + batch_size]
        longest = max(len(row["input_ids"]) for row in rows)
        part, positions = [], 0
        for row in rows:
            row_positions = sum(label != data.IGNORE_INDEX for label in row["labels"]) if labelled_only else longest
            if part and (positions + row_positions) * vocabulary * 4 > LOSS_LOGITS_BYTES:
                batches.append(part)
                part, positions = [], 0
            part.append(row)
            positions += row_positions
        batches.append(part)
    return batches


def chat_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    """A conversation as a causal model sees it before the assistant's answer: rendered by the tokenizer's
    chat template with the assistant's turn opened, after at most one bos (as data.prompt_token_ids)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    # as data.prompt_token_ids: the attribute misses tokenizers whose post-processor adds bos, so ask it
    adds_bos = getattr(tokenizer, "add_bos_token", False) or tokenizer("")["input_ids"][:1] == [bos]
    if bos is not None and adds_bos and ids[:1] != [bos]:
        ids = [bos] + ids
    return ids


def generate_from_ids(model, tokenizer, prompt_ids: list[int], cfg: Config, *, seed: int | None = None,
                      deadline: float | None = None, stop_strings: list[str] | None = None) -> list[int]:
    """The new token ids a causal model generates after one already-encoded prompt (generate_encoded's).

    Past `deadline`, DeadlinePassed carries the text decoded so far.
    """
    try:
        return generate_encoded(model, tokenizer, [prompt_ids], cfg, seed=seed, deadline=deadline,
                                stop_strings=stop_strings)[0]
    except DeadlinePassed as passed:
        raise DeadlinePassed([decoded(tokenizer, passed.answers[0])]) from None
