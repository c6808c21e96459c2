"""The chat flavour of a registered loraflow model: OpenAI-style chat completions (MLflow's ChatModel).

    loraflow serve quickstart --chat
    curl -s localhost:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Oak desk"}], "max_tokens": 64, "temperature": 0}'

MLflow loads this file (models from code, like served_model.py); pyfunc.log_chat_model logs it
with the same merged folder and saved settings as the TextGenerator. A request maps to generation
as follows:
- messages: text content with the roles system, user and assistant, the last one the user's. Without
  a system message the project's data.system_prompt (if any) leads, as in training; so a single
  user message gets exactly the prompt training and the TextGenerator build for it. The
  conversation is rendered by the tokenizer's chat template with the assistant's turn opened, after
  at most one bos (generation.chat_token_ids).
- a conversation longer than the context (less max_tokens) loses its oldest turns first (a turn: a
  user message and the replies after it; leading system messages stay); the last user message
  alone is cut from the left, as the TextGenerator cuts a prompt.
- max_tokens: 1 to registry.max_new_tokens_cap (default: the project's eval.max_new_tokens, capped);
  temperature 0 is greedy, above 0 samples with top_p (OpenAI's default temperature is 1: send 0
  for the greedy answer); the seed is custom_inputs.seed (0 to 2**32 - 1, default 0) because
  MLflow's chat schema drops a top-level `seed`; stop: up to 4 strings, cut from the answer.
- n other than 1, stream, tools, top_k and non-zero penalties are HTTP 400, as is any bound; the
  request's budget, the lock and the 503 / 504 / 500 answers are the TextGenerator's (text_model.py, requests.py).
- the answer: one choice, finish_reason "length" when max_tokens ran out first, else "stop"; usage
  counts the rendered prompt's tokens and the generated ones (the end-of-turn token included).
"""
from __future__ import annotations

import threading
import time
import uuid
import warnings

import mlflow
from mlflow.types.llm import ChatChoice, ChatCompletionResponse, ChatMessage, ChatParams, TokenUsageStats

from loraflow.serving.batching import model_thread, run_in_turn
from loraflow.serving.requests import (checked_params, context_length, cut_from_left, invalid, request_budget,
                                       request_config)
from loraflow.serving.text_model import LOADED, load_served_model

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 256  # messages per request
MAX_STOP_STRINGS = 4  # as OpenAI's API


def checked_messages(messages: list[ChatMessage], system_prompt: str) -> list[dict]:
    """The conversation as template messages ({"role", "content"}); 400 for what cannot be rendered."""
    if not messages:
        raise invalid("the request needs at least one message in 'messages'")
    if len(messages) > MAX_MESSAGES:
        raise invalid(f"at most {MAX_MESSAGES} messages per request, got {len(messages)}")
    for number, message in enumerate(messages, 1):
        if message.role not in ROLES:
            raise invalid(f"message {number}: role must be one of {', '.join(ROLES)}, got {message.role!r}")
        if message.tool_calls or not isinstance(message.content, str):
            raise invalid(f"message {number}: only text content is supported (a string; no tool calls)")
    if messages[-1].role != "user":
        raise invalid(f"the last message must be the user's, got {messages[-1].role!r}")
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    if system_prompt and not any(m["role"] == "system" for m in conversation):
        conversation.insert(0, {"role": "system", "content": system_prompt})
    return conversation


def checked_settings(params: ChatParams, default_max_tokens: int, cap: int) -> dict:
    """requests.checked_params' settings from the chat params (max_tokens, temperature, top_p, seed); 400 otherwise."""
    unsupported = {"n": params.n != 1, "stream": params.stream, "tools": bool(params.tools),
                   "top_k": params.top_k is not None, "frequency_penalty": bool(params.frequency_penalty),
                   "presence_penalty": bool(params.presence_penalty)}
    if any(unsupported.values()):
        names = ", ".join(name for name, found in unsupported.items() if found)
        raise invalid(f"not supported: {names} (one answer per request, no streaming, tools, top_k or penalties)")
    max_tokens = default_max_tokens if params.max_tokens is None else params.max_tokens
    if isinstance(max_tokens, bool) or not 1 <= max_tokens <= cap:
        raise invalid(f"max_tokens must be between 1 and {cap}, got {max_tokens}")
    seed = (params.custom_inputs or {}).get("seed", 0)
    return checked_params({"max_new_tokens": max_tokens, "temperature": params.temperature,
                                   "top_p": 1.0 if params.top_p is None else params.top_p,
                                   "do_sample": params.temperature > 0, "seed": seed}, cap)


def checked_stop(stop: list[str] | None) -> list[str]:
    """The stop strings (none: []); 400 for more than OpenAI takes or an empty one."""
    stop = stop or []
    if len(stop) > MAX_STOP_STRINGS or not all(stop):
        raise invalid(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings, got {stop!r:.200}")
    return stop


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

    fitted = cut_from_left(tokenizer, turns[-1][-1]["content"], room,
                                   lambda text: len(render(with_last(text))))
    if fitted is None:
        raise invalid(f"no room for the conversation: the model reads {room} tokens besides the answer and the "
                      "system messages and chat format alone take more; lower max_tokens")
    return render(with_last(fitted))


def answer_of(tokenizer, new_ids: list[int], stop_ids: list[int], stop: list[str], max_tokens: int):
    """(the answer text, finish_reason): decoded as generation.generate does, cut at the first stop string."""
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    cuts = [text.find(s) for s in stop if s in text]
    if cuts:
        return text[:min(cuts)].strip(), "stop"
    ended = bool(new_ids) and new_ids[-1] in stop_ids
    return text.strip(), "length" if len(new_ids) >= max_tokens and not ended else "stop"


class ChatGenerator(mlflow.pyfunc.ChatModel):
    """A merged causal model answering chat completions (one choice); see the module docstring."""

    def load_context(self, context):
        from loraflow import generation

        self.cfg, self.model, self.tokenizer = load_served_model(context)
        LOADED.add(self)
        self.context_tokens = context_length(self.model, self.tokenizer)
        self.stop_ids = generation.stop_token_ids(self.model, self.tokenizer)
        self.lock = threading.Lock()
        self.thread = model_thread()

    def predict(self, context, messages: list[ChatMessage], params: ChatParams) -> ChatCompletionResponse:
        started = time.monotonic()
        budget = request_budget()
        cap = self.cfg.registry.max_new_tokens_cap
        conversation = checked_messages(messages, self.cfg.data.system_prompt)
        settings = checked_settings(params, min(self.cfg.eval.max_new_tokens, cap), cap)
        stop = checked_stop(params.stop)
        return run_in_turn(self.lock, started, budget,
                                   lambda deadline: self.complete(conversation, settings, stop, deadline),
                                   hint="send a smaller max_tokens", thread=self.thread)

    def complete(self, conversation: list[dict], settings: dict, stop: list[str], deadline: float):
        """The response, under the lock (the tokenizer is not safe across threads)."""
        from loraflow import generation

        max_tokens = settings["max_new_tokens"]
        room = None if self.context_tokens is None else self.context_tokens - max_tokens
        prompt_ids = fit_conversation(self.tokenizer, conversation, room)
        new_ids = generation.generate_from_ids(self.model, self.tokenizer, prompt_ids,
                                               request_config(self.cfg, settings), seed=settings["seed"],
                                               deadline=deadline, stop_strings=stop or None)
        text, finish_reason = answer_of(self.tokenizer, new_ids, self.stop_ids, stop, max_tokens)
        return ChatCompletionResponse(
            choices=[ChatChoice(index=0, message=ChatMessage(role="assistant", content=text),
                                finish_reason=finish_reason)],
            usage=TokenUsageStats(prompt_tokens=len(prompt_ids), completion_tokens=len(new_ids),
                                  total_tokens=len(prompt_ids) + len(new_ids)),
            id=f"chatcmpl-{uuid.uuid4().hex}", model=self.cfg.model_name)


with warnings.catch_warnings():
    # MLflow 3 deprecates ChatModel for ResponsesAgent, which speaks OpenAI's Responses API; this flavour
    # exists to speak chat completions, which only ChatModel does, so the notice would only mislead.
    warnings.filterwarnings("ignore", message=".*ChatModel.* is deprecated", category=FutureWarning)
    chat_generator = ChatGenerator()
mlflow.models.set_model(chat_generator)
