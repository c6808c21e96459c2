"""Peak memory of LoRA training with nf4, int8 and none (bf16), each against fp32 LoRA; or of every stage.

    .venv/bin/python benchmarks/bench_memory.py [--smoke] [--pairs 2] [--steps 2] [--configs none,int8,nf4]
    .venv/bin/python benchmarks/bench_memory.py --stages [--smoke] [--shapes smollm2-135m,tinyllama-1.1b] [--reuse]

--stages measures every stage at each shape in its own process and projects the 8B project's stages
(benchmarks/memory_stages.py, results in memory-stages.json); what follows is the training comparison.

Every configuration trains a few steps through loraflow's own path (models.load_model, attach_lora,
training.trainer.build_trainer, Trainer.train) in a fresh subprocess, which reports its peak resident set size
(resource.getrusage(RUSAGE_SELF).ru_maxrss). The configurations run one after another (or, with
--parallel, a round's processes at once: a process's peak RSS does not depend on its neighbours),
round after round; the ratio of each to fp32 is taken per round. A child that only imports the same libraries
gives the floor every process pays, reported beside the peaks (and the ratios above that floor).
Children are started through /bin/sh so that their ru_maxrss is their own (see start_child); VmHWM
from /proc/self/status is recorded beside it as a cross-check.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CONFIGURATIONS = {  # name -> (model.quantization, model.dtype)
    "fp32": ("none", "fp32"),
    "none": ("none", "auto"),
    "int8": ("int8", "auto"),
    "nf4": ("nf4", "auto"),
}
FLOOR = "imports_only"


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_of_address_space_mb() -> float:
    """VmHWM of /proc/self/status: the peak RSS of this process image only (a cross-check)."""
    status = Path("/proc/self/status").read_text()
    return float(status.split("VmHWM:")[1].split()[0]) / 1024


def child(name: str, model_path: str, steps: int) -> dict:
    """In the fresh subprocess: train `steps` steps in configuration `name`; return its peak RSS."""
    import mlflow
    import torch

    from loraflow import data, models
    from loraflow.training.trainer import build_trainer

    if name == FLOOR:
        return {"peak_rss_mb": peak_rss_mb(), "vm_hwm_mb": peak_of_address_space_mb()}
    quantization, dtype = CONFIGURATIONS[name]
    common.use_temporary_tracking()
    cfg = common.bench_config(model_path, model={"quantization": quantization, "dtype": dtype},
                              train={"max_steps": steps, "eval_rows": 8})
    prepared = data.prepare(cfg)
    torch.manual_seed(cfg.train.seed)
    model, tokenizer = models.load_model(cfg, model_path)
    model = models.attach_lora(model, cfg)
    trainer = build_trainer(cfg, model, tokenizer, prepared, Path(cfg.train.output_dir))
    with mlflow.start_run():
        trainer.train()
    return {"peak_rss_mb": peak_rss_mb(), "vm_hwm_mb": peak_of_address_space_mb(), "compute_dtype": str(models.compute_dtype(cfg)).removeprefix("torch."),
            "last_train_loss": [e["loss"] for e in trainer.state.log_history if "loss" in e][-1]}


def start_child(name: str, model_path: str, steps: int) -> subprocess.Popen:
    """Start one configuration in a fresh Python process; it prints its JSON answer as the last stdout line.

    The child is started by /bin/sh, not straight from this process: Linux carries the RSS peak of the
    process that calls exec() into ru_maxrss, so a child forked from this (large) Python would report
    at least our own size. `; exit` keeps sh from exec-ing Python in its own place.
    """
    command = ["/bin/sh", "-c", '"$0" "$@"; exit $?', sys.executable, str(Path(__file__).resolve()),
               "--child", name, "--model", model_path, "--steps", str(steps)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})


def measure_rounds(names: list[str], model_path: str, steps: int, rounds: int, parallel: bool) -> dict:
    """name -> one result per round; a round runs every configuration once (at once when `parallel`:
    the peak RSS of a process does not depend on its neighbours, only the wall time does)."""
    samples: dict[str, list[dict]] = {name: [] for name in names}
    for round_index in range(rounds):
        if parallel:
            started = {name: start_child(name, model_path, steps) for name in names}
            results = {name: common.finish_child(name, process) for name, process in started.items()}
        else:
            results = {name: common.finish_child(name, start_child(name, model_path, steps)) for name in names}
        for name, result in results.items():
            samples[name].append(result)
            print(f"[round {round_index + 1}] {name}: {result}", file=sys.stderr, flush=True)
    return samples


def parse_args(argv=None):
    parser = common.base_parser(__file__, __doc__, pairs=2)
    parser.add_argument("--steps", type=int, default=None, help="training steps per child (default 2; smoke 1)")
    parser.add_argument("--configs", default=",".join(c for c in CONFIGURATIONS if c != "fp32"),
                        help="configurations to compare with fp32, comma-separated (default: none,int8,nf4)")
    parser.add_argument("--parallel", action="store_true", help="run a round's subprocesses at once (smoke default)")
    parser.add_argument("--stages", action="store_true",
                        help="peak memory of every stage at each of --shapes, and the projection at 8B "
                             "(benchmarks/memory_stages.py; results in memory-stages.json)")
    parser.add_argument("--shapes", default="smollm2-135m,tinyllama-1.1b",
                        help="--stages: shapes to measure, comma-separated (smoke: a tiny random model)")
    parser.add_argument("--reuse", action="store_true",
                        help="--stages: keep the shapes the results file already holds; measure only the others")
    parser.add_argument("--child", choices=[*CONFIGURATIONS, FLOOR], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = common.parse(parser, argv)
    args.steps = args.steps or (1 if args.smoke else 2)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [c for c in args.configs if c not in CONFIGURATIONS or c == "fp32"]
    if unknown:
        parser.error(f"unknown --configs {unknown}: choose from none, int8, nf4")
    args.parallel = args.parallel or args.smoke
    args.warmup = 0
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.model, args.steps)), flush=True)
        return {}
    if args.stages:
        import memory_stages

        return memory_stages.main(args)
    model_path = common.model_for(args.smoke)
    common.use_temporary_tracking()  # made once here, reused by every child
    names = [FLOOR, "fp32", *args.configs]
    samples = measure_rounds(names, model_path, args.steps, args.pairs, args.parallel)
    floor = common.column(samples[FLOOR], "peak_rss_mb")
    fp32 = common.column(samples["fp32"], "peak_rss_mb")
    ratios, above_floor = {}, {}
    for name in args.configs:
        peaks = common.column(samples[name], "peak_rss_mb")
        ratios[name] = common.compare(peaks, fp32)
        above_floor[name] = common.compare([p - f for p, f in zip(peaks, floor)], [p - f for p, f in zip(fp32, floor)])
    goals = [common.goal(f"peak RSS {name} / fp32 (report; lower is better)", ratios[name]["ratio_median"], 1.0,
                         higher_is_better=False) for name in ratios]
    peaks = {name: common.compare(common.column(samples[name], "peak_rss_mb"), fp32)["a_median"] for name in names}
    summary = [f"peak RSS fp32 LoRA {peaks['fp32']:.0f} MB (imports alone {peaks[FLOOR]:.0f} MB); "
               + "; ".join(f"{name} {peaks[name]:.0f} MB = {ratios[name]['ratio_median']:.2f}x fp32 "
                           f"({above_floor[name]['ratio_median']:.2f}x above the import floor)" for name in args.configs)]
    payload = {"summary": summary, "model": model_path, "data": common.data_source()[0],
               "settings": {"steps": args.steps, "batch_size": 8, "max_length": 128, "parallel": args.parallel,
                            "configurations": {k: {"quantization": q, "dtype": d} for k, (q, d) in CONFIGURATIONS.items()}},
               "peak_rss_mb": peaks,
               "ratio_to_fp32": ratios, "ratio_to_fp32_above_floor": above_floor, "goals": goals, "samples": samples}
    common.write_results("memory", args, payload)
    return payload


if __name__ == "__main__":
    main()
