"""Every benchmark runs in --smoke mode on a tiny random model and writes its results JSON.

Timings are never asserted: only that each benchmark runs and records what docs/benchmarks.md needs.
"""
from __future__ import annotations

import importlib
import json
import shutil
import sys
from pathlib import Path

import optuna
import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
COMMON_KEYS = {"benchmark", "ratio", "smoke", "command", "date", "git_sha", "pairs", "warmup", "machine", "versions",
               "summary", "goals", "samples"}
SPECIFIC_KEYS = {
    "train": {"tokens_per_second", "tokens_per_second_with_eval", "loss", "flops", "loraflow_dtype"},
    "memory": {"peak_rss_mb", "ratio_to_fp32", "ratio_to_fp32_above_floor"},
    "generate": {"speedup_vs_naive_fp32", "identity", "seconds_median"},
    "serving": {"latency_http_vs_in_process", "throughput_many_vs_one", "server_startup_seconds"},
    "tune": {"time_to_target_no_pruning_over_pruning", "wall_no_pruning_over_pruning", "rounds"},
    "load": {"ratio", "counts", "server_rss_mb"},
    "coldstart": {"phases_seconds"},
    "levers": {"levers", "positions", "dtype"},
}
EXTRA_ARGS = {"memory": ["--configs", "nf4"], "train": ["--variants", "peft_forward,shared_head,unfused_head"]}


def bench_module(name: str):
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def bench_store(tmp_path_factory) -> str:
    """One MLflow store for the module's benchmarks (creating a sqlite store costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('bench-store')}/mlflow.db"


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory) -> Path:
    """Where the smoke results are copied under their full-run names, for the docs table test."""
    return tmp_path_factory.mktemp("bench-table")


@pytest.mark.parametrize("name", list(SPECIFIC_KEYS))
def test_benchmark_smoke_writes_results(name, tmp_path, monkeypatch, bench_store, table_dir):
    monkeypatch.setenv("LORAFLOW_BENCH_TRACKING_URI", bench_store)
    bench_module(f"bench_{name}").main(["--smoke", "--results-dir", str(tmp_path), *EXTRA_ARGS.get(name, [])])
    record = json.loads((tmp_path / f"{name}-smoke.json").read_text())
    assert COMMON_KEYS | SPECIFIC_KEYS[name] <= set(record), set(record) ^ (COMMON_KEYS | SPECIFIC_KEYS[name])
    assert record["benchmark"] == name and record["smoke"] is True
    assert record["machine"]["logical_cores"] >= 1 and record["versions"]["torch"]
    assert record["goals"] and all({"goal", "value", "threshold", "met"} <= set(g) for g in record["goals"])
    assert record["summary"] and all(isinstance(line, str) for line in record["summary"])
    assert isinstance(record["ratio"], (int, float))  # the headline figure; the first goal's unless set
    if name not in ("load", "coldstart"):
        assert record["ratio"] == record["goals"][0]["value"]
    if name == "serving":  # micro-batched concurrent answers are the lone ones in fp32; bf16 says what differs
        costs = record["batching_costs"]
        assert record["same_answers_concurrent_and_sequential"] is (costs["differing_answers"] == 0)
        assert costs["served_dtype"] != "fp32" or costs["differing_answers"] == 0
        assert 0 <= costs["token_agreement"] <= 1 and costs["token_agreement"] == 1 or costs["differing_answers"]
        assert costs["rougeL_delta"]["low"] <= costs["rougeL_delta"]["point"] <= costs["rougeL_delta"]["high"]
    if name == "generate":
        assert record["identity"]["mismatches"] == 0
    if name == "load":  # answers, not timings: every bad request a 4xx, no good one a 5xx, none lost
        assert record["counts"]["requests"] > 0 and record["counts"]["bad"] > 0
        assert record["counts"]["good_5xx"] == record["counts"]["bad_not_4xx"] == record["counts"]["lost"] == 0
    if name == "levers":  # each lever computes the same loss; the head levers keep fewer positions
        assert set(record["levers"]) == {"fused_forward", "per_token_head", "head_trim", "shared_masks",
                                         "fused_head_loss", "all"}
        assert all(record["levers"][lever]["loss_difference_from_as_is"] < 1e-4
                   for lever in ("fused_forward", "per_token_head", "head_trim", "fused_head_loss"))
        positions = record["positions"]
        assert positions["as_is"]["head_positions"] < positions["per_token_head"]["head_positions"] \
            < positions["head_trim"]["head_positions"] == positions["head_trim"]["positions"]
    if name == "train":
        assert record["loss"]["heldout"]["loraflow"] > 0 and record["loss"]["heldout"]["baseline"] > 0
        assert set(record["variants"]) == {"peft_forward", "shared_head", "unfused_head"}  # a lever left out in each
    shutil.copy(tmp_path / f"{name}-smoke.json", table_dir / f"{name}.json")


@pytest.mark.parametrize("suite, specific", [
    ("openai", {"routes", "first_token_over_whole", "stream_completion_tokens"}),
    ("versions", {"rss_bytes", "memory_ratio", "throughput_many_vs_one"})])
def test_serving_suites_of_the_openai_api_and_versions(suite, specific, tmp_path, monkeypatch, bench_store, table_dir):
    monkeypatch.setenv("LORAFLOW_BENCH_TRACKING_URI", bench_store)
    bench_module("bench_serving").main(["--smoke", f"--{suite}", "--results-dir", str(tmp_path)])
    record = json.loads((tmp_path / f"serving-{suite}-smoke.json").read_text())
    assert COMMON_KEYS | specific <= set(record), set(record) ^ (COMMON_KEYS | specific)
    assert record["ratio"] == record["goals"][0]["value"] > 0
    if suite == "openai":  # the two routes gave the same answers, and the stream came in pieces
        assert record["goals"][2]["value"] == 0 and record["stream_completion_tokens"] > 0
        assert 0 < record["first_token_over_whole"] <= 1
    else:  # a server of 4 versions holds one base: far from 4 servers' memory
        assert record["rss_bytes"]["4_versions"] < 2 * record["rss_bytes"]["1_version"]
    shutil.copy(tmp_path / f"serving-{suite}-smoke.json", table_dir / f"serving-{suite}.json")


def test_coldstart_of_qlora_also_times_the_start_that_quantises_again(tmp_path, monkeypatch, bench_store, table_dir):
    monkeypatch.setenv("LORAFLOW_BENCH_TRACKING_URI", bench_store)
    bench_module("bench_coldstart").main(["--smoke", "--results-dir", str(tmp_path), "--quantization", "nf4",
                                          "--pairs", "1"])
    record = json.loads((tmp_path / "coldstart-nf4-smoke.json").read_text())
    assert record["benchmark"] == "coldstart-nf4" and record["settings"]["quantization"] == "nf4"
    assert len(record["samples"]) == len(record["quantising_samples"]) == 1
    assert len(list(Path(record["settings"]["quantized_cache"]).iterdir())) == 1  # kept once, then loaded
    assert record["quantising_over_kept_copy"]["ratio_median"] > 0
    assert any("quantising the base again" in line for line in record["summary"])
    shutil.copy(tmp_path / "coldstart-nf4-smoke.json", table_dir / "coldstart-nf4.json")


def test_levers_of_continued_pretraining_toggle_only_those_that_apply(tmp_path, monkeypatch, bench_store, table_dir):
    monkeypatch.setenv("LORAFLOW_BENCH_TRACKING_URI", bench_store)
    levers = bench_module("bench_levers")
    levers.main(["--smoke", "--results-dir", str(tmp_path), "--objective", "cpt"])
    record = json.loads((tmp_path / "levers-cpt-smoke.json").read_text())
    assert record["objective"] == "cpt"
    assert set(record["levers"]) == {"fused_forward", "shared_masks", "fused_head_loss", "all"}
    assert record["levers"]["fused_head_loss"]["loss_difference_from_as_is"] < 1e-4
    as_is = record["positions"]["as_is"]  # every position labelled but each block's last (no next token)
    assert as_is["head_positions"] == as_is["positions"] - record["settings"]["batch_size"]
    with pytest.raises(SystemExit):  # nothing for the head-trim levers to trim in blocks of raw text
        levers.parse_args(["--smoke", "--objective", "cpt", "--levers", "head_trim"])
    shutil.copy(tmp_path / "levers-cpt-smoke.json", table_dir / "levers-cpt.json")


def test_memory_stages_measure_every_stage_and_project_the_8b_project(tmp_path, monkeypatch, bench_store):
    monkeypatch.setenv("LORAFLOW_BENCH_TRACKING_URI", bench_store)
    bench_module("bench_memory").main(["--smoke", "--stages", "--results-dir", str(tmp_path)])
    record = json.loads((tmp_path / "memory-stages-smoke.json").read_text())
    assert record["benchmark"] == "memory-stages" and record["smoke"] is True
    assert COMMON_KEYS | {"projected_gib", "host_gib", "formula", "constants", "cross_prediction", "measured"} \
        <= set(record)
    stages = record["measured"]["tiny"]["stages"]
    assert set(stages) == {"train", "train_checkpointed", "validation_loss", "evaluate", "merge", "gate",
                           "serve_load"}
    assert all(row["peak_gib"] > 0 and row["multiple_of_16bit_weights"] > 0 for row in stages.values())
    devices = record["projected_gib"]
    assert set(devices) == {"train", "validation_loss", "evaluate", "gate", "serve_load"}
    assert all(gib > 0 for gib in devices.values()) and record["host_gib"]["merge"] > 0
    assert record["ratio"] == max(devices.values()) / 24 == record["goals"][0]["value"]
    assert "KV cache" in record["formula"] and "optimizer" in record["formula"]


def test_docs_table_lists_every_goal(table_dir):
    run_all = bench_module("run_all")
    written = {p.stem for p in table_dir.glob("*.json")}
    if not written:
        pytest.skip("no benchmark results from the smoke tests above")
    text = run_all.table(table_dir)
    for name in written:
        record = json.loads((table_dir / f"{name}.json").read_text())
        assert all(goal["goal"] in text for goal in record["goals"])
        assert record["command"] in text


def study(*trials) -> dict:
    """A bench_tune sample from (state, value, seconds the trial took[, its reports {step: loss}]) per trial."""
    done, timeline = 0.0, []
    for number, (state, value, seconds, *reports) in enumerate(trials):
        done += seconds
        timeline.append({"number": number, "state": state, "value": value, "done_after_seconds": done,
                         "reports": reports[0] if reports else {}})
    return {"trials": timeline}


def test_the_pruning_ceiling_runs_whole_only_the_trials_that_end_best_so_far():
    bench_tune = bench_module("bench_tune")
    plain = study(("COMPLETE", 3.3, 10), ("COMPLETE", 3.4, 10), ("COMPLETE", 3.2, 10), ("COMPLETE", 3.35, 10),
                  ("COMPLETE", 3.1, 10), ("COMPLETE", 3.0, 10))
    pruning = study(("COMPLETE", 3.3, 10), ("PRUNED", 3.4, 2), ("PRUNED", 3.5, 3), ("PRUNED", 3.6, 1))
    ceiling = bench_tune.pruning_ceiling(plain, pruning, target=3.13)
    # trials 0, 2 and 4 set a new best and run whole (30 s); 1 and 3 cost the median stopped trial (2 s each)
    assert ceiling == {"ratio": 50 / 34, "ideal_seconds": 34, "stopped_trial_seconds": 2, "run_whole": [0, 2, 4],
                       "target_trial": 4}
    assert bench_tune.pruning_ceiling(plain, pruning, target=2.9) is None  # the unpruned study never got there


def test_a_pruner_replayed_on_an_unpruned_study_stops_the_trials_it_would_have_stopped():
    bench_tune = bench_module("bench_tune")
    curves = [[3.0, 2.9, 2.8], [3.5, 3.4, 3.3], [3.6, 3.5, 3.4], [2.9, 2.7, 2.5]]  # validation loss at steps 1-3
    plain = study(*(("COMPLETE", curve[-1], 7.0, {str(step): loss for step, loss in enumerate(curve, 1)})
                    for curve in curves))
    pruning = study(("COMPLETE", 2.8, 7.0, {"1": 3.0, "2": 2.9, "3": 2.8}), ("PRUNED", 3.5, 3.0, {"1": 3.5}))
    timing = bench_tune.timing_model([plain, pruning])
    assert timing == pytest.approx((1.0, 2.0))  # 1 s + 2 s per step: 7 s whole, 3 s stopped at the first
    assert bench_tune.replay_pruner(plain, optuna.pruners.NopPruner(), 2.6, timing) == pytest.approx(28.0)
    # the median of the finished trials at step 1 is trial 0's 3.0: trials 1 and 2 stop there, trial 3 goes on
    median = optuna.pruners.MedianPruner(n_startup_trials=1)
    assert bench_tune.replay_pruner(plain, median, 2.6, timing) == pytest.approx(7 + 3 + 3 + 7)
    assert bench_tune.replay_pruner(plain, optuna.pruners.NopPruner(), 2.4, timing) is None  # never reached
