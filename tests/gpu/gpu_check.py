"""The check `make gpu-check` runs on a CUDA machine: the `gpu` tests, then the quickstart in nf4 through train,
evaluate, register and one served request, each step's wall time and peak GPU memory printed.

    .venv/bin/python tests/gpu/gpu_check.py             # what `make gpu-check` runs after `make setup`
    .venv/bin/python tests/gpu/gpu_check.py --dry-run   # the plan only: runs nothing, needs no GPU

Each step is a process of its own, so its peak is its own: while it runs, a thread reads nvidia-smi's memory.used
every 0.5 s and keeps the highest (of the busiest GPU, device-wide: other processes on the GPU count too, so the
figure before the step is printed beside it). The stages run in a new folder under outputs/gpu-check/ with a store
of their own (mlruns_config/local.yaml puts it in that folder's .mlruns), never the user's runs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROJECT = "quickstart"
SETTINGS = ["--set", "model.quantization=nf4", "--set", "train.max_steps=40"]
PROMPT = "Write a product description for: Oak desk lamp"
POLL_SECONDS = 0.5
SERVER_READY_SECONDS = 600


@dataclass
class Step:
    name: str
    command: list[str]
    cwd: Path
    serves: bool = False  # a server: started, asked one request, stopped


def plan(work: Path, loraflow: str, port: int) -> list[Step]:
    """The steps in order; the stages get the same settings, so each finds the runs of the one before."""
    return [Step("gpu tests", [sys.executable, "-m", "pytest", "-m", "gpu", "tests/gpu", "-q"], REPO),
            Step("train", [loraflow, "train", PROJECT, *SETTINGS], work),
            Step("evaluate", [loraflow, "evaluate", PROJECT, *SETTINGS], work),
            # forced: the check is that registering runs on the GPU, whatever the gate decides of 40 steps
            Step("register", [loraflow, "register", PROJECT, *SETTINGS, "--force", "true"], work),
            Step("serve", [loraflow, "serve", PROJECT, *SETTINGS, "--port", str(port)], work, serves=True)]


def gpu_problem() -> str | None:
    """Why this machine cannot run the check (no NVIDIA driver, or a torch that sees no CUDA GPU), else None."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found: no NVIDIA driver on this machine"
    try:
        import torch
    except ImportError:
        return f"torch is not installed in {sys.executable} (make setup installs it)"
    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} sees no CUDA GPU (a CPU build, or CUDA_VISIBLE_DEVICES hides them): "
                "install a CUDA build of torch into .venv first")
    return None


def gpu_memory_mib() -> int | None:
    """memory.used of the busiest GPU, in MiB (None where nvidia-smi does not answer)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return max(int(line) for line in out.split())
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None


class PeakMemory:
    """`with PeakMemory() as memory:` polls gpu_memory_mib in a thread; memory.before and memory.peak after."""

    def __enter__(self):
        self.before = gpu_memory_mib()
        self.peak = self.before or 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()
        return self

    def poll(self):
        while not self.done.wait(POLL_SECONDS):
            self.peak = max(self.peak, gpu_memory_mib() or 0)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, gpu_memory_mib() or 0)


def serve_one_request(process: subprocess.Popen, port: int) -> str:
    """Wait for the server to answer /ping, then POST PROMPT to /invocations; the answer."""
    import json

    from loraflow import LoraflowError
    from loraflow.serving.server import wait_until_ready  # imports mlflow: only when a server is checked

    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, SERVER_READY_SECONDS, process, POLL_SECONDS)
    except LoraflowError as exc:  # a failed step, as run_step reports every other
        raise RuntimeError(str(exc)) from None
    payload = {"dataframe_records": [{"prompt": PROMPT}], "params": {"max_new_tokens": 32}}
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())["predictions"][0]


def stop(process: subprocess.Popen) -> None:
    """SIGTERM `loraflow serve`, which stops its server's process group; kill its own group after 30 s."""
    if process.poll() is None:
        print("gpu-check: stopping the server (its `error: terminated by SIGTERM` is expected)", flush=True)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_step(step: Step, env: dict, port: int) -> str:
    """Run `step` to its end; what it answered (serve) or ''. RuntimeError when it fails."""
    process = subprocess.Popen(step.command, cwd=step.cwd, env=env, start_new_session=step.serves)
    if not step.serves:
        if process.wait() != 0:
            raise RuntimeError(f"exited with code {process.returncode}")
        return ""
    try:
        return serve_one_request(process, port)
    except (OSError, urllib.error.HTTPError) as exc:
        raise RuntimeError(f"the request failed: {exc}") from None
    finally:
        stop(process)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan; run nothing, check no GPU")
    args = parser.parse_args(argv)
    work = REPO / "outputs" / "gpu-check" / time.strftime("%Y%m%d-%H%M%S")
    loraflow = str(Path(sys.executable).with_name("loraflow"))
    port = free_port()
    steps = plan(work, loraflow, port)
    print(f"gpu-check: {len(steps)} steps; the stages run in {work} (a store of their own)")
    for number, step in enumerate(steps, 1):
        extra = f"; then POST one prompt to http://127.0.0.1:{port}/invocations and stop it" if step.serves else ""
        print(f"  {number}. {step.name}: {' '.join(step.command)}  (in {step.cwd}{extra})")
    if args.dry_run:
        return 0
    problem = gpu_problem()
    if problem:
        print(f"error: gpu-check needs a CUDA GPU: {problem}", file=sys.stderr)
        return 1
    work.mkdir(parents=True)
    elsewhere = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")
    env = {key: value for key, value in os.environ.items() if key not in elsewhere}  # the work folder's store
    results = []
    for step in steps:
        print(f"gpu-check: {step.name} ...", flush=True)
        started = time.perf_counter()
        with PeakMemory() as memory:
            try:
                answer = run_step(step, env, port)
            except RuntimeError as exc:
                print(f"error: gpu-check step {step.name!r} failed: {exc} (its output is above)", file=sys.stderr)
                return 1
        results.append((step.name, time.perf_counter() - started, memory.before, memory.peak))
        if answer:
            print(f"gpu-check: served answer: {answer!r}")
    print(f"\n{'step':<10} {'wall s':>8} {'peak GPU MiB':>13} {'before':>8}")
    for name, seconds, before, peak in results:
        print(f"{name:<10} {seconds:>8.1f} {peak:>13} {before if before is not None else '?':>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
