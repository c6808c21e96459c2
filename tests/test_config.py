"""Configs: dotted overrides with types, validation listing every problem, `base:` inheritance, every
shipped project YAML, and every MLproject entry point's command."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from loraflow.config import ConfigError, Config, load_config

REPO = Path(__file__).resolve().parents[1]
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
                                     "lora.target_modules=[q_proj, v_proj]", "data.packing=true",
                                     "eval.seeds=[0, 1, 2]", "lora.layers_to_transform=[1]",
                                     "data.prompt_template=Title: {title}"])
    assert cfg.lora.r == 4 and isinstance(cfg.lora.r, int)
    assert cfg.train.learning_rate == 3e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.packing is True
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
    ("data.packing=maybe", "data.packing: expected bool"),
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
