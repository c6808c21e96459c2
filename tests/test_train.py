"""`loraflow train` end to end on the tiny model: run, metrics, artifacts, weights, resume."""
from __future__ import annotations

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from loraflow import train
from loraflow.config import load_config


def finished_runs(stage="train"):
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`loraflow.stage` = '{stage}'")


def test_train_logs_run_metrics_artifacts_and_lineage(tiny_llama, write_project, run_cli):
    code, out, err = run_cli("train", write_project(tiny_llama))
    assert code == 0, err
    [run] = finished_runs()
    assert run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == "4" and run.data.params["train.max_steps"] == "4"
    client = mlflow.MlflowClient()
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4]
    assert client.get_metric_history(run.info.run_id, "eval/loss")
    for key in ("train/tokens", "train/tokens_per_second", "train/wall_seconds", "train/cost_usd",
                "train/peak_memory_mb", "data/rows_kept", "data/rows_train"):
        assert key in run.data.metrics, key
    assert run.data.metrics["train/tokens"] > 0
    for tag in ("loraflow.git_sha", "loraflow.config_hash", "loraflow.data_digest", "loraflow.base_model"):
        assert run.data.tags[tag], tag
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for d in ("adapter", "plots", "config") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "plots/loss_curve.png",
            "config/resolved.yaml"} <= artifacts
    assert [i.dataset.name for i in run.inputs.dataset_inputs]


def test_lora_weights_change_and_base_weights_do_not(tiny_llama, write_project):
    from transformers import AutoModelForCausalLM

    result = train.run(load_config(str(write_project(tiny_llama))), keep_model=True)
    adapter = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert adapter and all("lora_" in key for key in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k), "lora_B is still all zero"
    original = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    trained = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
               for k, v in result.model.state_dict().items() if "lora_" not in k}
    for key, value in original.items():
        assert torch.equal(trained[key].to(value.dtype), value), key


def test_resume_continues_the_same_run(tiny_llama, write_project, run_cli):
    project = write_project(tiny_llama)
    assert run_cli("train", project, "--set", "train.max_steps=2")[0] == 0
    [first] = finished_runs()
    code, _, err = run_cli("train", project, "--set", "train.max_steps=4", "--resume")
    assert code == 0, err
    [run] = finished_runs()
    assert run.info.run_id == first.info.run_id and run.info.status == "FINISHED"
    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4]


def test_cpt_objective_trains_on_raw_text_blocks(tiny_llama, write_project, tmp_path, run_cli):
    text = tmp_path / "book.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the red mug sits on an oak desk near a lamp." for i in range(40)))
    project = write_project(tiny_llama, data={"path": str(text), "max_length": 32}, train={"objective": "cpt"})
    code, _, err = run_cli("train", project)
    assert code == 0, err
    [run] = finished_runs()
    assert run.data.metrics["train/tokens"] > 0


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_quantized_training_runs(tiny_llama, write_project, run_cli, quantization):
    project = write_project(tiny_llama, model={"quantization": quantization, "dtype": "bf16"},
                            train={"max_steps": 2})
    code, _, err = run_cli("train", project)
    assert code == 0, err
    assert finished_runs()[0].info.status == "FINISHED"


def test_amazon_titles_real_data(sample_data, tiny_llama, write_project, run_cli):
    project = write_project(tiny_llama, data={"path": str(sample_data / "amazon_titles" / "trn_sample.jsonl"),
                                              "prompt_template": "Title: {title}", "target_template": "{content}",
                                              "max_rows": 120, "max_length": 64}, train={"max_steps": 2})
    code, _, err = run_cli("train", project)
    assert code == 0, err
    [run] = finished_runs()
    metrics = run.data.metrics
    assert metrics["data/rows_read"] == 120
    dropped = sum(v for k, v in metrics.items() if k.startswith("data/rows_dropped_"))
    assert metrics["data/rows_kept"] == 120 - dropped
    sample = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/data/sample_train.jsonl")
    assert "&#8217;" not in sample and "&amp;" not in sample  # HTML entities were unescaped
