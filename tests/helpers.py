"""Helpers every test file shares: the runs an experiment holds, and the one-line error contract."""
from __future__ import annotations

import mlflow


def runs_of(stage: str | None = None, *, status: str | None = None, experiment: str | None = None) -> list:
    """Runs of the test's store (all experiments unless `experiment`), newest first, optionally one stage/status."""
    clauses = [f"tags.`loraflow.stage` = '{stage}'"] if stage else []
    clauses += [f"attributes.status = '{status}'"] if status else []
    where = {"experiment_names": [experiment]} if experiment else {"search_all_experiments": True}
    return mlflow.search_runs(**where, output_format="list", filter_string=" and ".join(clauses),
                              order_by=["attributes.start_time DESC"])


def assert_one_line_error(code: int, err: str, pattern: str = "") -> str:
    """The command failed with exactly one `error: ...` line containing `pattern`, and no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code != 0, err
    assert len(errors) == 1 and pattern in errors[0], err
    assert "Traceback" not in err, err
    return errors[0]
