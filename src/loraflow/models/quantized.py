"""Quantised copies kept on disk, so later runs and tune trials load them instead of quantising again.

    model = load_quantized(cfg, path, kwargs)     # from $LORAFLOW_QUANTIZED_CACHE, or quantise and keep
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from loraflow import warn
from loraflow.config import Config
from loraflow.data.readers import first_line
from loraflow.models.resolve import cache_dir, model_class


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
    settings, the dtype, the model class, the device it is quantised on (bitsandbytes' CPU and CUDA backends
    each load their own) and the library versions (as JSON values). None for a hub id."""
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
                   "device": "cuda" if torch.cuda.is_available() else "cpu",
                   "versions": [torch.__version__, transformers.__version__, bitsandbytes.__version__]}
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))


def fingerprint_key(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:24]


def load_quantized(cfg: Config, path: str, kwargs: dict):
    """The base model quantised per kwargs, from its kept copy when there is one, else quantised now and
    kept. On the CPU, bitsandbytes takes seconds to quantise even a small model at every load (every
    training run, every tune trial); loading the saved nf4/int8 weights gives the same model in a blink. On a
    GPU, transformers puts a quantised model on the current device, kept copy or not."""
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
