"""The registered model as an MLflow pyfunc, and the REST server in front of it.

    loraflow serve quickstart                       # models:/<registry.model_name>@champion on 127.0.0.1:5001
    loraflow serve quickstart --model-uri models:/quickstart/3 --port 5002
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"prompt": "Title: Oak desk"}], "params": {"max_new_tokens": 64}}'

`TextGenerator` loads the merged model folder stored with the pyfunc and answers one string per
prompt row; `log_model` logs it with an explicit signature (the generation params) and explicit
pip requirements. `start_server`, `wait_until_ready` and `predict_over_http` drive
`mlflow models serve` from Python (the pipeline's serve check and the README demo use them).
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from loraflow import LoraflowError
from loraflow.config import Config

GENERATION_DEFAULTS = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "do_sample": False, "seed": 0}
PARAM_TYPES = {"max_new_tokens": "long", "temperature": "double", "top_p": "double", "do_sample": "boolean",
               "seed": "long"}


def invalid(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400."""
    return MlflowException.invalid_parameter_value(message)


def prompts_from(model_input) -> list[str]:
    """The `prompt` column of a DataFrame (or a list of records) as strings; 400 if it is missing or bad."""
    import pandas as pd

    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    if "prompt" not in frame.columns:
        raise invalid(f"the input needs a 'prompt' column; got columns {list(map(str, frame.columns))}")
    prompts = frame["prompt"].tolist()
    if not all(isinstance(p, str) for p in prompts):
        raise invalid("every 'prompt' must be a string")
    return prompts


def checked_params(params: dict | None, cap: int) -> dict:
    """Generation params with defaults filled in; 400 for out-of-range values."""
    values = {**GENERATION_DEFAULTS, **{k: v for k, v in (params or {}).items()
                                        if k in GENERATION_DEFAULTS and v is not None}}
    if not 1 <= values["max_new_tokens"] <= cap:
        raise invalid(f"max_new_tokens must be between 1 and {cap}, got {values['max_new_tokens']}")
    if values["temperature"] < 0:
        raise invalid(f"temperature must be >= 0, got {values['temperature']}")
    if not 0 < values["top_p"] <= 1:
        raise invalid(f"top_p must be in (0, 1], got {values['top_p']}")
    return values


def serving_config(settings: dict) -> Config:
    """The few config values generation needs, rebuilt from the model config saved with the pyfunc."""
    from loraflow.config import SECTIONS

    return Config(**{section: SECTIONS[section](**values) for section, values in settings.items()})


def saved_settings(cfg: Config) -> dict:
    """What `serving_config` needs: prompt formatting, dtype, batching and the max_new_tokens cap."""
    keep = {"model": ("kind", "dtype", "trust_remote_code"), "data": ("chat_template", "system_prompt", "max_length"),
            "eval": ("batch_size", "repetition_penalty"), "registry": ("max_new_tokens_cap",)}
    values = cfg.to_dict()
    return {section: {key: values[section][key] for key in keys} for section, keys in keep.items()}


def request_config(cfg: Config, settings: dict) -> Config:
    """`cfg` with one request's decoding settings; do_sample at temperature 0 samples at temperature 1."""
    temperature = settings["temperature"] or (1.0 if settings["do_sample"] else 0.0)
    return dataclasses.replace(cfg, eval=dataclasses.replace(
        cfg.eval, max_new_tokens=settings["max_new_tokens"], temperature=temperature, top_p=settings["top_p"]))


class TextGenerator(mlflow.pyfunc.PythonModel):
    """A merged causal or seq2seq model that answers one generated string per `prompt` row.

    Prompts are formatted and decoded by evaluate.generate, exactly as in evaluation and training.
    """

    def load_context(self, context):
        from loraflow import models

        self.cfg = serving_config(context.model_config or {})
        self.model, self.tokenizer = models.load_model(self.cfg, context.artifacts["model"], quantize=False)
        self.model.eval()
        self.lock = threading.Lock()

    def predict(self, context, model_input, params=None):
        from loraflow import evaluate

        prompts = prompts_from(model_input)
        settings = checked_params(params, self.cfg.registry.max_new_tokens_cap)
        if not prompts:
            return []
        with self.lock:  # one generation at a time: the server answers requests in threads
            return evaluate.generate(self.model, self.tokenizer, prompts, request_config(self.cfg, settings),
                                     seed=settings["seed"])


def model_signature(cfg: Config):
    """Input: a string `prompt` column; output: a string; params: the generation settings."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    max_new_tokens = min(cfg.eval.max_new_tokens, cfg.registry.max_new_tokens_cap)
    defaults = {**GENERATION_DEFAULTS, "max_new_tokens": max_new_tokens, "temperature": cfg.eval.temperature,
                "top_p": cfg.eval.top_p}
    params = ParamSchema([ParamSpec(name, PARAM_TYPES[name], value) for name, value in defaults.items()])
    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string")]),
                          params=params)


def pip_requirements() -> list[str]:
    """The serving environment: the installed versions of what `TextGenerator` imports."""
    from importlib.metadata import version

    def base(name):
        return version(name).split("+")[0]
    return [f"mlflow=={base('mlflow')}", f"torch=={base('torch')}", f"transformers=={base('transformers')}",
            f"tokenizers=={base('tokenizers')}", f"safetensors=={base('safetensors')}", "pandas", "pyyaml", "tqdm"]


def log_model(cfg: Config, merged_dir: str | Path, name: str = "model"):
    """Log the merged folder as a `TextGenerator` pyfunc in the active run; returns the ModelInfo.

    loraflow's own source goes along as code_paths, so the serving environment needs only the
    pip requirements, not loraflow installed.
    """
    import loraflow

    return mlflow.pyfunc.log_model(
        name=name, python_model=TextGenerator(), artifacts={"model": str(merged_dir)},
        signature=model_signature(cfg), pip_requirements=pip_requirements(), model_config=saved_settings(cfg),
        code_paths=[str(Path(loraflow.__file__).parent)])


def default_model_uri(cfg: Config) -> str:
    return f"models:/{cfg.model_name}@{cfg.registry.alias}"


def check_model_exists(model_uri: str) -> None:
    """A one-line error when a models:/name@alias or models:/name/version URI names nothing."""
    if not model_uri.startswith("models:/"):
        return
    name, _, ref = model_uri.removeprefix("models:/").partition("@")
    client = mlflow.MlflowClient()
    try:
        if ref:
            client.get_model_version_by_alias(name, ref)
        elif "/" in name:
            client.get_model_version(*name.split("/", 1))
    except MlflowException:
        raise LoraflowError(f"no model at {model_uri} in {mlflow.get_tracking_uri()}: "
                            "run `loraflow register` first or pass --model-uri") from None


def serve_command(model_uri: str, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
            "-h", host, "-p", str(port)]


def server_env(env: dict | None = None) -> dict:
    """The environment for the server: `uvicorn` found beside this Python, the tracking URI passed on."""
    env = dict(os.environ if env is None else env)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("MLFLOW_TRACKING_URI", mlflow.get_tracking_uri())
    return env


def start_server(model_uri: str, host: str = "127.0.0.1", port: int = 5001, env: dict | None = None,
                 **popen_options) -> subprocess.Popen:
    """Start `mlflow models serve` in its own process group (stop it with `stop_server`)."""
    return subprocess.Popen(serve_command(model_uri, host, port), env=server_env(env), start_new_session=True,
                            **popen_options)


def stop_server(process: subprocess.Popen, timeout: float = 20) -> None:
    """Terminate the server's whole process group; kill it if it does not stop within `timeout` s."""
    if process.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_until_ready(url: str, timeout: float = 120, process: subprocess.Popen | None = None,
                     interval: float = 0.5) -> None:
    """Poll `url`/ping until it answers 200; LoraflowError on timeout or when `process` exits first."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 1):
        if process is not None and process.poll() is not None:
            raise LoraflowError(f"the model server exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/ping", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise LoraflowError(f"the model server at {url} was not ready after {timeout:.0f} s")


def predict_over_http(url: str, prompts: list[str], params: dict | None = None, timeout: float = 300) -> list[str]:
    """POST prompts to `url`/invocations and return the predictions (one string per prompt)."""
    payload = {"dataframe_records": [{"prompt": p} for p in prompts], "params": params or {}}
    request = urllib.request.Request(f"{url.rstrip('/')}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())["predictions"]
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        try:
            detail = json.loads(detail).get("message", detail)
        except (ValueError, AttributeError):
            pass
        raise LoraflowError(f"the model server answered {exc.code}: {detail.splitlines()[0][:300]}") from None


def run(cfg: Config, *, host: str = "127.0.0.1", port: int = 5001, model_uri: str | None = None) -> None:
    """`loraflow serve`: run `mlflow models serve` in the foreground; its exit code becomes ours."""
    model_uri = model_uri or default_model_uri(cfg)
    check_model_exists(model_uri)
    print(f"loraflow: serving {model_uri} on http://{host}:{port} (POST /invocations)", file=sys.stderr)
    process = subprocess.Popen(serve_command(model_uri, host, port), env=server_env())
    try:
        code = process.wait()
    except KeyboardInterrupt:  # Ctrl+C reached the server too; give it time to shut down
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        raise
    if code != 0:
        sys.exit(code)
