"""scripts/setup.sh picks the GPU build only where an NVIDIA driver answers, and says why."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.stub_cuda import build_stub_driver

REPO = Path(__file__).resolve().parents[1]


def detect(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``setup.sh --detect-gpu`` with only system folders on PATH plus ``env``; install nothing."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CNN_FEATURES_", "KERAS_BACKEND", "LD_LIBRARY_PATH"))}
    base["PATH"] = f"{tmp_path / 'bin'}:/usr/local/bin:/usr/bin:/bin"
    (tmp_path / "bin").mkdir(exist_ok=True)
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "setup.sh"), "--detect-gpu"],
        env={**base, **env}, capture_output=True, text=True, timeout=60, check=False,
    )


@pytest.fixture
def no_driver(tmp_path: Path) -> None:
    """Skip where this machine has a real NVIDIA driver: detection would rightly find it."""
    done = subprocess.run(["python3", "-c", "import ctypes; ctypes.CDLL('libcuda.so.1')"], capture_output=True, check=False)
    if done.returncode == 0:
        pytest.skip("a real libcuda.so.1 is loadable here; the no-driver path cannot be seen")


def test_no_driver_means_cpu_build(tmp_path: Path, no_driver: None) -> None:
    """Without libcuda.so.1 or nvidia-smi the CPU build is chosen, and the output says why."""
    done = detect(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "setup: CPU build of tensorflow: no NVIDIA driver (libcuda.so.1 not loadable, nvidia-smi absent or not answering)"
    )


def test_loadable_driver_library_means_gpu_build(tmp_path: Path, no_driver: None) -> None:
    """A libcuda.so.1 on the loader path selects the pinned GPU build of the chosen backend."""
    stub = build_stub_driver(tmp_path / "driver")
    done = detect(tmp_path, LD_LIBRARY_PATH=str(stub))
    assert done.stdout.strip() == "setup: GPU build of tensorflow (tensorflow[and-cuda]==2.21.0): NVIDIA driver found (libcuda.so.1 loads)"
    done = detect(tmp_path, LD_LIBRARY_PATH=str(stub), CNN_FEATURES_KERAS_BACKEND="jax")
    assert "GPU build of jax (jax[cuda13]==0.10.2)" in done.stdout


def test_answering_nvidia_smi_means_gpu_build(tmp_path: Path, no_driver: None) -> None:
    """An nvidia-smi that lists a GPU selects the GPU build; one that fails does not."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir(parents=True, exist_ok=True)
    smi.write_text("#!/bin/sh\necho 'GPU 0: Stub (UUID: GPU-0)'\n")
    smi.chmod(0o755)
    assert "NVIDIA driver found (nvidia-smi answers)" in detect(tmp_path).stdout
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert "CPU build" in detect(tmp_path).stdout


def test_override_wins_over_detection(tmp_path: Path) -> None:
    """CNN_FEATURES_GPU=0 keeps the CPU build even with a driver; =1 forces the GPU build; other values are refused."""
    stub = build_stub_driver(tmp_path / "driver")
    assert detect(tmp_path, LD_LIBRARY_PATH=str(stub), CNN_FEATURES_GPU="0").stdout.strip() == (
        "setup: CPU build of tensorflow: CNN_FEATURES_GPU=0 asks for it"
    )
    assert "GPU build of tensorflow" in detect(tmp_path, CNN_FEATURES_GPU="1").stdout
    bad = detect(tmp_path, CNN_FEATURES_GPU="yes")
    assert bad.returncode == 2 and "expected 0 or 1" in bad.stderr
