"""The tokenizer in the GGUF: the pre-tokenizer derived from the real one, one BOS, ids read back equal."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from loraflow import LoraflowError, data, export, tiny
from loraflow.config import load_config
from loraflow.export import verify

NUMBERS = ["Order 12345 of 2024: 3 x 250 ml at 19.99", "SKU-0042 1200x600 mm", "call 0800 123 4567 now"]


@pytest.fixture(scope="module")
def tiny_llama3(tmp_path_factory) -> Path:
    return tiny.build_tiny_llama3(tmp_path_factory.mktemp("tiny-llama3"))


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    return tiny.build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


def with_pre_tokenizer(folder: Path, into: Path, pre_tokenizer: dict) -> Path:
    shutil.copytree(folder, into)
    parsed = json.loads((into / "tokenizer.json").read_text())
    (into / "tokenizer.json").write_text(json.dumps({**parsed, "pre_tokenizer": pre_tokenizer}))
    return into


def test_the_pre_tokenizer_is_named_by_how_the_real_one_splits(tiny_llama, tiny_qwen2, tiny_llama3, tmp_path):
    assert export.Vocab.of(tiny_llama).pre == "gpt2"
    assert export.Vocab.of(tiny_qwen2).pre == "qwen2"
    assert export.Vocab.of(tiny_llama3).pre == "llama-bpe"
    digits = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    assert export.Vocab.of(with_pre_tokenizer(tiny_llama, tmp_path / "digits", digits)).pre == "smollm"
    whitespace = with_pre_tokenizer(tiny_llama, tmp_path / "whitespace", {"type": "Whitespace"})
    with pytest.raises(LoraflowError, match="no llama.cpp pre-tokenizer splits text as this tokenizer"):
        export.Vocab.of(whitespace)


@pytest.mark.real_model
def test_the_embedded_smollm2_is_exported_as_it_splits_not_as_its_source_gguf_says():
    from loraflow import models
    from loraflow.config import EMBEDDED_MODEL

    source = gguf.GGUFReader(models.embedded_gguf()).fields["tokenizer.ggml.pre"].contents()
    assert source == "smollm"  # digit by digit; the folder loraflow trains on groups them (GPT-2's rule)
    assert export.Vocab.of(Path(models.resolve_model_path(EMBEDDED_MODEL))).pre == "gpt2"


def render(template: str, messages: list[dict], tokenizer) -> str:
    """A chat template as transformers renders one (jinja, trim_blocks, lstrip_blocks)."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(template).render(messages=messages, add_generation_prompt=True,
                                                    bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)


@pytest.mark.parametrize("family", ["llama3", "chatml"])
def test_one_bos_as_training_saw_it(family, tiny_llama, tiny_llama3, write_project):
    folder = tiny_llama3 if family == "llama3" else tiny_llama
    cfg = load_config(str(write_project(folder, data={"system_prompt": "Be brief."})))
    vocab = export.Vocab.of(folder)
    tokenizer = tiny_tokenizer(folder)
    for prompt in ("Describe: Oak desk", "Describe: Red mug 350 ml"):
        text = render(vocab.chat_template, data.prompt_messages(prompt, cfg), tokenizer)
        ids = ([vocab.bos_id] if vocab.add_bos else []) + tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids == data.prompt_token_ids(tokenizer, prompt, cfg)
        assert ids[0] == tokenizer.bos_token_id != ids[1]  # ChatML's bos is <|im_start|>: it opens each turn too
    assert vocab.add_bos == (family == "llama3")  # Llama 3's tokenizer adds it, so the template no longer writes it
    if family == "llama3":
        assert tokenizer.chat_template.startswith("{{ bos_token }}") and "bos_token" not in vocab.chat_template
    else:
        assert vocab.chat_template == tokenizer.chat_template


def tiny_tokenizer(folder: Path):
    from loraflow import models

    return models.load_tokenizer(str(folder))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_gguf_tokenizer_gives_the_same_ids_on_numbers(family, tiny_llama, tiny_qwen2, tmp_path):
    folder = tiny_llama if family == "llama" else tiny_qwen2
    path = tmp_path / "tokens.gguf"
    export.write_gguf(folder, path, "q8_0", export.Vocab.of(folder))
    _, read_back = verify.load_gguf(path)
    tokenizer = tiny_tokenizer(folder)
    for text in NUMBERS:
        assert read_back(text, add_special_tokens=False)["input_ids"] == \
            tokenizer(text, add_special_tokens=False)["input_ids"], text
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.eot_token_id"].contents() == tokenizer.convert_tokens_to_ids("<|im_end|>")
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[tokenizer.convert_tokens_to_ids("<|im_start|>")] == gguf.TokenType.CONTROL


def test_a_project_without_chat_formatting_gets_the_plain_prompt_template(tiny_llama):
    vocab = export.Vocab.of(tiny_llama, chat_formatting=False)
    messages = [{"role": "system", "content": "x"}, {"role": "user", "content": "Describe: Oak desk"}]
    assert render(vocab.chat_template, messages, tiny_tokenizer(tiny_llama)) == "Describe: Oak desk\n"
    assert vocab.eot_id is None


def test_a_sentencepiece_vocabulary_is_llama_cpps_llama_tokenizer(tmp_path, write_project):
    folder = tiny.build_tiny_tinyllama(tmp_path / "tinyllama")
    path = tmp_path / "tinyllama.gguf"
    export.write_gguf(folder, path, "f16", export.Vocab.of(folder))
    fields = {name: field.contents() for name, field in gguf.GGUFReader(path).fields.items()}
    tokenizer = tiny_tokenizer(folder)
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"]
    assert fields["tokenizer.ggml.token_type"][tokenizer.convert_tokens_to_ids("<0x41>")] == gguf.TokenType.BYTE
    assert fields["tokenizer.ggml.token_type"][tokenizer.unk_token_id] == gguf.TokenType.UNKNOWN
    scores = fields["tokenizer.ggml.scores"]
    first, second = (tokenizer.convert_tokens_to_ids("".join(m.split(" "))) for m in fields["tokenizer.ggml.merges"][:2])
    assert scores[first] > scores[second]  # the first merge scores highest: llama.cpp merges it first
    _, read_back = verify.load_gguf(path)
    for text in NUMBERS + ["ñandú 漢字 and  two  spaces"]:  # digits one by one, bytes for what the vocabulary lacks
        assert read_back(text, add_special_tokens=False)["input_ids"] == \
            tokenizer(text, add_special_tokens=False)["input_ids"], text
    cfg = load_config(str(write_project(folder)))
    vocab = export.Vocab.of(folder)
    text = render(vocab.chat_template, data.prompt_messages("Describe: Oak desk", cfg), tokenizer)
    ids = [vocab.bos_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    assert vocab.add_bos and ids == data.prompt_token_ids(tokenizer, "Describe: Oak desk", cfg)
    assert ids.count(tokenizer.bos_token_id) == 1
