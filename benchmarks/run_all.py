"""Run every benchmark, one after another, each in its own process; then refresh docs/benchmarks.md.

    .venv/bin/python benchmarks/run_all.py                 # `make bench`: the real SmolLM2 figures
    .venv/bin/python benchmarks/run_all.py --smoke         # tiny random model, a minute or two
    .venv/bin/python benchmarks/run_all.py --only train,generate
    .venv/bin/python benchmarks/run_all.py --docs-only     # re-render the table from benchmarks/results/

Each benchmark writes benchmarks/results/<name>.json; the table in docs/benchmarks.md (between the
`results` markers) is rebuilt from those files after a full (non-smoke) run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
DOCS = BENCH_DIR.parent / "docs" / "benchmarks.md"
ORDER = ("train", "train-fp32", "train-fp32-avx2", "levers", "levers-cpt", "levers-fp32", "levers-fp32-cpt",
         "levers-fp32-avx2", "memory", "generate", "serving", "serving-fp32", "serving-openai", "serving-versions", "tune", "tune-successive-halving",
         "tune-successive-halving-factor-4", "tune-32-trials", "tune-successive-halving-factor-4-32-trials",
         "tune-successive-halving-factor-4-32-trials-seeds-3-5", "coldstart", "coldstart-nf4", "load")
KEPT = {  # results measured on another kind of CPU, kept for the table and never re-run here
    "train-fp32-avx2": "train-fp32 from a CPU with AVX2 only (no AVX-512, no native bf16)",
    "levers-fp32-avx2": "levers-fp32 from a CPU with AVX2 only",
}
VARIANTS = {  # result name: (benchmark, its options)
    "train": ("train", ["--variants", "unfused_head,full_head"]),
    "train-fp32": ("train", ["--dtype", "fp32", "--variants", "unfused_head"]),
    "levers-fp32": ("levers", ["--dtype", "fp32"]),
    "levers-cpt": ("levers", ["--objective", "cpt", "--max-length", "512", "--pairs", "5"]),
    "levers-fp32-cpt": ("levers", ["--dtype", "fp32", "--objective", "cpt", "--max-length", "512", "--pairs", "3"]),
    "serving-fp32": ("serving", ["--dtype", "fp32"]),
    "serving-openai": ("serving", ["--openai"]),
    "serving-versions": ("serving", ["--versions"]),
    "tune-successive-halving": ("tune", ["--pruner", "successive_halving"]),
    "tune-successive-halving-factor-4": ("tune", ["--pruner", "successive_halving", "--reduction-factor", "4"]),
    "tune-32-trials": ("tune", ["--trials", "32"]),
    "tune-successive-halving-factor-4-32-trials": ("tune", ["--pruner", "successive_halving", "--reduction-factor", "4",
                                                            "--trials", "32"]),
    "tune-successive-halving-factor-4-32-trials-seeds-3-5": ("tune", ["--pruner", "successive_halving",
                                                                      "--reduction-factor", "4", "--trials", "32",
                                                                      "--first-seed", "3"]),
    "coldstart-nf4": ("coldstart", ["--quantization", "nf4"]),
}
START, END = "<!-- results:start -->", "<!-- results:end -->"
LOADED_AT = 1.0  # 1-minute load average on this 2-core machine from which we call the machine loaded


def run_benchmark(name: str, smoke: bool, results_dir: Path | None) -> int:
    script, options = VARIANTS.get(name, (name, []))
    command = [sys.executable, str(BENCH_DIR / f"bench_{script}.py"), *options]
    command += ["--smoke"] if smoke else []
    command += ["--results-dir", str(results_dir)] if results_dir else []
    print(f"== {name}: {' '.join(command)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    code = subprocess.run(command).returncode
    print(f"== {name}: exit {code} after {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return code


def load_note(record: dict) -> str:
    start = (record.get("load_average_at_start") or [0])[0]
    end = record["machine"]["load_average_1_5_15"][0]
    state = "loaded" if max(start, end) >= LOADED_AT else "unloaded"
    return f"{state} (load {start:.1f} → {end:.1f})"


def table(results_dir: Path) -> str:
    """The markdown table of the latest figures, one row per goal, from results/<name>.json."""
    lines = ["| benchmark | figures (medians; ratio min–max over the rounds) | goal | met | machine |",
             "|---|---|---|---|---|"]
    commands = []
    for name in ORDER:
        path = results_dir / f"{name}.json"
        if not path.is_file():
            lines.append(f"| {name} | not run yet | | | |")
            continue
        record = json.loads(path.read_text())
        figures = "<br>".join(([f"*{KEPT[name]}*"] if name in KEPT else []) + record.get("summary", []))
        for index, goal in enumerate(record["goals"]):
            met = "yes" if goal["met"] else "**no**"
            lines.append(f"| {name if index == 0 else ''} | {figures if index == 0 else ''} | {goal['goal']} "
                         f"(got {goal['value']:.3g}) | {met} | {load_note(record) if index == 0 else ''} |")
        commands.append(f"- {name}: `{record['command']}` — {record['date']}, {record['pairs']} rounds after "
                        f"{record['warmup']} warm-up, {record['machine']['cpu']}, {record['machine']['logical_cores']} "
                        f"cores, torch {record['versions']['torch']}, {record['machine']['torch_threads']} threads")
    return "\n".join(lines + ["", "Commands and conditions:", "", *commands])


def refresh_docs(results_dir: Path) -> None:
    text = DOCS.read_text() if DOCS.is_file() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(f"{head}{START}\n{table(results_dir)}\n{END}{tail}")
    print(f"updated {DOCS}", file=sys.stderr)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--only", default=",".join(ORDER), help="comma-separated subset of " + ",".join(ORDER))
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--docs-only", action="store_true", help="only rebuild the docs table from existing results")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip() and n.strip() not in KEPT]
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; choose from {', '.join(ORDER)}")
    failed = [] if args.docs_only else [n for n in names if run_benchmark(n, args.smoke, args.results_dir) != 0]
    if not args.smoke:
        refresh_docs(args.results_dir or BENCH_DIR / "results")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
