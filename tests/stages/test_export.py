"""`loraflow export`: a registered version as GGUF + Modelfile + README, the export run and its link, the errors,
and the files read back by transformers' GGUF reader against the version as it is served.

Each test registers the tiny model with a random LoRA adapter the way register does (the adapter, and the
adapter merged into the base as the merged folder) in its own store.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import mlflow
import pytest
from helpers import assert_one_line_error, runs_of

from loraflow import data, export, models, serving
from loraflow.config import load_config
from loraflow.export import verify
from loraflow.stages import export as export_stage
from loraflow.tracking import Tags

NAME = "tiny"
PROMPTS = ["Describe: Oak desk 1200 x 600", "Describe: Red mug, 350 ml", "Describe: Blue lamp 40W",
           "Describe: Tall vase 2024", "Describe: Steel shelf with 5 boards", "Describe: Wool rug 160x230",
           "Describe: Glass bowl 3 pack", "Describe: Pine bench 1.8 m"]


def random_adapter(base: Path, folder: Path, seed: int = 1) -> Path:
    """A LoRA adapter with random B matrices (the answers differ from the base's)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                             init_lora_weights=False)
    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(folder)
    return folder


def register_version(cfg, base: Path, scratch: Path, alias: str = "champion") -> str:
    """The version register would make: the adapter and its merge into the base, logged and registered."""
    adapter = random_adapter(base, scratch / "adapter")
    merged = models.merge_adapter(cfg, str(base), adapter, scratch / "merged")
    with mlflow.start_run():
        info = serving.log_model(cfg, merged, adapter)
    number = str(mlflow.register_model(info.model_uri, cfg.model_name, tags={Tags.GATE_METRIC: "rougeL",
                                                                             Tags.GATE_TUNED_SCORE: "0.25"}).version)
    mlflow.MlflowClient().set_registered_model_alias(cfg.model_name, alias, number)
    return number


@pytest.fixture
def project(tiny_llama, write_project):
    return write_project(tiny_llama, name=NAME, data={"system_prompt": "You write product copy."})


@pytest.fixture
def version(project, tiny_llama, tmp_path):
    return register_version(load_config(str(project)), tiny_llama, tmp_path / "version")


def metadata(path: Path) -> dict:
    """The GGUF's key-value fields (strings and scalars decoded; arrays as lists)."""
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}, [t.name for t in reader.tensors]


def test_export_writes_the_files_logs_the_run_and_tags_the_version(run_cli, project, version, tmp_path):
    code, out, err = run_cli("export", project, "--output", tmp_path / "out")
    assert code == 0, err
    gguf_path = tmp_path / "out" / f"{NAME}-v{version}-f16.gguf"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Modelfile", "README.md", gguf_path.name]
    fields, tensors = metadata(gguf_path)
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert fields["tokenizer.ggml.pre"] == "gpt2" and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.chat_template"].startswith("{% for m in messages %}<|im_start|>")
    assert "output.weight" in tensors and len(fields["tokenizer.ggml.merges"]) > 100
    [run] = runs_of("export")
    assert run.info.status == "FINISHED" and run.info.run_id in out
    assert run.data.tags[Tags.EXPORTED_VERSION] == f"models:/{NAME}/{version}"
    assert run.data.tags[Tags.PROJECT] == NAME and run.data.tags[Tags.GIT_SHA] and run.data.tags[Tags.CONFIG_HASH]
    version_tags = mlflow.MlflowClient().get_model_version(NAME, version).tags
    assert version_tags[Tags.export("f16")] == run.info.run_id
    manifest = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/export/manifest.json")
    assert manifest[gguf_path.name]["logged"] and manifest[gguf_path.name]["bytes"] == gguf_path.stat().st_size
    assert run.data.tags[Tags.EXPORT_SHA256] == manifest[gguf_path.name]["sha256"] == export_stage.sha256_of(gguf_path)
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "export")}
    assert {f"export/{gguf_path.name}", "export/Modelfile", "export/README.md"} <= logged
    readme = (tmp_path / "out" / "README.md").read_text()
    assert f"models:/{NAME}/{version}" in readme and "gate.tuned_score: 0.25" in readme


def test_files_over_the_limit_are_recorded_by_path_and_sha256(project, version, tmp_path):
    cfg = load_config(str(project))
    result = export_stage.run(cfg, quantization="q8_0", output=tmp_path / "q8", max_artifact_mb=0.05)
    gguf_file = result.files[result.gguf_path.name]
    assert not gguf_file["logged"] and gguf_file["path"] == str(result.gguf_path.resolve())
    assert gguf_file["sha256"] == export_stage.sha256_of(result.gguf_path)
    assert result.files["Modelfile"]["logged"]  # the small files still go along
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "export")}
    assert f"export/{result.gguf_path.name}" not in logged and "export/manifest.json" in logged
    tags = mlflow.MlflowClient().get_model_version(NAME, version).tags
    assert tags[Tags.export("q8_0")] == result.run_id and Tags.export("f16") not in tags


def test_bad_input_gets_one_line_errors(run_cli, project, version, tmp_path):
    assert_one_line_error(*run_cli("export", project, "--model-uri", f"models:/{NAME}@nobody")[::2], "unknown model")
    assert_one_line_error(*run_cli("export", project, "--model-uri", "models:/nothing/1")[::2], "unknown model")
    assert_one_line_error(*run_cli("export", project, "--model-uri", "runs:/abc/model")[::2], "models:/NAME@ALIAS")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    assert_one_line_error(*run_cli("export", project, "--output", tmp_path / "taken")[::2], "--force")
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep"
    code, _, err = run_cli("export", project, "--output", tmp_path / "taken", "--force")
    assert code == 0, err
    assert not (tmp_path / "taken" / "mine.txt").exists() and (tmp_path / "taken" / "Modelfile").is_file()


def test_a_failure_halfway_leaves_nothing_and_fails_the_run(run_cli, project, version, tmp_path, monkeypatch):
    written = []

    def fail_on_the_third(planned, weight):
        written.append(planned.gguf_name)
        if len(written) == 3:
            raise OSError("No space left on device")
        return original(planned, weight)
    original = export.converter.converted
    monkeypatch.setattr(export.converter, "converted", fail_on_the_third)
    line = assert_one_line_error(*run_cli("export", project, "--output", tmp_path / "out")[::2], "halfway")
    assert "No space left on device" in line and len(written) == 3
    assert list(tmp_path.glob("*out*")) == []  # neither the output nor the staging folder
    [run] = runs_of("export")
    assert run.info.status == "FAILED" and "No space left" in run.data.tags[Tags.ERROR]
    assert Tags.export("f16") not in mlflow.MlflowClient().get_model_version(NAME, version).tags


def test_a_seq2seq_version_is_refused_naming_what_is_supported(tiny_t5, write_project, run_cli, tmp_path):
    project = write_project(tiny_t5, name="t5", model={"kind": "seq2seq"})
    with mlflow.start_run():
        info = serving.log_model(load_config(str(project)), tiny_t5)
    mlflow.register_model(info.model_uri, "t5")
    mlflow.MlflowClient().set_registered_model_alias("t5", "champion", "1")
    line = assert_one_line_error(*run_cli("export", project, "--output", tmp_path / "t5")[::2], "seq2seq")
    assert "llama" in line and "qwen2" in line and not (tmp_path / "t5").exists()


# --- read back by transformers' GGUF reader, against the version as served ---------------------------------

@pytest.fixture
def served(project, version, tiny_llama, tmp_path):
    """(cfg, the served model: the adapter on the base in the version's dtype, its tokenizer)."""
    cfg = load_config(str(project))
    model, tokenizer = models.load_served(cfg, str(tiny_llama), tmp_path / "version" / "adapter")
    return cfg, model.eval(), tokenizer


def teacher_forced_sequences(cfg, model, tokenizer) -> tuple[list, list]:
    """(prompt ids as training formats them, prompt + the served model's greedy answer)."""
    prompts = [data.prompt_token_ids(tokenizer, prompt, cfg) for prompt in PROMPTS]
    eos = {tokenizer.eos_token_id}
    return prompts, [ids + verify.greedy(model, ids, 24, eos) for ids in prompts]


def test_f32_f16_and_q8_0_read_back_like_the_served_version(served, tmp_path):
    cfg, reference, tokenizer = served
    prompts, sequences = teacher_forced_sequences(cfg, reference, tokenizer)
    figures = {}
    for quantization in ("f32", "f16", "q8_0"):
        result = export_stage.run(cfg, quantization=quantization, output=tmp_path / quantization)
        candidate, gguf_tokenizer = verify.load_gguf(result.gguf_path)
        figures[quantization] = verify.compare(reference, candidate, sequences)
        figures[quantization]["greedy"] = verify.same_greedy_answers(reference, candidate, prompts, 24,
                                                                     {tokenizer.eos_token_id})[0]
    assert figures["f32"]["max_abs_logit_diff"] < 1e-4, figures
    assert figures["f16"]["top1_agreement"] >= 0.995 and figures["f16"]["greedy"] >= 7, figures
    assert figures["q8_0"]["top1_agreement"] >= 0.90, figures  # random tiny logits are flat: 98% is SmolLM2's
    for text in ("Order 12345 of 2024: 3 x 250 ml at 19.99", "SKU-0042 1200x600 mm"):
        assert gguf_tokenizer(text, add_special_tokens=False)["input_ids"] == \
            tokenizer(text, add_special_tokens=False)["input_ids"]


def test_the_modelfile_renders_the_training_prompt(served, tmp_path):
    cfg, _, tokenizer = served
    result = export_stage.run(cfg, output=tmp_path / "out")
    parsed = export.parse_modelfile((result.output_dir / "Modelfile").read_text())
    assert parsed["FROM"] == f"./{result.gguf_path.name}" and parsed["SYSTEM"] == "You write product copy."
    assert ("stop", "<|im_end|>") in parsed["PARAMETER"] and ("temperature", "0") in parsed["PARAMETER"]
    for prompt in PROMPTS[:3]:  # as Ollama asks it: the user's message, SYSTEM put first
        values = export.ollama_values([{"role": "user", "content": prompt}], parsed["SYSTEM"])
        rendered = export.render(parsed["TEMPLATE"], values)
        assert tokenizer(rendered, add_special_tokens=False)["input_ids"] == \
            data.prompt_token_ids(tokenizer, prompt, cfg)


def test_help_explains_the_command(run_cli):
    code, out, _ = run_cli("export", "--help")
    assert code == 0 and "GGUF" in out and "Modelfile" in out and "PROJECT" in out
    for option in ("--model-uri", "--quantization", "[f16|q8_0|f32]", "--output", "--force", "--max-artifact-mb"):
        assert option in out, option


def test_the_mlproject_entry_point_runs_the_command(run_cli, project, version, tmp_path):
    import shlex

    import yaml

    entry = yaml.safe_load((Path(__file__).resolve().parents[2] / "MLproject").read_text())["entry_points"]["export"]
    values = {name: spec["default"] for name, spec in entry["parameters"].items()}
    values.update(project=str(project), quantization="q8_0", output=str(tmp_path / "mlproject"))
    argv = shlex.split(entry["command"].format(**{k: shlex.quote(v) for k, v in values.items()}))
    assert argv[:4] == ["python", "-m", "loraflow.cli", "export"]
    code, _, err = run_cli(*argv[3:])
    assert code == 0, err
    assert (tmp_path / "mlproject" / f"{NAME}-v{version}-q8_0.gguf").is_file()
