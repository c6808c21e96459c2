"""The registered model as an MLflow pyfunc: `TextGenerator`, one generated string per prompt row.

    mlflow.pyfunc.load_model("models:/quickstart@champion").predict(pd.DataFrame({"prompt": ["Title: Oak desk"]}))

`TextGenerator` loads the version in the form its gate judged: the adapter stored with the pyfunc on
the base model (found by its name, as training found it), unquantised, in the dtype recorded at
registration (models.load_served); where that base is not on the serving machine, or a version has no
adapter (one registered before adapters were kept), the merged folder stored beside it, in the same
dtype. It answers through generation.generate, as evaluation does, with the settings saved beside it
(saved_settings). Concurrent greedy requests to a model served in fp32 share one batched generate call
(micro-batching); the bounds of a request are in `requests`.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref

import mlflow
import pandas as pd  # mlflow.pyfunc has imported it already
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from loraflow.config import Config
from loraflow.serving.batching import BATCH_WAIT_SECONDS, MAX_BATCH_ROWS, POLL_SECONDS, Request, model_thread
from loraflow.serving.requests import (REQUEST_SECONDS_ENV, checked_params, context_length, fit_prompt, http_error,
                                       prompts_from, request_budget, request_config)

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

    Prompts are formatted and decoded by generation.generate, exactly as in evaluation and training.
    The scoring server answers requests in threads; one generation runs at a time (`lock`), always on the
    model's own thread (model_thread), and greedy requests that wait for it together, or arrive within
    BATCH_WAIT_SECONDS of an idle model, are answered by one batched generate call when the model is served
    in fp32 (micro-batching: left-padded fp32 greedy answers are those of the request alone; see batch_key).
    See the module docstring for the limits of a request.
    """

    def load_context(self, context):
        self.cfg, self.model, self.tokenizer = load_served_model(context)
        LOADED.add(self)
        self.context_tokens = context_length(self.model, self.tokenizer)
        self.lock = threading.Lock()  # held by the request whose thread runs a batch
        self.thread = model_thread()  # where every batch generates (see model_thread)
        self.queue_lock = threading.Lock()  # guards self.waiting
        self.waiting: list[Request] = []  # requests not yet taken into a batch, oldest first

    def predict(self, context, model_input: pd.DataFrame, params=None):  # the hint: no "add type hints" warning
        started = time.monotonic()
        budget = request_budget()
        prompts = prompts_from(model_input)
        settings = checked_params(params, self.cfg.registry.max_new_tokens_cap)
        if not prompts:
            return []
        request = Request(prompts, settings, budget, started + budget)
        with self.queue_lock:
            self.waiting.append(request)
        self.wait_for_answers(request)
        if request.error is not None:
            raise request.error
        return request.answers

    def wait_for_answers(self, request: Request) -> None:
        """Until `request` is done: whenever the model is free, run the next batch (with this request in it unless
        another thread's batch took it). A request no batch took within its budget is 503; one taken is answered
        by the end of that batch, which stops at its members' earliest deadline."""
        while not request.done.is_set():
            if self.lock.acquire(timeout=max(0.0, min(POLL_SECONDS, request.deadline - time.monotonic()))):
                try:
                    batch = [] if request.done.is_set() else self.take_batch(request)
                    if batch:
                        self.run_batch(batch)
                finally:
                    self.lock.release()
            elif time.monotonic() >= request.deadline:
                with self.queue_lock:
                    unanswered = request in self.waiting
                    if unanswered:
                        self.waiting.remove(request)
                if unanswered:
                    raise MlflowException(f"the server is busy: no turn came within this request's budget of "
                                          f"{request.budget:g} s (${REQUEST_SECONDS_ENV}); retry later",
                                          error_code=TEMPORARILY_UNAVAILABLE)
                request.done.wait()

    def take_batch(self, leader: Request) -> list[Request]:
        """`leader` and the waiting requests with its batch_key, oldest first, up to MAX_BATCH_ROWS prompts; taken off
        the queue. When the model was idle (no one else waiting) it first waits BATCH_WAIT_SECONDS for others."""
        if self.batch_key(leader) is not None and len(self.waiting) == 1:
            time.sleep(BATCH_WAIT_SECONDS)
        with self.queue_lock:
            others = [r for r in self.waiting if r is not leader]
            batch, key = ([leader], self.batch_key(leader)) if self.prepare(leader) else ([], None)
            rows = len(leader.prompts)
            for request in others if key is not None else []:
                if not self.prepare(request):
                    continue  # its prompt cannot fit: it answers 400 alone (done below)
                if self.batch_key(request) == key and rows + len(request.prompts) <= MAX_BATCH_ROWS:
                    batch.append(request)
                    rows += len(request.prompts)
            failed = [r for r in [leader] + others if r.error is not None]
            self.waiting = [r for r in others if r.error is None and all(r is not m for m in batch)]
        for request in failed:
            request.done.set()
        return batch

    def prepare(self, request: Request) -> bool:
        """Fit `request`'s prompts to the context, once (tokenised under the lock: a fast tokenizer is not safe
        across threads); False, with the request's 400 error set, when one cannot fit."""
        if request.fitted is None and request.error is None:
            try:
                request.fitted = self.fit(request.prompts, request.settings)
            except MlflowException as exc:
                request.error = exc
        return request.error is None

    def batch_key(self, request: Request):
        """Requests with the same key get, in one generate call, the answers each gets alone: greedy ones with the
        same max_new_tokens (temperature, top_p and seed do not change a greedy answer) on a model served in fp32.
        A sampled request goes alone (its seed fixes its random stream), and so does every request to a bf16 or
        fp16 model: measured on SmolLM2 in bf16, batching changed 5 of 13 greedy answers even among prompts of one
        length (another batch shape rounds differently), where fp32 batches changed none."""
        import torch

        if request.settings["do_sample"] or self.model.dtype != torch.float32:
            return None
        return "greedy", request.settings["max_new_tokens"]

    def run_batch(self, batch: list[Request]) -> None:
        """Answer every request of `batch` with one generate call (under the lock); each gets its answers or error."""
        try:
            prompts = [prompt for request in batch for prompt in request.fitted]
            logger.debug("one generate call for %d requests, %d prompts", len(batch), len(prompts))
            try:
                answers = self.thread.submit(self.generate, prompts, batch[0].settings,
                                             min(r.deadline for r in batch)).result()
            except Exception as exc:
                for request in batch:
                    request.error = http_error(exc, request.budget, "send fewer rows or a smaller max_new_tokens")
                return
            start = 0
            for request in batch:
                request.answers, start = answers[start:start + len(request.fitted)], start + len(request.fitted)
        finally:
            for request in batch:
                request.done.set()

    def prompt_room(self, max_new_tokens: int) -> int | None:
        """Tokens a prompt may take: the context, less the answer's share for a causal model."""
        if self.context_tokens is None:
            return None
        return self.context_tokens - (max_new_tokens if self.cfg.model.kind == "causal" else 0)

    def fit(self, prompts: list[str], settings: dict) -> list[str]:
        """The prompts cut from the left to the room the context leaves them (400 when none is left)."""
        room = self.prompt_room(settings["max_new_tokens"])
        return prompts if room is None else [fit_prompt(self.tokenizer, p, room, self.cfg) for p in prompts]

    def generate(self, prompts: list[str], settings: dict, deadline: float) -> list[str]:
        """Answers to fitted prompts, under the lock."""
        from loraflow import generation

        return generation.generate(self.model, self.tokenizer, prompts, request_config(self.cfg, settings),
                                   seed=settings["seed"], deadline=deadline, progress=False)
