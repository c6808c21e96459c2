"""Export for local runtimes: a merged folder as a GGUF file (llama.cpp, Ollama, LM Studio) and an Ollama Modelfile.

    vocab = export.Vocab.of(merged_dir)                               # tokenizer metadata, pre-tokenizer, template
    info = export.write_gguf(merged_dir, out / "tiny-v3-f16.gguf", "f16", vocab, name="tiny-v3")
    text = export.modelfile("tiny-v3-f16.gguf", tokenizer, settings)

converter: the tensors and hyperparameters, tensor by tensor through gguf's writer; vocab: the
tokenizer as GGUF metadata; modelfile: Ollama's Modelfile and its chat templates; gotemplate: a
renderer for the Go-template subset those use; verify: comparisons with transformers' GGUF reader.
The stage (`loraflow export`, stages/export.py) finds the version, stages the folder and records the run.
"""
from loraflow.export.converter import (ARCHITECTURES, QUANTIZATIONS, SUPPORTED, GGUFInfo, permute_for_rope,
                                       read_config, rope_freq_factors, write_gguf)
from loraflow.export.gotemplate import render
from loraflow.export.modelfile import (FAMILIES, chat_family, go_template, modelfile, ollama_values, parse_modelfile,
                                      stop_tokens)
from loraflow.export.vocab import Vocab, adds_bos, one_bos_template, pre_tokenizer_name

__all__ = ["ARCHITECTURES", "QUANTIZATIONS", "SUPPORTED", "GGUFInfo", "permute_for_rope", "read_config",
           "rope_freq_factors", "write_gguf", "render", "FAMILIES", "chat_family", "go_template", "modelfile",
           "ollama_values", "parse_modelfile", "stop_tokens", "Vocab", "adds_bos", "one_bos_template", "pre_tokenizer_name"]
