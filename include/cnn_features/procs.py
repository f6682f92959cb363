"""Start fresh Python processes: the only place CUDA is ever touched."""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any, Literal

Device = Literal["gpu", "cpu"]

# Prefix of the one line a child prints to hand its result back.
RESULT_PREFIX = "CNN_FEATURES_RESULT "
# Prefix of progress lines a shard worker prints while it runs.
PROGRESS_PREFIX = "CNN_FEATURES_PROGRESS "
# Environment variable naming the process that started a child.
PARENT_PID_ENV = "CNN_FEATURES_PARENT_PID"
# From <sys/prctl.h>: deliver a signal to this process when its parent dies.
_PR_SET_PDEATHSIG = 1
# TensorFlow runs convolutions through oneDNN only on CPUs it picks itself
# (AVX-512 VNNI/BF16, AMX); elsewhere, e.g. an AVX2 AMD EPYC, it falls back
# to Eigen, and the reference CNN ran at 68 % of the numpy matrix-product rate
# instead of 90 % (docs/benchmarks.md). Children on x86-64 turn it on unless
# the deployment set the variable itself.
_ONEDNN_ENV = "TF_ENABLE_ONEDNN_OPTS"
_ONEDNN_MACHINES = frozenset({"x86_64", "AMD64"})
# Variables a child inherits, by exact name: the process basics, proxies and CA
# bundles (boto3, TLS). Everything else in the parent's environment (the
# Airflow JWT secret, the database URL, other services' tokens) stays out of
# children that parse user-supplied files.
_CHILD_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM",
    "TMPDIR", "TEMP", "TMP", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "LD_PRELOAD",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy", "all_proxy",
    "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR", "CURL_CA_BUNDLE",
    "MPLBACKEND", "MPLCONFIGDIR",
})
# Prefixes of inherited variables: Python, this package, TensorFlow, Keras and
# its backends (JAX/XLA, torch), CUDA and NVIDIA libraries, thread pools,
# boto3 (AWS_*, endpoint and CA bundle included), locale, XDG folders and
# coverage of child processes in tests.
_CHILD_ENV_PREFIXES = (
    "PYTHON", "CNN_FEATURES_", "TF_", "KERAS_", "JAX_", "XLA_", "TORCH", "PYTORCH_", "CUDA_", "CUDNN_",
    "NVIDIA_", "NCCL_", "NV_", "TPU_", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "ONEDNN_", "DNNL_", "AWS_",
    "BOTO_", "LC_", "XDG_", "COVERAGE_", "COV_CORE_",
)


def inherited_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Return the variables of ``environ`` (this process's by default) that a child may see (the allowlist above)."""
    source = os.environ if environ is None else environ
    return {k: v for k, v in source.items() if k in _CHILD_ENV_NAMES or k.startswith(_CHILD_ENV_PREFIXES)}


def child_env(device: Device, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return the environment for a child that must run on ``device``, plus ``extra``.

    A CPU child gets CUDA hidden (``CUDA_VISIBLE_DEVICES=-1``) so nothing in it
    can touch a GPU, however the libraries are built. Only allowlisted
    variables are inherited (``inherited_env``); ``extra`` carries what only
    the environment may carry, such as S3 credentials (``S3Access.env``).
    """
    env = {**inherited_env(), **(extra or {})}
    env[PARENT_PID_ENV] = str(os.getpid())
    env["PYTHONUNBUFFERED"] = "1"
    # TensorFlow's C++ INFO/WARNING chatter (oneDNN notices, CPU flags) buries
    # the shard log; errors still show.
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if platform.machine() in _ONEDNN_MACHINES:
        env.setdefault(_ONEDNN_ENV, "1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = "-1"
    return env


def die_with_parent() -> None:
    """Make this child die (SIGKILL) when the process that started it dies.

    A shard worker must not outlive its Airflow task: a killed or timed-out
    task would otherwise leave an orphan writing features (and holding a GPU)
    while Airflow retries the shard beside it. Linux only; a no-op elsewhere.
    If the parent is already gone, exit at once.
    """
    expected = os.environ.get(PARENT_PID_ENV)
    if not sys.platform.startswith("linux") or not expected:
        return
    import ctypes
    import signal

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if str(os.getppid()) != expected:
        os._exit(1)


def python_module_cmd(module: str, *args: str) -> list[str]:
    """Return the command that runs ``python -m module args`` in this interpreter."""
    return [sys.executable, "-m", module, *args]


def emit(prefix: str, payload: dict[str, Any]) -> None:
    """Print one prefixed JSON line to stdout for the parent to pick up."""
    sys.stdout.write(prefix + json.dumps(payload, sort_keys=True) + "\n")
    sys.stdout.flush()


def parse_line(line: str, prefix: str) -> dict[str, Any] | None:
    """Return the JSON payload of a prefixed line, or None for any other line."""
    if not line.startswith(prefix):
        return None
    try:
        payload = json.loads(line[len(prefix) :])
    except json.JSONDecodeError:
        return None
    return payload if isinstance(payload, dict) else None
