"""Lineage and what goes into the record: the code version, the config and training hashes, file
digests, secrets redacted, an exception's one-line reason.

    lineage_tags(cfg, "train")   # {loraflow.stage, loraflow.git_sha, loraflow.config_hash, ...}
"""
from __future__ import annotations

import hashlib
import json
import re
import subprocess
from pathlib import Path

from loraflow.config import Config
from loraflow.tracking.names import Tags


def git_sha(folder: Path | None = None) -> str:
    """The commit of the code that runs; uncommitted changes to the package add a hash of their diff
    (`<sha>-dirty-<hash>`), so two different edits never pass for each other. Outside git: `loraflow-<version>`."""
    from loraflow import __version__

    def git(*args):
        return subprocess.run(["git", *args], cwd=folder or Path(__file__).parent, capture_output=True, timeout=10)
    try:
        sha = git("rev-parse", "HEAD")
        if sha.returncode != 0:
            return f"loraflow-{__version__}"
        diff = git("diff", "HEAD", "--", ".").stdout  # the package's own code; docs and data do not count
        suffix = f"-dirty-{hashlib.sha256(diff).hexdigest()[:8]}" if diff.strip() else ""
        return sha.stdout.decode().strip() + suffix
    except (OSError, subprocess.SubprocessError):
        return f"loraflow-{__version__}"


TRAINING_SECTIONS = ("model", "data", "lora", "train")


def training_hash(cfg: Config) -> str:
    """A hash of the config sections that decide a trained adapter: evaluate and register look for a run
    trained with the same ones, whatever their own eval/registry settings."""
    values = cfg.to_dict()
    blob = json.dumps({name: values[name] for name in TRAINING_SECTIONS}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def lineage_tags(cfg: Config, stage: str) -> dict:
    return {Tags.STAGE: stage, Tags.PROJECT: cfg.name, Tags.GIT_SHA: git_sha(), Tags.CONFIG_HASH: cfg.config_hash(),
            Tags.TRAINING_HASH: training_hash(cfg), Tags.BASE_MODEL: cfg.model.name}


def redact(text: str) -> str:
    """`scheme://user:***@host` for every password inside a URL in `text`."""
    return re.sub(r"(//[^:/@\s]+):[^@/\s]*@", r"\1:***@", str(text))


def flat_params(cfg: Config) -> dict:
    """Config as MLflow params: dotted keys, lists as JSON, passwords in URLs as ***."""
    params = {}
    for section, values in cfg.to_dict().items():
        if not isinstance(values, dict):
            params[section] = values
            continue
        for key, value in values.items():
            value = json.dumps(value) if isinstance(value, (list, dict)) else value
            params[f"{section}.{key}"] = redact(value) if isinstance(value, str) else value
    return params


def first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__


def file_digest(path: Path, extra: str = "") -> str:
    """sha256 (16 hex) of a file's bytes plus `extra` (e.g. the reading settings)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(extra.encode())
    return digest.hexdigest()[:16]
