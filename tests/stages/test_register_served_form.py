"""What register gates is what is served: the adapter on the unquantised base, in the dtype recorded at
registration; one full model in memory at a time; no merge for a refused version."""
from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import transformers
from helpers import runs_of

from loraflow import LoraflowError, models


@pytest.fixture
def model_loads(monkeypatch):
    """Every model from_pretrained loads while the test runs: {"count": N, "alive_at_load": [...]} where
    alive_at_load is how many loaded models were still referenced when each next one began to load."""
    record, alive = {"count": 0, "alive_at_load": []}, weakref.WeakSet()
    original = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        gc.collect()
        record["alive_at_load"].append(len(alive))
        model = original(cls, *args, **kwargs)
        record["count"] += 1
        alive.add(model)
        return model
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(counted))
    return record


def served_model(uri="models:/tiny@champion"):
    return mlflow.pyfunc.load_model(uri).unwrap_python_model().model


def gate_run(register_run_id):
    [run] = [r for r in runs_of("evaluate") if r.data.tags.get("mlflow.parentRunId") == register_run_id]
    return run


def test_the_version_is_gated_and_served_as_the_adapter_on_the_base_in_the_recorded_dtype(
        tiny_llama, write_project, run_cli, tmp_path):
    import peft

    project = write_project(tiny_llama, train={"max_steps": 2}, model={"dtype": "bf16"},
                            eval={"batch_size": 1},  # each prompt alone, as a lone request is served
                            registry={"min_improvement": -1.0})
    assert run_cli("train", project)[0] == 0
    code, _, err = run_cli("register", project)
    assert code == 0, err
    version = mlflow.MlflowClient().get_model_version_by_alias("tiny", "champion")
    gate = gate_run(version.tags["loraflow.register_run_id"])
    assert version.tags["loraflow.served_dtype"] == gate.data.tags["loraflow.served_dtype"] == "bf16"

    model = served_model()
    assert isinstance(model, peft.PeftModel) and model.get_base_model().dtype == torch.bfloat16
    details = [json.loads(line) for line in mlflow.artifacts.load_text(
        f"runs:/{gate.info.run_id}/eval/details.jsonl").splitlines()]
    first = details[0]
    served = mlflow.pyfunc.load_model("models:/tiny@champion").predict(pd.DataFrame({"prompt": [first["prompt"]]}))
    assert served == [first["tuned_output"]], "the served greedy answer is the one the gate judged"

    code, _, err = run_cli("evaluate", project, "--model-uri", "models:/tiny@champion", "--set",
                           "registry.serve_dtype=fp32")  # the version's own dtype wins: it was judged in bf16
    assert code == 0, err
    [again] = [r for r in runs_of("evaluate") if r.info.run_id != gate.info.run_id]
    assert again.data.tags["loraflow.served_dtype"] == "bf16"
    assert mlflow.artifacts.load_text(f"runs:/{again.info.run_id}/eval/details.jsonl") == mlflow.artifacts.load_text(
        f"runs:/{gate.info.run_id}/eval/details.jsonl")

    local = Path(mlflow.artifacts.download_artifacts("models:/tiny@champion", dst_path=str(tmp_path / "v")))
    assert json.loads((local / "artifacts" / "merged" / "config.json").read_text())["dtype"] == "bfloat16"  # auto
    assert (local / "artifacts" / "adapter" / "adapter_config.json").is_file()


def test_a_served_dtype_of_auto_is_resolved_when_registering_not_when_serving(tiny_llama, write_project, run_cli,
                                                                             monkeypatch):
    project = write_project(tiny_llama, train={"max_steps": 1}, model={"dtype": "auto"},
                            registry={"min_improvement": -1.0})
    assert run_cli("train", project)[0] == 0
    monkeypatch.setattr(models.loading, "cpu_has_bf16", lambda: True)  # a machine with native bf16 registers
    assert run_cli("register", project)[0] == 0
    monkeypatch.setattr(models.loading, "cpu_has_bf16", lambda: False)  # one without it serves
    assert served_model().dtype == torch.bfloat16


def test_without_its_base_a_version_serves_its_merged_folder_in_the_same_dtype(tiny_llama, write_project, run_cli,
                                                                              monkeypatch, caplog):
    import peft

    project = write_project(tiny_llama, train={"max_steps": 1}, model={"dtype": "bf16"},
                            registry={"min_improvement": -1.0})
    assert run_cli("train", project)[0] == 0
    assert run_cli("register", project)[0] == 0

    def elsewhere(name, cfg=None):
        raise LoraflowError(f"model not found: {name!r}")
    monkeypatch.setattr(models, "resolve_model_path", elsewhere)
    model = served_model()
    assert not isinstance(model, peft.PeftModel) and model.dtype == torch.bfloat16
    assert "serving the merged folder" in caplog.text


def test_a_refused_version_is_never_merged_and_the_gate_holds_one_model(tiny_llama, write_project, run_cli,
                                                                        model_loads):
    project = write_project(tiny_llama, train={"max_steps": 1}, registry={"min_improvement": 2.0})
    assert run_cli("train", project)[0] == 0
    model_loads.update(count=0, alive_at_load=[])
    code, out, err = run_cli("register", project)
    assert code == 0 and "not registered" in out, err
    assert model_loads["count"] == 1, "a refused version costs the gate's one load: base and adapter, no merge"


def test_registering_loads_each_full_model_after_the_last_one_is_gone(tiny_llama, write_project, run_cli,
                                                                      model_loads):
    project = write_project(tiny_llama, train={"max_steps": 1}, registry={"min_improvement": -1.0})
    assert run_cli("train", project)[0] == 0
    model_loads.update(count=0, alive_at_load=[])
    assert run_cli("register", project)[0] == 0
    # the gate (base + adapter), the merge, MLflow's input-example check of the pyfunc and the registered
    # version's answer check (no chat flavour is logged any more): none while another is still held
    assert model_loads["alive_at_load"] == [0] * 4
