"""The registered model as an MLflow pyfunc, and the REST server in front of it.

    loraflow serve quickstart                       # models:/<registry.model_name>@champion on 127.0.0.1:5001
    loraflow serve quickstart --model-uri models:/quickstart/3 --port 5002
    loraflow serve quickstart --chat                # the champion's OpenAI-style chat flavour
    loraflow serve quickstart --dockerfile image/   # a Dockerfile and the model, to build a container image
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"prompt": "Title: Oak desk"}], "params": {"max_new_tokens": 64}}'

`TextGenerator` loads the merged model folder stored with the pyfunc and answers one string per
prompt row; `log_model` logs it with an explicit signature (the generation params) and explicit
pip requirements. `log_chat_model` logs the same folder and settings as `ChatGenerator`
(served_chat_model.py), MLflow's chat-completions flavour, for projects whose prompts go through
a chat template. `start_server`, `wait_until_ready` and `predict_over_http` drive
`mlflow models serve` from Python (the pipeline's serve check and the README demo use them);
they run the server with UVICORN_LOOP=loraflow.serving:server_loop, an event loop with enough
threads that every concurrent request can join one micro-batch (set it too when you start
`mlflow models serve` yourself).

Every request is bounded:
- at most MAX_ROWS prompt rows; max_new_tokens in [1, registry.max_new_tokens_cap]; seed in
  [0, 2**32 - 1]; temperature >= 0; top_p in (0, 1]. Anything else is HTTP 400 with a one-line
  message (an MlflowException; the scoring server adds a stack trace only to other exceptions).
- a prompt longer than the model's context is cut from the left: its end, next to the answer, is
  kept, as in training (data.fit_to_length). The context is the smaller of the model config's
  max_position_embeddings and tokenizer.model_max_length; a causal prompt gets that minus
  max_new_tokens (prompt and answer share the positions), a seq2seq prompt all of it.
- sampling happens only when do_sample is true (temperature 0 then samples at 1.0).
- each request has a budget of $LORAFLOW_REQUEST_SECONDS seconds (default and ceiling: the scoring
  server's timeout, MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT, less SERVER_TIMEOUT_MARGIN_SECONDS),
  counted from the request's start and spent waiting for the model's lock too. A request still
  queued for the lock at the end of its budget gives up with HTTP 503 (TEMPORARILY_UNAVAILABLE);
  one whose generation passes it is stopped and answers HTTP 504 (DEADLINE_EXCEEDED). Either
  way the lock is free for the next request. The budget stays under the server's own timeout
  because at that timeout the server answers 504 but its worker thread would go on generating,
  holding the lock.
- an unexpected failure is HTTP 500 naming the exception type; its traceback goes to the server log.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import numbers
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pandas as pd  # mlflow.pyfunc has imported it already
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INTERNAL_ERROR, TEMPORARILY_UNAVAILABLE

from loraflow import LoraflowError, say, tracking
from loraflow.config import Config

GENERATION_DEFAULTS = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "do_sample": False, "seed": 0}
PARAM_TYPES = {"max_new_tokens": "long", "temperature": "double", "top_p": "double", "do_sample": "boolean",
               "seed": "long"}
MAX_ROWS = 64  # prompt rows per request
MAX_SEED = 2**32 - 1  # numpy's seed range, which transformers.set_seed goes through
REQUEST_SECONDS_ENV = "LORAFLOW_REQUEST_SECONDS"
SERVER_TIMEOUT_MARGIN_SECONDS = 5  # the budget ends this long before the scoring server's timeout
UNSET_MODEL_MAX_LENGTH = 10**9  # tokenizers without a limit report int(1e30)
BATCH_WAIT_SECONDS = 0.02  # an idle model waits this long for concurrent requests to join a batch
MAX_BATCH_ROWS = 64  # prompts in one batched generate call (generation.generate splits it by eval.batch_size)
SERVER_LOOP_ENV = "UVICORN_LOOP"  # uvicorn reads its --loop option from here
POLL_SECONDS = 0.05  # how often a waiting request looks for its turn

logger = logging.getLogger(__name__)


def invalid(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400."""
    return MlflowException.invalid_parameter_value(message)


def request_budget() -> float:
    """Seconds a request may take: $LORAFLOW_REQUEST_SECONDS, at most the server's timeout less a margin."""
    server_timeout = MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()
    ceiling = max(server_timeout - SERVER_TIMEOUT_MARGIN_SECONDS, server_timeout / 2)
    configured = os.environ.get(REQUEST_SECONDS_ENV, "").strip()
    if not configured:
        return ceiling
    try:
        seconds = float(configured)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise MlflowException(f"{REQUEST_SECONDS_ENV} must be a positive number of seconds, got {configured!r}",
                              error_code=INTERNAL_ERROR)
    return min(seconds, ceiling)


def prompts_from(model_input) -> list[str]:
    """The `prompt` column of a DataFrame (or a list of records) as strings; 400 if it is missing or bad."""
    frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    if "prompt" not in frame.columns:
        raise invalid(f"the input needs a 'prompt' column; got columns {list(map(str, frame.columns))}")
    if len(frame) > MAX_ROWS:
        raise invalid(f"at most {MAX_ROWS} prompt rows per request, got {len(frame)}")
    prompts = frame["prompt"].tolist()
    if not all(isinstance(p, str) for p in prompts):
        raise invalid("every 'prompt' must be a string")
    return prompts


def checked_params(params: dict | None, cap: int) -> dict:
    """Generation params with defaults filled in; 400 for out-of-range values."""
    values = {**GENERATION_DEFAULTS, **{k: v for k, v in (params or {}).items()
                                        if k in GENERATION_DEFAULTS and v is not None}}
    if not 1 <= values["max_new_tokens"] <= cap:
        raise invalid(f"max_new_tokens must be between 1 and {cap}, got {values['max_new_tokens']}")
    if not (math.isfinite(values["temperature"]) and values["temperature"] >= 0):
        raise invalid(f"temperature must be >= 0, got {values['temperature']}")
    if not 0 < values["top_p"] <= 1:
        raise invalid(f"top_p must be in (0, 1], got {values['top_p']}")
    seed = values["seed"]
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
        raise invalid(f"seed must be an integer between 0 and {MAX_SEED}, got {seed}")
    return values


def serving_config(settings: dict) -> Config:
    """The few config values generation needs, rebuilt from the model config saved with the pyfunc."""
    from loraflow.config import SECTIONS

    return Config(**{section: SECTIONS[section](**values) for section, values in settings.items()})


def saved_settings(cfg: Config) -> dict:
    """What `serving_config` needs: prompt formatting, dtype, batching, the default answer length, the
    max_new_tokens cap and the model's name (registry.model_name, resolved: what a chat answer names)."""
    keep = {"model": ("kind", "dtype", "trust_remote_code"), "data": ("chat_template", "system_prompt", "max_length"),
            "eval": ("batch_size", "repetition_penalty", "max_new_tokens"), "registry": ("max_new_tokens_cap",)}
    values = cfg.to_dict()
    settings = {section: {key: values[section][key] for key in keys} for section, keys in keep.items()}
    settings["registry"]["model_name"] = cfg.model_name
    return settings


def request_config(cfg: Config, settings: dict) -> Config:
    """`cfg` with one request's decoding settings: greedy unless do_sample (at temperature 0: 1.0)."""
    # generation.generate samples exactly when eval.temperature > 0, so greedy is temperature 0
    temperature = (settings["temperature"] or 1.0) if settings["do_sample"] else 0.0
    return dataclasses.replace(cfg, eval=dataclasses.replace(
        cfg.eval, max_new_tokens=settings["max_new_tokens"], temperature=temperature, top_p=settings["top_p"]))


def context_length(model, tokenizer) -> int | None:
    """Positions the model reads: the smaller of max_position_embeddings and model_max_length (None: no limit)."""
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(n) for n in limits if isinstance(n, numbers.Integral) and 0 < n < UNSET_MODEL_MAX_LENGTH]
    return min(limits) if limits else None


def prompt_tails(tokenizer, prompt: str):
    """(tokens in the bare prompt, tail) where tail(k) is the end of `prompt` its last k tokens cover."""
    if tokenizer.is_fast:
        offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return len(offsets), lambda k: prompt[offsets[len(offsets) - k][0]:]
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return len(ids), lambda k: tokenizer.decode(ids[len(ids) - k:])


def cut_from_left(tokenizer, text: str, room: int, length) -> str | None:
    """`text` cut from the left until `length(text)` (its encoded length in context) is at most `room`;
    None when even an empty text would not fit."""
    encoded = length(text)
    if encoded <= room:
        return text
    bare, tail = prompt_tails(tokenizer, text)
    keep = room - (encoded - bare)  # the tokens around the text stay
    while keep > 0:  # tokens may merge differently at the cut: re-encode and shrink until it fits
        excess = length(tail(keep)) - room
        if excess <= 0:
            return tail(keep)
        keep -= excess
    return None


def fit_prompt(tokenizer, prompt: str, room: int, cfg: Config) -> str:
    """`prompt` cut from the left until it is at most `room` tokens as generation encodes it (chat
    template included); 400 when the template alone leaves no room."""
    from loraflow import generation

    def length(text: str) -> int:
        return len(generation.encode_prompts(tokenizer, [text], cfg)[0])

    fitted = cut_from_left(tokenizer, prompt, room, length)
    if fitted is None:
        raise invalid(f"no room for the prompt: the model reads {room} tokens besides the answer "
                      "and the prompt format alone takes more; lower max_new_tokens")
    return fitted


def load_served_model(context):
    """(config, model, tokenizer) of a pyfunc context: the saved settings and the merged folder, in eval mode."""
    from loraflow import models

    request_budget()  # a bad LORAFLOW_REQUEST_SECONDS stops the server at start, not every request
    cfg = serving_config(context.model_config or {})
    model, tokenizer = models.load_model(cfg, context.artifacts["model"], quantize=False)
    model.eval()
    return cfg, model, tokenizer


def server_loop() -> asyncio.AbstractEventLoop:
    """The scoring server's event loop, with a pool of MAX_BATCH_ROWS threads for predict calls.

    MLflow's scoring server runs each predict through asyncio.to_thread, in the loop's default pool of
    min(32, cpus + 4) threads (6 on 2 cores), so a micro-batch could hold no more requests than that: 8
    concurrent clients became a batch of 6 and then one of 2. The threads only wait for their batch.
    uvicorn takes it from $UVICORN_LOOP (set by server_env; `mlflow models serve` users can set it too)."""
    loop = asyncio.new_event_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=MAX_BATCH_ROWS, thread_name_prefix="loraflow-predict"))
    return loop


def http_error(exc: Exception, budget: float, hint: str) -> MlflowException:
    """What a failed generation answers: generation past the budget is 504 (with `hint`, what to send instead),
    a 4xx/5xx MlflowException stays as it is, anything else is 500 naming its type (the traceback is logged)."""
    from loraflow import generation

    if isinstance(exc, generation.DeadlinePassed):
        return MlflowException(f"generation stopped: the request passed its budget of {budget:g} s "
                               f"(${REQUEST_SECONDS_ENV}); {hint}", error_code=DEADLINE_EXCEEDED)
    if isinstance(exc, MlflowException):
        return exc
    logger.error("generation failed", exc_info=exc)  # the scoring server would answer 400 with the traceback
    return MlflowException(f"generation failed ({type(exc).__name__}); the server log has the details",
                           error_code=INTERNAL_ERROR)


def model_thread() -> ThreadPoolExecutor:
    """The one thread a served model generates on, whichever request thread asks.

    torch keeps per-thread state for its CPU kernels (an OpenMP team of workers for each calling thread, whose
    idle members spin for a while; allocator arenas; oneDNN caches). The scoring server answers each request
    on some thread of its pool, and generating there was slow: SmolLM2 in fp32 on 2 cores answered one request
    in 1.01 s and a batch of 8 in 2.0 s from the pool's threads, 0.61 s and 1.46 s on one thread."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraflow-model")


def run_in_turn(lock: threading.Lock, started: float, budget: float, work, hint: str, thread: ThreadPoolExecutor):
    """`work(deadline)` on the model's `thread`, holding `lock`, within the request's budget counted from `started`
    (one request at a time: the chat flavour). Waiting past the budget is 503, failures as http_error; the lock is
    always freed."""
    if not lock.acquire(timeout=max(0.0, started + budget - time.monotonic())):
        raise MlflowException(f"the server is busy: no turn came within this request's budget of {budget:g} s "
                              f"(${REQUEST_SECONDS_ENV}); retry later", error_code=TEMPORARILY_UNAVAILABLE)
    try:
        return thread.submit(work, started + budget).result()
    except Exception as exc:
        raise http_error(exc, budget, hint) from None
    finally:
        lock.release()


@dataclasses.dataclass(eq=False)
class Request:
    """One predict call: its prompts and settings, its deadline, and, once a batch has run, its answers or error."""
    prompts: list[str]
    settings: dict
    budget: float
    deadline: float  # a time.monotonic() value
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    fitted: list[str] | None = None  # the prompts cut to the context (TextGenerator.prepare, under the lock)
    answers: list[str] | None = None
    error: Exception | None = None


class TextGenerator(mlflow.pyfunc.PythonModel):
    """A merged causal or seq2seq model that answers one generated string per `prompt` row.

    Prompts are formatted and decoded by generation.generate, exactly as in evaluation and training.
    The scoring server answers requests in threads; one generation runs at a time (`lock`), always on the
    model's own thread (model_thread), and greedy requests that wait for it together, or arrive within
    BATCH_WAIT_SECONDS of an idle model, are answered by one batched generate call when the model is served
    in fp32 (micro-batching: left-padded fp32 greedy answers are those of the request alone; see batch_key).
    See the module docstring for the limits of a request.
    """

    def load_context(self, context):
        self.cfg, self.model, self.tokenizer = load_served_model(context)
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


def model_signature(cfg: Config):
    """Input: a string `prompt` column; output: a string; params: the generation settings."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    max_new_tokens = min(cfg.eval.max_new_tokens, cfg.registry.max_new_tokens_cap)
    defaults = {**GENERATION_DEFAULTS, "max_new_tokens": max_new_tokens, "temperature": cfg.eval.temperature,
                "top_p": cfg.eval.top_p, "do_sample": cfg.eval.temperature > 0}
    params = ParamSchema([ParamSpec(name, PARAM_TYPES[name], value) for name, value in defaults.items()])
    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), outputs=Schema([ColSpec("string")]),
                          params=params)


def pip_requirements() -> list[str]:
    """The serving environment: the installed versions of what `TextGenerator` imports."""
    from importlib.metadata import version

    def base(name):
        return version(name).split("+")[0]
    return [f"mlflow=={base('mlflow')}", f"torch=={base('torch')}", f"transformers=={base('transformers')}",
            f"tokenizers=={base('tokenizers')}", f"safetensors=={base('safetensors')}", "pandas", "pyyaml", "tqdm"]


def log_model(cfg: Config, merged_dir: str | Path, name: str = "model"):
    """Log the merged folder as a `TextGenerator` pyfunc in the active run; returns the ModelInfo.

    The model is logged from code (served_model.py) with an input example; loraflow's own source goes
    along as code_paths, so the serving environment needs only the pip requirements, not loraflow.
    """
    import loraflow

    package = Path(loraflow.__file__).parent
    return mlflow.pyfunc.log_model(
        name=name, python_model=str(package / "served_model.py"), artifacts={"model": str(merged_dir)},
        signature=model_signature(cfg), input_example=pd.DataFrame({"prompt": ["Hello"]}),
        pip_requirements=pip_requirements(), model_config=saved_settings(cfg), code_paths=[str(package)])


def has_chat_flavour(cfg: Config, model_dir: str | Path) -> bool:
    """Whether the model in `model_dir` is also logged as a chat model: prompts go through its tokenizer's
    chat template (a causal model, data.chat_template, a template in the tokenizer)."""
    from loraflow import data, models

    return data.uses_chat_template(models.load_tokenizer(str(model_dir)), cfg)


def log_chat_model(cfg: Config, merged_dir: str | Path, name: str = "chat_model"):
    """Log the merged folder as a `ChatGenerator` (served_chat_model.py) in the active run; returns the ModelInfo.

    The same artifact, settings, requirements and code as `log_model`; MLflow sets the chat signature
    and, while logging, loads the model and answers the input example once (one token here).
    """
    import loraflow

    package = Path(loraflow.__file__).parent
    example = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1, "temperature": 0.0, "n": 1,
               "stream": False}
    # MLflow warns that ChatParams' defaults for temperature, n and stream will go for any input example
    # with params (pyfunc save_model), even one that sets all three, as this one does.
    pyfunc_logger = logging.getLogger("mlflow.pyfunc")
    quiet = lambda record: "Default values for temperature, n and stream" not in record.getMessage()  # noqa: E731
    pyfunc_logger.addFilter(quiet)
    try:
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(package / "served_chat_model.py"), artifacts={"model": str(merged_dir)},
            input_example=example, pip_requirements=pip_requirements(), model_config=saved_settings(cfg),
            code_paths=[str(package)])
    finally:
        pyfunc_logger.removeFilter(quiet)


def default_model_uri(cfg: Config) -> str:
    return f"models:/{cfg.model_name}@{cfg.registry.alias}"


def check_model_exists(model_uri: str, store: tracking.Store) -> None:
    """A one-line error when a models:/name@alias or models:/name/version URI names nothing."""
    if not model_uri.startswith("models:/"):
        return
    name, _, ref = model_uri.removeprefix("models:/").partition("@")
    client = store.client()
    try:
        if ref:
            client.get_model_version_by_alias(name, ref)
        elif "/" in name:
            client.get_model_version(*name.split("/", 1))
    except MlflowException:
        raise LoraflowError(f"no model at {model_uri} in {tracking.redact(store.uri)}: "
                            "run `loraflow register` first or pass --model-uri") from None


def registered_version(model_uri: str, store: tracking.Store):
    """The model version a models:/NAME@ALIAS or models:/NAME/VERSION URI names (a one-line error otherwise)."""
    name, _, alias = model_uri.removeprefix("models:/").partition("@")
    if not model_uri.startswith("models:/") or not (alias or "/" in name):
        raise LoraflowError(f"--chat needs a registered version (models:/NAME@ALIAS or models:/NAME/VERSION), "
                            f"got {model_uri}")
    check_model_exists(model_uri, store)
    client = store.client()
    return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(*name.split("/", 1))


def chat_model_uri(model_uri: str, store: tracking.Store) -> str:
    """The chat flavour logged beside the version `model_uri` names (its version tag); a one-line error if none."""
    from loraflow.registry import CHAT_MODEL_TAG  # to be tracking.Tags', with the rest of the run contract

    version = registered_version(model_uri, store)
    chat_uri = version.tags.get(CHAT_MODEL_TAG)
    if not chat_uri:
        raise LoraflowError(f"{model_uri} (version {version.version} of {version.name}) has no chat flavour: one "
                            "is registered with causal models whose prompts use a chat template (data.chat_template "
                            "and a tokenizer that has one); serve it without --chat")
    return chat_uri


def serve_command(model_uri: str, host: str, port: int, workers: int = 1, timeout: int | None = None) -> list[str]:
    """The `mlflow models serve` command line; `timeout` None keeps MLflow's (60 s or its env var).

    Each of `workers` processes loads its own copy of the model. `timeout` also bounds the request
    budget (see the module docstring): the server passes it to its workers in the environment.
    """
    if workers < 1 or (timeout is not None and timeout < 1):
        raise LoraflowError(f"workers and timeout must be at least 1, got workers={workers}, timeout={timeout}")
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
               "-h", host, "-p", str(port), "--workers", str(workers)]
    return command + (["--timeout", str(timeout)] if timeout is not None else [])


def server_env(store: tracking.Store, env: dict | None = None) -> dict:
    """The environment for the server: `uvicorn` found beside this Python, the tracking URI passed on, and the
    event loop whose thread pool lets every concurrent request join a micro-batch (server_loop)."""
    env = dict(os.environ if env is None else env)
    env.setdefault(SERVER_LOOP_ENV, "loraflow.serving:server_loop")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["MLFLOW_TRACKING_URI"] = store.uri
    return env


def start_server(model_uri: str, store: tracking.Store, host: str = "127.0.0.1", port: int = 5001,
                 env: dict | None = None, *, workers: int = 1, timeout: int | None = None,
                 **popen_options) -> subprocess.Popen:
    """Start `mlflow models serve` in its own process group (stop it with `stop_server`).

    MLflow downloads the model into the server's temp folder and never removes it (a whole merged model
    per start), so the server gets a temp folder of its own, `process.scratch_dir`, which stop_server removes.
    """
    scratch = tempfile.mkdtemp(prefix="loraflow-serve-")
    try:
        process = subprocess.Popen(serve_command(model_uri, host, port, workers=workers, timeout=timeout),
                                   env={**server_env(store, env), "TMPDIR": scratch}, start_new_session=True,
                                   **popen_options)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    process.scratch_dir = scratch
    return process


def stop_server(process: subprocess.Popen, timeout: float = 20) -> None:
    """Terminate the server's whole process group (kill it if it does not stop within `timeout` s) and remove
    its temp folder."""
    try:
        end_process_group(process, timeout)
    finally:
        shutil.rmtree(getattr(process, "scratch_dir", ""), ignore_errors=True)


def end_process_group(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM the process group of `process`, then SIGKILL it if `process` has not ended within `timeout` s."""
    if process.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_until_ready(url: str, timeout: float = 120, process: subprocess.Popen | None = None,
                     interval: float = 0.5) -> None:
    """Poll `url`/ping until it answers 200; LoraflowError on timeout or when `process` exits first."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 1):
        if process is not None and process.poll() is not None:
            raise LoraflowError(f"the model server exited with code {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/ping", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    raise LoraflowError(f"the model server at {url} was not ready after {timeout:.0f} s")


def answers_of(model_uri: str, prompts: list[str], params: dict):
    """Load the logged model as the server would, in a temp folder of its own (MLflow's would be left behind),
    and return its predictions for `prompts`."""
    with tempfile.TemporaryDirectory(prefix="loraflow-model-") as scratch:
        model = mlflow.pyfunc.load_model(model_uri, dst_path=scratch)
        return model.predict(pd.DataFrame({"prompt": prompts}), params=params)


def predict(cfg: Config, store: tracking.Store, prompts: list[str], *, model_uri: str | None = None,
            params: dict | None = None) -> list[str]:
    """`loraflow predict`: load the registered model as the server would and answer `prompts` in-process."""
    model_uri = model_uri or default_model_uri(cfg)
    check_model_exists(model_uri, store)
    try:
        return [str(a) for a in answers_of(model_uri, prompts, params or {})]
    except MlflowException as exc:
        raise LoraflowError(f"{model_uri}: {tracking.first_line(exc)}") from None


def predict_over_http(url: str, prompts: list[str], params: dict | None = None, timeout: float = 300) -> list[str]:
    """POST prompts to `url`/invocations and return the predictions (one string per prompt)."""
    payload = {"dataframe_records": [{"prompt": p} for p in prompts], "params": params or {}}
    request = urllib.request.Request(f"{url.rstrip('/')}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())["predictions"]
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        try:
            detail = json.loads(detail).get("message", detail)
        except (ValueError, AttributeError):
            pass
        raise LoraflowError(f"the model server answered {exc.code}: {detail.splitlines()[0][:300]}") from None


def write_dockerfile(model_uri: str, store: tracking.Store, folder: str | Path) -> Path:
    """`loraflow serve --dockerfile DIR`: DIR/Dockerfile and DIR/model_dir, the build context of an image that
    serves `model_uri` on port 8080 (`mlflow models generate-dockerfile`, so `docker build DIR` makes what
    `mlflow models build-docker` would). The model's pip requirements go into the image's Python; loraflow's
    code travels inside the model (code_paths), so the image needs no loraflow.
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise LoraflowError(f"--dockerfile {folder}: exists and is not an empty folder; give a new one")
    command = [sys.executable, "-m", "mlflow", "models", "generate-dockerfile", "-m", model_uri, "-d", str(folder),
               "--env-manager", "local"]
    done = subprocess.run(command, env=server_env(store), capture_output=True, text=True)
    if done.returncode != 0 or not (folder / "Dockerfile").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        raise LoraflowError(f"mlflow models generate-dockerfile failed: {lines[-1] if lines else done.returncode}")
    return folder


def run(cfg: Config, store: tracking.Store, *, host: str = "127.0.0.1", port: int = 5001,
        model_uri: str | None = None, workers: int = 1, timeout: int | None = None, chat: bool = False,
        dockerfile: str | None = None) -> None:
    """`loraflow serve`: run `mlflow models serve` in the foreground; its exit code becomes ours.

    With `chat`, the server runs the chat flavour registered beside the version (chat completions:
    POST /invocations with {"messages": [...]}). SIGTERM or Ctrl+C stops the whole server (its own
    process group) before loraflow exits, so the port is free again.
    """
    model_uri = model_uri or default_model_uri(cfg)
    check_model_exists(model_uri, store)
    what, request = model_uri, "POST /invocations"
    if chat:
        model_uri = chat_model_uri(model_uri, store)
        what, request = f"the chat flavour of {what} ({model_uri})", 'POST /invocations with {"messages": [...]}'
    if dockerfile:
        folder = write_dockerfile(model_uri, store, dockerfile)
        say(f"wrote {folder}/Dockerfile and the model of {what}: `docker build -t NAME {folder}`, then "
            f"`docker run -p 5001:8080 NAME` ({request})")
        return
    say(f"serving {what} on http://{host}:{port} ({request})")
    process = start_server(model_uri, store, host, port, workers=workers, timeout=timeout)
    try:
        code = process.wait()
    finally:
        stop_server(process)  # Ctrl+C or SIGTERM: the server too; and its temp folder either way
    if code != 0:
        sys.exit(code)
