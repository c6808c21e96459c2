"""Cold start: from `loraflow train` to its first optimizer step, as a multiple of a steady step.

    .venv/bin/python benchmarks/bench_coldstart.py [--smoke] [--pairs 3] [--steps 8] [--quantization none|nf4]

Each round starts `python -m loraflow.cli train` on the benchmark config (SmolLM2, amazon_titles, batch 8
x 128 tokens, a train/loss every step, no evaluation before the end) as a new process with a store of its
own, and reads the times back from its MLflow run: the process start (taken here, just before the
process is made), the run's start (imports, config, data preparation and the model's path are done by
then), and each step's train/loss timestamp (logged when the step ends). Cold start = the first step's
timestamp - the process start - one steady step; steady step = (t(last step) - t(step 2)) / (steps - 2).
Ratio = cold start / steady step (lower is better). Phases: to the run's start, and from it to the end
of the first step's own work (model load, LoRA, tokenisation, Trainer). The figures are medians over
rounds; the page cache is warm after the first (unmeasured) round, as it is for a user's second run.
With --quantization nf4 (QLoRA, results/coldstart-nf4.json) two arms alternate: loraflow as it is, loading
the quantised copy it kept in the warm-up round (LORAFLOW_QUANTIZED_CACHE, a folder of this run), and the
same start quantising the base again (LORAFLOW_QUANTIZED_CACHE empty); ratio = quantising / kept copy,
from the run's start to the first step.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def write_project(cfg, folder: Path) -> Path:
    """The benchmark config as a project YAML the CLI can load."""
    values = cfg.to_dict()
    values.pop("name", None)
    path = folder / "coldstart.yaml"
    path.write_text(yaml.safe_dump({"name": "coldstart", **values}))
    return path


def one_start(project: Path, steps: int, **env: str) -> dict:
    """Start `loraflow train` in a new process with its own store (and `env`); its phase times from its run."""
    import mlflow

    folder = common.scratch_dir("bench-coldstart-")
    uri = f"sqlite:///{folder}/mlflow.db"
    environment = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1", **env}
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "loraflow.cli", "train", str(project)], env=environment,
                          cwd=folder, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"loraflow train failed: {done.stderr.strip().splitlines()[-1:]}")
    client = mlflow.MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("coldstart").experiment_id])
    stamps = {m.step: m.timestamp / 1000 for m in client.get_metric_history(run.info.run_id, "train/loss")}
    steady = (stamps[steps] - stamps[2]) / (steps - 2)
    cold = stamps[1] - started - steady
    return {"cold_start_seconds": cold, "steady_step_seconds": steady, "ratio": cold / steady,
            "to_run_start_seconds": run.info.start_time / 1000 - started,
            "run_start_to_first_step_seconds": stamps[1] - steady - run.info.start_time / 1000,
            "process_seconds": time.time() - started}


def parse_args(argv=None):
    parser = common.base_parser(__file__, __doc__, pairs=3)
    parser.add_argument("--steps", type=int, default=None, help="training steps per start (default 8; smoke 4)")
    parser.add_argument("--quantization", choices=("none", "nf4"), default="none",
                        help="model.quantization (nf4: also the start that quantises again, as an arm)")
    args = common.parse(parser, argv)
    args.steps = args.steps or (4 if args.smoke else 8)
    return args


def main(argv=None) -> dict:
    import statistics

    args = parse_args(argv)
    model_path = common.model_for(args.smoke)
    cfg = common.bench_config(model_path, model={"quantization": args.quantization},
                              train={"max_steps": args.steps, "logging_steps": 1, "eval_rows": 4,
                                     "batch_size": 4 if args.smoke else 8})
    project = write_project(cfg, common.scratch_dir("bench-coldstart-project-"))
    kept = str(common.scratch_dir("bench-coldstart-quantized-"))
    arms = {"train": lambda: one_start(project, args.steps, LORAFLOW_QUANTIZED_CACHE=kept)}
    if args.quantization != "none":
        arms["quantising"] = lambda: one_start(project, args.steps, LORAFLOW_QUANTIZED_CACHE="")
    arm_samples = common.alternate(arms, args.pairs, args.warmup)
    samples = arm_samples["train"]

    def median(key):
        return statistics.median(s[key] for s in samples)
    ratio = median("ratio")
    goals = [common.goal("cold start / steady step <= 10 (our own bar; lower is better)", ratio, 10.0,
                         higher_is_better=False)]
    summary = [f"`loraflow train` ({args.quantization}) to its first optimizer step: {median('cold_start_seconds'):.1f} s = "
               f"{ratio:.1f} steady steps of {median('steady_step_seconds'):.2f} s (min-max "
               f"{min(s['ratio'] for s in samples):.1f}-{max(s['ratio'] for s in samples):.1f}); of it, to the run's "
               f"start (imports, config, data, model path) {median('to_run_start_seconds'):.1f} s, then to the first "
               f"step (model load, LoRA, tokenisation, Trainer) {median('run_start_to_first_step_seconds'):.1f} s"]
    payload = {"summary": summary, "model": model_path, "ratio": ratio,
               "settings": {"steps": args.steps, "quantization": args.quantization, "quantized_cache": kept},
               "phases_seconds": {key: median(key) for key in ("cold_start_seconds", "steady_step_seconds",
                                                                "to_run_start_seconds",
                                                                "run_start_to_first_step_seconds")},
               "goals": goals, "samples": samples}
    if "quantising" in arm_samples:
        key = "run_start_to_first_step_seconds"
        kept_copy = common.compare(common.column(arm_samples["quantising"], key), common.column(samples, key))
        summary.append(f"run start to first step: quantising the base again {kept_copy['a_median']:.1f} s vs "
                       f"loading the kept copy {kept_copy['b_median']:.1f} s = {kept_copy['ratio_median']:.2f}x "
                       f"(min-max {kept_copy['ratio_min_max'][0]:.2f}-{kept_copy['ratio_min_max'][1]:.2f})")
        payload.update(quantising_over_kept_copy=kept_copy, quantising_samples=arm_samples["quantising"])
    common.write_results("coldstart" if args.quantization == "none" else f"coldstart-{args.quantization}", args,
                         payload)
    return payload


if __name__ == "__main__":
    main()
