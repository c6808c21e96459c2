"""Chat completions on /v1/chat/completions: what a conversation maps to, its bounds, and the real serve command."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import httpx
import mlflow
import openai
import pandas as pd
import pytest
import yaml
from conftest import tiny_config
from helpers import ready_or_fail
from test_openai import running
from test_serving import LONG_PROMPT, free_port

from loraflow import data, generation, serving
from loraflow.config import load_config
from loraflow.serving.versions import ServedVersions

SYSTEM = "You write product descriptions."
PROMPTS = ["Describe: Oak desk", "Describe: Red mug"]


@pytest.fixture(scope="module")
def served(tiny_llama, tmp_path_factory):
    """One project (cap 32, a system prompt) logged once as the pyfunc, loaded in process (the TextGenerator) and
    served from its folder by the app on a free port; the tiny model stands in for a merged folder. Logged to a
    store of its own, since each test's store is made after module fixtures."""
    folder = tmp_path_factory.mktemp("chat")
    project = folder / "project.yaml"
    project.write_text(yaml.safe_dump(tiny_config(tiny_llama, registry={"max_new_tokens_cap": 32},
                                                  data={"system_prompt": SYSTEM})))
    cfg = load_config(str(project))
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
    try:
        experiment = mlflow.create_experiment("chat", artifact_location=(folder / "mlruns").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            text_uri = serving.log_model(cfg, tiny_llama).model_uri
        text = mlflow.pyfunc.load_model(text_uri)
        local = mlflow.artifacts.download_artifacts(artifact_uri=text_uri, dst_path=str(folder / "model"))
    finally:
        mlflow.set_tracking_uri(previous)
    versions = ServedVersions.open(local)
    with running(versions) as url:
        yield SimpleNamespace(cfg=cfg, text=text, url=url, engine=versions.default().engine)


def ask(served, messages, **params) -> dict:
    """The JSON answer of a chat request (asserting it is a 200)."""
    status, body = post(served, {"model": "tiny", "messages": messages, **params})
    assert status == 200, body
    return body


def post(served, body: dict) -> tuple[int, dict]:
    response = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=120)
    return response.status_code, response.json()


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def test_a_user_message_gets_the_text_generators_greedy_answer(served):
    tokenizer = served.engine.tokenizer
    texts = served.text.predict(pd.DataFrame({"prompt": PROMPTS}), params={"max_new_tokens": 8})
    for prompt, text in zip(PROMPTS, texts):
        implicit = ask(served, user(prompt), max_tokens=8, temperature=0.0)
        explicit = ask(served, [{"role": "system", "content": SYSTEM}, *user(prompt)], max_tokens=8, temperature=0)
        [choice] = implicit["choices"]
        assert choice["message"]["content"] == text  # data.system_prompt leads, as in training
        assert choice["message"]["role"] == "assistant"
        assert explicit["choices"] == implicit["choices"]
        prompt_tokens = len(data.prompt_token_ids(tokenizer, prompt, served.cfg))  # the ids training used
        completion = implicit["usage"]["completion_tokens"]
        assert implicit["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                     "total_tokens": prompt_tokens + completion}
        assert choice["finish_reason"] == ("length" if completion == 8 else "stop") and completion <= 8
        assert implicit["object"] == "chat.completion" and implicit["model"] == "tiny"
        assert implicit["system_fingerprint"] == "tiny/local"
        assert implicit["id"].startswith("chatcmpl-") and implicit["id"] != explicit["id"]

    other = ask(served, [{"role": "system", "content": "Be brief."}, *user(PROMPTS[0])], max_tokens=2, temperature=0.0)
    rendered = generation.chat_token_ids(tokenizer, [{"role": "system", "content": "Be brief."}, *user(PROMPTS[0])])
    assert other["usage"]["prompt_tokens"] == len(rendered)  # the request's own system message replaces the project's
    bos = tokenizer.bos_token_id
    assert rendered[0] == bos and rendered[1] != bos  # the template renders the bos: none is added


def test_one_token_answers_and_stop_strings(served):
    full = ask(served, user(PROMPTS[0]), max_tokens=8, temperature=0.0)
    assert full["choices"][0]["finish_reason"] == "length"  # the tiny model ends no turn within 8 tokens here
    one = ask(served, user(PROMPTS[0]), max_tokens=1, temperature=0.0)  # so its first token ends nothing either
    assert one["usage"]["completion_tokens"] == 1 and one["choices"][0]["finish_reason"] == "length"
    greedy = full["choices"][0]["message"]["content"]
    # A stop string: the first letter of the greedy answer not seen before it; the answer ends just before it.
    cut = next(i for i, char in enumerate(greedy) if i > 0 and char.isalnum() and char not in greedy[:i])
    for stop in ([greedy[cut]], greedy[cut]):  # a list or one string, as OpenAI takes both
        stopped = ask(served, user(PROMPTS[0]), max_tokens=8, temperature=0.0, stop=stop)
        assert stopped["choices"][0]["message"]["content"] == greedy[:cut].strip()
        assert stopped["choices"][0]["finish_reason"] == "stop"
        assert stopped["usage"]["completion_tokens"] <= 8
        streamed = served_stream(served, user(PROMPTS[0]), max_tokens=8, temperature=0.0, stop=stop)
        assert streamed == (greedy[:cut].strip(), "stop")


def served_stream(served, messages, **params) -> tuple[str, str]:
    """(the streamed answer's text, its finish_reason)."""
    api = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0)
    chunks = list(api.chat.completions.create(model="tiny", messages=messages, stream=True, **params))
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


def test_sampling_follows_temperature_and_the_seed(served):
    def sampled(seed):
        return ask(served, user(PROMPTS[0]), max_tokens=8, temperature=0.9, seed=seed)["choices"]

    greedy = ask(served, user(PROMPTS[0]), max_tokens=8, temperature=0.0)["choices"]
    assert sampled(3) == sampled(3)
    assert sampled(3) != greedy  # temperature > 0 does sample: the equality above can fail
    default = ask(served, user(PROMPTS[0]), max_tokens=8)["choices"]  # OpenAI's defaults: temperature 1, here seed 0
    assert default == ask(served, user(PROMPTS[0]), max_tokens=8, temperature=1.0, seed=0)["choices"] != greedy


def test_a_long_conversation_keeps_its_last_turns(served):
    tokenizer = served.engine.tokenizer
    system = [{"role": "system", "content": SYSTEM}]
    history = [*user(LONG_PROMPT), {"role": "assistant", "content": "A desk."}, *user(PROMPTS[1])]
    answer = ask(served, system + history, max_tokens=8, temperature=0.0)
    last_turn = ask(served, system + history[-1:], max_tokens=8, temperature=0.0)
    assert answer["choices"] == last_turn["choices"]  # the old turn went, the system message stayed
    assert answer["usage"]["prompt_tokens"] == len(generation.chat_token_ids(tokenizer, system + history[-1:]))

    # One message longer than the context is cut from the left, as the TextGenerator cuts a prompt.
    [text] = served.text.predict(pd.DataFrame({"prompt": [LONG_PROMPT]}), params={"max_new_tokens": 8})
    long = ask(served, user(LONG_PROMPT), max_tokens=8, temperature=0.0)
    assert long["choices"][0]["message"]["content"] == text
    assert long["usage"]["prompt_tokens"] <= 512 - 8

    status, body = post(served, {"model": "tiny", "messages": [{"role": "system", "content": LONG_PROMPT},
                                                               *user("hi")], "max_tokens": 8})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert "no room for the conversation" in body["error"]["message"]


@pytest.mark.parametrize("request_, message", [
    ({"messages": user("hi"), "max_tokens": 33}, "max_tokens must be between 1 and 32, got 33"),
    ({"messages": user("hi"), "max_tokens": 0}, "max_tokens must be between 1 and 32, got 0"),
    ({"messages": []}, "'messages' must be a non-empty list"),
    ({"messages": [{"role": "tool", "content": "42"}, *user("hi")]}, "messages[0] needs a role"),
    ({"messages": [*user("hi"), {"role": "assistant", "content": "Hello"}]}, "the last message must be the user's"),
    ({"messages": user("hi"), "n": 2}, "n is not supported"),
    ({"messages": user("hi"), "tools": [{"type": "function"}]}, "tools is not supported"),
    ({"messages": user("hi"), "seed": -1}, "seed must be an integer between 0 and"),
    ({"messages": user("hi"), "temperature": -0.5}, "temperature must be between 0 and 2"),
    ({"messages": user("hi"), "top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"messages": user("hi"), "stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
    ({"messages": user("hi"), "max_tokens": "8"}, "max_tokens must be an integer"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "only text content"),
])
def test_a_bad_chat_request_is_a_400_that_says_what_to_change(served, request_, message):
    status, body = post(served, {"model": "tiny", **request_})
    assert status == 400 and body["error"]["type"] == "invalid_request_error", body
    assert message in body["error"]["message"]
    assert "Traceback" not in json.dumps(body)
    assert not served.engine.lock.locked()


def test_a_chat_request_past_its_budget_fails_cleanly_and_frees_the_lock(served, monkeypatch):
    monkeypatch.setenv(serving.REQUEST_SECONDS_ENV, "0.000001")
    status, body = post(served, {"model": "tiny", "messages": user(PROMPTS[0]), "max_tokens": 32, "temperature": 0})
    assert status == 504 and "smaller max_tokens" in body["error"]["message"]
    assert not served.engine.lock.locked()
    monkeypatch.delenv(serving.REQUEST_SECONDS_ENV)
    assert ask(served, user(PROMPTS[0]), max_tokens=2, temperature=0.0)["usage"]["completion_tokens"] <= 2


def test_a_plain_prompt_project_takes_one_user_message_as_its_prompt(tiny_llama, write_project, register_tiny):
    """data.chat_template off: one user message is the prompt, formatted as in training (the /invocations answer);
    a conversation cannot be rendered as the model was trained, so it is refused."""
    cfg = load_config(str(write_project(tiny_llama, data={"chat_template": False})))
    versions = ServedVersions.open(register_tiny(cfg))
    with running(versions) as url:
        [expected] = serving.predict_over_http(url, [PROMPTS[0]], {"max_new_tokens": 8})
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answer = api.chat.completions.create(model="tiny", messages=user(PROMPTS[0]), max_tokens=8, temperature=0)
        assert answer.choices[0].message.content == expected
        with pytest.raises(openai.BadRequestError, match="trained on plain prompts"):
            api.chat.completions.create(model="tiny", max_tokens=8, messages=[
                *user("hi"), {"role": "assistant", "content": "hello"}, *user(PROMPTS[0])])


@pytest.fixture
def register_tiny(tiny_llama):
    """register_tiny(cfg) -> models:/tiny@champion: the tiny model (as its own merged folder) as version 1."""
    def register(cfg) -> str:
        with mlflow.start_run():
            info = serving.log_model(cfg, tiny_llama)
        version = mlflow.register_model(info.model_uri, "tiny").version
        mlflow.MlflowClient().set_registered_model_alias("tiny", "champion", version)
        return "models:/tiny@champion"
    return register


def test_the_serve_command_answers_the_openai_sdk_and_stops_on_sigterm(tiny_llama, write_project, run_cli, tmp_path,
                                                                        monkeypatch):
    """`loraflow serve --workers 2` after a real train and register, with a key from the environment: the SDK's chat
    answer is the pyfunc's for one user message; --chat only says it is not needed; SIGTERM stops server and
    loraflow."""
    project = write_project(tiny_llama, train={"max_steps": 1},
                            registry={"min_improvement": -1.0, "max_new_tokens_cap": 32})
    assert run_cli("train", project)[0] == 0
    code, _, err = run_cli("register", project)
    assert code == 0, err
    [expected] = mlflow.pyfunc.load_model("models:/tiny@champion").predict(
        pd.DataFrame({"prompt": [PROMPTS[0]]}), params={"max_new_tokens": 8})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("LORAFLOW_API_KEY", "k-123")
    with open(tmp_path / "serve.log", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "loraflow.cli", "serve", str(project), "--chat",
                                    "--port", str(port), "--workers", "2"], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        ready_or_fail(url, process, tmp_path / "serve.log")
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="k-123", max_retries=0)
        answer = api.chat.completions.create(model="tiny", messages=user(PROMPTS[0]), max_tokens=8, temperature=0)
        assert answer.choices[0].message.content == expected and answer.system_fingerprint == "tiny/1"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        for _ in range(4):  # whichever worker takes it
            assert api.chat.completions.create(model="tiny", messages=user(PROMPTS[0]), max_tokens=8,
                                               temperature=0).choices[0].message.content == expected
    finally:
        serving.stop_server(process, timeout=30)  # SIGTERM: loraflow stops its server, then exits
    log_text = (tmp_path / "serve.log").read_text()
    assert process.returncode == 143, log_text[-3000:]
    assert "--chat is no longer needed" in log_text and "k-123" not in log_text
    with pytest.raises(httpx.TransportError):  # the port is closed: the server went with loraflow
        httpx.get(f"{url}/ping", timeout=5)
