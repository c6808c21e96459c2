"""Heartbeats: telling a run whose process was killed from one that is still running.

    with Heartbeat(run_id): ...      # refreshes loraflow.heartbeat every $LORAFLOW_HEARTBEAT_SECONDS
    reap_dead_runs(store.uri)        # RUNNING runs whose process is gone -> KILLED
"""
from __future__ import annotations

import contextlib
import os
import socket
import time

import mlflow

from loraflow.tracking.names import Tags


def heartbeat_seconds() -> float:
    return float(os.environ.get("LORAFLOW_HEARTBEAT_SECONDS", "10"))


class Heartbeat:
    """Refreshes the run's heartbeat tag every few seconds from a daemon thread while the stage runs."""

    def __init__(self, run_id: str):
        import threading

        self.run_id, self.stopped = run_id, threading.Event()
        self.thread = threading.Thread(target=self.beat, name=f"heartbeat-{run_id[:8]}", daemon=True)

    def beat(self):
        client = mlflow.MlflowClient()
        while not self.stopped.wait(heartbeat_seconds()):
            with contextlib.suppress(Exception):  # a busy store misses one beat, not the run
                client.set_tag(self.run_id, Tags.HEARTBEAT, f"{time.time():.0f}")

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def is_dead(run, now: float) -> bool:
    """A RUNNING run whose process is gone: on this host, its pid no longer exists; elsewhere, its heartbeat
    has been silent for LORAFLOW_STALE_SECONDS (default 30 heartbeats)."""
    tags = run.data.tags
    if Tags.HEARTBEAT not in tags:
        return False  # not started by a loraflow that beats: leave it alone
    if tags.get(Tags.HOST) == socket.gethostname() and tags.get(Tags.PID, "").isdigit():
        return not process_alive(int(tags[Tags.PID]))
    stale = float(os.environ.get("LORAFLOW_STALE_SECONDS", 30 * heartbeat_seconds()))
    return now - float(tags[Tags.HEARTBEAT]) > stale


def reap_dead_runs(uri: str) -> list[str]:
    """Mark RUNNING loraflow runs whose process died (kill -9, out of memory) KILLED; say so; return their ids."""
    client = mlflow.MlflowClient(uri)
    try:
        experiments = [e.experiment_id for e in client.search_experiments()]
        running = client.search_runs(experiments, "attributes.status = 'RUNNING'", max_results=1000) \
            if experiments else []
    except mlflow.exceptions.MlflowException:
        return []
    now, reaped = time.time(), []
    for run in running:
        if is_dead(run, now):
            client.set_tag(run.info.run_id, Tags.ERROR, "its process died without ending the run (killed?)")
            client.set_terminated(run.info.run_id, "KILLED")
            reaped.append(run.info.run_id)
    if reaped:
        from loraflow import say

        say(f"marked {len(reaped)} run(s) whose process died as KILLED: {', '.join(reaped)}")
    return reaped
