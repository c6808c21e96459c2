"""`loraflow register` on the tiny model: merge equivalence, gate, aliases, tags, model card, bad input."""
from __future__ import annotations

import tempfile

import mlflow
import pandas as pd
import pytest
import torch
from helpers import assert_one_line_error, runs_of

from loraflow import LoraflowError, models, tracking
from loraflow.config import load_config
from loraflow.stages import register


def registered_versions(name="tiny"):
    return {str(v.version): v for v in mlflow.MlflowClient().search_model_versions(f"name='{name}'")}


def version_with_alias(alias, name="tiny"):
    return mlflow.MlflowClient().get_model_version_by_alias(name, alias)


def test_merged_model_equals_base_plus_adapter(tiny_llama, write_project, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    cfg = load_config(str(write_project(tiny_llama)))
    torch.manual_seed(0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), models.lora_config(cfg))
    with torch.no_grad():  # lora_B starts at zero; make the adapter change the output
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(std=0.5)
    model.save_pretrained(tmp_path / "adapter")

    merged_dir = models.merge_adapter(cfg, str(tiny_llama), tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base, _ = models.load_model(cfg, str(tiny_llama), quantize=False, dtype=torch.float32, device="cpu")  # where merged is
    reference = models.load_adapter(base, tmp_path / "adapter")
    input_ids = torch.tensor([[1, 5, 17, 42, 99, 7]])
    with torch.no_grad():
        expected, actual = reference(input_ids).logits, merged(input_ids).logits
        with reference.disable_adapter():
            plain = reference(input_ids).logits
    assert not torch.allclose(expected, plain, atol=1e-3), "the adapter changes nothing; the check would be void"
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    assert (merged_dir / "tokenizer.json").is_file() and (merged_dir / "generation_config.json").is_file()
    assert not any("lora" in key for key in merged.state_dict())


def test_register_gate_aliases_card_and_pyfunc(tiny_llama, write_project, run_cli):
    project = write_project(tiny_llama, train={"max_steps": 2})
    assert run_cli("train", project)[0] == 0
    [train_run] = runs_of("train")

    # A random tiny model cannot be made to improve reliably, so the first registration lowers the bar
    # (delta/rougeL >= -1 always holds: rouge is in [0, 1]).
    code, out, err = run_cli("register", project, "--set", "registry.min_improvement=-1")
    assert code == 0, err
    assert "registered tiny version 1" in out
    champion = version_with_alias("champion")
    assert str(champion.version) == "1"
    tags = champion.tags
    assert tags["loraflow.source_run_id"] == train_run.info.run_id
    assert tags["gate.metric"] == "rougeL" and float(tags["gate.tuned_score"]) >= 0
    assert tags["loraflow.data_digest"] == train_run.data.tags["loraflow.data_digest"]
    assert {"gate.base_score", "gate.delta_low", "gate.delta_high", "loraflow.base_model"} <= set(tags)
    assert "r=4" in champion.description and "| rougeL |" in champion.description
    register_run = mlflow.get_run(tags["loraflow.register_run_id"])
    assert register_run.info.status == "FINISHED" and register_run.data.tags["loraflow.gate"] == "passed"
    gate_runs = [r for r in runs_of() if r.data.tags.get("mlflow.parentRunId") == register_run.info.run_id]
    assert [r.data.tags["loraflow.stage"] for r in gate_runs] == ["evaluate"]

    generator = mlflow.pyfunc.load_model("models:/tiny@champion")
    prompts = pd.DataFrame({"prompt": ["Describe: Oak desk", "Describe: Red mug"]})
    short = generator.predict(prompts, params={"max_new_tokens": 1})
    longer = generator.predict(prompts, params={"max_new_tokens": 24})
    tokenizer = models.load_tokenizer(str(tiny_llama))
    single_tokens = {tokenizer.decode([i], skip_special_tokens=True).strip() for i in range(len(tokenizer))}
    assert len(short) == 2 and all(text in single_tokens for text in short)
    assert sum(map(len, longer)) > sum(map(len, short))

    # Registering the same run again re-evaluates the same greedy answers: its tuned score equals
    # the champion's recorded one, which does not beat it, so the gate refuses whatever the scores are.
    code, out, err = run_cli("register", project, "--set", "registry.min_improvement=-1")
    assert code == 0, err
    assert "not registered" in out and "champion" in out
    assert list(registered_versions()) == ["1"]

    code, out, err = run_cli("register", project, "--set", "registry.min_improvement=-1", "--force")
    assert code == 0, err
    assert str(version_with_alias("champion").version) == "2"
    assert str(version_with_alias("previous").version) == "1"
    assert version_with_alias("champion").tags["gate.forced"] == "true"


def test_best_finished_training_run_is_chosen_by_gate_metric(tiny_llama, write_project):
    cfg = load_config(str(write_project(tiny_llama)))
    store = tracking.connect(cfg=cfg)
    tags = {"loraflow.stage": "train", "loraflow.project": cfg.name,
            "loraflow.training_hash": tracking.training_hash(cfg)}
    other_config = {**tags, "loraflow.training_hash": "another-config"}
    trial = {**tags, "loraflow.trial_number": "0"}
    runs = {}

    def training_run(label, metrics, run_tags=tags, status="FINISHED"):
        with mlflow.start_run(experiment_id=store.experiment_id, tags=run_tags) as active:
            mlflow.log_metrics(metrics)
            mlflow.end_run(status)
        runs[label] = active.info.run_id
    for label, metrics in (("low_loss", {"eval/loss": 1.0}), ("high_loss", {"eval/loss": 2.0})):
        training_run(label, metrics)
    training_run("other_config", {"eval/loss": 0.01}, other_config)  # never chosen: another training config
    training_run("trial", {"eval/loss": 0.01}, trial)  # never chosen without --from-study: a tune trial
    assert register.best_training_run(cfg, store) == runs["low_loss"]
    for label, delta in (("evaluated_worse", 0.01), ("evaluated_better", 0.2)):
        training_run(label, {"eval/loss": 3.0, "delta/rougeL": delta})
    training_run("failed", {"eval/loss": 0.1, "delta/rougeL": 0.9}, status="FAILED")
    assert register.best_training_run(cfg, store) == runs["evaluated_better"]


@pytest.mark.parametrize("minimum, champion, metric, passed", [
    (0.0, None, "rougeL", True), (0.5, None, "rougeL", False),        # min_improvement over the base
    (-1.0, 0.30, "rougeL", True), (-1.0, 0.35, "rougeL", False),     # must beat the champion's score
    (0.0, 2.5, "loss", True), (0.0, 2.0, "loss", False),              # loss: lower is better
])
def test_gate_decision(tiny_llama, write_project, minimum, champion, metric, passed):
    cfg = load_config(str(write_project(tiny_llama, registry={"min_improvement": minimum, "gate_metric": metric})))
    summary = {"base/rougeL": 0.2, "tuned/rougeL": 0.35, "delta/rougeL": 0.15,
               "base/loss": 3.0, "tuned/loss": 2.0}
    assert register.gate(cfg, summary, champion)[0] is passed


def test_bad_input_is_one_line_and_registers_nothing(tiny_llama, write_project, run_cli, tmp_path, monkeypatch):
    project = write_project(tiny_llama)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    code, _, err = run_cli("register", project, "--from-run", "0123456789abcdef0123456789abcdef")
    assert assert_one_line_error(code, err).startswith("error: unknown run id"), err

    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("tiny").experiment_id,
                          tags={"loraflow.stage": "train", "loraflow.base_model": str(tiny_llama)}) as empty:
        pass
    code, _, err = run_cli("register", project, "--from-run", empty.info.run_id)
    assert_one_line_error(code, err, "no 'adapter' artifact")

    code, _, err = run_cli("register", project, "--from-study", "no-such-study")
    assert_one_line_error(code, err, "no-such-study")

    code, _, err = run_cli("register", project, "--set", "registry.gate_metric=bleu_of_nothing")
    assert_one_line_error(code, err, "gate_metric")
    assert mlflow.MlflowClient().search_registered_models() == []
    assert not runs_of("register")
    assert not list(scratch.iterdir())  # not even the empty folder of a download that failed


def test_a_failure_while_registering_leaves_nothing_registered(tiny_llama, write_project, monkeypatch):
    from loraflow import serving

    cfg = load_config(str(write_project(tiny_llama)))
    with mlflow.start_run():
        model_uri = serving.log_model(cfg, tiny_llama).model_uri

    def broken_alias(*args, **kwargs):
        raise RuntimeError("registry unavailable")
    monkeypatch.setattr(mlflow.MlflowClient, "set_registered_model_alias", broken_alias)
    with pytest.raises(RuntimeError):
        register.register_version(cfg, tracking.connect(cfg=cfg), model_uri, {"gate.metric": "rougeL"}, "card")
    assert mlflow.MlflowClient().search_registered_models() == []


def loraflow_register_dirs() -> list:
    import os
    import tempfile
    from pathlib import Path

    return list(Path(tempfile.gettempdir()).glob(f"loraflow-register-{os.getpid()}-*"))


def test_an_interrupted_register_leaves_no_version_no_alias_and_no_temp_copy(tiny_llama, write_project, run_cli,
                                                                             monkeypatch):
    from loraflow import serving

    project = write_project(tiny_llama, train={"max_steps": 1})
    assert run_cli("train", project)[0] == 0

    def interrupted(*args, **kwargs):  # Ctrl+C while the merged model is being logged
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(serving, "log_model", interrupted)
        code, _, err = run_cli("register", project, "--set", "registry.min_improvement=-1")
    assert code == 130, err
    [run] = runs_of("register")
    assert run.info.status == "KILLED"
    assert not mlflow.MlflowClient().search_registered_models() and not loraflow_register_dirs()


def test_a_version_that_does_not_answer_never_takes_the_alias(tiny_llama, write_project, run_cli, monkeypatch):
    project = write_project(tiny_llama, train={"max_steps": 1}, registry={"min_improvement": -1.0})
    assert run_cli("train", project)[0] == 0
    assert run_cli("register", project)[0] == 0
    assert str(version_with_alias("champion").version) == "1"

    def broken(name, version, prompt):
        raise LoraflowError(f"{name} version {version} did not answer a test prompt")
    monkeypatch.setattr(register, "check_version_answers", broken)
    code, _, err = run_cli("register", project, "--force")
    assert_one_line_error(code, err, "did not answer a test prompt")
    assert set(registered_versions()) == {"1"} and str(version_with_alias("champion").version) == "1"
    assert not loraflow_register_dirs()
    [failed, _] = runs_of("register")
    assert failed.info.status == "FAILED" and "loraflow.registered_version" not in failed.data.tags
