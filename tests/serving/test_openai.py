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
                                       max_tokens=options.pop("max_tokens", 12), temperature=0, **options)


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
