#!/usr/bin/env bash
# Install everything, then run the whole pipeline on the demo corpus through
# Airflow (SQLite, LocalExecutor, local files) and print where the results are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/airflow-env.sh
exec python scripts/demo.py "$@"
