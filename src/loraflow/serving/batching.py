"""Where and when a served model generates: its own thread, one request at a time or a micro-batch.

    thread = model_thread()                      # every generate call of a served model runs here
    run_in_turn(lock, started, budget, work, hint, thread)   # one request at a time (the chat flavour)

MLflow's scoring server answers each request on a thread of its pool; `server_loop` gives that pool
enough threads that every concurrent request can wait for one micro-batch (TextGenerator).
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from loraflow.serving.requests import REQUEST_SECONDS_ENV, http_error

BATCH_WAIT_SECONDS = 0.02  # an idle model waits this long for concurrent requests to join a batch
MAX_BATCH_ROWS = 64  # prompts in one batched generate call (generation.generate splits it by eval.batch_size)
SERVER_LOOP_ENV = "UVICORN_LOOP"  # uvicorn reads its --loop option from here
POLL_SECONDS = 0.05  # how often a waiting request looks for its turn


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
