"""Data preparation: formats, normalisation, bad-row accounting, splits, labels, packing, CPT blocks."""
from __future__ import annotations

import json

import mlflow
import pytest

from loraflow import LoraflowError, data
from loraflow.config import from_dict
from loraflow.models import load_tokenizer


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
        json.dumps({"title": "Mug", "content": "A red&amp;blue mug"}),  # duplicate after normalisation
        json.dumps({"title": "Lamp", "content": "   "}),  # empty target
        json.dumps({"title": "Pot", "content": "A <b>clay</b> pot"}),
        json.dumps({"title": "Cup", "content": "A cup"}),
    ])
    prepared = data.prepare(config_for(path))
    assert prepared.counts == {"rows_read": 6, "rows_dropped_malformed": 1, "rows_dropped_empty": 1,
                               "rows_dropped_duplicate": 1, "rows_kept": 3, "rows_test": 1,
                               "rows_validation": 1, "rows_train": 1}
    targets = sorted(r["target"] for split in prepared.splits.values() for r in split)
    assert targets == ["A clay pot", "A cup", "A red&blue mug"]


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


def test_packing_and_cpt_blocks_have_fixed_length(tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama))
    examples = [{"input_ids": list(range(n)), "labels": [data.IGNORE_INDEX] * 2 + list(range(2, n))}
                for n in (5, 9, 7, 12)]
    blocks = data.pack_examples(examples, 8)
    assert len(blocks) == 33 // 8 and all(len(b["input_ids"]) == 8 == len(b["labels"]) for b in blocks)
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
    [run] = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status == "FINISHED" and run.data.metrics["data/rows_kept"] == 60
    assert run.data.tags["loraflow.data_digest"] and run.data.tags["loraflow.stage"] == "prepare"
    assert {i.dataset.name for i in run.inputs.dataset_inputs} == {"tiny-train", "tiny-validation", "tiny-test"}


def test_long_prompts_are_cut_from_the_left_and_keep_the_target():
    prompt, target = list(range(100)), [500, 501, 502]
    kept_prompt, kept_target = data.fit_to_length(prompt, target, 16)
    assert kept_target == target and kept_prompt == list(range(87, 100))
    kept_prompt, kept_target = data.fit_to_length(list(range(10)), list(range(200, 240)), 16)
    assert kept_prompt == list(range(2, 10)) and kept_target == list(range(200, 208))
    assert data.fit_to_length([1, 2], [3], 16) == ([1, 2], [3])
