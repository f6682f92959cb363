"""Shard worker: a fresh process that extracts one shard on one device.

Started by ``runner.run_shard`` as ``python -m cnn_features.worker --spec S
--device gpu|cpu``. Prints progress lines while it runs and one result line at
the end (see ``procs``). Exit codes: 0 done (bad inputs are listed, not fatal),
3 the GPU could not be initialised, 4 the model could not be loaded, 5 an
output could not be written.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnn_features import faults
from cnn_features.errors import InvalidSpectrogram
from cnn_features.procs import PROGRESS_PREFIX, RESULT_PREFIX, die_with_parent, emit
from cnn_features.spectrogram import check_header, load_spectrogram, read_header, resolve_inside
from cnn_features.storage import check_feature_file, remove_stale_temps, save_npy_atomic

log = logging.getLogger("cnn_features.worker")

EXIT_OK = 0
EXIT_GPU_INIT = 3
EXIT_MODEL = 4
EXIT_OUTPUT = 5
# Files read ahead of the one being inferred, so disk and decode overlap compute.
PREFETCH = 64
# Seconds between progress lines: often enough to watch, rare enough to read.
PROGRESS_EVERY_S = 2.0


class GpuInitError(RuntimeError):
    """The GPU could not be initialised in this process."""


@dataclass
class Tally:
    """Counts of one shard run, reported as it goes and at the end."""

    total: int
    started: float = field(default_factory=time.monotonic)
    skipped: int = 0
    extracted: int = 0
    bad: list[dict[str, str]] = field(default_factory=list)
    last_report: float = 0.0

    @property
    def done(self) -> int:
        return self.skipped + self.extracted + len(self.bad)

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.extracted / elapsed if elapsed > 0 else 0.0

    def progress(self, device: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_report < PROGRESS_EVERY_S:
            return
        self.last_report = now
        emit(
            PROGRESS_PREFIX,
            {
                "device": device,
                "done": self.done,
                "total": self.total,
                "extracted": self.extracted,
                "skipped": self.skipped,
                "bad": len(self.bad),
                "files_per_s": round(self.rate(), 2),
                "elapsed_s": round(now - self.started, 2),
            },
        )


def init_gpu() -> str:
    """Make sure this process can run kernels on a GPU; return its name."""
    injected = faults.active()
    if "gpu_init_error" in injected:
        raise GpuInitError(f"{faults.CUDA_NOT_INITIALIZED} (injected by {faults.ENV_VAR})")
    if "fake_gpu" in injected:
        return f"none (fake_gpu injected by {faults.ENV_VAR})"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        msg = "TensorFlow sees no GPU in the worker process"
        raise GpuInitError(msg)
    try:
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
        with tf.device("/GPU:0"):
            float(tf.reduce_sum(tf.ones((8, 8))))
    except (RuntimeError, tf.errors.OpError) as exc:
        raise GpuInitError(f"{type(exc).__name__}: {exc}") from None
    return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU:0")


def _pending(spec: dict[str, Any], info: dict[str, Any], tally: Tally) -> list[tuple[tuple[int, int], str]]:
    """Return (shape, relpath) of files still to extract, sorted by shape; tally the rest."""
    input_root, output_root = Path(spec["input"]), Path(spec["output"])
    rejected: dict[str, str] = spec.get("rejected", {})
    todo: list[tuple[tuple[int, int], str]] = []
    for rel in spec["files"]:
        if rel in rejected:
            tally.bad.append({"file": rel, "reason": rejected[rel]})
            continue
        if check_feature_file(output_root / rel, feature_dim=info["feature_dim"]) is None:
            tally.skipped += 1
            continue
        try:
            path = resolve_inside(input_root, rel)
            header = read_header(path, rel)
            check_header(
                header, rel, n_mels=info["n_mels"], min_frames=info["min_frames"], frames=info["frames"]
            )
        except InvalidSpectrogram as exc:
            tally.bad.append({"file": rel, "reason": str(exc)})
            continue
        todo.append((header.shape, rel))  # type: ignore[arg-type]
    todo.sort()
    return todo


def _loaded(
    spec: dict[str, Any], info: dict[str, Any], todo: list[tuple[tuple[int, int], str]], pool: ThreadPoolExecutor
) -> Iterator[tuple[str, np.ndarray | InvalidSpectrogram]]:
    """Yield (relpath, array or the reason it failed), reading ahead on ``pool``."""
    input_root = Path(spec["input"])

    def load(rel: str) -> np.ndarray | InvalidSpectrogram:
        try:
            return load_spectrogram(
                input_root / rel,
                relpath=rel,
                n_mels=info["n_mels"],
                min_frames=info["min_frames"],
                frames=info["frames"],
            )
        except InvalidSpectrogram as exc:
            return exc

    queue: deque[tuple[str, Future[np.ndarray | InvalidSpectrogram]]] = deque()
    items = iter(todo)
    for _, rel in items:
        queue.append((rel, pool.submit(load, rel)))
        if len(queue) >= PREFETCH:
            break
    while queue:
        rel, future = queue.popleft()
        nxt = next(items, None)
        if nxt is not None:
            queue.append((nxt[1], pool.submit(load, nxt[1])))
        yield rel, future.result()


def extract(spec: dict[str, Any], device: str) -> dict[str, Any]:
    """Extract every pending file of the shard; return the shard's result."""
    from cnn_features.model import ModelInfo, load_feature_model, predict

    info = spec["model"]
    model, _ = load_feature_model(Path(info["path"]))
    model_info = ModelInfo(**info)
    output_root = Path(spec["output"])
    batch_size = int(spec["batch_size"])
    die_after = faults.count_arg("die_after")
    if device == "gpu" and die_after is None:
        die_after = faults.count_arg("gpu_die_after")

    tally = Tally(total=len(spec["files"]))
    by_folder: dict[Path, set[str]] = {}
    for rel in spec["files"]:
        out = output_root / rel
        by_folder.setdefault(out.parent, set()).add(out.name)
    for folder, names in by_folder.items():
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(folder, names)

    todo = _pending(spec, info, tally)
    tally.progress(device, force=True)
    batch: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        features = predict(model, np.stack([a for _, a in batch]), model_info)
        for (rel, _), vector in zip(batch, features, strict=True):
            save_npy_atomic(output_root / rel, vector)
            tally.extracted += 1
            if die_after is not None and tally.extracted >= die_after:
                faults.kill_self()
        batch.clear()
        tally.progress(device)

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="load") as pool:
        for rel, loaded in _loaded(spec, info, todo, pool):
            if isinstance(loaded, InvalidSpectrogram):
                tally.bad.append({"file": rel, "reason": str(loaded)})
                continue
            if batch and (batch[0][1].shape != loaded.shape or len(batch) >= batch_size):
                flush()
            batch.append((rel, loaded))
        if batch:
            flush()
    tally.progress(device, force=True)
    elapsed = time.monotonic() - tally.started
    return {
        "status": "ok",
        "device": device,
        "files_total": tally.total,
        "extracted": tally.extracted,
        "skipped_existing": tally.skipped,
        "bad": tally.bad,
        "elapsed_s": round(elapsed, 3),
        "files_per_s": round(tally.rate(), 2),
    }


def main(argv: list[str] | None = None) -> int:
    """Run one shard from its spec file on the given device."""
    parser = argparse.ArgumentParser(prog="python -m cnn_features.worker")
    parser.add_argument("--spec", type=Path, required=True, help="shard spec JSON")
    parser.add_argument("--device", choices=("gpu", "cpu"), required=True)
    args = parser.parse_args(argv)
    die_with_parent()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # Past a file-size limit (RLIMIT_FSIZE) the kernel would kill us with
    # SIGXFSZ; ignored, the write fails with EFBIG and is reported like a full disk.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if (limit := faults.count_arg("fsize_limit")) is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    spec = json.loads(args.spec.read_text(encoding="utf-8"))

    if args.device == "gpu":
        try:
            name = init_gpu()
        except GpuInitError as exc:
            emit(RESULT_PREFIX, {"status": "gpu_init_failed", "device": "gpu", "error": str(exc)})
            return EXIT_GPU_INIT
        log.info("shard %s: running on GPU %s", spec["shard_id"], name)

    from cnn_features.errors import ModelError

    try:
        result = extract(spec, args.device)
    except ModelError as exc:
        emit(RESULT_PREFIX, {"status": "model_failed", "device": args.device, "error": str(exc)})
        return EXIT_MODEL
    except OSError as exc:
        error = f"cannot write features under {spec['output']}: {exc}"
        emit(RESULT_PREFIX, {"status": "output_failed", "device": args.device, "error": error})
        return EXIT_OUTPUT
    emit(RESULT_PREFIX, result)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
