"""The OpenAI API over the served versions: /v1/models, /v1/chat/completions, /v1/completions.

    client = openai.OpenAI(base_url="http://127.0.0.1:5001/v1", api_key="KEY or anything")
    client.chat.completions.create(model="quickstart", messages=[{"role": "user", "content": "Oak desk"}])
    client.completions.create(model="quickstart/3", prompt="Title: Oak desk\nDescription:", stream=True)

`model` is NAME (the version @champion names now), NAME@ALIAS or NAME/VERSION; the answer names the
version that answered in `system_fingerprint` as NAME/VERSION. A request maps to generation thus:
- chat: text messages with the roles system (or developer), user and assistant, the last one the
  user's; without a system message the project's data.system_prompt leads, as in training. The
  conversation goes through the tokenizer's chat template (generation.chat_token_ids); one longer
  than the context less max_tokens loses its oldest turns, then the last message is cut from the
  left. A project trained on plain prompts (data.chat_template off, seq2seq) takes one user message,
  formatted as in training: the answer /invocations gives for that prompt.
- completions: the prompt as it is (one string), tokenised with the tokenizer's special tokens; cut
  from the left when too long. `usage` counts what was used.
- max_tokens (or max_completion_tokens): 1 to registry.max_new_tokens_cap, default the project's
  eval.max_new_tokens; temperature (default 1, as OpenAI's: send 0 for the greedy answer) and top_p;
  seed (default 0); stop: up to 4 strings; n = 1; stream (stream_options.include_usage adds a usage
  chunk). Anything else OpenAI takes but loraflow cannot honour (tools, logprobs, penalties, n > 1)
  is a 400 naming it; unknown keys are a 400 too, as OpenAI's.
- errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 invalid_request_error
  (code context_length_exceeded when max_tokens alone leaves no room), 401 (app.py), 404
  model_not_found, 429 with Retry-After when no turn came within the budget, 504 past it, 500.
A stream is server-sent events of OpenAI's chunks, ending with `data: [DONE]`; a client that goes
away stops its generation at the next decode step.
"""
from __future__ import annotations

import asyncio
import json
import math
import time
import uuid

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, TEMPORARILY_UNAVAILABLE, ErrorCode

from loraflow.serving.batching import Job
from loraflow.serving.requests import (NoRoom, checked_params, cut_from_left, fit_conversation, fit_prompt,
                                       request_budget)
from loraflow.serving.versions import UnknownModel, Version

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 256
MAX_STOP_STRINGS = 4  # as OpenAI's API
COMMON_KEYS = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options",
               "user", "logprobs", "frequency_penalty", "presence_penalty", "metadata", "store", "logit_bias"}
CHAT_KEYS = COMMON_KEYS | {"messages", "max_completion_tokens", "tools", "tool_choice", "parallel_tool_calls",
                           "response_format", "top_logprobs"}
COMPLETION_KEYS = COMMON_KEYS | {"prompt", "echo", "best_of", "suffix"}
IGNORED = {"user", "metadata", "store"}  # accepted and ignored, as by OpenAI's own models


class ApiError(Exception):
    """An OpenAI-shaped error answer."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def from_mlflow(exc: MlflowException, retry_after: float) -> ApiError:
    """The OpenAI error for what the engine raised (400 bounds, 429 busy, 504 past the budget, 500)."""
    code = ErrorCode.Value(exc.error_code) if isinstance(exc.error_code, str) else exc.error_code
    if isinstance(exc, NoRoom):
        return bad(exc.message, "max_tokens", "context_length_exceeded")
    if code == TEMPORARILY_UNAVAILABLE:
        return ApiError(429, exc.message, "rate_limit_error", "server_busy",
                        headers={"Retry-After": str(max(1, math.ceil(retry_after)))})
    if code == DEADLINE_EXCEEDED:
        return ApiError(504, exc.message, "timeout", "timeout")
    if exc.get_http_status_code() >= 500:
        return ApiError(500, exc.message, "server_error", "server_error")
    return bad(exc.message)


# --- the request ------------------------------------------------------------------------------------------------
def checked_keys(body: dict, allowed: set) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise bad(f"Unrecognized request argument supplied: {', '.join(unknown)}", unknown[0])
    for name in ("response_format", "stream_options"):
        if body.get(name) is not None and not isinstance(body[name], dict):
            raise bad(f"{name} must be an object, got {body[name]!r:.50}", name)
    refused = {"tools": bool(body.get("tools")), "logprobs": bool(body.get("logprobs")),
               "top_logprobs": bool(body.get("top_logprobs")), "echo": bool(body.get("echo")),
               "frequency_penalty": bool(body.get("frequency_penalty")), "suffix": bool(body.get("suffix")),
               "presence_penalty": bool(body.get("presence_penalty")), "logit_bias": bool(body.get("logit_bias")),
               "best_of": body.get("best_of") not in (None, 1), "n": body.get("n") not in (None, 1),
               "response_format": (body.get("response_format") or {"type": "text"}).get("type") != "text"}
    for name, found in refused.items():
        if found:
            raise bad(f"{name} is not supported by this server (one text answer per request: n = 1, no tools, "
                      "logprobs, penalties or response formats)", name)


def number(body: dict, name: str, default, kind=float):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise bad(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r:.50}", name)
    return value


def generation_settings(body: dict, version: Version) -> dict:
    """requests.checked_params' settings of an OpenAI request, with its bounds as 400s naming the parameter."""
    cap = version.cfg.registry.max_new_tokens_cap
    max_tokens = number(body, "max_completion_tokens", None, int)
    max_tokens = number(body, "max_tokens", min(version.cfg.eval.max_new_tokens, cap), int) if max_tokens is None \
        else max_tokens
    temperature = number(body, "temperature", 1.0)
    if not 0 <= temperature <= 2:
        raise bad(f"temperature must be between 0 and 2, got {temperature}", "temperature")
    context = version.context_tokens
    if context is not None and version.cfg.model.kind == "causal" and max_tokens >= context:
        raise bad(f"max_tokens ({max_tokens}) alone fills this model's context of {context} tokens: lower it",
                  "max_tokens", "context_length_exceeded")
    if not 1 <= max_tokens <= cap:
        raise bad(f"max_tokens must be between 1 and {cap}, got {max_tokens}", "max_tokens")
    try:
        return checked_params({"max_new_tokens": max_tokens, "temperature": temperature,
                               "top_p": number(body, "top_p", 1.0), "do_sample": temperature > 0,
                               "seed": number(body, "seed", 0, int)}, cap)
    except MlflowException as exc:
        raise bad(exc.message) from None


def checked_stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(s, str) and s for s in stop):
        raise bad(f"stop takes a string or at most {MAX_STOP_STRINGS} non-empty strings, got {stop!r:.200}", "stop")
    return tuple(stop)


def checked_messages(body: dict, system_prompt: str | None) -> list[dict]:
    """The conversation as template messages ({"role", "content"}); 400 for what cannot be rendered."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of messages", "messages")
    if len(messages) > MAX_MESSAGES:
        raise bad(f"at most {MAX_MESSAGES} messages per request, got {len(messages)}", "messages")
    conversation = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # OpenAI's content parts: text ones only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise bad(f"messages[{index}]: only text content is supported", f"messages[{index}].content")
            content = "".join(str(p.get("text", "")) for p in content)
        role = "system" if role == "developer" else role
        if role not in ROLES or not isinstance(content, str):
            raise bad(f"messages[{index}] needs a role ({', '.join(ROLES)}) and text content", f"messages[{index}]")
        conversation.append({"role": role, "content": content})
    if conversation[-1]["role"] != "user":
        raise bad(f"the last message must be the user's, got {conversation[-1]['role']!r}", "messages")
    if system_prompt and not any(m["role"] == "system" for m in conversation):
        conversation.insert(0, {"role": "system", "content": system_prompt})
    return conversation


def prompt_encoder(body: dict, version: Version, chat: bool, max_tokens: int):
    """What the engine runs under its tokenizer lock: the prompt's ids, fitted to the context."""
    tokenizer = version.engine.tokenizer
    context = version.context_tokens
    room = None if context is None else context - (max_tokens if version.cfg.model.kind == "causal" else 0)
    if chat:
        from loraflow import data, generation

        conversation = checked_messages(body, version.cfg.data.system_prompt)
        if data.uses_chat_template(tokenizer, version.cfg):
            return lambda: [fit_conversation(tokenizer, conversation, room)]
        said = [m for m in conversation if m["role"] != "system" or m["content"] != version.cfg.data.system_prompt]
        if len(said) != 1:  # trained on plain prompts: one user message is one prompt, as /invocations takes it
            raise bad(f"{version.id} was trained on plain prompts, not a chat template: send one user message "
                      "(it is formatted as in training) or use /v1/completions", "messages")
        cfg = version.cfg
        fit = (lambda text: text) if room is None else (lambda text: fit_prompt(tokenizer, text, room, cfg))
        return lambda: generation.encode_prompts(tokenizer, [fit(said[0]["content"])], cfg)
    prompt = body.get("prompt")
    prompt = prompt[0] if isinstance(prompt, list) and len(prompt) == 1 else prompt
    if not isinstance(prompt, str):
        raise bad("'prompt' must be a string (one prompt per request)", "prompt")

    def encode() -> list[list[int]]:
        def length(text: str) -> int:
            return len(tokenizer(text)["input_ids"])
        fitted = prompt if room is None else cut_from_left(tokenizer, prompt, room, length)
        if fitted is None:
            raise NoRoom(f"no room for the prompt: the model reads {room} tokens besides the answer; lower max_tokens")
        return [tokenizer(fitted)["input_ids"]]
    return encode


def job_of(body: dict, version: Version, chat: bool) -> Job:
    """The engine's job for an OpenAI request (400 for a bad one)."""
    checked_keys(body, CHAT_KEYS if chat else COMPLETION_KEYS)
    settings = generation_settings(body, version)
    return Job(encode=prompt_encoder(body, version, chat, settings["max_new_tokens"]), settings=settings,
               cfg=version.cfg, budget=request_budget(), adapter=version.adapter, group=version.id,
               stop=checked_stop(body))


# --- the answer -------------------------------------------------------------------------------------------------
class AnswerText:
    """An answer's text as it grows: what may be sent so far (not a possible start of a stop string, not trailing
    whitespace, no half character) and, at the end, the whole answer and why it ended."""

    def __init__(self, version: Version, stop: tuple[str, ...]):
        self.version, self.stop, self.ids, self.sent = version, stop, [], ""
        self.stop_ids = version.engine.stop_ids

    def text(self) -> tuple[str, bool]:
        """(the answer so far, cut at the first stop string; whether one was found)."""
        text = self.version.engine.decode(self.ids).lstrip()
        cuts = [text.find(s) for s in self.stop if s in text]
        return (text[:min(cuts)], True) if cuts else (text, False)

    def add(self, token: int) -> str:
        self.ids.append(token)
        text, _ = self.text()
        safe = text.rstrip()
        if safe.endswith("\ufffd"):
            return ""
        held = max((k for s in self.stop for k in range(1, len(s)) if safe.endswith(s[:k])), default=0)
        safe = safe[:len(safe) - held]
        if not safe.startswith(self.sent):
            return ""
        delta, self.sent = safe[len(self.sent):], safe
        return delta

    def finish(self, ids: list[int], max_tokens: int) -> tuple[str, str, str]:
        """(the whole answer, what is left to send of it, finish_reason)."""
        self.ids = list(ids)
        text, stopped = self.text()
        text = text.strip()
        ended = stopped or (bool(ids) and ids[-1] in self.stop_ids)
        reason = "length" if len(ids) >= max_tokens and not ended else "stop"
        return text, text[len(self.sent):] if text.startswith(self.sent) else "", reason


def usage(job: Job, ids: list[int]) -> dict:
    prompt = len(job.rows[0]) if job.rows else 0
    return {"prompt_tokens": prompt, "completion_tokens": len(ids), "total_tokens": prompt + len(ids)}


def envelope(model_id: str, version: Version, chat: bool, chunk: bool, request_id: str, created: int) -> dict:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    return {"id": request_id, "object": kind, "created": created, "model": model_id,
            "system_fingerprint": version.id}


def choice(chat: bool, text: str | None, reason: str | None, chunk: bool, first: bool = False) -> dict:
    if not chat:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
    if chunk:
        delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
    return {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None}, "logprobs": None,
            "finish_reason": reason}


async def complete(body: dict, model_id: str, version: Version, chat: bool) -> dict:
    """A whole (not streamed) answer."""
    job = job_of(body, version, chat)
    engine = version.engine
    try:
        ids = (await asyncio.to_thread(engine.answer, job))[0]
    except MlflowException as exc:
        raise from_mlflow(exc, engine.last_batch_seconds) from None
    finally:
        job.cancelled.set()
    text, _, reason = AnswerText(version, job.stop).finish(ids, job.settings["max_new_tokens"])
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    return {**envelope(model_id, version, chat, False, request_id, int(time.time())),
            "choices": [choice(chat, text, reason, False)], "usage": usage(job, ids)}


def sse(data) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def prepared_stream(body: dict, model_id: str, version: Version, chat: bool):
    """The job of a streamed answer, encoded before the stream opens (so its 400s are plain answers), and the
    events that answer it."""
    job = job_of(body, version, chat)
    engine = version.engine
    await asyncio.to_thread(engine.prepare, job)
    if job.error is not None:
        raise from_mlflow(job.error, engine.last_batch_seconds)
    return stream_events(body, model_id, version, chat, job)


async def stream_events(body: dict, model_id: str, version: Version, chat: bool, job: Job):
    """Server-sent events: a chunk per piece of text as tokens come, the finish_reason, usage if asked, [DONE]."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    job.on_token = lambda token: loop.call_soon_threadsafe(queue.put_nowait, ("token", token))
    answer = AnswerText(version, job.stop)
    request_id, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
    head = envelope(model_id, version, chat, True, request_id, created)

    def run() -> None:
        try:
            result = ("done", version.engine.answer(job)[0])
        except Exception as exc:  # noqa: BLE001 - it goes to the client as an error event
            result = ("error", exc)
        loop.call_soon_threadsafe(queue.put_nowait, result)

    worker = loop.run_in_executor(None, run)
    try:
        if chat:
            yield sse({**head, "choices": [choice(chat, None, None, True, first=True)]})
        while True:
            kind, value = await queue.get()
            if kind == "token":
                delta = answer.add(value)
                if delta:
                    yield sse({**head, "choices": [choice(chat, delta, None, True)]})
                continue
            if kind == "error":
                error = from_mlflow(value, 0) if isinstance(value, MlflowException) else \
                    ApiError(500, f"generation failed ({type(value).__name__})", "server_error", "server_error")
                yield sse(error.body())
                break
            _, rest, reason = answer.finish(value, job.settings["max_new_tokens"])
            yield sse({**head, "choices": [choice(chat, rest, reason, True)]})
            if (body.get("stream_options") or {}).get("include_usage"):
                yield sse({**head, "choices": [], "usage": usage(job, value)})
            break
        yield sse("[DONE]")
    finally:
        job.cancelled.set()  # a client gone mid-answer: the model stops at its next decode step
        worker.cancel()  # only drops the future: the model's thread ends the job itself


def resolve(versions, body: dict) -> tuple[str, Version]:
    model_id = body.get("model")
    if not isinstance(model_id, str) or not model_id:
        raise bad("'model' is required: NAME, NAME@ALIAS or NAME/VERSION (GET /v1/models lists them)", "model")
    try:
        return model_id, versions.resolve(model_id)
    except UnknownModel as exc:
        raise ApiError(404, str(exc), code="model_not_found", param="model") from None


def model_list(versions) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": version.created,
                                        "owned_by": "loraflow"} for model_id, version in versions.model_ids()]}
