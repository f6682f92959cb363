"""Run a shard in fresh worker processes, falling back from GPU to CPU.

This is the parent side: it never imports TensorFlow, so it is safe inside an
Airflow task process (which the task supervisor forked). Each attempt is a
new ``python -m cnn_features.worker`` process; a CPU attempt has CUDA hidden.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from cnn_features.config import load_settings
from cnn_features.errors import ShardFailed, StoreError
from cnn_features.procs import (
    PROGRESS_PREFIX,
    RESULT_PREFIX,
    Device,
    child_env,
    parse_line,
    python_module_cmd,
)
from cnn_features.progress import ProgressLog
from cnn_features.s3 import S3Access, is_s3
from cnn_features.storage import write_json_atomic
from cnn_features.stores import open_store

log = logging.getLogger(__name__)

# Worker statuses that a CPU re-run can fix: the GPU would not start, or the
# process died (CUDA fault, OOM kill, driver crash) without reporting.
_GPU_FAULTS = frozenset({"gpu_init_failed", "died"})
# Lines of worker output kept to explain a death.
_TAIL_LINES = 20
# TensorFlow's start-up chatter that no log level setting silences: absl INFO
# lines (``I0000 00:00:...``) and the notice printed before absl is set up.
_NOISE = re.compile(r"^(I\d{4} \d\d:\d\d:|WARNING: All log messages before absl::InitializeLog)")
# Folder (inside each output folder) holding each shard's last result.
SHARD_RESULTS_DIR = "_shards"

ProgressCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Attempt:
    """One worker process's outcome."""

    device: Device
    status: str
    result: dict[str, Any]
    error: str | None
    returncode: int
    elapsed_s: float


def choose_device(requested: str, probe: dict[str, Any]) -> tuple[Device, str]:
    """Pick the first device to try and say why."""
    if requested == "cpu":
        return "cpu", "device=cpu requested"
    if requested == "gpu":
        return "gpu", "device=gpu requested"
    if probe.get("usable"):
        return "gpu", f"probe found a usable GPU ({probe.get('device_name')})"
    return "cpu", f"probe found no usable GPU ({probe.get('error')})"


def _follow(
    stream: IO[str], device: Device, shard_id: str, on_progress: ProgressCallback | None
) -> tuple[dict[str, Any] | None, list[str]]:
    """Relay a worker's output to the log until it closes; return its result line and last lines."""
    result: dict[str, Any] | None = None
    tail: list[str] = []
    for raw in stream:
        line = raw.rstrip("\n")
        if (progress := parse_line(line, PROGRESS_PREFIX)) is not None:
            log.info(
                "shard %s [%s]: %d/%d files (%d extracted, %d already done, %d bad), %.1f files/s",
                shard_id,
                device.upper(),
                progress["done"],
                progress["total"],
                progress["extracted"],
                progress["skipped"],
                progress["bad"],
                progress["files_per_s"],
            )
            if on_progress is not None:
                on_progress(progress)
        elif (payload := parse_line(line, RESULT_PREFIX)) is not None:
            result = payload
        elif line.strip() and not _NOISE.match(line):
            log.info("shard %s [%s worker] %s", shard_id, device.upper(), line)
            tail = [*tail[-(_TAIL_LINES - 1) :], line]
    return result, tail


def _run_worker(
    spec_path: Path, device: Device, shard_id: str, on_progress: ProgressCallback | None, env: dict[str, str]
) -> Attempt:
    started = time.monotonic()
    cmd = python_module_cmd("cnn_features.worker", "--spec", str(spec_path), "--device", device)
    log.info("shard %s: starting %s worker: %s", shard_id, device.upper(), " ".join(cmd))
    with subprocess.Popen(
        cmd,
        env=child_env(device, env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    ) as proc:
        assert proc.stdout is not None
        try:
            result, tail = _follow(proc.stdout, device, shard_id, on_progress)
        except BaseException:
            # Airflow stopping the task (SIGTERM -> exception) must not leave
            # the worker running: kill it before the context manager waits.
            proc.kill()
            raise
        returncode = proc.wait()
    elapsed = time.monotonic() - started
    if result is None:
        how = f"killed by signal {-returncode}" if returncode < 0 else f"exited with code {returncode}"
        error = f"{device.upper()} worker {how} without a result"
        if tail:
            error += ": " + " | ".join(tail[-3:])
        return Attempt(device, "died", {}, error, returncode, elapsed)
    status = str(result.get("status", "died"))
    return Attempt(device, status, result, result.get("error"), returncode, elapsed)


def run_shard(
    spec: dict[str, Any],
    *,
    requested_device: str,
    probe: dict[str, Any],
    progress_dir: Path | None = None,
    access: S3Access | None = None,
) -> dict[str, Any]:
    """Extract one shard in fresh processes and return its result.

    Tries the device chosen from ``requested_device`` and the probe; if a GPU
    worker fails to initialise or dies, re-runs the shard on CPU (outputs
    already written are kept and skipped). The result says which device did
    the work and why, and is also saved as ``<output>/_shards/<id>.json``.
    With ``progress_dir``, progress records are appended there as it runs
    (see ``progress``). S3 settings in ``access`` reach the workers through
    their environment only; the spec file holds no secret.

    Raises:
        ShardFailed: the shard could not be completed on any device.
    """
    shard_id = spec["shard_id"]
    with shard_lock(spec["output"], shard_id):
        return _run_locked(
            spec,
            shard_id,
            requested_device=requested_device,
            probe=probe,
            progress_dir=progress_dir,
            access=access or S3Access(),
        )


def _lock_folder(output: str) -> Path:
    """Return the folder of an output's shard locks: in the folder itself, or under the home for S3.

    An S3 prefix has no locks, so its shards lock a local folder named after
    its URI; that guards one host (or hosts sharing the home).
    """
    if is_s3(output):
        digest = hashlib.sha256(output.encode("utf-8")).hexdigest()[:16]
        return load_settings().home / "locks" / f"s3-{digest}"
    return Path(output) / SHARD_RESULTS_DIR


@contextlib.contextmanager
def shard_lock(output: str | Path, shard_id: str) -> Iterator[None]:
    """Hold an exclusive lock on one shard of one output folder, or fail at once.

    Two runs extracting the same shard into the same folder would only do the
    work twice (writes are atomic and idempotent), so the second one fails
    fast, naming the holder, and Airflow retries it later. The kernel drops
    the lock when its holder dies, so a killed run never blocks the next.

    Raises:
        ShardFailed: another process holds the lock.
    """
    folder = _lock_folder(str(output))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fh = open(folder / f"{shard_id}.lock", "a+", encoding="utf-8")  # noqa: SIM115 - held for the block
    except OSError as exc:
        msg = f"shard {shard_id}: cannot write to output folder {output} ({exc.strerror or exc})"
        raise ShardFailed(msg) from None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            msg = f"shard {shard_id}: {output} is being extracted by {holder}; not running it twice at once"
            raise ShardFailed(msg) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_locked(
    spec: dict[str, Any],
    shard_id: str,
    *,
    requested_device: str,
    probe: dict[str, Any],
    progress_dir: Path | None,
    access: S3Access,
) -> dict[str, Any]:
    device, reason = choose_device(requested_device, probe)
    log.info("shard %s: %d files, device %s: %s", shard_id, len(spec["files"]), device.upper(), reason)
    attempts: list[Attempt] = []
    fallback_reason: str | None = None
    records = ProgressLog(progress_dir, spec) if progress_dir is not None else None

    def on_progress(progress: dict[str, Any]) -> None:
        if records is not None:
            records.write(state="running", fallback_reason=fallback_reason, **progress)

    if records is not None:
        records.write(state="running", device=device, done=0, files_per_s=0.0, fallback_reason=None)
    with tempfile.TemporaryDirectory(prefix="cnn-shard-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        write_json_atomic(spec_path, spec)
        env = access.env()
        attempts.append(_run_worker(spec_path, device, shard_id, on_progress, env))
        if device == "gpu" and attempts[-1].status in _GPU_FAULTS:
            fallback_reason = attempts[-1].error
            log.warning(
                "shard %s: GPU attempt failed (%s); re-running on CPU in a fresh process with CUDA hidden",
                shard_id,
                fallback_reason,
            )
            device = "cpu"
            attempts.append(_run_worker(spec_path, device, shard_id, on_progress, env))
    final = attempts[-1]
    if final.status != "ok":
        msg = f"shard {shard_id} ({spec['dataset']}) failed on {final.device.upper()}: {final.error}"
        if fallback_reason:
            msg += f" (after GPU failure: {fallback_reason})"
        if records is not None:
            records.write(state="failed", device=final.device, fallback_reason=fallback_reason, error=msg)
        raise ShardFailed(msg)
    result = {
        **final.result,
        "shard_id": shard_id,
        "label": spec["label"],
        "dataset": spec["dataset"],
        "device": final.device,
        "device_reason": reason if fallback_reason is None else "fell back to CPU after the GPU attempt failed",
        "fallback_reason": fallback_reason,
        "attempts": [
            {"device": a.device, "status": a.status, "error": a.error, "elapsed_s": round(a.elapsed_s, 3)}
            for a in attempts
        ],
    }
    # Written last: the record of what the shard finished follows every feature it names.
    output = open_store(spec["output"], load_settings(), access=access)
    try:
        output.write(f"{SHARD_RESULTS_DIR}/{shard_id}.json", (json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
    except (OSError, StoreError) as exc:
        msg = f"shard {shard_id}: features written, but not its result under {output.uri}: {exc}"
        raise ShardFailed(msg) from None
    if records is not None:
        records.write(
            state="success",
            device=final.device,
            fallback_reason=fallback_reason,
            done=result["files_total"],
            extracted=result["extracted"],
            skipped=result["skipped_existing"],
            bad=len(result["bad"]),
            files_per_s=result["files_per_s"],
            elapsed_s=result["elapsed_s"],
        )
    log.info(
        "shard %s done on %s: %d extracted, %d already done, %d bad, %.1f files/s%s",
        shard_id,
        final.device.upper(),
        result["extracted"],
        result["skipped_existing"],
        len(result["bad"]),
        result["files_per_s"],
        f" (CPU fallback: {fallback_reason})" if fallback_reason else "",
    )
    for bad in result["bad"]:
        log.warning("shard %s: bad input %s", shard_id, bad["reason"])
    return result
