"""The stages of `bench_memory.py --stages`, each run in a fresh subprocess that reports its peak memory.

    .venv/bin/python benchmarks/bench_memory.py --stages [--smoke] [--shapes smollm2-135m,tinyllama-1.1b]

Per shape: a floor child that only imports the libraries, then `train` (nf4, 2 steps of 8 blocks of 128 tokens,
through train.run) and `train_checkpointed` (the same with gradient checkpointing), whose adapter the others
use: `validation_loss` (generation.validation_loss of the nf4 base + adapter on 2 blocks of raw text at the shape's
length, every token labelled), `evaluate` (evaluate.run on the adapter, eval.num_samples 2), `merge`
(models.merge_adapter), `gate` (evaluate.run as_served) and `serve_load` (models.load_served). Each child reports
VmHWM (its peak RSS) and, once its model is loaded, its RSS then and the peak after it (the high-water mark is
reset by writing 5 to /proc/self/clear_refs): a GPU holds the loaded weights and what follows, never the
CPU-side copies that loading makes. Children return freed memory to the system at once (MALLOC_RETURNS_FREED),
so their RSS is what their tensors take. Training uses sdpa attention, as on a GPU, not the eager kernel loraflow
picks on an AVX-512 BF16 CPU (its batch x heads x length^2 scores a GPU never keeps).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import common

FLOOR = "imports_only"
STAGES = ("train", "train_checkpointed", "validation_loss", "evaluate", "merge", "gate", "serve_load")
HOST_STAGES = ("merge",)  # runs on the CPU on every machine: its whole peak counts
TEXT = common.SAMPLE_DATA / "ptbr_text" / "dom_casmurro.txt"
FULL = {"train_length": 128, "train_batch": 8, "steps": 2, "validation_length": 2048, "new_tokens": 32}
SMOKE = {"train_length": 32, "train_batch": 2, "steps": 1, "validation_length": 64, "new_tokens": 8}
# glibc keeps freed blocks below a moving threshold (up to 32 MB) for reuse, so a CPU's RSS holds on to a step's
# transients (300 MB over SmolLM2's 72 MB of checkpoints); a fixed 64 KiB threshold returns every freed block at once,
# and RSS follows the live tensors, as a GPU's allocated memory does
MALLOC_RETURNS_FREED = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
MARKS: dict = {}


def status_kib(key: str) -> int:
    return int(Path("/proc/self/status").read_text().split(f"{key}:")[1].split()[0])


def mark_loaded() -> None:
    """Record the peak so far (loading's) and the RSS now, then reset the high-water mark."""
    MARKS["load_peak_mb"] = max(MARKS.get("load_peak_mb", 0), status_kib("VmHWM") / 1024)
    MARKS["loaded_mb"] = status_kib("VmRSS") / 1024
    Path("/proc/self/clear_refs").write_text("5")


def watch_loads() -> None:
    """Mark the end of every model load the stages make through models.load_model or models.load_served."""
    from loraflow import models

    def marking(load):
        def load_and_mark(*args, **kwargs):
            loaded = load(*args, **kwargs)
            materialise(loaded[0])
            mark_loaded()
            return loaded
        return load_and_mark

    models.load_model = marking(models.load_model)
    if hasattr(models, "load_served"):
        models.load_served = marking(models.load_served)
    models.faster_cpu_attention = lambda model, cfg: "sdpa"  # as on a GPU (see the module docstring)


def materialise(model) -> None:
    """Copy every weight out of the checkpoint file it may be mapped from. A CPU keeps a mapped file's pages counted
    (and resident) beside any copy made later (k-bit training's fp32 cast, bitsandbytes' CPU repacking of 4-bit
    weights); a GPU holds each weight once, where it was moved."""
    from loraflow import models

    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()
        states = [getattr(tensor, "quant_state", None)]  # bitsandbytes' constants, mapped from the file too
        states.append(getattr(states[0], "state2", None))
        for state in filter(None, states):
            for name, value in vars(state).items():
                if hasattr(value, "clone"):
                    setattr(state, name, value.clone())
    models.release_memory()


def peaks() -> dict:
    """peak_mb: the whole process's peak; after_load_peak_mb: the peak since the last load (None without one)."""
    now = status_kib("VmHWM") / 1024
    loaded = "loaded_mb" in MARKS
    return {"peak_mb": max(MARKS.get("load_peak_mb", 0), now), "after_load_peak_mb": now if loaded else None,
            "loaded_mb": MARKS.get("loaded_mb"), "load_peak_mb": MARKS.get("load_peak_mb")}


def cpt_config(model_path: str, work: Path, sizes: dict, length: int, checkpointing: bool = False):
    """Continued pretraining on Dom Casmurro in nf4: every batch is exactly batch x length tokens."""
    from loraflow.config import from_dict

    return from_dict({
        "name": "memory-stages", "model": {"name": model_path, "quantization": "nf4", "dtype": "auto"},
        "data": {"path": str(TEXT), "max_length": length, "val_fraction": 0.1, "test_fraction": 0.0},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"},
        "train": {"objective": "cpt", "max_steps": sizes["steps"], "batch_size": sizes["train_batch"],
                  "learning_rate": 1e-3, "warmup_ratio": 0.0, "logging_steps": 1, "eval_steps": 10_000,
                  "save_steps": 10_000, "eval_rows": 2, "gradient_checkpointing": checkpointing,
                  "output_dir": str(work / "outputs")},
        "registry": {"serve_dtype": "bf16", "gate_metric": "loss"}}, name="memory-stages")


def sft_config(model_path: str, work: Path, sizes: dict):
    """The benchmarks' SFT data with eval.num_samples 2, judged and served in bf16 (as on a GPU)."""
    return common.bench_config(model_path, model={"quantization": "nf4"},
                               train={"eval_rows": 2, "output_dir": str(work / "outputs")},
                               eval={"num_samples": 2, "max_new_tokens": sizes["new_tokens"]},
                               registry={"serve_dtype": "bf16"})


def stage_config(stage: str, model_path: str, work: Path, sizes: dict):
    """The config a stage's child runs with (the projection evaluates the formula with the same one)."""
    from transformers import AutoConfig

    from loraflow.config import with_values

    if stage in ("train", "train_checkpointed"):
        return cpt_config(model_path, work, sizes, sizes["train_length"], stage == "train_checkpointed")
    if stage != "validation_loss":
        return sft_config(model_path, work, sizes)
    length = min(sizes["validation_length"], AutoConfig.from_pretrained(model_path).max_position_embeddings)
    cfg = cpt_config(model_path, work, sizes, length)  # eval.batch_size = eval_rows: 2 rows a forward at most
    return with_values(cfg, {"eval.batch_size": cfg.train.eval_rows})


def store():
    from loraflow import tracking

    return tracking.connect(common.use_temporary_tracking(), "benchmarks")


def run_train(model_path: str, work: Path, sizes: dict, checkpointing: bool) -> dict:
    from loraflow.stages import train

    cfg = stage_config("train_checkpointed" if checkpointing else "train", model_path, work, sizes)
    result = train.run(cfg, store=store())
    adapter = work / ("adapter-checkpointed" if checkpointing else "adapter")
    shutil.copytree(result.adapter_dir, adapter, dirs_exist_ok=True)
    return {"adapter": str(adapter), "tokens_per_step": cfg.train.batch_size * cfg.data.max_length,
            "checkpointing": checkpointing}


def text_rows_for_blocks(rows: list[dict], tokenizer, length: int, blocks: int) -> list[dict]:
    """The first rows whose text makes at least `blocks` blocks of `length` tokens."""
    taken, tokens = [], 0
    for row in rows:
        taken.append(row)
        tokens += len(tokenizer(row["text"], add_special_tokens=False)["input_ids"]) + 1
        if tokens >= blocks * length:
            break
    return taken


def run_validation_loss(model_path: str, work: Path, sizes: dict, adapter: str) -> dict:
    from loraflow import data, generation, models

    cfg = stage_config("validation_loss", model_path, work, sizes)
    length = cfg.data.max_length
    model, tokenizer = models.load_model(cfg, model_path)
    model = models.load_adapter(model, adapter)
    rows = text_rows_for_blocks(data.prepare(cfg).splits["validation"], tokenizer, length, cfg.train.eval_rows)
    examples = data.training_examples(rows, tokenizer, cfg)  # what validation_loss makes of the rows
    batches = generation.loss_batches(examples, cfg.eval.batch_size, generation.vocabulary_size(model))
    positions = max(len(batch) * max(len(row["input_ids"]) for row in batch) for batch in batches)
    loss = generation.validation_loss(model, tokenizer, rows, cfg)
    return {"length": length, "rows": len(examples), "positions": positions, "loss": loss}


def run_evaluate(model_path: str, work: Path, sizes: dict, adapter: str, as_served: bool) -> dict:
    from loraflow.stages import evaluate

    cfg = stage_config("gate" if as_served else "evaluate", model_path, work, sizes)
    served = {"as_served": True} if as_served else {}
    result = evaluate.run(cfg, store=store(), adapter_dir=adapter, base_path=model_path, **served)
    return {"prompts": cfg.eval.num_samples, "max_new_tokens": cfg.eval.max_new_tokens,
            "tuned_loss": result.summary.get("tuned/loss")}


def run_merge(model_path: str, work: Path, sizes: dict, adapter: str) -> dict:
    from loraflow import models

    cfg = stage_config("merge", model_path, work, sizes)
    merged = models.merge_adapter(cfg, model_path, adapter, work / "merged")
    dtype = str(models.saved_dtype(merged)).removeprefix("torch.")
    shutil.rmtree(merged, ignore_errors=True)
    return {"stored_dtype": str(models.saved_dtype(model_path)).removeprefix("torch."), "merged_dtype": dtype}


def run_serve_load(model_path: str, work: Path, sizes: dict, adapter: str) -> dict:
    import torch

    from loraflow import models

    cfg = stage_config("serve_load", model_path, work, sizes)
    model, _ = models.load_served(cfg, model_path, adapter)
    # weights loaded in the dtype they are stored in are mapped from the file and only read from it when first
    # used: read them all, as moving them to a GPU would
    with torch.inference_mode():
        for weight in model.parameters():
            weight.sum()  # in the weight's own dtype: no copy of it
    return {"dtype": str(model.dtype).removeprefix("torch.")}


PRELOAD = ("bitsandbytes", "mlflow", "peft", "torch", "matplotlib.pyplot", "pandas", "pyarrow", "datasets", "sklearn",
           "scipy", "rouge_score.rouge_scorer", "sqlalchemy", "alembic", "git", "transformers.trainer",
           "loraflow.training.trainer", "loraflow.metrics", "loraflow.stages.train", "loraflow.stages.evaluate")


def preload() -> None:
    """Import what any stage imports, and run a first bf16 forward and backward (thread pools, kernels), so that the
    floor child pays for them too and a stage's peak above the floor is its own."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    import torch

    weight = torch.randn(64, 64, dtype=torch.bfloat16, requires_grad=True)
    (torch.randn(8, 64, dtype=torch.bfloat16) @ weight).sum().backward()


def child(stage: str, model_path: str, work: Path, smoke: bool, adapter: str | None) -> dict:
    """In the fresh subprocess: run `stage` (or only import what the stages import) and report its peaks."""
    preload()
    if stage == FLOOR:
        return peaks()
    watch_loads()
    sizes = SMOKE if smoke else FULL
    if stage in ("train", "train_checkpointed"):
        result = run_train(model_path, work, sizes, stage == "train_checkpointed")
    elif stage == "validation_loss":
        result = run_validation_loss(model_path, work, sizes, adapter)
    elif stage in ("evaluate", "gate"):
        result = run_evaluate(model_path, work, sizes, adapter, as_served=stage == "gate")
    elif stage == "merge":
        result = run_merge(model_path, work, sizes, adapter)
    else:
        result = run_serve_load(model_path, work, sizes, adapter)
    return {**peaks(), **result}


def start(stage: str, model_path: str, work: Path, smoke: bool, adapter: str | None) -> subprocess.Popen:
    """Start one stage in a fresh Python process, through /bin/sh as bench_memory.start_child explains."""
    command = ["/bin/sh", "-c", '"$0" "$@"; exit $?', sys.executable, str(Path(__file__).resolve()),
               stage, model_path, str(work), *(["--adapter", adapter] if adapter else []), *(["--smoke"] if smoke else [])]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **MALLOC_RETURNS_FREED, "TRANSFORMERS_VERBOSITY": "error"})


def finish(stage: str, process: subprocess.Popen) -> dict:
    result = common.finish_child(stage, process, timeout=3600)
    print(f"[{stage}] peak {result['peak_mb']:.0f} MB, after loading {result['after_load_peak_mb']} MB",
          file=sys.stderr, flush=True)
    return result


def measure(model_path: str, smoke: bool) -> dict:
    """stage -> its child's answer; the floor and train first (the others use train's adapter), then the others in
    turn (at once for --smoke: a process's peak RSS does not depend on its neighbours)."""
    work = common.scratch_dir("loraflow-memory-stages-")
    common.use_temporary_tracking()  # made once here, reused by every child
    samples = {FLOOR: finish(FLOOR, start(FLOOR, model_path, work, smoke, None))}
    samples["train"] = finish("train", start("train", model_path, work, smoke, None))
    adapter = samples["train"]["adapter"]
    rest = STAGES[1:]
    if smoke:
        started = {stage: start(stage, model_path, work, smoke, adapter) for stage in rest}
        samples.update({stage: finish(stage, process) for stage, process in started.items()})
    else:
        samples.update({stage: finish(stage, start(stage, model_path, work, smoke, adapter)) for stage in rest})
    return samples


def model_of(shape: str) -> str:
    """The model folder measured for a shape name: the tiny random Llama (smoke), SmolLM2-135M's real weights,
    or random weights of benchmarks/shapes/<shape>.json."""
    if shape == "tiny":
        return common.model_for(True)
    if shape == "smollm2-135m":
        return common.model_for(False)
    return str(common.random_model_of_shape(shape))


def main(args) -> dict:
    """Measure every stage at each shape and at the tiny random model (its peaks above the floor are what a stage's
    process holds at any model size), reusing those the results file holds with --reuse; then fit and project
    (memory_projection.report). The file is rewritten after each shape, so a long run keeps what it measured."""
    import memory_projection

    path = args.results_dir / f"memory-stages{'-smoke' if args.smoke else ''}.json"
    shapes = json.loads(path.read_text()).get("shapes", {}) if args.reuse and path.is_file() else {}
    for shape, entry in shapes.items():
        if not Path(entry["model"]).is_dir():  # the tiny model lived in a scratch folder: the same one, built again
            entry["model"] = model_of(shape)
    for shape in ["tiny"] if args.smoke else [*args.shapes, "tiny"]:  # tiny: what a stage holds at any size
        if shape not in shapes:
            model_path = model_of(shape)
            shapes[shape] = {"model": model_path, "samples": measure(model_path, args.smoke)}
            common.write_results("memory-stages", args, {"summary": ["measuring"], "goals": [], "samples": {},
                                                         "ratio": None, "shapes": shapes})
    payload = memory_projection.report(shapes, args.smoke)
    common.write_results("memory-stages", args, payload)
    return payload


if __name__ == "__main__":  # a child: STAGE MODEL WORK [--adapter DIR] [--smoke]
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=[FLOOR, *STAGES])
    parser.add_argument("model")
    parser.add_argument("work", type=Path)
    parser.add_argument("--adapter")
    parser.add_argument("--smoke", action="store_true")
    given = parser.parse_args()
    print(json.dumps(child(given.stage, given.model, given.work, given.smoke, given.adapter)), flush=True)
