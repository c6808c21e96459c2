"""Data preparation: formats, normalisation, bad-row accounting, splits, labels, CPT blocks (packing:
test_packing.py)."""
from __future__ import annotations

import json

import pytest
from helpers import runs_of

from loraflow import LoraflowError, data
from loraflow.config import from_dict
from loraflow.data import readers
from loraflow.models import load_tokenizer
from loraflow.tiny import CHAT_TEMPLATE, train_tokenizer


def config_for(path, **data_values):
    return from_dict({"name": "d", "data": {"path": str(path), "prompt_template": "Title: {title}",
                                            "target_template": "{content}", **data_values}})


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_rows_are_counted_and_dropped(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [
        json.dumps({"title": "Mug", "content": "A  red&amp;blue mug"}),
        "{not json",
        json.dumps({"title": "Mug", "content": "A red&amp;blue  mug"}),  # duplicate: spacing does not count
        json.dumps({"title": "Lamp", "content": "   "}),  # empty target
        json.dumps({"title": "Pot", "content": "A <b>clay</b> pot"}),
        json.dumps({"title": "Cup", "content": "A cup"}),
        json.dumps({"title": "Cup", "content": "A tall cup"}),  # same prompt, another target: kept
    ])
    prepared = data.prepare(config_for(path))
    split_counts = {name: prepared.counts.pop(f"rows_{name}") for name in data.SPLITS}
    assert prepared.counts == {"rows_read": 7, "rows_dropped_malformed": 1, "rows_dropped_empty": 1,
                               "rows_dropped_duplicate": 1, "rows_kept": 4, "prompts_distinct": 3,
                               "rows_sharing_a_prompt": 2}
    assert sum(split_counts.values()) == 4 and min(split_counts.values()) >= 1
    targets = sorted(r["target"] for split in prepared.splits.values() for r in split)
    assert targets == ["A  red&blue mug", "A <b>clay</b> pot", "A cup", "A tall cup"]  # as written, unescaped


def test_normalise_text_keeps_text_as_written():
    kept = ["<start_of_turn>user\nHi<end_of_turn>", "if a<b and c>d:\n    return  x", "Para one.\n\nPara two.",
            "x < y </s> <unk>"]
    assert [data.normalise_text(text) for text in kept] == kept
    assert data.normalise_text("  Tom &amp;amp; Jerry &lt;3 \n") == "Tom & Jerry <3"
    assert data.normalise_text("A <b>clay</b> pot") == "A <b>clay</b> pot"


@pytest.mark.parametrize("text, stripped", [
    ("<p>A <b>clay</b> pot</p><p>Glazed.</p>", "A clay pot Glazed."),
    ("Line<br/>next &lt;i&gt;here&lt;/i&gt;", "Line next here"),
    ("<ul>\n<li>One</li>\n<li>Two</li></ul>", "One\nTwo"),
    ('<!-- note --><span class="x">Cup</span>', "Cup"),
    ("<start_of_turn>user\nx < y </s> <unk>", "<start_of_turn>user\nx < y </s> <unk>"),  # not HTML elements
])
def test_strip_html_removes_html_tags_only(text, stripped):
    assert data.normalise_text(text, strip_html=True) == stripped


def test_strip_html_setting_and_the_digest(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [json.dumps({"title": f"Pot {i}", "content": f"A <b>clay</b> pot {i}"})
                                                 for i in range(5)])
    as_written, stripped = data.prepare(config_for(path)), data.prepare(config_for(path, strip_html=True))
    assert {r["target"] for s in as_written.splits.values() for r in s} == {f"A <b>clay</b> pot {i}" for i in range(5)}
    assert {r["target"] for s in stripped.splits.values() for r in s} == {f"A clay pot {i}" for i in range(5)}
    latin = data.prepare(config_for(path, encoding="latin-1"))
    assert len({as_written.digest, stripped.digest, latin.digest}) == 3  # a reading setting changes the digest


def test_cpt_text_keeps_its_lines_and_paragraphs(tmp_path):
    cpt = {"train": {"objective": "cpt"}, "registry": {"gate_metric": "loss"}}
    txt = tmp_path / "book.txt"
    txt.write_text("First line,\r\nwrapped  here.\r\n\r\nSecond paragraph.\n\n\nThird.\n")
    prepared = data.prepare(from_dict({"name": "d", "data": {"path": str(txt), "val_fraction": 0,
                                                             "test_fraction": 0}, **cpt}))
    assert sorted(r["text"] for r in prepared.splits["train"]) == ["First line,\nwrapped  here.", "Second paragraph.",
                                                                   "Third."]
    lines = write_jsonl(tmp_path / "docs.jsonl", [json.dumps({"text": "Para one.\n\nPara  two.\n"})])
    prepared = data.prepare(from_dict({"name": "d", "data": {"path": str(lines), "val_fraction": 0,
                                                             "test_fraction": 0}, **cpt}))
    assert prepared.splits["train"] == [{"text": "Para one.\n\nPara  two."}]


@pytest.mark.parametrize("suffix", ["json", "csv", "jsonl"])
def test_formats_read_the_same_rows(tmp_path, suffix):
    rows = [{"title": f"Item {i}", "content": f"Description {i}"} for i in range(20)]
    path = tmp_path / f"rows.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(rows))
    elif suffix == "jsonl":
        write_jsonl(path, [json.dumps(r) for r in rows])
    else:
        path.write_text("title,content\n" + "".join(f"{r['title']},{r['content']}\n" for r in rows))
    prepared = data.prepare(config_for(path))
    assert prepared.counts["rows_kept"] == 20
    assert {r["prompt"] for s in prepared.splits.values() for r in s} == {f"Title: Item {i}" for i in range(20)}


def test_split_is_deterministic_and_disjoint(tmp_path):
    cfg = from_dict({"name": "d", "data": {"path": "builtin:catalogue", "builtin_rows": 100,
                                           "prompt_template": "{title}", "target_template": "{content}"}})
    first, second = data.prepare(cfg), data.prepare(cfg)
    assert first.splits == second.splits and first.digest == second.digest
    prompts = [{r["prompt"] for r in first.splits[name]} for name in data.SPLITS]
    assert sum(map(len, prompts)) == 100 and not (prompts[0] & prompts[1]) and not (prompts[1] & prompts[2])
    other = from_dict({**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "split_seed": 7}})
    assert data.prepare(other).splits["test"] != first.splits["test"]


def test_sft_labels_mask_the_prompt(tiny_llama):
    cfg = from_dict({"name": "d", "data": {"path": "builtin:catalogue", "prompt_field": "title",
                                           "target_field": "content"}})
    tokenizer = load_tokenizer(str(tiny_llama))
    [example] = data.tokenize_sft([{"prompt": "Blue mug", "target": "A mug."}], tokenizer, cfg)
    prompt_len = len(tokenizer(data.format_prompt(tokenizer, "Blue mug", cfg), add_special_tokens=False)["input_ids"])
    assert example["labels"][:prompt_len] == [data.IGNORE_INDEX] * prompt_len
    assert example["labels"][prompt_len:] == example["input_ids"][prompt_len:]
    assert tokenizer.decode(example["labels"][prompt_len:]) == "A mug.<|im_end|>"


def test_cpt_blocks_have_fixed_length(tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama))
    cpt = data.cpt_blocks([{"text": "the red mug " * 30}, {"text": "an oak desk " * 30}], tokenizer, 16)
    assert cpt and all(len(b["input_ids"]) == 16 and b["labels"] == b["input_ids"] for b in cpt)


def test_missing_field_names_what_exists(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [json.dumps({"title": "Mug", "body": "A mug"})])
    with pytest.raises(LoraflowError, match=r"field 'content' not found .*available: body, title"):
        data.prepare(config_for(path))


def test_prepare_logs_counts_dataset_and_digest(tiny_llama, write_project, run_cli):
    code, out, err = run_cli("prepare", write_project(tiny_llama))
    assert code == 0, err
    assert "kept=60" in out
    [run] = runs_of()
    assert run.info.status == "FINISHED" and run.data.metrics["data/rows_kept"] == 60
    assert run.data.tags["loraflow.data_digest"] and run.data.tags["loraflow.stage"] == "prepare"
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"tiny-train", "tiny-validation", "tiny-test"}


def test_a_split_another_worker_stored_at_the_same_moment_is_logged_not_failed(tiny_llama, write_project, run_cli,
                                                                                monkeypatch):
    """Two workers logging the same split race in the store: both look the dataset up, find none, and the
    second insert is a duplicate key (an MLflow error). Injected here: the other worker's insert lands
    between this run's lookup and insert. The run still logs its three inputs, each dataset stored once."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    original, raced = SqlAlchemyStore._log_inputs_impl, []

    def other_worker_first(self, experiment_id, run_id, dataset_inputs=None, models=None):
        if not raced:
            other = self.create_run(experiment_id, "", 0, [], "other-worker")
            original(self, experiment_id, other.info.run_id, dataset_inputs, models)
            raced.append(dataset_inputs[0].dataset.name)
            raise MlflowException('(IntegrityError) duplicate key value violates unique constraint "dataset_pk"')
        return original(self, experiment_id, run_id, dataset_inputs, models)

    monkeypatch.setattr(SqlAlchemyStore, "_log_inputs_impl", other_worker_first)
    code, out, err = run_cli("prepare", write_project(tiny_llama))
    assert code == 0, err
    assert len(raced) == 1  # the first split logged met the race
    run = runs_of("prepare")[0]
    assert run.info.status == "FINISHED"
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"tiny-train", "tiny-validation", "tiny-test"}
    other = mlflow.search_runs(search_all_experiments=True, output_format="list",
                               filter_string="attributes.run_name = 'other-worker'")[0]
    [shared] = other.inputs.dataset_inputs
    [mine] = [i for i in run.inputs.dataset_inputs if i.dataset.name == raced[0]]
    assert (mine.dataset.name, mine.dataset.digest) == (shared.dataset.name, shared.dataset.digest)


def test_long_prompts_are_cut_from_the_left_and_keep_the_target():
    prompt, target = list(range(100)), [500, 501, 502]
    kept_prompt, kept_target = data.fit_to_length(prompt, target, 16)
    assert kept_target == target and kept_prompt == list(range(87, 100))
    kept_prompt, kept_target = data.fit_to_length(list(range(10)), list(range(200, 240)), 16)
    assert kept_prompt == list(range(2, 10)) and kept_target == list(range(200, 208))
    assert data.fit_to_length([1, 2], [3], 16) == ([1, 2], [3])


LATIN1_FILES = {  # (file name, bytes): the third line holds "Café" in Latin-1, which is not valid UTF-8
    "jsonl": ("rows.jsonl", b'{"title": "Mug", "content": "A mug"}\n{"title": "Pot", "content": "A pot"}\n'
                            b'{"title": "Caf\xe9", "content": "A cup"}\n'),
    "json": ("rows.json", b'[\n{"title": "Mug", "content": "A mug"},\n{"title": "Caf\xe9", "content": "A cup"}]\n'),
    "csv": ("rows.csv", b"title,content\nMug,A mug\nCaf\xe9,A cup\n"),
    "txt": ("rows.txt", b"A mug.\n\nCaf\xe9 au lait.\n"),
}


@pytest.mark.parametrize("fmt", sorted(LATIN1_FILES))
def test_undecodable_file_names_file_and_line(tmp_path, fmt):
    name, raw = LATIN1_FILES[fmt]
    (tmp_path / name).write_bytes(raw)
    cfg = config_for(tmp_path / name) if fmt != "txt" else from_dict(
        {"name": "d", "data": {"path": str(tmp_path / name)}, "train": {"objective": "cpt"},
         "registry": {"gate_metric": "loss"}})
    with pytest.raises(LoraflowError, match=rf"{name}: line 3 is not valid utf-8 .*data\.encoding") as error:
        data.prepare(cfg)
    assert "\n" not in str(error.value)
    cfg.data.encoding = "latin-1"
    texts = [value for split in data.prepare(cfg).splits.values() for row in split for value in row.values()]
    assert any("Café" in text for text in texts) and not any("\ufffd" in text for text in texts)


def test_format_detection_reads_strictly_too(tmp_path):
    path = tmp_path / "rows.json"  # JSON lines under a .json name: the format is told from the first line
    path.write_bytes(b'{"title": "Caf\xe9", "content": "A cup"}\n')
    with pytest.raises(LoraflowError, match=r"rows\.json: line 1 is not valid utf-8"):
        readers.detect_format(path, "auto")
    assert readers.detect_format(path, "auto", "latin-1") == "jsonl"


@pytest.mark.parametrize("fmt, encoding", [("json", "utf-8"), ("jsonl", "utf-8"), ("csv", "utf-8"),
                                           ("txt", "utf-8"), ("jsonl", "utf-16")])
def test_byte_order_mark_is_dropped(tmp_path, fmt, encoding):
    rows = [{"title": f"Café {i}", "content": f"Crème {i}"} for i in range(5)]
    text = {"json": json.dumps(rows), "jsonl": "\n".join(map(json.dumps, rows)) + "\n",
            "csv": "title,content\n" + "".join(f"{r['title']},{r['content']}\n" for r in rows),
            "txt": "\n\n".join(r["title"] for r in rows)}[fmt]
    path = tmp_path / f"rows.{fmt}"
    path.write_bytes(text.encode("utf-8-sig" if encoding == "utf-8" else encoding))  # utf-16 writes a BOM
    if fmt == "txt":
        cfg = from_dict({"name": "d", "data": {"path": str(path)}, "train": {"objective": "cpt"},
                         "registry": {"gate_metric": "loss"}})
        assert {r["text"] for s in data.prepare(cfg).splits.values() for r in s} == {r["title"] for r in rows}
        return
    prepared = data.prepare(config_for(path, encoding=encoding))
    assert prepared.fields == ["content", "title"]
    assert {r["prompt"] for s in prepared.splits.values() for r in s} == {f"Title: Café {i}" for i in range(5)}


def test_rows_sharing_a_prompt_go_into_one_split(tmp_path):
    # Item i has i % 3 + 1 descriptions: 10 prompts with 1, 10 with 2, 10 with 3 rows = 60 rows, 50 shared.
    lines = [json.dumps({"title": f"Item {i}", "content": f"Description {i}.{j}"})
             for i in range(30) for j in range(i % 3 + 1)]
    lines.append(json.dumps({"title": "ITEM  0 ", "content": "Another"}))  # the same prompt up to case and spacing
    cfg = config_for(write_jsonl(tmp_path / "rows.jsonl", lines))
    prepared = data.prepare(cfg)
    assert prepared.counts["rows_kept"] == 61 and prepared.counts["prompts_distinct"] == 30
    assert prepared.counts["rows_sharing_a_prompt"] == 52
    prompts = {name: {r["prompt"].lower().replace("  ", " ") for r in rows} for name, rows in prepared.splits.items()}
    assert not (prompts["train"] & prompts["test"] or prompts["train"] & prompts["validation"]
                or prompts["test"] & prompts["validation"])
    # 10% each (6 rows), overshooting by at most one group less a row
    assert 6 <= prepared.counts["rows_test"] <= 8 and 6 <= prepared.counts["rows_validation"] <= 8
    assert data.prepare(cfg).splits == prepared.splits


def test_max_rows_is_a_seeded_sample_not_the_head(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [json.dumps({"title": f"Item {i}", "content": f"Text {i}"})
                                                 for i in range(100)])
    def sampled(**values):
        prepared = data.prepare(config_for(path, max_rows=10, **values))
        assert prepared.counts["rows_read"] == 10
        return {r["prompt"] for s in prepared.splits.values() for r in s}
    first = sampled()
    assert len(first) == 10 and first <= {f"Title: Item {i}" for i in range(100)}
    assert first != {f"Title: Item {i}" for i in range(10)} and sampled() == first
    assert sampled(split_seed=7) != first



def test_where_keeps_the_rows_whose_fields_match_in_full(tmp_path):
    """One exported file, three evaluation sets: data.where picks a task's rows (before data.max_rows samples)."""
    tasks = ["qa"] * 6 + ["summarization"] * 5 + ["qa-long"] * 4 + [None] * 2
    path = write_jsonl(tmp_path / "mixed.jsonl", [json.dumps({"title": f"T{i}", "content": f"C{i}", "task": task})
                                                  for i, task in enumerate(tasks)])

    def kept(where, **values):
        prepared = data.prepare(config_for(path, where=where, **values))
        return prepared, sorted(int(r["prompt"].removeprefix("Title: T")) for s in prepared.splits.values() for r in s)

    prepared, rows = kept({"task": "qa"})
    assert rows == list(range(6))  # "qa-long" does not fully match "qa"
    assert prepared.counts["rows_not_matching"] == 11 and prepared.counts["rows_read"] == 6
    assert kept({"task": "qa|summarization"})[1] == list(range(11))
    assert kept({"task": "qa.*"})[1] == [*range(6), *range(11, 15)]
    assert kept({"task": "qa.*", "title": "T[0-9]"})[1] == list(range(6))  # every field must match
    assert kept({"task": ""})[1] == [15, 16]  # a missing value is the empty text
    prepared, rows = kept({"task": "qa|qa-long"}, max_rows=5)
    assert len(rows) == 5 and set(rows) <= set(range(6)) | set(range(11, 15))
    assert "rows_not_matching" not in data.prepare(config_for(path)).counts

    with pytest.raises(LoraflowError, match="no record of .* matches data.where"):
        data.prepare(config_for(path, where={"task": "translation"}))
    with pytest.raises(LoraflowError, match="field 'kind' not found"):
        data.prepare(config_for(path, where={"kind": "qa"}))
    with pytest.raises(LoraflowError, match=r"data.where.task: '\(' is not a regular expression"):
        config_for(path, where={"task": "("})


def test_train_subset_is_a_seeded_share_of_the_training_split_only(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [json.dumps({"title": f"Item {i}", "content": f"Text {i}"})
                                                 for i in range(100)])
    whole = data.prepare(config_for(path, val_fraction=0.2, test_fraction=0.0))

    def subset(**values):
        return data.prepare(config_for(path, val_fraction=0.2, test_fraction=0.0, train_subset=0.25, **values))
    part = subset()
    assert len(whole.splits["train"]) == 80 and len(part.splits["train"]) == 20
    assert part.counts["rows_train"] == 20 and part.counts["rows_train_unused"] == 60
    assert part.splits["validation"] == whole.splits["validation"]  # held-out rows untouched
    assert all(row in whole.splits["train"] for row in part.splits["train"])
    assert part.splits["train"] != whole.splits["train"][:20] and subset().splits["train"] == part.splits["train"]
    assert subset(split_seed=7).splits["train"] != part.splits["train"]
    with pytest.raises(LoraflowError, match=r"data.train_subset: must be in \(0, 1\]"):
        config_for(path, train_subset=0.0)


LLAMA3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                   "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                   "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
                  "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}<end_of_turn>\n"
                  "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
GENERATION_ONLY = "{% if messages[-1]['role'] == 'assistant' %}{{ raise_exception('no') }}{% endif %}" + CHAT_TEMPLATE
CHAT_TOKENIZERS = {  # name: (template, bos, eos, other special tokens, tokenizer adds bos, end of an answer)
    "llama3": (LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|end_of_text|>",
               ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], True, "<|eot_id|>"),
    "gemma": (GEMMA_TEMPLATE, "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"], True, "<end_of_turn>"),
    "qwen-base": (CHAT_TEMPLATE, None, "<|endoftext|>", ["<|im_start|>", "<|im_end|>"], False, "<|im_end|>"),
    "chatml-adds-bos": (CHAT_TEMPLATE, "<s>", "</s>", ["<|im_start|>", "<|im_end|>"], True, "<|im_end|>"),
    "refuses-answers": (GENERATION_ONLY, None, "</s>", ["<|im_start|>", "<|im_end|>"], False, "</s>"),
}


def chat_tokenizer(name: str):
    template, bos, eos, others, adds_bos, _ = CHAT_TOKENIZERS[name]
    specials = [t for t in ["<unk>", bos, eos, *others] if t]
    tokenizer = train_tokenizer(["Blue mug", "A mug.", "user assistant model system"], specials)
    tokenizer.add_special_tokens({"unk_token": "<unk>", "eos_token": eos, **({"bos_token": bos} if bos else {})})
    tokenizer.add_bos_token = adds_bos
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize("name", sorted(CHAT_TOKENIZERS))
def test_targets_end_with_the_chat_templates_turn_end(name):
    tokenizer, expected_end = chat_tokenizer(name), CHAT_TOKENIZERS[name][-1]
    cfg = from_dict({"name": "d", "data": {"path": "builtin:catalogue", "prompt_field": "title",
                                           "target_field": "content"}})
    assert data.end_of_target(tokenizer, cfg) == expected_end
    [example] = data.tokenize_sft([{"prompt": "Blue mug", "target": "A mug."}], tokenizer, cfg)
    target = [t for t, label in zip(example["input_ids"], example["labels"]) if label != data.IGNORE_INDEX]
    assert tokenizer.decode(target) == "A mug." + expected_end
    cfg.data.chat_template = False  # a plain prompt: the target ends with eos
    assert data.end_of_target(tokenizer, cfg) == tokenizer.eos_token


@pytest.mark.parametrize("name", ["llama3", "gemma", "chatml-adds-bos"])
def test_prompt_starts_with_exactly_one_bos(name):
    tokenizer = chat_tokenizer(name)
    cfg = from_dict({"name": "d", "data": {"path": "builtin:catalogue", "prompt_field": "title",
                                           "target_field": "content"}})
    for chat in (True, False):
        cfg.data.chat_template = chat
        ids = data.prompt_token_ids(tokenizer, "Blue mug", cfg)
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


@pytest.mark.parametrize("name", sorted(CHAT_TOKENIZERS))
def test_conversations_learn_each_assistant_turn_in_every_template(name):
    tokenizer, end = chat_tokenizer(name), CHAT_TOKENIZERS[name][-1]
    cfg = from_dict({"name": "d", "data": {"path": "builtin:catalogue", "messages_field": "messages"}})
    messages = [{"role": "user", "content": "Blue mug"}, {"role": "assistant", "content": "A mug."},
                {"role": "user", "content": "model system"}, {"role": "assistant", "content": "A blue mug."}]
    row = data.conversation_row({"messages": messages}, cfg)
    if name == "refuses-answers":  # a template that cannot render an answer cannot be trained on chat data
        with pytest.raises(LoraflowError, match="the chat template refuses the conversation") as error:
            data.tokenize_sft([row], tokenizer, cfg)
        assert "\n" not in str(error.value)
        return
    [example] = data.tokenize_sft([row], tokenizer, cfg)
    learned = [i for i, label in enumerate(example["labels"]) if label != data.IGNORE_INDEX]
    assert tokenizer.decode([example["input_ids"][i] for i in learned]) == "A mug." + end + "A blue mug." + end
    prompt_ids = data.prompt_token_ids(tokenizer, row["prompt"], cfg)
    assert example["input_ids"][:len(prompt_ids)] == prompt_ids and prompt_ids.count(tokenizer.bos_token_id) <= 1
    assert tokenizer.decode(example["input_ids"][len(prompt_ids):]) == "A blue mug." + end
