"""Models registered by an earlier layout of the package still load and answer.

A registered model carries a copy of the package it was logged with (code_paths). MLflow puts that
copy first on sys.path but never unloads modules already imported, so in a process that has
imported loraflow (predict, register's answer check, the server, these tests) the installed code
answers for the old model, through the names the old served_model.py and served_chat_model.py use.

tests/fixtures/legacy-models.tar.gz holds a tiny text model and its chat flavour, logged by the
flat layout (commit c78ceb9), with the answers they gave then (expected.json).
"""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

FIXTURE = Path(__file__).parent / "fixtures" / "legacy-models.tar.gz"

ANSWER_BOTH = """
import json, sys
import mlflow, pandas as pd
if sys.argv[2] == "imported":
    import loraflow.serving, loraflow.generation  # the installed package answers, as in a server
folder = sys.argv[1]
expected = json.load(open(f"{folder}/expected.json"))
text = mlflow.pyfunc.load_model(f"{folder}/text")
chat = mlflow.pyfunc.load_model(f"{folder}/chat")
request = {key: expected["chat"][key] for key in ("messages", "max_tokens", "temperature")}
import loraflow
print(json.dumps({
    "package": loraflow.__file__,
    "text": text.predict(pd.DataFrame({"prompt": [expected["text"]["prompt"]]}), params=expected["text"]["params"]),
    "chat": chat.predict(request),
}))
"""


@pytest.fixture(scope="module")
def legacy_models(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("legacy")
    with tarfile.open(FIXTURE) as archive:
        archive.extractall(folder, filter="data")
    return folder / "legacy-models"


@pytest.mark.parametrize("interpreter", ["fresh", "imported"])
def test_a_model_logged_by_the_flat_layout_answers_as_it_did(legacy_models, interpreter):
    done = subprocess.run([sys.executable, "-c", ANSWER_BOTH, str(legacy_models), interpreter],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    expected = json.loads((legacy_models / "expected.json").read_text())
    # which copy answered: the model's own (fresh) or the installed package (already imported)
    from_model_copy = got["package"].startswith(str(legacy_models))
    assert from_model_copy == (interpreter == "fresh"), got["package"]
    assert got["text"] == [expected["text"]["answer"]]
    assert got["chat"]["choices"][0]["message"]["content"] == expected["chat"]["answer"]
    assert got["chat"]["usage"] == expected["chat"]["usage"]
