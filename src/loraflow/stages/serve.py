"""The serve stage: `loraflow serve` and `loraflow predict` on a registered version.

    loraflow serve quickstart                       # models:/<registry.model_name>@champion on 127.0.0.1:5001
    loraflow serve quickstart --model-uri models:/quickstart/3 --port 5002
    loraflow serve quickstart --chat                # the champion's OpenAI-style chat flavour
    loraflow serve quickstart --dockerfile image/   # a Dockerfile and the model, to build a container image
    loraflow predict quickstart "Title: Oak desk"   # in-process, no server
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"prompt": "Title: Oak desk"}], "params": {"max_new_tokens": 64}}'

The model and the server process are the serving package's; this stage finds the version to serve,
runs the server in the foreground (or writes a container's build context) and answers `predict`.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from mlflow.exceptions import MlflowException

from loraflow import LoraflowError, say, tracking
from loraflow.config import Config
from loraflow.serving.server import answers_of, default_model_uri, server_env, start_server, stop_server
from loraflow.tracking import Tags


def check_model_exists(model_uri: str, store: tracking.Store) -> None:
    """A one-line error when a models:/name@alias or models:/name/version URI names nothing."""
    if not model_uri.startswith("models:/"):
        return
    name, _, ref = model_uri.removeprefix("models:/").partition("@")
    client = store.client()
    try:
        if ref:
            client.get_model_version_by_alias(name, ref)
        elif "/" in name:
            client.get_model_version(*name.split("/", 1))
    except MlflowException:
        raise LoraflowError(f"no model at {model_uri} in {tracking.redact(store.uri)}: "
                            "run `loraflow register` first or pass --model-uri") from None


def registered_version(model_uri: str, store: tracking.Store):
    """The model version a models:/NAME@ALIAS or models:/NAME/VERSION URI names (a one-line error otherwise)."""
    name, _, alias = model_uri.removeprefix("models:/").partition("@")
    if not model_uri.startswith("models:/") or not (alias or "/" in name):
        raise LoraflowError(f"--chat needs a registered version (models:/NAME@ALIAS or models:/NAME/VERSION), "
                            f"got {model_uri}")
    check_model_exists(model_uri, store)
    client = store.client()
    return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(*name.split("/", 1))


def chat_model_uri(model_uri: str, store: tracking.Store) -> str:
    """The chat flavour logged beside the version `model_uri` names (its version tag); a one-line error if none."""
    version = registered_version(model_uri, store)
    chat_uri = version.tags.get(Tags.CHAT_MODEL_URI)
    if not chat_uri:
        raise LoraflowError(f"{model_uri} (version {version.version} of {version.name}) has no chat flavour: one "
                            "is registered with causal models whose prompts use a chat template (data.chat_template "
                            "and a tokenizer that has one); serve it without --chat")
    return chat_uri


def predict(cfg: Config, store: tracking.Store, prompts: list[str], *, model_uri: str | None = None,
            params: dict | None = None) -> list[str]:
    """`loraflow predict`: load the registered model as the server would and answer `prompts` in-process."""
    model_uri = model_uri or default_model_uri(cfg)
    check_model_exists(model_uri, store)
    try:
        return [str(a) for a in answers_of(model_uri, prompts, params or {})]
    except MlflowException as exc:
        raise LoraflowError(f"{model_uri}: {tracking.first_line(exc)}") from None


def write_dockerfile(model_uri: str, store: tracking.Store, folder: str | Path) -> Path:
    """`loraflow serve --dockerfile DIR`: DIR/Dockerfile and DIR/model_dir, the build context of an image that
    serves `model_uri` on port 8080 (`mlflow models generate-dockerfile`, so `docker build DIR` makes what
    `mlflow models build-docker` would). The model's pip requirements go into the image's Python; loraflow's
    code travels inside the model (code_paths), so the image needs no loraflow.
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise LoraflowError(f"--dockerfile {folder}: exists and is not an empty folder; give a new one")
    command = [sys.executable, "-m", "mlflow", "models", "generate-dockerfile", "-m", model_uri, "-d", str(folder),
               "--env-manager", "local"]
    done = subprocess.run(command, env=server_env(store), capture_output=True, text=True)
    if done.returncode != 0 or not (folder / "Dockerfile").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise LoraflowError(f"mlflow models generate-dockerfile failed: {lines[-1] if lines else done.returncode}")
    return folder


def run(cfg: Config, store: tracking.Store, *, host: str = "127.0.0.1", port: int = 5001,
        model_uri: str | None = None, workers: int = 1, timeout: int | None = None, chat: bool = False,
        dockerfile: str | None = None) -> None:
    """`loraflow serve`: run `mlflow models serve` in the foreground; its exit code becomes ours.

    With `chat`, the server runs the chat flavour registered beside the version (chat completions:
    POST /invocations with {"messages": [...]}). SIGTERM or Ctrl+C stops the whole server (its own
    process group) before loraflow exits, so the port is free again.
    """
    model_uri = model_uri or default_model_uri(cfg)
    check_model_exists(model_uri, store)
    what, request = model_uri, "POST /invocations"
    if chat:
        model_uri = chat_model_uri(model_uri, store)
        what, request = f"the chat flavour of {what} ({model_uri})", 'POST /invocations with {"messages": [...]}'
    if dockerfile:
        folder = write_dockerfile(model_uri, store, dockerfile)
        say(f"wrote {folder}/Dockerfile and the model of {what}: `docker build -t NAME {folder}`, then "
            f"`docker run -p 5001:8080 NAME` ({request})")
        return
    say(f"serving {what} on http://{host}:{port} ({request})")
    process = start_server(model_uri, store, host, port, workers=workers, timeout=timeout)
    try:
        code = process.wait()
    finally:
        stop_server(process)  # Ctrl+C or SIGTERM: the server too; and its temp folder either way
    if code != 0:
        sys.exit(code)
