"""Where and when a served model generates: its own thread, micro-batches of encoded prompts, streams.

    engine = Engine(model, tokenizer)            # one per model in memory; several adapters may share it
    job = Job(encode=lambda: [[1, 2, 3]], settings=checked_params({}, 64), cfg=cfg, budget=60)
    engine.answer(job)                           # job.answers: the new token ids of each row
    run_in_turn(lock, started, budget, work, hint, thread)   # one request at a time (earlier chat flavours)

A server answers each request on a thread of its pool; `server_loop` gives that pool enough threads
that every concurrent request can wait for one micro-batch. Requests with the same batch_key (greedy,
one max_new_tokens and stop list, of versions on one base) share one batched generate call, in every
dtype, each row through its own version's adapter; a sampled or streamed request goes alone. A job's `cancelled` event stops its generation at the next
decode step (a streaming client that went away).
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from loraflow.config import Config
from loraflow.serving.requests import REQUEST_SECONDS_ENV, http_error, request_config

BATCH_WAIT_SECONDS = 0.02  # an idle model waits this long for concurrent requests to join a batch
MAX_BATCH_ROWS = 64  # prompts in one batched generate call (generation.generate splits it by eval.batch_size)
SERVER_LOOP_ENV = "UVICORN_LOOP"  # uvicorn reads its --loop option from here
POLL_SECONDS = 0.05  # how often a waiting request looks for its turn
MAX_WAITING_ROWS = 512  # prompts queued at once; beyond them a request is refused as busy at once

logger = logging.getLogger(__name__)


def server_loop() -> asyncio.AbstractEventLoop:
    """The scoring server's event loop, with a pool of MAX_BATCH_ROWS threads for predict calls.

    MLflow's scoring server runs each predict through asyncio.to_thread, in the loop's default pool of
    min(32, cpus + 4) threads (6 on 2 cores), so a micro-batch could hold no more requests than that: 8
    concurrent clients became a batch of 6 and then one of 2. The threads only wait for their batch.
    uvicorn takes it from $UVICORN_LOOP (set by server_env; `mlflow models serve` users can set it too)."""
    loop = asyncio.new_event_loop()
    loop.set_default_executor(ThreadPoolExecutor(max_workers=MAX_BATCH_ROWS, thread_name_prefix="loraflow-predict"))
    return loop


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


def busy(budget: float) -> MlflowException:
    """What a request that got no turn answers (503 on /invocations, 429 with Retry-After on the OpenAI routes)."""
    return MlflowException(f"the server is busy: no turn came within this request's budget of {budget:g} s "
                           f"(${REQUEST_SECONDS_ENV}); retry later", error_code=TEMPORARILY_UNAVAILABLE)


@dataclasses.dataclass(eq=False)
class Job:
    """One request to an Engine: how to encode its prompts, its settings, version and deadline; once run, the new
    token ids of each row or an error."""
    encode: Callable[[], list[list[int]]]  # run once, under the engine's lock (a fast tokenizer is not thread-safe)
    settings: dict  # requests.checked_params'
    cfg: Config  # the version's serving config
    budget: float
    adapter: str | None = None  # the PEFT adapter that answers (None: the model as it is)
    group: object = None  # requests of one group may share a batch (the version)
    stop: tuple[str, ...] = ()
    on_token: Callable[[int], None] | None = None  # a stream: called with each new token id (one row)
    started: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    rows: list[list[int]] | None = None
    answers: list[list[int]] | None = None
    error: Exception | None = None

    @property
    def deadline(self) -> float:
        return self.started + self.budget


class Engine:
    """One model in memory answering Jobs: one batch at a time (`lock`), always on the model's own thread
    (model_thread); the thread whose job is waiting when the model is free runs the next batch."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.lock = threading.Lock()  # held by the request thread whose batch runs
        self.thread = model_thread()
        self.queue_lock = threading.Lock()  # guards self.waiting
        self.tokenizer_lock = threading.Lock()  # a fast tokenizer is not safe across threads
        self.waiting: list[Job] = []  # jobs not yet taken into a batch, oldest first
        self.last_batch_seconds = 0.0
        self.cancelled_steps: list[int] = []  # for each cancelled stream: tokens it had when generation stopped
        self.mixed_batches = 0  # batches whose rows went through more than one adapter

    def answer(self, job: Job) -> list[list[int]]:
        """The new token ids of each of `job`'s rows; raises its error (400, 503 busy, 504, 500)."""
        with self.queue_lock:
            if sum(len(j.rows or ()) or 1 for j in self.waiting) >= MAX_WAITING_ROWS:
                raise busy(job.budget)
            self.waiting.append(job)
        self.wait_for_answers(job)
        if job.error is not None:
            raise job.error
        return job.answers

    def wait_for_answers(self, job: Job) -> None:
        """Until `job` is done: whenever the model is free, run the next batch (with this job in it unless another
        thread's batch took it). A job no batch took within its budget is busy; one taken is answered by the end of
        that batch, which stops at its members' earliest deadline."""
        while not job.done.is_set():
            if self.lock.acquire(timeout=max(0.0, min(POLL_SECONDS, job.deadline - time.monotonic()))):
                try:
                    batch = [] if job.done.is_set() else self.take_batch(job)
                    if batch:
                        self.run_batch(batch)
                finally:
                    self.lock.release()
            elif time.monotonic() >= job.deadline or job.cancelled.is_set():
                with self.queue_lock:
                    unanswered = job in self.waiting
                    if unanswered:
                        self.waiting.remove(job)
                if unanswered:
                    raise busy(job.budget)
                job.done.wait()

    def take_batch(self, leader: Job) -> list[Job]:
        """`leader` and the waiting jobs with its batch_key, oldest first, up to MAX_BATCH_ROWS prompts; taken off the
        queue. When the model was idle (no one else waiting) it first waits BATCH_WAIT_SECONDS for others."""
        if batch_key(leader) is not None and len(self.waiting) == 1:
            time.sleep(BATCH_WAIT_SECONDS)
        with self.queue_lock:
            others = [j for j in self.waiting if j is not leader]
            batch, key = ([leader], batch_key(leader)) if self.prepare(leader) else ([], None)
            rows = len(leader.rows or ())
            for job in others if key is not None else []:
                if not self.prepare(job):
                    continue  # its prompt cannot fit: it answers 400 alone (done below)
                if batch_key(job) == key and rows + len(job.rows) <= MAX_BATCH_ROWS:
                    batch.append(job)
                    rows += len(job.rows)
            failed = [j for j in [leader] + others if j.error is not None]
            self.waiting = [j for j in others if j.error is None and all(j is not m for m in batch)]
        for job in failed:
            job.done.set()
        return batch

    def prepare(self, job: Job) -> bool:
        """Encode `job`'s prompts, once; False, with the job's 400 error set, when one cannot fit."""
        with self.tokenizer_lock:
            if job.rows is None and job.error is None:
                try:
                    job.rows = job.encode()
                except MlflowException as exc:
                    job.error = exc
        return job.error is None

    @functools.cached_property
    def stop_ids(self) -> frozenset[int]:
        """The ids that end an answer (generation.stop_token_ids: the tokenizer's whole vocabulary is read once)."""
        from loraflow import generation

        with self.tokenizer_lock:
            return frozenset(generation.stop_token_ids(self.model, self.tokenizer))

    def decode(self, ids: list[int]) -> str:
        """Token ids as text, special tokens dropped (not stripped), safe beside other threads' encoding."""
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def run_batch(self, batch: list[Job]) -> None:
        """Answer every job of `batch` with one generate call (under the lock); each gets its answers or error."""
        try:
            logger.debug("one generate call for %d requests, %d prompts", len(batch), sum(len(j.rows) for j in batch))
            started = time.monotonic()
            try:
                answers = self.thread.submit(self.generate, batch).result()
            except Exception as exc:
                for job in batch:
                    job.error = http_error(exc, job.budget, "send fewer rows or a smaller max_tokens")
                return
            finally:
                self.last_batch_seconds = time.monotonic() - started
            start = 0
            for job in batch:
                job.answers, start = answers[start:start + len(job.rows)], start + len(job.rows)
        finally:
            for job in batch:
                job.done.set()

    def generate(self, batch: list[Job]) -> list[list[int]]:
        """The new ids of every row of `batch`, in order (on the model thread). One adapter: it is made the active
        one; several (versions on one base): each row goes through its own (PEFT's mixed-adapter batches)."""
        from loraflow import generation

        first = batch[0]
        adapters = {job.adapter for job in batch}
        per_row = None
        if len(adapters) > 1:
            per_row = [job.adapter for job in batch for _ in job.rows]
            self.mixed_batches += 1
        else:
            self.use_adapter(first.adapter)
        streamer = TokenStream(first.on_token) if first.on_token is not None else None
        stopping = [all_cancelled(batch, self.cancelled_steps, streamer)]
        return generation.generate_encoded(self.model, self.tokenizer, [row for job in batch for row in job.rows],
                                           request_config(first.cfg, first.settings), seed=first.settings["seed"],
                                           deadline=min(j.deadline for j in batch),
                                           stop_strings=list(first.stop) or None, stopping=stopping,
                                           streamer=streamer, adapter_names=per_row)

    def use_adapter(self, name: str | None) -> None:
        """Make `name` the PEFT model's active adapter (None: leave the model as it is)."""
        if name is not None and getattr(self.model, "active_adapter", name) != name:
            self.model.set_adapter(name)

    def add_adapter(self, adapter_dir: str, name: str) -> None:
        """Load another version's adapter beside those already on this model (on the model's thread, between
        batches): the base stays in memory once."""
        with self.lock:
            self.thread.submit(self.model.load_adapter, adapter_dir, adapter_name=name).result()
            self.model.eval()


def batch_key(job: Job):
    """Jobs with the same key share one generate call: greedy ones with the same max_new_tokens, stop strings and
    decoding settings (temperature, top_p and seed do not change a greedy answer), either of one group or, when
    each names an adapter of the engine's model, of any versions on it. A sampled job goes alone (its seed fixes
    its random stream), and so does a stream (its tokens go out as they come)."""
    if job.settings["do_sample"] or job.on_token is not None:
        return None
    decoding = (job.cfg.model.kind, job.cfg.eval.repetition_penalty, job.cfg.eval.batch_size)
    return (job.group if job.adapter is None else "adapters"), decoding, job.settings["max_new_tokens"], job.stop


class TokenStream:
    """A transformers streamer for a batch of one: every new token id to `on_token` (the prompt is skipped)."""

    def __init__(self, on_token: Callable[[int], None]):
        self.on_token, self.prompt_seen, self.tokens = on_token, False, 0

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.tokens += 1
            self.on_token(int(token))

    def end(self) -> None:
        pass


def all_cancelled(batch: list[Job], record: list[int], streamer: TokenStream | None):
    """A stopping criterion: generation ends at the next decode step once every job of `batch` is cancelled (what
    the streamer had sent by then goes to `record`)."""
    import torch
    from transformers import StoppingCriteria

    class AllCancelled(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            stop = all(job.cancelled.is_set() for job in batch)
            if stop:
                record.append(streamer.tokens if streamer is not None else -1)
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    return AllCancelled()
