"""Data preparation: read, normalise, count bad rows, split, format prompts, tokenise.

    loraflow prepare quickstart
    prepared = data.prepare(cfg)                       # rows per split + counts + digest
    examples = data.tokenize_sft(rows, tokenizer, cfg)  # prompt tokens masked out of the loss
    blocks = data.packed_training_examples(rows, tokenizer, cfg)  # what the trainer gets, per data.packing

Sources (files, save_to_disk folders, the Hub, builtin:catalogue) are read by `loraflow.readers`. Field
values stay as written apart from HTML entities (unescaped) and, with data.strip_html, HTML tags. A
template's `[[...]]` part is left out when a field in it is empty; the other fields are required.
Malformed, empty and duplicate rows are dropped and counted; rows that share a prompt go whole into one split.

Chat data (data.messages_field): a row's prompt is its conversation before the last assistant turn, as
JSON, and its target that turn's text; it is rendered with the tokenizer's chat template, and every
assistant turn (its text and end-of-turn token) is learned, nothing else (chat_pieces).

Packing (data.packing, SFT on causal models) changes what the trainer gets, never the validation rows:
`constant` joins every row's whole text with eos and cuts fixed blocks (every token learned, rows see
each other); `rows` packs whole rows into blocks with position ids restarting at each row, so eager, sdpa
and flex attention keep each row to itself (flash attention only at train.batch_size=1: pad_row_blocks).
"""
from __future__ import annotations

import bisect
import html
import json
import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from loraflow import LoraflowError
from loraflow.config import OPTIONAL_PART, Config, DataConfig
from loraflow.readers import conversation, load_records

SPLITS = ("train", "validation", "test")
IGNORE_INDEX = -100
# Only these names count as HTML tags, so `<start_of_turn>`, `<unk>`, `</s>` or `x <y> z` survive data.strip_html.
INLINE_ELEMENTS = set("a abbr b bdi bdo big cite code data del dfn em font i img ins kbd mark q samp small span "
                      "strike strong sub sup time tt u var wbr".split())
BLOCK_ELEMENTS = set("address article aside blockquote body br button caption center dd details div dl dt figure "
                     "footer form h1 h2 h3 h4 h5 h6 head header hr html iframe input label li link main meta nav "
                     "ol option p pre script section select source style table tbody td textarea th thead title "
                     "tr ul video".split())
HTML_TAG = re.compile(r"<!--.*?-->|<!doctype[^>]*>|</?([a-z][a-z0-9]*)(?:\s[^<>]*)?/?>", re.IGNORECASE | re.DOTALL)
ANSWER_PROBE = "loraflow-answer-probe"


@dataclass
class PreparedData:
    """Rows per split ({"prompt", "target"} for SFT (chat data: the prompt a JSON conversation), {"text"}
    for CPT) and how they were obtained."""
    splits: dict[str, list[dict]]
    counts: dict[str, int]
    digest: str
    source: str
    fields: list[str] = field(default_factory=list)


def normalise_text(text, *, strip_html: bool = False) -> str:
    """Unescape HTML entities (twice, for `&amp;amp;`), remove HTML tags if strip_html, strip the ends.

    Nothing else changes: newlines, runs of spaces, chat tags and `a<b and c>d` stay as written."""
    text = html.unescape(html.unescape(str(text)))
    return (strip_html_tags(text) if strip_html else text).strip()


def strip_html_tags(text: str) -> str:
    """Remove HTML tags and comments; a block tag (`<p>`, `<br>`, `<li>`) becomes one space between words."""
    def replace(match: re.Match) -> str:
        name = (match[1] or "").lower()
        if match[1] and name not in INLINE_ELEMENTS | BLOCK_ELEMENTS:
            return match[0]
        return "\0" if name in BLOCK_ELEMENTS else ""
    # \0 marks a block boundary; a run of them with the whitespace around it is one space (a newline if any).
    return re.sub(r"\s*\0[\0\s]*", lambda run: "\n" if "\n" in run[0] else " ", HTML_TAG.sub(replace, text))


def comparison_key(text: str) -> str:
    """How rows are compared for duplicates and shared prompts: case and runs of whitespace do not count."""
    return " ".join(text.split()).casefold()


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def required_fields(template: str) -> list[str]:
    """The fields outside the template's optional `[[...]]` parts: a row with one of them empty is dropped."""
    return template_fields(OPTIONAL_PART.sub("", template))


def fill_template(template: str, values: dict) -> str:
    """`template` filled from `values`; an optional `[[...]]` part (brackets removed) only if every field in
    it has a value. Each part is filled on its own, so braces in a value are never read as fields."""
    pieces = OPTIONAL_PART.split(template)  # odd indices: the optional parts
    return "".join(piece.format(**values) for index, piece in enumerate(pieces)
                   if index % 2 == 0 or all(values.get(name) for name in template_fields(piece)))


def templates_for(cfg: Config) -> tuple[str, str]:
    data = cfg.data
    return (data.prompt_template or "{" + data.prompt_field + "}",
            data.target_template or "{" + data.target_field + "}")


def check_fields_exist(records: list[dict], needed: list[str], path: str) -> None:
    available = set().union(*(r.keys() for r in records[:200])) if records else set()
    missing = [name for name in needed if name not in available]
    if missing:
        chat = next((k for k in ("messages", "conversations") if k in available), "")
        hint = f"; for chat data set data.messages_field={chat}" if chat else ""
        raise LoraflowError(f"field {', '.join(map(repr, missing))} not found in {path} "
                            f"(available: {', '.join(sorted(available)) or 'none'}){hint}")


def row_templates(records: list[dict], cfg: Config, source: str) -> dict[str, str]:
    """{"prompt", "target"} templates (SFT; "base_prompt" too with data.base_prompt_template) or {"text"} (CPT),
    their fields checked against the records."""
    if cfg.train.objective == "cpt":
        templates = {"text": "{" + cfg.data.text_field + "}"}
    else:
        templates = dict(zip(("prompt", "target"), templates_for(cfg)))
        if cfg.data.base_prompt_template:  # what the base model is asked in evaluation
            templates["base_prompt"] = cfg.data.base_prompt_template
    check_fields_exist(records, [name for t in templates.values() for name in template_fields(t)], source)
    return templates


def template_row(record: dict, templates: dict[str, str], cfg: Config) -> dict | str:
    """The row a record gives, or why it is dropped: "malformed" (a template cannot be filled) or "empty"
    (a required field is empty, or the answer is shorter than data.min_target_chars)."""
    values = {k: normalise_text(v, strip_html=cfg.data.strip_html) if v is not None else ""
              for k, v in record.items()}
    try:
        row = {key: fill_template(template, values).strip() for key, template in templates.items()}
    except (KeyError, IndexError, ValueError):
        return "malformed"
    required = [name for template in templates.values() for name in required_fields(template)]
    if any(not values.get(name) for name in required) or len(row.get("target", row.get("text", ""))) \
            < cfg.data.min_target_chars:
        return "empty"
    return row


def conversation_row(record: dict, cfg: Config) -> dict | str:
    """A chat record's row: the conversation before its last assistant turn (JSON, see prompt_messages) as
    the prompt, that turn's text as the target; turns after it are left out. Or why it is dropped:
    "malformed" (data.messages_field is not a conversation) or "empty" (no user turn before an answer of
    at least data.min_target_chars)."""
    messages = conversation(record.get(cfg.data.messages_field))
    if messages is None:
        return "malformed"
    messages = [{**m, "content": normalise_text(m["content"], strip_html=cfg.data.strip_html)} for m in messages]
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or len(messages[last]["content"]) < cfg.data.min_target_chars \
            or not any(m["role"] == "user" for m in messages[:last]):
        return "empty"
    return {"prompt": json.dumps(messages[:last], ensure_ascii=False), "target": messages[last]["content"]}


def records_to_rows(records: list[dict], cfg: Config, counts: dict, source: str) -> list[dict]:
    """Fill the templates (SFT), take the conversation (chat data) or the text field (CPT); count and drop
    malformed, empty and duplicate rows.

    A duplicate has the prompt and target (or text) of an earlier row, compared by `comparison_key`."""
    chat = bool(cfg.data.messages_field)
    if chat:
        check_fields_exist(records, [cfg.data.messages_field], source)
    templates = {} if chat else row_templates(records, cfg, source)
    rows, seen = [], set()
    for record in records:
        row = conversation_row(record, cfg) if chat else template_row(record, templates, cfg)
        if isinstance(row, str):
            counts[f"rows_dropped_{row}"] += 1
            continue
        key = tuple(map(comparison_key, row.values()))
        if key in seen:
            counts["rows_dropped_duplicate"] += 1
            continue
        seen.add(key)
        rows.append(row)
    return rows


def split_rows(rows: list[dict], data: DataConfig, group_by: str = "prompt") -> dict[str, list[dict]]:
    """Test, validation and train rows; rows with the same `group_by` value (by `comparison_key`) go whole
    into one split, so no held-out prompt is seen in training. Deterministic by data.split_seed."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(comparison_key(row[group_by]), []).append(row)
    order = list(groups.values())
    rng = random.Random(data.split_seed)
    rng.shuffle(order)
    n_test = round(len(rows) * data.test_fraction) if data.test_fraction else 0
    n_val = round(len(rows) * data.val_fraction) if data.val_fraction else 0
    if len(rows) >= 3:
        n_test = max(n_test, 1 if data.test_fraction else 0)
        n_val = max(n_val, 1 if data.val_fraction else 0)
    splits = {"test": [], "validation": [], "train": []}
    for group in order:  # a held-out split takes whole groups until it has its share (it may overshoot a little)
        name = next((s for s, n in (("test", n_test), ("validation", n_val)) if len(splits[s]) < n), "train")
        splits[name] += group
    for part in splits.values():  # the rows of one prompt need not sit together (evaluation takes the head)
        rng.shuffle(part)
    return splits


def matching_records(records: list[dict], where: dict, source: str) -> list[dict]:
    """data.where: the records whose every named field, as text, matches its regular expression in full."""
    if not where:
        return records
    check_fields_exist(records, list(where), source)
    patterns = {name: re.compile(str(pattern)) for name, pattern in where.items()}
    return [record for record in records
            if all(pattern.fullmatch(str(record.get(name) if record.get(name) is not None else "").strip())
                   for name, pattern in patterns.items())]


def training_subset(rows: list[dict], share: float, seed: int) -> list[dict]:
    """data.train_subset: that share of the training rows (at least one), drawn at random (seeded), in order."""
    if share >= 1 or not rows:
        return rows
    keep = sorted(random.Random(seed).sample(range(len(rows)), max(1, round(len(rows) * share))))
    return [rows[i] for i in keep]


def sample_records(records: list[dict], max_rows: int, seed: int) -> list[dict]:
    """data.max_rows records drawn at random (seeded; in file order), not the head of the file."""
    if not max_rows or len(records) <= max_rows:
        return records
    return [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), max_rows))]


def prepare(cfg: Config) -> PreparedData:
    """Read data.path, keep the records data.where matches (a data.max_rows sample of them), normalise, drop and
    count bad rows, split, keep data.train_subset of the training split. Raises LoraflowError if nothing is left."""
    records, malformed, source, digest = load_records(cfg)
    matching = matching_records(records, cfg.data.where, source)
    if not matching:
        raise LoraflowError(f"no record of {source} matches data.where {cfg.data.where}")
    not_matching = len(records) - len(matching)
    records = sample_records(matching, cfg.data.max_rows, cfg.data.split_seed)
    counts = {"rows_read": len(records) + malformed, "rows_dropped_malformed": malformed,
              "rows_dropped_empty": 0, "rows_dropped_duplicate": 0}
    if cfg.data.where:
        counts["rows_not_matching"] = not_matching  # before rows_read: data.where comes first
    rows = records_to_rows(records, cfg, counts, source)
    counts["rows_kept"] = len(rows)
    if not rows:
        raise LoraflowError(f"no usable rows left in {source} after dropping empty, malformed and duplicate rows")
    cpt = cfg.train.objective == "cpt"
    if not cpt:
        sizes = Counter(comparison_key(row["prompt"]) for row in rows)
        counts.update(prompts_distinct=len(sizes), rows_sharing_a_prompt=sum(n for n in sizes.values() if n > 1))
    splits = split_rows(rows, cfg.data, group_by="text" if cpt else "prompt")
    if cfg.data.train_subset < 1:
        subset = training_subset(splits["train"], cfg.data.train_subset, cfg.data.split_seed)
        counts["rows_train_unused"], splits["train"] = len(splits["train"]) - len(subset), subset
    if not splits["train"]:
        prompts = "" if cpt else f" ({counts['prompts_distinct']} distinct prompts)"
        raise LoraflowError(f"only {len(rows)} usable rows{prompts} in {source}: too few to split off a training set")
    counts.update({f"rows_{name}": len(part) for name, part in splits.items()})
    fields = sorted(set().union(*(r.keys() for r in records[:200])))
    return PreparedData(splits=splits, counts=counts, digest=digest, source=source, fields=fields)


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


def fixed_blocks(stream: list[int], block_size: int) -> list[dict]:
    """`stream` cut into blocks of block_size with labels = input_ids; the tail shorter than a block is dropped."""
    return [{"input_ids": stream[i:i + block_size], "labels": stream[i:i + block_size]}
            for i in range(0, len(stream) - block_size + 1, block_size)]


def constant_blocks(rows: list[dict], tokenizer, cfg: Config) -> list[dict]:
    """`data.packing: constant`: every row's whole text (the prompt as the model sees it, the target, its end
    token) joined by eos and cut into blocks of data.max_length; every token is learned, the prompt too.

    Rows see each other: a block starts anywhere in a row and attends to the rows before it in the block."""
    eos, stream = tokenizer.eos_token_id, []
    for prompt_ids, _, target_ids in sft_token_ids(rows, tokenizer, cfg):
        stream += prompt_ids + target_ids
        if eos is not None and stream[-1] != eos:  # a target that already ends with eos gets no second one
            stream.append(eos)
    return fixed_blocks(stream, cfg.data.max_length)


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total length <= capacity (each length <= capacity): longest
    first, each into the open bin with the least room that still fits it, else into a new bin."""
    rooms: list[int] = []  # the distinct free rooms of open bins, sorted
    open_bins: dict[int, list[list[int]]] = {}
    bins: list[list[int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = bisect.bisect_left(rooms, lengths[index])
        if at < len(rooms):
            room = rooms[at]
            members = open_bins[room].pop()
            if not open_bins[room]:
                del open_bins[room], rooms[at]
        else:
            room, members = capacity, []
            bins.append(members)
        members.append(index)
        left = room - lengths[index]
        if left > 0:
            if left not in open_bins:
                bisect.insort(rooms, left)
            open_bins.setdefault(left, []).append(members)
    return bins


def joined_rows(examples: list[dict]) -> dict:
    """One `rows` block: the examples one after another, position_ids restarting at 0 for each.

    Each row's first label is -100: alone nothing predicts it (the loss shifts by one), in a block the
    previous row's last token would. It is a prompt token (already -100); this makes certain of it."""
    block = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        block["input_ids"] += example["input_ids"]
        block["labels"] += [IGNORE_INDEX] + example["labels"][1:]
        block["position_ids"] += list(range(len(example["input_ids"])))
    return block


def pack_rows(examples: list[dict], block_size: int) -> list[dict]:
    """`data.packing: rows`: whole examples (each at most block_size, as tokenize_sft cuts them) packed
    best-fit-decreasing into blocks of at most block_size tokens; see joined_rows and pad_row_blocks."""
    bins = best_fit_decreasing([len(e["input_ids"]) for e in examples], block_size)
    return [joined_rows([examples[i] for i in members]) for members in bins]


def pad_row_blocks(blocks: list[dict], pad_token_id: int) -> dict:
    """A batch of `rows` blocks as tensors: `collate = functools.partial(pad_row_blocks, pad_token_id=0)`.

    Right-padded to the longest block: pad ids, labels -100, position ids 0 (each pad its own one-token
    sequence). There is no attention_mask: transformers (masking_utils.find_packed_sequence_indices) reads
    the rows from position_ids only when the mask is None and no cache is passed, and then builds a
    block-diagonal causal mask for eager, sdpa and flex attention, so a row attends only to itself. Flash
    attention (2, 3, 4) isolates rows only in a batch of one block (train.batch_size=1): transformers takes
    packed position_ids as row boundaries only for batch size 1; otherwise a row sees the rows before it in
    its block. use_cache=False is set because a cache turns the detection off.
    """
    import torch

    width = max(len(block["input_ids"]) for block in blocks)
    padding = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "position_ids": 0}
    batch = {key: torch.tensor([block[key] + [value] * (width - len(block[key])) for block in blocks])
             for key, value in padding.items()}
    return {**batch, "use_cache": False}


def head_on_labelled_positions(collate, per_token: bool = False):
    """`collate`, each batch also carrying the positions whose next token is a label in some row (logits_to_keep)
    and those next tokens (shift_labels): the vocabulary-wide head, its fp32 upcast and the cross-entropy then skip
    prompt and padding positions, whose labels are ignored anyway. With `per_token` (a model that takes it:
    models.head_on_labelled_tokens) the batch also carries which of those (row, position) pairs have a label
    (labelled_positions) and shift_labels holds only theirs, one row: the head then computes no position of a row
    that another row's label kept. The loss is the same; only work not needed is left out. A batch where every
    position counts is left as it is."""
    import torch

    def collate_kept(examples):
        batch = collate(examples)
        labels = batch["labels"]
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        keep = (shifted != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
        if len(keep) < shifted.shape[1]:
            batch["logits_to_keep"], batch["shift_labels"] = keep, shifted[:, keep].contiguous()
        if per_token:
            kept = batch.get("shift_labels", shifted)
            labelled = kept != IGNORE_INDEX
            if not bool(labelled.all()):
                batch["logits_to_keep"] = batch.get("logits_to_keep", torch.arange(shifted.shape[1]))
                batch["labelled_positions"], batch["shift_labels"] = labelled, kept[labelled].unsqueeze(0)
        return batch
    return collate_kept


def cpt_blocks(rows: list[dict], tokenizer, block_size: int) -> list[dict]:
    """Raw text joined with eos and cut into fixed-length blocks for continued pretraining (a corpus shorter
    than a block makes one shorter block)."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = []
    for row in rows:
        stream += tokenizer(row["text"], add_special_tokens=False)["input_ids"] + separator
    return fixed_blocks(stream, min(block_size, len(stream)))


def training_examples(rows: list[dict], tokenizer, cfg: Config) -> list[dict]:
    """Tokenised examples for train.objective, never packed: one per SFT row, or CPT blocks.

    Validation loss (generation.validation_loss) is computed on these, so it is per row in every packing mode."""
    if cfg.train.objective == "cpt":
        return cpt_blocks(rows, tokenizer, cfg.data.max_length)
    return tokenize_sft(rows, tokenizer, cfg)


def packed_training_examples(rows: list[dict], tokenizer, cfg: Config) -> list[dict]:
    """What the trainer trains on: training_examples packed per data.packing (constant_blocks, pack_rows)."""
    if cfg.train.objective == "cpt" or cfg.data.packing == "none":
        return training_examples(rows, tokenizer, cfg)
    if cfg.data.packing == "constant":
        return constant_blocks(rows, tokenizer, cfg)
    return pack_rows(tokenize_sft(rows, tokenizer, cfg), cfg.data.max_length)


def run(cfg: Config, store=None) -> PreparedData:
    """`loraflow prepare`: prepare the data in an MLflow run and log counts, samples and the dataset."""
    import mlflow

    from loraflow import tracking

    store = store or tracking.connect(cfg=cfg)
    with tracking.stage_run(cfg, "prepare", store):
        mlflow.log_params(tracking.flat_params(cfg))
        prepared = prepare(cfg)
        log_prepared(cfg, prepared)
    return prepared


def log_split_input(cfg: Config, prepared: PreparedData, split: str) -> None:
    """One split as an MLflow dataset input of the active run (context `train`, `eval` or `test`)."""
    import mlflow
    import pandas as pd

    source = prepared.source if Path(prepared.source).is_file() else None
    dataset = mlflow.data.from_pandas(pd.DataFrame(prepared.splits[split]), source=source, name=f"{cfg.name}-{split}")
    context = split if split != "validation" else "eval"
    try:
        mlflow.log_input(dataset, context=context)
    except mlflow.exceptions.MlflowException:
        # The store looks the dataset up by (experiment, name, digest), then inserts it: a worker that stored
        # the same split in between makes the insert a duplicate key. Asked again, the store finds it.
        mlflow.log_input(dataset, context=context)


def log_prepared(cfg: Config, prepared: PreparedData) -> None:
    """Counts as metrics, the digest as a tag, each split as an MLflow dataset input and a JSONL artifact."""
    import mlflow

    from loraflow.tracking import Tags

    mlflow.log_metrics({f"data/{key}": value for key, value in prepared.counts.items()})
    mlflow.set_tags({Tags.DATA_DIGEST: prepared.digest, Tags.DATA_SOURCE: prepared.source})
    for split, rows in prepared.splits.items():
        if not rows:
            continue
        log_split_input(cfg, prepared, split)
        mlflow.log_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:20]) + "\n",
                        f"data/sample_{split}.jsonl")
