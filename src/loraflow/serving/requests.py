"""What a served model takes and answers: every request bounded, every failure an HTTP status.

    settings = checked_params(params, cap)           # defaults filled in; 400 for out-of-range values
    prompt = fit_prompt(tokenizer, prompt, room, cfg)  # cut from the left to the context

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

import dataclasses
import logging
import math
import numbers
import os

import pandas as pd  # mlflow.pyfunc has imported it already
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INTERNAL_ERROR, INVALID_PARAMETER_VALUE

from loraflow.config import Config

GENERATION_DEFAULTS = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 1.0, "do_sample": False, "seed": 0}
PARAM_TYPES = {"max_new_tokens": "long", "temperature": "double", "top_p": "double", "do_sample": "boolean",
               "seed": "long"}
MAX_ROWS = 64  # prompt rows per request
MAX_SEED = 2**32 - 1  # numpy's seed range, which transformers.set_seed goes through
REQUEST_SECONDS_ENV = "LORAFLOW_REQUEST_SECONDS"
API_KEY_ENV = "LORAFLOW_API_KEY"  # the server's bearer key (serving.app)
SERVER_TIMEOUT_MARGIN_SECONDS = 5  # the budget ends this long before the scoring server's timeout
UNSET_MODEL_MAX_LENGTH = 10**9  # tokenizers without a limit report int(1e30)

logger = logging.getLogger(__name__)


def invalid(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400."""
    return MlflowException.invalid_parameter_value(message)


class NoRoom(MlflowException):
    """HTTP 400: the prompt's format alone, or max_tokens, leaves no room in the context (OpenAI's
    context_length_exceeded)."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


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
        raise NoRoom(f"no room for the prompt: the model reads {room} tokens besides the answer "
                      "and the prompt format alone takes more; lower max_new_tokens")
    return fitted


def turns_of(conversation: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """(the leading system messages, the turns): a turn starts at each user message."""
    lead = 0
    while conversation[lead]["role"] == "system":
        lead += 1
    turns: list[list[dict]] = []
    for message in conversation[lead:]:
        if message["role"] == "user" or not turns:
            turns.append([])
        turns[-1].append(message)
    return conversation[:lead], turns


def fit_conversation(tokenizer, conversation: list[dict], room: int | None) -> list[int]:
    """The conversation's prompt ids, at most `room` of them: the oldest turns go first, then the last
    user message is cut from the left; 400 when the rest alone takes more."""
    from jinja2 import TemplateError

    from loraflow import generation

    def render(messages: list[dict]) -> list[int]:
        try:
            return generation.chat_token_ids(tokenizer, messages)
        except TemplateError as exc:  # e.g. a template's raise_exception('roles must alternate')
            raise invalid(f"the chat template refused the conversation: {str(exc).splitlines()[0][:200]}") from None

    system, turns = turns_of(conversation)
    ids = render(conversation)
    while room is not None and len(ids) > room and len(turns) > 1:
        turns = turns[1:]
        ids = render(system + [m for turn in turns for m in turn])
    if room is None or len(ids) <= room:
        return ids
    # One turn is left, and it is the last user message alone (the conversation ends with it).
    def with_last(text: str) -> list[dict]:
        return system + [{"role": "user", "content": text}]

    fitted = cut_from_left(tokenizer, turns[-1][-1]["content"], room, lambda text: len(render(with_last(text))))
    if fitted is None:
        raise NoRoom(f"no room for the conversation: the model reads {room} tokens besides the answer and the "
                      "system messages and chat format alone take more; lower max_tokens")
    return render(with_last(fitted))


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
