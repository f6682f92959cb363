"""Keras backends and GPU precision: set up a fresh process before Keras loads, and use its GPU.

One seam for the three backends Keras 3 runs on: TensorFlow (the default),
JAX and PyTorch. The deployment names one (``CNN_FEATURES_KERAS_BACKEND``);
``prepare_process`` turns that into the variables Keras and the framework
read at import time, and every child process (worker, probe, model check,
cross-check) calls it before importing Keras. Nothing here imports a
framework at module level, and the parent side (``backend_env``,
``visible_gpus``) never touches CUDA.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Keras backends this pipeline runs on (config.KERAS_BACKENDS; the first is the default).
BACKENDS = ("tensorflow", "jax", "torch")
# GPU matmul/convolution precision: full float32, or TensorFloat-32 (10-bit
# mantissa inputs). Full float32 is the default: TF32 features differed from
# CPU ones by 4.15e-4 relative on an H200, float32 by 1.7e-7 (docs/gpu.md).
PRECISIONS = ("float32", "tf32")
# The CUDA_VISIBLE_DEVICES value that hides every GPU from a CPU child.
NO_GPU = "-1"
# Where the kernel lists NVIDIA GPUs without any CUDA call: one folder per
# GPU, readable by any process, so counting them is safe before a fork.
_PROC_NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


class BackendError(RuntimeError):
    """A Keras backend cannot be set up as configured in this process."""


class GpuUnavailable(RuntimeError):
    """The configured backend cannot run a kernel on a GPU in this process."""


@dataclass(frozen=True)
class GpuInfo:
    """The GPU a process runs on, as its framework names it."""

    name: str
    backend: str
    framework_version: str | None
    memory_total_mb: int | None = None


def backend_env(backend: str, device: str, *, precision: str) -> dict[str, str]:
    """Return the variables a child running Keras on ``backend`` and ``device`` needs.

    Given to ``procs.child_env`` as ``extra``; a child also derives them
    itself (``prepare_process``), so they only make the choice visible in the
    child's environment and reach libraries that read them at load time.
    """
    env = {"KERAS_BACKEND": backend, "CNN_FEATURES_KERAS_BACKEND": backend, "CNN_FEATURES_GPU_PRECISION": precision}
    if backend == "jax":
        # JAX grabs 75 % of GPU memory at start-up by default; a worker that
        # shares its GPU with a probe or a second backend must not.
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        if device == "cpu":
            # Without it JAX loads its CUDA plugin, finds no device and warns.
            env["JAX_PLATFORMS"] = "cpu"
    if precision == "float32":
        # cuBLAS and cuDNN read this at load time: no TF32 whatever a framework asks.
        env["NVIDIA_TF32_OVERRIDE"] = "0"
    return env


def configured() -> tuple[str, str]:
    """Return (backend, precision) from this process's settings."""
    from cnn_features.config import load_settings

    settings = load_settings()
    return settings.keras_backend, settings.gpu_precision


def prepare_process(device: str | None = None) -> str:
    """Set this process up for the configured backend before Keras is imported; return the backend.

    ``device`` defaults to "cpu" when CUDA is hidden (``CUDA_VISIBLE_DEVICES=-1``),
    else "gpu". Safe to call again. If Keras is already loaded on another
    backend (a test process that imported it first), that one stays and a
    warning says so.
    """
    backend, precision = configured()
    if device is None:
        device = "cpu" if os.environ.get("CUDA_VISIBLE_DEVICES", "").strip() == NO_GPU else "gpu"
    if "keras" in sys.modules:
        loaded = sys.modules["keras"].backend.backend()
        if loaded != backend:
            log.warning("Keras already runs on %s in this process; %s (configured) not applied", loaded, backend)
        return str(loaded)
    for name, value in backend_env(backend, device, precision=precision).items():
        if name in ("XLA_PYTHON_CLIENT_PREALLOCATE", "JAX_PLATFORMS", "NVIDIA_TF32_OVERRIDE"):
            os.environ.setdefault(name, value)  # a deployment's own choice wins
        else:
            os.environ[name] = value
    return backend


def active_backend() -> str:
    """Return the backend Keras runs on in this process (importing Keras)."""
    import keras

    return str(keras.backend.backend())


def set_precision(backend: str, precision: str) -> str:
    """Make GPU matmuls and convolutions run at ``precision``; return what was applied.

    float32 turns TF32 off in the framework itself (besides
    ``NVIDIA_TF32_OVERRIDE``): JAX's default matmul precision "highest",
    TensorFlow's TF32 execution off, PyTorch's cuBLAS and cuDNN TF32 flags off.
    On CPU the setting changes nothing: CPUs have no TF32.
    """
    if precision not in PRECISIONS:
        msg = f"GPU precision {precision!r}: expected one of {', '.join(PRECISIONS)}"
        raise BackendError(msg)
    full = precision == "float32"
    if backend == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest" if full else "tensorfloat32")
    elif backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(not full)
    elif backend == "torch":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = not full
        torch.backends.cudnn.allow_tf32 = not full
        torch.set_float32_matmul_precision("highest" if full else "high")
    else:
        msg = f"Keras backend {backend!r}: expected one of {', '.join(BACKENDS)}"
        raise BackendError(msg)
    return precision


def init_gpu(backend: str) -> GpuInfo:
    """Run a kernel on the first visible GPU with ``backend``; return what it is.

    Raises:
        GpuUnavailable: the framework sees no GPU, or the kernel fails (the
            framework's error text, e.g. ``CUDA_ERROR_NOT_INITIALIZED``, is kept).
    """
    try:
        if backend == "jax":
            return _jax_gpu()
        if backend == "torch":
            return _torch_gpu()
        if backend == "tensorflow":
            return _tensorflow_gpu()
    except GpuUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - every framework raises its own types at CUDA init
        msg = f"{backend}: {type(exc).__name__}: {exc}"
        raise GpuUnavailable(msg) from None
    msg = f"Keras backend {backend!r}: expected one of {', '.join(BACKENDS)}"
    raise BackendError(msg)


def _jax_gpu() -> GpuInfo:
    import jax
    import jax.numpy as jnp

    try:
        devices = jax.devices("gpu")
    except RuntimeError as exc:
        msg = f"JAX {jax.__version__} has no usable GPU backend ({exc}); install the CUDA build: pip install 'jax[cuda13]'"
        raise GpuUnavailable(msg) from None
    if not devices:
        msg = f"JAX {jax.__version__} sees no GPU"
        raise GpuUnavailable(msg)
    device = devices[0]
    x = jax.device_put(jnp.ones((256, 256), jnp.float32), device)
    checksum = float(jnp.sum(x @ x))
    if checksum != 256.0**3:
        msg = f"JAX: a test matmul on {device.device_kind} returned {checksum}, expected {256.0**3}"
        raise GpuUnavailable(msg)
    memory = None
    stats = getattr(device, "memory_stats", lambda: None)()
    if stats and stats.get("bytes_limit"):
        memory = int(stats["bytes_limit"]) // (1 << 20)
    return GpuInfo(name=str(device.device_kind), backend="jax", framework_version=jax.__version__, memory_total_mb=memory)


def _torch_gpu() -> GpuInfo:
    import torch

    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        msg = f"PyTorch {torch.__version__} ({build}) sees no GPU"
        raise GpuUnavailable(msg)
    torch.cuda.init()
    x = torch.ones((256, 256), device="cuda:0")
    checksum = float((x @ x).sum())
    if checksum != 256.0**3:
        msg = f"PyTorch: a test matmul on the GPU returned {checksum}, expected {256.0**3}"
        raise GpuUnavailable(msg)
    props = torch.cuda.get_device_properties(0)
    return GpuInfo(
        name=str(props.name), backend="torch", framework_version=torch.__version__, memory_total_mb=props.total_memory >> 20
    )


def _tensorflow_gpu() -> GpuInfo:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        build = "a CPU-only build" if not tf.test.is_built_with_cuda() else "the CUDA build"
        msg = f"TensorFlow {tf.__version__} ({build}) sees no GPU; for the GPU build see README, 'Running on a GPU'"
        raise GpuUnavailable(msg)
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    with tf.device("/GPU:0"):
        float(tf.reduce_sum(tf.ones((8, 8))))
    name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU:0")
    return GpuInfo(name=str(name), backend="tensorflow", framework_version=tf.__version__)


def framework_versions(backend: str) -> dict[str, Any]:
    """Return the backend's own version and the CUDA/cuDNN versions it was built for (None where unknown)."""
    versions: dict[str, Any] = {"framework_version": None, "cuda_version": None, "cudnn_version": None}
    if backend == "jax":
        import jax

        versions["framework_version"] = jax.__version__
        try:
            from jax._src.lib import cuda_versions  # present only with the CUDA plugin

            if cuda_versions is not None:
                runtime = cuda_versions.cuda_runtime_get_version()
                cudnn = cuda_versions.cudnn_get_version()
                versions["cuda_version"] = f"{runtime // 1000}.{runtime % 1000 // 10}"  # 13000 -> 13.0
                versions["cudnn_version"] = f"{cudnn // 10_000}.{cudnn % 10_000 // 100}.{cudnn % 100}"  # 91200 -> 9.12.0
        except (ImportError, AttributeError, RuntimeError):
            pass
    elif backend == "torch":
        import torch

        versions["framework_version"] = torch.__version__
        versions["cuda_version"] = torch.version.cuda
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        versions["cudnn_version"] = None if cudnn is None else str(cudnn)
    elif backend == "tensorflow":
        import tensorflow as tf

        build = tf.sysconfig.get_build_info()
        versions.update(
            framework_version=tf.__version__,
            cuda_version=build.get("cuda_version"),
            cudnn_version=build.get("cudnn_version"),
        )
    return versions


def installed_version(backend: str) -> str | None:
    """Return the backend's installed version without importing it."""
    import importlib.metadata

    dists = {"tensorflow": ("tensorflow", "tensorflow-cpu"), "jax": ("jax",), "torch": ("torch",)}.get(backend, ())
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def visible_gpus(environ: Mapping[str, str] | None = None, *, count: int | None = None) -> list[str]:
    """Return the GPU ids this deployment may use, as CUDA_VISIBLE_DEVICES entries, without touching CUDA.

    ``count`` is the number of GPUs the probe reported; without it the
    kernel's ``/proc/driver/nvidia/gpus`` listing is counted. A deployment's
    own ``CUDA_VISIBLE_DEVICES`` list is kept as given (ids or UUIDs);
    "-1" or an empty value means none.
    """
    environ = os.environ if environ is None else environ
    raw = environ.get("CUDA_VISIBLE_DEVICES")
    if raw is not None:
        ids = [part.strip() for part in raw.split(",") if part.strip()]
        if not ids or ids[0] == NO_GPU:
            return []
        return ids[:count] if count is not None else ids
    if count is None:
        try:
            count = len([p for p in _PROC_NVIDIA_GPUS.iterdir() if p.is_dir()])
        except OSError:
            count = 0
    return [str(i) for i in range(count)]
