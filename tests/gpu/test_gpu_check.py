"""gpu_check.py where no GPU is needed: the plan its --dry-run prints, and its one-line refusal without a CUDA GPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("gpu_check.py")
OUTPUTS = Path(__file__).resolve().parents[2] / "outputs" / "gpu-check"


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_the_dry_run_prints_every_step_in_order_and_runs_nothing():
    before = set(OUTPUTS.iterdir()) if OUTPUTS.is_dir() else set()
    result = run_script("--dry-run")
    assert result.returncode == 0, result.stderr
    header, *steps = result.stdout.splitlines()
    assert header.startswith("gpu-check: 5 steps; the stages run in ") and str(OUTPUTS) in header
    assert [line.split(":")[0].strip() for line in steps] == ["1. gpu tests", "2. train", "3. evaluate", "4. register",
                                                              "5. serve"]
    settings = "quickstart --set model.quantization=nf4 --set train.max_steps=40"
    assert "-m pytest -m gpu tests/gpu" in steps[0]
    assert f"loraflow train {settings}" in steps[1] and f"loraflow evaluate {settings}" in steps[2]
    assert f"loraflow register {settings} --force true" in steps[3]
    assert f"loraflow serve {settings} --port " in steps[4] and "POST one prompt" in steps[4]
    assert (set(OUTPUTS.iterdir()) if OUTPUTS.is_dir() else set()) == before  # no folder made, nothing run


def test_without_a_visible_cuda_gpu_it_fails_with_one_line():
    result = run_script(CUDA_VISIBLE_DEVICES="")  # hides any GPU this machine has
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 1, result.stderr
    assert len(errors) == 1 and errors[0].startswith("error: gpu-check needs a CUDA GPU: "), result.stderr
    assert "Traceback" not in result.stderr
