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
