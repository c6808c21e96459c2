"""Loading a model and its tokenizer: the compute dtype this machine runs natively, nf4 / int8 / none.

    model, tokenizer = load_model(cfg, path)     # quantised per cfg (a quantised copy kept, CPU or GPU)
"""
from __future__ import annotations

import functools
from pathlib import Path

from loraflow import LoraflowError
from loraflow.config import Config
from loraflow.models.quantized import load_quantized
from loraflow.models.resolve import model_class


def compute_dtype(cfg: Config):
    """The torch dtype to compute in: bf16 where the GPU or CPU has native support, else fp32."""
    import torch

    choice = cfg.model.dtype
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return dtype_named(choice)


DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def dtype_named(name: str):
    """The torch dtype a config spells bf16, fp16 or fp32 (model.dtype, registry.serve_dtype, merge_dtype)."""
    import torch

    return getattr(torch, DTYPE_NAMES[name])


def name_of_dtype(dtype) -> str:
    """How a config spells a torch dtype: torch.bfloat16 -> "bf16"."""
    return {torch_name: name for name, torch_name in DTYPE_NAMES.items()}[str(dtype).removeprefix("torch.")]


def served_dtype(cfg: Config):
    """The dtype a registered version is gated and served in: registry.serve_dtype, where auto is model.dtype's
    compute dtype on this machine (register records what it resolved to, so every server loads the same)."""
    choice = cfg.registry.serve_dtype
    return compute_dtype(cfg) if choice == "auto" else dtype_named(choice)


def merged_dtype(cfg: Config):
    """The dtype of the merged folder register saves: registry.merge_dtype, where auto is the served dtype."""
    choice = cfg.registry.merge_dtype
    return served_dtype(cfg) if choice == "auto" else dtype_named(choice)


def saved_dtype(folder) -> "torch.dtype | None":
    """The dtype a model folder's weights were saved in (its config.json), or None when it does not say."""
    import json

    import torch

    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype")
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(name)


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def quantization_config(cfg: Config):
    import transformers

    if cfg.model.quantization == "nf4":
        return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=compute_dtype(cfg))
    if cfg.model.quantization == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_tokenizer(path: str):
    """The tokenizer saved in the folder `path`, with a pad token. Shared: the process loads it once while the
    folder's files stay the same (tune's trials, a pipeline's stages: 0.25 s a load), so callers must not change it."""
    folder = Path(path)
    if not folder.is_dir():
        return read_tokenizer(path)
    files = sorted((f.name, f.stat()) for f in folder.iterdir() if f.is_file())
    return shared_tokenizer(str(folder.resolve()), tuple((name, s.st_mtime_ns, s.st_size) for name, s in files))


@functools.lru_cache(maxsize=8)
def shared_tokenizer(folder: str, stamp: tuple):
    """read_tokenizer(folder), kept per (folder, stamp of its files)."""
    return read_tokenizer(folder)


def read_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise LoraflowError(f"cannot load the tokenizer of {path}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if cleanup_skipped_for_bpe(tokenizer):
        tokenizer.clean_up_tokenization_spaces = False  # the same text; no warning from every process that decodes
    return tokenizer


def cleanup_skipped_for_bpe(tokenizer) -> bool:
    """Whether transformers skips `tokenizer`'s clean_up_tokenization_spaces (it does for a BPE model, unless
    forced: the cleanup would strip spaces before punctuation) and warns that it does, as SmolLM2's asks for it."""
    backend_model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    return bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)) and type(backend_model).__name__ == "BPE" \
        and not getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)


def load_model(cfg: Config, path: str, *, quantize: bool = True, dtype=None, device: str | None = None):
    """(model, tokenizer) for `path`, quantised per model.quantization unless quantize=False; an unquantised model
    goes to the GPU when there is one, unless `device` names another ("cpu")."""
    import torch

    quant = quantization_config(cfg) if quantize else None
    dtype = dtype or compute_dtype(cfg)
    kwargs = {"dtype": dtype if quant is None else (torch.float32 if cfg.model.quantization == "int8" else dtype)}
    if quant is not None:
        kwargs["quantization_config"] = quant
    try:
        if quant is not None:  # on a GPU too: every tune trial would otherwise read and quantise the checkpoint
            model = load_quantized(cfg, path, kwargs)
        else:
            model = model_class(cfg).from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        raise LoraflowError(f"cannot load model {path}: {str(exc).splitlines()[0]}") from None
    device = device or default_device()
    if quant is None and device != "cpu":
        model = model.to(device)
    return model, load_tokenizer(path)


def default_device() -> str:
    """Where an unquantised model goes unless told: the GPU when there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def release_memory() -> None:
    """Hand back what models no longer referenced held, before the next one loads: a full garbage collection,
    CUDA's cached blocks, and the C heap's free pages (glibc's malloc_trim; torch's CPU tensors live there)."""
    import ctypes
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
