"""The f16 export in llama.cpp itself (llama-cpp-python), against the version as served: runs only where
`llama_cpp` imports (build it once from its source package: docs/benchmarks.md, Export)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llama_cpp
BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def test_llama_cpp_tokenises_and_answers_like_the_served_version(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLOW_BENCH_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    sys.modules.pop("bench_export", None)
    import bench_export

    bench_export.main(["--smoke", "--max-new-tokens", "16", "--results-dir", str(tmp_path)])
    figures = json.loads((tmp_path / "export-smoke.json").read_text())["llama_cpp"]
    assert figures["prompts"] == 10 and figures["token_ids_equal"] == 10, figures
    assert figures["top1_agreement"] >= 0.99 and figures["same_greedy_answers"] >= 9, figures
