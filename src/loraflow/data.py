"""Data preparation: read, normalise, count bad rows, split, format prompts, tokenise.

    loraflow prepare quickstart
    prepared = data.prepare(cfg)                       # rows per split + counts + digest
    examples = data.tokenize_sft(rows, tokenizer, cfg)  # prompt tokens masked out of the loss
    blocks = data.packed_training_examples(rows, tokenizer, cfg)  # what the trainer gets, per data.packing

Supported files: JSON array, JSON lines, CSV, plain text (one record per paragraph), read strictly in
data.encoding, and the synthetic `builtin:catalogue`. Field values stay as written apart from HTML
entities (unescaped) and, with data.strip_html, HTML tags. Malformed, empty and duplicate rows are
dropped and counted; rows that share a prompt go whole into one split.

Packing (data.packing, SFT on causal models) changes what the trainer gets, never the validation rows:
`constant` joins every row's whole text with eos and cuts fixed blocks (every token learned, rows see
each other); `rows` packs whole rows into blocks with position ids restarting at each row, so eager, sdpa
and flex attention keep each row to itself (flash attention only at train.batch_size=1: pad_row_blocks).
"""
from __future__ import annotations

import bisect
import codecs
import csv
import html
import itertools
import json
import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from loraflow import LoraflowError
from loraflow.catalogue import catalogue_rows
from loraflow.config import Config, DataConfig

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
SUFFIX_FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv", ".txt": "txt",
                  ".md": "txt", "": "txt"}


@dataclass
class PreparedData:
    """Rows per split ({"prompt", "target"} for SFT, {"text"} for CPT) and how they were obtained."""
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


def reading_encoding(encoding: str) -> str:
    """The codec that reads data.encoding: utf-8 as utf-8-sig, which drops a byte-order mark."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise LoraflowError(f"unknown data.encoding {encoding!r} (e.g. utf-8, latin-1, cp1252)") from None
    return "utf-8-sig" if name == "utf-8" else name


def decoded_lines(path: Path, encoding: str):
    """The lines of a file, ends kept, decoded strictly (a byte-order mark dropped).

    Raises LoraflowError naming the line where a byte does not decode."""
    decoder = codecs.getincrementaldecoder(reading_encoding(encoding))(errors="strict")
    pending, line_number = "", 0
    with open(path, "rb") as handle:
        for chunk in itertools.chain(handle, [b""]):
            try:
                pending += decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                raise LoraflowError(f"cannot read {path}: line {line_number + 1} is not valid {encoding} "
                                    f"({exc.reason}: {exc.object[exc.start:exc.end]!r}); set data.encoding "
                                    f"to the file's encoding (e.g. latin-1 or cp1252)") from None
            if not line_number:
                pending = pending.removeprefix("\ufeff")
            *lines, pending = pending.split("\n")
            for line in lines:
                line_number += 1
                yield line + "\n"
    if pending:
        yield pending


def detect_format(path: Path, fmt: str, encoding: str = "utf-8") -> str:
    """data.format, or for `auto` the one the suffix names (`.json`: an array if it starts with `[`, else lines)."""
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        raise LoraflowError(f"cannot tell the format of {path.name}: set data.format to json, jsonl, csv or txt")
    if suffix == ".json":
        first = next((line for line in decoded_lines(path, encoding) if line.strip()), "")
        return "json" if first.lstrip().startswith("[") else "jsonl"
    return SUFFIX_FORMATS[suffix]


def read_records(path: Path, fmt: str, encoding: str = "utf-8") -> tuple[list[dict], int]:
    """Records from a file read strictly in `encoding` and the number of malformed ones skipped."""
    lines = decoded_lines(path, encoding)
    try:
        if fmt == "jsonl":
            return read_json_lines(lines, path)
        if fmt == "json":
            loaded = json.loads("".join(lines))
            if not isinstance(loaded, list):
                raise LoraflowError(f"{path}: a JSON file must hold an array of objects")
            records = [item for item in loaded if isinstance(item, dict)]
            return records, len(loaded) - len(records)
        if fmt == "csv":
            dialect = csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel
            records = list(csv.DictReader(lines, dialect=dialect))
            good = [r for r in records if None not in r and None not in r.values()]
            return good, len(records) - len(good)
        paragraphs = re.split(r"\n\s*\n", "".join(lines).replace("\r\n", "\n"))
        return [{"text": p} for p in paragraphs if p.strip()], 0
    except (json.JSONDecodeError, csv.Error) as exc:
        raise LoraflowError(f"cannot read {path} as {fmt}: {str(exc).splitlines()[0]}") from None


def read_json_lines(lines, path: Path) -> tuple[list[dict], int]:
    records, malformed = [], 0
    for line in filter(str.strip, lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
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
    """Fill the templates (SFT) or take the text field (CPT); count and drop empty and duplicate rows.

    A duplicate has the prompt and target (or text) of an earlier row, compared by `comparison_key`."""
    if cfg.train.objective == "cpt":
        check_fields_exist(records, [cfg.data.text_field], source)
        templates = {"text": "{" + cfg.data.text_field + "}"}
    else:
        prompt_template, target_template = templates_for(cfg)
        check_fields_exist(records, template_fields(prompt_template) + template_fields(target_template), source)
        templates = {"prompt": prompt_template, "target": target_template}
    needed = [name for template in templates.values() for name in template_fields(template)]
    rows, seen = [], set()
    for record in records:
        values = {k: normalise_text(v, strip_html=cfg.data.strip_html) if v is not None else ""
                  for k, v in record.items()}
        try:
            row = {key: template.format(**values).strip() for key, template in templates.items()}
        except (KeyError, IndexError, ValueError):
            counts["rows_dropped_malformed"] += 1
            continue
        last = row.get("target", row.get("text", ""))
        if any(not values.get(name) for name in needed) or len(last) < cfg.data.min_target_chars:
            counts["rows_dropped_empty"] += 1
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


def sample_records(records: list[dict], max_rows: int, seed: int) -> list[dict]:
    """data.max_rows records drawn at random (seeded; in file order), not the head of the file."""
    if not max_rows or len(records) <= max_rows:
        return records
    return [records[i] for i in sorted(random.Random(seed).sample(range(len(records)), max_rows))]


def load_records(cfg: Config) -> tuple[list[dict], int, str, str]:
    """(records, malformed count, source description, digest) for data.path."""
    from loraflow.tracking import file_digest

    # Every data setting (encoding, strip_html, templates, ...) is part of the digest.
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
    records, malformed = read_records(path, detect_format(path, cfg.data.format, cfg.data.encoding),
                                      cfg.data.encoding)
    return records, malformed, str(path), file_digest(path, settings)


def prepare(cfg: Config) -> PreparedData:
    """Read data.path, normalise, drop and count bad rows, split. Raises LoraflowError if nothing is left."""
    records, malformed, source, digest = load_records(cfg)
    records = sample_records(records, cfg.data.max_rows, cfg.data.split_seed)
    counts = {"rows_read": len(records) + malformed, "rows_dropped_malformed": malformed,
              "rows_dropped_empty": 0, "rows_dropped_duplicate": 0}
    rows = records_to_rows(records, cfg, counts, source)
    counts["rows_kept"] = len(rows)
    if not rows:
        raise LoraflowError(f"no usable rows left in {source} after dropping empty, malformed and duplicate rows")
    cpt = cfg.train.objective == "cpt"
    if not cpt:
        sizes = Counter(comparison_key(row["prompt"]) for row in rows)
        counts.update(prompts_distinct=len(sizes), rows_sharing_a_prompt=sum(n for n in sizes.values() if n > 1))
    splits = split_rows(rows, cfg.data, group_by="text" if cpt else "prompt")
    if not splits["train"]:
        prompts = "" if cpt else f" ({counts['prompts_distinct']} distinct prompts)"
        raise LoraflowError(f"only {len(rows)} usable rows{prompts} in {source}: too few to split off a training set")
    counts.update({f"rows_{name}": len(part) for name, part in splits.items()})
    fields = sorted(set().union(*(r.keys() for r in records[:200])))
    return PreparedData(splits=splits, counts=counts, digest=digest, source=source, fields=fields)


def uses_chat_template(tokenizer, cfg: Config) -> bool:
    """Whether prompts are wrapped in the tokenizer's chat template (causal model, data.chat_template, one exists)."""
    return cfg.model.kind == "causal" and cfg.data.chat_template and bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, prompt: str, cfg: Config) -> str:
    """The text the model sees before the target: chat-formatted when configured and available."""
    if uses_chat_template(tokenizer, cfg):
        messages = [{"role": "system", "content": cfg.data.system_prompt}] if cfg.data.system_prompt else []
        messages.append({"role": "user", "content": prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
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
    bos = tokenizer.bos_token_id
    # The attribute misses tokenizers whose post-processor adds bos (Llama 3 in transformers 5): ask it.
    adds_bos = getattr(tokenizer, "add_bos_token", False) or tokenizer("")["input_ids"][:1] == [bos]
    if bos is not None and adds_bos and ids[:1] != [bos]:
        ids = [bos] + ids
    return ids


def fit_to_length(prompt_ids: list[int], target_ids: list[int], max_length: int) -> tuple[list, list]:
    """Cut an example to max_length: the target keeps its start (at most half the room when the prompt
    needs the rest), the prompt keeps its end, next to the answer."""
    if len(prompt_ids) + len(target_ids) <= max_length:
        return prompt_ids, target_ids
    target_room = max(max_length - len(prompt_ids), min(len(target_ids), max_length // 2))
    target_ids = target_ids[:target_room]
    return prompt_ids[len(prompt_ids) - (max_length - len(target_ids)):], target_ids


def sft_token_ids(rows: list[dict], tokenizer, cfg: Config):
    """(prompt ids, target ids) per row, uncut: the prompt as the model sees it, the target with its end token."""
    end = end_of_target(tokenizer, cfg)
    for row in rows:
        yield (prompt_token_ids(tokenizer, row["prompt"], cfg),
               tokenizer(row["target"] + end, add_special_tokens=False)["input_ids"])


def tokenize_sft(rows: list[dict], tokenizer, cfg: Config) -> list[dict]:
    """input_ids/labels per row; labels are -100 on the prompt, so only the target is learned."""
    if cfg.model.kind == "seq2seq":
        return [tokenize_seq2seq(row, tokenizer, cfg) for row in rows]
    examples = []
    for prompt_ids, target_ids in sft_token_ids(rows, tokenizer, cfg):
        prompt_ids, target_ids = fit_to_length(prompt_ids, target_ids, cfg.data.max_length)
        labels = [IGNORE_INDEX] * len(prompt_ids) + target_ids
        if any(label != IGNORE_INDEX for label in labels):
            examples.append({"input_ids": prompt_ids + target_ids, "labels": labels})
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
    for prompt_ids, target_ids in sft_token_ids(rows, tokenizer, cfg):
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
    mlflow.log_input(dataset, context=split if split != "validation" else "eval")


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
