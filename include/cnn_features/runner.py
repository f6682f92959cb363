"""Run a shard in fresh worker processes, falling back from GPU to CPU.

This is the parent side: it never imports TensorFlow, so it is safe inside an
Airflow task process (which the task supervisor forked). Each attempt is a
new ``python -m cnn_features.worker`` process; a CPU attempt has CUDA hidden.
"""

from __future__ import annotations

import contextlib
import dataclasses
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

from cnn_features.backends import backend_env, visible_gpus
from cnn_features.config import load_settings
from cnn_features.errors import ShardFailed, StoreError
from cnn_features.lease import ShardLease, shard_lease
from cnn_features.names import SHARDS_DIR as SHARD_RESULTS_DIR
from cnn_features.procs import (
    PROGRESS_PREFIX,
    RESULT_PREFIX,
    Device,
    child_env,
    parse_line,
    python_module_cmd,
)
from cnn_features.progress import ProgressLog, Tries
from cnn_features.progress_report import one_line
from cnn_features.s3 import S3Access, S3Store, is_s3
from cnn_features.slots import SlotUnavailable, hold_slot
from cnn_features.storage import write_json_atomic
from cnn_features.stores import open_store

log = logging.getLogger(__name__)

# Longest failure reason logged as a shard's last line: one line, long enough
# for the paths in it, short enough for a log panel to show without scrolling far.
LOG_REASON_CHARS = 600

# Worker statuses that a CPU re-run can fix: the GPU would not start, a GPU
# pass raised (CUDA error, out of GPU memory), the process died (CUDA fault,
# OOM kill, driver crash) without reporting, or no GPU slot could be held
# safely (a planted or open slot folder: no GPU worker starts unguarded).
# Read, write, store, model and internal errors would fail the same way on
# CPU: they are not re-run.
_GPU_FAULTS = frozenset({"gpu_init_failed", "gpu_failed", "died", "no_gpu_slot"})
# Lines of worker output kept to explain a death.
_TAIL_LINES = 20
# TensorFlow's start-up chatter that no log level setting silences: absl INFO
# lines (``I0000 00:00:...``) and the notice printed before absl is set up.
_NOISE = re.compile(r"^(I\d{4} \d\d:\d\d:|WARNING: All log messages before absl::InitializeLog)")
# Suffix of shard claim files (``shard_lock``) in an output's lock folder, and
# the lock that makes claims there one at a time.
_CLAIM_SUFFIX = ".lock"
_CLAIMS_MUTEX = "claims.mutex"
# Seconds between tries for a busy GPU slot: negligible next to a shard.
_GPU_SLOT_POLL_S = 0.2

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


def _run_attempt(
    spec_path: Path,
    device: Device,
    shard_id: str,
    on_progress: ProgressCallback | None,
    env: dict[str, str],
    *,
    probe: dict[str, Any],
) -> Attempt:
    """Run one worker with the configured Keras backend; a GPU worker is pinned to a free GPU while it runs."""
    settings = load_settings()
    extra = {**env, **backend_env(settings.keras_backend, device, precision=settings.gpu_precision)}
    gpus = visible_gpus(count=probe.get("device_count")) if device == "gpu" else []
    if not gpus:
        return _run_worker(spec_path, device, shard_id, on_progress, extra)
    with contextlib.ExitStack() as held:
        try:
            gpu = held.enter_context(gpu_slot(gpus, shard_id))
        except SlotUnavailable as exc:
            # A planted or open slot folder is the host's problem, and running unguarded could
            # put two shards on one GPU: no GPU worker starts, and the shard re-runs on CPU.
            log.error("shard %s: no GPU slot: %s", shard_id, exc)
            return Attempt(device, "no_gpu_slot", {}, f"no GPU slot: {exc}", 0, 0.0)
        log.info("shard %s: pinned to GPU %s (CUDA_VISIBLE_DEVICES=%s) of %d", shard_id, gpu, gpu, len(gpus))
        return _run_worker(spec_path, device, shard_id, on_progress, {**extra, "CUDA_VISIBLE_DEVICES": gpu})


def gpu_slot(gpus: list[str], shard_id: str, *, poll_s: float = _GPU_SLOT_POLL_S) -> contextlib.AbstractContextManager[str]:
    """Hold one GPU's slot for a worker; yield its ``CUDA_VISIBLE_DEVICES`` id.

    One shard per GPU: N GPUs run N shards at once, each in a worker that
    sees only its own GPU, and a further shard waits for the first GPU to
    come free. Slots are ``flock`` locks held by this (parent) process in the
    checked per-user slot folder (``slots``), so the kernel frees a slot
    whose holder died, however it died.

    Raises:
        SlotUnavailable: the slot folder or a GPU's lock file is refused (a symlink, another user's, open to others).
    """
    return hold_slot("GPU", gpus, shard_id, poll_s=poll_s)


def run_shard(
    spec: dict[str, Any],
    *,
    requested_device: str,
    probe: dict[str, Any],
    progress_dir: Path | None = None,
    access: S3Access | None = None,
    tries: Tries | None = None,
) -> dict[str, Any]:
    """Extract one shard in fresh processes and return its result.

    Tries the device chosen from ``requested_device`` and the probe; if a GPU
    worker fails to initialise or dies, re-runs the shard on CPU (outputs
    already written are kept and skipped). The result says which device did
    the work and why, and is also saved as ``<output>/_shards/<id>.json``.
    With ``progress_dir``, progress records are appended there as it runs
    (see ``progress``), each naming the Airflow try in ``tries`` so a
    failure with tries left reads as retrying. S3 settings in ``access``
    reach the workers through their environment only; the spec file holds no
    secret. A failure's one-line reason is logged last, just before it is
    raised, so it ends the task log above Airflow's traceback.

    Raises:
        ShardFailed: the shard could not be completed on any device.
    """
    shard_id = spec["shard_id"]
    locked = False
    try:
        with shard_lock(spec["output"], shard_id, spec["files"], access=access) as lease:
            locked = True
            return _run_locked(
                spec,
                shard_id,
                requested_device=requested_device,
                probe=probe,
                progress_dir=progress_dir,
                access=access or S3Access(),
                tries=tries,
                lease=lease,
            )
    except ShardFailed as exc:
        if not locked:  # the lock refused the shard; _run_locked logs its own failures
            log.error("%s", one_line(str(exc), limit=LOG_REASON_CHARS))
        raise


def _lock_folder(output: str) -> Path:
    """Return the folder of a local output's shard locks: its results folder (S3 outputs hold leases instead)."""
    return Path(output) / SHARD_RESULTS_DIR


def _s3_lease(output: str, shard_id: str, files: list[str], *, access: S3Access | None) -> contextlib.AbstractContextManager[ShardLease]:
    """Return the lease guard of one shard of the S3 output ``output``, with the configured TTL and skew allowance."""
    settings = load_settings()
    ttl = settings.s3_lease_ttl_s
    # A lease request must answer within a third of the TTL, in one attempt: a
    # renewal stuck in botocore's retries could outlive the lease it renews.
    quick = dataclasses.replace(
        settings,
        s3_max_attempts=1,
        s3_connect_timeout_s=min(settings.s3_connect_timeout_s, ttl / 3),
        s3_read_timeout_s=min(settings.s3_read_timeout_s, ttl / 3),
    )
    store = open_store(output, quick, access=access)
    assert isinstance(store, S3Store)  # open_store gives an S3Store for every s3:// URI
    return shard_lease(store, shard_id, files, ttl_s=ttl, skew_s=settings.s3_lease_skew_s)


@contextlib.contextmanager
def shard_lock(
    output: str | Path, shard_id: str, files: list[str], *, access: S3Access | None = None
) -> Iterator[ShardLease | None]:
    """Hold a claim on ``files`` of one output folder while the block runs, or fail at once.

    An S3 output is guarded by a lease object in the output itself
    (``lease.shard_lease``: conditional PUTs, renewed while the block runs),
    which holds across hosts that share only the bucket; ``access`` reaches
    it. The rest of this describes a local output.

    The claim is keyed to the files, not the shard id: a shard of another
    run (another ``shard_size``, another corpus listing) whose files overlap
    a live claim is refused, and a shard whose id is taken but whose files
    are not runs. Each claim is a lock file in the output's lock folder
    (``_lock_folder``), named by the shard id and a digest of its files,
    held with ``flock`` and listing the files; claims are made one at a time
    under ``claims.mutex``, and a claim file whose lock can be taken is a dead
    holder's and is removed. The kernel (or the NFS server, when a client's
    lease ends) drops a dead holder's locks, so a killed run never blocks the
    next. Assumes a file system whose ``flock`` is honoured by every host
    sharing the folder: local ones and NFSv4; not SMB or most FUSE mounts.

    Raises:
        ShardFailed: a live holder claims some of the files, or the lock folder cannot be written;
            on S3 also a lease lost while the block ran.
    """
    if is_s3(str(output)):
        with _s3_lease(str(output), shard_id, files, access=access) as lease:
            yield lease
        return
    folder = _lock_folder(str(output))
    wanted = sorted(set(files))
    digest = hashlib.sha256("\n".join(wanted).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    path = folder / f"{shard_id}-{digest}{_CLAIM_SUFFIX}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _open_rw(folder / _CLAIMS_MUTEX) as mutex:
            fcntl.flock(mutex, fcntl.LOCK_EX)  # held for a moment: while one claim is checked and written
            claim = _claim(path, shard_id, wanted, output)
    except OSError as exc:
        msg = f"shard {shard_id}: cannot write to output folder {output} ({exc.strerror or exc})"
        raise ShardFailed(msg) from None
    with claim:
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                if os.fstat(claim.fileno()).st_ino == os.stat(path).st_ino:
                    path.unlink()



def _open_rw(path: Path, *, create: bool = True) -> IO[str]:
    """Open a lock file for update (creating it unless told not to); writable, as NFS's emulation of ``flock`` needs."""
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0) | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    return os.fdopen(fd, "r+", encoding="utf-8")


def _claim(path: Path, shard_id: str, files: list[str], output: str | Path) -> IO[str]:
    """Take the claim file ``path`` for ``files`` unless a live claim overlaps them; return it, locked.

    Call with the claims mutex held. Raises ShardFailed naming the holder.
    """
    while True:
        fh = _open_rw(path)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_claim(fh).get("holder", "another process")
            fh.close()
            msg = f"shard {shard_id}: {output} is being extracted by {holder}; not running it twice at once"
            raise ShardFailed(msg) from None
        if os.fstat(fh.fileno()).st_nlink > 0:
            break
        fh.close()  # its last holder removed it between our open and our lock: open the name again
    try:
        mine = set(files)
        for other in sorted(path.parent.glob(f"*{_CLAIM_SUFFIX}")):
            if other.name != path.name and (clash := _live_overlap(other, mine)) is not None:
                holder, count = clash
                msg = (
                    f"shard {shard_id}: {count} of its files in {output} are being extracted by {holder}; "
                    "not running them twice at once"
                )
                raise ShardFailed(msg)
        fh.seek(0)
        fh.truncate()
        json.dump({"holder": f"pid {os.getpid()} on {socket.gethostname()} (shard {shard_id})", "files": files}, fh)
        fh.flush()
    except BaseException:
        fh.close()
        raise
    return fh


def _live_overlap(path: Path, files: set[str]) -> tuple[str, int] | None:
    """Return (holder, files in common) if a live holder claims some of ``files`` in ``path``; remove a dead claim."""
    try:
        fh = _open_rw(path, create=False)
    except FileNotFoundError:
        return None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            claim = _read_claim(fh)
            theirs = claim.get("files")
            if not isinstance(theirs, list):  # unreadable: an older version's lock; assume the worst
                return str(claim.get("holder", "another process")), len(files)
            common = len(files.intersection(theirs))
            return (str(claim.get("holder", "another process")), common) if common else None
        path.unlink(missing_ok=True)  # its holder died (the lock was free): a stale claim
    return None


def _read_claim(fh: IO[str]) -> dict[str, Any]:
    """Return what a claim file says (holder, files), or {} where it says nothing readable."""
    fh.seek(0)
    text = fh.read()
    try:
        claim = json.loads(text)
    except ValueError:
        return {"holder": text.strip()} if text.strip() else {}
    return claim if isinstance(claim, dict) else {}


def _run_locked(
    spec: dict[str, Any],
    shard_id: str,
    *,
    requested_device: str,
    probe: dict[str, Any],
    progress_dir: Path | None,
    access: S3Access,
    tries: Tries | None,
    lease: ShardLease | None = None,
) -> dict[str, Any]:
    device, reason = choose_device(requested_device, probe)
    log.info("shard %s: %d files, device %s: %s", shard_id, len(spec["files"]), device.upper(), reason)
    attempts: list[Attempt] = []
    fallback_reason: str | None = None
    records = ProgressLog(progress_dir, spec, tries=tries) if progress_dir is not None else None

    def fail(msg: str, device: str) -> ShardFailed:
        """Record the failure, log its reason as one plain line, and return the error to raise."""
        if records is not None:
            records.write(state="failed", device=device, fallback_reason=fallback_reason, error=msg)
        log.error("%s%s", one_line(msg, limit=LOG_REASON_CHARS), f" (try {tries.try_number} of {tries.max_tries})" if tries else "")
        return ShardFailed(msg)

    def on_progress(progress: dict[str, Any]) -> None:
        if records is not None:
            records.write(state="running", fallback_reason=fallback_reason, **progress)

    if records is not None:
        records.write(state="running", device=device, done=0, files_per_s=0.0, fallback_reason=None)
    with tempfile.TemporaryDirectory(prefix="cnn-shard-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        # The GPU's memory, from the probe, sizes a GPU worker's passes (memory.pass_budget).
        write_json_atomic(spec_path, {**spec, "gpu_memory_mb": probe.get("memory_total_mb")})
        env = access.env()
        attempts.append(_run_attempt(spec_path, device, shard_id, on_progress, env, probe=probe))
        if device == "gpu" and attempts[-1].status in _GPU_FAULTS:
            fallback_reason = attempts[-1].error
            log.warning(
                "shard %s: GPU attempt failed (%s); re-running on CPU in a fresh process with CUDA hidden",
                shard_id,
                fallback_reason,
            )
            device = "cpu"
            attempts.append(_run_attempt(spec_path, device, shard_id, on_progress, env, probe=probe))
    final = attempts[-1]
    if final.status != "ok":
        msg = f"shard {shard_id} ({spec['dataset']}) failed on {final.device.upper()}: {final.error}"
        if fallback_reason:
            msg += f" (after GPU failure: {fallback_reason})"
        raise fail(msg, final.device)
    result = {
        **final.result,
        "shard_id": shard_id,
        "label": spec["label"],
        "dataset": spec["dataset"],
        "device": final.device,
        "device_reason": reason if fallback_reason is None else "fell back to CPU after the GPU attempt failed",
        "fallback_reason": fallback_reason,
        # Who ran it (host, Celery worker, queue), when the caller says.
        "worker": spec.get("worker"),
        "attempts": [
            {"device": a.device, "status": a.status, "error": a.error, "elapsed_s": round(a.elapsed_s, 3)}
            for a in attempts
        ],
    }
    if lease is not None:
        lease.check_held()
        if lease.lost is not None:  # another process holds the shard now: its record, not ours
            raise fail(lease.lost, final.device)
    # Written last: the record of what the shard finished follows every feature it names.
    output = open_store(spec["output"], load_settings(), access=access)
    try:
        output.write(f"{SHARD_RESULTS_DIR}/{shard_id}.json", (json.dumps(result, indent=2, sort_keys=True) + "\n").encode())
    except (OSError, StoreError) as exc:
        msg = f"shard {shard_id}: features written, but not its result under {output.uri}: {exc}"
        raise fail(msg, final.device) from None
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
