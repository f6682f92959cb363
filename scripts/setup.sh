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

# Run a command quietly; on failure show its output (minus pip's notes about
# absent local package mirrors) and stop.
quiet() {
    local log
    log=$(mktemp)
    if ! "$@" >"$log" 2>&1; then
        grep -v "is ignored: it is neither a file nor a directory" "$log" >&2 || true
        rm -f "$log"
        echo "setup: failed: $*" >&2
        exit 1
    fi
    rm -f "$log"
}

stamp=.venv/.installed-$(cat requirements.txt constraints.txt pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
    echo "setup: installing pinned dependencies into .venv (a few minutes on a fresh machine)" >&2
    quiet .venv/bin/python -m pip install --disable-pip-version-check -r requirements.txt -c constraints.txt
    quiet .venv/bin/python -m pip install --disable-pip-version-check --no-deps -e .
    TF_CPP_MIN_LOG_LEVEL=2 quiet .venv/bin/python -c \
        "import airflow, tensorflow, keras, numpy, boto3, psycopg2, asyncpg, matplotlib, pytest, cnn_features"
    rm -f .venv/.installed-*
    touch "$stamp"
fi
