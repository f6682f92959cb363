"""Where datasets and features live: a local folder or an S3 prefix, behind one small interface.

The pipeline only ever lists a root, reads one file (or many, in order),
writes one whole, checks which features already exist, and asks when the
files of one of its own folders were last written (to tidy them). ``LocalStore``
keeps the local promises (nameless files linked in place, containment
checked on the opened file); ``s3.S3Store`` keeps S3's (one PUT per object,
visible whole or not at all; no temporary keys). ``open_store`` is the one
place a location string picks its implementation.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import hashlib
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from cnn_features.errors import InvalidInput, InvalidSpectrogram, StoreError, StoreMissing
from cnn_features.s3 import S3Access, S3Location, S3Store, is_s3, make_client
from cnn_features.spectrogram import read_input_stat, stat_input
from cnn_features.storage import (
    MAX_FEATURE_FILE_BYTES,
    check_feature_bytes,
    feature_file_size,
    create_exclusive,
    remove_stale_temps,
    stale_temps,
    write_atomic,
)

if TYPE_CHECKING:
    from cnn_features.config import Settings

Location = Path | S3Location
# Files read ahead per reader thread of a local ``read_many``: enough to keep
# every thread busy while the caller consumes, few enough to bound memory.
READ_AHEAD_PER_THREAD = 4
# Read stats a local store keeps for ``take_read_stat``, the oldest dropped
# first: far more than a worker reads ahead of the features it records (a few
# passes per stream), few enough (some MB) that a store only read, never
# asked (a verification reading features), stays small. An input whose stat
# was dropped is only hashed again on the next run.
MAX_READ_STATS = 1 << 16


class Writer(Protocol):
    """Writes outputs whole; reports which are stored."""

    def put(self, rel: str, data: bytes) -> list[str]: ...
    def flush(self) -> list[str]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Writer: ...
    def __exit__(self, *exc: object) -> None: ...


class Store(Protocol):
    """A dataset's input or output root."""

    uri: str

    def name(self, rel: str) -> str: ...
    def exists(self) -> bool: ...
    def list(self) -> list[tuple[str, int]]: ...
    def read(self, rel: str, *, max_bytes: int | None = None) -> bytes: ...
    def read_many(
        self, items: Iterable[tuple[str, int]], *, max_bytes: int, threads: int = 1
    ) -> Iterator[tuple[str, bytes | InvalidSpectrogram]]: ...
    def write(self, rel: str, data: bytes) -> None: ...
    def create(self, rel: str, data: bytes) -> bool: ...
    def writer(self) -> Writer: ...
    def delete(self, rel: str) -> None: ...
    def prepare(self, rels: Iterable[str]) -> None: ...
    def modified(self, folder: str) -> list[tuple[str, float]]: ...


class LocalWriter:
    """Writes each output at once, atomically."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store

    def put(self, rel: str, data: bytes) -> list[str]:
        """Write ``rel`` whole; return it as stored."""
        self.store.write(rel, data)
        return [rel]

    def flush(self) -> list[str]:
        """Nothing is pending."""
        return []

    def close(self) -> None:
        """Nothing to stop."""

    def __enter__(self) -> LocalWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalStore:
    """A dataset folder on a local or mounted file system."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = str(root)
        # The fstat of the descriptor each file was last read from by ``read_many``,
        # where it vouches for the bytes, until ``take_read_stat`` takes it.
        self._read_stats: dict[str, os.stat_result] = {}
        self._read_stats_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LocalStore({self.uri!r})"

    @functools.cached_property
    def _inside(self) -> Path:
        return self.root.resolve()

    def name(self, rel: str) -> str:
        """Return the full path of ``rel``, for messages."""
        return str(self.root / rel) if rel else self.uri

    def exists(self) -> bool:
        """Return whether the root is a folder."""
        return self.root.is_dir()

    def list(self) -> list[tuple[str, int]]:
        """Return (POSIX path relative to the root, size) of every file under it, sorted.

        Hidden files and folders (a leading dot) are left out: they are editor,
        OS or our own temporary files, never clips. Symlinks are listed, not
        followed into; whether they stay inside the root is checked when read.
        """
        if not self.root.is_dir():
            msg = f"{self.root}: input folder does not exist or is not a folder"
            raise InvalidInput(msg)
        found: list[tuple[str, int]] = []
        top = os.fspath(self.root)
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            # Names joined as strings: a Path per file costs a million-file listing ~10 s.
            rel_dir = os.path.relpath(dirpath, top)
            prefix = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
            for name in filenames:
                if name.startswith("."):
                    continue
                try:
                    size = os.stat(os.path.join(dirpath, name)).st_size
                except OSError:  # a dangling link: reported when read
                    size = 0
                found.append((prefix + name, size))
        found.sort()
        return found

    def read(self, rel: str, *, max_bytes: int | None = None) -> bytes:
        """Return the whole file ``rel``.

        Raises:
            StoreMissing: no such file.
            StoreError: it cannot be read.
        """
        path = self.root / rel
        try:
            with open(path, "rb") as fh:
                if max_bytes is not None and os.fstat(fh.fileno()).st_size > max_bytes:
                    msg = f"{path}: over the {max_bytes:,}-byte limit; not read"
                    raise StoreError(msg)
                return fh.read()
        except FileNotFoundError:
            raise StoreMissing(f"{path}: no such file") from None
        except OSError as exc:
            raise StoreError(f"{path}: cannot read ({exc.strerror or exc})") from None

    def read_many(
        self, items: Iterable[tuple[str, int]], *, max_bytes: int, threads: int = 1
    ) -> Iterator[tuple[str, bytes | InvalidSpectrogram]]:
        """Yield (rel, bytes) in order, one open and one read each.

        A file that resolves outside the root, is not a regular file or is
        larger than ``max_bytes`` is yielded as an InvalidSpectrogram. With
        one thread the reads happen in the calling thread: on a CPU shard a
        local read takes ~0.1 ms and a reader thread would only add GIL
        hand-offs. A GPU shard outruns one reader, so it asks for several:
        up to ``4 x threads`` files are then read ahead, in order. The
        ``fstat`` of each file's descriptor is kept for ``take_read_stat``.
        """

        def read(rel: str) -> bytes | InvalidSpectrogram:
            try:
                data, stat = read_input_stat(self.root / rel, rel, inside=self._inside, max_bytes=max_bytes)
            except InvalidSpectrogram as exc:
                self._keep_read_stat(rel, None)
                return exc
            self._keep_read_stat(rel, stat)
            return data

        if threads <= 1:
            for rel, _ in items:
                yield rel, read(rel)
            return
        ahead: collections.deque[tuple[str, concurrent.futures.Future[bytes | InvalidSpectrogram]]] = collections.deque()
        source = iter(items)
        with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="read") as pool:
            try:
                while True:
                    while len(ahead) < READ_AHEAD_PER_THREAD * threads and (item := next(source, None)) is not None:
                        ahead.append((item[0], pool.submit(read, item[0])))
                    if not ahead:
                        return
                    rel, future = ahead.popleft()
                    yield rel, future.result()
            finally:
                for _, future in ahead:
                    future.cancel()

    def _keep_read_stat(self, rel: str, stat: os.stat_result | None) -> None:
        with self._read_stats_lock:
            self._read_stats.pop(rel, None)
            if stat is not None:
                self._read_stats[rel] = stat
                if len(self._read_stats) > MAX_READ_STATS:
                    del self._read_stats[next(iter(self._read_stats))]

    def take_read_stat(self, rel: str) -> os.stat_result | None:
        """Return, once, the ``fstat`` of the descriptor ``read_many`` last read ``rel`` from (``spectrogram.read_input_stat``).

        None when ``rel`` was not read, or when that stat cannot vouch for
        the bytes read (the file changed while, or just before, it was read).
        """
        with self._read_stats_lock:
            return self._read_stats.pop(rel, None)

    def stat(self, rel: str) -> os.stat_result:
        """Return the stat of the file a read of ``rel`` would get (a link's target); raise InvalidSpectrogram if none."""
        return stat_input(self.root / rel, rel, inside=self._inside)

    def write(self, rel: str, data: bytes) -> None:
        """Write ``rel`` whole (``storage.write_atomic``), creating folders; raises OSError."""
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)

    def create(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` whole unless it exists (``storage.create_exclusive``); return whether it was created."""
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return create_exclusive(path, data)

    def writer(self) -> LocalWriter:
        """Return a writer that writes each output at once."""
        return LocalWriter(self)

    def delete(self, rel: str) -> None:
        """Remove ``rel`` (absent is fine)."""
        (self.root / rel).unlink(missing_ok=True)

    def prepare(self, rels: Iterable[str]) -> None:
        """Create the folders of ``rels`` and remove temporaries their killed writers left."""
        by_folder: dict[Path, set[str]] = {}
        for rel in rels:
            out = self.root / rel
            by_folder.setdefault(out.parent, set()).add(out.name)
        for folder, names in by_folder.items():
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(folder, names)

    def stale_temps(self) -> list[str]:
        """Return temporaries left under the root by killed writers (relative paths)."""
        return stale_temps(self.root)

    def modified(self, folder: str) -> list[tuple[str, float]]:
        """Return (rel, modification time in POSIX seconds) of each file directly in ``folder``, sorted (none if absent)."""
        listed: list[tuple[str, float]] = []
        try:
            with os.scandir(self.root / folder) as found:
                for entry in found:
                    with contextlib.suppress(FileNotFoundError):  # removed meanwhile: not there
                        if entry.is_file(follow_symlinks=False):
                            listed.append((f"{folder}/{entry.name}", entry.stat(follow_symlinks=False).st_mtime))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(listed)


def parse_location(raw: str | Path) -> Location:
    """Return the location a spec or conf string names: an S3 prefix or a local path.

    The string must already be validated (``plan.validate_conf``).
    """
    if is_s3(raw):
        rest = str(raw)[len("s3://") :].rstrip("/")
        bucket, _, prefix = rest.partition("/")
        return S3Location(bucket, prefix)
    return Path(raw)


def open_store(location: Location | str, settings: Settings | None = None, *, access: S3Access | None = None) -> Store:
    """Return the store of ``location``: an S3 prefix with a client for ``access``, else a local folder.

    Without ``access``, an S3 client reads its settings from this process's
    environment (``S3Access.from_environ``), as worker children do.
    """
    if isinstance(location, str):
        location = parse_location(location)
    if isinstance(location, S3Location):
        if settings is None:
            from cnn_features.config import load_settings

            settings = load_settings()
        client = make_client(access if access is not None else S3Access.from_environ(), settings)
        return S3Store(location, client=client, concurrency=settings.s3_concurrency)
    return LocalStore(location)


def read_features(
    store: Store, rels: Iterable[str], *, feature_dim: int, sha256: Mapping[str, str] | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (rel, vector) for each feature in order, read through the store and checked.

    With ``sha256`` (name -> hex digest, as a manifest lists them) each
    file's bytes must also have that SHA-256.

    Raises:
        ValueError: a feature is missing, unreadable, of the wrong shape or
            dtype, not finite, or not the file ``sha256`` names; the message names it.
    """
    size = feature_file_size(feature_dim)
    for rel, data in store.read_many(((rel, size) for rel in rels), max_bytes=MAX_FEATURE_FILE_BYTES):
        vector, problem = (None, str(data)) if isinstance(data, Exception) else check_feature_bytes(data, feature_dim=feature_dim)
        if vector is None:
            msg = f"{store.name(rel)}: feature file {problem}"
            raise ValueError(msg)
        if sha256 is not None and (got := hashlib.sha256(data).hexdigest()) != sha256.get(rel):
            msg = (
                f"{store.name(rel)}: SHA-256 {got} is not the {sha256.get(rel)} its manifest lists; "
                "the feature changed after verification"
            )
            raise ValueError(msg)
        yield rel, vector


def valid_features(
    store: Store, rels: Iterable[str], *, feature_dim: int, listing: Iterable[tuple[str, int]] | None = None
) -> set[str]:
    """Return which of ``rels`` already hold a valid feature vector in ``store``.

    On S3 one listing decides (``listing`` when the caller has it), without a
    request per file: a PUT is whole, so an object of exactly a feature
    file's size is one. Locally each file is read and checked
    (``storage.check_feature_bytes``).
    """
    wanted = set(rels)
    if isinstance(store, S3Store):
        size = feature_file_size(feature_dim)
        return {rel for rel, got in (store.list() if listing is None else listing) if rel in wanted and got == size}
    return set(feature_digests(store, wanted, feature_dim=feature_dim))


def feature_digests(store: Store, rels: Iterable[str], *, feature_dim: int) -> dict[str, str]:
    """Return the SHA-256 of each of ``rels`` that holds a valid feature vector in ``store``.

    Locally each file is opened and read once (a missing one is simply not
    there); on S3 the reads are concurrent GETs, in order.
    """
    wanted = list(rels)
    found: Iterable[tuple[str, bytes | InvalidSpectrogram]]
    if isinstance(store, LocalStore):
        found = _read_local_features(store, wanted)
    else:
        found = store.read_many(((rel, 0) for rel in wanted), max_bytes=MAX_FEATURE_FILE_BYTES) if wanted else ()
    return {
        rel: hashlib.sha256(data).hexdigest()
        for rel, data in found
        if not isinstance(data, InvalidSpectrogram) and check_feature_bytes(data, feature_dim=feature_dim)[1] is None
    }


def _read_local_features(store: LocalStore, rels: list[str]) -> Iterator[tuple[str, bytes | InvalidSpectrogram]]:
    for rel in rels:
        try:
            yield rel, store.read(rel, max_bytes=MAX_FEATURE_FILE_BYTES)
        except StoreError as exc:  # missing, unreadable, or too big to be a feature
            yield rel, InvalidSpectrogram(str(exc))
