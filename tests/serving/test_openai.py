"""The server's OpenAI API through the openai SDK and plain HTTP: versions on one base, streams, errors, aliases.

Each test registers versions of the tiny model (one random LoRA adapter each) in its own store and runs
serving.app's app on a free port in this process (uvicorn on a thread), so it can look inside the
engine; test_serve_stage_process_speaks_both_apis starts the real server process.
"""
from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import mlflow
import openai
import pytest

from loraflow import serving
from loraflow.config import load_config
from loraflow.serving import app as server_app
from loraflow.serving.versions import ServedVersions

NAME = "tiny"
PROMPT = "Describe: Oak desk"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def random_adapter(base, folder, seed: int):
    """A LoRA adapter on the tiny model with random (not zero) B matrices: each seed answers differently."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = peft.LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(folder)
    return folder


@pytest.fixture
def project_config(tiny_llama, write_project):
    return load_config(str(write_project(tiny_llama, name=NAME, registry={"max_new_tokens_cap": 32},
                                         data={"system_prompt": "You write product copy."})))


@pytest.fixture
def register(project_config, tiny_llama, tmp_path):
    """register(seed) -> version number: the tiny model (as the merged folder) with a random adapter, logged as
    the pyfunc and registered as a new version of NAME."""
    def add(seed: int, adapter: bool = True) -> str:
        adapter_dir = random_adapter(tiny_llama, tmp_path / f"adapter-{seed}", seed) if adapter else None
        with mlflow.start_run():
            info = serving.log_model(project_config, tiny_llama, adapter_dir)
        return str(mlflow.register_model(info.model_uri, NAME).version)
    return add


def set_alias(alias: str, version: str) -> None:
    mlflow.MlflowClient().set_registered_model_alias(NAME, alias, version)


@contextlib.contextmanager
def running(versions, api_key: str | None = None):
    """serving.app's app over `versions` on a free port, in this process; stopped at the end."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(server_app.create_app(versions, api_key), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture
def two_versions(register):
    """Versions 1 (@previous) and 2 (@champion), different adapters on the one tiny base."""
    first, second = register(1), register(2)
    set_alias("previous", first)
    set_alias("champion", second)
    return first, second


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def lone_answer(versions: ServedVersions, model_id: str, prompt: str = PROMPT) -> str:
    """The greedy chat answer of a server that holds only the version `model_id` names."""
    version = versions.resolve(model_id)
    alone = ServedVersions.open(f"models:/{NAME}/{version.number}")
    with running(alone) as url:
        return chat(client(url), f"{NAME}/{version.number}", prompt).choices[0].message.content


def chat(api: openai.OpenAI, model: str, prompt: str = PROMPT, **options):
    return api.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                       max_tokens=options.pop("max_tokens", 12),
                                       temperature=options.pop("temperature", 0), **options)


def test_versions_share_one_base_and_answer_as_alone(two_versions):
    first, second = two_versions
    versions = ServedVersions.open(f"models:/{NAME}@champion")
    assert set(versions.versions) == {first, second}
    assert len(versions.engines) == 1  # one base in memory, an adapter per version
    with running(versions) as url:
        api = client(url)
        ids = [m.id for m in api.models.list().data]
        assert ids == [NAME, f"{NAME}@champion", f"{NAME}@previous", f"{NAME}/{first}", f"{NAME}/{second}"]
        answers = {}
        for model_id in (NAME, f"{NAME}@previous", f"{NAME}/{second}"):
            response = chat(api, model_id)
            answers[model_id] = response.choices[0].message.content
            assert response.usage.completion_tokens > 0
            assert response.choices[0].finish_reason in ("stop", "length")
        assert chat(api, NAME).system_fingerprint == f"{NAME}/{second}"
        assert chat(api, f"{NAME}@previous").system_fingerprint == f"{NAME}/{first}"
    assert answers[NAME] == answers[f"{NAME}/{second}"] != answers[f"{NAME}@previous"]
    assert answers[NAME] == lone_answer(versions, NAME)
    assert answers[f"{NAME}@previous"] == lone_answer(versions, f"{NAME}@previous")


def test_streams_are_openai_chunks_and_end_with_done(two_versions):
    versions = ServedVersions.open(f"models:/{NAME}@champion")
    with running(versions) as url:
        api = client(url)
        whole = chat(api, NAME, max_tokens=16)
        chunks = list(chat(api, NAME, max_tokens=16, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert text == whole.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens and not chunks[-1].choices
        assert {c.system_fingerprint for c in chunks} == {f"{NAME}/{two_versions[1]}"}
        completion = api.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=0)
        streamed = list(api.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text
        assert completion.object == "text_completion" and completion.usage.prompt_tokens > 0
        with urllib.request.urlopen(urllib.request.Request(
                f"{url}/v1/chat/completions", headers={"Content-Type": "application/json"},
                data=json.dumps({"model": NAME, "messages": [{"role": "user", "content": PROMPT}], "stream": True,
                                 "max_tokens": 4}).encode()), timeout=60) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            lines = [line for line in response.read().decode().split("\n\n") if line]
        assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_each_error_has_openais_shape_and_status(two_versions, monkeypatch):
    versions = ServedVersions.open(f"models:/{NAME}@champion")
    with running(versions, api_key="secret") as url:
        api = client(url, "secret")
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert status(f"{url}/ping") == 200 and status(f"{url}/health") == 200  # no key needed
        assert status(f"{url}/invocations", {"dataframe_records": [{"prompt": "x"}]}) == 401
        assert status(f"{url}/invocations", {"dataframe_records": [{"prompt": "x"}]}, key="secret") == 200
        with pytest.raises(openai.NotFoundError) as missing:
            chat(api, f"{NAME}/99")
        assert missing.value.code == "model_not_found" and f"{NAME}@champion" in missing.value.message
        for options, param in (({"max_tokens": 0}, "max_tokens"), ({"n": 2}, "n"), ({"stop": ["a"] * 5}, "stop"),
                               ({"temperature": 3}, "temperature"), ({"extra_body": {"colour": 1}}, "colour")):
            with pytest.raises(openai.BadRequestError) as bad:
                chat(api, NAME, **options)
            assert bad.value.param == param and bad.value.body["message"], options
        with pytest.raises(openai.BadRequestError) as full:
            chat(api, NAME, max_tokens=600)  # the tiny model reads 512 positions
        assert full.value.code == "context_length_exceeded"
        long = chat(api, NAME, prompt="an oak desk with two drawers, " * 200, max_tokens=8)
        assert 400 < long.usage.prompt_tokens <= 512 - 8  # cut from the left, and usage says what was read
        engine = versions.default().engine
        monkeypatch.setenv(serving.REQUEST_SECONDS_ENV, "0.3")
        assert engine.lock.acquire(timeout=5)  # the model is busy for longer than the budget
        try:
            with pytest.raises(openai.RateLimitError) as busy:
                chat(api, NAME)
        finally:
            engine.lock.release()
        assert int(busy.value.response.headers["Retry-After"]) >= 1
        monkeypatch.setenv(serving.REQUEST_SECONDS_ENV, "0.000001")
        with pytest.raises(openai.InternalServerError) as late:
            chat(api, NAME, max_tokens=32)
        assert late.value.status_code == 504 and "budget" in late.value.message
        monkeypatch.delenv(serving.REQUEST_SECONDS_ENV)
        assert chat(api, NAME).choices[0].message.content is not None  # and it serves on


def status(url: str, body: dict | None = None, key: str | None = None) -> int:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body else None, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def slow_steps(engine, seconds: float) -> None:
    """Every forward of the engine's model (each decode step) takes at least `seconds`."""
    engine.model.get_base_model().register_forward_pre_hook(lambda *args: time.sleep(seconds))


def test_a_stream_whose_client_goes_away_stops_at_the_next_step(two_versions):
    import httpx

    versions = ServedVersions.open(f"models:/{NAME}@champion")
    engine = versions.default().engine
    slow_steps(engine, 0.05)  # 32 steps would take 1.6 s
    body = {"model": NAME, "messages": [{"role": "user", "content": PROMPT}], "stream": True, "max_tokens": 32,
            "temperature": 0, "stop": ["never"]}
    with running(versions) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            events = response.iter_lines()
            assert next(events).startswith("data: ")  # the role chunk; then the client leaves
        deadline = time.monotonic() + 10
        while not engine.cancelled_steps and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.cancelled_steps and engine.cancelled_steps[0] < 12
        assert chat(client(url), NAME, max_tokens=2).choices  # the model is free again


def test_concurrent_requests_to_two_versions_get_their_own_answers(two_versions):
    """Requests to two versions on one base share batches (each row through its own adapter) and still get the
    answers each gets alone."""
    first, second = two_versions
    versions = ServedVersions.open(f"models:/{NAME}@champion")
    prompts = ["Describe: Oak desk", "Describe: Red mug", "Describe: Blue lamp", "Describe: Tall vase"]
    with running(versions) as url:
        api = client(url)
        alone = {(v, p): chat(api, f"{NAME}/{v}", p).choices[0].message.content for v in two_versions
                 for p in prompts}
        asked = [(v, p) for _ in range(3) for v in two_versions for p in prompts]
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda vp: chat(api, f"{NAME}/{vp[0]}", vp[1]), asked))
    assert [a.choices[0].message.content for a in answers] == [alone[vp] for vp in asked]
    assert [a.system_fingerprint for a in answers] == [f"{NAME}/{v}" for v, _ in asked]
    assert alone[(first, prompts[0])] != alone[(second, prompts[0])]  # the adapters do differ
    assert versions.default().engine.mixed_batches > 0  # and the two versions' requests did share batches


def test_requests_follow_the_alias_when_register_moves_it(two_versions, register, monkeypatch):
    monkeypatch.setenv("LORAFLOW_FOLLOW_SECONDS", "0.2")
    first, second = two_versions
    versions = ServedVersions.open(f"models:/{NAME}@champion")
    seen, failures, stop = [], [], threading.Event()
    with running(versions) as url:
        api = client(url)

        def traffic():
            while not stop.is_set():
                try:
                    seen.append(chat(api, NAME, max_tokens=2).system_fingerprint)
                except Exception as exc:  # noqa: BLE001 - counted: none may fail
                    failures.append(exc)
        workers = [threading.Thread(target=traffic) for _ in range(3)]
        for worker in workers:
            worker.start()
        third = register(3)
        set_alias("previous", second)
        set_alias("champion", third)
        moved = time.monotonic()
        while f"{NAME}/{third}" not in seen[-3:] and time.monotonic() < moved + 30:
            time.sleep(0.1)
        switched_after = time.monotonic() - moved
        time.sleep(0.5)
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
        listed = [m.id for m in api.models.list().data]
        mlflow.MlflowClient().delete_registered_model_alias(NAME, "champion")  # no champion for a while
        time.sleep(1)
        assert status(f"{url}/invocations", {"dataframe_records": [{"prompt": PROMPT}]}) == 404
        with pytest.raises(openai.NotFoundError):
            chat(api, NAME)
        assert chat(api, f"{NAME}/{third}").system_fingerprint == f"{NAME}/{third}"  # the versions still answer
    assert not failures and switched_after < 5
    assert seen[0] == f"{NAME}/{second}" and seen[-1] == f"{NAME}/{third}"
    assert f"{NAME}@previous" in listed and versions.resolve(f"{NAME}@previous").number == second
    assert len(versions.engines) == 1  # the new version's adapter joined the one base


def test_a_version_registered_without_an_adapter_is_served_merged(register):
    old = register(0, adapter=False)
    set_alias("champion", old)
    versions = ServedVersions.open(f"models:/{NAME}@champion")
    version = versions.default()
    assert version.adapter is None and not versions.engines  # its own model, not the shared base
    with running(versions) as url:
        assert chat(client(url), NAME).system_fingerprint == f"{NAME}/{old}"
        assert serving.predict_over_http(url, [PROMPT], {"max_new_tokens": 4})


def test_a_model_logged_by_an_earlier_layout_still_serves(tmp_path):
    import tarfile
    from pathlib import Path

    with tarfile.open(Path(__file__).parent.parent / "fixtures" / "legacy-models.tar.gz") as archive:
        archive.extractall(tmp_path, filter="data")
    folder = next(tmp_path.rglob("expected.json")).parent
    expected = json.loads((folder / "expected.json").read_text())
    versions = ServedVersions.open(str(folder / "text"))
    with running(versions) as url:
        answers = serving.predict_over_http(url, [expected["text"]["prompt"]], expected["text"]["params"])
        assert answers == [expected["text"]["answer"]]
        listed = [m.id for m in client(url).models.list().data]
        assert listed == ["legacy", "legacy/local"]
        assert chat(client(url), "legacy", max_tokens=4).system_fingerprint == "legacy/local"


HOSTILE = [  # (path, raw body): each must get a 4xx, never a 5xx or a hang
    ("/v1/chat/completions", b"{not json"),
    ("/v1/chat/completions", b"[1, 2]"),
    ("/v1/chat/completions", json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode()),
    ("/v1/chat/completions", json.dumps({"model": NAME, "messages": "hello"}).encode()),
    ("/v1/chat/completions", json.dumps({"model": NAME, "messages": [{"role": "tool", "content": 5}]}).encode()),
    ("/v1/chat/completions", json.dumps({"model": NAME, "messages": [{"role": "user", "content": "x"}],
                                         "max_tokens": -5}).encode()),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": ["a", "b"]}).encode()),
    ("/v1/completions", json.dumps({"model": NAME, "prompt": "x", "seed": "zero"}).encode()),
    ("/v1/chat/completions", json.dumps({"model": NAME, "messages": [{"role": "user", "content": "x"}],
                                         "stream": True, "stream_options": 5, "response_format": "json"}).encode()),
    ("/invocations", json.dumps({"dataframe_records": [{"question": "x"}]}).encode()),
    ("/invocations", b"\xff\xfe garbage"),
]


def rss_bytes() -> int:
    with open("/proc/self/status") as status_file:
        return next(int(line.split()[1]) * 1024 for line in status_file if line.startswith("VmRSS:"))


def test_a_bounded_soak_answers_every_valid_request_without_growing(two_versions):
    """8 clients x 50 requests, a quarter of them malformed or hostile: every valid one is answered, every hostile
    one refused with a 4xx, and this process's RSS after warm-up grows by at most 10%."""
    import httpx

    versions = ServedVersions.open(f"models:/{NAME}@champion")
    with running(versions) as url:
        def one_client(number: int, requests: int) -> list[tuple[bool, int]]:
            results = []
            with httpx.Client(base_url=url, timeout=120) as http:
                for index in range(requests):
                    if index % 4 == 3:  # hostile
                        path, raw = HOSTILE[(number + index) % len(HOSTILE)]
                        code = http.post(path, content=raw, headers={"Content-Type": "application/json"}).status_code
                        results.append((False, code))
                        continue
                    model = [NAME, f"{NAME}@previous"][index % 2]
                    body = {"model": model, "messages": [{"role": "user", "content": f"Describe: item {index}"}],
                            "max_tokens": 4, "temperature": 0, "stream": index % 8 == 2}
                    response = http.post("/v1/chat/completions", json=body)
                    complete = response.status_code == 200 and (
                        response.text.rstrip().endswith("data: [DONE]") if body["stream"]
                        else response.json()["choices"][0]["message"]["content"] is not None)
                    results.append((True, 200 if complete else response.status_code))
            return results

        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda n: one_client(n, 5), range(8)))  # warm-up
            warm = rss_bytes()
            results = [r for rs in pool.map(lambda n: one_client(n, 50), range(8)) for r in rs]
        after = rss_bytes()
    valid = [code for is_valid, code in results if is_valid]
    hostile = [code for is_valid, code in results if not is_valid]
    assert len(results) == 400 and len(hostile) == 96
    assert valid == [200] * len(valid)
    assert all(400 <= code < 500 for code in hostile), sorted(set(hostile))
    assert after <= 1.10 * warm, (warm, after)
