"""Base model vs tuned model on the same held-out prompts: generations, metrics over seeds, intervals.

    loraflow evaluate quickstart                          # the project's latest finished training run
    loraflow evaluate quickstart --run-id RUN_ID          # or --model-uri models:/quickstart@champion, --adapter DIR
    result = evaluate.run(cfg, run_id=RUN_ID)             # EvalResult(run_id, summary, details)

The tuned model is a training run's adapter over the base (the base is loaded once and answers with
the adapter disabled), a registered version (judged as it is served: see below), a local adapter
folder, or a local merged folder. An adapter is judged as trained (model.quantization) unless as
served (the gate, a registered version): then on the unquantised base in registry.serve_dtype (a
version's own). Both answer the prompts of the eval.split split (test by default) with the same
decoding; the base is asked
data.base_prompt_template's prompt where one is set (e.g. without the tags the tuned model learned),
also for its validation loss. `eval.metrics` score the answers per seed of `eval.seeds`, and a paired
bootstrap over items (each with all its seeds) gives a 95% interval for each tuned - base difference,
computed with the same statistic as the difference itself. Greedy decoding (eval.temperature = 0) is
deterministic, so it generates once and that result stands for every seed (the stds are then 0).
Validation loss and perplexity are teacher-forced.
"""
from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow

from loraflow import LoraflowError, data, generation, intervals, metrics, models, say, tracking, warn
from loraflow.config import Config
from loraflow.tracking import Tags, role_key

ROLES = ("base", "tuned")
IMPROVED_EXAMPLES = 10  # rows of eval/improved_examples.csv


@dataclass
class EvalResult:
    run_id: str
    summary: dict  # every logged metric key -> value, e.g. "tuned/rougeL", "delta/rougeL_ci_low"
    details: list[dict]


@dataclass
class TunedModel:
    """Where the tuned model comes from: an adapter over the base, or a merged folder on its own."""
    adapter_dir: Path | None = None
    model_dir: Path | None = None
    train_run_id: str | None = None  # the run it judges; tags link both ways
    description: str = ""
    as_served: bool = False  # an adapter judged as a registered version is served (models.load_served), not trained
    serve_dtype: str | None = None  # a registered version's recorded registry.serve_dtype (else the config's)


# --- inputs -------------------------------------------------------------------------------------

def metric_names(cfg: Config) -> list[str]:
    """The metrics to compute (config validation has checked them); none for raw-text projects."""
    return [] if cfg.train.objective == "cpt" else list(dict.fromkeys(cfg.eval.metrics))


def held_out_rows(cfg: Config, prepared: data.PreparedData) -> tuple[list[dict], list[dict]]:
    """(rows to answer: the eval.split rows capped at eval.num_samples, validation rows capped like training's
    eval/loss)."""
    validation = prepared.splits["validation"][:cfg.train.eval_rows or None]
    if cfg.train.objective == "cpt":  # raw text: no prompts to answer, only the loss to compare
        if not validation:
            raise LoraflowError("no validation split to compute the loss on: set data.val_fraction > 0")
        return [], validation
    if not prepared.splits[cfg.eval.split]:
        fraction = "test_fraction" if cfg.eval.split == "test" else "val_fraction"
        raise LoraflowError(f"no {cfg.eval.split} split: set data.{fraction} > 0"
                            + (" (or eval.split=validation)" if cfg.eval.split == "test" else ""))
    return prepared.splits[cfg.eval.split][:cfg.eval.num_samples], validation


def latest_training_run(cfg: Config, store: tracking.Store) -> str:
    """The latest FINISHED training run of this project and training config (never a tune trial)."""
    runs = tracking.find_runs(store, stage="train", status="FINISHED", project=cfg.name, trials=False,
                              tags={tracking.Tags.TRAINING_HASH: tracking.training_hash(cfg)}, max_results=1)
    if not runs:
        raise LoraflowError(f"no finished training run of '{cfg.name}' with this training config to evaluate: "
                            "train first or pass --run-id")
    return runs[0].info.run_id


def registered_model(model_uri: str, scratch: Path, train_run_id: str | None) -> TunedModel:
    """A logged loraflow model, judged as it is served: its adapter on the base in the dtype it recorded; a model
    logged before adapters were kept (or by hand) is judged from its merged folder."""
    merged = tracking.download_model_uri(model_uri, scratch)
    adapter = merged.parent / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        return TunedModel(model_dir=merged, description=model_uri, train_run_id=train_run_id)
    flavour = mlflow.models.Model.load(str(merged.parent.parent / "MLmodel")).flavors.get("python_function", {})
    settings = flavour.get("config") or {}  # the pyfunc's model_config, as MLmodel stores it
    return TunedModel(adapter_dir=adapter, description=model_uri, train_run_id=train_run_id, as_served=True,
                      serve_dtype=settings.get("registry", {}).get("serve_dtype"))


def resolve_tuned(cfg: Config, store: tracking.Store, run_id, model_uri, adapter_dir, model_dir,
                  scratch: Path) -> TunedModel:
    """Find the tuned model, downloading it into `scratch` when it is in the store; `run_id` may accompany any
    source to name the run it judges."""
    given = [name for name, value in (("--model-uri", model_uri), ("--adapter", adapter_dir),
                                      ("model_dir", model_dir)) if value]
    if len(given) > 1:
        raise LoraflowError(f"give only one of {', '.join(given)}")
    if run_id:
        tracking.get_run(run_id, store)
    if model_dir:
        if not (Path(model_dir) / "config.json").is_file():
            raise LoraflowError(f"no merged model in {model_dir} (config.json missing)")
        return TunedModel(model_dir=Path(model_dir), train_run_id=run_id, description=f"model folder {model_dir}")
    if adapter_dir:
        if not (Path(adapter_dir) / "adapter_config.json").is_file():
            raise LoraflowError(f"no PEFT adapter in {adapter_dir} (adapter_config.json missing)")
        return TunedModel(adapter_dir=Path(adapter_dir), train_run_id=run_id, description=f"adapter {adapter_dir}")
    if model_uri:
        return registered_model(model_uri, scratch, run_id or tracking.model_version_run_id(model_uri))
    run_id = run_id or latest_training_run(cfg, store)
    return TunedModel(adapter_dir=tracking.download_run_artifacts(run_id, "adapter", scratch), train_run_id=run_id,
                      description=f"run {run_id}")


def warn_if_inputs_differ(cfg: Config, store: tracking.Store, run_id: str, digest: str) -> None:
    """Warn when the judged run was trained on other data (its config/resolved.yaml) or another base."""
    tags = tracking.get_run(run_id, store).data.tags
    trained_on = tags.get(tracking.Tags.DATA_DIGEST, digest)
    base = tags.get(tracking.Tags.BASE_MODEL, cfg.model.name)
    problems = []
    if trained_on != digest:
        problems.append(f"was trained on other data (digest {trained_on}, this config gives {digest}); "
                        "its config/resolved.yaml holds the data settings it used")
    if base != cfg.model.name:
        problems.append(f"was trained on {base}, but model.name is {cfg.model.name}")
    for problem in problems:
        warn(f"run {run_id} {problem}")


# --- base and tuned answers --------------------------------------------------------------------

def each_model(cfg: Config, tuned: TunedModel, base_path: str):
    """Yield (role, model, tokenizer) for base then tuned; an adapter shares one loaded base."""
    if tuned.adapter_dir:
        model, tokenizer = adapter_on_base(cfg, tuned, base_path)
        with model.disable_adapter():
            yield "base", model, tokenizer
        yield "tuned", model, tokenizer
        return
    dtype = models.saved_dtype(tuned.model_dir) or models.compute_dtype(cfg)  # a merged fp16 model is judged in fp16
    for role, path in (("base", base_path), ("tuned", str(tuned.model_dir))):
        model, tokenizer = models.load_model(cfg, path, quantize=False, dtype=dtype)  # as served: unquantised
        yield role, model.eval(), tokenizer
        del model  # the caller has dropped its own reference (answer_all): one full model in memory at a time
        models.release_memory()


def served_config(cfg: Config, tuned: TunedModel) -> Config:
    """cfg with the registered version's own served dtype, where it recorded one."""
    import dataclasses

    if not tuned.serve_dtype:
        return cfg
    return dataclasses.replace(cfg, registry=dataclasses.replace(cfg.registry, serve_dtype=tuned.serve_dtype))


def adapter_on_base(cfg: Config, tuned: TunedModel, base_path: str):
    """(model, tokenizer): the adapter on the base as served (unquantised, registry.serve_dtype) or as trained
    (model.quantization, model.dtype)."""
    if tuned.as_served:
        return models.load_served(served_config(cfg, tuned), base_path, tuned.adapter_dir)
    base, tokenizer = models.load_model(cfg, base_path)
    try:
        return models.load_adapter(base, tuned.adapter_dir), tokenizer
    except (ValueError, RuntimeError) as exc:  # another model's modules or shapes
        raise LoraflowError(f"the adapter in {tuned.adapter_dir} does not fit {cfg.model.name}: "
                            f"{str(exc).splitlines()[0]}") from None


def generation_seeds(cfg: Config) -> list[int]:
    """Seeds to generate with: all of eval.seeds when sampling; greedy runs once (seeds agree)."""
    return list(cfg.eval.seeds) if cfg.eval.temperature > 0 else list(cfg.eval.seeds[:1])


def asked(rows: list[dict], role: str) -> list[dict]:
    """The rows as `role` is asked them: the base model gets data.base_prompt_template's prompt where it is set."""
    if role != "base" or not rows or "base_prompt" not in rows[0]:
        return rows
    return [{**row, "prompt": row["base_prompt"]} for row in rows]


def answer_all(cfg: Config, tuned: TunedModel, base_path: str, test_rows, val_rows) -> tuple[dict, dict]:
    """({role: {seed: answers}}, {role: validation loss}) for the base and the tuned model, each asked its own
    prompt (asked)."""
    answers, losses = {}, {}
    for role, model, tokenizer in each_model(cfg, tuned, base_path):
        prompts = [row["prompt"] for row in asked(test_rows, role)]
        say(f"evaluating the {role} model" + (f" on {len(prompts)} prompts" if prompts else " (loss only)"))
        answers[role] = {seed: generation.generate(model, tokenizer, prompts, cfg, seed=seed)
                         for seed in generation_seeds(cfg)} if prompts else {}
        if val_rows:
            losses[role] = generation.validation_loss(model, tokenizer, asked(val_rows, role), cfg)
        del model  # before each_model loads the next one
    return answers, losses


# --- metrics, artifacts, links ------------------------------------------------------------------

def score(cfg: Config, names: list[str], answers: list[str], references: list[str]) -> tuple[dict, dict]:
    """(corpus score per metric, per-item scores per metric); sacrebleu's corpus score is corpus BLEU."""
    items = metrics.score_items(names, answers, references, bertscore_model=cfg.eval.bertscore_model)
    corpus = {name: sum(values) / len(values) for name, values in items.items()}
    if "sacrebleu" in names:
        corpus.update(metrics.corpus_scores(["sacrebleu"], answers, references))
    return corpus, items


def summarise(cfg: Config, names: list[str], test_rows, answers: dict, losses: dict) -> tuple[dict, list[dict]]:
    """Metric means, stds over seeds (ddof=1) and bootstrap intervals of the deltas; a detail row per item and seed.

    The interval resamples items, each carrying all its seeds, and computes each resample with the
    statistic of the point estimate (the per-item mean; corpus BLEU for sacrebleu).
    """
    import numpy as np

    references = [row["target"] for row in test_rows]
    seeds = list(answers.get("base", {}))
    per_seed = {role: [] for role in ROLES}
    per_item = {role: {name: [] for name in names} for role in ROLES}
    details = []
    for seed in seeds:
        items = {}
        for role in ROLES:
            corpus, items[role] = score(cfg, names, answers[role][seed], references)
            per_seed[role].append(corpus)
            for name in names:
                per_item[role][name].append(items[role][name])
        details += detail_rows(seed, test_rows, answers, items, names)
    summary = {}
    for name in names:
        values = {role: np.array([scores[name] for scores in per_seed[role]]) for role in ROLES}
        values["delta"] = values["tuned"] - values["base"]
        interval = delta_interval(cfg, name, per_item, answers, references, seeds)
        for role, array in values.items():
            summary[role_key(role, name)] = float(array.mean())
            summary[role_key(role, name, "_std")] = intervals.std_over_seeds(array)
        summary[role_key("delta", name)] = interval.point  # the same statistic the interval resamples
        summary[role_key("delta", name, "_ci_low")] = interval.low
        summary[role_key("delta", name, "_ci_high")] = interval.high
    for role, loss in losses.items():
        summary[role_key(role, "loss")], summary[role_key(role, "perplexity")] = loss, math.exp(min(loss, 50))
    return summary, details


def delta_interval(cfg: Config, name: str, per_item: dict, answers: dict, references: list[str], seeds: list):
    """intervals.DeltaInterval of tuned - base for one metric: items x seeds resampled by item."""
    import numpy as np

    if name == "sacrebleu":
        return intervals.corpus_bleu_delta_interval([answers["base"][s] for s in seeds],
                                                  [answers["tuned"][s] for s in seeds], references,
                                                  samples=cfg.eval.bootstrap_samples)
    return intervals.mean_delta_interval(np.column_stack(per_item["base"][name]),
                                       np.column_stack(per_item["tuned"][name]), samples=cfg.eval.bootstrap_samples)


def detail_rows(seed: int, test_rows, answers: dict, items: dict, names: list[str]) -> list[dict]:
    return [{"seed": seed, "index": i, "prompt": row["prompt"],
             **({"base_prompt": row["base_prompt"]} if "base_prompt" in row else {}), "reference": row["target"],
             "base_output": answers["base"][seed][i], "tuned_output": answers["tuned"][seed][i],
             **{f"{role}_{name}": items[role][name][i] for name in names for role in ROLES}}
            for i, row in enumerate(test_rows)]


def plot_metrics(summary: dict, names: list[str], title: str):
    """One panel per metric (and the loss): base vs tuned bars with the std over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = names + (["loss"] if "base/loss" in summary else [])
    figure, axes = plt.subplots(1, len(panels), figsize=(1.2 + 2.3 * len(panels), 3.4), squeeze=False)
    for axis, name in zip(axes[0], panels):
        axis.bar(ROLES, [summary[role_key(role, name)] for role in ROLES], color=["#9e9e9e", "#2e7d32"],
                 yerr=[summary.get(role_key(role, name, "_std"), 0.0) for role in ROLES], capsize=4)
        axis.set_title(name)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def log_results(cfg: Config, names: list[str], summary: dict, details: list[dict], counts: dict) -> None:
    import pandas as pd

    mlflow.log_metrics(summary)
    mlflow.log_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in details), "eval/details.jsonl")
    asked_base = ["base_prompt"] if details and "base_prompt" in details[0] else []  # data.base_prompt_template
    frame = pd.DataFrame(details, columns=["seed", "index", "prompt", *asked_base, "reference", "base_output",
                                           "tuned_output"]
                         + [f"{role}_{name}" for name in names for role in ROLES])
    mlflow.log_text(frame.to_csv(index=False), "eval/side_by_side.csv")
    if names and details:
        mlflow.log_text(improved_examples(frame, names[0]).to_csv(index=False), "eval/improved_examples.csv")
    mlflow.log_dict({"metrics": summary, "counts": counts}, "eval/summary.json")
    if details:
        mlflow.log_table(data=frame, artifact_file="eval/details_table.json")
    if summary:
        tracking.log_figure_png(plot_metrics(summary, names, f"{cfg.name}: base vs tuned"), "plots/eval_metrics.png")


def improved_examples(frame, metric: str, count: int = IMPROVED_EXAMPLES):
    """The items where the tuned model beats the base most on `metric` (mean over seeds), with both answers."""
    per_item = frame.groupby("index").agg(prompt=("prompt", "first"), reference=("reference", "first"),
                                          base_output=("base_output", "first"), tuned_output=("tuned_output", "first"),
                                          base_score=(f"base_{metric}", "mean"), tuned_score=(f"tuned_{metric}", "mean"))
    per_item["gain"] = per_item["tuned_score"] - per_item["base_score"]
    best = per_item[per_item["gain"] > 0].sort_values("gain", ascending=False, kind="stable").head(count)
    return best.reset_index().rename(columns={"base_score": f"base_{metric}", "tuned_score": f"tuned_{metric}",
                                              "gain": f"gain_{metric}"})


def link_training_run(store: tracking.Store, train_run_id: str, evaluation_run_id: str, summary: dict) -> None:
    """Tag the judged run with this evaluation, copy the headline deltas onto it, and give its adapter's
    logged model (if it has one) these figures, so MLflow's model views show them."""
    client = store.client()
    client.set_tag(train_run_id, Tags.LATEST_EVALUATION_RUN_ID, evaluation_run_id)
    means = tracking.evaluation_means(summary)
    for key, value in means.items():
        if key.startswith("delta/"):
            client.log_metric(train_run_id, key, value)
    model_id = client.get_run(train_run_id).data.tags.get(Tags.ADAPTER_MODEL_ID)
    if model_id and means:
        mlflow.log_metrics(means, model_id=model_id)


def summary_line(summary: dict) -> str:
    """`rougeL=+0.1200 [+0.0500, +0.1900], base/loss=2.1000, tuned/loss=1.4000` for the terminal."""
    deltas = [f"{name}={summary[role_key('delta', name)]:+.4f} [{summary[role_key('delta', name, '_ci_low')]:+.4f}, "
              f"{summary[role_key('delta', name, '_ci_high')]:+.4f}]" for name in tracking.evaluated_metrics(summary)
              if role_key("delta", name, "_ci_low") in summary]
    losses = [f"{key}={summary[key]:.4f}" for key in ("base/loss", "tuned/loss") if key in summary]
    return ", ".join(deltas + losses)


def run(cfg: Config, *, store: tracking.Store | None = None, run_id: str | None = None, model_uri: str | None = None,
        adapter_dir=None, model_dir=None, parent_run_id: str | None = None, tags: dict | None = None,
        prepared: data.PreparedData | None = None, base_path: str | None = None, as_served: bool = False) -> EvalResult:
    """Evaluate base vs tuned in an MLflow run (see the module docstring for what "tuned" can be).

    `prepared` and `base_path` let the pipeline pass on the data and model it already has; `as_served` judges an
    adapter in the form a registered version is served in (the gate), one model in memory for both roles.
    """
    store = store or tracking.connect(cfg=cfg)
    names = metric_names(cfg)
    prepared = prepared or data.prepare(cfg)
    test_rows, val_rows = held_out_rows(cfg, prepared)
    with tempfile.TemporaryDirectory(prefix="loraflow-evaluate-") as scratch:  # a downloaded model, removed after
        tuned = resolve_tuned(cfg, store, run_id, model_uri, adapter_dir, model_dir, Path(scratch))
        tuned.as_served = tuned.as_served or (as_served and tuned.adapter_dir is not None)
        return evaluate_tuned(cfg, store, tuned, names, prepared, test_rows, val_rows, base_path, parent_run_id, tags)


def evaluate_tuned(cfg: Config, store: tracking.Store, tuned: TunedModel, names: list[str],
                   prepared: data.PreparedData, test_rows: list[dict], val_rows: list[dict], base_path: str | None,
                   parent_run_id: str | None, tags: dict | None) -> EvalResult:
    """Answer and score the held-out rows with the base and `tuned` in the evaluate run, and log the results."""
    if tuned.train_run_id:
        warn_if_inputs_differ(cfg, store, tuned.train_run_id, prepared.digest)
    base_path = base_path or models.resolve_model_path(cfg.model.name, cfg)
    run_tags = {Tags.DATA_DIGEST: prepared.digest, Tags.DATA_SOURCE: prepared.source,
                Tags.TUNED_MODEL: tuned.description[:500],
                **({Tags.EVALUATED_RUN_ID: tuned.train_run_id} if tuned.train_run_id else {}),
                **({Tags.SERVED_DTYPE: models.name_of_dtype(models.served_dtype(served_config(cfg, tuned)))}
                   if tuned.as_served else {}),
                **(tags or {})}
    with tracking.stage_run(cfg, "evaluate", store, parent_run_id=parent_run_id, tags=run_tags) as active:
        mlflow.log_params(tracking.flat_params(cfg))
        tracking.log_config(cfg)
        data.log_split_input(cfg, prepared, "test")
        answers, losses = answer_all(cfg, tuned, base_path, test_rows, val_rows)
        summary, details = summarise(cfg, names, test_rows, answers, losses)
        counts = {"items": len(test_rows), "validation_rows": len(val_rows), "seeds": list(cfg.eval.seeds),
                  "generation_seeds": list(answers.get("base", {})), "greedy": cfg.eval.temperature == 0,
                  "tuned_model": tuned.description, "evaluated_run_id": tuned.train_run_id}
        log_results(cfg, names, summary, details, counts)
        if tuned.train_run_id:
            link_training_run(store, tuned.train_run_id, active.info.run_id, summary)
    return EvalResult(run_id=active.info.run_id, summary=summary, details=details)
