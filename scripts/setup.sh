#!/usr/bin/env bash
# Create .venv with every pinned dependency and the cnn_features package.
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(cat requirements.txt constraints.txt pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check \
        -r requirements.txt -c constraints.txt 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e . \
        2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
    TF_CPP_MIN_LOG_LEVEL=2 .venv/bin/python -c "import airflow, tensorflow, keras, numpy, boto3, psycopg2, asyncpg, matplotlib, pytest, cnn_features" 
    rm -f .venv/.installed-*
    touch "$stamp"
fi
