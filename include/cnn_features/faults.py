"""Test hook: inject failures into child processes, since no GPU is here to fail.

Set ``CNN_FEATURES_TEST_FAULT`` to a comma-separated list of faults; only
child processes read it, and only at the points named below. Unset in
production.

========================  =====================================================
``gpu_init_error``        the GPU worker fails at CUDA initialisation with the
                          driver's ``CUDA_ERROR_NOT_INITIALIZED`` text
``fake_gpu``              the GPU worker skips its CUDA check and runs on what
                          TensorFlow has, so GPU-only paths (a GPU worker dying
                          mid-shard) can be driven on a machine without a GPU
``gpu_die_after=N``       the GPU worker SIGKILLs itself after writing N files
``die_after=N``           any worker SIGKILLs itself after writing N files
``slow=SECONDS``          any worker sleeps SECONDS after each batch it writes,
                          so a run stays in progress long enough to watch it
``fsize_limit=BYTES``     any worker runs under RLIMIT_FSIZE=BYTES, so writing
                          a feature file fails as on a full disk
``as_headroom=BYTES``     once its model is loaded, any worker runs under an
                          RLIMIT_AS (address space, as ``ulimit -v``) of its
                          size then plus BYTES: a machine short of memory
``no_lineage``            any worker runs as before lineage: a valid feature is
                          reused by its name alone, no input or feature is
                          hashed and no record written (``bench/lineage.py``'s
                          baseline; verification then refuses the features)
``probe_hang``            the GPU probe child never returns
``probe_crash``           the GPU probe child aborts (SIGABRT)
========================  =====================================================
"""

from __future__ import annotations

import os
import resource
import signal

ENV_VAR = "CNN_FEATURES_TEST_FAULT"

# The text a CUDA driver gives a process whose context did not survive fork().
CUDA_NOT_INITIALIZED = (
    "CUDA error: Failed setting context: CUDA_ERROR_NOT_INITIALIZED: initialization error"
)


def active() -> dict[str, str | None]:
    """Return the faults named in the environment, with their arguments."""
    faults: dict[str, str | None] = {}
    for item in os.environ.get(ENV_VAR, "").split(","):
        name, sep, arg = item.strip().partition("=")
        if name:
            faults[name] = arg if sep else None
    return faults


def count_arg(name: str) -> int | None:
    """Return the integer argument of fault ``name``, or None when it is not set."""
    arg = active().get(name)
    return int(arg) if arg is not None and arg.isdigit() else None


def kill_self() -> None:
    """Die at once as a SIGKILLed process would: no cleanup, no result."""
    os.kill(os.getpid(), signal.SIGKILL)


def limit_address_space(headroom: int) -> None:
    """Cap this process's address space (RLIMIT_AS) at its present size plus ``headroom`` bytes."""
    with open("/proc/self/status", encoding="ascii") as fh:
        size = next(int(line.split()[1]) << 10 for line in fh if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (size + headroom, size + headroom))
