"""The measured stages against loraflow.models.memory's formula: its constants fitted, each shape predicted from the
other, and every stage of projects/ptbr-llama31-cpt-sft projected at Llama-3.1-8B's shape.

    payload = memory_projection.report(shapes, smoke)   # shapes: {name: {"model": path, "samples": {stage: ...}}}

What is fitted and compared is each stage's peak above the floor (a child that only imports the libraries): the
device-side peak (after the model loaded) for the stages a GPU runs, the whole peak for the CPU-side merge. The
tiny random model's peaks above the floor, less its (negligible) formula terms, are each stage's process overhead
at any model size (the tokenizer, the data, the Trainer, MLflow's client, the metrics): host memory, added to
the formula where it is compared with a CPU's RSS and to the projected host RAM, never to device memory.
"""
from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from pathlib import Path

import common
import memory_stages

GIB = 1 << 30
FITTED = {"FORWARD_ELEMENTS": "validation_loss", "ACTIVATION_ELEMENTS": "train",  # fitted in this order: later
          "CHECKPOINT_ELEMENTS": "train_checkpointed"}                          # ones use the earlier
DEVICE_STAGES = ("train", "validation_loss", "evaluate", "gate", "serve_load")
PROJECT = common.REPO_ROOT / "projects" / "ptbr-llama31-cpt-sft"
PROJECT_CONFIGS = ("cpt.yaml", "config.yaml")
TARGET_SHAPE = "llama-3.1-8b"
OVERHEAD_SHAPE = "tiny"
CARD_GIB, BOUND_GIB = 24, 22  # an RTX 4090's 24 GB, and what a stage may take of it


@contextlib.contextmanager
def constants(values: dict):
    """memory.py's fitted constants set to `values` for the duration."""
    from loraflow.models import memory

    kept = {name: getattr(memory, name) for name in values}
    for name, value in values.items():
        setattr(memory, name, value)
    try:
        yield
    finally:
        for name, value in kept.items():
            setattr(memory, name, value)


def measured_case(model_path: str, samples: dict, smoke: bool) -> dict:
    """The shape, the settings each stage ran with, and each stage's measured peak above the floor, in bytes."""
    from transformers import AutoConfig

    from loraflow import models
    from loraflow.models import memory

    sizes = memory_stages.SMOKE if smoke else memory_stages.FULL
    work = Path(tempfile.gettempdir())
    floor = samples[memory_stages.FLOOR]["peak_mb"]
    measured = {}
    for stage in memory_stages.STAGES:
        sample = samples[stage]
        whole = stage in memory_stages.HOST_STAGES or sample["after_load_peak_mb"] is None
        measured[stage] = ((sample["peak_mb"] if whole else sample["after_load_peak_mb"]) - floor) * 2**20
    configs = {stage: memory_stages.stage_config(stage, model_path, work, sizes) for stage in memory_stages.STAGES}
    return {"shape": memory.shape_of(AutoConfig.from_pretrained(model_path)), "configs": configs,
            "dtype_bytes": models.compute_dtype(configs["train"]).itemsize,
            "stored_bytes": (models.saved_dtype(model_path) or models.compute_dtype(configs["train"])).itemsize,
            "measured": measured, "floor_bytes": floor * 2**20, "overhead": dict.fromkeys(measured, 0.0)}


def formula_bytes(case: dict, stage: str) -> float:
    """memory.stage_terms summed, with memory.py's constants as they are set now."""
    from loraflow.models import memory

    terms = memory.stage_terms(stage, case["shape"], case["configs"][stage], case["dtype_bytes"],
                               case["stored_bytes"])
    return sum(terms.values())


def predicted(case: dict, stage: str) -> float:
    """What the CPU measurement should read above the floor: the formula plus the stage's process overhead."""
    return formula_bytes(case, stage) + case["overhead"][stage]


def overheads(tiny: dict) -> dict:
    """stage -> bytes a stage's process holds above the floor whatever the model: the tiny model's measured peak
    less its formula terms."""
    return {stage: max(0.0, measured - formula_bytes(tiny, stage)) for stage, measured in tiny["measured"].items()}


def fit(case: dict) -> dict:
    """The constants that make the formula give each of their stages' measured peak on this one case (each term
    is linear in its constant: two evaluations solve it)."""
    from loraflow.models import memory

    values = {name: getattr(memory, name) for name in FITTED}
    for name, stage in FITTED.items():
        with constants({**values, name: 0.0}):
            at_zero = predicted(case, stage)
        with constants({**values, name: 1.0}):
            at_one = predicted(case, stage)
        values[name] = (case["measured"][stage] - at_zero) / (at_one - at_zero) if at_one != at_zero else 0.0
    return values


def predictions(case: dict, values: dict) -> dict:
    """stage -> {measured, predicted (GiB above the floor), error (predicted / measured - 1)}."""
    with constants(values):
        rows = {stage: (case["measured"][stage], predicted(case, stage)) for stage in memory_stages.STAGES}
    return {stage: {"measured_gib": m / GIB, "predicted_gib": p / GIB, "error": p / m - 1 if m > 0 else None}
            for stage, (m, p) in rows.items()}


def cross_check(cases: dict) -> tuple[dict, dict]:
    """(per-shape fits with their mean, each shape predicted from every other shape's fit)."""
    fits = {name: fit(case) for name, case in cases.items()}
    mean = {name: sum(f[name] for f in fits.values()) / len(fits) for name in FITTED}
    checks = {f"{target} from {source}": predictions(cases[target], fits[source])
              for target in cases for source in cases if source != target}
    return {"per_shape": fits, "used": mean}, checks


def shape_report(name: str, entry: dict, case: dict) -> dict:
    """A measured shape's figures: each stage's peak (GiB) and its multiple of the 16-bit weights."""
    sixteen = case["shape"].params() * 2
    stages = {}
    for stage, above in case["measured"].items():
        sample = entry["samples"][stage]
        stages[stage] = {"peak_gib": sample["peak_mb"] / 1024, "counted_gib": (above + case["floor_bytes"]) / GIB,
                         "above_floor_gib": above / GIB,
                         "multiple_of_16bit_weights": (above + case["floor_bytes"]) / sixteen,
                         "above_floor_multiple": above / sixteen}
    return {"model": entry["model"], "shape": dataclasses.asdict(case["shape"]), "params": case["shape"].params(),
            "weights_16bit_gib": sixteen / GIB, "floor_gib": case["floor_bytes"] / GIB, "stages": stages,
            "samples": entry["samples"]}


def target_shape():
    """Llama-3.1-8B's Shape, from benchmarks/shapes/llama-3.1-8b.json (never instantiated)."""
    from transformers import LlamaConfig

    from loraflow.models import memory

    values = common.shape_values(TARGET_SHAPE)
    return memory.shape_of(LlamaConfig(**{k: v for k, v in values.items() if not k.startswith("_")}))


def project_config(cfg, shape, values: dict, host_floor: float, overhead: dict) -> dict:
    """One project config's stages at `shape` on a GPU: device GiB per stage with its terms, and host GiB."""
    from loraflow import models
    from loraflow.models import memory

    dtype_bytes = 2 if cfg.model.dtype == "auto" else models.dtype_named(cfg.model.dtype).itemsize
    with constants(values):
        terms = {stage: memory.stage_terms(stage, shape, cfg, dtype_bytes, stored_bytes=2)
                 for stage in (*DEVICE_STAGES, "merge")}
    device = {stage: (sum(terms[stage].values()) + memory.CUDA_CONTEXT_BYTES) / GIB for stage in DEVICE_STAGES}
    on_cpu_first = shape.params() * dtype_bytes  # load_model builds an unquantised base on the CPU, then moves it
    on_cpu = {"gate": on_cpu_first, "serve_load": on_cpu_first, "merge": sum(terms["merge"].values())}
    host = {stage: (host_floor + overhead[stage] + on_cpu.get(stage, 0)) / GIB for stage in (*DEVICE_STAGES, "merge")}
    return {"settings": {"objective": cfg.train.objective, "batch_size": cfg.train.batch_size,
                         "max_length": cfg.data.max_length, "gradient_checkpointing": cfg.train.gradient_checkpointing,
                         "quantization": cfg.model.quantization, "lora_r": cfg.lora.r,
                         "eval_batch_size": cfg.eval.batch_size, "eval_rows": cfg.train.eval_rows,
                         "max_new_tokens": cfg.eval.max_new_tokens},
            "device_gib": device, "host_gib": host,
            "terms_gib": {stage: {k: v / GIB for k, v in t.items()} for stage, t in terms.items()}}


def project(values: dict, host_floor: float, overhead: dict) -> dict:
    """Every stage of both ptbr configs at Llama-3.1-8B's shape; per stage the larger of the two configs."""
    from loraflow.config import load_config

    shape = target_shape()
    by_config = {name: project_config(load_config(str(PROJECT / name)), shape, values, host_floor, overhead)
                 for name in PROJECT_CONFIGS}
    device = {stage: max(c["device_gib"][stage] for c in by_config.values()) for stage in DEVICE_STAGES}
    host = {stage: max(c["host_gib"][stage] for c in by_config.values()) for stage in (*DEVICE_STAGES, "merge")}
    return {"shape": dataclasses.asdict(shape), "params": shape.params(), "weights_16bit_gib": shape.params() * 2 / GIB,
            "projected_gib": device, "host_gib": host, "by_config": by_config}


def formula(values: dict) -> str:
    """The formula in words, with the constants used."""
    from loraflow.models import memory

    return (
        "peak(stage) = the sum of named terms, in bytes (loraflow.models.memory.stage_terms). "
        f"weights = linear params x (nf4 {memory.NF4_BYTES:.4f} | int8 1 | 16-bit 2) + embedding, head and norms x "
        "(4 in quantised training: prepare_model_for_kbit_training casts them to fp32; else the compute dtype's); "
        f"lora_weights = LoRA params x {memory.LORA_BYTES}; optimizer = LoRA params x {memory.ADAMW_BYTES} "
        "(fp32 gradient, AdamW m and v). train: activations = batch x length x bytes x A x (hidden + intermediate) x "
        "layers, or with gradient checkpointing batch x length x bytes x (C x hidden x layers + A x (hidden + "
        f"intermediate)), plus the head chunk min(tokens, {memory.HEAD_CHUNK_ROWS}) x vocab x "
        f"{memory.HEAD_CHUNK_BYTES} and the fp32 head's weight cast to 16 bits (vocab x hidden x 2), or the "
        "in-training validation loss if larger. validation_loss: positions x (bytes x F x (hidden + intermediate) + "
        f"vocab x ({memory.LOSS_BYTES} + bytes)), positions = the rows whose fp32 logits stay under 1 GiB (one at "
        "least) x length. evaluate and gate: the larger of that and answering: KV cache = 2 x layers x kv_heads x "
        "head_dim x (prompt + new tokens) x batch x bytes, plus the prefill batch x prompt x bytes x F x (hidden + "
        "intermediate); the gate and serve_load hold the unquantised base in the served dtype. merge (host RAM): "
        "params x stored bytes (the checkpoint, mapped) + linear params x merge bytes (each merged layer a new "
        "tensor) + the other params x merge bytes if the merge dtype differs. Device stages add "
        f"{memory.CUDA_CONTEXT_BYTES / GIB:.1f} GiB of CUDA context (assumed). bytes = the compute dtype's (2 for "
        f"bf16). Fitted: A = {values['ACTIVATION_ELEMENTS']:.2f}, C = {values['CHECKPOINT_ELEMENTS']:.2f}, "
        f"F = {values['FORWARD_ELEMENTS']:.2f}.")


def largest_error(checks: dict) -> float:
    errors = [abs(row["error"]) for check in checks.values() for row in check.values() if row["error"] is not None]
    return max(errors, default=0.0)


def summary_lines(shapes: dict, fits: dict, checks: dict, projection: dict) -> list[str]:
    lines = [f"{name}: " + "; ".join(f"{stage} {row['counted_gib']:.2f} GiB = {row['multiple_of_16bit_weights']:.2f}x "
                                     f"its 16-bit weights" for stage, row in report["stages"].items())
             for name, report in shapes.items()]
    lines += [f"{pair}: largest error {largest_error({pair: check}):.1%}" for pair, check in checks.items()]
    lines.append("ptbr-llama31-cpt-sft at Llama-3.1-8B, device GiB: " + ", ".join(
        f"{stage} {gib:.1f}" for stage, gib in projection["projected_gib"].items())
        + "; host GiB: " + ", ".join(f"{stage} {gib:.1f}" for stage, gib in projection["host_gib"].items()))
    return lines


def report(shapes: dict, smoke: bool) -> dict:
    """The results payload: measured figures per shape, the fit and its cross-check, the projection."""
    from loraflow.models import memory

    cases = {name: measured_case(entry["model"], entry["samples"], smoke) for name, entry in shapes.items()}
    overhead = dict.fromkeys(memory_stages.STAGES, 0.0)
    if len(cases) > 1 and OVERHEAD_SHAPE in cases:
        overhead = overheads(cases.pop(OVERHEAD_SHAPE))
        for case in cases.values():
            case["overhead"] = overhead
    fits, checks = cross_check(cases)
    values = fits["used"] if len(cases) > 1 else {name: getattr(memory, name) for name in FITTED}
    fits["used_source"] = "the mean of the shapes' fits" if len(cases) > 1 else "memory.py's (one shape measured)"
    with constants(values):
        fitted_on_all = {name: predictions(case, values) for name, case in cases.items()}
    host_floor = max(case["floor_bytes"] for case in cases.values())
    projection = project(values, host_floor, overhead)
    measured = {name: shape_report(name, shapes[name], case) for name, case in cases.items()}
    ratio = max(projection["projected_gib"].values()) / CARD_GIB
    goals = [common.goal(f"largest projected stage of ptbr-llama31-cpt-sft at 8B / a {CARD_GIB} GiB card "
                         f"(<= {BOUND_GIB} GiB)", ratio, BOUND_GIB / CARD_GIB, higher_is_better=False)]
    if checks:
        goals.append(common.goal("largest error predicting one shape's stages from the other's fit",
                                 largest_error(checks), 0.15, higher_is_better=False))
    return {"summary": summary_lines(measured, fits, checks, projection), "goals": goals, "ratio": ratio,
            "projected_gib": projection["projected_gib"], "host_gib": projection["host_gib"],
            "formula": formula(values), "constants": values, "fit": fits, "cross_prediction": checks,
            "fitted_on_all_shapes": fitted_on_all, "projection": projection, "measured": measured,
            "process_overhead_gib": {stage: value / GIB for stage, value in overhead.items()},
            "shapes": shapes, "samples": {name: entry["samples"] for name, entry in shapes.items()}}
