"""Shard leases on S3 outputs: a guard that holds across hosts sharing nothing but the bucket.

A shard running into an S3 output holds a lease object,
``<output>/_leases/<shard id>-<digest of its files>.json``, naming its
holder (host, pid, a random token), its files and its time to live. Every
step is one conditional request, so S3 itself decides each race:

- acquire: PUT with ``If-None-Match: *``; where the key exists, GET it, and
  take over an expired lease with ``If-Match`` on the ETag just read (of
  several takers, one wins). Then every other live lease under ``_leases/``
  is read, and one sharing files with this shard (a run with another shard
  size) refuses it, as the local guard does;
- renew: a thread re-PUTs the lease every third of its TTL with
  ``If-Match`` on the last ETag. A refused renewal means another process
  took the lease over: the lease is lost, which is logged at once, and the
  shard fails when its block ends, naming who holds the lease now;
- release: DELETE with ``If-Match``, so a lease taken over is never removed.

Expiry is judged by the S3 server's clock alone: a lease's age is the GET
response's ``Date`` minus the object's ``LastModified``, both stamped by the
server, so the hosts' clocks need not agree. Only where a server sends no
``Date`` is the reader's clock compared with the holder's ``expires_at``,
and then the hosts' clocks must agree within the skew allowance. A holder
frozen for longer than the TTL (a stopped VM, a long GC pause, a network
partition) can lose its lease; it notices at its next renewal, or when it
has not renewed for a whole TTL, and its shard then fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cnn_features.errors import ShardFailed, StoreError, StoreMissing
from cnn_features.names import LEASES_DIR
from cnn_features.s3 import ConditionFailed, S3Store, Tagged

log = logging.getLogger(__name__)

# Seconds of resolution of the server's ``Date`` and ``LastModified`` (whole
# seconds in HTTP dates): a lease's age read from them may be short by this much.
CLOCK_RESOLUTION_S = 1.0
# Times a create refused because a lease exists is retried when that lease
# vanishes before it can be read (its holder released it in between).
_ACQUIRE_TRIES = 3
# Tokens of leases this process gave up but could not delete (S3 unreachable at
# release): no live holder stands behind them, so a later try of the shard in
# this same process (a caller that retries in-process) takes them over at once.
# Airflow starts each try in a new process, which waits out the TTL instead.
_ABANDONED: set[str] = set()
_ABANDONED_LOCK = threading.Lock()


@dataclass
class ShardLease:
    """A lease this process holds on one shard of an S3 output, renewed by a thread until released."""

    store: S3Store
    rel: str
    shard_id: str
    record: dict[str, Any]
    etag: str
    ttl_s: float
    # Why the lease is no longer ours, once a renewal finds out; None while it is held.
    lost: str | None = None
    # Monotonic time this process last wrote the lease (taken or renewed).
    renewed_at: float = field(default_factory=time.monotonic)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def uri(self) -> str:
        return self.store.name(self.rel)

    def start(self) -> None:
        """Start renewing every third of the TTL in a daemon thread."""
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{self.shard_id}", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            record = {**self.record, "renewals": self.record["renewals"] + 1, "expires_at": _expires_at(self.ttl_s)}
            try:
                self.etag = self.store.replace_if_match(self.rel, _encode(record), self.etag)
            except ConditionFailed:
                mine = _own_copy(self.store, self.rel, self.record["token"])
                if mine is None:
                    self._lose(f"lease {self.uri} was taken over by {_holder_of(self.store, self.rel)}")
                    return
                # Our own renewal was stored but its reply was lost (a retry then met our new ETag).
                self.etag, record = mine.etag, _decode(mine.data)
            except StoreError as exc:
                if self.unrenewed_s() > self.ttl_s:
                    self._lose(f"lease {self.uri} could not be renewed for {self.ttl_s:g} s, so another process may hold it ({exc})")
                    return
                log.warning("shard %s: renewing lease %s failed, retrying: %s", self.shard_id, self.uri, exc)
                continue
            self.record, self.renewed_at = record, time.monotonic()

    def unrenewed_s(self) -> float:
        """Return the seconds since the lease was last written by this process."""
        return time.monotonic() - self.renewed_at

    def check_held(self) -> None:
        """Mark the lease lost when it went unrenewed for a whole TTL (a renewal that hung), however the thread stands."""
        if self.lost is None and self.unrenewed_s() > self.ttl_s:
            self._lose(f"lease {self.uri} went unrenewed for {self.unrenewed_s():.0f} s, over its {self.ttl_s:g} s TTL")

    def _lose(self, why: str) -> None:
        self.lost = f"shard {self.shard_id}: {why}; another process may be extracting it, so this run's result does not count"
        log.error("%s", self.lost)

    def release(self) -> None:
        """Stop renewing; delete the lease if it is still ours (its ETag unchanged)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.check_held()
        if self.lost is not None:
            return
        try:
            self.store.delete_if_match(self.rel, self.etag)
        except ConditionFailed:
            log.warning("shard %s: lease %s changed hands before release; left to its holder", self.shard_id, self.uri)
        except StoreError as exc:  # a server that takes no condition on deletes: compare the token, then delete
            self._release_by_token(exc)

    def _release_by_token(self, cause: StoreError) -> None:
        """Delete the lease if it still holds our token, for a server that takes no condition on deletes.

        Between the GET and the DELETE only an expired lease can change
        hands, and ours was renewed until now: the race needs this process
        frozen for a whole TTL in that gap, and costs at most one shard run
        twice, each feature still written whole by one PUT.
        """
        try:
            current = self.store.read_tagged(self.rel)
            if _decode(current.data).get("token") == self.record["token"]:
                self.store.delete(self.rel)
        except StoreError as exc:
            with _ABANDONED_LOCK:
                _ABANDONED.add(self.record["token"])
            log.warning("shard %s: lease %s not released (%s; %s); it expires in %g s", self.shard_id, self.uri, cause, exc, self.ttl_s)


def lease_rel(shard_id: str, files: list[str]) -> str:
    """Return the lease's key under the output: the shard id and a digest of its files, as local claims are named."""
    digest = hashlib.sha256("\n".join(sorted(set(files))).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{LEASES_DIR}/{shard_id}-{digest}.json"


@contextlib.contextmanager
def shard_lease(store: S3Store, shard_id: str, files: list[str], *, ttl_s: float, skew_s: float) -> Iterator[ShardLease]:
    """Hold the lease on ``files`` of the S3 output ``store`` while the block runs, or fail at once.

    Raises:
        ShardFailed: a live holder has the lease or some of the files, another process took an expired lease
            over first, S3 refused the lease, or the lease was lost while the block ran (naming who holds it).
    """
    lease = acquire(store, shard_id, files, ttl_s=ttl_s, skew_s=skew_s)
    lease.start()
    try:
        yield lease
    except Exception as exc:
        lease.release()
        if lease.lost is not None:
            raise ShardFailed(lease.lost) from exc
        raise
    except BaseException:  # Airflow stopping the task: free the shard for its next try
        lease.release()
        raise
    lease.release()
    if lease.lost is not None:
        log.error("%s", lease.lost)
        raise ShardFailed(lease.lost)


def acquire(store: S3Store, shard_id: str, files: list[str], *, ttl_s: float, skew_s: float) -> ShardLease:
    """Take the lease on ``files`` (created, or taken over from an expired holder) and check no live lease overlaps them.

    Raises:
        ShardFailed: as ``shard_lease``.
    """
    rel = lease_rel(shard_id, files)
    wanted = sorted(set(files))
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "token": secrets.token_hex(16),
        "shard_id": shard_id,
        "files": wanted,
        "ttl_s": ttl_s,
        "expires_at": _expires_at(ttl_s),
        "renewals": 0,
    }
    try:
        etag = _take(store, rel, record, ttl_s=ttl_s, skew_s=skew_s)
        lease = ShardLease(store, rel, shard_id, record, etag, ttl_s)
        try:
            _refuse_overlap(lease, set(wanted), ttl_s=ttl_s, skew_s=skew_s)
        except BaseException:
            lease.release()
            raise
    except StoreError as exc:
        msg = f"shard {shard_id}: cannot take its lease {store.name(rel)}: {exc}"
        raise ShardFailed(msg) from None
    log.info("shard %s: lease %s taken by %s (TTL %g s)", shard_id, lease.uri, _describe(record), ttl_s)
    return lease


def _take(store: S3Store, rel: str, record: dict[str, Any], *, ttl_s: float, skew_s: float) -> str:
    """Create the lease object, or replace an expired one by its ETag; return our ETag."""
    shard_id = record["shard_id"]
    for _ in range(_ACQUIRE_TRIES):
        try:
            return store.create_tagged(rel, _encode(record))
        except ConditionFailed:
            pass
        try:
            current = store.read_tagged(rel)
        except StoreMissing:
            continue  # released between our create and our read: create again
        theirs = _decode(current.data)
        if theirs.get("token") == record["token"]:
            return current.etag  # our create was stored, its reply lost and the retry refused
        with _ABANDONED_LOCK:
            abandoned = theirs.get("token") in _ABANDONED
        left = 0.0 if abandoned else _time_left(current, theirs, ttl_s=ttl_s, skew_s=skew_s)
        if left > 0:
            msg = (
                f"shard {shard_id}: {store.uri} is being extracted by {_describe(theirs)}; its lease {store.name(rel)} "
                f"expires in {left:.0f} s unless renewed (holder's clock: expires at {theirs.get('expires_at', '?')}); "
                "not running it twice at once"
            )
            raise ShardFailed(msg)
        try:
            etag = store.replace_if_match(rel, _encode(record), current.etag)
        except ConditionFailed:
            if (mine := _own_copy(store, rel, record["token"])) is not None:
                return mine.etag  # our takeover was stored, its reply lost
            msg = (
                f"shard {shard_id}: the expired lease {store.name(rel)} of {_describe(theirs)} was taken over by "
                f"{_holder_of(store, rel)} first; not running it twice at once"
            )
            raise ShardFailed(msg) from None
        log.warning("shard %s: took over the expired lease %s of %s", shard_id, store.name(rel), _describe(theirs))
        return etag
    msg = f"shard {shard_id}: its lease {store.name(rel)} kept changing hands; not running it twice at once"
    raise ShardFailed(msg)


def _refuse_overlap(lease: ShardLease, mine: set[str], *, ttl_s: float, skew_s: float) -> None:
    """Raise ShardFailed if another live lease claims some of ``mine``.

    Our lease is written before the others are read, so of two overlapping
    shards starting at once the later reader always sees the earlier one's
    lease: both may fail (Airflow retries them), never both run.
    """
    for rel, _ in lease.store.modified(LEASES_DIR):
        if rel == lease.rel:
            continue
        try:
            other = lease.store.read_tagged(rel)
        except StoreMissing:
            continue
        theirs = _decode(other.data)
        if _time_left(other, theirs, ttl_s=ttl_s, skew_s=skew_s) <= 0:
            # A dead holder's lease (a crashed try of another shard size): nobody renews it, so it goes.
            with contextlib.suppress(StoreError):
                lease.store.delete_if_match(rel, other.etag)
            continue
        listed = theirs.get("files")
        claimed = {f for f in listed if isinstance(f, str)} if isinstance(listed, list) else mine  # unreadable: assume the worst
        common = len(mine & claimed)
        if common:
            msg = (
                f"shard {lease.shard_id}: {common} of its files in {lease.store.uri} are being extracted by "
                f"{_describe(theirs)} (lease {lease.store.name(rel)}); not running them twice at once"
            )
            raise ShardFailed(msg)


def _time_left(current: Tagged, record: dict[str, Any], *, ttl_s: float, skew_s: float) -> float:
    """Return the seconds until a lease may be taken over (<= 0: expired), by the holder's TTL and the server's clock.

    A lease whose record is unreadable is given this process's TTL.
    """
    raw_ttl = record.get("ttl_s")
    ttl = float(raw_ttl) if isinstance(raw_ttl, int | float) else ttl_s
    if current.age_s is not None:
        return ttl + skew_s + CLOCK_RESOLUTION_S - current.age_s
    try:
        expires = datetime.fromisoformat(str(record["expires_at"])).timestamp()
    except (KeyError, ValueError):
        return ttl + skew_s  # neither clock says: treat it as just renewed
    return expires + skew_s - time.time()


def _own_copy(store: S3Store, rel: str, token: str) -> Tagged | None:
    """Return the lease ``rel`` if it still holds ``token`` (a write of ours whose reply was lost); None otherwise or unreadable."""
    try:
        current = store.read_tagged(rel)
    except StoreError:
        return None
    return current if _decode(current.data).get("token") == token else None


def _holder_of(store: S3Store, rel: str) -> str:
    """Name whoever holds the lease ``rel`` now, for a message; never raises."""
    try:
        return _describe(_decode(store.read_tagged(rel).data))
    except StoreMissing:
        return "another process (the lease is gone)"
    except StoreError as exc:
        return f"another process (unreadable: {exc})"


def _describe(record: dict[str, Any]) -> str:
    """Name a lease's holder as the local guard names a claim's: pid, host and shard."""
    if "pid" not in record:
        return "another process"
    return f"pid {record['pid']} on {record.get('host', '?')} (shard {record.get('shard_id', '?')})"


def _expires_at(ttl_s: float) -> str:
    return datetime.fromtimestamp(time.time() + ttl_s, UTC).isoformat(timespec="seconds")


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, sort_keys=True) + "\n").encode()


def _decode(data: bytes) -> dict[str, Any]:
    """Return a lease's record, or {} where its bytes are not a JSON object."""
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}
