"""Export a registered version for local runtimes: a GGUF file, an Ollama Modelfile and a README.

    loraflow export quickstart                                   # @champion (registry.alias), in f16
    loraflow export quickstart --model-uri models:/quickstart/3 --quantization q8_0 --output exports/qs
    result = export.run(cfg, store)                              # ExportResult(run_id, version="3", ...)

The version's merged folder is converted tensor by tensor (loraflow.export) into
`NAME-vVERSION-QUANT.gguf`, beside it the Modelfile (`ollama create NAME -f Modelfile`) and a README
naming the version and its gate figures. Everything is written into a staging folder beside the
output and renamed into place at the end, so a failure leaves nothing half-written. The export is
an MLflow run (stage `export`) with the lineage tags; the version gets the tag
`loraflow.export.<quantization>` = that run's id. Files up to --max-artifact-mb are the run's
artifacts; larger ones are recorded by path and sha256 (export/manifest.json) instead of a copy.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from loraflow import LoraflowError, export, models, say, tracking
from loraflow.config import Config
from loraflow.tracking import Tags

DEFAULT_MAX_ARTIFACT_MB = 2048.0
GATE_TAGS = (Tags.GATE_METRIC, Tags.GATE_BASE_SCORE, Tags.GATE_TUNED_SCORE, Tags.GATE_IMPROVEMENT,
             Tags.GATE_DELTA_LOW, Tags.GATE_DELTA_HIGH, Tags.GATE_FORCED)


@dataclass
class ExportResult:
    run_id: str
    model_name: str
    version: str
    quantization: str
    output_dir: Path
    files: dict = field(default_factory=dict)  # file name -> {bytes, sha256, logged, path}

    @property
    def gguf_path(self) -> Path:
        return self.output_dir / gguf_file_name(self.model_name, self.version, self.quantization)


def gguf_file_name(name: str, version: str, quantization: str) -> str:
    return f"{name}-v{version}-{quantization}.gguf"


def find_version(store: tracking.Store, model_uri: str):
    """The registry's ModelVersion that `models:/NAME@ALIAS` or `models:/NAME/VERSION` names."""
    reference = model_uri.removeprefix("models:/")
    if not model_uri.startswith("models:/") or not ("@" in reference or "/" in reference):
        raise LoraflowError(f"--model-uri must be models:/NAME@ALIAS or models:/NAME/VERSION, got {model_uri!r}")
    client = store.client()
    try:
        if "@" in reference:
            return client.get_model_version_by_alias(*reference.split("@", 1))
        return client.get_model_version(*reference.rsplit("/", 1))
    except MlflowException as exc:
        raise LoraflowError(f"unknown model or alias {model_uri}: {tracking.first_line(exc)}") from None


def check_output(output_dir: Path, force: bool) -> None:
    if output_dir.exists() and any(output_dir.iterdir()) and not force:
        raise LoraflowError(f"{output_dir} exists already: pass --force to replace it, or --output another folder")
    if output_dir.exists() and not output_dir.is_dir():
        raise LoraflowError(f"{output_dir} is a file, not a folder")


def version_settings(merged_dir: Path) -> dict:
    """The version's saved model config (the pyfunc's model_config: chat formatting, system prompt, lengths)."""
    metadata = mlflow.models.Model.load(str(merged_dir.parent.parent / "MLmodel"))
    return metadata.flavors.get("python_function", {}).get("config") or {}


def generation_settings(cfg: Config, settings: dict) -> dict:
    """The version's settings with the project's sampling defaults where the version does not record them."""
    sampling = {"temperature": cfg.eval.temperature, "top_p": cfg.eval.top_p}
    return {**settings, "eval": {**sampling, **settings.get("eval", {})}}


def readme(version, quantization: str, gguf_name: str, settings: dict) -> str:
    """A short README: the source version, its lineage and gate figures, how to run the file."""
    tags = version.tags
    gate = [f"- {key}: {tags[key]}" for key in GATE_TAGS if key in tags] or ["- (no gate figures recorded)"]
    served = settings.get("registry", {})
    return "\n".join([
        f"# {version.name} version {version.version} ({quantization})", "",
        f"`{gguf_name}`: registered model `models:/{version.name}/{version.version}` converted to GGUF by "
        f"`loraflow export` from its merged folder ({served.get('merge_dtype', '?')}; the version is served in "
        f"{served.get('serve_dtype', '?')}).", "",
        f"- base model: {tags.get(Tags.BASE_MODEL, settings.get('model', {}).get('name', '?'))}",
        f"- training run: {tags.get(Tags.SOURCE_RUN_ID, version.run_id or '?')}",
        f"- register run: {tags.get(Tags.REGISTER_RUN_ID, '?')}", "",
        "## Gate (held-out rows, tuned vs base)", "", *gate, "",
        "## Run it", "",
        f"- Ollama: `ollama create {version.name} -f Modelfile`, then `ollama run {version.name}`",
        f"- llama.cpp: `llama-cli -m {gguf_name} -cnv` (the chat template is in the file)", ""])


def write_files(merged_dir: Path, staging: Path, version, quantization: str, settings: dict) -> None:
    """The GGUF, the Modelfile and the README into `staging`."""
    chat = bool(settings.get("data", {}).get("chat_template", True))
    gguf_name = gguf_file_name(version.name, version.version, quantization)
    vocab = export.Vocab.of(merged_dir, chat_formatting=chat)
    say(f"writing {gguf_name} ({quantization}) from models:/{version.name}/{version.version}")
    export.write_gguf(merged_dir, staging / gguf_name, quantization, vocab, name=f"{version.name}-v{version.version}")
    tokenizer = models.load_tokenizer(str(merged_dir))
    (staging / "Modelfile").write_text(export.modelfile(gguf_name, tokenizer, settings), encoding="utf-8")
    (staging / "README.md").write_text(readme(version, quantization, gguf_name, settings), encoding="utf-8")


def move_into_place(staging: Path, output_dir: Path) -> None:
    """Rename the finished staging folder to `output_dir`, replacing what was there (--force) only now."""
    old = output_dir.parent / f".{output_dir.name}.old-{os.getpid()}"
    if output_dir.exists():
        output_dir.rename(old)
    staging.rename(output_dir)
    shutil.rmtree(old, ignore_errors=True)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def log_files(output_dir: Path, max_bytes: float) -> dict:
    """Each file as an artifact of the active run up to `max_bytes`; all of them, with sha256 and path, in
    export/manifest.json."""
    files = {}
    for path in sorted(output_dir.iterdir()):
        size = path.stat().st_size
        logged = size <= max_bytes
        if logged:
            mlflow.log_artifact(str(path), "export")
        files[path.name] = {"bytes": size, "sha256": sha256_of(path), "logged": logged, "path": str(path.resolve())}
    mlflow.log_dict(files, "export/manifest.json")
    return files


def converted_into(output_dir: Path, merged_dir: Path, version, quantization: str, settings: dict) -> None:
    """Write everything into a staging folder beside `output_dir` and rename it into place; on any failure
    the staging folder goes and `output_dir` stays as it was."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    staging.chmod(0o755)  # mkdtemp's folder is the owner's alone; the output is an ordinary folder
    try:
        write_files(merged_dir, staging, version, quantization, settings)
        move_into_place(staging, output_dir)
    except LoraflowError:
        raise
    except Exception as exc:  # noqa: BLE001 - a disk full, a bad tensor: one line, nothing left behind
        raise LoraflowError(f"export failed halfway, nothing written to {output_dir}: "
                            f"{type(exc).__name__}: {tracking.first_line(exc)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run(cfg: Config, store: tracking.Store | None = None, *, model_uri: str | None = None,
        quantization: str = "f16", output: str | Path | None = None, force: bool = False,
        max_artifact_mb: float = DEFAULT_MAX_ARTIFACT_MB, parent_run_id: str | None = None) -> ExportResult:
    """`loraflow export`: the version `model_uri` names (default @registry.alias) as GGUF, Modelfile, README."""
    if quantization not in export.QUANTIZATIONS:
        raise LoraflowError(f"unknown quantization {quantization!r} (choose {', '.join(export.QUANTIZATIONS)})")
    store = store or tracking.connect(cfg=cfg)
    version = find_version(store, model_uri or f"models:/{cfg.model_name}@{cfg.registry.alias}")
    exported = f"models:/{version.name}/{version.version}"
    output_dir = Path(output or Path("exports") / f"{version.name}-v{version.version}-{quantization}")
    check_output(output_dir, force)
    scratch = Path(tempfile.mkdtemp(prefix=f"loraflow-export-{os.getpid()}-"))
    tags = {Tags.EXPORTED_VERSION: exported, Tags.EXPORT_QUANTIZATION: quantization,
            Tags.SOURCE_RUN_ID: version.tags.get(Tags.SOURCE_RUN_ID) or version.run_id}
    try:
        with tracking.stage_run(cfg, "export", store, parent_run_id=parent_run_id,
                                tags={k: v for k, v in tags.items() if v}) as active:
            started = time.monotonic()
            merged_dir = tracking.download_model_uri(exported, scratch)
            export.read_config(merged_dir)  # an unsupported architecture fails before anything is written
            settings = generation_settings(cfg, version_settings(merged_dir))
            mlflow.log_params({"model_uri": exported, "quantization": quantization, "max_artifact_mb": max_artifact_mb})
            converted_into(output_dir, merged_dir, version, quantization, settings)
            files = log_files(output_dir, max_artifact_mb * 1024 * 1024)
            gguf_name = gguf_file_name(version.name, version.version, quantization)
            mlflow.set_tags({Tags.EXPORT_PATH: str(output_dir.resolve()), Tags.EXPORT_SHA256: files[gguf_name]["sha256"]})
            mlflow.log_metrics({"export/gguf_bytes": files[gguf_name]["bytes"],
                                "export/seconds": time.monotonic() - started})
            store.client().set_model_version_tag(version.name, version.version, Tags.export(quantization),
                                                 active.info.run_id)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return ExportResult(active.info.run_id, version.name, str(version.version), quantization, output_dir, files)


def summary_line(result: ExportResult) -> str:
    """What the CLI prints: the files and where the large ones are kept."""
    gguf = result.files[result.gguf_path.name]
    kept = "logged as artifacts" if all(f["logged"] for f in result.files.values()) else \
        "recorded by path and sha256 (larger than --max-artifact-mb)"
    return (f"run {result.run_id}: exported models:/{result.model_name}/{result.version} to {result.output_dir} "
            f"({result.gguf_path.name}: {gguf['bytes'] / 1e6:.1f} MB, sha256 {gguf['sha256'][:12]}; {kept})")
