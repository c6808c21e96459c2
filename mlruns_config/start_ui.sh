#!/usr/bin/env bash
# The MLflow UI on the local default store (run from the repository root).
set -euo pipefail
store="${1:-.mlruns}"
mkdir -p "$store"
exec mlflow ui --backend-store-uri "sqlite:///$PWD/$store/mlflow.db" \
  --default-artifact-root "$PWD/$store/artifacts" --host 127.0.0.1 --port "${PORT:-5000}"
