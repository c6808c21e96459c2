"""The Modelfile's TEMPLATE, rendered as Ollama would (export.gotemplate), against the tokenizer's chat template:
three conversations per chat family, the system prompt, the stops and a project without chat formatting."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from loraflow import LoraflowError, export, models, tiny
from loraflow.data.tokens import missing_bos

SMOLLM2_TEMPLATE = (  # SmolLM2-Instruct's own: a default system message when the conversation has none
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
ZEPHYR_TEMPLATE = (  # TinyLlama-1.1B-Chat's
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
LLAMA31_TEMPLATE = (  # Llama 3.1's layout in short: a system turn always, with date lines before its text
    "{{- bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set rest = messages[1:] %}{% else %}{% set system = '' %}{% set rest = messages %}{% endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\n{{ system }}<|eot_id|>"
    "{% for m in rest %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "Describe: Oak desk 1200 x 600"}],
    [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "Describe: Red mug"}],
    [{"role": "user", "content": "Describe: Blue lamp"}, {"role": "assistant", "content": "A blue lamp, 40 W."},
     {"role": "user", "content": "Shorter, please."}],
]


@pytest.fixture(scope="module")
def folders(tiny_llama, tmp_path_factory) -> dict:
    """One tokenizer folder per chat family: ChatML (tiny Llama, tiny Qwen2), SmolLM2's ChatML with a default
    system message, Llama 3 (and 3.1's date lines), Zephyr (TinyLlama's chat: on the tiny model's vocabulary, and on a SentencePiece one
    with eos </s> and bos added by the tokenizer)."""
    root = tmp_path_factory.mktemp("families")
    found = {"chatml": tiny_llama, "qwen2": tiny.build_tiny_qwen2(root / "qwen2"),
             "llama3": tiny.build_tiny_llama3(root / "llama3"), "tinyllama": tiny.build_tiny_tinyllama(root / "tl")}
    for name, source, template in (("smollm2", tiny_llama, SMOLLM2_TEMPLATE), ("zephyr", tiny_llama, ZEPHYR_TEMPLATE),
                                   ("llama31", found["llama3"], LLAMA31_TEMPLATE)):
        shutil.copytree(source, root / name)
        tokenizer = models.read_tokenizer(str(root / name))
        tokenizer.chat_template = template
        tokenizer.save_pretrained(root / name)
        found[name] = root / name
    return found


def parsed(folder: Path, **data) -> tuple[dict, object]:
    tokenizer = models.read_tokenizer(str(folder))
    settings = {"data": {"chat_template": True, "system_prompt": "", **data}, "eval": {"max_new_tokens": 48}}
    return export.parse_modelfile(export.modelfile("m.gguf", tokenizer, settings)), tokenizer


@pytest.mark.parametrize("family", ["chatml", "qwen2", "smollm2", "llama3", "llama31", "zephyr", "tinyllama"])
@pytest.mark.parametrize("system_prompt", ["", "You write product copy."])
def test_the_template_renders_what_the_chat_template_renders(folders, family, system_prompt):
    modelfile, tokenizer = parsed(folders[family], system_prompt=system_prompt)
    bos = [tokenizer.bos_token_id] if export.adds_bos(tokenizer) else []
    for conversation in CONVERSATIONS:
        if family == "llama31" and conversation[0]["role"] == "system":
            continue  # a conversation's own system message replaces SYSTEM, date lines and all (README, Export)
        asked = conversation  # what training and the server send: data.system_prompt first, unless one is given
        if system_prompt and conversation[0]["role"] != "system":
            asked = [{"role": "system", "content": system_prompt}, *conversation]
        expected = tokenizer.apply_chat_template(asked, tokenize=False, add_generation_prompt=True)
        got = export.render(modelfile["TEMPLATE"], export.ollama_values(conversation, modelfile.get("SYSTEM", "")))
        ids = bos + tokenizer(got, add_special_tokens=False)["input_ids"]  # the runtime adds the bos the file asks for
        trained = tokenizer(expected, add_special_tokens=False)["input_ids"]
        assert ids == missing_bos(tokenizer, trained) + trained, (family, got, expected)


def test_the_system_line_is_the_projects_or_the_templates_default(folders):
    assert parsed(folders["chatml"], system_prompt="Be brief.")[0]["SYSTEM"] == "Be brief."
    assert "SYSTEM" not in parsed(folders["chatml"])[0]
    assert parsed(folders["smollm2"])[0]["SYSTEM"].startswith("You are a helpful AI assistant named SmolLM")


def test_stops_and_generation_defaults(folders):
    assert ("stop", "<|eot_id|>") in parsed(folders["llama3"])[0]["PARAMETER"]
    modelfile, _ = parsed(folders["chatml"])
    assert modelfile["FROM"] == "./m.gguf"
    assert dict(modelfile["PARAMETER"]) == {"stop": "<|im_end|>", "temperature": "0", "top_p": "1",
                                            "repeat_penalty": "1", "num_predict": "48"}
    assert [value for name, value in parsed(folders["zephyr"])[0]["PARAMETER"] if name == "stop"] == ["<|im_end|>"]


def test_without_chat_formatting_the_prompt_template_is_the_prompt_and_a_newline(folders):
    modelfile, _ = parsed(folders["llama3"], chat_template=False)
    assert export.render(modelfile["TEMPLATE"], export.ollama_values(CONVERSATIONS[2])) == "Shorter, please.\n"
    assert "SYSTEM" not in modelfile  # training formatted no system message either


def test_an_unknown_chat_format_is_refused(folders, tmp_path):
    shutil.copytree(folders["chatml"], tmp_path / "odd")
    tokenizer = models.read_tokenizer(str(tmp_path / "odd"))
    tokenizer.chat_template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(LoraflowError, match="no Ollama template for this chat template"):
        export.modelfile("m.gguf", tokenizer, {"data": {}})
