"""S3 prefixes as stores: boto3 clients, locations, and the S3 side of ``stores.Store``.

Credentials are never handled here beyond handing them to boto3: an
``S3Access`` holds what the caller (an Airflow task, a test) resolved, and
children get them only through their environment (``S3Access.env``). With no
keys, boto3's default chain applies: environment, shared config, instance
profile. Every error names the operation, endpoint, bucket and key, never a
secret.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import email.utils
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from cnn_features.config import Settings
from cnn_features.errors import InvalidConf, InvalidSpectrogram, StoreError, StoreMissing
from cnn_features.names import own_folder_reason

log = logging.getLogger(__name__)

SCHEME = "s3://"
# Bucket names as S3 allows them for new buckets: 3-63 characters of lowercase
# letters, digits, dots and hyphens, starting and ending with a letter or digit.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# Variables a child reads its S3 settings from; boto3 reads the same ones.
_ENV_KEYS = {
    "access_key_id": "AWS_ACCESS_KEY_ID",
    "secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "session_token": "AWS_SESSION_TOKEN",
    "endpoint_url": "AWS_ENDPOINT_URL_S3",
    "region_name": "AWS_DEFAULT_REGION",
}
# Error codes S3 gives for a key or bucket that is not there.
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "404", "NotFound"})
# Error codes of a conditional PUT (If-None-Match: *) whose key already exists,
# or is being created by a concurrent conditional PUT.
_EXISTS_CODES = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
# Names of the only input files whose features are written into an output.
_SPECTROGRAM_SUFFIX = ".npy"
# A key ending in this, holding no bytes, is a folder marker (the S3 console's
# "Create folder", many sync tools): listing noise, not a file.
_FOLDER_MARKER = "/"


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix (no leading or trailing slash; may be empty)."""

    bucket: str
    prefix: str = ""

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"

    def key(self, rel: str = "") -> str:
        """Return the object key of ``rel`` under this prefix."""
        if not rel:
            return self.prefix
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def child(self, rel: str) -> S3Location:
        """Return the location of ``rel`` under this prefix."""
        return S3Location(self.bucket, self.key(rel))

    def contains(self, other: S3Location) -> bool:
        """Return whether ``other`` is this prefix or lies under it, segment by segment."""
        if other.bucket != self.bucket:
            return False
        return not self.prefix or other.prefix == self.prefix or other.prefix.startswith(self.prefix + "/")


def is_s3(raw: object) -> bool:
    """Return whether ``raw`` is written as an ``s3://`` URI."""
    return isinstance(raw, str) and raw.startswith(SCHEME)


def parse_s3_uri(field_name: str, raw: str) -> S3Location:
    """Parse ``s3://bucket[/prefix]``; refuse a bad bucket name, empty, ``.`` or ``..`` segments.

    One trailing slash is accepted and dropped.

    Raises:
        InvalidConf: naming ``field_name`` and what is wrong.
    """
    rest = raw[len(SCHEME) :]
    rest = rest[:-1] if rest.endswith("/") else rest
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.match(bucket):
        msg = f"{field_name}: {raw!r}: {bucket!r} is not a valid S3 bucket name"
        raise InvalidConf(msg)
    segments = prefix.split("/") if prefix else []
    for segment in segments:
        if segment in ("", ".", ".."):
            msg = f"{field_name}: {raw!r} has an empty, '.' or '..' key segment; give a direct prefix"
            raise InvalidConf(msg)
        if any(ord(c) < 32 or ord(c) == 127 for c in segment):
            msg = f"{field_name}: {raw!r} holds control characters"
            raise InvalidConf(msg)
    return S3Location(bucket, prefix)


def unsafe_key_reason(rel: str) -> str | None:
    """Return why a file or key below an input root cannot be a file of the dataset, or None.

    An S3 key may hold ``..``, ``.`` or empty segments; as a path relative to
    the prefix such a key would point elsewhere, so it is refused, not mapped.
    A spectrogram whose feature would lie in one of the output's own folders
    (``names.own_folder_reason``) is refused too; other files are never
    written to the output, so they stay merely ignored.
    """
    segments = rel.split("/")
    if any(s in ("", ".", "..") for s in segments):
        return f"{rel}: key has an empty, '.' or '..' segment, which would leave the prefix; refused"
    return own_folder_reason(rel) if rel.endswith(_SPECTROGRAM_SUFFIX) else None


@dataclass(frozen=True)
class S3Access:
    """How to reach S3: explicit keys and endpoint, or boto3's default chain where absent."""

    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    endpoint_url: str | None = None
    region_name: str | None = None

    @classmethod
    def from_connection(cls, conn: Any) -> S3Access:
        """Read an Airflow connection as the Amazon provider does: keys in login/password, endpoint in the extra.

        Duck-typed (``login``, ``password``, ``extra_dejson``), so this package
        needs no Airflow import. ``host`` is read as the endpoint where the
        extra names none.
        """
        extra: Mapping[str, Any] = getattr(conn, "extra_dejson", None) or {}
        endpoint = extra.get("endpoint_url") or getattr(conn, "host", None) or None
        return cls(
            access_key_id=getattr(conn, "login", None) or extra.get("aws_access_key_id") or None,
            secret_access_key=getattr(conn, "password", None) or extra.get("aws_secret_access_key") or None,
            session_token=extra.get("aws_session_token") or None,
            endpoint_url=endpoint,
            region_name=extra.get("region_name") or None,
        )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> S3Access:
        """Read the variables ``env`` sets (a child's side); missing ones stay None."""
        environ = os.environ if environ is None else environ
        values = {name: environ.get(var) or None for name, var in _ENV_KEYS.items()}
        values["endpoint_url"] = values["endpoint_url"] or environ.get("AWS_ENDPOINT_URL") or None
        values["region_name"] = values["region_name"] or environ.get("AWS_REGION") or None
        return cls(**values)

    def env(self) -> dict[str, str]:
        """Return the variables that hand these settings to a child process."""
        return {var: value for name, var in _ENV_KEYS.items() if (value := getattr(self, name))}


def resolve_access(
    conn_id: str, get_connection: Callable[[str], Any], not_found: type[Exception] | tuple[type[Exception], ...]
) -> S3Access:
    """Return the S3 settings of connection ``conn_id``, or boto3's default chain when it is not defined.

    ``get_connection`` and ``not_found`` come from the caller (Airflow's
    ``Connection.get`` and its not-found error), so this package imports no
    Airflow. Logs which source applies, never a key.
    """
    try:
        conn = get_connection(conn_id)
    except not_found:
        log.info("connection %r is not defined; S3 uses boto3's default chain (environment, instance profile)", conn_id)
        return S3Access()
    access = S3Access.from_connection(conn)
    log.info(
        "S3 via connection %r: %s, endpoint %s",
        conn_id,
        "keys from the connection" if access.access_key_id else "boto3's default chain for keys",
        access.endpoint_url or "AWS",
    )
    return access


def make_client(access: S3Access, settings: Settings) -> Any:
    """Return a boto3 S3 client with botocore's own retries and explicit timeouts.

    ``settings.s3_retry_mode`` (standard or adaptive) and ``s3_max_attempts``
    bound the retries; ``s3_connect_timeout_s`` and ``s3_read_timeout_s`` bound
    each try, so a dead endpoint fails within a bounded time. An explicit
    endpoint (an S3-compatible server) is addressed path-style.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": settings.s3_retry_mode, "max_attempts": settings.s3_max_attempts},
        connect_timeout=settings.s3_connect_timeout_s,
        read_timeout=settings.s3_read_timeout_s,
        max_pool_connections=max(10, 2 * settings.s3_concurrency),
        s3={"addressing_style": "path"} if access.endpoint_url else None,
    )
    session = boto3.session.Session(
        aws_access_key_id=access.access_key_id,
        aws_secret_access_key=access.secret_access_key,
        aws_session_token=access.session_token,
        region_name=access.region_name,
    )
    return session.client("s3", endpoint_url=access.endpoint_url, config=config)


def _describe(client: Any, operation: str, location: str, exc: Exception) -> str:
    """Return an error message naming the operation, endpoint and object; botocore's text has no secret."""
    endpoint = getattr(getattr(client, "meta", None), "endpoint_url", "?")
    return f"S3 {operation} {location} at {endpoint} failed: {type(exc).__name__}: {exc}"


class ConditionFailed(StoreError):
    """A conditional write or delete was refused: the key exists, or its ETag is no longer the one given."""


@dataclass(frozen=True)
class Tagged:
    """An object's bytes with its ETag, and its age by the S3 server's own clock where the response says."""

    data: bytes
    etag: str
    # Seconds between the object's LastModified and the response's Date header,
    # both stamped by the server; None where the server sent no Date.
    age_s: float | None


def _server_age(response: Mapping[str, Any]) -> float | None:
    """Return the response's ``Date`` minus the object's ``LastModified`` in seconds, or None where either is absent."""
    date = response.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    modified = response.get("LastModified")
    if not date or modified is None:
        return None
    try:
        now = email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError):
        return None
    if now.tzinfo is None or getattr(modified, "tzinfo", None) is None:
        return None  # a date without a zone cannot be compared: the record's own expiry decides
    return (now - modified).total_seconds()


def _error_code(exc: Exception) -> str | None:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code")) if isinstance(response, dict) else None


class S3Store:
    """A dataset folder that is an S3 prefix: keys below it are the files."""

    def __init__(self, location: S3Location, *, client: Any, concurrency: int) -> None:
        self.location = location
        self.client = client
        self.concurrency = max(1, concurrency)
        self.uri = str(location)

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r})"

    def name(self, rel: str) -> str:
        """Return the full URI of ``rel``, for messages."""
        return str(self.location.child(rel)) if rel else self.uri

    def _call(self, operation: str, rel: str, fn: Callable[[], Any]) -> Any:
        """Run one boto3 call; turn its errors into StoreError/StoreMissing naming what failed."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except ClientError as exc:
            code = _error_code(exc)
            msg = _describe(self.client, operation, self.name(rel), exc)
            if code in _MISSING_CODES:
                raise StoreMissing(msg) from None
            raise StoreError(msg) from None
        except (BotoCoreError, OSError) as exc:  # connection refused, timeouts, a body cut off
            raise StoreError(_describe(self.client, operation, self.name(rel), exc)) from None

    def exists(self) -> bool:
        """Return whether any object lies under the prefix (the bucket must exist)."""
        prefix = self.location.key() + "/" if self.location.prefix else ""
        page = self._call(
            "ListObjectsV2",
            "",
            lambda: self.client.list_objects_v2(Bucket=self.location.bucket, Prefix=prefix, MaxKeys=1),
        )
        return bool(page.get("KeyCount") or page.get("Contents"))

    def list(self) -> list[tuple[str, int]]:
        """Return (key relative to the prefix, size) of every object below it, sorted.

        One paginated listing. Keys with a segment starting with a dot are left
        out, as hidden files are locally, and so are folder markers (zero-byte
        keys ending in ``/``); keys that would leave the prefix, a non-empty
        key ending in ``/`` among them, are listed, for the plan to refuse by name.
        """
        prefix = self.location.key() + "/" if self.location.prefix else ""
        found: list[tuple[str, int]] = []

        def walk() -> None:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.location.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    rel, size = obj["Key"][len(prefix) :], int(obj["Size"])
                    if size == 0 and rel.endswith(_FOLDER_MARKER):
                        continue
                    if rel and not any(s.startswith(".") and s not in (".", "..") for s in rel.split("/")):
                        found.append((rel, size))

        self._call("ListObjectsV2", "", walk)
        return sorted(found)

    def read(self, rel: str, *, max_bytes: int | None = None) -> bytes:
        """Return the whole object ``rel``; its ``Content-Length`` is checked before the body is read.

        Raises:
            StoreMissing: no such object.
            InvalidSpectrogram: larger than ``max_bytes`` (named with the limit).
            StoreError: S3 could not be reached or refused the request.
        """
        key = self.location.key(rel)
        response = self._call("GetObject", rel, lambda: self.client.get_object(Bucket=self.location.bucket, Key=key))
        body = response["Body"]
        with contextlib.closing(body):
            length = int(response.get("ContentLength", -1))
            if max_bytes is not None and length > max_bytes:
                msg = f"{rel}: object of {length:,} bytes, over the {max_bytes:,}-byte input limit; not downloaded"
                raise InvalidSpectrogram(msg)
            data: bytes = self._call("GetObject (body)", rel, body.read)
        if 0 <= length != len(data):
            msg = f"S3 GetObject {self.name(rel)}: {len(data)} bytes received of {length}"
            raise StoreError(msg)
        return data

    def read_many(
        self, items: Iterable[tuple[str, int]], *, max_bytes: int, threads: int = 1
    ) -> Iterator[tuple[str, bytes | InvalidSpectrogram]]:
        """Yield (rel, bytes) in the given order while up to ``concurrency`` GETs run ahead.

        ``threads`` is ignored: S3 reads always run ``concurrency`` GETs at once.

        An object listed larger than ``max_bytes`` is refused without a GET.
        Memory stays bounded: at most ``concurrency`` objects are held ahead of
        the caller however many are asked for. A missing object is a bad input;
        any other S3 error is raised (the shard fails, its input is not blamed).
        """
        pending: collections.deque[tuple[str, concurrent.futures.Future[bytes] | InvalidSpectrogram]] = (
            collections.deque()
        )
        source = iter(items)
        with concurrent.futures.ThreadPoolExecutor(self.concurrency, thread_name_prefix="s3-get") as pool:
            try:
                while True:
                    while len(pending) < self.concurrency and (item := next(source, None)) is not None:
                        rel, size = item
                        if size > max_bytes:
                            msg = f"{rel}: object of {size:,} bytes, over the {max_bytes:,}-byte input limit; not downloaded"
                            pending.append((rel, InvalidSpectrogram(msg)))
                        else:
                            pending.append((rel, pool.submit(self.read, rel, max_bytes=max_bytes)))
                    if not pending:
                        return
                    rel, got = pending.popleft()
                    if isinstance(got, InvalidSpectrogram):
                        yield rel, got
                        continue
                    try:
                        yield rel, got.result()
                    except StoreMissing:
                        yield rel, InvalidSpectrogram(f"{rel}: object vanished after it was listed")
                    except InvalidSpectrogram as exc:
                        yield rel, exc
            finally:
                for _, got in pending:
                    if isinstance(got, concurrent.futures.Future):
                        got.cancel()

    def write(self, rel: str, data: bytes) -> None:
        """PUT ``data`` under ``rel`` in one request: S3 makes it visible whole or not at all."""
        key = self.location.key(rel)
        self._call(
            "PutObject", rel, lambda: self.client.put_object(Bucket=self.location.bucket, Key=key, Body=data)
        )

    def create(self, rel: str, data: bytes) -> bool:
        """PUT ``rel`` only if no object has its key (``If-None-Match: *``); return whether this call created it.

        A server that ignores the condition overwrites instead; callers read
        the object back to see whose it is.
        """
        from botocore.exceptions import ClientError

        key = self.location.key(rel)

        def put() -> bool:
            try:
                self.client.put_object(Bucket=self.location.bucket, Key=key, Body=data, IfNoneMatch="*")
            except ClientError as exc:
                if _error_code(exc) in _EXISTS_CODES:
                    return False
                raise
            return True

        return bool(self._call("PutObject", rel, put))

    def _conditional(self, operation: str, rel: str, fn: Callable[[], Any]) -> Any:
        """Run one conditional request; a refused condition (412, or 409 for a concurrent one) raises ConditionFailed."""
        from botocore.exceptions import ClientError

        def guarded() -> Any:
            try:
                return fn()
            except ClientError as exc:
                if _error_code(exc) in _EXISTS_CODES:
                    raise ConditionFailed(_describe(self.client, operation, self.name(rel), exc)) from None
                raise

        return self._call(operation, rel, guarded)

    def create_tagged(self, rel: str, data: bytes) -> str:
        """PUT ``rel`` only if no object has its key (``If-None-Match: *``); return the new object's ETag.

        Raises:
            ConditionFailed: the key exists, or another create of it is in flight.
        """
        key = self.location.key(rel)
        put = lambda: self.client.put_object(Bucket=self.location.bucket, Key=key, Body=data, IfNoneMatch="*")  # noqa: E731
        return str(self._conditional("PutObject (If-None-Match)", rel, put)["ETag"])

    def replace_if_match(self, rel: str, data: bytes, etag: str) -> str:
        """PUT ``rel`` only if its current ETag is ``etag`` (``If-Match``); return the new ETag.

        Raises:
            ConditionFailed: the object was replaced or deleted since ``etag`` was read.
        """
        key = self.location.key(rel)
        put = lambda: self.client.put_object(Bucket=self.location.bucket, Key=key, Body=data, IfMatch=etag)  # noqa: E731
        return str(self._conditional("PutObject (If-Match)", rel, put)["ETag"])

    def read_tagged(self, rel: str) -> Tagged:
        """Return the object ``rel`` with its ETag and its age by the server's clock.

        Raises:
            StoreMissing: no such object.
        """
        key = self.location.key(rel)
        response = self._call("GetObject", rel, lambda: self.client.get_object(Bucket=self.location.bucket, Key=key))
        with contextlib.closing(response["Body"]) as body:
            data: bytes = self._call("GetObject (body)", rel, body.read)
        return Tagged(data, str(response["ETag"]), _server_age(response))

    def delete_if_match(self, rel: str, etag: str) -> None:
        """Delete ``rel`` only if its current ETag is ``etag`` (``If-Match`` on DeleteObject).

        Raises:
            ConditionFailed: the object was replaced since ``etag`` was read.
            StoreError: also where the server does not take a condition on deletes.
        """
        key = self.location.key(rel)
        delete = lambda: self.client.delete_object(Bucket=self.location.bucket, Key=key, IfMatch=etag)  # noqa: E731
        self._conditional("DeleteObject (If-Match)", rel, delete)

    def writer(self) -> S3Writer:
        """Return a writer that keeps up to ``concurrency`` PUTs in flight."""
        return S3Writer(self)

    def delete(self, rel: str) -> None:
        """Delete the object ``rel`` (absent is fine)."""
        key = self.location.key(rel)
        self._call("DeleteObject", rel, lambda: self.client.delete_object(Bucket=self.location.bucket, Key=key))

    def prepare(self, rels: Iterable[str]) -> None:
        """Nothing to prepare: S3 has no folders and, with single PUTs, no temporaries."""

    def modified(self, folder: str) -> list[tuple[str, float]]:
        """Return (rel, ``LastModified`` in POSIX seconds) of each object directly in ``folder``, sorted."""
        prefix = self.location.key(folder) + "/"
        found: list[tuple[str, float]] = []

        def walk() -> None:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.location.bucket, Prefix=prefix, Delimiter="/"):
                for obj in page.get("Contents", []):
                    if name := obj["Key"][len(prefix) :]:
                        found.append((f"{folder}/{name}", obj["LastModified"].timestamp()))

        self._call("ListObjectsV2", folder, walk)
        return sorted(found)


class S3Writer:
    """Concurrent single-request PUTs; reports each object once it is stored."""

    def __init__(self, store: S3Store) -> None:
        self.store = store
        self._pool = concurrent.futures.ThreadPoolExecutor(store.concurrency, thread_name_prefix="s3-put")
        self._pending: collections.deque[tuple[str, concurrent.futures.Future[None]]] = collections.deque()
        self._lock = threading.Lock()

    def put(self, rel: str, data: bytes) -> list[str]:
        """Start the PUT of ``rel``; return the objects stored since the last call, in order.

        Waits for the oldest PUT while ``concurrency`` are in flight. Raises
        the StoreError of the first PUT that failed.
        """
        self._pending.append((rel, self._pool.submit(self.store.write, rel, data)))
        finished = self._collect(block=len(self._pending) > self.store.concurrency)
        return finished

    def _collect(self, *, block: bool) -> list[str]:
        finished: list[str] = []
        while self._pending and (block or self._pending[0][1].done()):
            rel, future = self._pending.popleft()
            future.result()
            finished.append(rel)
            block = False
        return finished

    def flush(self) -> list[str]:
        """Wait for every PUT; return the objects stored since the last call."""
        finished: list[str] = []
        while self._pending:
            finished += self._collect(block=True)
        return finished

    def close(self) -> None:
        """Stop: PUTs not yet started are cancelled, running ones finish."""
        for _, future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> S3Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_reachable(store: S3Store, field_name: str) -> None:
    """Refuse a prefix that is unreachable or empty, naming the field and what S3 said.

    Raises:
        InvalidConf: the bucket is missing, the keys are refused, the endpoint
            is dead, or no object lies under the prefix.
    """
    try:
        found = store.exists()
    except StoreMissing as exc:
        raise InvalidConf(f"{field_name}: bucket {store.location.bucket!r} does not exist ({exc})") from None
    except StoreError as exc:
        raise InvalidConf(f"{field_name}: {exc}") from None
    if not found:
        msg = f"{field_name}: no objects under {store.uri}; check the bucket and prefix"
        raise InvalidConf(msg)
