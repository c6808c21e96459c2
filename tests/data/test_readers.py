"""Data formats (Parquet, Arrow, save_to_disk folders, the Hub), chat data learned on its assistant turns, and
templates with optional parts."""
from __future__ import annotations

import json

import pytest
from helpers import assert_one_line_error, runs_of

from loraflow import LoraflowError, data, generation
from loraflow.config import ConfigError, from_dict
from loraflow.data import readers
from loraflow.models import load_tokenizer

# Ten hand-made rows: one with an empty answer (dropped as empty), one a duplicate of the first, and an optional
# colour that is sometimes empty.
ROWS = [{"title": "Mug", "colour": "red", "content": "A red mug.", "n": 1},
        {"title": "Lamp", "colour": "", "content": "An oak lamp.", "n": 2},
        {"title": "Desk", "colour": "black", "content": "A black desk with {braces} kept.", "n": 3},
        {"title": "Pot", "colour": "", "content": "", "n": 4},
        {"title": "Mug", "colour": "red", "content": "A red mug.", "n": 5},
        {"title": "Chair", "colour": "green", "content": "A green chair.", "n": 6},
        {"title": "Café table", "colour": "", "content": "A round table.", "n": 7},
        {"title": "Rug", "colour": "blue", "content": "A blue &amp; white rug.", "n": 8},
        {"title": "Shelf", "colour": "", "content": "A pine shelf.", "n": 9},
        {"title": "Vase", "colour": "white", "content": "A tall vase.", "n": 10}]
OTHER_ROWS = [{"title": f"Other {i}", "colour": "", "content": f"Other text {i}.", "n": i} for i in range(6)]


def write_source(tmp_path, kind: str, rows=ROWS):
    """`rows` written as `kind`; returns (data.path, extra data settings)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    if kind == "jsonl":
        path = tmp_path / "rows.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "parquet":
        pq.write_table(table, path := tmp_path / "rows.parquet")
    elif kind in ("arrow", "arrow-file"):  # the IPC stream format datasets writes, and the random-access one
        path = tmp_path / "rows.arrow"
        with pa.OSFile(str(path), "wb") as sink:
            writer = pa.ipc.new_stream if kind == "arrow" else pa.ipc.new_file
            with writer(sink, table.schema) as out:
                out.write_table(table)
    elif kind == "dataset":
        datasets.Dataset.from_list(rows).save_to_disk(path := tmp_path / "saved")
    else:
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                              "test": datasets.Dataset.from_list(OTHER_ROWS)}).save_to_disk(path := tmp_path / "dict")
    return path


def config_for(path, **data_values):
    return from_dict({"name": "f", "data": {"path": str(path), "prompt_template": "Title: {title}[[ ({colour})]]",
                                            "target_template": "{content}", **data_values}})


SOURCES = ["jsonl", "parquet", "arrow", "arrow-file", "dataset", "dataset-dict"]


@pytest.mark.parametrize("kind", SOURCES[1:])
def test_every_format_gives_the_rows_jsonl_gives(tmp_path, kind):
    expected = data.prepare(config_for(write_source(tmp_path, "jsonl")))
    assert expected.counts["rows_dropped_empty"] == 1 and expected.counts["rows_dropped_duplicate"] == 1
    prompts = {r["prompt"] for split in expected.splits.values() for r in split}
    assert {"Title: Mug (red)", "Title: Lamp", "Title: Café table"} <= prompts
    path = write_source(tmp_path, kind)
    prepared = data.prepare(config_for(path))
    assert prepared.splits == expected.splits and prepared.counts == expected.counts
    assert prepared.fields == expected.fields == ["colour", "content", "n", "title"]
    again = data.prepare(config_for(path))
    assert again.digest == prepared.digest != expected.digest
    assert data.prepare(config_for(path, split_seed=7)).digest != prepared.digest  # settings count too


@pytest.mark.parametrize("kind", ["dataset", "dataset-dict"])
def test_a_folders_digest_covers_its_files(tmp_path, kind):
    path = write_source(tmp_path, kind)
    before = data.prepare(config_for(path)).digest
    if kind == "dataset-dict":  # only the split read counts
        (path / "test" / "dataset_info.json").write_text((path / "test" / "dataset_info.json").read_text() + " ")
        assert data.prepare(config_for(path)).digest == before
    info = (path / "train" if kind == "dataset-dict" else path) / "dataset_info.json"
    info.write_text(info.read_text() + " ")
    assert data.prepare(config_for(path)).digest != before


def test_a_dataset_dict_folder_reads_data_split(tmp_path):
    path = write_source(tmp_path, "dataset-dict")
    train, test = data.prepare(config_for(path)), data.prepare(config_for(path, split="test"))
    assert {r["target"] for s in test.splits.values() for r in s} == {r["content"] for r in OTHER_ROWS}
    assert train.source.endswith("train") and test.source.endswith("test") and train.digest != test.digest
    with pytest.raises(LoraflowError, match=r"has no split 'validation' \(its splits: train, test\); set data.split"):
        data.prepare(config_for(path, split="validation"))


def test_a_folder_that_is_no_saved_dataset_is_refused(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "rows.jsonl").write_text("{}\n")
    with pytest.raises(LoraflowError, match="not one datasets.save_to_disk wrote"):
        data.prepare(config_for(tmp_path / "folder"))
    with pytest.raises(LoraflowError, match=r"is a folder, but data.format jsonl reads a file"):
        data.prepare(config_for(tmp_path / "folder", format="jsonl"))
    with pytest.raises(LoraflowError, match=r"cannot read .*rows.parquet as parquet"):
        data.prepare(config_for(write_source(tmp_path, "jsonl").rename(tmp_path / "rows.parquet")))


def test_hub_names_and_configs():
    assert readers.hub_reference("hf:tatsu-lab/alpaca", "auto") == ("tatsu-lab/alpaca", None)
    assert readers.hub_reference("hub:glue:mrpc", "auto") == ("glue", "mrpc")
    assert readers.hub_reference("glue", "hub") == ("glue", None)
    assert readers.hub_reference("rows.jsonl", "auto") is None


def test_a_hub_data_set_is_read_with_load_dataset(tmp_path, monkeypatch):
    import datasets

    dataset, calls = datasets.Dataset.from_list(ROWS), []
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kw: calls.append((args, kw)) or dataset)
    prepared = data.prepare(config_for("hub:someone/things:plain", split="train[:10]"))
    assert calls[0] == (("someone/things", "plain"), {"split": "train[:10]"})
    assert prepared.splits == data.prepare(config_for(write_source(tmp_path, "jsonl"))).splits
    assert prepared.digest == data.prepare(config_for("hub:someone/things:plain", split="train[:10]")).digest
    assert prepared.digest != data.prepare(config_for("hub:someone/things:other", split="train[:10]")).digest
    assert prepared.source == "hub:someone/things:plain"


def test_a_hub_name_offline_is_a_one_line_error(tiny_llama, write_project, run_cli):
    code, _, err = run_cli("prepare", write_project(tiny_llama, data={"path": "hf:nobody-here/no-such-set"}))
    line = assert_one_line_error(code, err, "nobody-here/no-such-set")
    assert "cannot be reached offline" in line
    assert [run.info.status for run in runs_of("prepare")] == ["FAILED"]


# --- optional template parts ---------------------------------------------------------------------

ALPACA = "### Instruction:\n{instruction}\n\n[[### Input:\n{input}\n\n]]### Response:"


def test_alpaca_rows_with_and_without_input(tmp_path):
    rows = [{"instruction": f"Describe item {i}.", "input": f"Item {i} is blue." if i % 2 else "",
             "output": f"Item {i}."} for i in range(10)]
    rows.append({"instruction": "", "input": "A required field is empty.", "output": "Dropped."})
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepared = data.prepare(from_dict({"name": "a", "data": {"path": str(path), "prompt_template": ALPACA,
                                                             "target_template": "{output}"}}))
    assert prepared.counts["rows_kept"] == 10 and prepared.counts["rows_dropped_empty"] == 1
    prompts = {r["target"]: r["prompt"] for split in prepared.splits.values() for r in split}
    assert prompts["Item 1."] == "### Instruction:\nDescribe item 1.\n\n### Input:\nItem 1 is blue.\n\n### Response:"
    assert prompts["Item 2."] == "### Instruction:\nDescribe item 2.\n\n### Response:"


def test_fill_template_keeps_values_as_written():
    template = "Title: {title}[[ ({colour}, {size})]]!"
    assert data.fill_template(template, {"title": "{x}", "colour": "red", "size": "big"}) == "Title: {x} (red, big)!"
    assert data.fill_template(template, {"title": "Mug", "colour": "red", "size": ""}) == "Title: Mug!"
    assert data.required_fields(template) == ["title"]


@pytest.mark.parametrize("template, problem", [("A [[{b}", "left open"), ("A [[x [[{b}]] y]]", "holds another"),
                                               ("{a[[}]]", "data.prompt_template: ")])
def test_broken_optional_parts_are_config_errors(template, problem):
    with pytest.raises(ConfigError, match=problem):
        from_dict({"name": "a", "data": {"path": "x.jsonl", "prompt_template": template}})


# --- chat data -----------------------------------------------------------------------------------

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe: Mug"},
                {"role": "assistant", "content": "A red mug."}, {"role": "user", "content": "And the lamp?"},
                {"role": "assistant", "content": "An oak lamp."}]
SHAREGPT = [{"from": {"user": "human", "assistant": "gpt"}.get(m["role"], m["role"]), "value": m["content"]}
            for m in CONVERSATION]


def chat_config(path="builtin:catalogue", **data_values):
    return from_dict({"name": "c", "data": {"path": str(path), "messages_field": "messages", **data_values}})


def learned_spans(example: dict) -> list[list[int]]:
    """The runs of consecutive tokens whose label is not -100."""
    spans, previous = [], False
    for token, label in zip(example["input_ids"], example["labels"]):
        learned = label != data.IGNORE_INDEX
        if learned and not previous:
            spans.append([])
        if learned:
            spans[-1].append(token)
        previous = learned
    return spans


def test_chat_labels_cover_the_assistant_turns_only(tiny_llama):
    tokenizer, cfg = load_tokenizer(str(tiny_llama)), chat_config()
    row = data.conversation_row({"messages": CONVERSATION}, cfg)
    assert json.loads(row["prompt"]) == CONVERSATION[:-1] and row["target"] == "An oak lamp."
    [example] = data.tokenize_sft([row], tokenizer, cfg)
    assert [tokenizer.decode(span) for span in learned_spans(example)] == ["A red mug.<|im_end|>",
                                                                          "An oak lamp.<|im_end|>"]
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False).strip()
    # The evaluated prompt is the conversation before the last answer, as training saw it.
    prompt_ids = generation.encode_prompts(tokenizer, [row["prompt"]], cfg)[0]
    assert example["input_ids"][:len(prompt_ids)] == prompt_ids
    assert tokenizer.decode(prompt_ids).endswith("And the lamp?<|im_end|>\n<|im_start|>assistant\n")
    assert data.format_prompt(tokenizer, row["prompt"], cfg) == tokenizer.apply_chat_template(
        CONVERSATION[:-1], tokenize=False, add_generation_prompt=True)


def test_one_turn_chat_rows_train_like_prompt_and_target_rows(tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama))
    chat = data.conversation_row({"messages": CONVERSATION[1:3]}, chat_config())
    plain_cfg = from_dict({"name": "c", "data": {"path": "builtin:catalogue"}})
    assert data.tokenize_sft([chat], tokenizer, chat_config()) == data.tokenize_sft(
        [{"prompt": "Describe: Mug", "target": "A red mug."}], tokenizer, plain_cfg)


def test_sharegpt_rows_equal_openai_rows_and_bad_ones_are_counted(tmp_path):
    records = [{"messages": CONVERSATION}, {"messages": SHAREGPT},  # the same conversation: a duplicate
               {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                             {"role": "user", "content": "Trailing turn, left out"}]},
               {"messages": "not a list"}, {"messages": [{"role": "tool", "content": "x"}]},  # malformed
               {"messages": [{"role": "user", "content": "No answer"}]},  # empty
               {"messages": [{"role": "user", "content": "Empty answer"}, {"role": "assistant", "content": " "}]}]
    records += [{"messages": [{"from": "human", "value": f"Q{i}"}, {"from": "gpt", "value": f"A{i}"}]}
                for i in range(6)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "{broken\n")
    prepared = data.prepare(chat_config(path))
    assert prepared.counts | {"rows_read": 14, "rows_dropped_malformed": 3, "rows_dropped_empty": 2,
                              "rows_dropped_duplicate": 1, "rows_kept": 8} == prepared.counts
    rows = {r["target"]: json.loads(r["prompt"]) for split in prepared.splits.values() for r in split}
    assert rows["Hello."] == [{"role": "user", "content": "Hi"}]
    assert rows["A3"] == [{"role": "user", "content": "Q3"}] and rows["An oak lamp."] == CONVERSATION[:-1]


@pytest.mark.parametrize("kind", ["parquet", "dataset"])
def test_conversations_read_the_same_from_tables(tmp_path, kind):
    records = [{"messages": CONVERSATION[:3]}] + [{"messages": [{"role": "user", "content": f"Q{i}"},
                                                               {"role": "assistant", "content": f"A{i}"}]}
                                                 for i in range(5)]
    expected = data.prepare(chat_config(write_source(tmp_path, "jsonl", records)))
    prepared = data.prepare(chat_config(write_source(tmp_path, kind, records)))
    assert prepared.splits == expected.splits and prepared.counts["rows_kept"] == 6


def test_chat_data_config_problems():
    with pytest.raises(ConfigError, match="data.prompt_template: set, but data.messages_field"):
        chat_config(prompt_template="{title}")
    with pytest.raises(ConfigError, match="data.messages_field: chat data needs model.kind=causal"):
        from_dict({"name": "c", "model": {"kind": "seq2seq"}, "data": {"path": "x.jsonl", "messages_field": "m"}})


def test_missing_prompt_field_points_at_chat_data(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    with pytest.raises(LoraflowError, match="set data.messages_field=messages"):
        data.prepare(from_dict({"name": "c", "data": {"path": str(path)}}))


@pytest.mark.slow
def test_train_and_evaluate_on_chat_data(tiny_llama, write_project, run_cli, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Describe: item {i}"}, {"role": "assistant", "content": f"Item {i} is oak."},
        {"role": "user", "content": "Shorter?"}, {"role": "assistant", "content": f"Oak item {i}."}]}) + "\n"
        for i in range(30)))
    project = write_project(tiny_llama, data={"path": str(path), "messages_field": "messages", "prompt_template": "",
                                              "target_template": "", "max_length": 96})
    code, _, err = run_cli("train", project)
    assert code == 0, err
    [trained] = runs_of("train", status="FINISHED")
    assert trained.data.metrics["data/rows_kept"] == 30 and trained.data.metrics["train/tokens"] > 0
    code, _, err = run_cli("evaluate", project, "--run-id", trained.info.run_id)
    assert code == 0, err
    [evaluation] = runs_of("evaluate", status="FINISHED")
    assert {"base/rougeL", "tuned/rougeL", "tuned/loss"} <= set(evaluation.data.metrics)
    import mlflow

    details = [json.loads(line) for line in mlflow.artifacts.load_text(
        f"runs:/{evaluation.info.run_id}/eval/details.jsonl").splitlines()]
    assert details and all(json.loads(d["prompt"])[-1] == {"role": "user", "content": "Shorter?"} for d in details)
    assert all(d["reference"].startswith("Oak item") for d in details)
