"""Memory of forward passes: what a frame costs in the model, and how much a worker may spend on one pass.

The model check works out, from the model's layer shapes, the peak bytes of
activations one input frame costs (``activation_bytes_per_frame``) and
carries it in the model info. A shard worker sets itself a budget
(``pass_budget``) and sizes each pass to it (``worker.pass_size``); a clip
that alone needs more is a bad input, not a crash.
"""

from __future__ import annotations

import math
import resource
from pathlib import Path
from typing import Any

# Frames of the symbolic input the layer shapes are worked out at: long enough
# that pooled axes, rounded down, are within 1 % of their share of a frame.
ESTIMATE_FRAMES = 4096
# Measured peak over the liveness estimate below: the reference CNN's RSS rose
# by 37 KiB per frame for a 100,000-frame clip on CPU (TensorFlow, oneDNN),
# against an estimate of 32 KiB (26 KiB measured at 20,000 frames); the rest is
# allocator rounding and layout copies. 1.5 covers that with room to spare.
ACTIVATION_SAFETY = 1.5
# Bytes per frame and mel bin where the layer shapes cannot be worked out (a
# model whose layers are shared or not traceable): 1.5 x the reference CNN's
# 32 KiB per frame of 128 mels, about 384 bytes per mel bin, rounded up.
FALLBACK_BYTES_PER_FRAME_PER_MEL = 512
# Share of the memory a CPU worker may still use that one pass may take: the
# rest is left to the inputs queued for the next passes, TensorFlow's thread
# stacks and pools, and a second worker loading its model beside this one.
CPU_BUDGET_SHARE = 0.5
# Share of the GPU's memory one pass may take: the model's weights, cuDNN's
# workspaces and the framework's allocator pools need the rest.
GPU_BUDGET_SHARE = 0.5
# Budget of a GPU pass when the probe did not report the GPU's memory: fits
# any GPU this pipeline can use (16 GiB and up) with the share above.
DEFAULT_GPU_BUDGET_BYTES = 4 << 30
# The setting that fixes the budget by hand (``Settings.pass_memory_mb``).
BUDGET_ENV = "CNN_FEATURES_PASS_MEMORY_MB"


def activation_bytes_per_frame(model: Any, *, n_mels: int, frames: int | None, channel_axis: bool) -> int:
    """Return the peak bytes of activations one input frame costs in ``model``, with a safety margin.

    The layers are walked in the model's (topological) order; a layer's
    output stays alive from the layer that makes it to the last layer that
    reads it, and the peak is the largest total alive at any one layer. The
    shapes come from Keras' symbolic shape inference at ``ESTIMATE_FRAMES``
    frames (or the model's fixed frame count), so nothing is run. Where that
    fails, ``FALLBACK_BYTES_PER_FRAME_PER_MEL`` x mel bins.
    """
    at = frames or ESTIMATE_FRAMES
    try:
        peak = _peak_activation_bytes(model, n_mels=n_mels, frames=at, channel_axis=channel_axis)
    except Exception:  # noqa: BLE001 - any model Keras cannot trace symbolically gets the fallback
        return FALLBACK_BYTES_PER_FRAME_PER_MEL * n_mels
    return math.ceil(peak * ACTIVATION_SAFETY / at)


def _peak_activation_bytes(model: Any, *, n_mels: int, frames: int, channel_axis: bool) -> int:
    import keras

    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    probe = keras.Model(model.inputs, [layer.output for layer in layers])
    shape = (1, n_mels, frames, 1) if channel_axis else (1, n_mels, frames)
    specs = probe.compute_output_spec(keras.KerasTensor(shape, dtype=model.inputs[0].dtype))
    out_bytes = {id(layer): _nbytes(spec) for layer, spec in zip(layers, specs, strict=True)}
    order = {id(layer): i for i, layer in enumerate(layers)}
    last_use = dict(order)
    input_bytes = _nbytes(keras.KerasTensor(shape, dtype=model.inputs[0].dtype))
    input_last = 0
    for i, layer in enumerate(layers):
        for tensor in keras.tree.flatten(layer.input):
            producer = getattr(getattr(tensor, "_keras_history", None), "operation", None)
            if producer is not None and id(producer) in last_use:
                last_use[id(producer)] = max(last_use[id(producer)], i)
            else:
                input_last = max(input_last, i)
    peak = 0
    for i in range(len(layers)):
        alive = sum(out_bytes[key] for key, first in order.items() if first <= i <= last_use[key])
        peak = max(peak, alive + (input_bytes if i <= input_last else 0))
    return peak


def _nbytes(spec: Any) -> int:
    """Return the bytes of a symbolic tensor of concrete shape."""
    import numpy as np

    return int(math.prod(int(d) for d in spec.shape)) * np.dtype(str(spec.dtype)).itemsize


def pass_budget(device: str, *, configured_mb: int = 0, gpu_memory_mb: int | None = None) -> tuple[int, str]:
    """Return the bytes of activations a pass on ``device`` may take, and where that figure comes from.

    ``configured_mb`` (``CNN_FEATURES_PASS_MEMORY_MB``) fixes it; otherwise a
    GPU pass gets ``GPU_BUDGET_SHARE`` of the GPU's memory, a CPU pass
    ``CPU_BUDGET_SHARE`` of what this process may still use (``memory_headroom``).
    """
    if configured_mb > 0:
        return configured_mb << 20, f"{BUDGET_ENV}={configured_mb}"
    if device == "gpu":
        if gpu_memory_mb:
            return int(gpu_memory_mb * GPU_BUDGET_SHARE) << 20, f"{GPU_BUDGET_SHARE:.0%} of the GPU's {gpu_memory_mb:,} MiB"
        return DEFAULT_GPU_BUDGET_BYTES, "the default GPU pass budget (GPU memory unknown)"
    headroom, what = memory_headroom()
    return int(headroom * CPU_BUDGET_SHARE), f"{CPU_BUDGET_SHARE:.0%} of the {headroom >> 20:,} MiB {what}"


def memory_headroom() -> tuple[int, str]:
    """Return the bytes this process may still allocate, and the limit that decides it.

    The smallest of: the machine's available memory (``MemAvailable``), the
    room left under the cgroup's ``memory.max``, and the room left under
    ``RLIMIT_AS`` (address space: what ``ulimit -v`` sets).
    """
    limits: list[tuple[int, str]] = []
    if (available := _meminfo_bytes("MemAvailable")) is not None:
        limits.append((available, "available on this machine"))
    if (room := _cgroup_room()) is not None:
        limits.append((room, "left under this cgroup's memory.max"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        used = _status_bytes("VmSize") or 0
        limits.append((max(0, soft - used), "left under RLIMIT_AS"))
    if not limits:
        return 1 << 30, "assumed (no memory figure readable)"
    return min(limits)


def _meminfo_bytes(key: str) -> int | None:
    return _kib_field(Path("/proc/meminfo"), key)


def _status_bytes(key: str) -> int | None:
    return _kib_field(Path("/proc/self/status"), key)


def _kib_field(path: Path, key: str) -> int | None:
    try:
        with open(path, encoding="ascii") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                if name == key:
                    return int(value.split()[0]) << 10
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    """Return the bytes left under this process's cgroup v2 ``memory.max``, or None where there is no limit."""
    try:
        rel = next(
            line.split(":", 2)[2].strip()
            for line in Path("/proc/self/cgroup").read_text(encoding="ascii").splitlines()
            if line.startswith("0::")
        )
        folder = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (folder / "memory.max").read_text(encoding="ascii").strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((folder / "memory.current").read_text(encoding="ascii").strip()))
    except (OSError, ValueError, StopIteration, IndexError):
        return None
