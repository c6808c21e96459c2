"""Reading a project's config: YAML files with `base:` variants, dotted overrides, typed sections.

    cfg = load_config("quickstart", overrides=["train.max_steps=5", "lora.r=4"])
    trial = with_values(cfg, {"lora.r": 16})        # a validated copy with a few keys changed

A project is a folder holding `config.yaml` (and variants), looked up in $LORAFLOW_PROJECTS, then
./projects, then the checkout's projects/; or a path to a YAML file. A variant may start with
`base: config.yaml` to inherit another file and change a few keys.
"""
from __future__ import annotations

import contextlib
import copy
import os
import types
import typing
from pathlib import Path

import yaml

from loraflow.config.schema import REPO_ROOT, SECTIONS, Config, ConfigError
from loraflow.config.validation import override_problems, validate


def project_roots() -> list[Path]:
    """Folders holding projects: each of $LORAFLOW_PROJECTS, ./projects, then the checkout's projects/."""
    roots = [Path(p).expanduser() for p in os.environ.get("LORAFLOW_PROJECTS", "").split(os.pathsep) if p]
    roots.append(Path.cwd() / "projects")
    if (REPO_ROOT / "projects").is_dir():  # a source checkout; an installed wheel has none
        roots.append(REPO_ROOT / "projects")
    return list(dict.fromkeys(root.resolve() for root in roots))


def find_config_file(project: str) -> Path:
    """`quickstart` -> <a project root>/quickstart/config.yaml; a YAML path is taken as it is."""
    candidate = Path(project)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ConfigError(f"config file not found: {project}")
        return candidate.resolve()
    roots = project_roots()
    for root in roots:
        if (root / project / "config.yaml").is_file():
            return (root / project / "config.yaml").resolve()
    if (candidate / "config.yaml").is_file():
        return (candidate / "config.yaml").resolve()
    raise ConfigError(f"unknown project '{project}': no {project}/config.yaml in {', '.join(map(str, roots))} "
                      "(more folders: $LORAFLOW_PROJECTS) and no such YAML file")


def read_yaml_with_base(path: Path, seen: tuple = ()) -> dict:
    """The YAML mapping of `path`, merged over the file named by its `base:` key, if any."""
    if path in seen:
        raise ConfigError(f"config files include each other: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    return deep_merge(read_yaml_with_base((path.parent / base).resolve(), seen + (path,)), data)


def deep_merge(base: dict, update: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[str, object]:
    """`train.max_steps=5` -> ("train.max_steps", 5); values are read as YAML scalars or lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not KEY=VALUE")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if is_string_field(key.strip()) and not isinstance(value, str):
        value = raw  # `data.prompt_template=Title: {title}` is text, not a YAML mapping
    return key.strip(), value


def is_string_field(key: str) -> bool:
    section, _, leaf = key.partition(".")
    hint = typing.get_type_hints(SECTIONS[section]).get(leaf) if section in SECTIONS else None
    return hint is str or typing.get_origin(hint) is typing.Literal


def set_values(data: dict, values: dict) -> dict:
    """A copy of `data` with dotted keys set; a field set this way replaces its side's template."""
    data = copy.deepcopy(data)
    for key, value in values.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': {part} is not a section")
        node[leaf] = value
    for side in ("prompt", "target"):  # data.templates_for prefers the template: clear it (both set: refused)
        if f"data.{side}_field" in values and not values.get(f"data.{side}_template") \
                and isinstance(data.get("data"), dict):
            data["data"][f"{side}_template"] = ""
    return data


def type_problem(key: str, value, annotation) -> str | None:
    """A message if `value` does not fit the field's annotation (a type, union or Literal), else None."""
    if typing.get_origin(annotation) is typing.Literal:
        choices = typing.get_args(annotation)
        return None if value in choices else f"{key}: {value!r} is not one of {', '.join(map(str, choices))}"
    allowed = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    for kind in allowed:
        origin = typing.get_origin(kind) or kind
        if kind is type(None) and value is None:
            return None
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if origin in (str, bool, list, dict) and isinstance(value, origin):
            return None
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    return f"{key}: expected {names}, got {type(value).__name__} {value!r}"


def packing_bool_problem(value) -> str | None:
    """The one-line problem for data.packing given as a boolean (YAML `true`, or `--set data.packing=true`)."""
    if isinstance(value, str):
        with contextlib.suppress(yaml.YAMLError):
            value = yaml.safe_load(value)
    if not isinstance(value, bool):
        return None
    return (f"data.packing: {str(value).lower()} is not a packing mode: use constant (whole text cut into fixed "
            "blocks, rows see each other) or rows (whole rows per block, each attending only to itself); "
            "none turns packing off")


def build_section(section_name: str, cls, values, problems: list[str]):
    if not isinstance(values, dict):
        problems.append(f"{section_name}: expected a mapping, got {type(values).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    accepted = {}
    for key, value in values.items():
        if key not in hints:
            problems.append(f"{section_name}.{key}: unknown key")
            continue
        if isinstance(value, int) and not isinstance(value, bool) and hints[key] is float:
            value = float(value)
        if isinstance(value, str) and hints[key] is float:
            with contextlib.suppress(ValueError):  # YAML 1.1 reads `1e-4` (no dot) as a string
                value = float(value)
        problem = type_problem(f"{section_name}.{key}", value, hints[key])
        if f"{section_name}.{key}" == "data.packing":
            problem = packing_bool_problem(value) or problem
        if problem:
            problems.append(problem)
        else:
            accepted[key] = value
    return cls(**accepted)


def from_dict(data: dict, *, name: str = "", source: str = "", overrides: dict | None = None) -> Config:
    """Build a Config from a mapping with dotted `overrides` set; raises ConfigError listing every problem."""
    overrides = overrides or {}
    data = set_values(data, overrides)
    problems: list[str] = []
    sections = {}
    for key, values in data.items():
        if key == "name":
            continue
        if key not in SECTIONS:
            problems.append(f"{key}: unknown section (expected one of {', '.join(SECTIONS)})")
            continue
        sections[key] = build_section(key, SECTIONS[key], values, problems)
    cfg = Config(name=str(data.get("name") or name), source=source, **sections)
    problems += validate(cfg) + override_problems(cfg, overrides)
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    return cfg


def load_config(project: str, overrides: list[str] | tuple = ()) -> Config:
    """Load a project's config (folder name or YAML path), apply `--set` overrides, validate."""
    path = find_config_file(project)
    values = dict(parse_override(text) for text in overrides)
    default_name = path.parent.name if path.name == "config.yaml" else f"{path.parent.name}-{path.stem}"
    return from_dict(read_yaml_with_base(path), name=default_name, source=str(path), overrides=values)


def with_values(cfg: Config, values: dict[str, object]) -> Config:
    """A copy of `cfg` with dotted keys set ({"lora.r": 16}), rebuilt and validated like a loaded config."""
    return from_dict(cfg.to_dict(), name=cfg.name, source=cfg.source, overrides=values)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
