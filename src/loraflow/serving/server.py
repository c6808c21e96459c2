"""The model server as a process: started, polled, asked and stopped from Python.

    process = start_server("models:/quickstart@champion", store, port=5001)
    wait_until_ready("http://127.0.0.1:5001", process=process)
    predict_over_http("http://127.0.0.1:5001", ["Title: Oak desk"])     # ["This oak desk ..."]
    stop_server(process)

The process is loraflow's server (serving.app: MLflow's routes and the OpenAI API on one port, the
versions followed live). A model served with plain `mlflow models serve` answers /invocations only;
run it with UVICORN_LOOP=loraflow.serving:server_loop so every concurrent request can join one
micro-batch. The serve stage, the pipeline's serve check, the README demo and the benchmarks use these.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd  # mlflow.pyfunc has imported it already

from loraflow import LoraflowError, tracking
from loraflow.config import Config
from loraflow.serving.batching import SERVER_LOOP_ENV
from loraflow.serving.requests import API_KEY_ENV


def default_model_uri(cfg: Config) -> str:
    """The version a server answers when none is named: models:/<registry.model_name>@<registry.alias>."""
    return f"models:/{cfg.model_name}@{cfg.registry.alias}"


def serve_command(model_uri: str, host: str, port: int, workers: int = 1, timeout: int | None = None,
                  all_versions: bool = False) -> list[str]:
    """The server's command line; `timeout` None keeps MLflow's request timeout (60 s or its env var).

    Each of `workers` processes loads its own copy of the model. `timeout` also bounds the request
    budget (requests.request_budget).
    """
    if workers < 1 or (timeout is not None and timeout < 1):
        raise LoraflowError(f"workers and timeout must be at least 1, got workers={workers}, timeout={timeout}")
    command = [sys.executable, "-m", "loraflow.serving.app", "--model-uri", model_uri, "--host", host,
               "--port", str(port), "--workers", str(workers)]
    return command + (["--timeout", str(timeout)] if timeout is not None else []) + \
        (["--all-versions"] if all_versions else [])


def server_env(store: tracking.Store, env: dict | None = None) -> dict:
    """The environment for the server: `uvicorn` found beside this Python, the tracking URI passed on, and the
    event loop whose thread pool lets every concurrent request join a micro-batch (server_loop)."""
    env = dict(os.environ if env is None else env)
    env.setdefault(SERVER_LOOP_ENV, "loraflow.serving:server_loop")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["MLFLOW_TRACKING_URI"] = store.uri
    return env


def start_server(model_uri: str, store: tracking.Store, host: str = "127.0.0.1", port: int = 5001,
                 env: dict | None = None, *, workers: int = 1, timeout: int | None = None,
                 all_versions: bool = False, api_key: str | None = None, **popen_options) -> subprocess.Popen:
    """Start the server in its own process group (stop it with `stop_server`); `api_key` goes to it in the
    environment ($LORAFLOW_API_KEY), not on its command line.

    The server downloads what it serves into a temp folder of its own, `process.scratch_dir`, which
    stop_server removes.
    """
    scratch = tempfile.mkdtemp(prefix="loraflow-serve-")
    env = dict(os.environ if env is None else env)
    if api_key:
        env[API_KEY_ENV] = api_key
    try:
        process = subprocess.Popen(serve_command(model_uri, host, port, workers=workers, timeout=timeout,
                                                 all_versions=all_versions),
                                   env={**server_env(store, env), "TMPDIR": scratch}, start_new_session=True,
                                   **popen_options)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    process.scratch_dir = scratch
    return process


def stop_server(process: subprocess.Popen, timeout: float = 20) -> None:
    """Terminate the server's whole process group (kill it if it does not stop within `timeout` s) and remove
    its temp folder."""
    try:
        end_process_group(process, timeout)
    finally:
        shutil.rmtree(getattr(process, "scratch_dir", ""), ignore_errors=True)


def end_process_group(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the process group of `process`, then SIGKILL it if `process` has not ended within `timeout` s."""
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


def answers_of(model_uri: str, prompts: list[str], params: dict):
    """Load the logged model as the server would, in a temp folder of its own (MLflow's would be left behind),
    and return its predictions for `prompts`."""
    with tempfile.TemporaryDirectory(prefix="loraflow-model-") as scratch:
        model = mlflow.pyfunc.load_model(model_uri, dst_path=scratch)
        return model.predict(pd.DataFrame({"prompt": prompts}), params=params)


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
