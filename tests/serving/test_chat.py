"""The chat flavour: OpenAI-style chat completions in process and over HTTP, its bounds, and where it is logged."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
import yaml
from conftest import tiny_config
from helpers import assert_one_line_error
from mlflow.exceptions import MlflowException
from test_serving import LONG_PROMPT, assert_clean_error, free_port, post

from loraflow import LoraflowError, data, generation, serving
from loraflow.config import load_config
from loraflow.tracking import Tags

SYSTEM = "You write product descriptions."
PROMPTS = ["Describe: Oak desk", "Describe: Red mug"]


@pytest.fixture(scope="module")
def served(tiny_llama, tmp_path_factory):
    """One project (cap 32, a system prompt) logged once as the chat flavour and as the TextGenerator, both
    loaded in process; the tiny model stands in for a merged folder. Logged to a store of its own, since
    each test's store is made after module fixtures."""
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
            chat_uri = serving.log_chat_model(cfg, tiny_llama).model_uri
            text_uri = serving.log_model(cfg, tiny_llama).model_uri
        chat, text = mlflow.pyfunc.load_model(chat_uri), mlflow.pyfunc.load_model(text_uri)
    finally:
        mlflow.set_tracking_uri(previous)
    return SimpleNamespace(cfg=cfg, chat=chat, text=text, raw=chat.get_raw_model())


def ask(served, messages, **params) -> dict:
    return served.chat.predict({"messages": messages, **params})


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def test_a_user_message_gets_the_text_generators_greedy_answer(served):
    tokenizer = served.raw.tokenizer
    texts = served.text.predict(pd.DataFrame({"prompt": PROMPTS}), params={"max_new_tokens": 8})
    for prompt, text in zip(PROMPTS, texts):
        implicit = ask(served, user(prompt), max_tokens=8, temperature=0.0)
        explicit = ask(served, [{"role": "system", "content": SYSTEM}, *user(prompt)], max_tokens=8, temperature=0)
        [choice] = implicit["choices"]
        assert choice["message"] == {"role": "assistant", "content": text}  # data.system_prompt leads, as in training
        assert explicit["choices"] == implicit["choices"]
        prompt_tokens = len(data.prompt_token_ids(tokenizer, prompt, served.cfg))  # the ids training used
        completion = implicit["usage"]["completion_tokens"]
        assert implicit["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                     "total_tokens": prompt_tokens + completion}
        assert choice["finish_reason"] == ("length" if completion == 8 else "stop") and completion <= 8
        assert implicit["object"] == "chat.completion" and implicit["model"] == "tiny"
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
    stopped = ask(served, user(PROMPTS[0]), max_tokens=8, temperature=0.0, stop=[greedy[cut]])
    assert stopped["choices"][0]["message"]["content"] == greedy[:cut].strip()
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] <= 8


def test_sampling_follows_temperature_and_the_seed(served):
    def sampled(seed):
        return ask(served, user(PROMPTS[0]), max_tokens=8, temperature=0.9, custom_inputs={"seed": seed})["choices"]

    greedy = ask(served, user(PROMPTS[0]), max_tokens=8, temperature=0.0)["choices"]
    assert sampled(3) == sampled(3)
    assert sampled(3) != greedy  # temperature > 0 does sample: the equality above can fail


def test_a_long_conversation_keeps_its_last_turns(served):
    tokenizer = served.raw.tokenizer
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

    with pytest.raises(MlflowException, match="no room for the conversation"):
        ask(served, [{"role": "system", "content": LONG_PROMPT}, *user("hi")], max_tokens=8)


@pytest.mark.parametrize("request_, message", [
    ({"messages": user("hi"), "max_tokens": 33}, "max_tokens must be between 1 and 32, got 33"),
    ({"messages": user("hi"), "max_tokens": 0}, "max_tokens must be between 1 and 32, got 0"),
    ({"messages": []}, "at least one message"),
    ({"messages": [{"role": "tool", "content": "42"}, *user("hi")]}, "role must be one of system, user, assistant"),
    ({"messages": [*user("hi"), {"role": "assistant", "content": "Hello"}]}, "the last message must be the user's"),
    ({"messages": user("hi"), "n": 2}, "not supported: n"),
    ({"messages": user("hi"), "stream": True}, "not supported: stream"),
    ({"messages": user("hi"), "custom_inputs": {"seed": -1}}, "seed must be an integer between 0 and"),
    ({"messages": user("hi"), "temperature": -0.5}, "temperature must be >= 0"),
    ({"messages": user("hi"), "top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"messages": user("hi"), "stop": ["a", "b", "c", "d", "e"]}, "stop takes at most 4"),
])
def test_a_bad_chat_request_is_a_400_that_says_what_to_change(served, request_, message):
    with pytest.raises(MlflowException) as caught:
        served.chat.predict(request_)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE" and caught.value.get_http_status_code() == 400
    assert message in caught.value.message
    assert not served.raw.lock.locked()


def test_a_chat_request_past_its_budget_fails_cleanly_and_frees_the_lock(served, monkeypatch):
    monkeypatch.setenv(serving.REQUEST_SECONDS_ENV, "0.000001")
    with pytest.raises(MlflowException) as caught:
        ask(served, user(PROMPTS[0]), max_tokens=32, temperature=0.0)
    assert caught.value.error_code == "DEADLINE_EXCEEDED" and "smaller max_tokens" in caught.value.message
    assert not served.raw.lock.locked()
    monkeypatch.delenv(serving.REQUEST_SECONDS_ENV)
    assert ask(served, user(PROMPTS[0]), max_tokens=2, temperature=0.0)["usage"]["completion_tokens"] <= 2


def test_only_chat_template_projects_get_a_chat_flavour(tiny_llama, tiny_t5, write_project, tmp_path):
    assert serving.has_chat_flavour(load_config(str(write_project(tiny_llama))), tiny_llama)
    assert not serving.has_chat_flavour(load_config(str(write_project(tiny_llama, data={"chat_template": False}))),
                                        tiny_llama)
    seq2seq = load_config(str(write_project(tiny_t5, model={"kind": "seq2seq"})))
    assert not serving.has_chat_flavour(seq2seq, tiny_t5)
    plain = shutil.copytree(tiny_llama, tmp_path / "no-template")
    (plain / "chat_template.jinja").unlink()
    assert not serving.has_chat_flavour(load_config(str(write_project(plain))), plain)


def test_the_registered_chat_flavour_answers_an_openai_request_over_http(tiny_llama, write_project, run_cli, tmp_path):
    project = write_project(tiny_llama, train={"max_steps": 1},
                            registry={"min_improvement": -1.0, "max_new_tokens_cap": 32})
    assert run_cli("train", project)[0] == 0
    code, _, err = run_cli("register", project)
    assert code == 0, err
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias("tiny", "champion")
    chat_uri = version.tags[Tags.CHAT_MODEL_URI]
    logged = mlflow.get_logged_model(chat_uri.removeprefix("models:/"))
    assert logged.name == "chat_model" and logged.source_run_id == version.tags["loraflow.register_run_id"]
    [expected] = mlflow.pyfunc.load_model("models:/tiny@champion").predict(
        pd.DataFrame({"prompt": [PROMPTS[0]]}), params={"max_new_tokens": 8})

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "serve.log", "w") as log:  # the real command, which finds the chat flavour by the tag
        process = subprocess.Popen([sys.executable, "-m", "loraflow.cli", "serve", str(project), "--chat",
                                    "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        try:
            serving.wait_until_ready(url, timeout=180, process=process)
        except LoraflowError as exc:
            pytest.fail(f"{exc}\n{(tmp_path / 'serve.log').read_text()[-3000:]}")
        openai_request = {"model": "tiny", "messages": [{"role": "system", "content": "You are helpful."},
                                                        {"role": "user", "content": PROMPTS[0]}],
                          "max_tokens": 8, "temperature": 0}  # what openai.chat.completions.create sends
        status, text = post(url, json.dumps(openai_request).encode())
        assert status == 200, text
        body = json.loads(text)
        assert body["object"] == "chat.completion" and body["model"] == "tiny"
        [choice] = body["choices"]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
        assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}

        status, text = post(url, json.dumps({**openai_request, "messages": user(PROMPTS[0])}).encode())
        assert status == 200 and json.loads(text)["choices"][0]["message"]["content"] == expected, text

        for label, bad in {"max_tokens over the cap": {**openai_request, "max_tokens": 33},
                           "empty messages": {**openai_request, "messages": []},
                           "no messages": {"model": "tiny", "max_tokens": 8}}.items():
            status, text = post(url, json.dumps(bad).encode())
            assert 400 <= status < 500, (label, status, text)
            assert_clean_error(text, label)
    finally:
        serving.stop_server(process, timeout=30)  # SIGTERM: loraflow stops its server, then exits
    assert process.returncode == 143, (tmp_path / "serve.log").read_text()[-3000:]
    with pytest.raises(OSError):  # the port is closed: the server went with loraflow
        post(url, b"{}", timeout=5)

    client.delete_model_version_tag("tiny", version.version, Tags.CHAT_MODEL_URI)
    code, _, err = run_cli("serve", project, "--chat", "--port", str(free_port()))
    assert_one_line_error(code, err, "has no chat flavour")
    code, _, err = run_cli("serve", project, "--chat", "--model-uri", chat_uri)
    assert_one_line_error(code, err, "--chat needs a registered version")


def test_chat_generates_on_the_models_own_thread(served, monkeypatch):
    """As the TextGenerator: requests from many threads, generation on one."""
    generating, original = [], generation.generate_from_ids

    def recording(*args, **kwargs):
        generating.append(threading.current_thread())  # a finished thread's ident is reused
        return original(*args, **kwargs)
    monkeypatch.setattr(generation, "generate_from_ids", recording)
    callers = [threading.Thread(target=ask, args=(served, user(PROMPTS[0])), kwargs={"max_tokens": 2})
               for _ in range(3)]
    for caller in callers:
        caller.start()
        caller.join(timeout=120)
    assert len(generating) == 3 and len(set(generating)) == 1
    assert not set(generating) & set(callers)
