"""`loraflow runs`: training runs side by side with what differs between them and their figures."""
from __future__ import annotations

from helpers import runs_of


def test_runs_table_shows_differing_settings_figures_and_deltas(tiny_llama, write_project, run_cli):
    project = write_project(tiny_llama, train={"max_steps": 2})
    for rank in (4, 8):
        assert run_cli("train", project, "--set", f"lora.r={rank}")[0] == 0
    newest = runs_of("train")[0]
    assert run_cli("evaluate", project, "--set", "lora.r=8")[0] == 0
    code, out, err = run_cli("runs", project)
    assert code == 0, err
    header, *rows = out.strip().splitlines()
    assert header.split()[:3] == ["run", "status", "trial"]
    assert "lora.r" in header and "eval/loss" in header and "delta/rougeL" in header
    assert "train.max_steps" not in header, "a setting every run shares is not a column"
    assert len(rows) == 2 and rows[0].startswith(newest.info.run_id[:12])
    column = header.index("lora.r")  # aligned columns; an empty cell is blanks
    assert [row[column:].split()[0] for row in rows] == ["8", "4"]
    assert "[" in rows[0] and "[" not in rows[1], "only the evaluated run has a delta with its interval"


def test_runs_of_an_empty_experiment_says_so(tiny_llama, write_project, run_cli):
    code, out, _ = run_cli("runs", write_project(tiny_llama))
    assert code == 0 and out.strip() == "no training runs in this experiment yet"


def test_evaluations_across_tasks_in_one_table_and_json(tiny_llama, write_project, run_cli, tmp_path):
    """Two tasks judged on one training run, 2 sampled seeds each: base -> tuned mean ± std per task."""
    import json

    import mlflow

    task_a = tmp_path / "a.jsonl"
    task_a.write_text("".join(json.dumps({"title": f"Mug {i}", "content": f"A mug number {i}."}) + "\n"
                              for i in range(30)))
    project = write_project(tiny_llama, train={"max_steps": 1},
                            eval={"seeds": [0, 1], "temperature": 0.8, "num_samples": 3})
    assert run_cli("train", project)[0] == 0
    trained = runs_of("train")[0].info.run_id
    assert run_cli("evaluate", project, "--run-id", trained)[0] == 0
    assert run_cli("evaluate", project, "--run-id", trained, "--set", f"data.path={task_a}")[0] == 0
    out_json = tmp_path / "tasks.json"
    code, out, err = run_cli("runs", project, "--evaluations", "--json", out_json)
    assert code == 0, err
    summary = json.loads(out_json.read_text())
    assert [task["data"].rsplit("/", 1)[-1] for task in summary] == ["a.jsonl", "builtin:catalogue"]
    for task in summary:
        run = mlflow.get_run(task["run_id"])
        assert task["judged_run_id"] == trained
        assert task["metrics"]["rougeL"]["tuned"] == run.data.metrics["tuned/rougeL"]
        assert task["metrics"]["rougeL"]["tuned_std"] == run.data.metrics["tuned/rougeL_std"]
    header, *rows = out.strip().splitlines()
    assert header.split()[:3] == ["run", "data", "judged"] and "rougeL" in header and len(rows) == 2
    assert " ± " in rows[0] and " -> " in rows[0]
