"""Every example project's smoke variant runs through `loraflow pipeline` on a CPU: on the tiny
fixture models (`--set model.name=...`), and one as written on the real SmolLM2."""
from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from helpers import runs_of

PROJECTS = Path(__file__).resolve().parents[1] / "projects"
TINY = ["train.max_steps=2", "eval.num_samples=2", "eval.max_new_tokens=4",
        "eval.bootstrap_samples=50", "registry.min_improvement=-1000"]  # random models: let the gate through
NO_BERTSCORE = ["eval.metrics=[rougeL]", "registry.gate_metric=rougeL"]  # MiniLM is for real_model tests
LONG_ABSTRACTS = ["data.max_length=1536"]  # the tiny tokenizer (400 tokens) spells abstracts out in ~1000 tokens


def step_run(parent, stage: str):
    """The run that did (or, reused, had done) `stage` for a pipeline run, or None if it had no such step."""
    run_id = parent.data.tags.get(f"loraflow.step.{stage}.run_id")
    return mlflow.get_run(run_id) if run_id else None


def run_smoke(run_cli, variant: str, model: Path, *overrides: str, registers: bool = True):
    """Run the pipeline on projects/<variant> with the tiny model; check its runs; return the parent run."""
    settings = [f"model.name={model}", *TINY, *overrides]
    before = {r.info.run_id for r in runs_of()}
    code, out, err = run_cli("pipeline", PROJECTS / variant, *[arg for s in settings for arg in ("--set", s)])
    assert code == 0, err
    [parent] = [r for r in runs_of("pipeline") if r.info.run_id not in before]
    assert parent.info.status == "FINISHED"
    stages = ("prepare", "train", "evaluate", "register") if registers else ("prepare", "evaluate")
    for stage in stages:
        assert step_run(parent, stage).info.status == "FINISHED", stage
    if registers:
        register = step_run(parent, "register")
        name, version = register.data.params["registry.model_name"], register.data.tags["loraflow.registered_version"]
        champion = mlflow.MlflowClient().get_model_version_by_alias(name, "champion")
        assert str(champion.version) == version and f"registered: models:/{name}/{version}" in out
    return parent


@pytest.fixture
def amazon_sample(sample_data):
    return sample_data / "amazon_titles" / "trn_sample.jsonl"


def test_quickstart_smoke(tiny_llama, run_cli):
    parent = run_smoke(run_cli, "quickstart/smoke.yaml", tiny_llama)
    train = step_run(parent, "train")
    assert train.data.params["model.quantization"] == "nf4"
    assert {"tuned/rougeL", "delta/rougeL", "eval/loss"} <= set(parent.data.metrics)


def test_product_descriptions_tinyllama_smoke(amazon_sample, tiny_llama, run_cli):
    parent = run_smoke(run_cli, "product-descriptions-tinyllama/smoke.yaml", tiny_llama)
    train = step_run(parent, "train")
    assert train.data.params["data.packing"] == "constant" and train.data.params["lora.r"] == "16"
    assert train.data.params["data.chat_template"] == "False"
    evaluation = step_run(parent, "evaluate")
    assert evaluation.data.params["eval.temperature"] == "0.7"
    sample = mlflow.artifacts.load_text(f"runs:/{train.info.run_id}/data/sample_train.jsonl")
    assert "<start_of_turn>user" in sample and "<start_of_turn>model" in sample


def test_amazon_titles_tinyllama_chat_smoke(amazon_sample, tiny_llama, run_cli):
    parent = run_smoke(run_cli, "amazon-titles-tinyllama-chat/smoke.yaml", tiny_llama, "data.max_length=256")
    evaluation = step_run(parent, "evaluate")
    assert {"tuned/rouge1", "tuned/rougeL"} <= set(evaluation.data.metrics)
    side_by_side = mlflow.artifacts.load_text(f"runs:/{evaluation.info.run_id}/eval/side_by_side.csv")
    assert side_by_side.splitlines()[0].startswith("seed,index,prompt,reference,base_output,tuned_output")
    assert "Description: " in side_by_side


def test_flan_t5_smoke_trains_evaluates_registers_and_answers(amazon_sample, tiny_t5, run_cli):
    parent = run_smoke(run_cli, "product-descriptions-flan-t5/smoke.yaml", tiny_t5)  # 8-bit base, as written
    train = step_run(parent, "train")
    assert train.data.params["model.kind"] == "seq2seq"
    assert "tuned/sacrebleu" in parent.data.metrics
    served = mlflow.pyfunc.load_model("models:/product-descriptions-flan-t5-smoke@champion")
    answers = served.predict([{"prompt": 'Pergunta: Qual é a descrição do produto "Mog\'s Kittens"?'}],
                             params={"max_new_tokens": 4})
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_paper_titles_variants_land_in_one_experiment(sample_data, tiny_llama, run_cli):
    """Zero-shot baseline, LoRA on all linear layers, LoRA on the last layer: one experiment, three run names."""
    settings = [*NO_BERTSCORE, *LONG_ABSTRACTS]
    baseline = run_smoke(run_cli, "paper-titles-qwen/smoke-baseline.yaml", tiny_llama, *settings, registers=False)
    all_linear = run_smoke(run_cli, "paper-titles-qwen/smoke.yaml", tiny_llama, *settings)
    last_layer = run_smoke(run_cli, "paper-titles-qwen/smoke-last-layer.yaml", tiny_llama, *settings,
                           "lora.layers_to_transform=[1]")  # the tiny model has 2 layers
    parents = (baseline, all_linear, last_layer)
    assert len({p.info.experiment_id for p in parents}) == 1
    assert len({p.info.run_name for p in parents}) == 3
    assert step_run(baseline, "train") is None
    zero_shot = step_run(baseline, "evaluate")
    assert zero_shot.data.tags["loraflow.zero_shot"] == "true"
    assert zero_shot.data.metrics["base/rougeL"] == zero_shot.data.metrics["tuned/rougeL"]
    train = step_run(last_layer, "train")
    assert train.data.params["lora.layers_to_transform"] == "[1]"
    full = step_run(all_linear, "train")
    assert train.data.metrics["train/trainable_params"] < full.data.metrics["train/trainable_params"]


def test_ptbr_smoke_cpt_and_qa(sample_data, tiny_llama, run_cli):
    cpt = run_smoke(run_cli, "ptbr-llama31-cpt-sft/smoke-cpt.yaml", tiny_llama)
    train = step_run(cpt, "train")
    assert train.data.params["train.objective"] == "cpt" and train.data.metrics["train/tokens"] > 0
    assert {"base/loss", "tuned/loss"} <= set(cpt.data.metrics) and "train/cost_usd" in cpt.data.metrics
    qa = run_smoke(run_cli, "ptbr-llama31-cpt-sft/smoke-qa.yaml", tiny_llama)
    evaluation = step_run(qa, "evaluate")
    assert {"tuned/token_f1", "tuned/token_f1_std", "base/token_f1_std"} <= set(evaluation.data.metrics)
    details = mlflow.artifacts.load_text(f"runs:/{evaluation.info.run_id}/eval/details.jsonl")
    assert '"seed": 0' in details and '"seed": 1' in details  # two sampling seeds: mean ± std


@pytest.mark.real_model
def test_smoke_variant_as_written_on_smollm2(sample_data, run_cli):
    """amazon-titles-tinyllama-chat/smoke.yaml as shipped (SmolLM2-135M, its chat template, 2 steps):
    train, then judge base vs tuned. (The pipeline around them is covered on the tiny models above.)"""
    variant = PROJECTS / "amazon-titles-tinyllama-chat/smoke.yaml"
    code, out, err = run_cli("train", variant)
    assert code == 0, err
    [train] = runs_of("train")
    assert train.info.status == "FINISHED" and train.data.metrics["train/steps"] == 2
    assert train.data.params["model.name"] == "smollm2-135m-instruct" and train.data.metrics["eval/loss"] > 0
    code, _, err = run_cli("evaluate", variant, "--run-id", train.info.run_id)
    assert code == 0, err
    [evaluation] = runs_of("evaluate")
    assert {"base/rougeL", "tuned/rougeL", "base/loss", "tuned/loss"} <= set(evaluation.data.metrics)
    side_by_side = mlflow.artifacts.load_text(f"runs:/{evaluation.info.run_id}/eval/side_by_side.csv")
    assert "Description: " in side_by_side
