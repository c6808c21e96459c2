"""The whole chain, prepare -> train (or tune) -> evaluate -> register, as nested runs of one parent run.

    loraflow pipeline quickstart                    # a second call with the same inputs reuses every step
    loraflow pipeline quickstart --serve-check      # and then one REST prediction from the champion
    mlflow run . -e pipeline -P project=quickstart --env-manager local
    result = pipeline.run(cfg)                      # PipelineResult(run_id, steps, version, prediction)

A step's inputs are the config sections it reads, the data digest, the code version (git SHA) and
the run it builds on; their hash is the step run's `loraflow.step_key` tag. A FINISHED run of the
same stage with the same key in the experiment is reused instead of redone (the `_get_or_run` of
MLflow's multistep_workflow example): change `lora.r` and train, evaluate and register run again
while prepare is reused. With `train.enabled: false` the pipeline evaluates the base model alone (a
zero-shot baseline) and registers nothing. Under `mlflow run`, the run it was given is the parent.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow

import loraflow
from loraflow import LoraflowError, data, models, tracking
from loraflow.config import Config
from loraflow.tracking import Tags

STEP_SECTIONS = {
    "prepare": ("data",),
    "train": ("model", "data", "lora", "train"),
    "tune": ("model", "data", "lora", "train", "eval", "tune"),
    "evaluate": ("model", "data", "train", "eval"),
    "register": ("model", "data", "train", "eval", "registry"),
}
HEADLINE = ("eval/loss", "eval/best_loss", "train/wall_seconds", "train/cost_usd")


@dataclass
class Step:
    """One step of a pipeline: the run that did it (now, or earlier when reused)."""
    stage: str
    run_id: str | None
    reused: bool = False
    metrics: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    note: str = ""


@dataclass
class PipelineResult:
    run_id: str
    steps: list[Step]
    version: str | None = None  # the registered version this pipeline produced or reused
    prediction: str | None = None  # the serve check's answer


@dataclass
class Context:
    """What every step needs: the config, the data prepared once, the base model resolved once, the
    store, the parent run and a label."""
    cfg: Config
    prepared: data.PreparedData
    base_path: str
    store: tracking.Store
    parent_run_id: str
    label: str
    code_version: str


# --- step keys and reuse --------------------------------------------------------------------------

def step_key(ctx: Context, stage: str, upstream: str = "") -> str:
    """A hash of what decides a step's result: its config sections, data digest, code, upstream run."""
    values = ctx.cfg.to_dict()
    inputs = {"stage": stage, "sections": {name: values[name] for name in STEP_SECTIONS[stage]},
              "objective": ctx.cfg.train.objective, "data_digest": ctx.prepared.digest,
              "code_version": ctx.code_version, "upstream": upstream}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_step(store: tracking.Store, stage: str, key: str):
    """The latest FINISHED run of `stage` tagged with `key` in the experiment, or None."""
    runs = tracking.find_runs(store, stage=stage, status="FINISHED", tags={Tags.STEP_KEY: key}, max_results=1)
    return runs[0] if runs else None


def get_or_run(ctx: Context, stage: str, upstream: str, runner, usable=lambda run: True) -> Step:
    """Reuse the finished run of `stage` with the same inputs (if `usable(run)`), else `runner(tags)` -> run id."""
    key = step_key(ctx, stage, upstream)
    found = finished_step(ctx.store, stage, key)
    if found is not None and usable(found):
        say(f"{stage}: inputs unchanged, reusing run {found.info.run_id}")
        return Step(stage, found.info.run_id, True, dict(found.data.metrics), dict(found.data.tags))
    say(f"{stage}: running")
    run_id = runner({Tags.STEP_KEY: key, Tags.RUN_NAME: f"{ctx.label}/{stage}"})
    run = tracking.get_run(run_id, ctx.store)
    return Step(stage, run_id, False, dict(run.data.metrics), dict(run.data.tags))


def say(message: str) -> None:
    loraflow.say(f"pipeline: {message}")


# --- the steps ------------------------------------------------------------------------------------

def prepare_step(ctx: Context) -> Step:
    def runner(tags):
        with tracking.stage_run(ctx.cfg, "prepare", ctx.store, parent_run_id=ctx.parent_run_id, tags=tags) as active:
            mlflow.log_params(tracking.flat_params(ctx.cfg))
            data.log_prepared(ctx.cfg, ctx.prepared)
        return active.info.run_id
    return get_or_run(ctx, "prepare", "", runner)


def train_step(ctx: Context) -> Step:
    from loraflow.stages import train

    return get_or_run(ctx, "train", "", lambda tags: train.run(
        ctx.cfg, store=ctx.store, parent_run_id=ctx.parent_run_id, tags=tags, prepared=ctx.prepared,
        base_path=ctx.base_path).run_id)


def tune_step(ctx: Context) -> Step:
    """The Optuna study as one step; its best trial is the training run the next steps judge."""
    from loraflow.stages import tune

    def runner(tags):
        study_name = ctx.cfg.tune.study_name or f"{ctx.cfg.name}-{tags[Tags.STEP_KEY]}"
        return tune.run(ctx.cfg, store=ctx.store, study_name=study_name, parent_run_id=ctx.parent_run_id,
                        tags=tags).run_id
    step = get_or_run(ctx, "tune", "", runner)
    best = step.tags.get(Tags.BEST_RUN_ID)
    if not best:
        raise LoraflowError(f"the tuning run {step.run_id} names no best trial (every trial failed?)")
    step.note = f"best trial run {best}"
    return step


def evaluate_step(ctx: Context, trained_run_id: str | None) -> Step:
    """Base vs the trained adapter; with no training run, the base model alone (a zero-shot baseline)."""
    from loraflow.stages import evaluate

    if trained_run_id is None:
        base_dir = local_model_folder(ctx.base_path)
        return get_or_run(ctx, "evaluate", f"base:{ctx.cfg.model.name}", lambda tags: evaluate.run(
            ctx.cfg, store=ctx.store, model_dir=base_dir, parent_run_id=ctx.parent_run_id,
            tags={**tags, Tags.ZERO_SHOT: "true"}, prepared=ctx.prepared, base_path=ctx.base_path).run_id)
    return get_or_run(ctx, "evaluate", trained_run_id, lambda tags: evaluate.run(
        ctx.cfg, store=ctx.store, run_id=trained_run_id, parent_run_id=ctx.parent_run_id, tags=tags,
        prepared=ctx.prepared, base_path=ctx.base_path).run_id)


def register_step(ctx: Context, trained_run_id: str) -> Step:
    from loraflow.stages import register

    step = get_or_run(ctx, "register", trained_run_id, lambda tags: register.run(
        ctx.cfg, store=ctx.store, from_run=trained_run_id, parent_run_id=ctx.parent_run_id, tags=tags,
        prepared=ctx.prepared, base_path=ctx.base_path).run_id,
        usable=lambda run: version_exists(ctx, run.data.tags.get(Tags.REGISTERED_VERSION)))
    version = step.tags.get(Tags.REGISTERED_VERSION)
    if not version:
        step.note = f"not registered: {step.tags.get(Tags.GATE_REASON, 'the gate refused')}"
        return step
    champion = register.current_champion(ctx.cfg, ctx.store)
    step.note = f"{ctx.cfg.model_name} version {version}" + (
        f" @{ctx.cfg.registry.alias}" if champion and str(champion.version) == version
        else f" (@{ctx.cfg.registry.alias} is version {champion.version})" if champion else "")
    return step


def version_exists(ctx: Context, version: str | None) -> bool:
    """Whether a reused register step's version is still in the registry (a refused one has none: fine)."""
    if not version:
        return True
    try:
        ctx.store.client().get_model_version(ctx.cfg.model_name, version)
        return True
    except mlflow.exceptions.MlflowException:
        return False


def local_model_folder(path: str) -> Path:
    """The base model as a local folder (a hub id is looked up in, or fetched to, the HF cache)."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path))
    except Exception as exc:  # offline and not cached, gated, unknown id: one clear line
        raise LoraflowError(f"cannot find {path} locally or on the Hub: {str(exc).splitlines()[0][:200]}") from None


def run_steps(ctx: Context) -> list[Step]:
    """prepare -> train or tune (unless train.enabled is false) -> evaluate -> register."""
    steps = [prepare_step(ctx)]
    if not ctx.cfg.train.enabled:
        say("train.enabled is false: evaluating the base model alone, registering nothing")
        return steps + [evaluate_step(ctx, None)]
    if ctx.cfg.tune.enabled:
        steps.append(tune_step(ctx))
        trained_run_id = steps[-1].tags[Tags.BEST_RUN_ID]
    else:
        steps.append(train_step(ctx))
        trained_run_id = steps[-1].run_id
    steps.append(evaluate_step(ctx, trained_run_id))
    steps.append(register_step(ctx, trained_run_id))
    return steps


# --- the parent run, the summary, the serve check ------------------------------------------------

def variant_label(cfg: Config) -> str:
    """`paper-titles-qwen/last-layer` for a variant file, the project name for a config.yaml."""
    stem = Path(cfg.source).stem if cfg.source else "config"
    return cfg.name if stem == "config" or cfg.name.endswith(stem) else f"{cfg.name}/{stem}"


def headline_metrics(steps: list[Step]) -> dict:
    """Training cost and loss, and every base/tuned/delta mean of the evaluation (no stds or intervals)."""
    found = {}
    for step in steps:
        if step.stage in ("train", "tune"):
            found.update({key: value for key, value in step.metrics.items() if key in HEADLINE})
        if step.stage == "evaluate":
            found.update(tracking.evaluation_means(step.metrics))
    return found


def log_on_parent(steps: list[Step], version: str | None) -> None:
    mlflow.log_metrics(headline_metrics(steps))
    for step in steps:
        mlflow.set_tags({Tags.step(step.stage, "run_id"): step.run_id or "",
                         Tags.step(step.stage, "reused"): str(step.reused).lower()})
    if version:
        mlflow.set_tag(Tags.REGISTERED_VERSION, version)


def registered_version(steps: list[Step]) -> str | None:
    register = next((s for s in steps if s.stage == "register"), None)
    return register.tags.get(Tags.REGISTERED_VERSION) if register else None


def run(cfg: Config, *, store: tracking.Store | None = None, serve_check: bool = False) -> PipelineResult:
    """Run (or reuse) every step in one parent run; optionally one REST prediction from the champion.

    The data is prepared and the base model resolved once, here, and handed to every step.
    """
    store = store or tracking.connect(cfg=cfg)
    prepared = data.prepare(cfg)
    base_path = models.resolve_model_path(cfg.model.name, cfg)
    label = variant_label(cfg)
    with tracking.stage_run(cfg, "pipeline", store, run_name=f"{label}/pipeline",
                            tags={Tags.DATA_DIGEST: prepared.digest}) as parent:
        mlflow.log_params(tracking.flat_params(cfg))
        tracking.log_config(cfg)
        ctx = Context(cfg, prepared, base_path, store, parent.info.run_id, label, tracking.git_sha())
        steps = run_steps(ctx)
        version = registered_version(steps)
        log_on_parent(steps, version)
        prediction = check_serving(cfg, store, prepared) if serve_check else None
        if prediction is not None:
            mlflow.log_dict({"prompt": first_prompt(prepared), "prediction": prediction}, "serve_check/prediction.json")
    return PipelineResult(parent.info.run_id, steps, version, prediction)


def first_prompt(prepared: data.PreparedData) -> str:
    """A held-out prompt to ask the server (for raw-text projects, the start of a held-out passage)."""
    for split in ("test", "validation", "train"):
        for row in prepared.splits[split]:
            return row["prompt"] if "prompt" in row else " ".join(row["text"].split()[:24])
    raise LoraflowError("no rows to take a prompt from")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_serving(cfg: Config, store: tracking.Store, prepared: data.PreparedData) -> str | None:
    """Start loraflow's server with the champion on a free port, ask one prompt, stop the server."""
    from loraflow import serving
    from loraflow.stages import register

    if register.current_champion(cfg, store) is None:
        say(f"serve check skipped: no {cfg.model_name}@{cfg.registry.alias} to serve")
        return None
    model_uri, port = serving.default_model_uri(cfg), free_port()
    url = f"http://127.0.0.1:{port}"
    say(f"serve check: starting the server on {model_uri} at {url}")
    log = tempfile.NamedTemporaryFile(prefix="loraflow-serve-", suffix=".log", delete=False)
    process = serving.start_server(model_uri, store, port=port, stdout=log, stderr=log)
    try:
        serving.wait_until_ready(url, timeout=300, process=process)
        [answer] = serving.predict_over_http(url, [first_prompt(prepared)],
                                             {"max_new_tokens": min(cfg.eval.max_new_tokens, 32)})
    except LoraflowError as exc:
        tail = Path(log.name).read_text(errors="replace").strip().splitlines()[-1:] or [""]
        raise LoraflowError(f"serve check failed: {exc} (server log {log.name}: {tail[0][:200]})") from None
    finally:
        serving.stop_server(process)
        log.close()
    Path(log.name).unlink()  # kept only when the check fails, for its message
    return answer


def metric_lines(metrics: dict) -> list[str]:
    """`rougeL: base 0.1200 -> tuned 0.1800 (delta +0.0600)` per evaluated metric, then training numbers."""
    names = tracking.evaluated_metrics(metrics)
    lines = [f"  {name}: base {metrics.get(f'base/{name}', float('nan')):.4f} -> tuned {metrics[f'tuned/{name}']:.4f}"
             + (f" (delta {metrics[f'delta/{name}']:+.4f})" if f"delta/{name}" in metrics else "") for name in names]
    training = [f"{key}={metrics[key]:.4g}" for key in HEADLINE if key in metrics]
    return lines + (["  training: " + ", ".join(training)] if training else [])


def project_argument(cfg: Config) -> str:
    """How to name this config on the command line: `quickstart`, or the YAML's (relative) path."""
    if not cfg.source:
        return cfg.name
    source = Path(cfg.source)
    if source.name == "config.yaml" and source.parent.parent.name == "projects":
        return source.parent.name
    relative = os.path.relpath(source)
    return relative if not relative.startswith("..") else str(source)


def summary_text(cfg: Config, store: tracking.Store, result: PipelineResult) -> str:
    """What ran, what was reused, the headline numbers, the version, and how to look at it all."""
    lines = [f"pipeline {variant_label(cfg)}: parent run {result.run_id}"]
    for step in result.steps:
        status = "reused" if step.reused else "ran   "
        lines.append(f"  {step.stage:<9} {status} {step.run_id}" + (f"  {step.note}" if step.note else ""))
    lines += metric_lines(headline_metrics(result.steps))
    if result.version:
        lines.append(f"  registered: models:/{cfg.model_name}/{result.version}; serve the "
                     f"@{cfg.registry.alias} with: loraflow serve {project_argument(cfg)}")
    if result.prediction is not None:
        lines.append(f"  REST prediction: {result.prediction!r}")
    uri = tracking.redact(store.uri)
    start = "" if uri.startswith("http") else f"mlflow ui --backend-store-uri {uri}, then "
    lines.append(f"  open the MLflow UI: {start}{tracking.experiment_url(store)}")
    return "\n".join(lines)
