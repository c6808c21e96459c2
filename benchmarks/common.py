"""Shared benchmark plumbing: A/B alternation, medians and ratios, machine info, results JSON.

    from common import alternate, compare, write_results
    samples = alternate({"loraflow": run_a, "baseline": run_b}, pairs=5, warmup=1)
    ratio = compare([s["tokens_per_second"] for s in samples["loraflow"]],
                    [s["tokens_per_second"] for s in samples["baseline"]])

Every benchmark measures its arms side by side in one process, alternating them round by round
(A B, A B, ...) after a warm-up round, and reports per-arm medians plus the median of the per-round
A/B ratios with their min-max. Results go to benchmarks/results/<name>.json (`<name>-smoke.json`
for --smoke runs), with the machine, its load and the package versions.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
SAMPLE_DATA = REPO_ROOT / "data"
AMAZON_TITLES = SAMPLE_DATA / "amazon_titles" / "trn_sample.jsonl"
PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "mlflow",
            "optuna", "loraflow")


def base_parser(script: str, doc: str, pairs: int = 5, smoke_pairs: int = 1) -> argparse.ArgumentParser:
    """The options every benchmark takes (--smoke, --pairs, --warmup, --results-dir); pass __file__, __doc__."""
    parser = argparse.ArgumentParser(prog=f"benchmarks/{Path(script).name}", description=doc.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny random model and a few steps (for tests)")
    parser.add_argument("--pairs", type=int, default=None, help=f"measured A/B rounds (default {pairs}; smoke {smoke_pairs})")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured rounds first (default 1; smoke 0)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.set_defaults(default_pairs=pairs, smoke_pairs=smoke_pairs)
    return parser


def parse(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.pairs is None:
        args.pairs = args.smoke_pairs if args.smoke else args.default_pairs
    if args.warmup is None:
        args.warmup = 0 if args.smoke else 1
    args.command = shlex.join([".venv/bin/python", parser.prog, *(sys.argv[1:] if argv is None else argv)])
    args.load_at_start = load_now()
    return args



def alternate(arms: dict[str, Callable[[], dict]], pairs: int, warmup: int = 1,
              log: Callable[[str], None] | None = None) -> dict[str, list[dict]]:
    """Run every arm once per round, in the given order, `warmup` unmeasured rounds then `pairs` measured ones.

    Each arm returns a dict of measurements; the result maps arm name -> one dict per measured round.
    """
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    samples: dict[str, list[dict]] = {name: [] for name in arms}
    for round_index in range(warmup + pairs):
        measured = round_index >= warmup
        for name, arm in arms.items():
            sample = arm()
            if measured:
                samples[name].append(sample)
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in sample.items()
                     if isinstance(v, (int, float))}
            log(f"[{'round ' + str(round_index - warmup + 1) if measured else 'warm-up'}] {name}: {shown}")
    return samples


def timed(func: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call, with perf_counter."""
    started = time.perf_counter()
    result = func()
    return time.perf_counter() - started, result


def compare(a: list[float], b: list[float]) -> dict:
    """Medians of A and B, and the median, min and max of the per-round ratios A/B."""
    ratios = [x / y if y else float("inf") for x, y in zip(a, b)]
    return {"a_median": statistics.median(a), "b_median": statistics.median(b),
            "a_min_max": [min(a), max(a)], "b_min_max": [min(b), max(b)],
            "ratio_median": statistics.median(ratios), "ratio_min_max": [min(ratios), max(ratios)],
            "ratios": ratios}


def column(samples: list[dict], key: str) -> list[float]:
    return [float(s[key]) for s in samples]


def head_positions(batch: dict) -> int:
    """Positions at which a loraflow training batch has the LM head computed: its labelled tokens, else every row
    at its kept positions (logits_to_keep), else every position."""
    if "labelled_positions" in batch:
        return int(batch["labelled_positions"].sum())
    if "logits_to_keep" in batch:
        return len(batch["logits_to_keep"]) * len(batch["input_ids"])
    return int(batch["input_ids"].numel())


def goal(description: str, value: float, threshold: float, higher_is_better: bool = True) -> dict:
    met = value >= threshold if higher_is_better else value <= threshold
    return {"goal": description, "value": value, "threshold": threshold, "met": bool(met)}


def machine_info() -> dict:
    """CPU model, cores, torch threads, load average (the machine may be shared), platform."""
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(), "python": platform.python_version()}


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def write_results(name: str, args: argparse.Namespace, payload: dict) -> Path:
    """Write benchmarks/results/<name>.json (or <name>-smoke.json) with machine info and versions; its top-level
    "ratio" is payload["ratio"] if given, else the value of its first goal."""
    from loraflow.tracking import git_sha

    headline = payload.get("ratio", payload["goals"][0]["value"] if payload.get("goals") else None)
    record = {"benchmark": name, "ratio": headline,  # the headline figure, against the first goal
              "smoke": bool(args.smoke), "command": args.command,
              "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "git_sha": git_sha(),
              "pairs": args.pairs, "warmup": args.warmup, "machine": machine_info(),
              "load_average_at_start": getattr(args, "load_at_start", None), "versions": package_versions(), **payload}
    args.results_dir.mkdir(parents=True, exist_ok=True)
    path = args.results_dir / f"{name}{'-smoke' if args.smoke else ''}.json"
    staging = path.with_suffix(".json.tmp")
    staging.write_text(json.dumps(record, indent=2, default=str) + "\n")
    staging.replace(path)
    print(f"wrote {path}", file=sys.stderr)
    return path


def load_now() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def data_source() -> tuple[str, dict]:
    """The amazon_titles sample from the repository's data/ folder when present, else the built-in catalogue."""
    if AMAZON_TITLES.is_file():
        return str(AMAZON_TITLES), {"prompt_template": "Title: {title}", "target_template": "{content}"}
    return "builtin:catalogue", {"prompt_template": "Write a product description for: {title}",
                                 "target_template": "{content}", "builtin_rows": 400}


def bench_config(model_name: str, **sections):
    """A validated loraflow Config for benchmarks: the benchmark data set, `sections` merged over."""
    from loraflow.config import from_dict

    path, fields = data_source()
    raw = {"name": "bench", "model": {"name": model_name, "quantization": "none", "dtype": "auto"},
           "data": {"path": path, "max_length": 128, **fields},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"},
           "train": {"learning_rate": 1e-3, "batch_size": 8, "warmup_ratio": 0.0, "logging_steps": 1,
                     "eval_steps": 10_000, "save_steps": 10_000, "eval_rows": 32,
                     "output_dir": str(scratch_dir("loraflow-bench-"))},
           "eval": {"num_samples": 16, "max_new_tokens": 32}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return from_dict(raw, name="bench")


def scratch_dir(prefix: str) -> Path:
    """A new temp folder, removed when the benchmark process exits (a tune benchmark's stores and outputs
    come to gigabytes)."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def model_for(smoke: bool) -> str:
    """The real SmolLM2-135M-Instruct folder, or a tiny random Llama built now for --smoke."""
    from loraflow import models

    if smoke:
        return str(build_tiny_model(scratch_dir("loraflow-tiny-")))
    return models.resolve_model_path("smollm2-135m-instruct")


def build_tiny_model(folder: Path) -> Path:
    """The tests' tiny random Llama (hidden 64, chat template), for --smoke runs."""
    from loraflow.tiny import build_tiny_llama

    return build_tiny_llama(folder)


def use_temporary_tracking() -> str:
    """Point MLflow (and loraflow) at a throw-away sqlite store, so benchmarks never touch the user's.

    The store is made once per benchmark and handed to subprocesses in LORAFLOW_BENCH_TRACKING_URI
    (creating a sqlite store costs seconds of schema migrations).
    """
    from loraflow import tracking

    uri = os.environ.get("LORAFLOW_BENCH_TRACKING_URI")
    if not uri:
        folder = scratch_dir("loraflow-bench-mlflow-")
        uri = os.environ["LORAFLOW_BENCH_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
    os.environ.pop("MLFLOW_RUN_ID", None)
    tracking.connect(uri, "benchmarks")
    return uri


SHAPES_DIR = BENCH_DIR / "shapes"


def shape_values(name: str) -> dict:
    """benchmarks/shapes/<name>.json: an architecture's published config values (keys starting with _ are notes)."""
    path = SHAPES_DIR / f"{name}.json"
    if not path.is_file():
        known = sorted(p.stem for p in SHAPES_DIR.glob("*.json"))
        raise SystemExit(f"unknown shape {name!r}: choose from {', '.join(known)}")
    return json.loads(path.read_text())


def random_model_of_shape(name: str) -> Path:
    """A model folder of shape `name` (benchmarks/shapes/<name>.json) with random bf16 weights and SmolLM2's tokenizer.

    Built once into <LORAFLOW_CACHE>/shapes/<name>-<digest of the shape file> and reused; the tokenizer files come
    from the embedded default model's folder, so no download is needed. A shape marked _projection_only (8B) is
    never built.
    """
    import hashlib

    from loraflow import models

    values = shape_values(name)
    if values.get("_projection_only"):
        raise SystemExit(f"shape {name!r} is for the memory projection only: it is never built")
    digest = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]
    folder = models.cache_dir() / "shapes" / f"{name}-{digest}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        save_random_weights(values, staging)
        copy_tokenizer_files(Path(models.resolve_model_path("smollm2-135m-instruct")), staging)
        staging.rename(folder)
    except OSError:
        if not (folder / "config.json").is_file():  # not another process finishing first: a real failure
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def save_random_weights(values: dict, folder: Path) -> None:
    """config.json and random bf16 safetensors for the LlamaConfig `values` (seeded: the same weights every build)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{k: v for k, v in values.items() if not k.startswith("_")})
    torch.manual_seed(0)
    print(f"building a random-weight model of {config.num_hidden_layers} layers, hidden {config.hidden_size} "
          f"in {folder.parent} (once)", file=sys.stderr, flush=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)


def copy_tokenizer_files(source: Path, folder: Path) -> None:
    """The tokenizer (and its chat template, generation config) of the model folder `source`, copied into `folder`."""
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
             "generation_config.json")
    for name in names:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)


def finish_child(name: str, process, timeout: float = 1800) -> dict:
    """The JSON a benchmark's child process printed last; RuntimeError (with its stderr's tail) if it fails or
    runs past `timeout` seconds."""
    import subprocess

    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise RuntimeError(f"benchmark child {name} took more than {timeout:.0f} s") from None
    if process.returncode != 0:
        raise RuntimeError(f"benchmark child {name} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])
