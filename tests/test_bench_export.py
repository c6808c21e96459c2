"""benchmarks/bench_export.py in --smoke mode: the figures docs/benchmarks.md's Export section needs."""
from __future__ import annotations

import json

from test_benchmarks import COMMON_KEYS, bench_module


def test_the_export_benchmark_smoke_writes_its_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLOW_BENCH_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    bench_module("bench_export").main(["--smoke", "--skip-llama-cpp", "--max-new-tokens", "12",
                                       "--results-dir", str(tmp_path)])
    record = json.loads((tmp_path / "export-smoke.json").read_text())
    assert COMMON_KEYS | {"quantizations", "llama_cpp", "settings"} <= set(record)
    assert record["benchmark"] == "export" and record["ratio"] == record["goals"][0]["value"]
    assert all({"goal", "value", "threshold", "met"} <= set(g) for g in record["goals"])
    sizes = {q: record["quantizations"][q]["bytes"] for q in ("f32", "f16", "q8_0")}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]
    assert record["quantizations"]["f32"]["max_abs_logit_diff"] < 1e-4  # the tiny model too: exact
    assert all(record["quantizations"][q]["tokenizer_ids_equal"] for q in sizes)
    assert record["llama_cpp"] == {"measured": False, "reason": "--skip-llama-cpp"}
    assert len(record["summary"]) == 4 and all(isinstance(line, str) for line in record["summary"])
