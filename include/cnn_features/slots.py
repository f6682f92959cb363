"""Device slots: per-user ``flock`` locks that cap how many workers use a device at once.

One pool serves both devices. Each GPU has one slot (``gpu-slot-<id>.lock``),
held by the runner around the worker it pins to that GPU; a machine has
usable cores // passes CPU slots (``cpu-slot-<i>.lock``), each held by a CPU
worker around its passes. The locks live in one folder per user in the
temporary directory, shared by every deployment on the machine, and the
kernel frees a slot whose holder died, however it died.

The folder must be this user's own: a symlink, another user's folder or one
that others may open is refused, and so is a lock file that is a symlink or
not a plain file of ours. Nothing planted there is ever written through.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

from cnn_features.errors import CnnFeaturesError

log = logging.getLogger(__name__)

# Start of the slot folder's name in the temporary directory; the uid ends
# it. The name every earlier version used, so old and new deployments on one
# machine share the same slots.
SLOT_FOLDER_PREFIX = "cnn-features-"
# A slot key becomes part of a file name: anything else (in an odd GPU id) is "_".
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_.-]")
# Opens the folder itself, never a symlink in its place.
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Opens (or creates) a lock file for update, never through a symlink.
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


class SlotUnavailable(CnnFeaturesError):
    """The slot folder or a lock file in it cannot be used safely; the message names which and why."""


def slot_folder() -> Path:
    """Return this user's folder of slot locks, shared by every deployment on the machine."""
    return Path(tempfile.gettempdir()) / f"{SLOT_FOLDER_PREFIX}{os.getuid()}"


def lock_name(kind: str, key: str) -> str:
    """Return the lock file name of slot ``key`` of a ``kind`` ("GPU", "CPU") of device."""
    return f"{kind.lower()}-slot-{_UNSAFE_KEY.sub('_', key)}.lock"


@contextlib.contextmanager
def hold_slot(kind: str, keys: Sequence[str], shard_id: str, *, poll_s: float) -> Iterator[str]:
    """Hold one free ``kind`` slot among ``keys`` while the block runs; yield its key.

    While every slot is busy, waits (trying again every ``poll_s`` seconds)
    for the first to come free. The held lock file names the shard and this
    process, for whoever waits.

    Raises:
        SlotUnavailable: the slot folder or one of the lock files is refused; nothing in it was written.
    """
    handles = _open_slots(slot_folder(), kind, keys)
    try:
        key, held = _take(handles, kind, shard_id, poll_s=poll_s)
        held.seek(0)
        held.truncate()
        held.write(f"shard {shard_id}, pid {os.getpid()}\n")
        held.flush()
        yield key
    finally:
        for _, handle in handles:
            handle.close()  # closing drops the lock


def _open_slots(folder: Path, kind: str, keys: Sequence[str]) -> list[tuple[str, IO[str]]]:
    """Open the lock file of every slot in ``keys`` in the checked ``folder``."""
    folder_fd = _open_private_folder(folder)
    handles: list[tuple[str, IO[str]]] = []
    try:
        for key in keys:
            handles.append((key, _open_lock(folder_fd, folder / lock_name(kind, key))))
    except SlotUnavailable:
        for _, handle in handles:
            handle.close()
        raise
    finally:
        os.close(folder_fd)
    return handles


def _open_private_folder(folder: Path) -> int:
    """Create ``folder`` (mode 0700) or open the one there; return its descriptor once it is ours and closed to others.

    Raises:
        SlotUnavailable: it is a symlink or not a folder, another user owns it, others may open it, or it cannot be made.
    """
    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass  # checked below, whoever made it
    except OSError as exc:
        msg = f"{folder}: cannot create the slot folder ({exc.strerror or exc})"
        raise SlotUnavailable(msg) from None
    try:
        fd = os.open(folder, _FOLDER_FLAGS)
    except OSError as exc:
        why = "a symlink or not a folder" if exc.errno in (errno.ELOOP, errno.ENOTDIR) else f"cannot open it: {exc.strerror}"
        msg = f"{folder}: slot folder is {why}; refusing it"
        raise SlotUnavailable(msg) from None
    info = os.fstat(fd)
    problem = None
    if info.st_uid != os.geteuid():
        problem = f"owned by uid {info.st_uid}, not {os.geteuid()}"
    elif info.st_mode & 0o077:
        problem = f"mode {stat.S_IMODE(info.st_mode):04o}, not 0700 (other users could plant or read its lock files)"
    if problem is not None:
        os.close(fd)
        msg = f"{folder}: slot folder is {problem}; refusing it"
        raise SlotUnavailable(msg)
    return fd


def _open_lock(folder_fd: int, path: Path) -> IO[str]:
    """Open (or create) the lock file ``path`` in the open folder, never through a symlink; refuse what is not a plain file of ours.

    Raises:
        SlotUnavailable: it is a symlink, not a plain file, another user's, or cannot be opened.
    """
    try:
        fd = os.open(path.name, _LOCK_FLAGS, 0o600, dir_fd=folder_fd)
    except OSError as exc:
        why = "a symlink" if exc.errno == errno.ELOOP else f"not openable ({exc.strerror})"
        msg = f"{path}: slot lock file is {why}; refusing it"
        raise SlotUnavailable(msg) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        os.close(fd)
        msg = f"{path}: slot lock file is not a plain file of uid {os.geteuid()}; refusing it"
        raise SlotUnavailable(msg)
    return os.fdopen(fd, "r+", encoding="utf-8")


def _take(handles: list[tuple[str, IO[str]]], kind: str, shard_id: str, *, poll_s: float) -> tuple[str, IO[str]]:
    """Lock the first free slot of ``handles``, waiting while all are busy; return its key and file."""
    waiting_since: float | None = None
    while True:
        for key, handle in handles:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            if waiting_since is not None:
                log.info("shard %s: got %s slot %s after %.1f s", shard_id, kind, key, time.monotonic() - waiting_since)
            return key, handle
        if waiting_since is None:
            waiting_since = time.monotonic()
            log.info("shard %s: every %s slot is busy (%s); waiting for one", shard_id, kind, _holders(handles))
        time.sleep(poll_s)


def _holders(handles: list[tuple[str, IO[str]]]) -> str:
    """Return who holds each slot, as its lock file says."""
    said = []
    for key, handle in handles:
        handle.seek(0)
        said.append(f"{key}: {handle.read().strip() or 'another worker'}")
    return "; ".join(said)
