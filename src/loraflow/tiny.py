"""Tiny random models with tokenizers trained on the spot, for tests and the benchmarks' smoke modes.

    folder = tiny.build_tiny_llama(Path("/tmp/tiny"))   # 2-layer Llama, hidden 64, chat template

Hidden size 64 is the smallest that bitsandbytes' 4-bit CPU kernels take.
"""
from __future__ import annotations

from pathlib import Path

from loraflow.data.catalogue import catalogue_rows

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def catalogue_corpus() -> list[str]:
    rows = catalogue_rows(300, seed=0)
    return [r["title"] + "\n" + r["content"] for r in rows] + ["Write a product description for: user assistant"]


def train_tokenizer(corpus: list[str], specials: list[str]):
    """A small byte-level BPE tokenizer trained on `corpus`, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer)


def build_tiny_llama(folder: Path) -> Path:
    """A 2-layer Llama (hidden 64) with a BPE tokenizer and a chat template, saved to `folder`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(catalogue_corpus(), ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"])
    tokenizer.add_special_tokens({"unk_token": "<unk>", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                  "pad_token": "<pad>"})
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_t5(folder: Path) -> Path:
    """A flan-t5-shaped seq2seq model (gated-gelu: wi_0/wi_1/wo), 2 layers, d_model 16, saved to `folder`."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = train_tokenizer(catalogue_corpus(), ["<pad>", "</s>", "<unk>"])
    tokenizer.add_special_tokens({"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"})
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
                      num_heads=2, feed_forward_proj="gated-gelu", decoder_start_token_id=tokenizer.pad_token_id,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      tie_word_embeddings=False)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --- more families, for the GGUF export's tests (Qwen2, Llama 3, SmolLM2's tied embeddings) -------------

LLAMA3_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
                        "\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
SPLIT_BEFORE_BYTES = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                      r"\s*[\r\n]+|\s+(?!\S)|\s+")  # Llama 3's; Qwen2's takes one digit at a time


def train_split_tokenizer(corpus: list[str], specials: list[str], pattern: str):
    """Like train_tokenizer, with a regex split before the byte-level step (how Llama 3 and Qwen2 pre-tokenize)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tokenizer


def save_tiny(folder: Path, model, tokenizer, eos_id: int, pad_id: int) -> Path:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_qwen2(folder: Path) -> Path:
    """A 2-layer Qwen2 (hidden 64, q/k/v biases, tied embeddings) with Qwen2's pre-tokenizer, no bos, ChatML."""
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = train_split_tokenizer(catalogue_corpus(), specials, SPLIT_BEFORE_BYTES.replace(r"\p{N}{1,3}", r"\p{N}"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token=None, bos_token=None)
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, tie_word_embeddings=True, initializer_range=0.1)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # random biases, so that a lost bias shows
        for layer in model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.bias.normal_(0, 0.1)
    return save_tiny(folder, model, tokenizer, tokenizer.eos_token_id, tokenizer.pad_token_id)


def build_tiny_llama3(folder: Path, tied: bool = False) -> Path:
    """A 2-layer Llama with Llama 3's RoPE scaling, pre-tokenizer, bos added by the tokenizer and written by the
    chat template (`{{ bos_token }}`), and its chat format; `tied`: tied embeddings (as Llama 3.2 1B)."""
    import torch
    from tokenizers import processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    backend = train_split_tokenizer(catalogue_corpus(), specials, SPLIT_BEFORE_BYTES)
    backend.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>",
                                        eos_token="<|eot_id|>", pad_token="<|end_of_text|>")
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    torch.manual_seed(0)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters=rope, bos_token_id=0, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tied, initializer_range=0.1)
    return save_tiny(folder, LlamaForCausalLM(config), tokenizer, tokenizer.eos_token_id, tokenizer.pad_token_id)


def build_tiny_smollm(folder: Path) -> Path:
    """SmolLM2's shape in small: build_tiny_llama's tokenizer and chat format (bos <|im_start|>, not added by
    the tokenizer), tied embeddings, an explicit head_dim."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(catalogue_corpus(), ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"])
    tokenizer.add_special_tokens({"unk_token": "<unk>", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
                                  "pad_token": "<pad>"})
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, initializer_range=0.1)
    return save_tiny(folder, LlamaForCausalLM(config), tokenizer, tokenizer.eos_token_id, tokenizer.pad_token_id)


ZEPHYR_CHAT_TEMPLATE = (  # TinyLlama-1.1B-Chat's
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")


def train_sentencepiece_style_tokenizer(corpus: list[str]):
    """A BPE vocabulary laid out as Llama 2's and TinyLlama's tokenizer.json hold SentencePiece: words marked with
    \u2581 by the normalizer, no pre-tokenizer, digits one by one, <0x00>..<0xFF> for byte fallback, bos added."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([  # for training only: no merge across words or digits
        pre_tokenizers.Split("\u2581", "merged_with_next"), pre_tokenizers.Digits(individual_digits=True)])
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=specials))
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tokenizer


def build_tiny_tinyllama(folder: Path) -> Path:
    """TinyLlama-1.1B-Chat in small: a SentencePiece-style vocabulary (llama.cpp's `llama` tokenizer), bos added by
    the tokenizer, the Zephyr chat format, untied embeddings, grouped-query attention."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=train_sentencepiece_style_tokenizer(catalogue_corpus()),
                                        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    tokenizer.chat_template = ZEPHYR_CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
                         initializer_range=0.1)
    return save_tiny(folder, LlamaForCausalLM(config), tokenizer, 2, 2)
