"""A training job of several processes on this host: its ranks' collectives and the launcher.

    loraflow train quickstart --nproc 2            # launch(): torchrun's agent, in this process
    torchrun --nproc-per-node 2 -m loraflow.cli train quickstart

Every rank runs train.run; rank 0 alone talks to MLflow and writes loraflow's files (Ranks.main), and the
others learn what it decided through Ranks.from_main and Ranks.reduce. See docs/distributed.md.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from loraflow import LoraflowError, tracking


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job, as the Trainer's arguments see it (rank 0 of 1 outside one).

    Rank 0 alone talks to MLflow and writes loraflow's files. The collectives return at once in a single
    process; in a job every rank calls them at the same points, in the same order.
    """
    rank: int = 0
    world_size: int = 1
    device: object = None  # where the collectives' tensors go: the Trainer's device (nccl takes GPU tensors)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def from_main(self, value):
        """Rank 0's `value`, on every rank."""
        if self.world_size == 1:
            return value
        import torch.distributed

        box = [value]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def reduce(self, values: list, op: str = "sum") -> list:
        """The elementwise sum (op="sum") or largest (op="max") of `values` over the ranks."""
        if self.world_size == 1:
            return values
        import torch
        import torch.distributed

        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor, op=getattr(torch.distributed.ReduceOp, op.upper()))
        return tensor.tolist()


AGENT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)  # torchrun's agent takes these


def launch(argv: list[str], nproc: int, store: tracking.Store) -> tuple[int, str]:
    """Run `loraflow <argv>` as one job of `nproc` processes on this host; return (exit code, the error line
    to print when no rank printed one).

    This process runs torchrun's elastic agent itself (`torch.distributed.run.run`, the body of `python -m
    torch.distributed.run --standalone`): the torchrun command ends every failed job with exit code 1 and a
    traceback of its own, where here the job keeps its code (143 after SIGTERM, which the agent passes once
    to each rank) and one `error:` line. Rank 0 writes to this terminal, the others to log files; the ranks
    find the store and experiment in MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_ID.
    """
    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    if "LOCAL_RANK" in os.environ:
        raise LoraflowError("--nproc inside a torchrun job: let torchrun's --nproc-per-node start the processes")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise LoraflowError(f"--nproc {nproc}: this host has {torch.cuda.device_count()} GPU(s), one per process")
    logs = Path(tempfile.mkdtemp(prefix="loraflow-ranks-"))
    options = ["--standalone", f"--nproc-per-node={nproc}", f"--log-dir={logs}",
               "--redirects=" + ",".join(f"{rank}:3" for rank in range(1, nproc)), "-m", "loraflow.cli", *argv]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    environment = {"MLFLOW_TRACKING_URI": store.uri, "MLFLOW_EXPERIMENT_ID": store.experiment_id,
                   # CPU ranks share the cores (torchrun's own default is 1 thread each)
                   "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS") or str(max(1, cores // nproc))}
    with agent_settings(environment):
        try:
            torchrun(parse_args(options))  # what `python -m torch.distributed.run` does, without its @record
            code, error = 0, ""
        except SignalException as exc:  # this process got the signal; the agent passed it on and waited
            code, error = 128 + int(exc.sigval), ""
        except ChildFailedError as exc:
            code, error = failed_job(exc.failures, logs)
    if not error:
        shutil.rmtree(logs, ignore_errors=True)
    return code, error


@contextlib.contextmanager
def agent_settings(environment: dict):
    """While inside: `environment` set, torch's elastic agent quiet (unless LORAFLOW_DEBUG), and the agent free to
    install its signal handlers; all as before on leaving."""
    import logging

    before = {name: os.environ.get(name) for name in environment}
    handlers = {signum: signal.getsignal(signum) for signum in AGENT_SIGNALS}
    agent_log = logging.getLogger("torch.distributed.elastic")
    level = agent_log.level
    agent_log.setLevel(logging.INFO if os.environ.get("LORAFLOW_DEBUG") else logging.ERROR)
    os.environ.update(environment)
    try:
        yield
    finally:
        agent_log.setLevel(level)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def failed_job(failures: dict, logs: Path) -> tuple[int, str]:
    """(exit code, error line) of a failed job. Rank 0 having recorded its error has printed it; otherwise the
    first rank that recorded one (record_rank_failure) is the cause, else the first that died."""
    recorded = {rank: failure.error_file_data["message"] for rank, failure in failures.items()
                if isinstance(failure.error_file_data.get("message"), dict)}
    if 0 in recorded:
        return int(recorded[0]["extraInfo"].get("exit_code", 1)), ""
    if recorded:
        rank = min(recorded, key=lambda r: (int(recorded[r]["extraInfo"]["timestamp"]), r))
        code, reason = int(recorded[rank]["extraInfo"].get("exit_code", 1)), recorded[rank]["message"]
    else:
        rank, failure = min(failures.items(), key=lambda item: (item[1].timestamp, item[0]))
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -9: killed by SIGKILL
        reason = failure.message if failure.exitcode < 0 else f"exit code {failure.exitcode}"
    output = next(logs.glob(f"*/attempt_*/{failures[rank].local_rank}/stderr.log"), None)
    return code, f"rank {rank}: {reason}" + (f" (its output: {output})" if output else "")


def record_rank_failure(exc: BaseException) -> None:
    """In a torchrun job, leave this rank's one-line reason and exit code (as the CLI would print and end with)
    in the file torchrun's agent reads (TORCHELASTIC_ERROR_FILE): the job then reports one line, not one a rank."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    if isinstance(exc, (LoraflowError, KeyboardInterrupt)):
        line, code = str(exc) or "interrupted", 2 if isinstance(exc, LoraflowError) else getattr(exc, "exit_code", 130)
    else:
        line, code = f"{type(exc).__name__}: {tracking.first_line(exc)}", 1
    extra = {"timestamp": str(int(time.time())), "exit_code": code}
    Path(path).write_text(json.dumps({"message": {"message": line, "extraInfo": extra}}))
