"""Base model vs tuned model on the same held-out prompts: generations, metrics over seeds, intervals.

    loraflow evaluate quickstart                          # the project's latest finished training run
    loraflow evaluate quickstart --run-id RUN_ID          # or --model-uri models:/quickstart@champion, --adapter DIR
    result = evaluate.run(cfg, run_id=RUN_ID)             # EvalResult(run_id, summary, details)
    texts = evaluate.generate(model, tokenizer, ["Describe: a red mug"], cfg)

The tuned model is a training run's adapter over the base (the base is loaded once and answers with
the adapter disabled), a registered model's merged folder, a local adapter folder, or a local merged
folder. Both answer the test split's prompts with the same decoding; `eval.metrics` score them per
seed of `eval.seeds`, and a paired bootstrap gives a 95% interval for each tuned - base difference.
Greedy decoding (eval.temperature = 0) is deterministic, so it generates once and that result
stands for every seed (the stds are then 0). Validation loss and perplexity are teacher-forced.
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow

from loraflow import LoraflowError, data, metrics, models, tracking
from loraflow.config import Config

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
ROLES = ("base", "tuned")


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


# --- generation -----------------------------------------------------------------------------------

def stop_token_ids(model, tokenizer) -> list[int]:
    """eos ids of the generation config and tokenizer plus any end-of-turn token the vocabulary has."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids += [vocab[token] for token in END_OF_TURN_TOKENS if token in vocab]
    return sorted({int(i) for i in ids if i is not None})


def generation_settings(model, tokenizer, cfg: Config) -> dict:
    """model.generate keywords: greedy when eval.temperature == 0, else nucleus sampling."""
    settings = {"max_new_tokens": cfg.eval.max_new_tokens, "repetition_penalty": cfg.eval.repetition_penalty,
                "eos_token_id": stop_token_ids(model, tokenizer), "pad_token_id": tokenizer.pad_token_id}
    if cfg.eval.temperature > 0:
        return {**settings, "do_sample": True, "temperature": cfg.eval.temperature, "top_p": cfg.eval.top_p}
    return {**settings, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def encode_prompts(tokenizer, prompts: list[str], cfg: Config) -> list[list[int]]:
    """Token ids per prompt, exactly as in training (seq2seq inputs truncated to data.max_length there too)."""
    if cfg.model.kind == "seq2seq":
        texts = [data.format_prompt(tokenizer, p, cfg) for p in prompts]
        return tokenizer(texts, truncation=True, max_length=cfg.data.max_length)["input_ids"]
    return [data.prompt_token_ids(tokenizer, p, cfg) for p in prompts]


def pad_batch(sequences: list[list[int]], pad_id: int, left: bool):
    """(input_ids, attention_mask) tensors, padded on the left for causal models."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        start = width - len(sequence) if left else 0
        ids[row, start:start + len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        mask[row, start:start + len(sequence)] = 1
    return ids, mask


def generate(model, tokenizer, prompts: list[str], cfg: Config, *, seed: int | None = None) -> list[str]:
    """Answers to raw prompts (formatted here with data.format_prompt), in the order given.

    Prompts are sorted by length into batches of eval.batch_size; causal batches are left-padded
    with an attention mask, so greedy answers equal one-prompt-at-a-time generation. Only new
    tokens are decoded (seq2seq models output only new tokens). `seed` seeds sampling.
    """
    import torch
    import transformers
    from tqdm.auto import tqdm

    encoded = encode_prompts(tokenizer, prompts, cfg)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    size = cfg.eval.batch_size
    batches = [order[start:start + size] for start in range(0, len(order), size)]
    settings = generation_settings(model, tokenizer, cfg)
    causal = cfg.model.kind == "causal"
    if seed is not None:
        transformers.set_seed(seed)
    answers = [""] * len(prompts)
    for batch in tqdm(batches, desc="generating", unit="batch", leave=False):
        input_ids, attention_mask = pad_batch([encoded[i] for i in batch], tokenizer.pad_token_id, left=causal)
        with torch.inference_mode():
            output = model.generate(input_ids=input_ids.to(model.device),
                                    attention_mask=attention_mask.to(model.device), **settings)
        new_tokens = output[:, input_ids.shape[1]:] if causal else output
        for index, tokens in zip(batch, new_tokens):
            answers[index] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
    return answers


def validation_loss(model, tokenizer, rows: list[dict], cfg: Config) -> float:
    """Teacher-forced mean loss per target token, labels masked as in training."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    examples = data.training_examples(rows, tokenizer, cfg)
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=data.IGNORE_INDEX)
    total, count = 0.0, 0
    for start in range(0, len(examples), cfg.eval.batch_size):
        batch = {k: v.to(model.device) for k, v in collate(examples[start:start + cfg.eval.batch_size]).items()}
        with torch.inference_mode():
            loss = model(**batch).loss
        labels = batch["labels"] if cfg.model.kind == "seq2seq" else batch["labels"][:, 1:]
        tokens = int((labels != data.IGNORE_INDEX).sum())
        total, count = total + float(loss) * tokens, count + tokens
    return total / count if count else float("nan")


# --- inputs -------------------------------------------------------------------------------------

def check_settings(cfg: Config) -> list[str]:
    """The metric names to compute; LoraflowError on unknown metrics or unusable settings."""
    unknown = metrics.unknown_metrics(list(cfg.eval.metrics))
    if unknown:
        raise LoraflowError(f"unknown metric {unknown[0]!r} in eval.metrics (known: {', '.join(metrics.METRIC_NAMES)})")
    if cfg.eval.bootstrap_samples < 1:
        raise LoraflowError(f"eval.bootstrap_samples: must be >= 1, got {cfg.eval.bootstrap_samples}")
    if "bertscore" in cfg.eval.metrics:
        try:
            metrics.bertscore_model_path(cfg.eval.bertscore_model)
        except ValueError as exc:
            raise LoraflowError(str(exc)) from None
    return [] if cfg.train.objective == "cpt" else list(dict.fromkeys(cfg.eval.metrics))


def held_out_rows(cfg: Config, prepared: data.PreparedData) -> tuple[list[dict], list[dict]]:
    """(test rows capped at eval.num_samples, validation rows capped like training's eval/loss)."""
    validation = prepared.splits["validation"][:cfg.train.eval_rows or None]
    if cfg.train.objective == "cpt":  # raw text: no prompts to answer, only the loss to compare
        if not validation:
            raise LoraflowError("no validation split to compute the loss on: set data.val_fraction > 0")
        return [], validation
    if not prepared.splits["test"]:
        raise LoraflowError("no test split: set data.test_fraction > 0")
    return prepared.splits["test"][:cfg.eval.num_samples], validation


def latest_training_run(cfg: Config) -> str:
    """The latest FINISHED run tagged loraflow.stage=train in the current experiment."""
    from mlflow.tracking import fluent

    if tracking.experiment_chosen():
        experiment_id = fluent._get_experiment_id()
    else:
        experiment = mlflow.get_experiment_by_name(cfg.name)
        experiment_id = experiment.experiment_id if experiment else None
    runs = mlflow.MlflowClient().search_runs(
        [experiment_id], "tags.`loraflow.stage` = 'train' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1) if experiment_id else []
    if not runs:
        raise LoraflowError(f"no finished training run of '{cfg.name}' to evaluate: train first or pass --run-id")
    return runs[0].info.run_id


def download_model_uri(model_uri: str) -> Path:
    """The merged Hugging Face folder (the shallowest one with a config.json) inside a logged model."""
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri,
                                                         dst_path=tempfile.mkdtemp(prefix="loraflow-model-")))
    except (mlflow.exceptions.MlflowException, OSError) as exc:
        raise LoraflowError(f"unknown model URI {model_uri!r}: {str(exc).splitlines()[0]}") from None
    folders = sorted((p.parent for p in local.rglob("config.json")), key=lambda p: len(p.parts))
    if not folders:
        raise LoraflowError(f"{model_uri} holds no merged Hugging Face model folder (no config.json)")
    return folders[0]


def model_version_run_id(model_uri: str) -> str | None:
    """The training run behind a registered version (`models:/name@alias` or `models:/name/3`): the
    version's `loraflow.source_run_id` tag (set by the registry stage), else the run that logged it."""
    reference = model_uri.removeprefix("models:/")
    client = mlflow.MlflowClient()
    try:
        if "@" in reference:
            version = client.get_model_version_by_alias(*reference.split("@", 1))
        else:
            version = client.get_model_version(*reference.rsplit("/", 1))
    except (mlflow.exceptions.MlflowException, TypeError):
        return None
    return version.tags.get("loraflow.source_run_id") or version.run_id or None


def resolve_tuned(cfg: Config, run_id, model_uri, adapter_dir, model_dir) -> TunedModel:
    """Find (and download) the tuned model; `run_id` may accompany any source to name the run it judges."""
    given = [name for name, value in (("--model-uri", model_uri), ("--adapter", adapter_dir),
                                      ("model_dir", model_dir)) if value]
    if len(given) > 1:
        raise LoraflowError(f"give only one of {', '.join(given)}")
    if run_id:
        mlflow_run(run_id)
    if model_dir:
        if not (Path(model_dir) / "config.json").is_file():
            raise LoraflowError(f"no merged model in {model_dir} (config.json missing)")
        return TunedModel(model_dir=Path(model_dir), train_run_id=run_id, description=f"model folder {model_dir}")
    if adapter_dir:
        if not (Path(adapter_dir) / "adapter_config.json").is_file():
            raise LoraflowError(f"no PEFT adapter in {adapter_dir} (adapter_config.json missing)")
        return TunedModel(adapter_dir=Path(adapter_dir), train_run_id=run_id, description=f"adapter {adapter_dir}")
    if model_uri:
        return TunedModel(model_dir=download_model_uri(model_uri), description=model_uri,
                          train_run_id=run_id or model_version_run_id(model_uri))
    run_id = run_id or latest_training_run(cfg)
    return TunedModel(adapter_dir=tracking.download_run_artifacts(run_id, "adapter"), train_run_id=run_id,
                      description=f"run {run_id}")


def mlflow_run(run_id: str):
    try:
        return mlflow.MlflowClient().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise LoraflowError(f"unknown run id '{run_id}' in {mlflow.get_tracking_uri()}") from None


def warn_if_inputs_differ(cfg: Config, run_id: str, digest: str) -> None:
    """Warn when the judged run was trained on other data (its config/resolved.yaml) or another base."""
    tags = mlflow_run(run_id).data.tags
    trained_on, base = tags.get("loraflow.data_digest", digest), tags.get("loraflow.base_model", cfg.model.name)
    problems = []
    if trained_on != digest:
        problems.append(f"was trained on other data (digest {trained_on}, this config gives {digest}); "
                        "its config/resolved.yaml holds the data settings it used")
    if base != cfg.model.name:
        problems.append(f"was trained on {base}, but model.name is {cfg.model.name}")
    for problem in problems:
        print(f"loraflow: warning: run {run_id} {problem}", file=sys.stderr)


# --- base and tuned answers --------------------------------------------------------------------

def each_model(cfg: Config, tuned: TunedModel, base_path: str):
    """Yield (role, model, tokenizer) for base then tuned; an adapter shares one loaded base."""
    if tuned.adapter_dir:
        base, tokenizer = models.load_model(cfg, base_path)
        try:
            model = models.load_adapter(base, tuned.adapter_dir)
        except (ValueError, RuntimeError) as exc:  # another model's modules or shapes
            raise LoraflowError(f"the adapter in {tuned.adapter_dir} does not fit {cfg.model.name}: "
                                f"{str(exc).splitlines()[0]}") from None
        with model.disable_adapter():
            yield "base", model, tokenizer
        yield "tuned", model, tokenizer
        return
    for role, path in (("base", base_path), ("tuned", str(tuned.model_dir))):
        model, tokenizer = models.load_model(cfg, path, quantize=False)  # merged models are served unquantised
        yield role, model.eval(), tokenizer
        del model


def generation_seeds(cfg: Config) -> list[int]:
    """Seeds to generate with: all of eval.seeds when sampling; greedy runs once (seeds agree)."""
    return list(cfg.eval.seeds) if cfg.eval.temperature > 0 else list(cfg.eval.seeds[:1])


def answer_all(cfg: Config, tuned: TunedModel, base_path: str, test_rows, val_rows) -> tuple[dict, dict]:
    """({role: {seed: answers}}, {role: validation loss}) for the base and the tuned model."""
    prompts = [row["prompt"] for row in test_rows]
    answers, losses = {}, {}
    for role, model, tokenizer in each_model(cfg, tuned, base_path):
        print(f"loraflow: evaluating the {role} model" + (f" on {len(prompts)} prompts" if prompts else " (loss only)"),
              file=sys.stderr)
        answers[role] = {seed: generate(model, tokenizer, prompts, cfg, seed=seed)
                         for seed in generation_seeds(cfg)} if prompts else {}
        if val_rows:
            losses[role] = validation_loss(model, tokenizer, val_rows, cfg)
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
    """Metric means, stds over seeds and bootstrap intervals of the deltas; one detail row per item and seed."""
    import numpy as np

    references = [row["target"] for row in test_rows]
    per_seed = {role: [] for role in ROLES}
    pooled = {role: {name: [] for name in names} for role in ROLES}
    details = []
    for seed in answers.get("base", {}):
        items = {}
        for role in ROLES:
            corpus, items[role] = score(cfg, names, answers[role][seed], references)
            per_seed[role].append(corpus)
            for name in names:
                pooled[role][name] += items[role][name]
        details += detail_rows(seed, test_rows, answers, items, names)
    summary = {}
    for name in names:
        values = {role: np.array([scores[name] for scores in per_seed[role]]) for role in ROLES}
        values["delta"] = values["tuned"] - values["base"]
        for prefix, array in values.items():
            summary[f"{prefix}/{name}"], summary[f"{prefix}/{name}_std"] = float(array.mean()), float(array.std())
        low, high = metrics.paired_bootstrap_interval(pooled["base"][name], pooled["tuned"][name],
                                                      samples=cfg.eval.bootstrap_samples)
        summary[f"delta/{name}_ci_low"], summary[f"delta/{name}_ci_high"] = low, high
    for role, loss in losses.items():
        summary[f"{role}/loss"], summary[f"{role}/perplexity"] = loss, math.exp(min(loss, 50))
    return summary, details


def detail_rows(seed: int, test_rows, answers: dict, items: dict, names: list[str]) -> list[dict]:
    return [{"seed": seed, "index": i, "prompt": row["prompt"], "reference": row["target"],
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
        axis.bar(ROLES, [summary[f"{role}/{name}"] for role in ROLES], color=["#9e9e9e", "#2e7d32"],
                 yerr=[summary.get(f"{role}/{name}_std", 0.0) for role in ROLES], capsize=4)
        axis.set_title(name)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def log_results(cfg: Config, names: list[str], summary: dict, details: list[dict], counts: dict) -> None:
    import pandas as pd

    mlflow.log_metrics(summary)
    mlflow.log_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in details), "eval/details.jsonl")
    frame = pd.DataFrame(details, columns=["seed", "index", "prompt", "reference", "base_output", "tuned_output"]
                         + [f"{role}_{name}" for name in names for role in ROLES])
    mlflow.log_text(frame.to_csv(index=False), "eval/side_by_side.csv")
    mlflow.log_dict({"metrics": summary, "counts": counts}, "eval/summary.json")
    if details:
        mlflow.log_table(data=frame, artifact_file="eval/details_table.json")
    if summary:
        tracking.log_figure_png(plot_metrics(summary, names, f"{cfg.name}: base vs tuned"), "plots/eval_metrics.png")


def link_training_run(train_run_id: str, evaluation_run_id: str, summary: dict) -> None:
    """Tag the judged run with this evaluation and copy the headline deltas onto it."""
    client = mlflow.MlflowClient()
    client.set_tag(train_run_id, "loraflow.latest_evaluation_run_id", evaluation_run_id)
    for key, value in summary.items():
        if key.startswith("delta/") and not key.endswith(("_std", "_ci_low", "_ci_high")):
            client.log_metric(train_run_id, key, value)


def run(cfg: Config, *, run_id: str | None = None, model_uri: str | None = None, adapter_dir=None,
        model_dir=None, nested: bool = False, tags: dict | None = None) -> EvalResult:
    """Evaluate base vs tuned in an MLflow run (see the module docstring for what "tuned" can be)."""
    names = check_settings(cfg)
    prepared = data.prepare(cfg)
    test_rows, val_rows = held_out_rows(cfg, prepared)
    tuned = resolve_tuned(cfg, run_id, model_uri, adapter_dir, model_dir)
    if tuned.train_run_id:
        warn_if_inputs_differ(cfg, tuned.train_run_id, prepared.digest)
    base_path = models.resolve_model_path(cfg.model.name, cfg)
    run_tags = {"loraflow.data_digest": prepared.digest, "loraflow.tuned_model": tuned.description[:500],
                **({"loraflow.evaluated_run_id": tuned.train_run_id} if tuned.train_run_id else {}), **(tags or {})}
    with tracking.stage_run(cfg, "evaluate", nested=nested, tags=run_tags) as active:
        mlflow.log_params(tracking.flat_params(cfg))
        tracking.log_config(cfg)
        answers, losses = answer_all(cfg, tuned, base_path, test_rows, val_rows)
        summary, details = summarise(cfg, names, test_rows, answers, losses)
        counts = {"items": len(test_rows), "validation_rows": len(val_rows), "seeds": list(cfg.eval.seeds),
                  "generation_seeds": list(answers.get("base", {})), "greedy": cfg.eval.temperature == 0,
                  "tuned_model": tuned.description, "evaluated_run_id": tuned.train_run_id}
        log_results(cfg, names, summary, details, counts)
        if tuned.train_run_id:
            link_training_run(tuned.train_run_id, active.info.run_id, summary)
    return EvalResult(run_id=active.info.run_id, summary=summary, details=details)
