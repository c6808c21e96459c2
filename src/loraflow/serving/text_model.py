"""The registered model as an MLflow pyfunc: `TextGenerator`, one generated string per prompt row.

    mlflow.pyfunc.load_model("models:/quickstart@champion").predict(pd.DataFrame({"prompt": ["Title: Oak desk"]}))

`TextGenerator` loads the version in the form its gate judged: the adapter stored with the pyfunc on
the base model (found by its name, as training found it), unquantised, in the dtype recorded at
registration (models.load_served); where that base is not on the serving machine, or a version has no
adapter (one registered before adapters were kept), the merged folder stored beside it, in the same
dtype. It answers as generation.generate does in evaluation, with the settings saved beside it
(saved_settings). Concurrent greedy requests share one batched generate call (micro-batching, in
every dtype; batching.Engine); the bounds of a request are in `requests`.
"""
from __future__ import annotations

import contextlib
import logging
import weakref

import mlflow
import pandas as pd  # mlflow.pyfunc has imported it already

from loraflow.config import Config
from loraflow.serving.batching import Engine, Job
from loraflow.serving.requests import checked_params, context_length, fit_prompt, prompts_from, request_budget

logger = logging.getLogger(__name__)
LOADED = weakref.WeakSet()  # every TextGenerator / ChatGenerator that has loaded its model
LOADED_BEFORE_LOGGING: set | None = None  # while a model is being logged: what was loaded before (see below)


def serving_config(settings: dict) -> Config:
    """The few config values generation needs, rebuilt from the model config saved with the pyfunc."""
    from loraflow.config import SECTIONS

    return Config(**{section: SECTIONS[section](**values) for section, values in settings.items()})


def saved_settings(cfg: Config) -> dict:
    """What `serving_config` needs: the base's name, prompt formatting, batching, the default answer length, the
    max_new_tokens cap, the model's name (registry.model_name, resolved: what a chat answer names) and the served
    and merged dtypes, resolved on this machine (what the gate judged, whatever machine serves it)."""
    from loraflow import models

    keep = {"model": ("name", "kind", "dtype", "trust_remote_code"),
            "data": ("chat_template", "system_prompt", "max_length"),
            "eval": ("batch_size", "repetition_penalty", "max_new_tokens"), "registry": ("max_new_tokens_cap",)}
    values = cfg.to_dict()
    settings = {section: {key: values[section][key] for key in keys} for section, keys in keep.items()}
    local = cfg.resolve_path(cfg.model.name)
    if local.exists():  # a folder or .gguf named relative to the project: found from anywhere
        settings["model"]["name"] = str(local.resolve())
    settings["registry"].update(model_name=cfg.model_name, serve_dtype=models.name_of_dtype(models.served_dtype(cfg)),
                                merge_dtype=models.name_of_dtype(models.merged_dtype(cfg)))
    return settings


@contextlib.contextmanager
def one_model_while_logging():
    """Around mlflow.pyfunc.log_model: MLflow loads the model to answer the input example (twice for a chat
    model) and keeps each instance it loaded, so each would hold a whole model for the rest of the process. Here
    a load lets go of the ones logging loaded before it, and the end lets go of the last."""
    global LOADED_BEFORE_LOGGING
    LOADED_BEFORE_LOGGING = set(LOADED)
    try:
        yield
    finally:
        let_go_of_models_logging_loaded()
        LOADED_BEFORE_LOGGING = None


def let_go_of_models_logging_loaded() -> None:
    from loraflow import models

    if LOADED_BEFORE_LOGGING is None:
        return
    for instance in set(LOADED) - LOADED_BEFORE_LOGGING:
        instance.__dict__.pop("model", None)
        instance.__dict__.pop("tokenizer", None)
        LOADED.discard(instance)
    models.release_memory()


def load_served_model(context):
    """(config, model, tokenizer) of a pyfunc context: the saved settings and the served form, in eval mode."""
    from loraflow import models

    let_go_of_models_logging_loaded()  # while logging, MLflow is done with the instance it loaded before
    request_budget()  # a bad LORAFLOW_REQUEST_SECONDS stops the server at start, not every request
    cfg = serving_config(context.model_config or {})
    merged = context.artifacts["model"]
    base = served_base(cfg, merged) if "adapter" in context.artifacts else None
    if base is not None:
        model, tokenizer = models.load_served(cfg, base, context.artifacts["adapter"])
    else:
        model, tokenizer = models.load_model(cfg, merged, quantize=False, dtype=models.served_dtype(cfg))
    model.eval()
    return cfg, model, tokenizer


def served_base(cfg: Config, merged_dir: str) -> str | None:
    """The base model on this machine (a folder, or a hub id in the local cache), or None with a warning when it
    cannot be found or is not the base the merged folder came from (another architecture or size): then the
    merged folder is served."""
    import transformers

    from loraflow import LoraflowError, models

    try:
        base = models.resolve_model_path(cfg.model.name, cfg)
        configs = [transformers.AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
                   for path in (base, merged_dir)]
    except (LoraflowError, OSError, ValueError, ImportError) as exc:  # ImportError: no converter for the embedded GGUF
        logger.warning("serving the merged folder: the base %s is not here (%s)", cfg.model.name,
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    shape = ("architectures", "hidden_size", "num_hidden_layers", "vocab_size", "d_model", "num_layers")
    if any(getattr(configs[0], key, None) != getattr(configs[1], key, None) for key in shape):
        logger.warning("serving the merged folder: %s here is not the base it was merged from", cfg.model.name)
        return None
    return base


class TextGenerator(mlflow.pyfunc.PythonModel):
    """A registered causal or seq2seq model (load_served_model) that answers one generated string per `prompt` row.

    Prompts are formatted and decoded by generation.generate's rules, exactly as in evaluation and training, and
    answered by a batching.Engine: one generation at a time on the model's own thread, concurrent greedy requests
    with the same max_new_tokens in one batched generate call (micro-batching). See the module docstring for the
    limits of a request.
    """

    def load_context(self, context):
        self.cfg, self.model, self.tokenizer = load_served_model(context)
        LOADED.add(self)
        self.engine = Engine(self.model, self.tokenizer)
        self.context_tokens = context_length(self.model, self.tokenizer)

    def predict(self, context, model_input: pd.DataFrame, params=None):  # the hint: no "add type hints" warning
        prompts = prompts_from(model_input)
        settings = checked_params(params, self.cfg.registry.max_new_tokens_cap)
        if not prompts:
            return []
        return answer_prompts(self.engine, self.cfg, self.context_tokens, prompts, settings)


def answer_prompts(engine: Engine, cfg: Config, context_tokens: int | None, prompts: list[str], settings: dict,
                   adapter: str | None = None, group: object = None) -> list[str]:
    """What /invocations answers for `prompts`: each cut from the left to the room the context leaves it (400 when
    none is left), encoded as generation.generate encodes it, answered by `engine` and decoded."""
    from loraflow import generation

    room = None if context_tokens is None else context_tokens - (
        settings["max_new_tokens"] if cfg.model.kind == "causal" else 0)

    def encode() -> list[list[int]]:
        fitted = prompts if room is None else [fit_prompt(engine.tokenizer, p, room, cfg) for p in prompts]
        return generation.encode_prompts(engine.tokenizer, fitted, cfg)

    job = Job(encode=encode, settings=settings, cfg=cfg, budget=request_budget(), adapter=adapter, group=group)
    return [engine.decode(ids).strip() for ids in engine.answer(job)]
