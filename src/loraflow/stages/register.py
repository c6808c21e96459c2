"""Register the winning adapter: choose it, gate it, merge it, log it as a pyfunc, register, alias.

    loraflow register quickstart                       # the project's best finished training run
    loraflow register quickstart --from-run RUN_ID     # or --from-study NAME (an Optuna study's best trial)
    loraflow register quickstart --force               # register even when the gate refuses
    result = registry.run(cfg)                         # RegisterResult(version="3", promoted=True, ...)

The adapter is evaluated against the base on held-out rows by the evaluate stage (a nested run) in the
form it will be served in: on the unquantised base in registry.serve_dtype (models.load_served; auto is
resolved here and recorded with the version, so every server loads the same). It is registered only if
delta/<registry.gate_metric> >= registry.min_improvement and its tuned score beats the score
recorded on the current champion (version tag `gate.tuned_score`). The new version takes the alias
`champion` (registry.alias); the version it replaces gets `previous`. A refused promotion is not
an error: it says why and registers nothing. A version holds the adapter (what is served) and the
adapter merged into the base on the CPU (registry.merge_dtype; for readers without PEFT, and served
where the base cannot be found).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from loraflow import LoraflowError, models, say, serving, studies, tracking, warn
from loraflow.config import Config
from loraflow.tracking import EVAL_LOSS, Tags, role_key

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

def run_rank(run, gate_metric: str) -> tuple:
    """Sort key, best last: delta/<metric> (copied by evaluate), else tuned/<metric>, else lowest eval/loss."""
    metrics = run.data.metrics
    better = -1 if gate_metric in LOWER_IS_BETTER else 1
    for tier, key in ((3, role_key("delta", gate_metric)), (2, role_key("tuned", gate_metric))):
        if key in metrics:
            return tier, better * metrics[key]
    for key in ("eval/best_loss", EVAL_LOSS):  # the loss of the adapter the run logged, when it says
        if key in metrics:
            return 1, -metrics[key]
    return 0, run.info.start_time


def best_training_run(cfg: Config, store: tracking.Store) -> str:
    """The best FINISHED training run of this project and training config (never a tune trial) by the gate
    metric, else the lowest eval/loss."""
    runs = tracking.find_runs(store, stage="train", status="FINISHED", project=cfg.name, trials=False,
                              tags={Tags.TRAINING_HASH: tracking.training_hash(cfg)})
    if not runs:
        raise LoraflowError(f"no finished training run of '{cfg.name}' with this training config to register: "
                            "train first, or pass --from-run or --from-study")
    return max(runs, key=lambda run: run_rank(run, cfg.registry.gate_metric)).info.run_id


def choose_run(cfg: Config, store: tracking.Store, from_run: str | None, from_study: str | None):
    """The training run to register (an MLflow Run)."""
    if from_run and from_study:
        raise LoraflowError("give --from-run or --from-study, not both")
    if from_study:
        from_run = studies.best_trial_run_id(from_study, storage=None, cfg=cfg)
    run = tracking.get_run(from_run or best_training_run(cfg, store), store)
    run_id = run.info.run_id
    trained_on = run.data.tags.get(Tags.BASE_MODEL)
    if trained_on and trained_on != cfg.model.name:
        raise LoraflowError(f"run {run_id} was trained on {trained_on}, but model.name is {cfg.model.name}: "
                            f"register it with --set model.name={trained_on}")
    if run.info.status != "FINISHED":
        warn(f"run {run_id} is {run.info.status}, not FINISHED")
    return run


# --- the gate -------------------------------------------------------------------------------------

def improvement(summary: dict, metric: str) -> float:
    """How much the tuned model beats the base on `metric` (positive = better)."""
    if metric in LOWER_IS_BETTER:
        return summary[role_key("base", metric)] - summary[role_key("tuned", metric)]
    return summary[role_key("delta", metric)]


def beats(score: float, other: float, metric: str) -> bool:
    return score < other if metric in LOWER_IS_BETTER else score > other


def gate(cfg: Config, summary: dict, champion_score: float | None) -> tuple[bool, str]:
    """(passed, why): the improvement over the base must reach min_improvement and beat the champion."""
    metric, minimum = cfg.registry.gate_metric, cfg.registry.min_improvement
    if role_key("tuned", metric) not in summary:
        computed = ", ".join(sorted(summary)) or "nothing"
        raise LoraflowError(f"the evaluation computed no {metric!r} (it has {computed})")
    gain, tuned = improvement(summary, metric), summary[role_key("tuned", metric)]
    if gain < minimum:
        return False, f"{metric} improves on the base by {gain:+.4f}, less than registry.min_improvement={minimum:g}"
    if champion_score is not None and not beats(tuned, champion_score, metric):
        return False, (f"tuned {metric}={tuned:.4f} does not beat the {cfg.registry.alias}'s "
                       f"{metric}={champion_score:.4f}")
    why = f"{metric} improves on the base by {gain:+.4f}"
    if champion_score is not None:
        why += f" and beats the {cfg.registry.alias} ({tuned:.4f} vs {champion_score:.4f})"
    return True, why


def current_champion(cfg: Config, store: tracking.Store | None = None):
    """The version holding registry.alias, or None (no model yet, or no alias)."""
    try:
        return (store.client() if store else mlflow.MlflowClient()).get_model_version_by_alias(cfg.model_name, cfg.registry.alias)
    except MlflowException:
        return None


def champion_score(cfg: Config, champion) -> float | None:
    """The champion's recorded tuned score on this gate metric (None if not recorded or another metric)."""
    if champion is None or champion.tags.get(Tags.GATE_METRIC) != cfg.registry.gate_metric:
        return None
    try:
        return float(champion.tags[Tags.GATE_TUNED_SCORE])
    except (KeyError, ValueError):
        return None


def evaluate_as_served(cfg: Config, store: tracking.Store, source_run_id: str, adapter_dir: Path,
                       register_run_id: str, prepared=None, base_path: str | None = None) -> dict:
    """The evaluate stage on the adapter as it will be served vs the base, as a run nested in the register run."""
    from loraflow.stages import evaluate  # the gate is an evaluation: the same stage, run nested

    result = evaluate.run(cfg, store=store, run_id=source_run_id, adapter_dir=adapter_dir, as_served=True,
                          parent_run_id=register_run_id, tags={Tags.GATE_FOR_RUN_ID: source_run_id},
                          prepared=prepared, base_path=base_path)
    return result.summary


# --- registering ----------------------------------------------------------------------------------

def version_tags(cfg: Config, source, summary: dict, study: str | None, forced: bool, register_run_id: str) -> dict:
    """Lineage and gate values for the model version (tag values are strings)."""
    metric = cfg.registry.gate_metric
    tags = {Tags.SOURCE_RUN_ID: source.info.run_id, Tags.REGISTER_RUN_ID: register_run_id,
            Tags.BASE_MODEL: cfg.model.name, Tags.DATA_DIGEST: source.data.tags.get(Tags.DATA_DIGEST),
            Tags.STUDY: study, Tags.SERVED_DTYPE: models.name_of_dtype(models.served_dtype(cfg)),
            Tags.GATE_METRIC: metric, Tags.GATE_FORCED: str(forced).lower(),
            Tags.GATE_MIN_IMPROVEMENT: cfg.registry.min_improvement, Tags.GATE_IMPROVEMENT: improvement(summary, metric),
            Tags.GATE_TUNED_SCORE: summary.get(role_key("tuned", metric)),
            Tags.GATE_BASE_SCORE: summary.get(role_key("base", metric)),
            Tags.GATE_DELTA_LOW: summary.get(role_key("delta", metric, "_ci_low")),
            Tags.GATE_DELTA_HIGH: summary.get(role_key("delta", metric, "_ci_high"))}
    return {key: str(value) for key, value in tags.items() if value not in (None, "")}


def settings_line(params: dict, section: str, keys: tuple) -> str:
    """`r=8, alpha=16, ...` from a training run's params, or a pointer to the run."""
    found = [f"{key}={params[f'{section}.{key}']}" for key in keys if f"{section}.{key}" in params]
    return ", ".join(found) or "see the source run"


def model_card(cfg: Config, source, summary: dict, study: str | None) -> str:
    """A markdown description: base, data, LoRA settings, evaluation deltas with intervals."""
    params, tags = source.data.params, source.data.tags
    data_source = tags.get(Tags.DATA_SOURCE, cfg.data.path)
    lora_keys = ("r", "alpha", "dropout", "target_modules", "layers_to_transform")
    lines = [f"# {cfg.model_name}", "",
             f"LoRA fine-tune of `{cfg.model.name}`, served as the adapter on the base in "
             f"{models.name_of_dtype(models.served_dtype(cfg))}; merged into the base "
             f"({models.name_of_dtype(models.merged_dtype(cfg))}) beside it.", "",
             f"- data: `{data_source}` (digest {tags.get(Tags.DATA_DIGEST, '?')})",
             f"- LoRA: {settings_line(params, 'lora', lora_keys)}",
             f"- training: {settings_line(params, 'train', ('objective', 'learning_rate', 'max_steps', 'epochs'))}",
             f"- source run: {source.info.run_id}" + (f" (best trial of study `{study}`)" if study else ""), "",
             "## Evaluation (held-out rows, tuned vs base)", "",
             "| metric | base | tuned | tuned - base | 95% interval |", "|---|---|---|---|---|"]
    for name in tracking.evaluated_metrics(summary):
        base, tuned = summary.get(role_key("base", name), float("nan")), summary[role_key("tuned", name)]
        low, high = summary.get(role_key("delta", name, "_ci_low")), summary.get(role_key("delta", name, "_ci_high"))
        interval = f"[{low:+.4f}, {high:+.4f}]" if low is not None and high is not None else "-"
        lines.append(f"| {name} | {base:.4f} | {tuned:.4f} | {tuned - base:+.4f} | {interval} |")
    lines += ["", "Serve: `loraflow serve PROJECT`, then POST /invocations with "
              '`{"dataframe_records": [{"prompt": "..."}], "params": {"max_new_tokens": 64}}`.']
    return "\n".join(lines)


def register_version(cfg: Config, store: tracking.Store, model_uri: str, tags: dict, description: str,
                     probe_prompt: str = "Hello"):
    """Register `model_uri`, wait until it is READY and answers `probe_prompt`, then move the aliases.

    All or nothing: on any error or interrupt the new version is deleted (the registered model too, if
    this made it) and the aliases stay where they were.
    """
    client = store.client()
    champion = current_champion(cfg, store)
    model_existed = bool(client.search_registered_models(f"name = '{cfg.model_name}'"))
    version = mlflow.register_model(model_uri, cfg.model_name, tags=tags)
    try:
        client.update_model_version(cfg.model_name, version.version, description=description)
        wait_until_ready(client, cfg.model_name, version.version)
        check_version_answers(cfg.model_name, version.version, probe_prompt)
        client.set_registered_model_alias(cfg.model_name, cfg.registry.alias, version.version)
        if champion is not None and str(champion.version) != str(version.version):
            client.set_registered_model_alias(cfg.model_name, PREVIOUS_ALIAS, champion.version)
    except BaseException:
        undo_registration(cfg, client, version.version, champion, model_existed)
        raise
    return version, champion


def wait_until_ready(client, name: str, version: str, timeout: float = 300) -> None:
    """Poll the version until the registry says READY; LoraflowError if it fails or never gets there."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.get_model_version(name, version).status
        if status == "READY":
            return
        if status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise LoraflowError(f"{name} version {version} did not become READY (status {status})")
        time.sleep(0.5)


def check_version_answers(name: str, version: str, prompt: str) -> None:
    """Load the registered version as MLflow serves it and ask one prompt; LoraflowError unless it answers."""
    answers = serving.answers_of(f"models:/{name}/{version}", [prompt], {"max_new_tokens": 4})
    if len(answers) != 1 or not isinstance(answers[0], str):
        raise LoraflowError(f"{name} version {version} did not answer a test prompt (got {answers!r:.100})")


def undo_registration(cfg: Config, client, version: str, champion, model_existed: bool) -> None:
    """Put the registry back as it was before `version` was registered."""
    with contextlib.suppress(MlflowException):
        client.delete_model_version(cfg.model_name, version)
    if champion is not None:
        with contextlib.suppress(MlflowException):
            client.set_registered_model_alias(cfg.model_name, cfg.registry.alias, champion.version)
    elif not model_existed:
        with contextlib.suppress(MlflowException):
            client.delete_registered_model(cfg.model_name)


def probe_prompt(cfg: Config, prepared) -> str:
    """A held-out prompt for the registered version's test prediction."""
    from loraflow import data

    prepared = prepared or data.prepare(cfg)
    rows = prepared.splits["test"] or prepared.splits["validation"] or prepared.splits["train"]
    return rows[0].get("prompt") or " ".join(rows[0]["text"].split()[:16])


def remove_abandoned_workdirs() -> None:
    """Delete merge folders left by register processes that were killed outright (their pid is gone)."""
    for folder in Path(tempfile.gettempdir()).glob("loraflow-register-*-*"):
        pid = folder.name.split("-")[2]
        if pid.isdigit() and not tracking.process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def download_adapter(source_run_id: str, into: Path) -> Path:
    """The run's `adapter/` artifact, downloaded into `into`; a one-line error when it has none."""
    adapter_dir = tracking.download_run_artifacts(source_run_id, "adapter", into)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise LoraflowError(f"run {source_run_id} has no 'adapter' artifact (no adapter_config.json)")
    return adapter_dir


def run(cfg: Config, *, store: tracking.Store | None = None, from_run: str | None = None,
        from_study: str | None = None, force: bool = False, parent_run_id: str | None = None,
        tags: dict | None = None, prepared=None, base_path: str | None = None) -> RegisterResult:
    """`loraflow register`: merge, gate, log the pyfunc and register it under cfg.model_name.

    A refused gate is a result (promoted=False), not an error. Temporary copies go on every exit path.
    """
    store = store or tracking.connect(cfg=cfg)
    source = choose_run(cfg, store, from_run, from_study)
    source_run_id = source.info.run_id
    remove_abandoned_workdirs()
    workdir = Path(tempfile.mkdtemp(prefix=f"loraflow-register-{os.getpid()}-"))  # the adapter and the merge
    try:
        adapter_dir = download_adapter(source_run_id, workdir)
        base_path = base_path or models.resolve_model_path(cfg.model.name, cfg)
        with tracking.stage_run(cfg, "register", store, parent_run_id=parent_run_id,
                                tags={Tags.SOURCE_RUN_ID: source_run_id, **(tags or {})}) as active:
            summary = evaluate_as_served(cfg, store, source_run_id, adapter_dir, active.info.run_id, prepared,
                                         base_path)
            models.release_memory()  # the gate's model, before the merge loads the base again
            passed, why = gate(cfg, summary, champion_score(cfg, current_champion(cfg, store)))
            mlflow.log_params({"registry.model_name": cfg.model_name, "registry.gate_metric": cfg.registry.gate_metric,
                               "registry.min_improvement": cfg.registry.min_improvement, "force": force})
            mlflow.set_tags({Tags.GATE: "passed" if passed else ("forced" if force else "refused"),
                             Tags.GATE_REASON: why[:500]})
            if not (passed or force):
                return RegisterResult(active.info.run_id, source_run_id, False,
                                      f"not registered: {why} (--force registers anyway)", summary=summary)
            say(f"merging the adapter of run {source_run_id} into {cfg.model.name}")
            merged_dir = models.merge_adapter(cfg, base_path, adapter_dir, workdir / "merged")
            models.release_memory()  # the merge's model, before the answer check loads the version
            info = serving.log_model(cfg, merged_dir, adapter_dir)
            mlflow.log_metrics(tracking.evaluation_means(summary), model_id=info.model_id)  # the model's own figures
            card = model_card(cfg, source, summary, from_study)
            labels = version_tags(cfg, source, summary, from_study, force and not passed, active.info.run_id)
            version, previous = register_version(cfg, store, info.model_uri, labels, card,
                                                 probe_prompt(cfg, prepared))
            mlflow.set_tag(Tags.REGISTERED_VERSION, version.version)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    message = (f"registered {cfg.model_name} version {version.version} as @{cfg.registry.alias}"
               + (f" (version {previous.version} is now @{PREVIOUS_ALIAS})" if previous else "")
               + f": {why}" + (" [forced]" if force and not passed else ""))
    return RegisterResult(active.info.run_id, source_run_id, True, message, version=str(version.version),
                          summary=summary)
