"""`loraflow config PROJECT`: every key with its value, default and help.

    print(describe_text(load_config("quickstart")))
"""
from __future__ import annotations

import dataclasses
import json
import typing

from loraflow.config.schema import SECTIONS, Config


def describe(cfg: Config) -> list[dict]:
    """One row per key (`name`, `model.name`, ..., `source`) in definition order:
    {"key", "value", "default", "help", "choices"}; choices is None unless the field is a Literal."""
    rows = []
    for top in dataclasses.fields(Config):
        holder, prefix = (getattr(cfg, top.name), f"{top.name}.") if top.name in SECTIONS else (cfg, "")
        hints = typing.get_type_hints(type(holder))
        for item in dataclasses.fields(holder) if prefix else [top]:
            literal = typing.get_origin(hints[item.name]) is typing.Literal
            rows.append({"key": prefix + item.name, "value": getattr(holder, item.name), "default": default_of(item),
                         "help": item.metadata["help"],
                         "choices": list(typing.get_args(hints[item.name])) if literal else None})
    return rows


def default_of(item: dataclasses.Field):
    return item.default if item.default_factory is dataclasses.MISSING else item.default_factory()


def describe_text(cfg: Config) -> str:
    """`describe` as an aligned table grouped by section; `*` marks a value that differs from its default."""
    rows = describe(cfg)
    key_width = max(len(row["key"]) for row in rows)
    value_width = min(40, max(len(shown(row["value"])) for row in rows))
    headings = {f.name: f.metadata["help"] for f in dataclasses.fields(Config)}
    lines, group = [], None
    for row in rows:
        section = row["key"].split(".")[0] if "." in row["key"] else ""
        if section != group:
            group = section
            lines += [""] + ([f"{section}: {headings[section]}"] if section else [])
        changed = "." in row["key"] and row["value"] != row["default"]  # name and source have no real default
        notes = [row["help"]] + ([f"one of {'|'.join(row['choices'])}"] if row["choices"] else []) \
            + ([f"default {shown(row['default'])}"] if changed else [])
        lines.append(f"{'*' if changed else ' '} {row['key']:<{key_width}}  {shown(row['value']):<{value_width}}  "
                     + "; ".join(notes))
    return "\n".join(lines[1:] + ["", "* differs from the default"])


def shown(value) -> str:
    """A value as `--set` would take it: plain text, else JSON (empty or multi-line text, lists, null)."""
    if isinstance(value, str) and value and value.isprintable() and value.strip() == value:
        return value
    return json.dumps(value, ensure_ascii=False)
