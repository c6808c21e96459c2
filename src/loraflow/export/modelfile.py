"""An Ollama Modelfile for an exported GGUF: FROM, the TEMPLATE of the model's chat format, stops, SYSTEM,
the project's generation defaults.

    text = modelfile("tiny-v3-f16.gguf", tokenizer, settings)   # settings: the version's saved model config

The TEMPLATE is written per chat family (ChatML, Llama 3, Zephyr), in the Go-template subset
export.gotemplate renders, and must give for a conversation the text the tokenizer's chat template
gives (tests compare them). A project without chat formatting (data.chat_template: false) gets a
prompt template: the prompt and a newline, as training formatted it. Ollama adds the bos the GGUF
asks for (tokenizer.ggml.add_bos_token) itself, so no template writes it a second time.
"""
from __future__ import annotations

import re

from loraflow import LoraflowError
from loraflow.data.tokens import chat_turn_end
from loraflow.export.gotemplate import render
from loraflow.export.vocab import adds_bos

FAMILIES = {
    "chatml": ("<|im_start|>", "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
                               "{{ end }}<|im_start|>assistant\n",
               r"<\|im_start\|>system\n(.*?)<\|im_end\|>"),
    "llama3": ("<|start_header_id|>", "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
                                      "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant"
                                      "<|end_header_id|>\n\n",
               r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>"),
    "zephyr": ("<|user|>", "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}{{ $.Eos }}\n{{ end }}"
                           "<|assistant|>\n", r"<\|system\|>\n(.*?)</s>"),
}
PLAIN_TEMPLATE = "{{ .Prompt }}\n"
PROBE = "Describe: oak desk"


def chat_family(tokenizer) -> str:
    """Which family's TEMPLATE renders this tokenizer's chat template."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": PROBE}], tokenize=False,
                                             add_generation_prompt=True)
    for name, (marker, _, _) in FAMILIES.items():
        if marker in rendered:
            return name
    raise LoraflowError(f"no Ollama template for this chat template (it renders {rendered[:60]!r}); "
                        f"known: {', '.join(FAMILIES)}")


def system_text(tokenizer, family: str, system_prompt: str) -> str:
    """The system message as the chat template writes it: the project's (with whatever the template puts before
    it, such as Llama 3.1's date lines), or the template's default where the project has none ('' if neither)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    rendered = tokenizer.apply_chat_template([*messages, {"role": "user", "content": PROBE}], tokenize=False,
                                             add_generation_prompt=True)
    found = re.search(FAMILIES[family][2], rendered, re.DOTALL)
    return found.group(1) if found else system_prompt


def ollama_values(messages: list[dict], system: str = "") -> dict:
    """What Ollama passes a TEMPLATE for a chat request: .Messages (Role, Content), the Modelfile's SYSTEM first
    where the conversation has no system message, .System and .Prompt (the last user message)."""
    if system and not any(m["role"] == "system" for m in messages):
        messages = [{"role": "system", "content": system}, *messages]
    users = [m["content"] for m in messages if m["role"] == "user"]
    return {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages],
            "System": next((m["content"] for m in messages if m["role"] == "system"), ""),
            "Prompt": users[-1] if users else ""}


def go_template(tokenizer, chat_formatting: bool) -> str:
    """The Modelfile TEMPLATE: the family's, behind the bos where the chat template writes one that the runtime
    does not add (tokenizer.ggml.add_bos_token false); the plain prompt template without chat formatting."""
    if not (chat_formatting and tokenizer.chat_template):
        return PLAIN_TEMPLATE
    template = FAMILIES[chat_family(tokenizer)][1].replace("{{ $.Eos }}", tokenizer.eos_token or "")
    messages = [{"role": "user", "content": PROBE}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token or ""
    if bos and not adds_bos(tokenizer) and rendered == bos + render(template, ollama_values(messages)):
        template = bos + template
    return template


def stop_tokens(tokenizer, chat_formatting: bool) -> list[str]:
    """The end of an assistant turn and eos, once each."""
    ends = [chat_turn_end(tokenizer) if chat_formatting and tokenizer.chat_template else "", tokenizer.eos_token]
    return list(dict.fromkeys(token for token in ends if token))


def quoted(text: str) -> str:
    if '"""' in text:
        raise LoraflowError('the text for the Modelfile holds """, which a Modelfile cannot quote')
    return f'"""{text}"""'


def modelfile(gguf_name: str, tokenizer, settings: dict) -> str:
    """The Modelfile text; `settings` is the version's saved model config (data, eval, registry sections)."""
    data, generate = settings.get("data", {}), settings.get("eval", {})
    chat = bool(data.get("chat_template", True))
    lines = [f"FROM ./{gguf_name}", "", f"TEMPLATE {quoted(go_template(tokenizer, chat))}", ""]
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens(tokenizer, chat)]
    cap = settings.get("registry", {}).get("max_new_tokens_cap", 512)
    lines += [f"PARAMETER temperature {float(generate.get('temperature', 0.0)):g}",
              f"PARAMETER top_p {float(generate.get('top_p', 1.0)):g}",
              f"PARAMETER repeat_penalty {float(generate.get('repetition_penalty', 1.0)):g}",
              f"PARAMETER num_predict {min(int(generate.get('max_new_tokens', 64)), int(cap))}"]
    if chat and tokenizer.chat_template:
        system = system_text(tokenizer, chat_family(tokenizer), data.get("system_prompt") or "")
        if system:
            lines += ["", f"SYSTEM {quoted(system)}"]
    return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> dict:
    """{'FROM': ..., 'TEMPLATE': ..., 'SYSTEM': ..., 'PARAMETER': [(name, value), ...]}, as Ollama reads it."""
    found: dict = {"PARAMETER": []}
    for match in re.finditer(r'^(\w+) (?:"""(.*?)"""|([^\n]*))$', text, re.MULTILINE | re.DOTALL):
        command, value = match.group(1), match.group(2) if match.group(2) is not None else match.group(3)
        if command == "PARAMETER":
            name, _, rest = value.partition(" ")
            found["PARAMETER"].append((name, rest.strip('"')))
        else:
            found[command] = value
    return found
