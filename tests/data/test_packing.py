"""data.packing: `constant` blocks of the whole text, `rows` blocks of whole rows kept apart, the config
that names them, the loss a packed row gets, and training with each mode through the CLI."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from helpers import runs_of

from loraflow import data, generation
from loraflow.training.trainer import training_collator
from loraflow.config import ConfigError, from_dict, load_config
from loraflow.models import load_tokenizer, read_tokenizer


def packing_config(model_path, **data_values):
    return from_dict({"name": "p", "model": {"name": str(model_path), "dtype": "fp32"},
                      "data": {"path": "builtin:catalogue", "builtin_rows": 40, "prompt_template": "Describe: {title}",
                               "target_template": "{content}", **data_values}})


def rows_of(block: dict) -> list[dict]:
    """The rows of a `rows` block, split where its position ids restart at 0."""
    starts = [i for i, position in enumerate(block["position_ids"]) if position == 0] + [len(block["input_ids"])]
    return [{key: block[key][start:end] for key in ("input_ids", "labels")} for start, end in zip(starts, starts[1:])]


def label_tokens(examples: list[dict]) -> int:
    """Loss positions of causal examples: labels other than -100, shifted by one."""
    return sum(sum(label != data.IGNORE_INDEX for label in e["labels"][1:]) for e in examples)


@pytest.mark.parametrize("mode", ["none", "constant", "rows"])
def test_packing_takes_one_of_its_three_names(mode):
    assert from_dict({"name": "p", "data": {"path": "x.jsonl", "packing": mode}}).data.packing == mode


@pytest.mark.parametrize("old", [True, False])
def test_a_boolean_packing_is_refused_with_the_names_to_use(old):
    with pytest.raises(ConfigError) as caught:
        from_dict({"data": {"path": "x.jsonl", "packing": old}, "lora": {"r": 0}})
    message = str(caught.value)
    assert "\n" not in message and "lora.r: must be > 0" in message  # listed with the other problems
    [problem] = [part for part in message.removeprefix("invalid config: ").split("; ") if "data.packing" in part]
    assert problem.startswith(f"data.packing: {str(old).lower()} is not a packing mode: use constant")
    assert "or rows" in problem


def test_a_boolean_packing_override_is_refused_too(tmp_path):
    (tmp_path / "p.yaml").write_text("data:\n  path: builtin:catalogue\n")
    with pytest.raises(ConfigError, match="data.packing: true is not a packing mode: use constant"):
        load_config(str(tmp_path / "p.yaml"), ["data.packing=true"])


def test_packing_needs_a_causal_model():
    with pytest.raises(ConfigError, match="data.packing: rows needs model.kind=causal"):
        from_dict({"name": "p", "model": {"kind": "seq2seq"}, "data": {"path": "x.jsonl", "packing": "rows"}})


def test_best_fit_decreasing_puts_each_length_where_it_fits_tightest():
    # 5 opens A (room 3); 4 opens B (room 4); 3 fills A; 3 goes to B (room 1); 2 opens C; 1 fills B.
    assert data.best_fit_decreasing([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]
    assert data.best_fit_decreasing([8, 8], 8) == [[0], [1]]


def test_constant_blocks_are_the_whole_text_cut_into_fixed_blocks(tiny_llama):
    cfg = packing_config(tiny_llama, packing="constant", max_length=48)
    tokenizer = read_tokenizer(str(tiny_llama))  # a copy of its own to change: load_tokenizer's is shared
    rows = data.prepare(cfg).splits["train"]
    for eos in ("<|im_end|>", "<unk>"):  # the chat turn's end is eos (no second one added), then it is not
        tokenizer.eos_token = eos
        stream = []
        for row in rows:  # the prompt as the model sees it, the target, the end of the turn, eos unless just there
            stream += data.prompt_token_ids(tokenizer, row["prompt"], cfg)
            stream += tokenizer(row["target"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
            stream += [tokenizer.eos_token_id] if eos != "<|im_end|>" else []
        blocks = data.packed_training_examples(rows, tokenizer, cfg)
        assert len(blocks) == len(stream) // 48  # the tail shorter than a block is dropped
        assert all(len(b["input_ids"]) == 48 and b["labels"] == b["input_ids"] and "position_ids" not in b
                   for b in blocks)
        assert [t for b in blocks for t in b["input_ids"]] == stream[:len(blocks) * 48]


def test_rows_blocks_hold_whole_rows_with_their_prompts(tiny_llama):
    cfg = packing_config(tiny_llama, packing="rows", max_length=256)
    tokenizer = load_tokenizer(str(tiny_llama))
    rows = data.prepare(cfg).splits["train"]
    rows.append({"prompt": "Describe: a very long one", "target": rows[0]["target"] * 6})  # longer than a block
    alone = data.tokenize_sft(rows, tokenizer, cfg)
    blocks = data.packed_training_examples(rows, tokenizer, cfg)
    assert all(len(b["input_ids"]) <= 256 for b in blocks) and len(blocks) < len(alone)
    packed = [row for block in blocks for row in rows_of(block)]
    assert Counter(tuple(r["input_ids"]) for r in packed) == Counter(tuple(e["input_ids"]) for e in alone)
    for row in packed:  # each row whole, its prompt at its start and masked, as alone
        [same] = [e for e in alone if e["input_ids"] == row["input_ids"]]
        assert row["labels"] == same["labels"] and row["labels"][0] == data.IGNORE_INDEX
    prompt_ids = data.prompt_token_ids(tokenizer, rows[-1]["prompt"], cfg)
    target_ids = tokenizer(rows[-1]["target"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    cut_prompt, cut_target = data.fit_to_length(prompt_ids, target_ids, 256)
    assert {"input_ids": cut_prompt + cut_target, "position_ids": list(range(256)),
            "labels": [data.IGNORE_INDEX] * len(cut_prompt) + cut_target} in blocks


def token_losses(model, batch: dict) -> torch.Tensor:
    """Per position i, the loss of predicting token i from those before it (0 where the label is -100)."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.inference_mode():
        logits = model(**inputs).logits
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                               ignore_index=data.IGNORE_INDEX, reduction="none")
    return torch.nn.functional.pad(losses, (1, 0))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_rows_loss_is_the_same_packed_and_alone(tiny_llama, attention):
    from transformers import AutoModelForCausalLM

    cfg = packing_config(tiny_llama, packing="rows", max_length=256)
    tokenizer = load_tokenizer(str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation=attention).eval()
    blocks = data.packed_training_examples(data.prepare(cfg).splits["train"][:10], tokenizer, cfg)
    batch = data.pad_row_blocks(blocks, tokenizer.pad_token_id)  # blocks of several lengths: padding too
    assert len({len(b["input_ids"]) for b in blocks}) > 1 and max(len(rows_of(b)) for b in blocks) > 1
    packed = token_losses(model, batch).double()  # fp32 losses, summed in fp64 so the sum adds no rounding
    checked = 0
    for index, block in enumerate(blocks):
        start = 0
        for row in rows_of(block):
            end = start + len(row["input_ids"])
            alone = token_losses(model, {"input_ids": torch.tensor([row["input_ids"]]),
                                         "labels": torch.tensor([row["labels"]])}).double()
            assert float(packed[index, start:end].sum()) == pytest.approx(float(alone.sum()), abs=1e-5)
            start, checked = end, checked + 1
    assert checked == 10
    # The same blocks with a mask of ones (which turns transformers' packed-row detection off) let rows see
    # the rows before them: their losses change, so the check above would catch it.
    seen = token_losses(model, {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}).double()
    assert (seen - packed).abs().max() > 1e-2


def test_flash_attention_with_several_blocks_a_batch_is_warned_about(tiny_llama, capsys):
    from types import SimpleNamespace

    cfg = packing_config(tiny_llama, packing="rows")
    tokenizer = load_tokenizer(str(tiny_llama))
    for attention, batch_size in (("flash_attention_2", 1), ("sdpa", 4), ("flash_attention_2", 4)):
        model = SimpleNamespace(config=SimpleNamespace(_attn_implementation=attention))
        with_batch = from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "batch_size": batch_size}})
        collate = training_collator(with_batch, model, tokenizer)
        assert collate([{"input_ids": [5, 6], "labels": [-100, 6], "position_ids": [0, 1]}])["use_cache"] is False
    assert capsys.readouterr().err.count("keeps packed rows apart only with train.batch_size=1") == 1


def test_validation_loss_is_per_row_in_every_mode(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(tiny_llama))
    losses = {}
    for mode in ("none", "constant", "rows"):
        cfg = packing_config(tiny_llama, packing=mode, max_length=256)
        rows = data.prepare(cfg).splits["validation"]
        assert data.training_examples(rows, tokenizer, cfg) == data.tokenize_sft(rows, tokenizer, cfg)
        losses[mode] = generation.validation_loss(model, tokenizer, rows, cfg)
    assert losses["constant"] == losses["rows"] == losses["none"]


@pytest.mark.parametrize("mode", ["constant", "rows"])
def test_training_with_each_mode_counts_the_label_tokens_of_its_blocks(tiny_llama, write_project, run_cli, mode,
                                                                       monkeypatch):
    from transformers import masking_utils

    detect, rows_found = masking_utils.find_packed_sequence_indices, []

    def spy(position_ids):  # what transformers makes of the position ids of each forward without a mask
        found = detect(position_ids)
        rows_found.append(0 if found is None else int(found.max()) + 1)
        return found
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", spy)
    project = write_project(tiny_llama, data={"packing": mode, "max_length": 256},
                            train={"max_steps": -1, "epochs": 1, "eval_steps": 1000})
    code, _, err = run_cli("train", project)
    assert code == 0, err
    if mode == "rows":  # every training forward has its rows told apart from the position ids
        assert rows_found and all(found > 1 for found in rows_found)
    else:  # constant batches carry an attention mask of ones: one causal sequence per block
        assert rows_found == []
    [run] = runs_of("train", status="FINISHED")
    assert run.data.params["data.packing"] == mode and "eval/loss" in run.data.metrics
    cfg = load_config(str(project))
    tokenizer = load_tokenizer(cfg.model.name)
    rows = data.prepare(cfg).splits["train"]
    blocks = data.packed_training_examples(rows, tokenizer, cfg)
    assert run.data.metrics["train/tokens"] == label_tokens(blocks)
    if mode == "constant":  # every token but each block's first is a loss position
        assert run.data.metrics["train/tokens"] == len(blocks) * 255
    else:  # packing trains on exactly the target tokens the rows have alone
        assert run.data.metrics["train/tokens"] == label_tokens(data.tokenize_sft(rows, tokenizer, cfg))
