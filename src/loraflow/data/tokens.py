"""Prompts as the model sees them, and rows as token ids with completion-only labels.

    ids = prompt_token_ids(tokenizer, prompt, cfg)     # the formatted prompt after one bos
    examples = tokenize_sft(rows, tokenizer, cfg)      # prompt tokens masked out of the loss

Chat data is rendered with the tokenizer's chat template, and every assistant turn (its text and
end-of-turn token) is learned, nothing else (chat_pieces).
"""
from __future__ import annotations

import json

from loraflow import LoraflowError
from loraflow.config import Config
from loraflow.data.readers import conversation

IGNORE_INDEX = -100
ANSWER_PROBE = "loraflow-answer-probe"


def uses_chat_template(tokenizer, cfg: Config) -> bool:
    """Whether prompts are wrapped in the tokenizer's chat template (causal model, data.chat_template, one exists)."""
    return cfg.model.kind == "causal" and cfg.data.chat_template and bool(getattr(tokenizer, "chat_template", None))


def prompt_messages(prompt: str, cfg: Config) -> list[dict]:
    """The messages before the answer. With data.messages_field a prompt that is a JSON conversation (a
    chat row's) is that conversation; any other prompt is one user message. data.system_prompt goes
    first unless the conversation starts with a system message."""
    messages = None
    if cfg.data.messages_field and prompt.startswith("["):
        try:
            messages = conversation(json.loads(prompt))
        except json.JSONDecodeError:
            pass
    messages = messages or [{"role": "user", "content": prompt}]
    if cfg.data.system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": cfg.data.system_prompt}, *messages]
    return messages


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template's text of `messages`; a template that refuses them (jinja raise_exception) is a
    LoraflowError."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # noqa: BLE001 - jinja's TemplateError, or whatever else a template raises
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise LoraflowError(f"the chat template refuses the conversation {json.dumps(messages)[:120]}: {reason}") \
            from None


def format_prompt(tokenizer, prompt: str, cfg: Config) -> str:
    """The text the model sees before the target: chat-formatted when configured and available."""
    if uses_chat_template(tokenizer, cfg):
        return render_chat(tokenizer, prompt_messages(prompt, cfg), add_generation_prompt=True)
    if cfg.data.messages_field:
        raise LoraflowError(f"data.messages_field: the tokenizer of {cfg.model.name} has no chat template to "
                            "render conversations with")
    if cfg.model.kind == "seq2seq":
        return prompt
    return prompt + "\n"


def end_of_target(tokenizer, cfg: Config) -> str:
    """What closes a target in training: the token the chat template ends an assistant turn with when chat
    formatting is used (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`), else the eos token; '' for seq2seq."""
    if cfg.model.kind != "causal":
        return ""
    eos = tokenizer.eos_token or ""
    return (chat_turn_end(tokenizer) or eos) if uses_chat_template(tokenizer, cfg) else eos


def chat_turn_end(tokenizer) -> str:
    """The special token that follows an assistant message in the chat template's rendering ('' if none)."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ANSWER_PROBE}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template may refuse this conversation (jinja raise_exception): use eos
        return ""
    after = rendered.partition(ANSWER_PROBE)[2].lstrip()
    specials = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    return max((token for token in specials if token and after.startswith(token)), key=len, default="")


def prompt_token_ids(tokenizer, prompt: str, cfg: Config) -> list[int]:
    """The token ids a causal model sees before the target (training and generation alike): the formatted
    prompt after one bos, where the tokenizer adds one and the text (e.g. a Llama 3 chat template) has none."""
    ids = tokenizer(format_prompt(tokenizer, prompt, cfg), add_special_tokens=False)["input_ids"]
    return missing_bos(tokenizer, ids) + ids


def missing_bos(tokenizer, ids: list[int]) -> list[int]:
    """[bos] if the tokenizer adds one and `ids` do not start with it, else []."""
    bos = tokenizer.bos_token_id
    # The attribute misses tokenizers whose post-processor adds bos (Llama 3 in transformers 5): ask it.
    adds_bos = getattr(tokenizer, "add_bos_token", False) or tokenizer("")["input_ids"][:1] == [bos]
    return [bos] if bos is not None and adds_bos and ids[:1] != [bos] else []


def chat_pieces(tokenizer, messages: list[dict], end: str) -> list[tuple[str, bool]]:
    """A conversation as the chat template renders it, cut into (text, learned) pieces up to the end of its
    last assistant turn: an assistant turn's text through its end-of-turn token `end` is learned; the rest
    (system and user turns, role headers, what follows `end`, an answer before any user turn) is not.

    A turn starts where the conversation before it, rendered with add_generation_prompt, ends: the text
    format_prompt gives for it. A template that renders earlier turns otherwise once more follow (one that
    drops past reasoning, say) cannot be cut so: a LoraflowError."""
    whole, pieces, done = render_chat(tokenizer, messages), [], 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or not any(m["role"] == "user" for m in messages[:index]):
            continue
        before = render_chat(tokenizer, messages[:index], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[:index + 1])
        if not (whole.startswith(through) and through.startswith(before)) or len(before) < done:
            raise LoraflowError("the chat template renders a conversation's earlier turns differently once more "
                                "turns follow, so its assistant turns cannot be told apart for the loss")
        turn = through[len(before):]
        stop = len(before) + (turn.rfind(end) + len(end) if end and end in turn else len(turn))
        pieces += [(whole[done:len(before)], False), (whole[len(before):stop], True)]
        done = stop
    return pieces


def conversation_token_ids(tokenizer, row: dict, cfg: Config, end: str) -> tuple[list, list, list]:
    """(ids before the last answer, their labels, the last answer's ids) of a chat row: the earlier answers
    are learned where they stand. Each piece is tokenised on its own, as a prompt and target are."""
    messages = prompt_messages(row["prompt"], cfg) + [{"role": "assistant", "content": row["target"]}]
    *pieces, (answer, _) = chat_pieces(tokenizer, messages, end)
    ids, labels = [], []
    for text, learned in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if learned else [IGNORE_INDEX] * len(piece)
    bos = missing_bos(tokenizer, ids)
    answer += "" if answer.endswith(end) else end  # a template without an end-of-turn token: end is eos
    return bos + ids, [IGNORE_INDEX] * len(bos) + labels, tokenizer(answer, add_special_tokens=False)["input_ids"]


def fit_to_length(prompt_ids: list[int], target_ids: list[int], max_length: int) -> tuple[list, list]:
    """Cut an example to max_length: the target keeps its start (at most half the room when the prompt
    needs the rest), the prompt keeps its end, next to the answer."""
    if len(prompt_ids) + len(target_ids) <= max_length:
        return prompt_ids, target_ids
    target_room = max(max_length - len(prompt_ids), min(len(target_ids), max_length // 2))
    target_ids = target_ids[:target_room]
    return prompt_ids[len(prompt_ids) - (max_length - len(target_ids)):], target_ids


def sft_token_ids(rows: list[dict], tokenizer, cfg: Config):
    """(prompt ids, prompt labels, target ids) per row, uncut: the prompt as the model sees it, labelled -100
    but for a conversation's earlier assistant turns, and the target with its end token."""
    end = end_of_target(tokenizer, cfg)
    for row in rows:
        if cfg.data.messages_field:
            yield conversation_token_ids(tokenizer, row, cfg, end)
            continue
        prompt_ids = prompt_token_ids(tokenizer, row["prompt"], cfg)
        yield (prompt_ids, [IGNORE_INDEX] * len(prompt_ids),
               tokenizer(row["target"] + end, add_special_tokens=False)["input_ids"])


def tokenize_sft(rows: list[dict], tokenizer, cfg: Config) -> list[dict]:
    """input_ids/labels per row; labels are -100 on the prompt, so only the target is learned (and, in a
    conversation, every assistant turn)."""
    if cfg.model.kind == "seq2seq":
        return [tokenize_seq2seq(row, tokenizer, cfg) for row in rows]
    examples = []
    for prompt_ids, prompt_labels, target_ids in sft_token_ids(rows, tokenizer, cfg):
        kept_ids, target_ids = fit_to_length(prompt_ids, target_ids, cfg.data.max_length)
        labels = prompt_labels[len(prompt_ids) - len(kept_ids):] + target_ids
        if any(label != IGNORE_INDEX for label in labels):
            examples.append({"input_ids": kept_ids + target_ids, "labels": labels})
    return examples


def tokenize_seq2seq(row: dict, tokenizer, cfg: Config) -> dict:
    source = tokenizer(format_prompt(tokenizer, row["prompt"], cfg), truncation=True, max_length=cfg.data.max_length)
    target = tokenizer(text_target=row["target"], truncation=True, max_length=cfg.data.max_length)
    return {"input_ids": source["input_ids"], "labels": target["input_ids"]}
