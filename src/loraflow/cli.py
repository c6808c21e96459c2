"""The `loraflow` command: one thin command per stage.

    loraflow train quickstart --set train.max_steps=20 --tracking-uri sqlite:///mlflow.db
    loraflow pipeline quickstart

PROJECT is a folder under projects/ or a path to a YAML file. The tracking URI comes from
--tracking-uri, else MLFLOW_TRACKING_URI, else the local default in mlruns_config/local.yaml.
Bad input ends with one line `error: ...` on stderr and a non-zero exit.
"""
from __future__ import annotations

import functools
import logging
import os
import shlex
import signal
import sys
import traceback

import click

from loraflow import LoraflowError


def project_options(func):
    """PROJECT, --set, --tracking-uri and --experiment, shared by every stage."""
    @click.argument("project")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override a config value, e.g. --set train.max_steps=5 (repeatable).")
    @click.option("--overrides", "overrides_text", default="", hidden=True,  # what MLproject entry points pass
                  help="Space-separated overrides in one string; applied before --set.")
    @click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, "
                  "else the local sqlite store of mlruns_config/local.yaml).")
    @click.option("--experiment", default=None, help="MLflow experiment name (default: the project's name).")
    @functools.wraps(func)
    def wrapper(project, overrides, overrides_text, tracking_uri, experiment, **kwargs):
        all_overrides = shlex.split(overrides_text) + list(overrides)
        options = {key: (None if value == "" else value) for key, value in kwargs.items()}
        return func(*setup(project, all_overrides, tracking_uri, experiment), **options)
    return wrapper


def setup(project: str, overrides, tracking_uri: str | None, experiment: str | None):
    """(config, store): load and validate the config, then connect to the store and experiment."""
    from loraflow import tracking
    from loraflow.config import load_config

    cfg = load_config(project, overrides)
    return cfg, tracking.connect(tracking_uri, experiment, cfg)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="loraflow")
def cli():
    """Tracked LoRA/QLoRA fine-tuning: prepare, train, evaluate, tune, register, serve, export, pipeline.

    Every stage takes a PROJECT (a folder under projects/ or a YAML file) and logs to MLflow.
    Start with `loraflow pipeline quickstart`, then `mlflow ui --backend-store-uri
    sqlite:///.mlruns/mlflow.db` to look at the runs.
    """


@cli.command()
@project_options
def prepare(cfg, store):
    """Read, clean and split the data.

    Logs row counts (read, dropped by reason, kept, per split), samples and the datasets to MLflow.
    """
    from loraflow.stages import prepare as prepare_stage

    prepared = prepare_stage.run(cfg, store)
    counts = ", ".join(f"{k.removeprefix('rows_')}={v}" for k, v in prepared.counts.items())
    click.echo(f"prepared {prepared.source}: {counts}")


@cli.command()
@project_options
@click.option("--resume", type=click.BOOL, is_flag=False, flag_value=True, default=False,
              help="Continue the interrupted (or --run-id) training run from its checkpoint.")
@click.option("--run-id", default=None, help="With --resume: the MLflow run to continue.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes on this host training one adapter together (torchrun; one per GPU).")
def train(cfg, store, resume, run_id, nproc):
    """Train a LoRA/QLoRA adapter (SFT or CPT).

    One MLflow run: params, train/loss per step, eval/loss at intervals, tokens, time, memory,
    cost, the adapter and plots/loss_curve.png. Checkpoints allow --resume in the same run.
    With --nproc N (or under torchrun), N processes train it by data parallelism (FSDP or DeepSpeed
    per train.fsdp / train.deepspeed) and rank 0 alone logs: see docs/distributed.md.
    """
    from loraflow import tracking
    from loraflow.stages import train as train_stage
    from loraflow.training import distributed

    if nproc > 1:
        code, error = distributed.launch(rank_arguments(click.get_current_context().params), nproc, store)
        if error:
            click.echo(f"error: {error}", err=True)
        sys.exit(code)
    try:
        result = train_stage.run(cfg, store=store, resume=resume, run_id=run_id)
    except BaseException as exc:
        distributed.record_rank_failure(exc)  # under torchrun: for the job's one error line
        raise
    if tracking.is_main_process():
        click.echo(f"run {result.run_id}: eval/loss={result.eval_loss:.4f} "
                   f"tokens/s={result.metrics['train/tokens_per_second']:.0f}")


def rank_arguments(params: dict) -> list[str]:
    """The command every rank of a `train --nproc` job runs: this one's project, overrides and resume options
    (the store and experiment go by environment)."""
    argv = ["train", params["project"], *[arg for value in params["overrides"] for arg in ("--set", value)]]
    argv += ["--overrides", params["overrides_text"]] if params["overrides_text"] else []
    argv += ["--resume"] if params["resume"] else []
    return argv + (["--run-id", params["run_id"]] if params["run_id"] else [])


@cli.command()
@project_options
@click.option("--run-id", default=None, help="Training run to judge (default: the project's latest finished one).")
@click.option("--model-uri", default=None, help="A registered model instead, e.g. models:/name@champion.")
@click.option("--adapter", default=None, type=click.Path(), help="A local adapter folder instead.")
def evaluate(cfg, store, run_id, model_uri, adapter):
    """Compare base and tuned models on held-out rows.

    Generates with both on the test split over eval.seeds and logs base/, tuned/ and delta/ metrics
    with bootstrap intervals, per-item details and a chart.
    """
    from loraflow.stages import evaluate as evaluate_stage

    result = evaluate_stage.run(cfg, store=store, run_id=run_id, model_uri=model_uri, adapter_dir=adapter)
    click.echo(f"run {result.run_id}: {evaluate_stage.summary_line(result.summary)}")


@cli.command()
@project_options
@click.option("--n-trials", type=int, default=None,
              help="The study's total of trials, shared by every worker on it (default: tune.n_trials).")
@click.option("--study", "study_name", default=None, help="Study name; an existing study is resumed.")
@click.option("--storage", default=None, help="Optuna storage URL (default: a journal file in .mlruns/).")
def tune(cfg, store, n_trials, study_name, storage):
    """Search LoRA rank, alpha and learning rate.

    An Optuna study (TPE, pruning on validation loss); every trial is a training run nested under
    one study run, which is tagged with the best trial and gets the study plots.
    """
    from loraflow.stages import tune as tune_stage

    result = tune_stage.run(cfg, store=store, n_trials=n_trials, study_name=study_name, storage=storage)
    click.echo(result.table)
    click.echo(result.summary_line())


@cli.command()
@project_options
@click.option("--from-run", default=None, help="Training run whose adapter to register.")
@click.option("--from-study", default=None, help="Register the best trial of this Optuna study.")
@click.option("--force", type=click.BOOL, is_flag=False, flag_value=True, default=False,
              help="Register even if the promotion gate refuses.")
def register(cfg, store, from_run, from_study, force):
    """Merge, gate and register the winning adapter.

    Merges into the full-precision base, evaluates against the base (and the current champion) and
    registers a pyfunc model with the alias only if it wins (--force overrides).
    """
    from loraflow.stages import register as register_stage

    result = register_stage.run(cfg, store=store, from_run=from_run, from_study=from_study, force=force)
    click.echo(result.message)


@cli.command()
@project_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="The address to listen on (0.0.0.0 for every interface: set an --api-key then).")
@click.option("--port", default=5001, show_default=True, type=int)
@click.option("--model-uri", default=None,
              help="Default: models:/<registry.model_name>@<registry.alias>, the alias followed live.")
@click.option("--workers", default=1, show_default=True, type=int, help="Server worker processes (each loads the model).")
@click.option("--timeout", default=None, type=int, help="Seconds a request may take (default: MLflow's, 60).")
@click.option("--api-key", default=None, envvar="LORAFLOW_API_KEY", show_envvar=True,
              help="Require `Authorization: Bearer KEY` on every route but /ping and /health.")
@click.option("--all-versions", is_flag=True, help="Hold every version of the model, not only the aliased ones.")
@click.option("--chat", type=click.BOOL, is_flag=False, flag_value=True, default=False, hidden=True,
              help="No longer needed: the server answers chat on /v1/chat/completions.")
@click.option("--dockerfile", "dockerfile", default=None, metavar="DIR",
              help="Do not serve: write DIR/Dockerfile and the model, the context to `docker build` an image "
                   "serving it on port 8080 (both APIs).")
def serve(cfg, store, host, port, model_uri, workers, timeout, api_key, all_versions, chat, dockerfile):
    """Serve the registered model over REST: MLflow's /invocations and the OpenAI API on one port.

    Serves models:/NAME@champion and every aliased version (NAME@previous...) on one base model, each
    an adapter; when `loraflow register` moves an alias, requests follow it within seconds. Examples:

    \b
    curl -s localhost:5001/invocations -H "Content-Type: application/json" \\
      -d '{"dataframe_records": [{"prompt": "Blue mug"}], "params": {"max_new_tokens": 32}}'
    curl -sN localhost:5001/v1/chat/completions -H "Content-Type: application/json" \\
      -d '{"model": "NAME", "messages": [{"role": "user", "content": "Blue mug"}], "stream": true}'
    curl -s localhost:5001/v1/models
    """
    from loraflow.stages import serve as serve_stage

    serve_stage.run(cfg, store, host=host, port=port, model_uri=model_uri, workers=workers, timeout=timeout,
                    api_key=api_key, all_versions=all_versions, chat=chat, dockerfile=dockerfile)


@cli.command()
@project_options
@click.option("--serve-check/--no-serve-check", default=False,
              help="At the end, start the server once and print one REST prediction.")
def pipeline(cfg, store, serve_check):
    """Run every stage: prepare to register.

    prepare -> train (or tune, when tune.enabled) -> evaluate -> register, each a nested run under
    one parent run; a step whose inputs did not change is reused instead of redone.
    """
    from loraflow.stages import pipeline as pipeline_stage

    result = pipeline_stage.run(cfg, store=store, serve_check=serve_check)
    click.echo(pipeline_stage.summary_text(cfg, store, result))


class Terminated(KeyboardInterrupt):
    exit_code = 143


def terminated(signum, frame):
    raise Terminated("terminated by SIGTERM")


@cli.command()
@project_options
@click.argument("prompts", nargs=-1, required=True)
@click.option("--model-uri", default=None, help="Default: models:/<registry.model_name>@<registry.alias>.")
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0: greedy.")
def predict(cfg, store, prompts, model_uri, max_new_tokens, temperature):
    """Answer prompts with the registered model, without a server.

    Loads the model as the server would and prints one answer per prompt:

    \b
    loraflow predict quickstart "Write a product description for: Oak desk lamp"
    """
    from loraflow.stages import serve as serve_stage

    params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "do_sample": temperature > 0}
    for answer in serve_stage.predict(cfg, store, list(prompts), model_uri=model_uri, params=params):
        click.echo(answer)


@cli.command()
@project_options
@click.option("--limit", default=20, show_default=True, type=int, help="How many runs, newest first.")
@click.option("--evaluations", is_flag=True, help="One row per evaluation instead (e.g. across tasks).")
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
              help="With --evaluations: also write the figures to this JSON file.")
def runs(cfg, store, limit, evaluations, json_path):
    """Compare the project's training runs (or evaluations) in a table.

    Training runs: the settings that differ, eval/loss, evaluation deltas with their 95% intervals,
    tokens/s and cost; tune trials are marked with their study and trial number. --evaluations: the
    data, the judged run, and base -> tuned mean ± std over seeds per metric.
    """
    import json
    from pathlib import Path

    from loraflow.stages import runs as runs_stage

    if not evaluations:
        click.echo(runs_stage.table_text(runs_stage.training_rows(store, limit)))
        return
    click.echo(runs_stage.table_text(runs_stage.evaluation_rows(store, limit), "no finished evaluations in this experiment yet"))
    if json_path:
        Path(json_path).write_text(json.dumps(runs_stage.evaluation_summary(store, limit), indent=2) + "\n")


@cli.command()
@project_options
@click.option("--model-uri", default=None, metavar="models:/NAME@ALIAS|models:/NAME/VERSION",
              help="The registered version to export (default: models:/<registry.model_name>@<registry.alias>).")
@click.option("--quantization", type=click.Choice(["f16", "q8_0", "f32"]), default="f16", show_default=True,
              help="f16: half the size of fp32, answers as served; q8_0: about a quarter, near-identical; f32: exact.")
@click.option("--output", default=None, type=click.Path(), metavar="DIR",
              help="Folder for the files (default: exports/NAME-vVERSION-QUANT).")
@click.option("--force", type=click.BOOL, is_flag=False, flag_value=True, default=False,
              help="Replace an existing output folder (only once the new files are complete).")
@click.option("--max-artifact-mb", type=float, default=2048.0, show_default=True,
              help="Files up to this size are logged as artifacts of the export run; larger ones by path and sha256.")
def export(cfg, store, model_uri, quantization, output, force, max_artifact_mb):
    """Export a registered version as GGUF with an Ollama Modelfile, for llama.cpp, Ollama and LM Studio.

    Writes NAME-vVERSION-QUANT.gguf (architecture, tokenizer, chat template inside), a Modelfile
    (`ollama create NAME -f Modelfile`) and a README with the version's gate figures. Supports the
    llama family (SmolLM2, TinyLlama, Llama 3.x) and qwen2. The export is an MLflow run (stage
    export); the version gets the tag loraflow.export.<QUANT> naming it.
    """
    from loraflow.stages import export as export_stage

    result = export_stage.run(cfg, store, model_uri=model_uri, quantization=quantization, output=output,
                              force=force, max_artifact_mb=max_artifact_mb)
    click.echo(export_stage.summary_line(result))


@cli.command("config")
@click.argument("project")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a value first (repeatable).")
def show_config(project, overrides):
    """Print the resolved config: every key, its value, default and meaning.

    Values that differ from the default are marked with `*`.
    """
    from loraflow.config import describe_text, load_config

    click.echo(describe_text(load_config(project, overrides)))


QUIET_ENVIRONMENT = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                     "TOKENIZERS_PARALLELISM": "false"}


def main(argv=None):
    """Entry point: run the group; user errors become one `error:` line and exit code 2.

    An interrupted training run exits 128 + the signal (143 for SIGTERM, 130 for SIGINT).
    """
    for name, value in QUIET_ENVIRONMENT.items():  # no telemetry from MLflow or the HF libraries
        os.environ.setdefault(name, value)
    signal.signal(signal.SIGTERM, terminated)  # a scheduler's SIGTERM ends the stage's run KILLED, like Ctrl+C
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial tables..."
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # four lines a run ("Started monitoring...")
    # bitsandbytes, once imported (by peft, before any model loads), says it found no hub-hosted CPU kernels
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort as exc:  # click turns KeyboardInterrupt into Abort; keep the cause's word
        cause = exc.__context__
        click.echo(f"error: {cause or 'interrupted'}", err=True)
        sys.exit(getattr(cause, "exit_code", 130))
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except LoraflowError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        click.echo(f"error: {exc or 'interrupted'}", err=True)
        sys.exit(getattr(exc, "exit_code", 130))
    except Exception as exc:  # an unexpected failure: still one line, the traceback only on request
        if os.environ.get("LORAFLOW_DEBUG"):
            traceback.print_exc()
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        click.echo(f"error: {type(exc).__name__}: {first_line} (set LORAFLOW_DEBUG=1 for the traceback)", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
