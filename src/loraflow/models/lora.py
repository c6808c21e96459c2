"""LoRA on a model: which modules, attaching it with loraflow's kernels, loading and merging an adapter.

    model = attach_lora(model, cfg)
    model, tokenizer = load_served(cfg, base_path, adapter_dir)   # what the gate judges and the server answers from
    merged_dir = merge_adapter(cfg, base_path, adapter_dir, out_dir)
"""
from __future__ import annotations

from pathlib import Path

from loraflow import LoraflowError
from loraflow.config import Config
from loraflow.models.loading import load_model, merged_dtype, saved_dtype, served_dtype


def linear_module_names(model) -> list[str]:
    """Leaf names of every linear layer except the output head (what `all-linear` means in PEFT)."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")})


def lora_config(cfg: Config, model=None):
    import peft

    task = peft.TaskType.SEQ_2_SEQ_LM if cfg.model.kind == "seq2seq" else peft.TaskType.CAUSAL_LM
    targets = cfg.lora.target_modules
    if isinstance(targets, str) and cfg.lora.layers_to_transform is not None and model is not None:
        targets = linear_module_names(model) if targets == "all-linear" else [targets]  # PEFT needs a list here
    return peft.LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                           target_modules=targets, task_type=task, bias="none",
                           layers_to_transform=cfg.lora.layers_to_transform)


def attach_lora(model, cfg: Config):
    """Wrap `model` with trainable LoRA adapters (after k-bit preparation for quantised models)."""
    import peft

    from loraflow.kernels import fused_lora, head_loss

    if cfg.model.quantization != "none":
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.train.gradient_checkpointing)
    elif cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    try:
        model = peft.get_peft_model(model, lora_config(cfg, model))
    except ValueError as exc:
        raise LoraflowError(f"cannot attach LoRA: {str(exc).splitlines()[0]}") from None
    use_sixteen_bit_dropout(model)
    skip_input_casts_under_autocast(model)
    fused_lora.install(model)
    head_loss.install(model, cfg)
    return model


def use_sixteen_bit_dropout(model) -> int:
    """Swap PEFT's LoRA dropout modules for dropout.SixteenBitDropout (the same p, one LastMask shared by all, so
    layers fed the same input share its mask); returns how many were swapped."""
    import torch

    from loraflow.kernels.dropout import LastMask, SixteenBitDropout

    shared = LastMask()
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in dropouts.items():
                if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                    dropouts[name] = SixteenBitDropout(dropout.p, shared)
                    swapped += 1
    return swapped


class CastUnlessAutocast:
    """False while CPU autocast is on: a LoRA layer's `cast_input_dtype_enabled` that skips PEFT's input cast then.

    PEFT casts a LoRA layer's input to its adapter weights' dtype (fp32) before dropout and lora_A; under bf16
    autocast lora_A casts it straight back, so each of the 210 LoRA inputs of SmolLM2 was copied twice a forward
    (and twice again backward). Skipping the first cast gives the same numbers (bf16 dropout rounds once, as
    the fp32 product rounded to bf16 by autocast did). Without autocast (validation loss, generation) PEFT casts
    as before, so fp32 adapter weights never meet a bf16 input."""

    def __bool__(self) -> bool:
        import torch

        return not torch.is_autocast_enabled("cpu")


def skip_input_casts_under_autocast(model) -> int:
    """Give every PEFT layer of a CPU model a CastUnlessAutocast; returns how many. On a GPU PEFT keeps casting."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    if torch.cuda.is_available():
        return 0
    layers = [module for module in model.modules() if isinstance(module, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = CastUnlessAutocast()
    return len(layers)


def load_adapter(model, adapter_dir: str | Path):
    """Base model + a saved PEFT adapter, ready for inference."""
    import peft

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise LoraflowError(f"no PEFT adapter in {adapter_dir} (adapter_config.json missing)")
    return peft.PeftModel.from_pretrained(model, str(adapter_dir)).eval()


def load_served(cfg: Config, base_path: str, adapter_dir: str | Path, device: str | None = None):
    """(model, tokenizer) in the served form: the base unquantised in the served dtype (registry.serve_dtype) with
    the adapter attached, not merged, in eval mode. The gate judges exactly this and the server answers from it,
    so a served greedy answer is the one the gate saw; several adapters can share the one base."""
    base, tokenizer = load_model(cfg, base_path, quantize=False, dtype=served_dtype(cfg), device=device)
    try:
        return load_adapter(base, adapter_dir), tokenizer
    except (ValueError, RuntimeError) as exc:  # another model's modules or shapes
        raise LoraflowError(f"the adapter in {adapter_dir} does not fit the base {base_path}: "
                            f"{str(exc).splitlines()[0]}") from None


def merge_adapter(cfg: Config, base_path: str, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge an adapter into the unquantised base (never into 4-bit weights) and save it in registry.merge_dtype
    (auto: the served dtype). Not what is served (load_served is): the merged folder is for readers without PEFT.

    The merge runs on the CPU with one full model in memory: the base loads in the dtype its checkpoint holds
    (16-bit weights stay 16-bit: 16 GB of host memory for an 8B model, no device memory), and each LoRA layer
    merges in fp32 and is rounded once to the merge dtype, as a merge of the whole model in fp32 would be."""
    import torch

    dtype = merged_dtype(cfg)
    stored = saved_dtype(base_path) or torch.float32
    base, tokenizer = load_model(cfg, base_path, quantize=False, dtype=stored, device="cpu")
    model = load_adapter(base, adapter_dir)
    merge_layers_in_fp32(model, dtype)
    merged = model.unload().to(dtype)
    out_dir = Path(out_dir)
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if merged.generation_config is not None:
        merged.generation_config.save_pretrained(out_dir)
    return out_dir


def merge_layers_in_fp32(model, dtype) -> int:
    """Merge every LoRA layer of a PEFT model into its base weight: the weight in fp32 for the merge (one layer at a
    time), then in `dtype`. Returns how many layers were merged."""
    import torch
    from peft.tuners.lora import LoraLayer

    layers = [module for module in model.modules() if isinstance(module, LoraLayer)]
    for layer in layers:
        weight = layer.get_base_layer().weight
        weight.data = weight.data.to(torch.float32)
        layer.merge()
        weight.data = weight.data.to(dtype)
    return len(layers)
