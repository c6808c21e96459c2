"""The pyfunc model and a real `mlflow models serve` process: predictions, params, malformed requests."""
from __future__ import annotations

import json
import socket
import subprocess
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import mlflow
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from loraflow import LoraflowError, serving
from loraflow.config import load_config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: bytes, timeout: float = 120) -> tuple[int, str]:
    """(status, body) of a POST to /invocations, also for 4xx answers."""
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def payload(prompts, **params) -> bytes:
    return json.dumps({"dataframe_records": [{"prompt": p} for p in prompts], "params": params}).encode()


@pytest.fixture
def logged_model(tiny_llama, write_project):
    """The tiny model itself stands in for a merged folder, logged as the pyfunc with a cap of 32 tokens."""
    cfg = load_config(str(write_project(tiny_llama, registry={"max_new_tokens_cap": 32})))
    with mlflow.start_run():
        return serving.log_model(cfg, tiny_llama).model_uri


@pytest.fixture
def server(logged_model, tmp_path):
    """A real `mlflow models serve --env-manager local` on a free port; its process group is stopped at the end."""
    port = free_port()
    with open(tmp_path / "server.log", "w") as log:
        process = serving.start_server(logged_model, "127.0.0.1", port, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            serving.wait_until_ready(url, timeout=180, process=process)
        except LoraflowError as exc:
            pytest.fail(f"{exc}\n{(tmp_path / 'server.log').read_text()[-3000:]}")
        yield url
    finally:
        serving.stop_server(process, timeout=20)
        assert process.poll() is not None


def test_server_answers_and_survives_malformed_requests(server, tmp_path):
    with urllib.request.urlopen(f"{server}/ping", timeout=10) as response:
        assert response.status == 200
    answers = serving.predict_over_http(server, ["Describe: Oak desk", "Describe: Red mug"],
                                        {"max_new_tokens": 8, "temperature": 0.0})
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)

    bad_requests = {
        "not json": b"{not json",
        "no prompt column": json.dumps({"dataframe_records": [{"question": "hi"}]}).encode(),
        "max_new_tokens of the wrong type": payload(["hi"], max_new_tokens="abc"),
        "max_new_tokens over the cap": payload(["hi"], max_new_tokens=33),
        "top_p out of range": payload(["hi"], top_p=0.0),
    }
    for label, body in bad_requests.items():
        status, text = post(server, body)
        assert 400 <= status < 500, (label, status, text)
        assert json.loads(text)["message"], label
    assert "between 1 and 32" in post(server, payload(["hi"], max_new_tokens=33))[1]

    with ThreadPoolExecutor(max_workers=3) as pool:  # concurrent requests share one model under a lock
        results = list(pool.map(lambda p: post(server, payload([p], max_new_tokens=4)), ["a", "b", "c"]))
    assert [status for status, _ in results] == [200, 200, 200]
    status, text = post(server, payload(["Describe: Oak desk"], max_new_tokens=4))
    assert status == 200 and len(json.loads(text)["predictions"]) == 1


def test_pyfunc_checks_params_and_input_in_process(logged_model):
    generator = mlflow.pyfunc.load_model(logged_model)
    prompts = pd.DataFrame({"prompt": ["Describe: Oak desk"]})
    assert generator.predict(prompts, params={"max_new_tokens": 2, "do_sample": True, "seed": 3}) == \
        generator.predict(prompts, params={"max_new_tokens": 2, "do_sample": True, "seed": 3})
    for params in ({"max_new_tokens": 0}, {"max_new_tokens": 33}, {"temperature": -1.0}):
        with pytest.raises(MlflowException) as caught:
            generator.predict(prompts, params=params)
        assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException):
        generator.predict(pd.DataFrame({"text": ["x"]}))
    assert generator.metadata.get_params_schema().to_dict()  # params are declared in the signature


def test_serve_without_a_registered_model_is_a_one_line_error(tiny_llama, write_project, run_cli):
    code, _, err = run_cli("serve", write_project(tiny_llama), "--port", str(free_port()))
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "models:/tiny@champion" in errors[0]
