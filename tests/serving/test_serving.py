"""The pyfunc model and a real server process: predictions, params, malformed requests."""
from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
import torch
from helpers import assert_one_line_error, ready_or_fail
from mlflow.exceptions import MlflowException

from loraflow import LoraflowError, serving, tracking
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


# About 660 tokens of the tiny tokenizer: more than its 512 positions.
LONG_PROMPT = "START " + "an oak desk with two drawers, " * 30 + "Describe: Oak desk"


def assert_clean_error(text: str, label: str) -> None:
    """A JSON error body with a message and neither a stack trace nor a source file path."""
    body = json.loads(text)
    assert body["message"] and "stack_trace" not in body, (label, text)
    assert "Traceback" not in text and not re.search(r"/[\w./-]+\.py", text), (label, text)


@pytest.fixture
def project_config(tiny_llama, write_project):
    return load_config(str(write_project(tiny_llama, registry={"max_new_tokens_cap": 32})))


@pytest.fixture
def generator(project_config, tiny_llama):
    """A TextGenerator loaded in process from a fake pyfunc context, as the server's workers do."""
    model = serving.TextGenerator()
    model.load_context(SimpleNamespace(model_config=serving.saved_settings(project_config),
                                       artifacts={"model": str(tiny_llama)}))
    return model


@pytest.fixture
def logged_model(project_config, tiny_llama):
    """The tiny model itself stands in for a merged folder, logged as the pyfunc with a cap of 32 tokens."""
    with mlflow.start_run():
        return serving.log_model(project_config, tiny_llama).model_uri


@pytest.fixture
def server(logged_model, tmp_path):
    """A real server process (`serving.start_server`) on a free port; its process group is stopped at the end."""
    port = free_port()
    with open(tmp_path / "server.log", "w") as log:
        process = serving.start_server(logged_model, tracking.connect(), "127.0.0.1", port, workers=1, timeout=120,
                                       stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        ready_or_fail(url, process, tmp_path / "server.log")
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
        "top_p out of range": payload(["hi"], top_p=0.0),
    }
    for label, body in bad_requests.items():
        status, text = post(server, body)
        assert 400 <= status < 500, (label, status, text)
        assert json.loads(text)["message"], label

    checked_by_loraflow = {  # each answers 400 with a message that says what to change
        "too many rows": (payload(["hi"] * (serving.MAX_ROWS + 1)), f"at most {serving.MAX_ROWS} prompt rows"),
        "seed above 2**32 - 1": (payload(["hi"], seed=2**32), "seed must be an integer between 0 and"),
        "negative seed": (payload(["hi"], seed=-1), "seed must be an integer between 0 and"),
        "max_new_tokens over the cap": (payload(["hi"], max_new_tokens=33), "between 1 and 32"),
        "negative temperature": (payload(["hi"], temperature=-0.5), "temperature must be >= 0"),
    }
    for label, (body, message) in checked_by_loraflow.items():
        status, text = post(server, body)
        assert status == 400 and message in json.loads(text)["message"], (label, status, text)
        assert_clean_error(text, label)

    status, text = post(server, payload([LONG_PROMPT], max_new_tokens=8))  # cut from the left, answered
    assert status == 200, text
    [answer] = json.loads(text)["predictions"]
    assert isinstance(answer, str)

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
    for params in ({"max_new_tokens": 0}, {"max_new_tokens": 33}, {"temperature": -1.0}, {"seed": 2**32},
                   {"seed": -1}, {"top_p": 1.5}):
        with pytest.raises(MlflowException) as caught:
            generator.predict(prompts, params=params)
        assert caught.value.error_code == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException):
        generator.predict(pd.DataFrame({"text": ["x"]}))
    assert generator.metadata.get_params_schema().to_dict()  # params are declared in the signature


def test_the_pyfunc_class_is_defined_without_mlflows_type_hint_warning():
    """MLflow warns, when a PythonModel's predict has no type hint, in every process that imports it (register,
    serve, predict); the warning is MLflow's own "once", so a fresh interpreter shows it."""
    imported = subprocess.run([sys.executable, "-c", "import loraflow.serving"], capture_output=True, text=True,
                              timeout=120)
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert "Add type hints to the `predict` method" not in imported.stderr


def test_serve_without_a_registered_model_is_a_one_line_error(tiny_llama, write_project, run_cli):
    code, _, err = run_cli("serve", write_project(tiny_llama), "--port", str(free_port()))
    assert code == 2, err
    assert_one_line_error(code, err, "models:/tiny@champion")


def test_a_prompt_longer_than_the_context_keeps_its_end(generator, monkeypatch):
    room = 512 - 8  # the tiny Llama's max_position_embeddings less max_new_tokens
    encoded = len(generation_ids(generator, LONG_PROMPT))
    assert generator.context_tokens == 512 and encoded > 512

    fitted = serving.fit_prompt(generator.tokenizer, LONG_PROMPT, room, generator.cfg)
    assert LONG_PROMPT.endswith(fitted) and fitted.endswith("Describe: Oak desk")
    assert room - 4 <= len(generation_ids(generator, fitted)) <= room  # as much of the end as fits

    widths = []
    real_generate = generator.model.generate

    def generate_and_record(**kwargs):
        widths.append(kwargs["input_ids"].shape[1])
        return real_generate(**kwargs)

    monkeypatch.setattr(generator.model, "generate", generate_and_record)
    frame = pd.DataFrame({"prompt": [LONG_PROMPT, "Describe: Red mug"]})
    answers = generator.predict(None, frame, params={"max_new_tokens": 8})
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert max(widths) <= room  # the model never saw more positions than prompt + answer fit in
    assert generator.predict(None, pd.DataFrame({"prompt": [fitted]}), params={"max_new_tokens": 8}) == answers[:1]


def generation_ids(generator, prompt: str) -> list[int]:
    from loraflow import generation

    return generation.encode_prompts(generator.tokenizer, [prompt], generator.cfg)[0]


def test_do_sample_false_is_greedy_whatever_the_temperature(generator):
    prompts = pd.DataFrame({"prompt": ["Describe: Oak desk", "Describe: Red mug"]})
    greedy = generator.predict(None, prompts, params={"max_new_tokens": 8, "temperature": 0.0})
    not_sampled = generator.predict(None, prompts, params={"max_new_tokens": 8, "temperature": 0.9,
                                                           "do_sample": False, "seed": 1})
    sampled = generator.predict(None, prompts, params={"max_new_tokens": 8, "temperature": 0.9,
                                                       "do_sample": True, "seed": 1})
    assert not_sampled == greedy
    assert sampled != greedy  # the same temperature does sample when asked: the check above can fail
    cfg = generator.cfg
    settings = {"max_new_tokens": 4, "top_p": 1.0}
    assert serving.request_config(cfg, {**settings, "temperature": 0.9, "do_sample": False}).eval.temperature == 0
    assert serving.request_config(cfg, {**settings, "temperature": 0.0, "do_sample": True}).eval.temperature == 1.0


def test_a_request_past_its_budget_fails_cleanly_and_frees_the_lock(generator, monkeypatch):
    prompts = pd.DataFrame({"prompt": ["Describe: Oak desk"] * 8})
    with monkeypatch.context() as patch:
        patch.setenv(serving.REQUEST_SECONDS_ENV, "0.000001")  # over by the end of the first generated token
        with pytest.raises(MlflowException) as caught:
            generator.predict(None, prompts, params={"max_new_tokens": 32})
    assert caught.value.error_code == "DEADLINE_EXCEEDED" and caught.value.get_http_status_code() == 504
    assert "budget" in caught.value.message and serving.REQUEST_SECONDS_ENV in caught.value.message
    assert "stack_trace" not in caught.value.serialize_as_json()
    assert not generator.engine.lock.locked()
    answers = generator.predict(None, prompts.head(2), params={"max_new_tokens": 4})
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_a_queued_request_gives_up_when_its_budget_runs_out(generator, monkeypatch):
    prompts = pd.DataFrame({"prompt": ["Describe: Oak desk"]})
    monkeypatch.setenv(serving.REQUEST_SECONDS_ENV, "0.2")
    pool = ThreadPoolExecutor(max_workers=1)  # a predict that waited for the lock forever fails here, not hangs
    assert generator.engine.lock.acquire(timeout=5)  # another request is generating
    try:
        error = pool.submit(generator.predict, None, prompts, {"max_new_tokens": 4}).exception(timeout=30)
    finally:
        generator.engine.lock.release()
        pool.shutdown()
    assert isinstance(error, MlflowException), error
    assert error.error_code == "TEMPORARILY_UNAVAILABLE" and error.get_http_status_code() == 503
    assert "busy" in error.message
    assert len(generator.predict(None, prompts, params={"max_new_tokens": 4})) == 1


def test_the_request_budget_stays_under_the_server_timeout(monkeypatch):
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "30")
    monkeypatch.delenv(serving.REQUEST_SECONDS_ENV, raising=False)
    assert serving.request_budget() == 30 - serving.SERVER_TIMEOUT_MARGIN_SECONDS
    monkeypatch.setenv(serving.REQUEST_SECONDS_ENV, "7.5")
    assert serving.request_budget() == 7.5
    monkeypatch.setenv(serving.REQUEST_SECONDS_ENV, "600")
    assert serving.request_budget() == 30 - serving.SERVER_TIMEOUT_MARGIN_SECONDS
    for bad in ("soon", "0", "-1"):
        monkeypatch.setenv(serving.REQUEST_SECONDS_ENV, bad)
        with pytest.raises(MlflowException, match=serving.REQUEST_SECONDS_ENV):
            serving.request_budget()


def test_serve_command_passes_workers_and_timeout_to_the_server():
    command = serving.serve_command("models:/tiny@champion", "127.0.0.1", 5001, workers=2, timeout=30)
    assert " --workers 2 --timeout 30" in " ".join(command)
    default = serving.serve_command("models:/tiny@champion", "127.0.0.1", 5001)
    assert "--workers 1" in " ".join(default) and "--timeout" not in default
    with pytest.raises(LoraflowError):
        serving.serve_command("models:/tiny@champion", "127.0.0.1", 5001, workers=0)


def test_predict_answers_with_the_registered_model_without_a_server(tiny_llama, write_project, run_cli):
    project = write_project(tiny_llama, train={"max_steps": 1}, registry={"min_improvement": -1.0})
    assert run_cli("train", project)[0] == 0
    assert run_cli("register", project)[0] == 0
    code, out, err = run_cli("predict", project, "Describe: Oak lamp", "Describe: Blue mug", "--max-new-tokens", "4")
    assert code == 0, err
    assert len(out.rstrip("\n").split("\n")) == 2
    code, _, err = run_cli("predict", project, "hi", "--model-uri", "models:/tiny@nobody")
    assert_one_line_error(code, err, "no model at models:/tiny@nobody")


def test_dockerfile_holds_the_registered_model_and_its_requirements(tiny_llama, write_project, run_cli, tmp_path):
    """`serve --dockerfile DIR` writes the build context of an image serving the champion: a Dockerfile that copies
    the model in, installs its requirements and serves it (MLflow's container entry point, port 8080), the model's
    files, and its pinned requirements."""
    project = write_project(tiny_llama, train={"max_steps": 1}, registry={"min_improvement": -1.0})
    assert run_cli("train", project)[0] == 0
    assert run_cli("register", project)[0] == 0
    folder = tmp_path / "image"
    code, _, err = run_cli("serve", project, "--dockerfile", str(folder))
    assert code == 0, err
    dockerfile = (folder / "Dockerfile").read_text()
    assert "COPY model_dir /opt/ml/model" in dockerfile and "_install_pyfunc_deps" in dockerfile
    assert dockerfile.splitlines()[-2:] == ["ENV PYTHONPATH=/opt/ml/model/code", (
        'ENTRYPOINT ["python", "-m", "loraflow.serving.app", "--model-uri", "/opt/ml/model", "--host", "0.0.0.0", '
        '"--port", "8080"]')]
    model = folder / "model_dir"
    [mlmodel] = model.rglob("MLmodel")
    assert "python_function" in mlmodel.read_text()
    requirements = next(model.rglob("requirements.txt")).read_text()
    assert all(package in requirements for package in ("torch", "transformers", "mlflow"))
    assert list(model.rglob("model.safetensors")), "the merged weights travel with the image"
    assert (model / "code" / "loraflow" / "serving" / "app.py").is_file(), "loraflow's code travels too"
    assert_the_image_entrypoint_serves_both_apis(model, tmp_path)

    code, _, err = run_cli("serve", project, "--dockerfile", str(folder))
    assert_one_line_error(code, err, "not an empty folder")
    assert (folder / "Dockerfile").read_text() == dockerfile  # the first context is left as it was


def assert_the_image_entrypoint_serves_both_apis(model_dir, tmp_path) -> None:
    """The image's ENTRYPOINT, run here on the model folder with only the code inside it on PYTHONPATH (its copy
    of loraflow, not the installed one): /invocations and /v1/models answer."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(model_dir / "code")}
    where = subprocess.run([sys.executable, "-c", "import loraflow; print(loraflow.__file__)"], env=env,
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(model_dir / "code"))
    with open(tmp_path / "image.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "loraflow.serving.app", "--model-uri", str(model_dir),
                                    "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=tmp_path,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        ready_or_fail(url, process, tmp_path / "image.log")
        assert len(serving.predict_over_http(url, ["Describe: Oak desk"], {"max_new_tokens": 4})) == 1
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as response:
            assert [m["id"] for m in json.loads(response.read())["data"]] == ["tiny", "tiny/local"]
    finally:
        serving.stop_server(process, timeout=20)


def test_concurrent_greedy_requests_share_one_generate_call_and_keep_their_answers(generator, monkeypatch):
    """Micro-batching: requests waiting together with the same greedy settings are answered by one generate call,
    each with the answers it gets alone; a sampled request or other max_new_tokens goes into a batch of its own."""
    greedy = {"max_new_tokens": 6, "temperature": 0.0}
    requests = [(["Describe: Oak desk"], greedy), (["Describe: Red mug", "Describe: Blue lamp"], greedy),
                (["Describe: Tall vase"], {**greedy, "temperature": 0.7, "seed": 5}),  # greedy still (do_sample off)
                (["Describe: Green rug"], {**greedy, "do_sample": True, "temperature": 0.9, "seed": 3}),
                (["Describe: Oak desk"], {**greedy, "max_new_tokens": 3})]
    alone = [generator.predict(None, pd.DataFrame({"prompt": p}), params=params) for p, params in requests]
    calls = []
    original = generator.engine.generate
    monkeypatch.setattr(generator.engine, "generate", lambda batch: calls.append(prompts_of(generator, batch))
                        or original(batch))
    pool = ThreadPoolExecutor(max_workers=len(requests))
    assert generator.engine.lock.acquire(timeout=5)  # the model is busy while they all arrive
    try:
        futures = []
        for p, params in requests:  # each queued before the next is sent: "oldest" is well defined
            futures.append(pool.submit(generator.predict, None, pd.DataFrame({"prompt": p}), params))
            deadline = time.monotonic() + 30
            while len(generator.engine.waiting) < len(futures) and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        generator.engine.lock.release()
    together = [future.result(timeout=120) for future in futures]
    pool.shutdown()
    assert together == alone
    assert sorted(map(len, calls)) == [1, 1, 4]  # the greedy 6-token requests in one call, the others alone
    assert sorted(calls, key=len)[-1] == ["Describe: Oak desk", "Describe: Red mug", "Describe: Blue lamp",
                                          "Describe: Tall vase"]  # oldest first
    assert generator.engine.waiting == [] and not generator.engine.lock.locked()


def test_every_generation_runs_on_the_models_own_thread(generator, monkeypatch):
    """Requests arrive on many threads of the server's pool, but the model generates on one (torch's OpenMP would
    start a team of workers for each calling thread), and a failure there still reaches its request."""
    generating, callers = [], []  # Thread objects: a finished thread's ident is reused
    original = generator.engine.generate

    def recording(*args):
        generating.append(threading.current_thread())
        return original(*args)
    monkeypatch.setattr(generator.engine, "generate", recording)

    def ask(prompt: str):
        callers.append(threading.current_thread())
        answers.append(generator.predict(None, pd.DataFrame({"prompt": [prompt]}), params={"max_new_tokens": 2}))
    answers = []
    for prompt in ["Describe: Oak desk", "Describe: Red mug", "Describe: Blue lamp"]:
        caller = threading.Thread(target=ask, args=(prompt,))
        caller.start()
        caller.join(timeout=120)
    assert len(answers) == 3 and len(generating) == 3 and len(callers) == 3
    assert len(set(generating)) == 1 and not set(generating) & set(callers)
    monkeypatch.setattr(generator.engine, "generate", lambda *args: 1 / 0)
    with pytest.raises(MlflowException) as caught:
        generator.predict(None, pd.DataFrame({"prompt": ["Describe: Oak desk"]}), params={"max_new_tokens": 2})
    assert caught.value.get_http_status_code() == 500 and "ZeroDivisionError" in caught.value.message
    assert not generator.engine.lock.locked()


def test_a_bf16_model_batches_concurrent_requests_too(generator, monkeypatch):
    """Served in bf16 (every GPU, a CPU with native bf16), concurrent greedy requests share one generate call as in
    fp32; what another batch shape's rounding costs greedy answers is measured by bench_serving (docs)."""
    generator.model.to(torch.bfloat16)
    prompts, params = ["Describe: Oak desk", "Describe: Red desk", "Describe: a long blue woollen scarf"], {
        "max_new_tokens": 6}
    calls = []
    original = generator.engine.generate
    monkeypatch.setattr(generator.engine, "generate", lambda batch: calls.append(prompts_of(generator, batch))
                        or original(batch))
    with ThreadPoolExecutor(max_workers=3) as pool:
        assert generator.engine.lock.acquire(timeout=5)
        try:
            futures = [pool.submit(generator.predict, None, pd.DataFrame({"prompt": [p]}), params) for p in prompts]
            deadline = time.monotonic() + 30
            while len(generator.engine.waiting) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            generator.engine.lock.release()
        answers = [f.result(timeout=120) for f in futures]
    assert all(len(a) == 1 and isinstance(a[0], str) for a in answers)
    assert calls == [prompts]


def prompts_of(generator, batch) -> list[str]:
    """The prompts of a batch of engine jobs, as the requests sent them (their encoded rows matched back)."""
    from loraflow import generation

    sent = ["Describe: Oak desk", "Describe: Red mug", "Describe: Blue lamp", "Describe: Tall vase",
            "Describe: Green rug", "Describe: Red desk", "Describe: a long blue woollen scarf"]
    by_ids = {tuple(generation.encode_prompts(generator.tokenizer, [p], generator.cfg)[0]): p for p in sent}
    return [by_ids[tuple(row)] for job in batch for row in job.rows]


def test_the_server_loop_lets_more_requests_wait_together_than_the_default_pool(generator):
    """MLflow's scoring server runs predict via asyncio.to_thread: in the default pool (min(32, cpus + 4) threads) the
    requests beyond it cannot join the batch; in server_loop's pool all of them wait for one generate call."""
    default_threads = min(32, (os.cpu_count() or 1) + 4)
    count = default_threads + 2
    prompts = [f"Describe: item {i}" for i in range(count)]

    async def send_all():
        return await asyncio.gather(*[asyncio.to_thread(generator.predict, None, pd.DataFrame({"prompt": [p]}),
                                                        {"max_new_tokens": 2}) for p in prompts])

    def waiting_together(loop) -> int:
        assert generator.engine.lock.acquire(timeout=5)  # the model is busy while they arrive
        try:
            task = loop.create_task(send_all())
            deadline = time.monotonic() + 10
            while len(generator.engine.waiting) < count and time.monotonic() < deadline:
                loop.run_until_complete(asyncio.sleep(0.05))
            seen = len(generator.engine.waiting)
        finally:
            generator.engine.lock.release()
        assert len(loop.run_until_complete(task)) == count
        loop.close()
        return seen

    assert waiting_together(asyncio.new_event_loop()) == default_threads
    assert waiting_together(serving.server_loop()) == count
    assert serving.server_env(SimpleNamespace(uri="sqlite:///m.db"), env={})["UVICORN_LOOP"] == \
        "loraflow.serving:server_loop"  # what start_server hands uvicorn (the server tests start with it)
