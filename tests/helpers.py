"""Helpers every test file shares: the runs an experiment holds, and the one-line error contract."""
from __future__ import annotations

from pathlib import Path

import mlflow
import pytest


def runs_of(stage: str | None = None, *, status: str | None = None, experiment: str | None = None,
            oldest_first: bool = False) -> list:
    """Runs of the test's store (all experiments unless `experiment`), newest first (oldest first if
    `oldest_first`), optionally one stage/status."""
    clauses = [f"tags.`loraflow.stage` = '{stage}'"] if stage else []
    clauses += [f"attributes.status = '{status}'"] if status else []
    where = {"experiment_names": [experiment]} if experiment else {"search_all_experiments": True}
    order = "ASC" if oldest_first else "DESC"
    return mlflow.search_runs(**where, output_format="list", filter_string=" and ".join(clauses),
                              order_by=[f"attributes.start_time {order}"])


def assert_one_line_error(code: int, err: str, pattern: str = "") -> str:
    """The command failed with exactly one `error:` line, which reads `error: ...` and contains `pattern`,
    and no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0, err
    assert len(errors) == 1 and errors[0].startswith("error: ") and pattern in errors[0], err
    assert "Traceback" not in err, err
    return errors[0]


def ready_or_fail(url: str, process, log_path, timeout: float = 180) -> None:
    """Wait for a server process to answer /ping; fail the test with the tail of its log if it does not."""
    from loraflow import LoraflowError, serving

    try:
        serving.wait_until_ready(url, timeout=timeout, process=process)
    except LoraflowError as exc:
        pytest.fail(f"{exc}\n{Path(log_path).read_text()[-3000:]}")
