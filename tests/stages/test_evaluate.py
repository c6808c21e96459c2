"""`loraflow evaluate` on the tiny models: metrics over seeds, intervals, artifacts, links, bad input."""
from __future__ import annotations

import json
import tempfile

import mlflow
import pytest
import torch
from helpers import assert_one_line_error, runs_of

from loraflow import data, generation, models
from loraflow.config import load_config
from loraflow.stages import evaluate, train

METRICS = ("rouge1", "rougeL")


def artifact_paths(run_id):
    client = mlflow.MlflowClient()
    return {a.path for folder in ("eval", "plots") for a in client.list_artifacts(run_id, folder)}


def details_of(run_id):
    text = mlflow.artifacts.load_text(f"runs:/{run_id}/eval/details.jsonl")
    return [json.loads(line) for line in text.splitlines()]


def test_evaluate_logs_metrics_details_artifacts_and_links(tiny_llama, write_project, run_cli):
    project = write_project(tiny_llama, train={"learning_rate": 3e-2},
                            eval={"seeds": [0, 1], "temperature": 0.8, "top_p": 0.95})
    assert run_cli("train", project)[0] == 0
    [trained] = runs_of("train")
    code, out, err = run_cli("evaluate", project, "--run-id", trained.info.run_id)
    assert code == 0, err
    [run] = runs_of("evaluate")
    assert run.info.status == "FINISHED" and run.info.run_id in out
    keys = {f"{p}/{m}{s}" for p in ("base", "tuned", "delta") for m in METRICS for s in ("", "_std")}
    keys |= {f"delta/{m}_ci_{end}" for m in METRICS for end in ("low", "high")}
    keys |= {"base/loss", "tuned/loss", "base/perplexity", "tuned/perplexity"}
    assert keys <= set(run.data.metrics)
    for metric in METRICS:
        assert run.data.metrics[f"delta/{metric}_ci_low"] <= run.data.metrics[f"delta/{metric}_ci_high"]
    assert run.data.metrics["tuned/loss"] < run.data.metrics["base/loss"]
    details = details_of(run.info.run_id)
    assert len(details) == 4 * 2 and {d["seed"] for d in details} == {0, 1}
    assert any(d["base_output"] != d["tuned_output"] for d in details)
    assert {"prompt", "reference", "base_rougeL", "tuned_rougeL"} <= set(details[0])
    assert {"eval/details.jsonl", "eval/side_by_side.csv", "eval/improved_examples.csv", "eval/summary.json",
            "eval/details_table.json", "plots/eval_metrics.png"} <= artifact_paths(run.info.run_id)
    summary = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/eval/summary.json")
    assert summary["metrics"] == pytest.approx(run.data.metrics) and summary["counts"]["items"] == 4
    assert run.data.tags["loraflow.evaluated_run_id"] == trained.info.run_id
    assert run.data.tags["loraflow.data_digest"] == trained.data.tags["loraflow.data_digest"]
    trained = mlflow.get_run(trained.info.run_id)
    assert trained.data.tags["loraflow.latest_evaluation_run_id"] == run.info.run_id
    assert trained.data.metrics["delta/rougeL"] == pytest.approx(run.data.metrics["delta/rougeL"])


def test_batched_left_padded_greedy_equals_one_prompt_at_a_time(tiny_llama, write_project):
    cfg = load_config(str(write_project(tiny_llama, eval={"batch_size": 3, "max_new_tokens": 12})))
    model, tokenizer = models.load_model(cfg, str(tiny_llama))
    prompts = ["mug", "Describe: Red ceramic mug with a wide handle and a glossy glaze, made for coffee lovers",
               "oak desk", "lamp " * 12, "Describe: blue cotton shirt", "a b"]
    batched = generation.generate(model, tokenizer, prompts, cfg)
    for prompt, answer in zip(prompts, batched):
        ids = torch.tensor([data.prompt_token_ids(tokenizer, prompt, cfg)], device=model.device)
        output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
        assert answer == tokenizer.decode(output[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_latest_run_by_default_and_a_local_adapter_folder(tiny_llama, write_project, run_cli):
    project = write_project(tiny_llama, eval={"seeds": [0, 1]})  # greedy: generated once for both seeds
    trained = train.run(load_config(str(project)))
    code, _, err = run_cli("evaluate", project)
    assert code == 0, err
    [run] = runs_of("evaluate")
    assert run.data.tags["loraflow.evaluated_run_id"] == trained.run_id
    assert len(details_of(run.info.run_id)) == 4
    assert run.data.metrics["tuned/rougeL_std"] == 0 and run.data.metrics["delta/rougeL_std"] == 0
    code, _, err = run_cli("evaluate", project, "--adapter", trained.adapter_dir)
    assert code == 0, err
    by_adapter = [r for r in runs_of("evaluate") if r.info.run_id != run.info.run_id][0]
    assert by_adapter.info.status == "FINISHED" and "loraflow.evaluated_run_id" not in by_adapter.data.tags
    assert by_adapter.data.metrics["tuned/rougeL"] == pytest.approx(run.data.metrics["tuned/rougeL"])


def test_merged_model_folder_and_registered_model_uri(tiny_llama, write_project, run_cli, tmp_path, monkeypatch):
    project = write_project(tiny_llama, train={"learning_rate": 3e-2})
    cfg = load_config(str(project))
    trained = train.run(cfg)
    merged = models.merge_adapter(cfg, str(tiny_llama), trained.adapter_dir, tmp_path / "merged")
    by_folder = evaluate.run(cfg, model_dir=merged, run_id=trained.run_id)  # what the promotion gate does
    assert mlflow.get_run(by_folder.run_id).data.tags["loraflow.evaluated_run_id"] == trained.run_id
    with mlflow.start_run() as logged:
        mlflow.log_artifacts(str(merged), "model/merged")
    client = mlflow.MlflowClient()  # a stand-in for the registry's pyfunc: a version whose files hold the folder
    client.create_registered_model("tiny")
    version = client.create_model_version("tiny", f"{logged.info.artifact_uri}/model", run_id=logged.info.run_id,
                                          tags={"loraflow.source_run_id": trained.run_id})
    client.set_registered_model_alias("tiny", "champion", version.version)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    code, _, err = run_cli("evaluate", project, "--model-uri", "models:/tiny@champion")
    assert code == 0, err
    assert not list(scratch.iterdir())  # the model it downloaded is removed
    [by_uri] = [r for r in runs_of("evaluate") if r.info.run_id != by_folder.run_id]
    assert by_uri.data.tags["loraflow.evaluated_run_id"] == trained.run_id
    assert by_uri.data.metrics["tuned/rougeL"] == pytest.approx(by_folder.summary["tuned/rougeL"])
    assert by_uri.data.metrics["tuned/loss"] == pytest.approx(by_folder.summary["tuned/loss"])


def test_bad_inputs_give_one_error_line(tiny_llama, write_project, run_cli):
    project = write_project(tiny_llama)
    assert run_cli("prepare", project)[0] == 0
    [prepared] = runs_of("prepare")
    cases = {("--run-id", "no-such-run"): "unknown run id",
             ("--model-uri", "models:/nothing@champion"): "unknown model URI",
             ("--run-id", prepared.info.run_id): "has no 'adapter' artifact",
             ("--set", "eval.metrics=[rougeL, bleurt]"): "unknown metric 'bleurt'",
             ("--set", "data.test_fraction=0"): "no test split: set data.test_fraction > 0",
             (): "no finished training run"}
    for args, message in cases.items():
        code, _, err = run_cli("evaluate", project, *args)
        assert code == 2, (args, err)
        assert_one_line_error(code, err, message)
    assert not runs_of("evaluate")


def test_an_adapter_for_another_model_fails_the_started_run(tiny_llama, tiny_t5, write_project, run_cli, tmp_path):
    t5_cfg = load_config(str(write_project(tiny_t5, "t5.yaml", model={"kind": "seq2seq"})))
    t5_model, _ = models.load_model(t5_cfg, str(tiny_t5))
    models.attach_lora(t5_model, t5_cfg).save_pretrained(tmp_path / "t5-adapter")
    code, _, err = run_cli("evaluate", write_project(tiny_llama), "--adapter", tmp_path / "t5-adapter")
    assert code == 2, err
    assert_one_line_error(code, err, "does not fit")
    [run] = runs_of("evaluate")
    assert run.info.status == "FAILED" and run.data.tags["loraflow.error"]


def test_seq2seq_model(tiny_t5, write_project, run_cli):
    project = write_project(tiny_t5, model={"kind": "seq2seq"}, data={"chat_template": False},
                            train={"max_steps": 2, "learning_rate": 3e-2})
    assert run_cli("train", project)[0] == 0
    code, _, err = run_cli("evaluate", project)
    assert code == 0, err
    [run] = runs_of("evaluate")
    assert run.info.status == "FINISHED"
    assert {"tuned/rougeL", "delta/rougeL_ci_low", "tuned/loss"} <= set(run.data.metrics)
    assert len(details_of(run.info.run_id)) == 4


def test_arxiv_titles_real_data(sample_data, tiny_llama, write_project, run_cli):
    """Long abstracts: the tiny tokenizer makes 400-1300 tokens of each, hence max_length 1536."""
    project = write_project(tiny_llama, data={"path": str(sample_data / "arxiv_ml_titles" / "abstract_title.jsonl"),
                                              "prompt_template": "Abstract: {abstract}", "target_template": "{title}",
                                              "max_rows": 40, "max_length": 1536},
                            train={"max_steps": 2}, eval={"metrics": ["rougeL", "token_f1", "sacrebleu"]})
    assert run_cli("train", project)[0] == 0
    code, _, err = run_cli("evaluate", project)
    assert code == 0, err
    [run] = runs_of("evaluate")
    assert 0 <= run.data.metrics["tuned/sacrebleu"] <= 100 and "delta/token_f1_ci_high" in run.data.metrics
    details = details_of(run.info.run_id)
    assert len(details) == 4 and all(d["prompt"].startswith("Abstract: ") for d in details)


def test_continued_pretraining_compares_losses_only(tiny_llama, write_project, run_cli, tmp_path):
    text = tmp_path / "book.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the red mug sits on an oak desk near a lamp." for i in range(40)))
    project = write_project(tiny_llama, data={"path": str(text), "max_length": 32},
                            train={"objective": "cpt", "max_steps": 2}, registry={"gate_metric": "loss"})
    assert run_cli("train", project)[0] == 0
    code, out, err = run_cli("evaluate", project)
    assert code == 0, err
    [run] = runs_of("evaluate")
    assert {"base/loss", "tuned/loss", "base/perplexity", "tuned/perplexity"} == set(run.data.metrics)
    assert "tuned/loss=" in out


def test_training_eval_loss_is_the_evaluate_stage_estimator(tiny_llama, write_project, run_cli):
    """Training's eval/loss and evaluate's tuned/loss are one token-weighted estimator on the same rows."""
    project = write_project(tiny_llama, train={"eval_steps": 4, "eval_rows": 8}, eval={"batch_size": 3})
    assert run_cli("train", project)[0] == 0
    [trained] = runs_of("train")
    assert run_cli("evaluate", project, "--run-id", trained.info.run_id)[0] == 0
    [evaluation] = runs_of("evaluate")
    # the adapter logged is the best one on validation loss: evaluate judges exactly that one
    assert abs(trained.data.metrics["eval/best_loss"] - evaluation.data.metrics["tuned/loss"]) < 1e-4


def test_evaluate_logs_the_test_split_it_judged_as_a_dataset_input(tiny_llama, write_project, run_cli):
    project = write_project(tiny_llama, train={"max_steps": 1})
    assert run_cli("train", project)[0] == 0
    assert run_cli("evaluate", project)[0] == 0
    [evaluation] = runs_of("evaluate")
    inputs = {(i.dataset.name, i.tags[0].value) for i in evaluation.inputs.dataset_inputs}
    assert inputs == {("tiny-test", "test")}


def test_sigterm_during_evaluation_ends_its_run_killed(tiny_llama, write_project, run_cli, monkeypatch):
    import os
    import signal

    project = write_project(tiny_llama, train={"max_steps": 1})
    assert run_cli("train", project)[0] == 0

    def terminated_while_generating(*args, **kwargs):  # a scheduler's SIGTERM arrives mid-stage
        os.kill(os.getpid(), signal.SIGTERM)
        return []
    monkeypatch.setattr(generation, "generate", terminated_while_generating)
    code, _, err = run_cli("evaluate", project)
    assert_one_line_error(code, err, "terminated by SIGTERM")
    assert code == 143
    [run] = runs_of("evaluate")
    assert run.info.status == "KILLED"


def test_improved_examples_are_the_items_tuned_beats_base_most():
    import pandas as pd

    frame = pd.DataFrame({"seed": [0] * 4 + [1] * 4, "index": [0, 1, 2, 3] * 2, "prompt": list("abcd") * 2,
                          "reference": list("ABCD") * 2, "base_output": list("wxyz") * 2,
                          "tuned_output": list("WXYZ") * 2,
                          "base_rougeL": [0.5, 0.1, 0.9, 0.2] * 2,
                          "tuned_rougeL": [0.6, 0.8, 0.1, 0.2, 0.6, 0.6, 0.1, 0.2]})
    best = evaluate.improved_examples(frame, "rougeL")
    assert list(best["index"]) == [1, 0]  # item 1 gains 0.6 on average, item 0 0.1; 2 gets worse, 3 ties
    assert best["gain_rougeL"].tolist() == pytest.approx([0.6, 0.1])
    assert list(best["tuned_output"]) == ["X", "W"]


@pytest.mark.parametrize("merge_dtype", ["fp16", "fp32"])
def test_a_merged_model_is_judged_in_the_dtype_it_was_merged_in(tiny_llama, write_project, merge_dtype,
                                                                 monkeypatch, tmp_path):
    import torch

    cfg = load_config(str(write_project(tiny_llama, train={"max_steps": 1}, registry={"merge_dtype": merge_dtype})))
    trained = train.run(cfg)
    merged = models.merge_adapter(cfg, str(tiny_llama), trained.adapter_dir, tmp_path / "merged")
    seen = []
    original = models.load_model

    def spy(cfg, path, **kwargs):
        model, tokenizer = original(cfg, path, **kwargs)
        seen.append(next(model.parameters()).dtype)
        return model, tokenizer
    monkeypatch.setattr(models, "load_model", spy)
    evaluate.run(cfg, model_dir=merged, run_id=trained.run_id)
    expected = {"fp16": torch.float16, "fp32": torch.float32}[merge_dtype]
    assert seen == [expected, expected], "base and tuned both in the merged model's dtype"


def test_the_base_model_is_asked_its_own_prompt(tiny_llama, write_project, run_cli):
    """data.base_prompt_template: the base answers (and is scored on) the plain prompt, the tuned model the one
    it was trained on; both prompts are in the details."""
    project = write_project(tiny_llama, data={"base_prompt_template": "Plain {title}"})
    assert run_cli("train", project)[0] == 0
    code, _, err = run_cli("evaluate", project)
    assert code == 0, err
    [run] = runs_of("evaluate")
    details = details_of(run.info.run_id)
    assert all(d["prompt"].startswith("Describe: ") and d["base_prompt"].startswith("Plain ") for d in details)
    assert all(d["prompt"].removeprefix("Describe: ") == d["base_prompt"].removeprefix("Plain ") for d in details)

    cfg = load_config(str(project))
    base, tokenizer = models.load_model(cfg, str(tiny_llama))
    expected = generation.generate(base, tokenizer, [d["base_prompt"] for d in details], cfg, progress=False)
    assert [d["base_output"] for d in details] == expected
    validation = data.prepare(cfg).splits["validation"][:cfg.train.eval_rows]
    plain = [{**row, "prompt": row["base_prompt"]} for row in validation]
    assert run.data.metrics["base/loss"] == pytest.approx(generation.validation_loss(base, tokenizer, plain, cfg))
    assert run.data.metrics["base/loss"] != pytest.approx(generation.validation_loss(base, tokenizer, validation, cfg))
    side_by_side = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/eval/side_by_side.csv").splitlines()[0]
    assert side_by_side.startswith("seed,index,prompt,base_prompt,reference,base_output,tuned_output")


def test_eval_split_validation_answers_the_validation_rows(tiny_llama, write_project, run_cli):
    """An 80/20 train/validation split (no test split): eval.split=validation judges the validation prompts."""
    project = write_project(tiny_llama, data={"val_fraction": 0.2, "test_fraction": 0.0},
                            eval={"split": "validation", "num_samples": 5})
    assert run_cli("train", project)[0] == 0
    code, _, err = run_cli("evaluate", project)
    assert code == 0, err
    [run] = runs_of("evaluate")
    validation = data.prepare(load_config(str(project))).splits["validation"]
    assert [d["prompt"] for d in details_of(run.info.run_id)] == [row["prompt"] for row in validation[:5]]
    code, _, err = run_cli("evaluate", project, "--set", "eval.split=test")
    assert_one_line_error(code, err, "no test split: set data.test_fraction > 0 (or eval.split=validation)")


def test_a_merged_model_is_judged_with_one_full_model_in_memory(tiny_llama, write_project, monkeypatch):
    """The base is gone before the merged model loads (the gate of an 8B model cannot hold both on one card)."""
    import gc
    import weakref

    loaded = []
    original = models.load_model

    def remembering(*args, **kwargs):
        gc.collect()
        alive = [ref() is not None for ref in loaded]
        model, tokenizer = original(*args, **kwargs)
        loaded.append(weakref.ref(model))
        alive_at_load.append(alive)
        return model, tokenizer

    alive_at_load: list[list[bool]] = []
    monkeypatch.setattr(models, "load_model", remembering)
    evaluate.run(load_config(str(write_project(tiny_llama))), model_dir=tiny_llama)  # as register's gate does
    assert alive_at_load == [[], [False]], alive_at_load
