# Set-up and the two README commands. Everything installs into .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup demo test test-fast gpu-check bench ui clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# the CPU build of torch (a local wheel on these machines); a GPU machine may install its own first
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0"
	# server: the PostgreSQL drivers and basic-auth app that tests/test_scale_out.py uses
	$(PIP) install -q -e ".[dev,server]"
	touch $@

setup: $(VENV)/.installed

demo: setup  ## quickstart: prepare -> train -> evaluate -> register on SmolLM2, then one REST prediction
	$(VENV)/bin/loraflow pipeline quickstart --serve-check

test: setup  ## the whole test suite, real-model tests included
	$(PY) -m pytest

test-fast: setup  ## without the tests that load the real SmolLM2 / MiniLM models
	$(PY) -m pytest -m "not real_model"

gpu-check: setup  ## on a CUDA machine: pytest -m gpu, then quickstart nf4 train -> evaluate -> register -> serve, timed
	# the gpu extra: nvidia-ml-py, for MLflow's GPU system metrics in the training runs
	$(PIP) install -q -e ".[gpu]"
	$(PY) tests/gpu/gpu_check.py

bench: setup  ## every benchmark, results in benchmarks/results/
	$(PY) benchmarks/run_all.py

ui: setup  ## the MLflow UI on the local store
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///.mlruns/mlflow.db --port 5000

clean:
	rm -rf outputs .pytest_cache
