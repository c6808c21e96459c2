"""Configs: dotted overrides with types, validation listing every problem, `base:` inheritance, the
self-description (help, defaults, choices), project lookup, `with_values`, every shipped project YAML,
and every MLproject entry point's command."""
from __future__ import annotations

import dataclasses
import os
import shlex
import typing
from pathlib import Path

import pytest
import yaml

from loraflow.config import (SECTIONS, Config, ConfigError, LrScheduler, describe, describe_text, from_dict,
                             load_config, with_values)
from loraflow.config.loading import type_problem

REPO = Path(__file__).resolve().parents[2]
PROJECT_FILES = sorted((REPO / "projects").glob("*/*.yaml"))
STAGES = ("prepare", "train", "evaluate", "tune", "register", "serve", "pipeline")


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def project(tmp_path) -> Path:
    return write_yaml(tmp_path / "project.yaml", {"name": "demo", "data": {"path": "builtin:catalogue"}})


def test_overrides_are_converted_to_the_field_types(project):
    cfg = load_config(str(project), ["lora.r=4", "train.learning_rate=3e-4", "train.epochs=2",
                                     "lora.target_modules=[q_proj, v_proj]", "data.packing=rows",
                                     "eval.seeds=[0, 1, 2]", "lora.layers_to_transform=[1]",
                                     "data.prompt_template=Title: {title}"])
    assert cfg.lora.r == 4 and isinstance(cfg.lora.r, int)
    assert cfg.train.learning_rate == 3e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.packing == "rows"
    assert cfg.eval.seeds == [0, 1, 2] and cfg.lora.layers_to_transform == [1]
    assert cfg.data.prompt_template == "Title: {title}"


def test_override_that_is_not_key_value(project):
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        load_config(str(project), ["lora.r"])


def test_validation_reports_every_problem_in_one_message(project):
    with pytest.raises(ConfigError) as caught:
        load_config(str(project), ["lora.rank=4", "train.max_steps=many", "lora.r=0", "train.learning_rate=-1",
                                   "data.path=", "model.quantization=int4", "eval.metrics=[rougeL, bleurt]",
                                   "optimizer.name=adamw"])
    message = str(caught.value)
    assert "\n" not in message
    for expected in ("lora.rank: unknown key", "train.max_steps: expected int, got str 'many'",
                     "lora.r: must be > 0, got 0", "train.learning_rate: must be > 0, got -1",
                     "data.path: missing", "model.quantization: 'int4' is not one of",
                     "eval.metrics: unknown metric 'bleurt'", "optimizer: unknown section"):
        assert expected in message, expected


@pytest.mark.parametrize("override, expected", [
    ("lora.r=-2", "lora.r: must be > 0"),
    ("train.learning_rate=0", "train.learning_rate: must be > 0"),
    ("lora.dropout=1.5", "lora.dropout: must be in [0, 1)"),
    ("train.batch_size=2.5", "train.batch_size: expected int"),
    ("data.packing=maybe", "data.packing: 'maybe' is not one of none, constant, rows"),
    ("data.val_fraction=0.95", "data.val_fraction + data.test_fraction"),
    ("eval.seeds=[]", "eval.seeds: expected a non-empty list"),
    ("lora.layers_to_transform=[-1]", "lora.layers_to_transform"),
    ("train.lr=1e-3", "train.lr: unknown key"),
])
def test_each_bad_value_is_reported(project, override, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(str(project), [override])
    assert expected in str(caught.value)


def test_missing_data_path_is_reported(tmp_path):
    project = write_yaml(tmp_path / "nodata.yaml", {"name": "nodata"})
    with pytest.raises(ConfigError, match="data.path: missing"):
        load_config(str(project))


def test_seq2seq_cannot_do_continued_pretraining(project):
    with pytest.raises(ConfigError, match="cpt needs model.kind=causal"):
        load_config(str(project), ["model.kind=seq2seq", "train.objective=cpt"])


def test_base_inheritance_merges_sections_and_overrides_win(tmp_path):
    write_yaml(tmp_path / "config.yaml", {"name": "parent", "data": {"path": "builtin:catalogue", "max_length": 96},
                                          "lora": {"r": 16, "alpha": 32}, "train": {"max_steps": 100}})
    write_yaml(tmp_path / "variant.yaml", {"base": "config.yaml", "lora": {"r": 4}})
    cfg = load_config(str(tmp_path / "variant.yaml"), ["train.max_steps=3"])
    assert (cfg.name, cfg.lora.r, cfg.lora.alpha, cfg.data.max_length, cfg.train.max_steps) == \
        ("parent", 4, 32, 96, 3)
    assert cfg.source == str((tmp_path / "variant.yaml").resolve())


def test_a_variant_without_a_name_is_named_after_its_folder_and_file(tmp_path):
    folder = tmp_path / "demo"
    folder.mkdir()
    write_yaml(folder / "config.yaml", {"data": {"path": "builtin:catalogue"}})
    write_yaml(folder / "fast.yaml", {"base": "config.yaml"})
    assert load_config(str(folder / "config.yaml")).name == "demo"
    assert load_config(str(folder / "fast.yaml")).name == "demo-fast"


def test_files_that_include_each_other_are_refused(tmp_path):
    write_yaml(tmp_path / "a.yaml", {"base": "b.yaml"})
    write_yaml(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="include each other"):
        load_config(str(tmp_path / "a.yaml"))


def test_paths_resolve_against_the_yaml_folder_with_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLOW_TEST_DATA", str(tmp_path / "elsewhere"))
    cfg = load_config(str(write_yaml(tmp_path / "p.yaml", {"data": {"path": "rows.jsonl"}})))
    assert cfg.resolve_path("rows.jsonl") == tmp_path / "rows.jsonl"
    assert cfg.resolve_path("$LORAFLOW_TEST_DATA/rows.jsonl") == tmp_path / "elsewhere" / "rows.jsonl"


def test_config_hash_follows_values_not_the_file(tmp_path):
    same = {"name": "same", "data": {"path": "builtin:catalogue"}}
    first = load_config(str(write_yaml(tmp_path / "a.yaml", same)))
    second = load_config(str(write_yaml(tmp_path / "b.yaml", same)))
    assert first.config_hash() == second.config_hash()
    assert load_config(str(tmp_path / "a.yaml"), ["lora.r=4"]).config_hash() != first.config_hash()


def test_unknown_project_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown project 'no-such-project'"):
        load_config("no-such-project")


def test_new_refusals_are_reported_together(project, tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(str(project), ["eval.bootstrap_samples=0", "data.max_rows=-1", "train.eval_rows=-5",
                                   "train.warmup_ratio=1.0", "registry.max_new_tokens_cap=0",
                                   "registry.min_improvement=lots", "train.lr_scheduler=cosine_annealing",
                                   "registry.model_name=team/model", "registry.alias=v2",
                                   "eval.metrics=[rougeL, bertscore]", f"eval.bertscore_model={tmp_path / 'none'}",
                                   "registry.gate_metric=sacrebleu"])
    message = str(caught.value)
    assert "\n" not in message
    for expected in ("eval.bootstrap_samples: must be >= 1, got 0", "data.max_rows: must be >= 0, got -1",
                     "train.eval_rows: must be >= 0, got -5", "train.warmup_ratio: must be in [0, 1), got 1.0",
                     "registry.max_new_tokens_cap: must be > 0, got 0",
                     "registry.min_improvement: expected float, got str 'lots'",
                     "train.lr_scheduler: 'cosine_annealing' is not one of linear, cosine,",
                     "registry.model_name 'team/model': MLflow refuses it (Invalid model name",
                     "registry.alias 'v2': MLflow refuses it (Version alias name 'v2' is reserved.)",
                     f"eval.bertscore_model: BERTScore model '{tmp_path / 'none'}' is not a local model folder",
                     "registry.gate_metric 'sacrebleu' is not evaluated: add it to eval.metrics (rougeL, bertscore)"):
        assert expected in message, expected
    assert message.count("; ") == 10, message  # one problem each, nothing else


@pytest.mark.parametrize("overrides, expected", [
    (["train.objective=cpt"], "registry.gate_metric 'rougeL': continued pretraining is evaluated on loss only; "
                              "set registry.gate_metric=loss"),
    (["registry.gate_metric=token_f1"], "registry.gate_metric 'token_f1' is not evaluated"),
    (["eval.metrics=[bertscore]", "registry.gate_metric=bertscore", "eval.bertscore_model=/no/such/folder"],
     "eval.bertscore_model: BERTScore model '/no/such/folder'"),
    (["registry.model_name=team:model"], "registry.model_name 'team:model': MLflow refuses it"),
    (["registry.model_name=.."], "registry.model_name '..': MLflow refuses it"),
    (["registry.alias=latest"], "registry.alias 'latest': MLflow refuses it"),
])
def test_each_new_refusal(project, overrides, expected):
    with pytest.raises(ConfigError, match=r"^invalid config: ") as caught:
        load_config(str(project), overrides)
    assert expected in str(caught.value)


@pytest.mark.parametrize("overrides", [
    ["train.objective=cpt", "registry.gate_metric=loss"], ["train.enabled=false", "registry.gate_metric=sacrebleu"],
    ["registry.gate_metric=perplexity"], ["eval.metrics=[token_f1]", "registry.gate_metric=token_f1"],
    ["train.lr_scheduler=constant_with_warmup", "train.warmup_ratio=0", "data.max_rows=0", "train.eval_rows=0",
     "registry.model_name=team.model-v1_2"],
])
def test_gate_metrics_and_values_that_are_fine(project, overrides):
    load_config(str(project), overrides)


def test_a_config_without_any_name_cannot_be_registered():
    with pytest.raises(ConfigError, match="registry.model_name: empty, and the project has no name"):
        from_dict({"data": {"path": "builtin:catalogue"}})
    assert from_dict({"data": {"path": "builtin:catalogue"}, "registry": {"model_name": "m"}}).model_name == "m"


def test_a_choice_outside_its_literal_is_one_message(project):
    with pytest.raises(ConfigError) as caught:
        load_config(str(project), ["model.kind=decoder", "tune.pruner=asha"])
    message = str(caught.value)
    assert "model.kind: 'decoder' is not one of causal, seq2seq" in message
    assert "tune.pruner: 'asha' is not one of median, successive_halving, hyperband, none" in message
    assert message.count("model.kind") == 1 and message.count("tune.pruner") == 1
    assert type_problem("k", "b", typing.Literal["a", "b"]) is None
    assert type_problem("k", ["a"], typing.Literal["a", "b"]) == "k: ['a'] is not one of a, b"


def test_the_scheduler_choices_are_those_of_transformers():
    from transformers import SchedulerType

    assert sorted(typing.get_args(LrScheduler)) == sorted(s.value for s in SchedulerType)


def test_describe_covers_every_field_with_its_help_and_default(project):
    cfg = load_config(str(project), ["lora.r=4", "eval.metrics=[rougeL]"])
    rows = describe(cfg)
    expected_keys = [f"{section}.{f.name}" if section in SECTIONS else section
                     for section in (f.name for f in dataclasses.fields(Config))
                     for f in (dataclasses.fields(SECTIONS[section]) if section in SECTIONS else [None])]
    assert [row["key"] for row in rows] == expected_keys
    assert expected_keys[:2] == ["name", "model.name"] and expected_keys[-1] == "source" and len(rows) > 80
    fresh = {row["key"]: row["value"] for row in describe(Config())}  # a default instance holds the defaults
    for row in rows:
        assert set(row) == {"key", "value", "default", "help", "choices"}
        assert row["help"].strip(), row["key"]
        assert row["default"] == fresh[row["key"]], row["key"]
    by_key = {row["key"]: row for row in rows}
    assert (by_key["lora.r"]["value"], by_key["lora.r"]["default"], by_key["lora.r"]["choices"]) == (4, 8, None)
    assert by_key["eval.metrics"]["default"] == ["rouge1", "rougeL"] and by_key["eval.metrics"]["value"] == ["rougeL"]
    assert by_key["model.kind"]["choices"] == ["causal", "seq2seq"]
    assert by_key["train.max_steps"]["default"] == -1 and "overrides train.epochs" in by_key["train.max_steps"]["help"]
    assert by_key["name"]["value"] == "demo" and by_key["source"]["value"] == str(project.resolve())


def test_describe_text_marks_changed_values(project):
    cfg = load_config(str(project), ["lora.r=4", "model.kind=seq2seq"])
    text = describe_text(cfg)
    rows = {line[2:].split()[0]: line for line in text.splitlines() if line[:2] in ("* ", "  ")}
    assert rows["lora.r"].startswith("* ") and "default 8" in rows["lora.r"]
    assert rows["model.kind"].startswith("* ") and "one of causal|seq2seq" in rows["model.kind"]
    assert rows["lora.alpha"].startswith("  ") and "default" not in rows["lora.alpha"]
    assert "\nlora: the adapter\n" in text and len(rows) == len(describe(cfg)) + 1  # + the legend
    value_column = 2 + max(map(len, rows)) + 2  # values start in one column after the keys
    assert rows["lora.r"][value_column:].startswith("4 ") and rows["model.name"][value_column - 1] == " "


def test_a_field_override_replaces_the_projects_template(tmp_path):
    data = {"path": "builtin:catalogue", "prompt_template": "Title: {title}", "target_template": "{content}"}
    project = write_yaml(tmp_path / "p.yaml", {"data": data})
    assert load_config(str(project)).data.prompt_template == "Title: {title}"
    cfg = load_config(str(project), ["data.prompt_field=abstract"])
    assert (cfg.data.prompt_field, cfg.data.prompt_template, cfg.data.target_template) == ("abstract", "", "{content}")
    cfg = load_config(str(project), ["data.target_field=title"])
    assert (cfg.data.prompt_template, cfg.data.target_template) == ("Title: {title}", "")


def test_a_field_and_its_template_both_overridden_are_refused(project):
    with pytest.raises(ConfigError, match="data.prompt_field and data.prompt_template both set: give one"):
        load_config(str(project), ["data.prompt_field=abstract", "data.prompt_template=Abstract: {abstract}"])


@pytest.mark.parametrize("overrides, expected", [
    (["data.chat_template=false", "data.system_prompt=Be brief."], "data.system_prompt set, but has no effect"),
    (["data.text_field=body"], "data.text_field set, but has no effect: only train.objective=cpt reads raw text"),
    (["train.objective=cpt", "registry.gate_metric=loss", "data.prompt_field=q"], "data.prompt_field set, but has no"),
    (["train.objective=cpt", "registry.gate_metric=loss", "data.packing=rows"], "data.packing set, but has no effect"),
    (["data.path=rows.jsonl", "data.builtin_rows=10"], "data.builtin_rows set, but has no effect"),
    (["tune.pruner=hyperband", "tune.pruner_warmup_steps=5"], "tune.pruner_warmup_steps set, but has no effect"),
    (["tune.pruner=median", "tune.pruner_reduction_factor=4"], "tune.pruner_reduction_factor set, but has no effect"),
])
def test_an_override_that_would_be_ignored_is_refused(project, overrides, expected):
    with pytest.raises(ConfigError) as caught:
        load_config(str(project), overrides)
    assert expected in str(caught.value)


def test_the_same_keys_in_a_yaml_file_are_not_refused(tmp_path):
    project = write_yaml(tmp_path / "p.yaml", {"data": {"path": "builtin:catalogue", "chat_template": False,
                                                        "system_prompt": "Be brief.", "text_field": "body"}})
    assert load_config(str(project)).data.system_prompt == "Be brief."


def test_projects_are_found_in_loraflow_projects_first(tmp_path, monkeypatch):
    first, second, cwd = tmp_path / "first", tmp_path / "second", tmp_path / "cwd"
    for root, name in ((second, "shared"), (second, "only-second"), (first, "shared"), (cwd / "projects", "shared")):
        (root / name).mkdir(parents=True)
        write_yaml(root / name / "config.yaml", {"data": {"path": "builtin:catalogue"}, "lora": {"r": len(str(root))}})
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("LORAFLOW_PROJECTS", os.pathsep.join([str(first), str(second)]))
    assert load_config("shared").source == str((first / "shared" / "config.yaml").resolve())
    assert load_config("only-second").source == str((second / "only-second" / "config.yaml").resolve())
    monkeypatch.delenv("LORAFLOW_PROJECTS")
    assert load_config("shared").source == str((cwd / "projects" / "shared" / "config.yaml").resolve())
    monkeypatch.setenv("LORAFLOW_PROJECTS", str(first))
    with pytest.raises(ConfigError) as caught:
        load_config("only-second")
    assert str(first.resolve()) in str(caught.value) and str((cwd / "projects").resolve()) in str(caught.value)


def test_with_values_validates_like_loading(project):
    cfg = load_config(str(project))
    with pytest.raises(ConfigError) as caught:
        with_values(cfg, {"lora.r": 0, "train.learning_rate": "fast", "lora.rank": 2})
    for expected in ("lora.r: must be > 0, got 0", "train.learning_rate: expected float, got str 'fast'",
                     "lora.rank: unknown key"):
        assert expected in str(caught.value)
    changed = with_values(cfg, {"lora.r": 16, "train.learning_rate": 1})
    assert (changed.lora.r, changed.train.learning_rate, changed.name, changed.source) == (16, 1.0, "demo", cfg.source)
    assert isinstance(changed.train.learning_rate, float) and cfg.lora.r == 8
    assert changed.config_hash() != cfg.config_hash()
    assert with_values(cfg, {}).config_hash() == cfg.config_hash()


@pytest.mark.parametrize("path", PROJECT_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_project_yaml_loads_and_validates(path):
    cfg = load_config(str(path))
    assert isinstance(cfg, Config) and cfg.name
    raw = yaml.safe_load(path.read_text())
    assert path.name == "config.yaml" or "base" in raw or "name" in raw, "a variant should name its experiment"
    assert (path.parent / "README.md").is_file(), f"{path.parent.name} has no README.md"


def test_every_project_has_a_config_and_a_smoke_variant():
    folders = sorted({p.parent for p in PROJECT_FILES})
    assert len(folders) >= 6
    for folder in folders:
        assert (folder / "config.yaml").is_file(), folder.name
        assert list(folder.glob("smoke*.yaml")), f"{folder.name} has no smoke variant"


def test_smoke_variants_read_the_repository_data_by_a_relative_path():
    for path in PROJECT_FILES:
        if not path.name.startswith("smoke"):
            continue
        cfg = load_config(str(path))
        if cfg.data.path.startswith("builtin:"):
            continue
        assert not Path(cfg.data.path).is_absolute(), path
        resolved = cfg.resolve_path(cfg.data.path).resolve()
        assert resolved.is_relative_to((REPO / "data").resolve()) and resolved.exists(), path


def mlproject_entry_points() -> dict:
    from mlflow.projects import _project_spec

    return _project_spec.load_project(str(REPO))._entry_points


def test_every_stage_has_an_mlproject_entry_point():
    assert set(STAGES) <= set(mlproject_entry_points())


@pytest.mark.parametrize("stage", STAGES)
def test_mlproject_entry_point_command_parses(stage):
    """The command mlflow would run, with default and with given parameters, parses as a loraflow command."""
    from loraflow.cli import cli

    entry_point = mlproject_entry_points()[stage]
    given = {"project": "quickstart"}
    if "overrides" in entry_point.parameters:
        given["overrides"] = "lora.r=4 train.max_steps=2"
    for parameters in ({}, given):
        argv = shlex.split(entry_point.compute_command(parameters, storage_dir=None))
        assert argv[:4] == ["python", "-m", "loraflow.cli", stage], argv
        command = cli.get_command(None, stage)
        context = command.make_context(stage, argv[4:])  # raises click.UsageError on any bad option
        assert context.params["project"] == "quickstart"
        if "overrides" in entry_point.parameters and parameters:
            assert shlex.split(context.params["overrides_text"]) == ["lora.r=4", "train.max_steps=2"]
