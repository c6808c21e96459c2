"""From records to rows: normalise, fill the templates, drop and count bad rows, split by prompt.

    prepared = prepare(cfg)                       # rows per split + counts + digest

Sources (files, save_to_disk folders, the Hub, builtin:catalogue) are read by `readers`. Field
values stay as written apart from HTML entities (unescaped) and, with data.strip_html, HTML tags. A
template's `[[...]]` part is left out when a field in it is empty; the other fields are required.
Malformed, empty and duplicate rows are dropped and counted; rows that share a prompt go whole into one split.

Chat data (data.messages_field): a row's prompt is its conversation before the last assistant turn, as
JSON, and its target that turn's text.
"""
from __future__ import annotations

import html
import json
import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field

from loraflow import LoraflowError
from loraflow.config import OPTIONAL_PART, Config, DataConfig
from loraflow.data.readers import conversation, load_records

SPLITS = ("train", "validation", "test")
# Only these names count as HTML tags, so `<start_of_turn>`, `<unk>`, `</s>` or `x <y> z` survive data.strip_html.
INLINE_ELEMENTS = set("a abbr b bdi bdo big cite code data del dfn em font i img ins kbd mark q samp small span "
                      "strike strong sub sup time tt u var wbr".split())
BLOCK_ELEMENTS = set("address article aside blockquote body br button caption center dd details div dl dt figure "
                     "footer form h1 h2 h3 h4 h5 h6 head header hr html iframe input label li link main meta nav "
                     "ol option p pre script section select source style table tbody td textarea th thead title "
                     "tr ul video".split())
HTML_TAG = re.compile(r"<!--.*?-->|<!doctype[^>]*>|</?([a-z][a-z0-9]*)(?:\s[^<>]*)?/?>", re.IGNORECASE | re.DOTALL)


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
