"""The serve stage: `loraflow serve` and `loraflow predict` on a registered version.

    loraflow serve quickstart                       # models:/<registry.model_name>@champion on 127.0.0.1:5001
    loraflow serve quickstart --model-uri models:/quickstart/3 --port 5002
    loraflow serve quickstart --api-key KEY         # or $LORAFLOW_API_KEY: a bearer key on every route
    loraflow serve quickstart --dockerfile image/   # a Dockerfile and the model, to build a container image
    loraflow predict quickstart "Title: Oak desk"   # in-process, no server
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"prompt": "Title: Oak desk"}], "params": {"max_new_tokens": 64}}'
    curl -s localhost:5001/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "quickstart", "messages": [{"role": "user", "content": "Oak desk"}]}'

The model and the server process are the serving package's (serving.app: both APIs on one port,
several versions on one base, aliases followed live); this stage finds the version to serve, runs the
server in the foreground (or writes a container's build context) and answers `predict`.
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
    dockerfile = folder / "Dockerfile"
    dockerfile.write_text(with_loraflow_entrypoint(dockerfile.read_text()))
    return folder


CONTAINER_MODEL = "/opt/ml/model"  # where MLflow's Dockerfile copies the model
CONTAINER_ENTRYPOINT = ("ENV PYTHONPATH=/opt/ml/model/code\n"
                        'ENTRYPOINT ["python", "-m", "loraflow.serving.app", "--model-uri", "/opt/ml/model", '
                        '"--host", "0.0.0.0", "--port", "8080"]\n')


def with_loraflow_entrypoint(dockerfile: str) -> str:
    """MLflow's Dockerfile with loraflow's server as the entry point (both APIs, port 8080): the code that travels
    in the model (code_paths, /opt/ml/model/code) runs it, so the image needs no loraflow package."""
    lines = dockerfile.rstrip("\n").splitlines()
    if not lines or not lines[-1].startswith("ENTRYPOINT"):
        raise LoraflowError("mlflow models generate-dockerfile wrote no ENTRYPOINT line last; cannot set the server")
    return "\n".join(lines[:-1]) + "\n" + CONTAINER_ENTRYPOINT


def run(cfg: Config, store: tracking.Store, *, host: str = "127.0.0.1", port: int = 5001,
        model_uri: str | None = None, workers: int = 1, timeout: int | None = None, api_key: str | None = None,
        all_versions: bool = False, chat: bool = False, dockerfile: str | None = None) -> None:
    """`loraflow serve`: run the server in the foreground; its exit code becomes ours.

    `chat` is what earlier versions needed for chat completions; the server answers them on
    /v1/chat/completions now, so it only says so. SIGTERM or Ctrl+C stops the whole server (its own
    process group) before loraflow exits, so the port is free again.
    """
    model_uri = model_uri or default_model_uri(cfg)
    check_model_exists(model_uri, store)
    if chat:
        say("--chat is no longer needed: every server answers chat on POST /v1/chat/completions (the OpenAI "
            "API); serving as usual")
    if dockerfile:
        folder = write_dockerfile(model_uri, store, dockerfile)
        say(f"wrote {folder}/Dockerfile and the model of {model_uri}: `docker build -t NAME {folder}`, then "
            f"`docker run -p 5001:8080 NAME` (POST /invocations, /v1/chat/completions, /v1/models)")
        return
    name = model_uri.removeprefix("models:/").split("@")[0].rsplit("/", 1)[0] if model_uri.startswith("models:/") \
        else cfg.model_name
    say(f"serving {model_uri} on http://{host}:{port}: POST /invocations, and the OpenAI API at "
        f"http://{host}:{port}/v1 (model \"{name}\"){' with a bearer key' if api_key else ''}")
    process = start_server(model_uri, store, host, port, workers=workers, timeout=timeout,
                           all_versions=all_versions, api_key=api_key)
    try:
        code = process.wait()
    finally:
        stop_server(process)  # Ctrl+C or SIGTERM: the server too; and its temp folder either way
    if code != 0:
        sys.exit(code)
