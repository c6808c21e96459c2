"""Base models: resolve a name to a local folder, load (quantised or not), attach LoRA, merge.

    path = models.resolve_model_path("smollm2-135m-instruct")   # converted once from GGUF, cached
    model, tokenizer = models.load_model(cfg, path)              # nf4 / int8 / none per cfg (a quantised
                                                                 # copy kept on the CPU: quantised once)
    model = models.attach_lora(model, cfg)

resolve: names to folders (the embedded GGUF converted once); loading: dtype, quantisation,
tokenizers; quantized: the kept quantised copies; lora: LoRA attached with loraflow's kernels,
adapters loaded (load_served: the form a registered version is gated and served in) and merged;
attention: the faster CPU attention; head: the LM head at labelled tokens only. The names below
are the package's interface.
"""
from loraflow.models.attention import eager_is_faster, faster_cpu_attention
from loraflow.models.head import LabelledTokensHead, head_on_labelled_tokens, takes_logits_to_keep
from loraflow.models.loading import (cleanup_skipped_for_bpe, compute_dtype, cpu_has_bf16, dtype_named, load_model,
                                     load_tokenizer, merged_dtype, name_of_dtype, quantization_config, read_tokenizer,
                                     release_memory, saved_dtype, served_dtype)
from loraflow.models.lora import (CastUnlessAutocast, attach_lora, linear_module_names, load_adapter, load_served,
                                  lora_config, merge_adapter, merge_layers_in_fp32, skip_input_casts_under_autocast,
                                  use_sixteen_bit_dropout)
from loraflow.models.quantized import (QUANTIZED_SOURCE, STALE_STAGING_SECONDS, load_quantized, quantized_cache_dir,
                                       quantized_fingerprint)
from loraflow.models.resolve import (EMBEDDED_GGUF, EMBEDDED_WHEEL, cache_dir, convert_gguf, embedded_gguf,
                                     model_class, resolve_model_path)
