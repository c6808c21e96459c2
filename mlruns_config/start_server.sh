#!/usr/bin/env bash
# A tracking server: PostgreSQL backend store + artifact proxy. Needs `pip install -e ".[server]"`.
#   bash mlruns_config/start_server.sh            # settings from mlruns_config/server.env
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
set -a; . "$here/server.env"; set +a
exec mlflow server --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" --serve-artifacts \
  --host "$MLFLOW_HOST" --port "$MLFLOW_PORT"
