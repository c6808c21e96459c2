"""Reading the user's data: files, `datasets` folders, Hub data sets, and the conversations in records.

    records, malformed, source, digest = readers.load_records(cfg)        # what data.prepare starts from
    fmt = readers.detect_format(Path("rows.json"), "auto")                # json or jsonl, by the first line
    messages = readers.conversation([{"from": "human", "value": "Hi"}])  # [{"role": "user", "content": "Hi"}]

Sources (data.path, data.format): a JSON array, JSON lines, CSV/TSV or plain text (one record per
paragraph) read strictly in data.encoding; a Parquet or Arrow file; a folder written by
`datasets.save_to_disk` (a Dataset, or a DatasetDict whose data.split is read); `hf:NAME` or
`hub:NAME[:CONFIG]`, read with `datasets.load_dataset` (data.split; offline, only from the local cache);
`builtin:catalogue`. The digest covers the data and every reading setting: a file's bytes, a folder's
files' bytes in sorted order, a Hub data set's name, config, split and fingerprint.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import itertools
import json
import re
from pathlib import Path

from loraflow import LoraflowError
from loraflow.config import Config
from loraflow.data.catalogue import catalogue_rows

SUFFIX_FORMATS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv", ".txt": "txt",
                  ".md": "txt", "": "txt", ".parquet": "parquet", ".arrow": "arrow"}
HUB_PREFIXES = ("hf:", "hub:")
DATASET_FILES = ("dataset_info.json", "state.json")  # what datasets.Dataset.save_to_disk writes beside its arrow files
DATASET_DICT_FILE = "dataset_dict.json"  # what DatasetDict.save_to_disk writes, beside one folder per split
# OpenAI roles and the ShareGPT names for them (`{"from": "human", "value": ...}`).
CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant"}


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
    """data.format, or for `auto` the one the suffix names (`.json`: an array if it starts with `[`, else
    lines); a folder is a `datasets.save_to_disk` folder (hf_disk)."""
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "hf_disk"
    suffix = path.suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        raise LoraflowError(f"cannot tell the format of {path.name}: set data.format to json, jsonl, csv, txt, "
                            "parquet or arrow")
    if suffix == ".json":
        first = next((line for line in decoded_lines(path, encoding) if line.strip()), "")
        return "json" if first.lstrip().startswith("[") else "jsonl"
    return SUFFIX_FORMATS[suffix]


def read_records(path: Path, fmt: str, encoding: str = "utf-8") -> tuple[list[dict], int]:
    """Records from a file (text read strictly in `encoding`) and the number of malformed ones skipped."""
    if fmt in ("parquet", "arrow"):
        return read_table_file(path, fmt), 0
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


def read_table_file(path: Path, fmt: str) -> list[dict]:
    """The rows of a Parquet file, or of an Arrow IPC file (the stream format `datasets` writes, or the
    random-access file format), as dicts. Read with pyarrow: datasets.Dataset.from_parquet would copy the
    file into the Hugging Face cache first."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            return pq.read_table(path).to_pylist()
        with pa.memory_map(str(path)) as source:
            try:
                return pa.ipc.open_stream(source).read_all().to_pylist()
            except pa.ArrowInvalid:
                source.seek(0)
                return pa.ipc.open_file(source).read_all().to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise LoraflowError(f"cannot read {path} as {fmt}: {first_line(exc)}") from None


def first_line(exc: Exception) -> str:
    """An exception's message for a one-line error (its type when it has none)."""
    return (str(exc).strip() or type(exc).__name__).splitlines()[0]


def disk_dataset_folder(folder: Path, split: str) -> Path:
    """The Dataset folder to read in a `save_to_disk` folder: itself, or a DatasetDict's `split`."""
    if all((folder / name).is_file() for name in DATASET_FILES):
        return folder
    if (folder / DATASET_DICT_FILE).is_file():
        try:
            splits = json.loads((folder / DATASET_DICT_FILE).read_text())["splits"]
        except (ValueError, KeyError, TypeError):
            raise LoraflowError(f"cannot read {folder / DATASET_DICT_FILE}: expected {{\"splits\": [...]}}") from None
        if split not in splits:
            raise LoraflowError(f"{folder} has no split {split!r} (its splits: {', '.join(map(str, splits))}); "
                                "set data.split")
        return disk_dataset_folder(folder / split, split)
    raise LoraflowError(f"{folder} is a folder but not one datasets.save_to_disk wrote (no "
                        f"{' and '.join(DATASET_FILES)} nor {DATASET_DICT_FILE}); give a data file or such a folder")


def read_disk_folder(folder: Path, split: str) -> tuple[list[dict], Path]:
    """(rows, the Dataset folder read) of a `datasets.save_to_disk` folder."""
    import datasets

    dataset_folder = disk_dataset_folder(folder, split)
    try:
        return datasets.load_from_disk(str(dataset_folder)).to_list(), dataset_folder
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as exc:
        raise LoraflowError(f"cannot read {dataset_folder} as a datasets folder: {first_line(exc)}") from None


def hub_reference(path: str, fmt: str) -> tuple[str, str | None] | None:
    """(name, config) of a Hub data set (`hf:NAME`, `hub:NAME[:CONFIG]`, or any name with data.format=hub)."""
    prefix = next((p for p in HUB_PREFIXES if path.startswith(p)), None)
    if prefix is None and fmt != "hub":
        return None
    name, _, config = path.removeprefix(prefix or "").partition(":")
    return name, config or None


def read_hub(name: str, config: str | None, split: str) -> tuple[list[dict], str]:
    """(rows, fingerprint) of a Hub data set's split, via datasets.load_dataset; offline (HF_HUB_OFFLINE=1)
    only a copy in the local cache can be read, and a missing one fails at once rather than retrying."""
    import datasets

    label = name + (f" (config {config})" if config else "")
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except ConnectionError as exc:
        where = ("it cannot be reached offline (HF_HUB_OFFLINE=1) and is not in the local cache"
                 if datasets.config.HF_HUB_OFFLINE else "the Hub cannot be reached (no network?)")
        raise LoraflowError(f"cannot load data set {label} from the Hugging Face Hub: {where}; "
                            f"{first_line(exc)}") from None
    except (datasets.exceptions.DatasetsError, ValueError, FileNotFoundError) as exc:
        raise LoraflowError(f"cannot load data set {label} from the Hugging Face Hub: {first_line(exc)}") from None
    # The (private) fingerprint hashes the split and the cache folder's name: data set, config, version and
    # the Hub commit the files came from (datasets.builder._get_dataset_fingerprint).
    return dataset.to_list(), dataset._fingerprint


def folder_digest(folder: Path, extra: str = "") -> str:
    """sha256 (16 hex) of a folder's files, each its relative path and bytes, in sorted order, plus `extra`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    digest.update(extra.encode())
    return digest.hexdigest()[:16]


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_records(cfg: Config) -> tuple[list[dict], int, str, str]:
    """(records, malformed count, source description, digest) for data.path."""
    from loraflow.tracking import file_digest

    data = cfg.data
    # Every data setting (encoding, strip_html, templates, split, ...) is part of the digest.
    settings = json.dumps({k: v for k, v in vars(data).items() if k != "path"}, sort_keys=True) + cfg.train.objective
    if data.path.startswith("builtin:"):
        if data.path != "builtin:catalogue":
            raise LoraflowError(f"unknown built-in data set {data.path!r} (there is builtin:catalogue)")
        records = catalogue_rows(data.builtin_rows, seed=0)
        return records, 0, data.path, text_digest(json.dumps(records) + settings)
    hub = hub_reference(data.path, data.format)
    if hub:
        records, fingerprint = read_hub(*hub, data.split)
        return records, 0, data.path, text_digest(json.dumps([*hub, data.split, fingerprint]) + settings)
    path = cfg.resolve_path(data.path)
    if not path.exists():
        raise LoraflowError(f"data file not found: {path}")
    fmt = detect_format(path, data.format, data.encoding)
    if path.is_dir() != (fmt == "hf_disk"):
        raise LoraflowError(f"{path} is a {'folder' if path.is_dir() else 'file'}, but data.format {fmt} reads "
                            f"{'a folder' if fmt == 'hf_disk' else 'a file'}")
    if fmt == "hf_disk":
        records, folder = read_disk_folder(path, data.split)
        return records, 0, str(folder), folder_digest(folder, settings)
    records, malformed = read_records(path, fmt, data.encoding)
    return records, malformed, str(path), file_digest(path, settings)


def conversation(messages) -> list[dict] | None:
    """A record's conversation as [{"role", "content"}] (OpenAI roles; ShareGPT's `from`/`value` with
    human/gpt mapped to user/assistant), or None if it is not one: not a list, a message without a
    known role, or content that is not text."""
    if not isinstance(messages, list) or not messages:
        return None
    turns = []
    for message in messages:
        if not isinstance(message, dict):
            return None
        role = CHAT_ROLES.get(str(message.get("role") or message.get("from") or "").lower())
        content = message.get("content") if message.get("content") is not None else message.get("value")
        if role is None or not isinstance(content, str):
            return None
        turns.append({"role": role, "content": content})
    return turns
