"""Register the winning adapter: choose it, merge it, gate it, log it as a pyfunc, register, alias.

    loraflow register quickstart                       # the project's best finished training run
    loraflow register quickstart --from-run RUN_ID     # or --from-study NAME (an Optuna study's best trial)
    loraflow register quickstart --force               # register even when the gate refuses
    result = registry.run(cfg)                         # RegisterResult(version="3", promoted=True, ...)

The adapter is merged into the full-precision base (registry.merge_dtype), then evaluated against
the base on held-out rows by the evaluate stage (a nested run). It is registered only if
delta/<registry.gate_metric> >= registry.min_improvement and its tuned score beats the score
recorded on the current champion (version tag `gate.tuned_score`). The new version takes the alias
`champion` (registry.alias); the version it replaces gets `previous`. A refused promotion is not
an error: it says why and registers nothing.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import click
import mlflow
from mlflow.exceptions import MlflowException

from loraflow import LoraflowError, models, serving, tracking
from loraflow.config import Config

PREVIOUS_ALIAS = "previous"
LOWER_IS_BETTER = ("loss", "perplexity")


@dataclass
class RegisterResult:
    run_id: str  # the register run
    source_run_id: str
    promoted: bool
    message: str
    version: str | None = None
    summary: dict = field(default_factory=dict)


# --- choosing the winner --------------------------------------------------------------------------

def experiment_ids(cfg: Config) -> list[str]:
    """The current experiment (--experiment, MLflow variables) or else the project's own."""
    from mlflow.tracking import fluent

    if tracking.experiment_chosen():
        return [fluent._get_experiment_id()]
    experiment = mlflow.get_experiment_by_name(cfg.name)
    return [experiment.experiment_id] if experiment else []


def run_rank(run, gate_metric: str) -> tuple:
    """Sort key, best last: delta/<metric> (copied by evaluate), else tuned/<metric>, else lowest eval/loss."""
    metrics = run.data.metrics
    better = -1 if gate_metric in LOWER_IS_BETTER else 1
    for tier, key in ((3, f"delta/{gate_metric}"), (2, f"tuned/{gate_metric}")):
        if key in metrics:
            return tier, better * metrics[key]
    if "eval/loss" in metrics:
        return 1, -metrics["eval/loss"]
    return 0, run.info.start_time


def best_training_run(cfg: Config) -> str:
    """The best FINISHED training run of the experiment by the gate metric (else lowest eval/loss)."""
    ids = experiment_ids(cfg)
    runs = mlflow.MlflowClient().search_runs(
        ids, "tags.`loraflow.stage` = 'train' and attributes.status = 'FINISHED'", max_results=1000) if ids else []
    if not runs:
        raise LoraflowError(f"no finished training run of '{cfg.name}' to register: train first, or pass "
                            "--from-run or --from-study")
    return max(runs, key=lambda run: run_rank(run, cfg.registry.gate_metric)).info.run_id


def choose_run(cfg: Config, from_run: str | None, from_study: str | None):
    """The training run to register (an MLflow Run)."""
    if from_run and from_study:
        raise LoraflowError("give --from-run or --from-study, not both")
    if from_study:
        from loraflow import tune

        from_run = tune.best_trial_run_id(from_study, storage=None, cfg=cfg)
    run_id = from_run or best_training_run(cfg)
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        raise LoraflowError(f"unknown run id '{run_id}' in {mlflow.get_tracking_uri()}") from None
    trained_on = run.data.tags.get("loraflow.base_model")
    if trained_on and trained_on != cfg.model.name:
        raise LoraflowError(f"run {run_id} was trained on {trained_on}, but model.name is {cfg.model.name}: "
                            f"register it with --set model.name={trained_on}")
    if run.info.status != "FINISHED":
        print(f"loraflow: warning: run {run_id} is {run.info.status}, not FINISHED", file=sys.stderr)
    return run


# --- the gate -------------------------------------------------------------------------------------

def check_gate_metric(cfg: Config) -> None:
    """Fail before any work when the evaluation will not compute registry.gate_metric."""
    metric = cfg.registry.gate_metric
    if metric not in LOWER_IS_BETTER and cfg.train.objective == "cpt":
        raise LoraflowError(f"registry.gate_metric {metric!r}: continued pretraining is evaluated on loss only; "
                            "set registry.gate_metric=loss")
    if metric not in LOWER_IS_BETTER and metric not in cfg.eval.metrics:
        raise LoraflowError(f"registry.gate_metric {metric!r} is not evaluated: add it to eval.metrics "
                            f"({', '.join(cfg.eval.metrics)}) or use loss")


def improvement(summary: dict, metric: str) -> float:
    """How much the tuned model beats the base on `metric` (positive = better)."""
    if metric in LOWER_IS_BETTER:
        return summary[f"base/{metric}"] - summary[f"tuned/{metric}"]
    return summary[f"delta/{metric}"]


def beats(score: float, other: float, metric: str) -> bool:
    return score < other if metric in LOWER_IS_BETTER else score > other


def gate(cfg: Config, summary: dict, champion_score: float | None) -> tuple[bool, str]:
    """(passed, why): the improvement over the base must reach min_improvement and beat the champion."""
    metric, minimum = cfg.registry.gate_metric, cfg.registry.min_improvement
    if f"tuned/{metric}" not in summary:
        computed = ", ".join(sorted(summary)) or "nothing"
        raise LoraflowError(f"the evaluation computed no {metric!r} (it has {computed})")
    gain, tuned = improvement(summary, metric), summary[f"tuned/{metric}"]
    if gain < minimum:
        return False, f"{metric} improves on the base by {gain:+.4f}, less than registry.min_improvement={minimum:g}"
    if champion_score is not None and not beats(tuned, champion_score, metric):
        return False, (f"tuned {metric}={tuned:.4f} does not beat the {cfg.registry.alias}'s "
                       f"{metric}={champion_score:.4f}")
    why = f"{metric} improves on the base by {gain:+.4f}"
    if champion_score is not None:
        why += f" and beats the {cfg.registry.alias} ({tuned:.4f} vs {champion_score:.4f})"
    return True, why


def current_champion(cfg: Config):
    """The version holding registry.alias, or None (no model yet, or no alias)."""
    try:
        return mlflow.MlflowClient().get_model_version_by_alias(cfg.model_name, cfg.registry.alias)
    except MlflowException:
        return None


def champion_score(cfg: Config, champion) -> float | None:
    """The champion's recorded tuned score on this gate metric (None if not recorded or another metric)."""
    if champion is None or champion.tags.get("gate.metric") != cfg.registry.gate_metric:
        return None
    try:
        return float(champion.tags["gate.tuned_score"])
    except (KeyError, ValueError):
        return None


def evaluate_merged(cfg: Config, source_run_id: str, merged_dir: Path) -> dict:
    """The evaluate stage on the merged folder vs the base, as a run nested in the register run."""
    from loraflow import evaluate

    result = evaluate.run(cfg, run_id=source_run_id, model_dir=merged_dir, nested=True,
                          tags={"loraflow.gate_for_run_id": source_run_id})
    return result.summary


# --- registering ----------------------------------------------------------------------------------

def version_tags(cfg: Config, source, summary: dict, study: str | None, forced: bool, register_run_id: str) -> dict:
    """Lineage and gate values for the model version (tag values are strings)."""
    metric = cfg.registry.gate_metric
    tags = {"loraflow.source_run_id": source.info.run_id, "loraflow.register_run_id": register_run_id,
            "loraflow.base_model": cfg.model.name, "loraflow.data_digest": source.data.tags.get("loraflow.data_digest"),
            "loraflow.study": study, "gate.metric": metric, "gate.forced": str(forced).lower(),
            "gate.min_improvement": cfg.registry.min_improvement, "gate.improvement": improvement(summary, metric),
            "gate.tuned_score": summary.get(f"tuned/{metric}"), "gate.base_score": summary.get(f"base/{metric}"),
            "gate.delta_low": summary.get(f"delta/{metric}_ci_low"),
            "gate.delta_high": summary.get(f"delta/{metric}_ci_high")}
    return {key: str(value) for key, value in tags.items() if value not in (None, "")}


def settings_line(params: dict, section: str, keys: tuple) -> str:
    """`r=8, alpha=16, ...` from a training run's params, or a pointer to the run."""
    found = [f"{key}={params[f'{section}.{key}']}" for key in keys if f"{section}.{key}" in params]
    return ", ".join(found) or "see the source run"


def model_card(cfg: Config, source, summary: dict, study: str | None) -> str:
    """A markdown description: base, data, LoRA settings, evaluation deltas with intervals."""
    params, tags = source.data.params, source.data.tags
    data_source = tags.get("loraflow.data_source", cfg.data.path)
    lora_keys = ("r", "alpha", "dropout", "target_modules", "layers_to_transform")
    lines = [f"# {cfg.model_name}", "",
             f"LoRA fine-tune of `{cfg.model.name}`, merged into the base ({cfg.registry.merge_dtype}).", "",
             f"- data: `{data_source}` (digest {tags.get('loraflow.data_digest', '?')})",
             f"- LoRA: {settings_line(params, 'lora', lora_keys)}",
             f"- training: {settings_line(params, 'train', ('objective', 'learning_rate', 'max_steps', 'epochs'))}",
             f"- source run: {source.info.run_id}" + (f" (best trial of study `{study}`)" if study else ""), "",
             "## Evaluation (held-out rows, tuned vs base)", "",
             "| metric | base | tuned | tuned - base | 95% interval |", "|---|---|---|---|---|"]
    names = sorted(key.split("/", 1)[1] for key in summary if key.startswith("tuned/") and not key.endswith("_std"))
    for name in names:
        base, tuned = summary.get(f"base/{name}", float("nan")), summary[f"tuned/{name}"]
        low, high = summary.get(f"delta/{name}_ci_low"), summary.get(f"delta/{name}_ci_high")
        interval = f"[{low:+.4f}, {high:+.4f}]" if low is not None and high is not None else "-"
        lines.append(f"| {name} | {base:.4f} | {tuned:.4f} | {tuned - base:+.4f} | {interval} |")
    lines += ["", "Serve: `loraflow serve PROJECT`, then POST /invocations with "
              '`{"dataframe_records": [{"prompt": "..."}], "params": {"max_new_tokens": 64}}`.']
    return "\n".join(lines)


def register_version(cfg: Config, model_uri: str, tags: dict, description: str):
    """Register `model_uri`, describe it, move the aliases; on any error remove what was created."""
    client = mlflow.MlflowClient()
    champion = current_champion(cfg)
    model_existed = bool(client.search_registered_models(f"name = '{cfg.model_name}'"))
    version = mlflow.register_model(model_uri, cfg.model_name, tags=tags)
    try:
        client.update_model_version(cfg.model_name, version.version, description=description)
        if champion is not None and str(champion.version) != str(version.version):
            client.set_registered_model_alias(cfg.model_name, PREVIOUS_ALIAS, champion.version)
        client.set_registered_model_alias(cfg.model_name, cfg.registry.alias, version.version)
    except BaseException:
        client.delete_model_version(cfg.model_name, version.version)
        if not model_existed:
            client.delete_registered_model(cfg.model_name)
        raise
    return version, champion


def download_adapter(source_run_id: str) -> Path:
    """The run's `adapter/` artifact in a temporary folder; a one-line error when it has none."""
    adapter_dir = tracking.download_run_artifacts(source_run_id, "adapter")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise LoraflowError(f"run {source_run_id} has no 'adapter' artifact (no adapter_config.json)")
    return adapter_dir


def run(cfg: Config, *, from_run: str | None = None, from_study: str | None = None,
        force: bool = False, nested: bool = False, tags: dict | None = None) -> RegisterResult:
    """`loraflow register`: merge, gate, log the pyfunc and register it under cfg.model_name."""
    check_gate_metric(cfg)
    source = choose_run(cfg, from_run, from_study)
    source_run_id = source.info.run_id
    adapter_dir = download_adapter(source_run_id)
    base_path = models.resolve_model_path(cfg.model.name, cfg)
    workdir = Path(tempfile.mkdtemp(prefix="loraflow-register-"))
    try:
        with tracking.stage_run(cfg, "register", nested=nested,
                                tags={"loraflow.source_run_id": source_run_id, **(tags or {})}) as active:
            print(f"loraflow: merging the adapter of run {source_run_id} into {cfg.model.name}", file=sys.stderr)
            merged_dir = models.merge_adapter(cfg, base_path, adapter_dir, workdir / "merged")
            summary = evaluate_merged(cfg, source_run_id, merged_dir)
            passed, why = gate(cfg, summary, champion_score(cfg, current_champion(cfg)))
            mlflow.log_params({"registry.model_name": cfg.model_name, "registry.gate_metric": cfg.registry.gate_metric,
                               "registry.min_improvement": cfg.registry.min_improvement, "force": force})
            mlflow.set_tags({"loraflow.gate": "passed" if passed else ("forced" if force else "refused"),
                             "loraflow.gate_reason": why[:500]})
            if not (passed or force):
                message = f"not registered: {why} (--force registers anyway)"
                click.echo(message)
                return RegisterResult(active.info.run_id, source_run_id, False, message, summary=summary)
            info = serving.log_model(cfg, merged_dir)
            card = model_card(cfg, source, summary, from_study)
            labels = version_tags(cfg, source, summary, from_study, force and not passed, active.info.run_id)
            version, previous = register_version(cfg, info.model_uri, labels, card)
            mlflow.set_tag("loraflow.registered_version", version.version)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(adapter_dir.parent, ignore_errors=True)
    message = (f"registered {cfg.model_name} version {version.version} as @{cfg.registry.alias}"
               + (f" (version {previous.version} is now @{PREVIOUS_ALIAS})" if previous else "")
               + f": {why}" + (" [forced]" if force and not passed else ""))
    click.echo(message)
    return RegisterResult(active.info.run_id, source_run_id, True, message, version=str(version.version),
                          summary=summary)
