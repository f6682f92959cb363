"""Deployment settings, parsed once from the environment into a frozen dataclass."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cnn_features.backends import visible_gpus

# The repository root when the package runs from a checkout (editable install).
_REPO_ROOT = Path(__file__).resolve().parents[2]

# Seconds a GPU probe may take: TensorFlow import plus CUDA context creation is
# a few seconds on a healthy machine; a wedged driver hangs forever.
DEFAULT_PROBE_TIMEOUT_S = 120.0
# Files per shard. Each shard pays one worker start (~2.5 s: TensorFlow
# import, model load), so a shard should hold far more work than that:
# 10,000 makes each demo dataset (1,440 and 7,442 files) one shard. At 500 the
# full corpus took 18 shards and 45 s of start-up on top of ~30 s of compute.
# A failed shard stays cheap: its re-run skips every feature already written.
DEFAULT_SHARD_SIZE = 10_000
# Inputs per forward pass; equal-shape groups are split into batches of this size.
DEFAULT_BATCH_SIZE = 32
# Shards of one run that execute at once. A worker's first ~3 s are its
# TensorFlow import on one core; with two shards at once the next one imports
# while the current one computes, and CPU workers then take turns on the
# cores (worker.cpu_slot). Both workers of the full demo corpus (7,442 + 1,440
# clips) took 56.6 s this way against 60.4 s one after the other
# (docs/benchmarks.md). On a host with more GPUs the default is the GPU count,
# one shard per GPU (runner.gpu_slot pins each to its own).
DEFAULT_SHARD_CONCURRENCY = 2
# Forward passes a CPU shard worker runs side by side, one single-threaded pass
# per core; 0 means one per core this process may run on. Measured on 2 cores:
# 2 passes x 1 thread beat 1 pass x 2 threads by about 10 % (docs/benchmarks.md).
DEFAULT_CPU_THREADS = 0
# GETs (and PUTs) a shard keeps in flight on S3. With 20 ms added to every
# request, as cloud S3 answers, 8 in flight outpaced the model in the reader
# alone but only in half the stage runs; 16 kept the stage compute-bound on 2
# cores (docs/benchmarks.md, "S3").
DEFAULT_S3_CONCURRENCY = 16
# botocore's retry mode and attempts (first try included): "standard" backs off
# exponentially with jitter; "adaptive" also rate-limits the client on throttling.
DEFAULT_S3_RETRY_MODE = "standard"
DEFAULT_S3_MAX_ATTEMPTS = 4
# Seconds to open a connection and to wait for a response. Every attempt pays
# them, so a dead endpoint fails within about attempts x connect timeout plus
# backoff, not botocore's default 60 s per try.
DEFAULT_S3_CONNECT_TIMEOUT_S = 3.0
DEFAULT_S3_READ_TIMEOUT_S = 30.0
S3_RETRY_MODES = ("standard", "adaptive")
# Seconds a shard's lease on an S3 output (``lease``) lasts unless renewed; it
# is renewed every third of that (~7 s, one small PUT). With the skew below, a
# killed holder's lease frees its shard within 26 s, inside the extraction
# DAG's 30 s retry delay, so Airflow's next try gets the shard; a holder that
# cannot renew for a whole TTL gives the lease up and its shard fails.
DEFAULT_S3_LEASE_TTL_S = 20.0
# Seconds added before another process may take over a lease that was not
# renewed: room for a late renewal still in flight, and for clocks disagreeing
# where a server sends no Date header and a lease is judged by a host's clock.
DEFAULT_S3_LEASE_SKEW_S = 5.0
# MiB of activations one forward pass may take; 0 derives it per worker from
# the memory it may still use or the GPU's memory (``memory.pass_budget``).
DEFAULT_PASS_MEMORY_MB = 0
# Keras backend of workers, the probe and the model check (``backends``):
# TensorFlow is what requirements.txt installs; JAX and PyTorch run the same
# .keras models where they are installed.
DEFAULT_KERAS_BACKEND = "tensorflow"
KERAS_BACKENDS = ("tensorflow", "jax", "torch")
# GPU matmul/convolution precision: full float32 keeps GPU features within
# ~2e-7 of CPU ones (TF32: 4.15e-4 on an H200, docs/gpu.md), so one dataset may mix devices.
DEFAULT_GPU_PRECISION = "float32"
GPU_PRECISIONS = ("float32", "tf32")
# Largest relative difference between a GPU-made feature and its CPU re-extraction
# that verification accepts: full float32 differs by ~2e-7, TF32 by ~3e-4.
DEFAULT_CROSSCHECK_RTOL = 1e-4
# GPU-made files per dataset re-extracted on CPU when a run mixes devices:
# a few seconds of CPU, enough to catch a precision setting gone wrong.
DEFAULT_CROSSCHECK_SAMPLE = 16
# Threads a GPU shard reads local inputs with. Measured on one H200 (docs/gpu.md):
# 1 reader kept the stage at 0.36 of bare np.load, 8 readers at 0.24 (the GIL
# hand-offs cost more than the reads they overlap), so one is the default.
DEFAULT_GPU_READ_THREADS = 1
# Airflow's default queue ([operators] default_queue): CPU shards and every
# other task run there.
DEFAULT_QUEUE = "default"
# The Celery queue only GPU workers consume. Empty: the deployment has no GPU
# queue (LocalExecutor, or Celery with CPU workers only), and every shard runs
# on the default queue.
DEFAULT_GPU_QUEUE = ""
# The Airflow pool capping the GPU shards running at once; the deployment
# creates it with one slot per GPU (scripts/airflow_local.py, docker-compose.yaml).
DEFAULT_GPU_POOL = "gpu"
# Characters a queue or pool name may hold: Celery queue names become Redis keys.
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class SettingsError(ValueError):
    """An environment variable holds a value that cannot be used."""


def _env_path(name: str, default: Path) -> Path:
    raw = os.environ.get(name, "").strip()
    return Path(raw).expanduser() if raw else default


def _env_int(name: str, default: int, *, minimum: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        msg = f"{name}={raw!r}: expected an integer"
        raise SettingsError(msg) from None
    if value < minimum:
        msg = f"{name}={value}: must be >= {minimum}"
        raise SettingsError(msg)
    return value


def _env_float(name: str, default: float, *, minimum: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        msg = f"{name}={raw!r}: expected a number"
        raise SettingsError(msg) from None
    if value < minimum:
        msg = f"{name}={value}: must be >= {minimum}"
        raise SettingsError(msg)
    return value


def _env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if raw not in choices:
        msg = f"{name}={raw!r}: expected one of {', '.join(choices)}"
        raise SettingsError(msg)
    return raw


def _env_name(name: str, default: str) -> str:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not set(raw) <= _NAME_CHARS:
        msg = f"{name}={raw!r}: expected letters, digits, '-', '_' or '.'"
        raise SettingsError(msg)
    return raw


@dataclass(frozen=True)
class Settings:
    """Where data lives and how the pipeline runs, for one deployment."""

    home: Path
    probe_timeout_s: float
    shard_size: int
    batch_size: int
    shard_concurrency: int
    cpu_threads: int = DEFAULT_CPU_THREADS
    s3_concurrency: int = DEFAULT_S3_CONCURRENCY
    s3_retry_mode: str = DEFAULT_S3_RETRY_MODE
    s3_max_attempts: int = DEFAULT_S3_MAX_ATTEMPTS
    s3_connect_timeout_s: float = DEFAULT_S3_CONNECT_TIMEOUT_S
    s3_read_timeout_s: float = DEFAULT_S3_READ_TIMEOUT_S
    s3_lease_ttl_s: float = DEFAULT_S3_LEASE_TTL_S
    s3_lease_skew_s: float = DEFAULT_S3_LEASE_SKEW_S
    keras_backend: str = DEFAULT_KERAS_BACKEND
    gpu_precision: str = DEFAULT_GPU_PRECISION
    crosscheck_rtol: float = DEFAULT_CROSSCHECK_RTOL
    crosscheck_sample: int = DEFAULT_CROSSCHECK_SAMPLE
    pass_memory_mb: int = DEFAULT_PASS_MEMORY_MB
    gpu_read_threads: int = DEFAULT_GPU_READ_THREADS
    progress_dir: Path | None = None
    gpu_queue: str = DEFAULT_GPU_QUEUE
    gpu_pool: str = DEFAULT_GPU_POOL

    @property
    def gpu_task_queue(self) -> str:
        """Return the queue of the GPU extraction task: the GPU queue, or the default one where there is none."""
        return self.gpu_queue or DEFAULT_QUEUE

    @property
    def gpu_task_pool(self) -> str:
        """Return the pool of the GPU extraction task: the GPU pool, or Airflow's default pool where there is no GPU queue."""
        return self.gpu_pool if self.gpu_queue else "default_pool"

    @property
    def demo_input_root(self) -> Path:
        return self.home / "demo"

    @property
    def features_root(self) -> Path:
        return self.home / "features"

    @property
    def progress_root(self) -> Path:
        """Where run progress records and plots go: ``CNN_FEATURES_PROGRESS_ROOT``, else ``home/progress``.

        With workers on several hosts, a folder they and the API server share.
        """
        return self.progress_dir or self.home / "progress"

    @property
    def model_dir(self) -> Path:
        return self.home / "models"

    @property
    def reference_model_path(self) -> Path:
        return self.model_dir / "reference_cnn_v2.keras"

    @property
    def model_info_cache(self) -> Path:
        return self.home / "cache" / "model-info"

    def default_datasets(self) -> dict[str, dict[str, str]]:
        """Return the demo datasets' input and output folders, as the run conf names them."""
        from cnn_features.datasets import DATASETS

        return {
            name: {
                "input": str(self.demo_input_root / name),
                "output": str(self.features_root / name),
            }
            for name in DATASETS
        }


def load_settings() -> Settings:
    """Read the settings from the environment (``CNN_FEATURES_*``)."""
    return Settings(
        home=_env_path("CNN_FEATURES_HOME", _REPO_ROOT / "data").resolve(),
        probe_timeout_s=_env_float(
            "CNN_FEATURES_PROBE_TIMEOUT_S", DEFAULT_PROBE_TIMEOUT_S, minimum=1.0
        ),
        shard_size=_env_int("CNN_FEATURES_SHARD_SIZE", DEFAULT_SHARD_SIZE, minimum=1),
        batch_size=_env_int("CNN_FEATURES_BATCH_SIZE", DEFAULT_BATCH_SIZE, minimum=1),
        shard_concurrency=_env_int(
            "CNN_FEATURES_SHARD_CONCURRENCY", max(DEFAULT_SHARD_CONCURRENCY, len(visible_gpus())), minimum=1
        ),
        cpu_threads=_env_int("CNN_FEATURES_CPU_THREADS", DEFAULT_CPU_THREADS, minimum=0),
        s3_concurrency=_env_int("CNN_FEATURES_S3_CONCURRENCY", DEFAULT_S3_CONCURRENCY, minimum=1),
        s3_retry_mode=_env_choice("CNN_FEATURES_S3_RETRY_MODE", DEFAULT_S3_RETRY_MODE, S3_RETRY_MODES),
        s3_max_attempts=_env_int("CNN_FEATURES_S3_MAX_ATTEMPTS", DEFAULT_S3_MAX_ATTEMPTS, minimum=1),
        s3_connect_timeout_s=_env_float(
            "CNN_FEATURES_S3_CONNECT_TIMEOUT_S", DEFAULT_S3_CONNECT_TIMEOUT_S, minimum=0.1
        ),
        s3_read_timeout_s=_env_float("CNN_FEATURES_S3_READ_TIMEOUT_S", DEFAULT_S3_READ_TIMEOUT_S, minimum=0.1),
        s3_lease_ttl_s=_env_float("CNN_FEATURES_S3_LEASE_TTL_S", DEFAULT_S3_LEASE_TTL_S, minimum=1.0),
        s3_lease_skew_s=_env_float("CNN_FEATURES_S3_LEASE_SKEW_S", DEFAULT_S3_LEASE_SKEW_S, minimum=0.0),
        keras_backend=_env_choice(
            "CNN_FEATURES_KERAS_BACKEND", _env_choice("KERAS_BACKEND", DEFAULT_KERAS_BACKEND, KERAS_BACKENDS), KERAS_BACKENDS
        ),
        gpu_precision=_env_choice("CNN_FEATURES_GPU_PRECISION", DEFAULT_GPU_PRECISION, GPU_PRECISIONS),
        crosscheck_rtol=_env_float("CNN_FEATURES_CROSSCHECK_RTOL", DEFAULT_CROSSCHECK_RTOL, minimum=0.0),
        crosscheck_sample=_env_int("CNN_FEATURES_CROSSCHECK_SAMPLE", DEFAULT_CROSSCHECK_SAMPLE, minimum=0),
        pass_memory_mb=_env_int("CNN_FEATURES_PASS_MEMORY_MB", DEFAULT_PASS_MEMORY_MB, minimum=0),
        gpu_read_threads=_env_int("CNN_FEATURES_GPU_READ_THREADS", DEFAULT_GPU_READ_THREADS, minimum=1),
        progress_dir=_env_path("CNN_FEATURES_PROGRESS_ROOT", Path()).resolve() if os.environ.get("CNN_FEATURES_PROGRESS_ROOT", "").strip() else None,
        gpu_queue=_env_name("CNN_FEATURES_GPU_QUEUE", DEFAULT_GPU_QUEUE),
        gpu_pool=_env_name("CNN_FEATURES_GPU_POOL", DEFAULT_GPU_POOL),
    )
