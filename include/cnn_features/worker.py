"""Shard worker: a fresh process that extracts one shard on one device.

Started by ``runner.run_shard`` as ``python -m cnn_features.worker --spec S
--device gpu|cpu``. Prints progress lines while it runs and one result line at
the end (see ``procs``). Exit codes: 0 done (bad inputs are listed, not fatal),
3 the GPU could not be initialised, 4 the model could not be loaded or run, 5 an
output could not be written, 6 a store (S3) could not be reached or refused a
request, 7 the inputs could not be read, 8 a GPU pass failed (a GPU fault: the
runner re-runs the shard on CPU), 9 an internal error (a bug: not retried on
CPU, the traceback is logged). Inputs and outputs are local folders or S3 prefixes (``stores``); S3
credentials come from the environment only, never from the spec.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import queue
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnn_features import faults, lineage
from cnn_features.config import load_settings
from cnn_features.errors import CnnFeaturesError, InvalidSpectrogram, ModelError, StoreError
from cnn_features.memory import FALLBACK_BYTES_PER_FRAME_PER_MEL, pass_budget
from cnn_features.procs import PROGRESS_PREFIX, RESULT_PREFIX, die_with_parent, emit
from cnn_features.shipping import local_model
from cnn_features.slots import SlotUnavailable, hold_slot
from cnn_features.spectrogram import MAX_INPUT_BYTES, parse_spectrogram
from cnn_features.storage import npy_bytes
from cnn_features.stores import LocalStore, Store, feature_digests, open_store, valid_features

log = logging.getLogger("cnn_features.worker")

EXIT_OK = 0
EXIT_GPU_INIT = 3
EXIT_MODEL = 4
EXIT_OUTPUT = 5
EXIT_STORE = 6
EXIT_INPUT = 7
EXIT_GPU_RUN = 8
EXIT_INTERNAL = 9
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


class InputReadError(CnnFeaturesError):
    """The shard's inputs could not be read (not one bad file: the folder or device failed)."""


class OutputWriteError(CnnFeaturesError):
    """A feature (or the output folder) could not be written."""


def write_error(output: str, exc: OSError) -> str:
    """Return why features cannot be written under ``output``, naming the folder that refused, not a temporary's name.

    The same fault gives the same words on every try (a temporary's name
    holds a pid and random characters), so repeated failures read as one.
    """
    reason = exc.strerror or str(exc)
    if exc.errno is not None:
        reason += f" (errno {exc.errno})"
    if not exc.filename:
        return f"cannot write features under {output}: {reason}"
    folder = Path(os.fsdecode(exc.filename)).parent
    base = Path(output)
    where = folder.relative_to(base).as_posix() if folder.is_relative_to(base) else str(folder)
    place = "its top folder" if where == "." else f"{where}/"
    return f"cannot write features under {output}: {reason} in {place}"


class InferenceError(CnnFeaturesError):
    """A forward pass raised; on a GPU that is a GPU fault, on a CPU a model error."""


@dataclass
class Tally:
    """Counts of one shard run, reported as it goes and at the end."""

    total: int
    started: float = field(default_factory=time.monotonic)
    skipped: int = 0
    extracted: int = 0
    bad: list[dict[str, str]] = field(default_factory=list)
    last_report: float = 0.0
    # Lineage entry of every feature this shard reused or stored, for its whole record.
    lineage: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Each read input's SHA-256, hashed while its bytes are in memory.
    digests: dict[str, str] = field(default_factory=dict)
    # Inputs read again to check their digest before reusing a feature (their stat changed, or on S3).
    inputs_hashed: int = 0
    # The output's listing when the shard started (S3: the whole prefix; locally, its records only).
    listing: list[tuple[str, int]] = field(default_factory=list)

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
    """Make sure this process can run kernels on a GPU with the configured Keras backend; return its name."""
    injected = faults.active()
    if "gpu_init_error" in injected:
        raise GpuInitError(f"{faults.CUDA_NOT_INITIALIZED} (injected by {faults.ENV_VAR})")
    if "fake_gpu" in injected:
        _RUN_INFO["gpu_name"] = f"none (fake_gpu injected by {faults.ENV_VAR})"
        return _RUN_INFO["gpu_name"]
    from cnn_features import backends

    backend = backends.prepare_process("gpu")
    try:
        gpu = backends.init_gpu(backend)
    except backends.GpuUnavailable as exc:
        raise GpuInitError(str(exc)) from None
    _RUN_INFO["gpu_name"] = gpu.name
    return gpu.name


# What this worker process runs on, for its result: filled by init_gpu and
# _load_predictor (one shard per process).
_RUN_INFO: dict[str, Any] = {}


def _pending(
    spec: dict[str, Any], info: dict[str, Any], stores: tuple[Store, Store], tally: Tally
) -> list[tuple[int, str]]:
    """Return (size, relpath) of files still to extract, smallest first; tally the rest.

    A file is skipped only when its feature is valid and its lineage says
    it was made from this input's bytes by this model (``lineage.reusable``).
    Ordering by size (from the plan's listing) puts equal shapes side by
    side without reading a header, so passes fill up; the passes themselves
    still group equal shapes only.
    """
    source, output = stores
    rejected: dict[str, str] = spec.get("rejected", {})
    sizes = spec.get("sizes") or [0] * len(spec["files"])
    candidates = [rel for rel in spec["files"] if rel not in rejected]
    if "no_lineage" in faults.active():  # the benchmark's baseline: reuse by name, as before lineage
        done = valid_features(output, candidates, feature_dim=info["feature_dim"])
        tally.lineage = {rel: {} for rel in done}
        candidates = []
    tally.listing = _records_listing(output)
    if not isinstance(output, LocalStore):  # one listing says which objects have a feature's size
        candidates = sorted(valid_features(output, candidates, feature_dim=info["feature_dim"], listing=tally.listing))
    digests = feature_digests(output, candidates, feature_dim=info["feature_dim"])
    entries = lineage.load_entries(output, listing=tally.listing, shard_id=spec["shard_id"]) if digests else {}
    if any(rel not in entries for rel in digests):  # made under another shard size: look in every record
        entries = lineage.load_entries(output, listing=tally.listing)
    if digests:
        tally.lineage, tally.inputs_hashed = lineage.reusable(source, digests, entries, model_digest=info["digest"])
    todo: list[tuple[int, str]] = []
    for rel, size in zip(spec["files"], sizes, strict=True):
        if rel in rejected:
            tally.bad.append({"file": rel, "reason": rejected[rel]})
        elif rel in tally.lineage:
            tally.skipped += 1
        else:
            todo.append((int(size), rel))
    todo.sort()
    return todo


def _records_listing(output: Store) -> list[tuple[str, int]]:
    """Return the output's listing the worker needs: on S3 the whole prefix, locally only the records folder."""
    if not isinstance(output, LocalStore):
        return output.list()
    try:
        with os.scandir(output.root / lineage.LINEAGE_DIR) as found:
            return sorted((f"{lineage.LINEAGE_DIR}/{e.name}", 0) for e in found if e.is_file(follow_symlinks=False))
    except (FileNotFoundError, NotADirectoryError):
        return []


def pass_size(
    frames: int, *, batch_size: int, device: str, budget: int | None = None, bytes_per_frame: int = 0, streams: int = 1
) -> int:
    """Return how many equal-shape inputs of ``frames`` frames go through the model at once; 0 if not even one fits.

    ``batch_size`` is the upper bound. On CPU a pass also stays within
    ``cpu_pass_frames()`` frames. With a memory ``budget`` (bytes of
    activations, ``memory.pass_budget``) and the model's ``bytes_per_frame``,
    on any device, a pass also stays within ``budget / streams``, so that
    ``streams`` passes side by side fit; a clip that needs more than that
    but fits the whole budget goes alone (``_MemoryLedger`` then runs it
    by itself), and one that needs more than the whole budget fits no pass.
    """
    size = batch_size if device != "cpu" else max(1, min(batch_size, cpu_pass_frames() // max(frames, 1)))
    if budget is None or bytes_per_frame <= 0:
        return size
    clip = bytes_per_frame * max(frames, 1)
    if clip > budget:
        return 0
    return max(1, min(size, budget // max(1, streams) // clip))


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
    are ``flock`` locks in the per-user slot folder (``slots``), shared by
    every deployment on the machine; the kernel frees a dead worker's slot.
    A refused folder or lock file (a planted symlink, an open folder) is
    logged and the worker runs without a slot.
    """
    slots = max(1, len(os.sched_getaffinity(0)) // max(1, streams))
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(hold_slot("CPU", [str(i) for i in range(slots)], shard_id, poll_s=_SLOT_POLL_S))
        except SlotUnavailable as exc:
            log.warning("shard %s: no CPU slot (%s); running without one", shard_id, exc)
        yield


def cpu_streams(configured: int) -> int:
    """Return how many passes a CPU worker runs at once: ``configured``, or one per usable core."""
    return configured if configured > 0 else len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class Pass:
    """Equal-shape spectrograms that go through the model together, stacked, and the activation bytes they need."""

    rels: list[str]
    batch: np.ndarray
    need: int = 0


class _MemoryLedger:
    """Lets passes run side by side only while their activation estimates fit the budget together.

    A pass that fits the budget alone always runs once nothing else does, so
    no pass waits forever; ``wake`` (after ``stop`` is set) frees every waiting thread.
    """

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self.used = 0
        self.changed = threading.Condition()

    def acquire(self, need: int, stop: threading.Event) -> bool:
        """Wait until ``need`` bytes fit (or nothing else runs); return False if stopped meanwhile."""
        if self.budget is None:
            return not stop.is_set()
        with self.changed:
            self.changed.wait_for(lambda: stop.is_set() or self.used == 0 or self.used + need <= self.budget)
            if stop.is_set():
                return False
            self.used += need
            return True

    def release(self, need: int) -> None:
        """Give back what ``acquire`` took."""
        if self.budget is None:
            return
        with self.changed:
            self.used -= need
            self.changed.notify_all()

    def wake(self) -> None:
        """Wake every waiting thread (after ``stop`` is set)."""
        with self.changed:
            self.changed.notify_all()


def _passes(
    source: Store,
    info: dict[str, Any],
    todo: list[tuple[int, str]],
    *,
    size: Callable[[int], int],
    read_threads: int = 1,
    too_long: Callable[[str, int], str] | None = None,
    digests: dict[str, str] | None = None,
) -> Iterator[Pass | tuple[str, InvalidSpectrogram]]:
    """Read ``todo`` in order; yield passes of equal shapes, and (relpath, reason) for files that fail.

    A clip for which ``size`` is 0 (it fits no pass) fails with ``too_long``'s reason.
    Each input's SHA-256 goes into ``digests``, hashed while its bytes are in
    memory (hashlib lets the inference threads run meanwhile).
    """
    per_frame = _bytes_per_frame(info)
    rels: list[str] = []
    arrays: list[np.ndarray] = []
    for rel, data in _read_inputs(source, todo, threads=read_threads):
        if isinstance(data, InvalidSpectrogram):
            yield rel, data
            continue
        if digests is not None:
            digests[rel] = lineage.sha256_hex(data)
        try:
            array = parse_spectrogram(
                data, rel, n_mels=info["n_mels"], min_frames=info["min_frames"], frames=info["frames"]
            )
        except InvalidSpectrogram as exc:
            yield rel, exc
            continue
        if size(array.shape[1]) == 0:
            yield rel, InvalidSpectrogram(too_long(rel, array.shape[1]) if too_long else f"{rel}: too long for any pass")
            continue
        if arrays and (arrays[0].shape != array.shape or len(arrays) >= size(array.shape[1])):
            yield Pass(rels, np.stack(arrays), len(arrays) * arrays[0].shape[1] * per_frame)
            rels, arrays = [], []
        rels.append(rel)
        arrays.append(array)
    if arrays:
        yield Pass(rels, np.stack(arrays), len(arrays) * arrays[0].shape[1] * per_frame)


def _bytes_per_frame(info: dict[str, Any]) -> int:
    """Return the model's activation bytes per input frame, from its info (or the fallback for an older plan's)."""
    return int(info.get("activation_bytes_per_frame") or FALLBACK_BYTES_PER_FRAME_PER_MEL * int(info["n_mels"]))


def _read_inputs(
    source: Store, todo: list[tuple[int, str]], *, threads: int = 1
) -> Iterator[tuple[str, bytes | InvalidSpectrogram]]:
    """Yield ``source.read_many`` for ``todo``; an OSError from the store itself becomes an InputReadError."""
    reads = source.read_many(((r, s) for s, r in todo), max_bytes=MAX_INPUT_BYTES, threads=threads)
    while True:
        try:
            item = next(reads)
        except StopIteration:
            return
        except OSError as exc:
            msg = f"cannot read inputs under {source.uri}: {exc}"
            raise InputReadError(msg) from None
        yield item


def _infer_loop(
    predictor: Callable[[np.ndarray], np.ndarray],
    passes: queue.SimpleQueue[Pass | None],
    results: queue.SimpleQueue[tuple[Any, ...]],
    stop: threading.Event,
    ledger: _MemoryLedger | None = None,
) -> None:
    """Run passes through the model until handed None; put each pass's features (or its error) on ``results``.

    A pass first waits for room in the memory ``ledger``.
    """
    ledger = ledger or _MemoryLedger(None)
    while (item := passes.get()) is not None:
        if stop.is_set() or not ledger.acquire(item.need, stop):
            continue
        try:
            features = predictor(item.batch)
        except Exception as exc:  # noqa: BLE001 - handed to the main thread, which re-raises it
            results.put(("error", exc))
            return
        finally:
            ledger.release(item.need)
        results.put(("done", item.rels, features))


def _results(
    source: Iterator[Pass | tuple[str, InvalidSpectrogram]],
    predictor: Callable[[np.ndarray], np.ndarray],
    *,
    streams: int,
    budget: int | None = None,
) -> Iterator[tuple[Any, ...]]:
    """Yield ("bad", rel, reason) and ("done", rels, features) while ``streams`` threads run the passes.

    The calling thread does all file I/O: it loads passes from ``source``
    (keeping ``PREFETCH_PASSES`` per thread queued) and writes what this
    yields. File I/O on a second Python thread would fight it for the GIL at
    every system call: measured, that made each feature write cost 275 us of
    CPU instead of 29 us. The inference threads hold the GIL only between
    passes. Re-raises whatever a pass raised; stops the threads however the
    caller leaves. Passes run side by side only while their activations fit
    ``budget`` together (``_MemoryLedger``).
    """
    passes: queue.SimpleQueue[Pass | None] = queue.SimpleQueue()
    results: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
    stop = threading.Event()
    ledger = _MemoryLedger(budget)
    threads = [
        threading.Thread(
            target=_infer_loop, args=(predictor, passes, results, stop, ledger), name=f"infer-{i}", daemon=True
        )
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
                msg = f"forward pass failed: {type(done[1]).__name__}: {done[1]}"
                raise InferenceError(msg) from done[1]
            yield done
    finally:
        stop.set()
        ledger.wake()
        for _ in threads:
            passes.put(None)
        for thread in threads:
            thread.join(timeout=_JOIN_TIMEOUT_S)


def _load_predictor(
    info: dict[str, Any], device: str, streams: int, *, output: Store | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """Set up the Keras backend and threads, load, fold and trace the model; return its predictor.

    The model is the file at the plan's path, or, on a host without it, the
    copy planning left in ``output`` (``shipping.local_model``).
    """
    from cnn_features import backends

    backends.prepare_process(device)
    from cnn_features.model import (
        ModelInfo,
        check_digest,
        configure_cpu_threads,
        inference_model,
        load_feature_model,
        make_predictor,
    )

    backend = backends.active_backend()
    settings = load_settings()
    # CPUs have no TF32: a CPU pass is always full float32.
    precision = backends.set_precision(backend, settings.gpu_precision) if device == "gpu" else "float32"
    _RUN_INFO.update(keras_backend=backend, precision=precision)
    if device == "cpu":
        configure_cpu_threads(streams=streams)
    path = Path(info["path"]) if output is None else local_model(info, output, settings.home / "cache" / "models")
    model, _ = load_feature_model(path)
    check_digest(info, model)
    import keras

    _RUN_INFO["keras_version"] = keras.__version__
    model_info = ModelInfo(**info)
    return make_predictor(inference_model(model, model_info), model_info, cache_dir=settings.home / "cache" / "jax")


def _no_passes(batch: np.ndarray) -> np.ndarray:
    """The predictor of a worker with nothing to extract: never called."""
    msg = "no pass was expected: every feature of this shard was already done"
    raise AssertionError(msg)


def lineage_context(spec: dict[str, Any], device: str) -> dict[str, Any]:
    """Return what every feature this worker stores shares in its lineage: model, backend, device, shard, run."""
    gpu = _RUN_INFO.get("gpu_name")
    return {
        "model_digest": spec["model"]["digest"],
        "model_sha256": spec["model"]["sha256"],
        "keras_backend": _RUN_INFO.get("keras_backend"),
        "keras_version": _RUN_INFO.get("keras_version"),
        "device": f"gpu:{os.environ.get('CUDA_VISIBLE_DEVICES', '?')} {gpu}" if device == "gpu" and gpu else device,
        "precision": _RUN_INFO.get("precision"),
        "shard_id": spec["shard_id"],
        "run_id": spec.get("run_id"),
    }


def _run_fields(predictor: Callable[[np.ndarray], np.ndarray]) -> dict[str, Any]:
    """Return the result fields naming the backend, precision, GPU and compiles of this run."""
    stats = getattr(predictor, "stats", None)
    return {
        "keras_backend": _RUN_INFO.get("keras_backend"),
        "precision": _RUN_INFO.get("precision"),
        "gpu_name": _RUN_INFO.get("gpu_name"),
        "gpu_index": os.environ.get("CUDA_VISIBLE_DEVICES") if _RUN_INFO.get("gpu_name") else None,
        **(stats() if callable(stats) else {"compiles": None, "compile_s": None}),
    }


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
    rejected = spec.get("rejected", {})
    try:
        output.prepare([rel for rel in spec["files"] if rel not in rejected])
    except OSError as exc:
        raise OutputWriteError(write_error(spec["output"], exc)) from None
    todo = _pending(spec, info, (source, output), tally)
    # Nothing to extract (a re-run over done features): no framework, no model load.
    predictor = _load_predictor(info, device, streams, output=output) if todo else _no_passes
    if (headroom := faults.count_arg("as_headroom")) is not None:
        faults.limit_address_space(headroom)
    tally.progress(device, force=True)
    with contextlib.ExitStack() as held:
        waited = time.monotonic()
        if device == "cpu" and todo:
            held.enter_context(cpu_slot(streams, spec["shard_id"]))
        waited = time.monotonic() - waited
        log.info("shard %s: %d files to extract on %s, %d pass(es) at once", spec["shard_id"], len(todo), device.upper(), streams)
        # Once the slot is held: what is free now is what this worker's passes may use.
        budget, budget_from = pass_budget(device, configured_mb=settings.pass_memory_mb, gpu_memory_mb=spec.get("gpu_memory_mb"))
        log.info(
            "shard %s: passes keep within %d MiB of activations (%s); the model needs %d bytes per frame",
            spec["shard_id"], budget >> 20, budget_from, _bytes_per_frame(info),
        )
        tally.started = time.monotonic()
        _extract_pending(
            spec, info, (source, output), todo, predictor, tally, device=device, streams=streams, budget=(budget, budget_from)
        )
    elapsed = time.monotonic() - tally.started
    return {
        "status": "ok",
        "device": device,
        "files_total": tally.total,
        "extracted": tally.extracted,
        "skipped_existing": tally.skipped,
        "inputs_hashed_for_reuse": tally.inputs_hashed,
        "bad": tally.bad,
        "elapsed_s": round(elapsed, 3),
        "waited_for_cpu_s": round(waited, 3),
        "files_per_s": round(tally.rate(), 2),
        "pass_memory_budget_mb": budget >> 20,
        **_run_fields(predictor),
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
    budget: tuple[int, str] | None = None,
) -> None:
    """Run every pending file through the model and write its feature; count everything in ``tally``.

    A feature counts as extracted once it is stored: at once locally, when
    its PUT returns on S3 (several run while the next passes compute).
    Passes keep within ``budget`` (bytes, and where that figure comes from);
    a clip that alone needs more is a bad input.
    """
    source, output = stores
    batch_size = int(spec["batch_size"])
    die_after = faults.count_arg("die_after")
    if device == "gpu" and die_after is None:
        die_after = faults.count_arg("gpu_die_after")
    pause_s = float(faults.active().get("slow") or 0.0)

    limit, limit_from = budget if budget is not None else (None, "")
    per_frame = _bytes_per_frame(info)

    def size(frames: int) -> int:
        return pass_size(frames, batch_size=batch_size, device=device, budget=limit, bytes_per_frame=per_frame, streams=streams)

    def too_long(rel: str, frames: int) -> str:
        return too_long_reason(rel, frames, bytes_per_frame=per_frame, budget=limit or 0, budget_from=limit_from)

    def stored(rels: list[str]) -> None:
        tally.extracted += len(rels)
        if die_after is not None and tally.extracted >= die_after:
            faults.kill_self()

    def written(put: Callable[[], list[str]]) -> list[str]:
        try:
            return put()
        except OSError as exc:
            raise OutputWriteError(write_error(spec["output"], exc)) from None

    # A GPU pass outruns one reader thread; CPU passes never wait for reads.
    read_threads = load_settings().gpu_read_threads if device == "gpu" else 1
    keep_lineage = "no_lineage" not in faults.active()
    digests = tally.digests if keep_lineage else None
    passes = _passes(source, info, todo, size=size, read_threads=read_threads, too_long=too_long, digests=digests)
    results = _results(passes, predictor, streams=streams, budget=limit)
    context = lineage_context(spec, device)
    record = lineage.LineageLog(output, spec["shard_id"], context, enabled=keep_lineage)
    held: list[tuple[str, bytes]] = []

    def store_held() -> None:
        # Lineage first: a stored feature always has its record line.
        written(record.flush)
        for rel, data in held:
            stored(written(functools.partial(writer.put, rel, data)))
        held.clear()

    with output.writer() as writer, contextlib.closing(results) as items:
        for kind, *payload in items:
            if kind == "bad":
                rel, reason = payload
                tally.bad.append({"file": rel, "reason": str(reason)})
                continue
            rels, features = payload
            finite = np.isfinite(features).all(axis=1)
            for rel, vector, ok in zip(rels, features, finite, strict=True):
                if not ok:
                    tally.bad.append({"file": rel, "reason": non_finite_reason(rel, vector)})
                    output.delete(rel)  # an invalid feature a run before may have left
                    continue
                data = npy_bytes(vector)
                if keep_lineage:
                    entry = {
                        "feature": rel,
                        "input_sha256": tally.digests.pop(rel),
                        # The fstat of the descriptor these bytes were read from (``lineage.read_stat``).
                        "input_stat": lineage.read_stat(source, rel),
                        "feature_sha256": lineage.sha256_hex(data),
                    }
                    record.add([entry])
                    tally.lineage[rel] = {**entry, **context}
                held.append((rel, data))
            if record.due():
                store_held()
            if pause_s:
                time.sleep(pause_s)
            tally.progress(device)
        store_held()
        stored(written(writer.flush))
    # The whole record, then the pieces go: every feature stored, reused or new, is in it.
    written(functools.partial(record.finish, tally.lineage.values(), listing=tally.listing))
    tally.progress(device, force=True)


def too_long_reason(rel: str, frames: int, *, bytes_per_frame: int, budget: int, budget_from: str) -> str:
    """Return why a clip too long for any pass is refused, naming its input and the limit."""
    return (
        f"{rel}: {frames:,} frames need about {frames * bytes_per_frame >> 20:,} MiB of activations in one pass "
        f"({bytes_per_frame:,} bytes per frame), over this worker's {budget >> 20:,} MiB pass memory limit "
        f"({budget_from}); not run"
    )


def non_finite_reason(rel: str, vector: np.ndarray) -> str:
    """Return why a feature vector that is not finite is refused, naming its input."""
    count = int(vector.size - np.count_nonzero(np.isfinite(vector)))
    return (
        f"{rel}: the model's feature has {count} NaN or infinite value(s) "
        "(input values too large for float32 arithmetic?); not written"
    )


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

    status, code, error = "ok", EXIT_OK, ""
    try:
        result = extract(spec, args.device)
    except ModelError as exc:
        status, code, error = "model_failed", EXIT_MODEL, str(exc)
    except InferenceError as exc:
        if args.device == "gpu":
            status, code, error = "gpu_failed", EXIT_GPU_RUN, f"GPU {exc}"
        else:
            status, code, error = "model_failed", EXIT_MODEL, f"model {spec['model']['path']}: {exc}"
    except StoreError as exc:
        status, code, error = "store_failed", EXIT_STORE, str(exc)
    except OutputWriteError as exc:
        status, code, error = "output_failed", EXIT_OUTPUT, str(exc)
    except InputReadError as exc:
        status, code, error = "input_failed", EXIT_INPUT, str(exc)
    except Exception as exc:  # noqa: BLE001 - a bug: reported as one, never mistaken for a GPU fault
        log.exception("shard %s: internal error", spec.get("shard_id"))
        status, code, error = "internal_error", EXIT_INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
    if status != "ok":
        emit(RESULT_PREFIX, {"status": status, "device": args.device, "error": error})
        return code
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
