"""A stub NVIDIA driver (libcuda.so.1) built from C, so driver detection can be tested without a GPU."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

# The driver API calls the probe makes, answering as one 80 GiB GPU on a CUDA 13.0 driver.
_SOURCE = r"""
#include <stddef.h>
#include <string.h>
int cuInit(unsigned int flags) { return 0; }
int cuDeviceGetCount(int *count) { *count = 1; return 0; }
int cuDeviceGet(int *device, int ordinal) { *device = ordinal; return 0; }
int cuDeviceGetName(char *name, int len, int device) { strncpy(name, "Stub GPU", len); return 0; }
int cuDeviceTotalMem_v2(size_t *bytes, int device) { *bytes = (size_t)80 << 30; return 0; }
int cuDriverGetVersion(int *version) { *version = 13000; return 0; }
int cuGetErrorName(int error, const char **text) { *text = "CUDA_ERROR_STUB"; return 0; }
"""


def build_stub_driver(folder: Path) -> Path:
    """Compile the stub into ``folder/libcuda.so.1``; return the folder (for LD_LIBRARY_PATH). Skips without a C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (cc) to build a stub libcuda.so.1")
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "stub_cuda.c"
    source.write_text(_SOURCE)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(folder / "libcuda.so.1"), str(source)], check=True, capture_output=True)
    return folder
