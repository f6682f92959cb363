#!/usr/bin/env bash
# Install everything, then run the test suite. Extra arguments go to pytest.
# System packages the end-to-end tests need (PostgreSQL, Redis, Chromium) are
# installed first when missing (scripts/system-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
