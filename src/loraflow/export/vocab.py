"""The tokenizer as GGUF metadata: vocabulary, merges, token types, special ids, one BOS, pre-tokenizer, template.

    vocab = Vocab.of(Path("merged"))           # reads tokenizer.json (never a pickle) and tokenizer_config.json
    vocab.pre                                  # 'gpt2', 'smollm', 'llama-bpe' or 'qwen2': how numbers are split
    vocab.add_to(writer, vocab_size)           # tokenizer.ggml.* and tokenizer.chat_template

`tokenizer.ggml.pre` names the pre-tokenizer llama.cpp applies before BPE. It is derived from the real
tokenizer: its own pre-tokenizer splits a probe text (words, contractions, multi-digit numbers, spaces,
newlines), and the name is that of the llama.cpp pre-tokenizer whose `tokenizers` equivalent splits it
the same way. A tokenizer that matches none is refused, rather than exported to split differently.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import gguf

from loraflow import LoraflowError

PROBE = "Item SKU-20481 costs $1299.95, it's 3x faster!\n\n  Don't   stop: 7 12 123 1234 ñandú 漢字\t\r\nend  "
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
BOS_AT_START = re.compile(r"^\s*\{\{-?\s*bos_token\s*-?\}\}")
BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
NEVER_MERGED = -1e9  # the score of a SentencePiece token no merge makes: llama.cpp never prefers it


def llama_cpp_pre_tokenizers() -> dict:
    """llama.cpp's byte-level pre-tokenizers, each as the `tokenizers` pre-tokenizer that splits as it does."""
    from tokenizers import Regex, pre_tokenizers as pre

    byte_level = pre.ByteLevel(add_prefix_space=False, use_regex=False)
    return {"gpt2": pre.ByteLevel(add_prefix_space=False, use_regex=True),
            "smollm": pre.Sequence([pre.Digits(individual_digits=True),
                                    pre.ByteLevel(add_prefix_space=False, use_regex=True)]),
            "llama-bpe": pre.Sequence([pre.Split(Regex(LLAMA3_SPLIT), "isolated"), byte_level]),
            "qwen2": pre.Sequence([pre.Split(Regex(QWEN2_SPLIT), "isolated"), byte_level])}


def pre_tokenizer_name(tokenizer_json: str) -> str:
    """The llama.cpp pre-tokenizer that splits PROBE as the tokenizer's own pre-tokenizer does."""
    from tokenizers import Tokenizer

    own = Tokenizer.from_str(tokenizer_json).pre_tokenizer
    if own is None:
        raise LoraflowError("the tokenizer has no pre-tokenizer: GGUF export needs a byte-level BPE tokenizer")
    pieces = [piece for piece, _ in own.pre_tokenize_str(PROBE)]
    for name, candidate in llama_cpp_pre_tokenizers().items():
        if [piece for piece, _ in candidate.pre_tokenize_str(PROBE)] == pieces:
            return name
    raise LoraflowError(f"no llama.cpp pre-tokenizer splits text as this tokenizer's does "
                        f"({json.loads(tokenizer_json).get('pre_tokenizer', {}).get('type')}); supported: "
                        + ", ".join(llama_cpp_pre_tokenizers()))


def is_sentencepiece(parsed: dict) -> bool:
    """A SentencePiece vocabulary as tokenizer.json holds it (Llama 2, TinyLlama): BPE with byte fallback over
    words marked with ▁ by the normalizer or the pre-tokenizer (llama.cpp's `llama` tokenizer)."""
    marks = json.dumps([parsed.get("normalizer"), parsed.get("pre_tokenizer")], ensure_ascii=False)
    return bool(parsed["model"].get("byte_fallback")) and "▁" in marks


def sentencepiece_scores(tokens: dict, merges: list[str]) -> list[float]:
    """Scores that make llama.cpp's SentencePiece merges (the highest-scoring pair first) follow the BPE merge
    order (the lowest rank first): a merged token scores minus its merge's rank."""
    rank = {first + second: float(-index) for index, (first, _, second) in enumerate(m.partition(" ") for m in merges)}
    size = max(tokens) + 1
    return [rank.get(tokens.get(i, ""), 0.0 if len(tokens.get(i, "")) == 1 else NEVER_MERGED) for i in range(size)]


def bpe_merges(model: dict) -> list[str]:
    """Merges as 'a b' lines (tokenizer.json holds them as lines or as pairs)."""
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def token_table(parsed: dict) -> tuple[dict, dict]:
    """({id: token}, {id: GGUF token type}) of the vocabulary and the added tokens."""
    tokens = {index: token for token, index in parsed["model"]["vocab"].items()}
    types = {index: gguf.TokenType.BYTE if BYTE_TOKEN.match(token) else gguf.TokenType.NORMAL
             for index, token in tokens.items()}
    for added in parsed.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.BYTE if BYTE_TOKEN.match(added["content"]) else \
            gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    return tokens, types


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts bos before a text (its flag, or its post-processor does it)."""
    bos = tokenizer.bos_token_id
    return bos is not None and bool(getattr(tokenizer, "add_bos_token", False)
                                    or tokenizer("")["input_ids"][:1] == [bos])


def one_bos_template(template: str | None, bos_added: bool) -> str | None:
    """The chat template without a leading `{{ bos_token }}` where the runtime adds bos itself (add_bos_token):
    llama.cpp and Ollama put the bos before the rendered prompt, and training saw one, not two."""
    if not template or not bos_added:
        return template
    return BOS_AT_START.sub("", template, count=1)


def plain_prompt_template() -> str:
    """For projects without chat formatting (data.chat_template: false): the last user message, then a newline,
    as training formatted prompts."""
    return ("{%- for message in messages %}{%- if message['role'] == 'user' and loop.last %}"
            "{{ message['content'] + '\\n' }}{%- endif %}{%- endfor %}")


@dataclass
class Vocab:
    tokens: dict  # id -> token text
    types: dict  # id -> gguf.TokenType
    merges: list
    pre: str
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    eot_id: int | None  # the end of an assistant turn, where the chat template has one
    add_bos: bool
    chat_template: str | None
    scores: list | None = None  # SentencePiece vocabularies (tokenizer.ggml.model "llama"); None: byte-level BPE

    @classmethod
    def of(cls, model_dir: Path, chat_formatting: bool = True) -> Vocab:
        """The merged folder's tokenizer; `chat_formatting` False: the plain prompt template instead of its own."""
        from loraflow import models
        from loraflow.data.tokens import chat_turn_end

        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise LoraflowError(f"{model_dir} has no tokenizer.json: GGUF export needs a fast BPE tokenizer")
        text = path.read_text(encoding="utf-8")
        parsed = json.loads(text)
        if parsed["model"].get("type") != "BPE":
            raise LoraflowError(f"the tokenizer is {parsed['model'].get('type')}: GGUF export needs byte-level BPE")
        tokens, types = token_table(parsed)
        spm = is_sentencepiece(parsed)
        merges = bpe_merges(parsed["model"])
        tokenizer = models.load_tokenizer(str(model_dir))
        if tokenizer.unk_token_id is not None:
            types[tokenizer.unk_token_id] = gguf.TokenType.UNKNOWN
        end = chat_turn_end(tokenizer) if chat_formatting else ""
        bos_added = adds_bos(tokenizer)
        template = one_bos_template(tokenizer.chat_template, bos_added) if chat_formatting and \
            tokenizer.chat_template else plain_prompt_template()
        return cls(tokens, types, merges, "default" if spm else pre_tokenizer_name(text), tokenizer.bos_token_id,
                   tokenizer.eos_token_id, tokenizer.unk_token_id, tokenizer.pad_token_id,
                   tokenizer.convert_tokens_to_ids(end) if end else None, bos_added, template,
                   sentencepiece_scores(tokens, merges) if spm else None)

    def token_list(self, vocab_size: int) -> tuple[list[str], list[int]]:
        """Tokens and types for every id below vocab_size (ids the tokenizer lacks: unused placeholders)."""
        size = max(vocab_size, max(self.tokens) + 1)
        tokens = [self.tokens.get(i, f"[PAD{i}]") for i in range(size)]
        return tokens, [int(self.types.get(i, gguf.TokenType.UNUSED)) for i in range(size)]

    def add_to(self, writer: gguf.GGUFWriter, vocab_size: int) -> None:
        tokens, types = self.token_list(vocab_size)
        writer.add_tokenizer_model("gpt2" if self.scores is None else "llama")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(self.merges)  # SentencePiece too: transformers' reader uses them
        if self.scores is not None:
            writer.add_token_scores(self.scores + [NEVER_MERGED] * (len(tokens) - len(self.scores)))
            writer.add_add_space_prefix(True)
        for value, add in ((self.bos_id, writer.add_bos_token_id), (self.eos_id, writer.add_eos_token_id),
                           (self.unk_id, writer.add_unk_token_id), (self.pad_id, writer.add_pad_token_id),
                           (self.eot_id, writer.add_eot_token_id)):
            if value is not None:
                add(value)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(False)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)
