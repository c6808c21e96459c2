"""Data preparation: read, normalise, count bad rows, split, format prompts, tokenise.

    loraflow prepare quickstart
    prepared = data.prepare(cfg)                       # rows per split + counts + digest
    examples = data.tokenize_sft(rows, tokenizer, cfg)  # prompt tokens masked out of the loss

Supported files: JSON array, JSON lines, CSV, plain text (one record per paragraph), and the
synthetic `builtin:catalogue`. Malformed, empty and duplicate rows are dropped and counted.
"""
from __future__ import annotations

import csv
import html
import json
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from loraflow import LoraflowError
from loraflow.catalogue import catalogue_rows
from loraflow.config import Config, DataConfig

SPLITS = ("train", "validation", "test")
IGNORE_INDEX = -100


@dataclass
class PreparedData:
    """Rows per split ({"prompt", "target"} for SFT, {"text"} for CPT) and how they were obtained."""
    splits: dict[str, list[dict]]
    counts: dict[str, int]
    digest: str
    source: str
    fields: list[str] = field(default_factory=list)


def normalise_text(text) -> str:
    """Unescape HTML entities (twice, for `&amp;amp;`), drop tags, fold whitespace."""
    text = html.unescape(html.unescape(str(text)))
    text = re.sub(r"<[^>]{1,80}>", " ", text)
    return re.sub(r"\s+", " ", text).strip()


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        head = path.read_text(errors="replace")[:4096].lstrip()
        return "json" if head.startswith("[") else "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix in (".txt", ".md", ""):
        return "txt"
    raise LoraflowError(f"cannot tell the format of {path.name}: set data.format to json, jsonl, csv or txt")


def read_records(path: Path, fmt: str) -> tuple[list[dict], int]:
    """Records from a file and the number of malformed ones skipped."""
    try:
        if fmt == "jsonl":
            return read_json_lines(path)
        if fmt == "json":
            loaded = json.loads(path.read_text())
            if not isinstance(loaded, list):
                raise LoraflowError(f"{path}: a JSON file must hold an array of objects")
            records = [item for item in loaded if isinstance(item, dict)]
            return records, len(loaded) - len(records)
        if fmt == "csv":
            with open(path, newline="", encoding="utf-8") as handle:
                dialect = csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel
                records = list(csv.DictReader(handle, dialect=dialect))
            good = [r for r in records if None not in r and None not in r.values()]
            return good, len(records) - len(good)
        paragraphs = re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace"))
        return [{"text": p} for p in paragraphs if p.strip()], 0
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise LoraflowError(f"cannot read {path} as {fmt}: {str(exc).splitlines()[0]}") from None


def read_json_lines(path: Path) -> tuple[list[dict], int]:
    records, malformed = [], 0
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                malformed += 1
                continue
            if isinstance(record, dict):
                records.append(record)
            else:
                malformed += 1
    if not records and malformed:
        raise LoraflowError(f"cannot read {path} as JSON lines: none of its {malformed} lines is a JSON object")
    return records, malformed


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def templates_for(cfg: Config) -> tuple[str, str]:
    data = cfg.data
    return (data.prompt_template or "{" + data.prompt_field + "}",
            data.target_template or "{" + data.target_field + "}")


def check_fields_exist(records: list[dict], needed: list[str], path: str) -> None:
    available = set().union(*(r.keys() for r in records[:200])) if records else set()
    missing = [name for name in needed if name not in available]
    if missing:
        raise LoraflowError(f"field {', '.join(map(repr, missing))} not found in {path} "
                            f"(available: {', '.join(sorted(available)) or 'none'})")


def records_to_rows(records: list[dict], cfg: Config, counts: dict, source: str) -> list[dict]:
    """Fill the templates (SFT) or take the text field (CPT); count and drop empty and duplicate rows."""
    if cfg.train.objective == "cpt":
        check_fields_exist(records, [cfg.data.text_field], source)
        templates = {"text": "{" + cfg.data.text_field + "}"}
    else:
        prompt_template, target_template = templates_for(cfg)
        check_fields_exist(records, template_fields(prompt_template) + template_fields(target_template), source)
        templates = {"prompt": prompt_template, "target": target_template}
    rows, seen = [], set()
    for record in records:
        values = {k: normalise_text(v) if v is not None else "" for k, v in record.items()}
        try:
            row = {key: template.format(**values).strip() for key, template in templates.items()}
        except (KeyError, IndexError, ValueError):
            counts["rows_dropped_malformed"] += 1
            continue
        raw_values = [values.get(name, "") for t in templates.values() for name in template_fields(t)]
        last = row.get("target", row.get("text", ""))
        if any(not v for v in raw_values) or len(last) < cfg.data.min_target_chars:
            counts["rows_dropped_empty"] += 1
            continue
        key = tuple(row.values())
        if key in seen:
            counts["rows_dropped_duplicate"] += 1
            continue
        seen.add(key)
        rows.append(row)
    return rows


def split_rows(rows: list[dict], data: DataConfig) -> dict[str, list[dict]]:
    """A deterministic shuffle by data.split_seed, then test, validation and train slices."""
    order = list(range(len(rows)))
    random.Random(data.split_seed).shuffle(order)
    shuffled = [rows[i] for i in order]
    n_test = round(len(rows) * data.test_fraction) if data.test_fraction else 0
    n_val = round(len(rows) * data.val_fraction) if data.val_fraction else 0
    if len(rows) >= 3:
        n_test = max(n_test, 1 if data.test_fraction else 0)
        n_val = max(n_val, 1 if data.val_fraction else 0)
    return {"test": shuffled[:n_test], "validation": shuffled[n_test:n_test + n_val],
            "train": shuffled[n_test + n_val:]}


def load_records(cfg: Config) -> tuple[list[dict], int, str, str]:
    """(records, malformed count, source description, digest) for data.path."""
    from loraflow.tracking import file_digest

    settings = json.dumps({k: v for k, v in vars(cfg.data).items() if k != "path"}, sort_keys=True)
    settings += cfg.train.objective
    if cfg.data.path.startswith("builtin:"):
        if cfg.data.path != "builtin:catalogue":
            raise LoraflowError(f"unknown built-in data set {cfg.data.path!r} (there is builtin:catalogue)")
        records = catalogue_rows(cfg.data.builtin_rows, seed=0)
        import hashlib
        digest = hashlib.sha256((json.dumps(records) + settings).encode()).hexdigest()[:16]
        return records, 0, cfg.data.path, digest
    path = cfg.resolve_path(cfg.data.path)
    if not path.is_file():
        raise LoraflowError(f"data file not found: {path}")
    records, malformed = read_records(path, detect_format(path, cfg.data.format))
    return records, malformed, str(path), file_digest(path, settings)


def prepare(cfg: Config) -> PreparedData:
    """Read data.path, normalise, drop and count bad rows, split. Raises LoraflowError if nothing is left."""
    records, malformed, source, digest = load_records(cfg)
    if cfg.data.max_rows:
        records = records[:cfg.data.max_rows]
    counts = {"rows_read": len(records) + malformed, "rows_dropped_malformed": malformed,
              "rows_dropped_empty": 0, "rows_dropped_duplicate": 0}
    rows = records_to_rows(records, cfg, counts, source)
    counts["rows_kept"] = len(rows)
    if not rows:
        raise LoraflowError(f"no usable rows left in {source} after dropping empty, malformed and duplicate rows")
    splits = split_rows(rows, cfg.data)
    if not splits["train"]:
        raise LoraflowError(f"only {len(rows)} usable rows in {source}: too few to split off a training set")
    counts.update({f"rows_{name}": len(part) for name, part in splits.items()})
    fields = sorted(set().union(*(r.keys() for r in records[:200])))
    return PreparedData(splits=splits, counts=counts, digest=digest, source=source, fields=fields)


def format_prompt(tokenizer, prompt: str, cfg: Config) -> str:
    """The text the model sees before the target: chat-formatted when configured and available."""
    if cfg.model.kind == "causal" and cfg.data.chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else []
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if cfg.model.kind == "seq2seq":
        return prompt
    return prompt + "\n"


def end_of_target(tokenizer, cfg: Config) -> str:
    """What closes a target in training: the chat end-of-turn token, else the eos token."""
    return (tokenizer.eos_token or "") if cfg.model.kind == "causal" else ""


def prompt_token_ids(tokenizer, prompt: str, cfg: Config) -> list[int]:
    """The token ids a causal model sees before the target (training and generation alike)."""
    ids = tokenizer(format_prompt(tokenizer, prompt, cfg), add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def fit_to_length(prompt_ids: list[int], target_ids: list[int], max_length: int) -> tuple[list, list]:
    """Cut an example to max_length: the target keeps its start (at most half the room when the prompt
    needs the rest), the prompt keeps its end, next to the answer."""
    if len(prompt_ids) + len(target_ids) <= max_length:
        return prompt_ids, target_ids
    target_room = max(max_length - len(prompt_ids), min(len(target_ids), max_length // 2))
    target_ids = target_ids[:target_room]
    return prompt_ids[len(prompt_ids) - (max_length - len(target_ids)):], target_ids


def tokenize_sft(rows: list[dict], tokenizer, cfg: Config) -> list[dict]:
    """input_ids/labels per row; labels are -100 on the prompt, so only the target is learned."""
    if cfg.model.kind == "seq2seq":
        return [tokenize_seq2seq(row, tokenizer, cfg) for row in rows]
    examples = []
    for row in rows:
        prompt_ids = prompt_token_ids(tokenizer, row["prompt"], cfg)
        target_ids = tokenizer(row["target"] + end_of_target(tokenizer, cfg), add_special_tokens=False)["input_ids"]
        prompt_ids, target_ids = fit_to_length(prompt_ids, target_ids, cfg.data.max_length)
        input_ids = prompt_ids + target_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + target_ids
        if any(label != IGNORE_INDEX for label in labels):
            examples.append({"input_ids": input_ids, "labels": labels})
    return examples


def tokenize_seq2seq(row: dict, tokenizer, cfg: Config) -> dict:
    source = tokenizer(format_prompt(tokenizer, row["prompt"], cfg), truncation=True, max_length=cfg.data.max_length)
    target = tokenizer(text_target=row["target"], truncation=True, max_length=cfg.data.max_length)
    return {"input_ids": source["input_ids"], "labels": target["input_ids"]}


def pack_examples(examples: list[dict], block_size: int) -> list[dict]:
    """Concatenate examples and cut into full blocks of block_size (the tail shorter than a block is dropped)."""
    input_ids = [t for e in examples for t in e["input_ids"]]
    labels = [t for e in examples for t in e["labels"]]
    blocks = []
    for start in range(0, len(input_ids) - block_size + 1, block_size):
        block_labels = labels[start:start + block_size]
        if any(label != IGNORE_INDEX for label in block_labels):
            blocks.append({"input_ids": input_ids[start:start + block_size], "labels": block_labels})
    return blocks or examples


def cpt_blocks(rows: list[dict], tokenizer, block_size: int) -> list[dict]:
    """Raw text joined with eos and cut into fixed-length blocks for continued pretraining."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream = []
    for row in rows:
        stream += tokenizer(row["text"], add_special_tokens=False)["input_ids"] + separator
    size = min(block_size, len(stream))
    return [{"input_ids": stream[i:i + size], "labels": stream[i:i + size]}
            for i in range(0, len(stream) - size + 1, size)]


def training_examples(rows: list[dict], tokenizer, cfg: Config) -> list[dict]:
    """Tokenised examples for train.objective: SFT rows (optionally packed) or CPT blocks."""
    if cfg.train.objective == "cpt":
        return cpt_blocks(rows, tokenizer, cfg.data.max_length)
    examples = tokenize_sft(rows, tokenizer, cfg)
    return pack_examples(examples, cfg.data.max_length) if cfg.data.packing else examples


def run(cfg: Config) -> PreparedData:
    """`loraflow prepare`: prepare the data in an MLflow run and log counts, samples and the dataset."""
    from loraflow import tracking

    with tracking.stage_run(cfg, "prepare"):
        prepared = prepare(cfg)
        log_prepared(cfg, prepared)
    return prepared


def log_prepared(cfg: Config, prepared: PreparedData) -> None:
    """Counts as metrics, the digest as a tag, each split as an MLflow dataset input and a JSONL artifact."""
    import mlflow
    import pandas as pd

    mlflow.log_metrics({f"data/{key}": value for key, value in prepared.counts.items()})
    mlflow.set_tag("loraflow.data_digest", prepared.digest)
    mlflow.set_tag("loraflow.data_source", prepared.source)
    for split, rows in prepared.splits.items():
        if not rows:
            continue
        frame = pd.DataFrame(rows)
        source = prepared.source if Path(prepared.source).is_file() else None
        dataset = mlflow.data.from_pandas(frame, source=source, name=f"{cfg.name}-{split}")
        mlflow.log_input(dataset, context=split if split != "validation" else "eval")
        mlflow.log_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:20]) + "\n",
                        f"data/sample_{split}.jsonl")
