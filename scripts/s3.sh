#!/usr/bin/env bash
# Start a real local S3 server (SeaweedFS) on 127.0.0.1 with generated keys;
# data, keys and log in .s3/. Runs in the foreground; Ctrl-C stops it.
#
#   bash scripts/s3.sh                     # S3 on http://127.0.0.1:8333
#   bash scripts/s3.sh --bucket features   # ... and create bucket "features" if missing
#   bash scripts/s3.sh --port 9000         # another port
#   export AIRFLOW_CONN_AWS_DEFAULT="$(bash scripts/s3.sh --print-connection)"
#
# Keys: .s3/credentials.json (mode 0600). Paths given to --dir are relative to
# the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/s3_local.py "$@"
