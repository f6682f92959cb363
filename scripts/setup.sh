#!/usr/bin/env bash
# Create .venv with every pinned dependency and the cnn_features package.
# Idempotent: a second run only checks that everything is installed.
#
# On a host with an NVIDIA driver (libcuda.so.1 loadable, or nvidia-smi
# answering) it installs the GPU build of the Keras backend the deployment
# chose (CNN_FEATURES_KERAS_BACKEND, default tensorflow): tensorflow[and-cuda]
# or jax[cuda13], pinned in constraints.txt. CNN_FEATURES_GPU=0 or 1 overrides
# the detection. `bash scripts/setup.sh --detect-gpu` prints the choice and why,
# and installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
BACKEND=${CNN_FEATURES_KERAS_BACKEND:-${KERAS_BACKEND:-tensorflow}}

# Print "gpu <why>" or "cpu <why>": the build to install on this host.
detect_gpu() {
    case "${CNN_FEATURES_GPU:-}" in
        1) echo "gpu CNN_FEATURES_GPU=1 asks for it"; return ;;
        0) echo "cpu CNN_FEATURES_GPU=0 asks for it"; return ;;
        "") ;;
        *) echo "setup: CNN_FEATURES_GPU=${CNN_FEATURES_GPU}: expected 0 or 1" >&2; exit 2 ;;
    esac
    if "$PYTHON" -c 'import ctypes; ctypes.CDLL("libcuda.so.1")' >/dev/null 2>&1; then
        echo "gpu NVIDIA driver found (libcuda.so.1 loads)"
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu NVIDIA driver found (nvidia-smi answers)"
    else
        echo "cpu no NVIDIA driver (libcuda.so.1 not loadable, nvidia-smi absent or not answering)"
    fi
}

# Print the pip requirement of the backend's GPU build (empty: none we install).
gpu_requirement() {
    case "$BACKEND" in
        tensorflow) sed -n 's/^tensorflow-cpu==\([^;[:space:]]*\).*/tensorflow[and-cuda]==\1/p' requirements.txt ;;
        jax) sed -n 's/^jax==\([^;[:space:]]*\).*/jax[cuda13]==\1/p' requirements.txt ;;
        *) ;;
    esac
}

decision=$(detect_gpu)
BUILD=${decision%% *}
WHY=${decision#* }
GPU_REQ=""
[ "$BUILD" = gpu ] && GPU_REQ=$(gpu_requirement)
describe() {
    if [ "$BUILD" = cpu ]; then
        echo "setup: CPU build of $BACKEND: $WHY"
    elif [ -n "$GPU_REQ" ]; then
        echo "setup: GPU build of $BACKEND ($GPU_REQ): $WHY"
    else
        echo "setup: $WHY, but this script installs no build of $BACKEND (torch is not in requirements.txt: install a CUDA wheel of PyTorch yourself)"
    fi
}
if [ "${1:-}" = "--detect-gpu" ]; then
    describe
    exit 0
fi

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

stamp=.venv/.installed-$( (cat requirements.txt constraints.txt pyproject.toml; echo "$BUILD $BACKEND $GPU_REQ") | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
    describe >&2
    echo "setup: installing pinned dependencies into .venv (a few minutes on a fresh machine)" >&2
    if [ -n "$GPU_REQ" ] && [ "$BACKEND" = tensorflow ]; then
        # tensorflow-cpu and tensorflow share one package folder: never both.
        requirements=$(mktemp)
        grep -v '^tensorflow' requirements.txt >"$requirements"
        echo "$GPU_REQ" >>"$requirements"
        if .venv/bin/python -m pip show tensorflow-cpu >/dev/null 2>&1; then
            quiet .venv/bin/python -m pip uninstall -y tensorflow-cpu tensorflow
        fi
        quiet .venv/bin/python -m pip install --disable-pip-version-check -r "$requirements" -c constraints.txt
        rm -f "$requirements"
    else
        quiet .venv/bin/python -m pip install --disable-pip-version-check -r requirements.txt -c constraints.txt
        if [ -n "$GPU_REQ" ]; then
            quiet .venv/bin/python -m pip install --disable-pip-version-check "$GPU_REQ" -c constraints.txt
        fi
    fi
    quiet .venv/bin/python -m pip install --disable-pip-version-check --no-deps -e .
    TF_CPP_MIN_LOG_LEVEL=2 quiet .venv/bin/python -c \
        "import airflow, airflow.providers.celery, celery, redis, tensorflow, keras, jax, numpy, boto3, psycopg2, asyncpg, matplotlib, pytest, cnn_features"
    rm -f .venv/.installed-*
    touch "$stamp"
fi
