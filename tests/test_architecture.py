"""The layout's rules, checked: the import contracts, module and function sizes, tags spelled once.

docs/architecture.md draws the layers; pyproject.toml's [tool.importlinter] holds the contracts.
"""
from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "loraflow"
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 50
RUN_CONTRACT = PACKAGE / "tracking" / "names.py"  # where every loraflow.* tag is spelled


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_the_import_contracts_hold():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.exists(), "import-linter comes with the dev extras: pip install -e '.[dev]'"  # never skipped
    done = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "4 kept, 0 broken" in done.stdout, done.stdout[-2000:]


def test_modules_and_functions_stay_small():
    too_long = []
    for path in sources():
        text = path.read_text()
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert not too_long, "\n".join(too_long)


def names_a_module(text: str) -> bool:
    """Whether `text` is a module path (or module:attribute), such as loraflow.cli or loraflow.serving:server_loop."""
    module = text.partition(":")[0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def test_tags_are_spelled_only_in_the_run_contract():
    spelled = []
    for path in sources():
        if path == RUN_CONTRACT:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("loraflow.") \
                    and " " not in node.value and not names_a_module(node.value):
                spelled.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not spelled, "use tracking.Tags:\n" + "\n".join(spelled)


def test_the_tag_check_tells_a_tag_from_a_module_path():
    """The check above can fail: a tag literal is not a module path, a module path is."""
    assert not names_a_module("loraflow.chat_model_uri")
    assert names_a_module("loraflow.serving:server_loop") and names_a_module("loraflow.cli")


def test_the_names_users_rely_on_still_import():
    """The CLI, `python -m loraflow.cli`, the server loop users put in UVICORN_LOOP, the benchmarks' tiny models."""
    from loraflow import cli, serving, tiny

    assert callable(cli.main) and callable(serving.server_loop) and callable(tiny.build_tiny_llama)
    done = subprocess.run([sys.executable, "-m", "loraflow.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "prepare" in done.stdout, done.stderr[-2000:]


def test_the_checkout_root_is_found_from_the_config_package():
    from loraflow.config import REPO_ROOT

    assert (REPO_ROOT / "MLproject").is_file() and (REPO_ROOT / "projects" / "quickstart").is_dir()
