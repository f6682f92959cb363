"""GPU probe, run in a fresh process so that no forking process ever touches CUDA.

``run_probe`` (parent side) starts ``python -m cnn_features.probe`` and turns
any crash, hang or error of the child into "no usable GPU" with the reason.
The child asks the CUDA driver directly (ctypes, no framework), then checks
that the configured Keras backend (TensorFlow, JAX or PyTorch; ``backends``)
can create a context and run a kernel on the GPU. A driver with a CPU-only
build of the backend is reported as exactly that, with the fix.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
import time
from typing import Any

from cnn_features import backends, faults
from cnn_features.procs import RESULT_PREFIX, child_env, die_with_parent, emit, parse_line, python_module_cmd

log = logging.getLogger(__name__)


# How to get a GPU build of each backend, for a report that found a driver
# but a framework that cannot use it.
_GPU_BUILD_FIX = {
    "tensorflow": "install the GPU build: CNN_FEATURES_GPU=1 bash scripts/setup.sh (tensorflow[and-cuda], README 'Running on a GPU')",
    "jax": "install JAX's CUDA build: pip install 'jax[cuda13]' (or 'jax[cuda12]' for a CUDA 12 driver)",
    "torch": "install a CUDA build of PyTorch from the PyTorch wheel index for your driver's CUDA version",
}


def _no_gpu(error: str, **extra: Any) -> dict[str, Any]:
    backend, precision = backends.configured()
    return {
        "usable": False,
        "device_name": None,
        "memory_total_mb": None,
        "driver_version": None,
        "cuda_version": None,
        "cudnn_version": None,
        "framework": backend,
        "framework_version": None,
        "precision": precision,
        "error": error,
        **extra,
    }


def run_probe(*, timeout_s: float) -> dict[str, Any]:
    """Probe the GPU in a fresh process; never raise, never hang past ``timeout_s``.

    Returns:
        ``usable`` (bool), ``device_name``, ``memory_total_mb``,
        ``driver_version``, ``cuda_version``, ``cudnn_version``, ``framework``,
        ``framework_version``, ``error`` (None when usable) and ``elapsed_s``.
    """
    started = time.monotonic()
    cmd = python_module_cmd("cnn_features.probe")
    try:
        proc = subprocess.run(
            cmd,
            env=child_env("gpu", _backend_env()),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        report = _no_gpu(f"GPU probe did not finish within {timeout_s:g} s; treating the GPU as unusable")
    except OSError as exc:
        report = _no_gpu(f"GPU probe could not start: {exc}")
    else:
        report = _result_of(proc)
    report["elapsed_s"] = round(time.monotonic() - started, 3)
    _log_report(report)
    return report


def _backend_env() -> dict[str, str]:
    backend, precision = backends.configured()
    return backends.backend_env(backend, "gpu", precision=precision)


def _result_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    for line in reversed(proc.stdout.splitlines()):
        payload = parse_line(line, RESULT_PREFIX)
        if payload is not None:
            return payload
    how = f"was killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exited with code {proc.returncode}"
    tail = " | ".join(proc.stderr.strip().splitlines()[-5:])
    return _no_gpu(f"GPU probe {how} without a result" + (f": {tail}" if tail else ""))


def _log_report(report: dict[str, Any]) -> None:
    if report["usable"]:
        log.info(
            "GPU usable: %s, %s MiB, driver %s, CUDA %s, cuDNN %s, %s %s (probe took %.1f s)",
            report["device_name"],
            report["memory_total_mb"],
            report["driver_version"],
            report["cuda_version"],
            report["cudnn_version"],
            report["framework"],
            report["framework_version"],
            report["elapsed_s"],
        )
    else:
        log.warning(
            "No usable GPU, shards will run on CPU: %s (%s %s, probe took %.1f s)",
            report["error"],
            report["framework"],
            report["framework_version"],
            report["elapsed_s"],
        )


# --- child side -------------------------------------------------------------


def _cuda_driver() -> dict[str, Any]:
    """Ask the CUDA driver API for device 0; raise RuntimeError with its error name."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        msg = f"no NVIDIA driver: libcuda.so.1 not loadable ({exc})"
        raise RuntimeError(msg) from None

    def check(rc: int, call: str) -> None:
        if rc != 0:
            name = ctypes.c_char_p()
            lib.cuGetErrorName(rc, ctypes.byref(name))
            text = name.value.decode() if name.value else f"error {rc}"
            msg = f"{call} failed: {text}"
            raise RuntimeError(msg)

    check(lib.cuInit(0), "cuInit")
    count = ctypes.c_int()
    check(lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
    if count.value < 1:
        msg = "CUDA driver reports no devices"
        raise RuntimeError(msg)
    device = ctypes.c_int()
    check(lib.cuDeviceGet(ctypes.byref(device), 0), "cuDeviceGet")
    name = ctypes.create_string_buffer(256)
    check(lib.cuDeviceGetName(name, 256, device), "cuDeviceGetName")
    memory = ctypes.c_size_t()
    check(lib.cuDeviceTotalMem_v2(ctypes.byref(memory), device), "cuDeviceTotalMem")
    version = ctypes.c_int()
    check(lib.cuDriverGetVersion(ctypes.byref(version)), "cuDriverGetVersion")
    return {
        "device_count": count.value,
        "device_name": name.value.decode(errors="replace"),
        "memory_total_mb": memory.value // (1 << 20),
        "driver_version": f"{version.value // 1000}.{version.value % 1000 // 10}",
    }


def _framework_gpu(report: dict[str, Any]) -> None:
    """Fill in the configured backend's view; raise GpuUnavailable if it cannot use the GPU."""
    backend = backends.prepare_process("gpu")
    report["framework"] = backend
    try:
        report.update(backends.framework_versions(backend))
    except ImportError as exc:
        msg = f"Keras backend {backend} is not installed ({exc})"
        raise backends.GpuUnavailable(msg) from None
    gpu = backends.init_gpu(backend)
    report["device_name"] = report.get("device_name") or gpu.name
    report["framework_device_name"] = gpu.name


def probe_main() -> int:
    """Child entry point: print one result line and exit 0, whatever the GPU's state."""
    die_with_parent()
    injected = faults.active()
    if "probe_hang" in injected:
        time.sleep(365 * 24 * 3600)
    if "probe_crash" in injected:
        os.abort()
    report = _no_gpu("not probed")
    try:
        report.update(_cuda_driver())
    except RuntimeError as exc:
        # Without a working driver no framework can use a GPU: skip the
        # seconds of TensorFlow import and report its installed version.
        report["error"] = str(exc)
        report["driver_found"] = "not loadable" not in str(exc)
        report["framework_version"] = backends.installed_version(report["framework"])
        emit(RESULT_PREFIX, report)
        return 0
    report["driver_found"] = True
    try:
        _framework_gpu(report)
    except Exception as exc:  # noqa: BLE001 - any framework failure means "not usable"
        what = str(exc) if isinstance(exc, backends.GpuUnavailable) else f"{type(exc).__name__}: {exc}"
        fix = _GPU_BUILD_FIX.get(report["framework"], "")
        report["error"] = (
            f"NVIDIA driver {report.get('driver_version')} and {report.get('device_count')} GPU(s) found, "
            f"but {report['framework']} cannot use them: {what}" + (f". Fix: {fix}" if fix else "")
        )
        report["fix"] = fix
    else:
        report["usable"] = True
        report["error"] = None
    emit(RESULT_PREFIX, report)
    return 0


if __name__ == "__main__":
    sys.exit(probe_main())
