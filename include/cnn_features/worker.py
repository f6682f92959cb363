"""Shard worker: a fresh process that extracts one shard on one device.

Started by ``runner.run_shard`` as ``python -m cnn_features.worker --spec S
--device gpu|cpu``. Prints progress lines while it runs and one result line at
the end (see ``procs``). Exit codes: 0 done (bad inputs are listed, not fatal),
3 the GPU could not be initialised, 4 the model could not be loaded, 5 an
output could not be written, 6 a store (S3) could not be reached or refused a
request. Inputs and outputs are local folders or S3 prefixes (``stores``); S3
credentials come from the environment only, never from the spec.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import json
import logging
import os
import queue
import resource
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from cnn_features import faults
from cnn_features.config import load_settings
from cnn_features.errors import InvalidSpectrogram, StoreError
from cnn_features.procs import PROGRESS_PREFIX, RESULT_PREFIX, die_with_parent, emit
from cnn_features.spectrogram import MAX_INPUT_BYTES, parse_spectrogram
from cnn_features.storage import npy_bytes
from cnn_features.stores import Store, open_store, valid_features

log = logging.getLogger("cnn_features.worker")

EXIT_OK = 0
EXIT_GPU_INIT = 3
EXIT_MODEL = 4
EXIT_OUTPUT = 5
EXIT_STORE = 6
# Spectrogram frames in one CPU forward pass (clips x frames), by the widest
# vector unit oneDNN runs on. AVX-512 (a 2-core Xeon): 4 clips of 256 frames
# ran at ~400 files/s, 16 at ~355: bigger passes spill the first block's
# activations out of its 2 MB L2. AVX2 (a 2-core EPYC, 512 kB L2, 32 MB L3):
# the whole stage ran ~3.5 % faster with passes of 16 than of 4, and one
# clip alone ran at less than half its speed in a pass of two (oneDNN's
# single-image kernels). A clip longer than this runs alone.
CPU_PASS_FRAMES_AVX512 = 1024
CPU_PASS_FRAMES = 4096
# Passes queued per inference thread: enough that a thread never waits for
# the next one, few enough that memory stays flat however big the shard.
PREFETCH_PASSES = 3
# Seconds to wait for a thread to finish after the shard ended or failed.
_JOIN_TIMEOUT_S = 30.0
# Seconds between progress lines: often enough to watch, rare enough to read.
PROGRESS_EVERY_S = 2.0
# Seconds between tries for a busy CPU slot: negligible next to a shard.
_SLOT_POLL_S = 0.05


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


def _pending(spec: dict[str, Any], info: dict[str, Any], output: Store, tally: Tally) -> list[tuple[int, str]]:
    """Return (size, relpath) of files still to extract, smallest first; tally the rest.

    Ordering by size (from the plan's listing) puts equal shapes side by
    side without reading a header, so passes fill up; the passes themselves
    still group equal shapes only.
    """
    rejected: dict[str, str] = spec.get("rejected", {})
    sizes = spec.get("sizes") or [0] * len(spec["files"])
    candidates = [rel for rel in spec["files"] if rel not in rejected]
    done = valid_features(output, candidates, feature_dim=info["feature_dim"])
    todo: list[tuple[int, str]] = []
    for rel, size in zip(spec["files"], sizes, strict=True):
        if rel in rejected:
            tally.bad.append({"file": rel, "reason": rejected[rel]})
        elif rel in done:
            tally.skipped += 1
        else:
            todo.append((int(size), rel))
    todo.sort()
    return todo


def pass_size(frames: int, *, batch_size: int, device: str) -> int:
    """Return how many equal-shape inputs of ``frames`` frames go through the model at once.

    ``batch_size`` is the upper bound. On CPU a pass also stays within
    ``cpu_pass_frames()`` frames.
    """
    if device != "cpu":
        return batch_size
    return max(1, min(batch_size, cpu_pass_frames() // max(frames, 1)))


@functools.cache
def cpu_pass_frames() -> int:
    """Return the frames of one CPU pass on this machine: fewer where oneDNN runs AVX-512 kernels."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        flags = []
    return CPU_PASS_FRAMES_AVX512 if "avx512f" in flags else CPU_PASS_FRAMES


@contextlib.contextmanager
def cpu_slot(streams: int, shard_id: str) -> Iterator[None]:
    """Hold one of this machine's CPU slots: usable cores // ``streams``, at least one.

    A CPU worker's passes keep ``streams`` cores busy; more workers than slots
    would only share the same cores (and their caches). Two shards started
    together on two cores load TensorFlow side by side, then run one after
    the other: the second start-up hides behind the first shard's work. Slots
    are ``flock`` locks in a per-user folder of the temporary directory, shared
    by every deployment on the machine; the kernel frees a dead worker's slot.
    """
    slots = max(1, len(os.sched_getaffinity(0)) // max(1, streams))
    folder = Path(tempfile.gettempdir()) / f"cnn-features-{os.getuid()}"
    handles: list[IO[str]] = []
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        handles += [open(folder / f"cpu-slot-{i}.lock", "a+", encoding="utf-8") for i in range(slots)]  # noqa: SIM115 - closed below
    except OSError as exc:
        for handle in handles:
            handle.close()
        log.warning("shard %s: no CPU slot lock in %s (%s); running without one", shard_id, folder, exc)
        yield
        return
    try:
        held = _take_slot(handles, shard_id)
        held.seek(0)
        held.truncate()
        held.write(f"shard {shard_id}, pid {os.getpid()}\n")
        held.flush()
        yield
    finally:
        for handle in handles:
            handle.close()  # closing drops the lock


def _take_slot(handles: list[IO[str]], shard_id: str) -> IO[str]:
    waiting_since: float | None = None
    while True:
        for handle in handles:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            if waiting_since is not None:
                log.info("shard %s: got a CPU slot after %.1f s", shard_id, time.monotonic() - waiting_since)
            return handle
        if waiting_since is None:
            waiting_since = time.monotonic()
            handles[0].seek(0)
            log.info("shard %s: every CPU slot is busy (%s); waiting", shard_id, handles[0].read().strip() or "another worker")
        time.sleep(_SLOT_POLL_S)


def cpu_streams(configured: int) -> int:
    """Return how many passes a CPU worker runs at once: ``configured``, or one per usable core."""
    return configured if configured > 0 else len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class Pass:
    """Equal-shape spectrograms that go through the model together, stacked."""

    rels: list[str]
    batch: np.ndarray


def _passes(
    source: Store, info: dict[str, Any], todo: list[tuple[int, str]], *, size: Callable[[int], int]
) -> Iterator[Pass | tuple[str, InvalidSpectrogram]]:
    """Read ``todo`` in order; yield passes of equal shapes, and (relpath, reason) for files that fail."""
    rels: list[str] = []
    arrays: list[np.ndarray] = []
    for rel, data in source.read_many(((r, s) for s, r in todo), max_bytes=MAX_INPUT_BYTES):
        if isinstance(data, InvalidSpectrogram):
            yield rel, data
            continue
        try:
            array = parse_spectrogram(
                data, rel, n_mels=info["n_mels"], min_frames=info["min_frames"], frames=info["frames"]
            )
        except InvalidSpectrogram as exc:
            yield rel, exc
            continue
        if arrays and (arrays[0].shape != array.shape or len(arrays) >= size(array.shape[1])):
            yield Pass(rels, np.stack(arrays))
            rels, arrays = [], []
        rels.append(rel)
        arrays.append(array)
    if arrays:
        yield Pass(rels, np.stack(arrays))


def _infer_loop(
    predictor: Callable[[np.ndarray], np.ndarray],
    passes: queue.SimpleQueue[Pass | None],
    results: queue.SimpleQueue[tuple[Any, ...]],
    stop: threading.Event,
) -> None:
    """Run passes through the model until handed None; put each pass's features (or its error) on ``results``."""
    while (item := passes.get()) is not None:
        if stop.is_set():
            continue
        try:
            features = predictor(item.batch)
        except Exception as exc:  # noqa: BLE001 - handed to the main thread, which re-raises it
            results.put(("error", exc))
            return
        results.put(("done", item.rels, features))


def _results(
    source: Iterator[Pass | tuple[str, InvalidSpectrogram]],
    predictor: Callable[[np.ndarray], np.ndarray],
    *,
    streams: int,
) -> Iterator[tuple[Any, ...]]:
    """Yield ("bad", rel, reason) and ("done", rels, features) while ``streams`` threads run the passes.

    The calling thread does all file I/O: it loads passes from ``source``
    (keeping ``PREFETCH_PASSES`` per thread queued) and writes what this
    yields. File I/O on a second Python thread would fight it for the GIL at
    every system call: measured, that made each feature write cost 275 us of
    CPU instead of 29 us. The inference threads hold the GIL only between
    passes. Re-raises whatever a pass raised; stops the threads however the
    caller leaves.
    """
    passes: queue.SimpleQueue[Pass | None] = queue.SimpleQueue()
    results: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
    stop = threading.Event()
    threads = [
        threading.Thread(target=_infer_loop, args=(predictor, passes, results, stop), name=f"infer-{i}", daemon=True)
        for i in range(streams)
    ]
    for thread in threads:
        thread.start()
    in_flight = 0
    exhausted = False
    try:
        while True:
            while not exhausted and in_flight < PREFETCH_PASSES * streams:
                item = next(source, None)
                if item is None:
                    exhausted = True
                elif isinstance(item, Pass):
                    passes.put(item)
                    in_flight += 1
                else:
                    yield ("bad", *item)
            if in_flight == 0:
                return
            done = results.get()
            in_flight -= 1
            if done[0] == "error":
                raise done[1]
            yield done
    finally:
        stop.set()
        for _ in threads:
            passes.put(None)
        for thread in threads:
            thread.join(timeout=_JOIN_TIMEOUT_S)


def _load_predictor(info: dict[str, Any], device: str, streams: int) -> Callable[[np.ndarray], np.ndarray]:
    """Import the model code, set up threads, load, fold and trace the model; return its predictor."""
    from cnn_features.model import ModelInfo, configure_cpu_threads, inference_model, load_feature_model, make_predictor

    if device == "cpu":
        configure_cpu_threads(streams=streams)
    model, _ = load_feature_model(Path(info["path"]))
    model_info = ModelInfo(**info)
    return make_predictor(inference_model(model, model_info), model_info)


def extract(spec: dict[str, Any], device: str) -> dict[str, Any]:
    """Extract every pending file of the shard; return the shard's result.

    The shard's files are checked (headers, existing outputs), TensorFlow and
    the model are loaded, and a CPU worker then waits for a CPU slot
    (``cpu_slot``): its start-up overlaps another shard's passes instead of
    competing with them. Then ``streams`` threads run forward passes while
    this thread loads the next passes and writes each feature atomically.
    """
    info = spec["model"]
    settings = load_settings()
    streams = cpu_streams(settings.cpu_threads) if device == "cpu" else 1
    tally = Tally(total=len(spec["files"]))
    source, output = open_store(spec["input"], settings), open_store(spec["output"], settings)
    output.prepare(spec["files"])
    todo = _pending(spec, info, output, tally)
    predictor = _load_predictor(info, device, streams)
    tally.progress(device, force=True)
    with contextlib.ExitStack() as held:
        waited = time.monotonic()
        if device == "cpu" and todo:
            held.enter_context(cpu_slot(streams, spec["shard_id"]))
        waited = time.monotonic() - waited
        log.info("shard %s: %d files to extract on %s, %d pass(es) at once", spec["shard_id"], len(todo), device.upper(), streams)
        tally.started = time.monotonic()
        _extract_pending(spec, info, (source, output), todo, predictor, tally, device=device, streams=streams)
    elapsed = time.monotonic() - tally.started
    return {
        "status": "ok",
        "device": device,
        "files_total": tally.total,
        "extracted": tally.extracted,
        "skipped_existing": tally.skipped,
        "bad": tally.bad,
        "elapsed_s": round(elapsed, 3),
        "waited_for_cpu_s": round(waited, 3),
        "files_per_s": round(tally.rate(), 2),
    }


def _extract_pending(
    spec: dict[str, Any],
    info: dict[str, Any],
    stores: tuple[Store, Store],
    todo: list[tuple[int, str]],
    predictor: Callable[[np.ndarray], np.ndarray],
    tally: Tally,
    *,
    device: str,
    streams: int,
) -> None:
    """Run every pending file through the model and write its feature; count everything in ``tally``.

    A feature counts as extracted once it is stored: at once locally, when
    its PUT returns on S3 (several run while the next passes compute).
    """
    source, output = stores
    batch_size = int(spec["batch_size"])
    die_after = faults.count_arg("die_after")
    if device == "gpu" and die_after is None:
        die_after = faults.count_arg("gpu_die_after")
    pause_s = float(faults.active().get("slow") or 0.0)

    def size(frames: int) -> int:
        return pass_size(frames, batch_size=batch_size, device=device)

    def stored(rels: list[str]) -> None:
        tally.extracted += len(rels)
        if die_after is not None and tally.extracted >= die_after:
            faults.kill_self()

    passes = _passes(source, info, todo, size=size)
    with output.writer() as writer, contextlib.closing(_results(passes, predictor, streams=streams)) as items:
        for kind, *payload in items:
            if kind == "bad":
                rel, reason = payload
                tally.bad.append({"file": rel, "reason": str(reason)})
                continue
            rels, features = payload
            for rel, vector in zip(rels, features, strict=True):
                stored(writer.put(rel, npy_bytes(vector)))
            if pause_s:
                time.sleep(pause_s)
            tally.progress(device)
        stored(writer.flush())
    tally.progress(device, force=True)


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
    except StoreError as exc:
        emit(RESULT_PREFIX, {"status": "store_failed", "device": args.device, "error": str(exc)})
        return EXIT_STORE
    except OSError as exc:
        error = f"cannot write features under {spec['output']}: {exc}"
        emit(RESULT_PREFIX, {"status": "output_failed", "device": args.device, "error": error})
        return EXIT_OUTPUT
    emit(RESULT_PREFIX, result)
    return EXIT_OK


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: with TensorFlow loaded it takes about 0.5 s,
    # and every feature is already renamed into place, every line flushed.
    os._exit(code)
