"""Lineage records: where each feature came from, and whether it may be reused.

Each shard keeps its records in the output store, beside its result, under
``_shards/``. A record is JSON lines: a *context* line per worker attempt
(model digest and file SHA-256, Keras backend and version, device,
precision, shard and run), then one line per feature (its name, the SHA-256
of its input's bytes, the input's stat for local inputs, and the SHA-256 of
the feature file), naming its context.

Records are written *ahead* of the features they name: a worker persists a
pass's lines before it stores the pass's features, so a worker killed at
any point never leaves a stored feature without its record (a record line
whose feature never got stored is harmless: reuse needs the stored file's
SHA-256 to match). Locally a worker appends to one file per attempt; on S3,
where nothing appends, it writes a piece per group of passes. A shard that
finishes writes one whole record, ``<shard_id>.lineage.jsonl``, with every
feature it reused or made, and removes its pieces.

A feature is reused only when a line names the plan's model digest, the
feature file's current SHA-256, and its input's current digest. For a local
input an unchanged (size, mtime_ns, ctime_ns, inode) stands in for hashing
it again: the kernel sets ctime to "now" on every write and every
``utime``, so a file rewritten even with its size and mtime put back no
longer matches and is hashed. The stat is always that of the file whose
bytes are read: a symlink's target (a DVC or git-annex link tree), never
the link, so a target rewritten in place, or a link pointed at another
file, no longer matches. The stat recorded with a feature is the ``fstat``
of the very descriptor its input's bytes came from, and none at all when
the file changed while or just before it was read
(``spectrogram.read_input_stat``). S3 inputs are always hashed again.

Lineage pieces left by killed workers are removed by a passing
verification once every line of them is in a whole record
(``covered_pieces``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cnn_features.errors import InvalidSpectrogram, StoreError
from cnn_features.names import SHARDS_DIR
from cnn_features.spectrogram import MAX_INPUT_BYTES
from cnn_features.stores import LocalStore, Store

# Folder of the pipeline's own records in an output (shard results and
# lineage); verification skips it.
LINEAGE_DIR = SHARDS_DIR
# A shard's records are ``<shard_id>.lineage.jsonl`` (whole, written when the
# shard finishes) and ``<shard_id>.lineage-<attempt>[-<n>].jsonl`` (written
# ahead by a running or killed worker).
LINEAGE_MARK = ".lineage"
LINEAGE_SUFFIX = ".jsonl"
# Largest record read: a 100,000-file shard's is about 30 MB.
MAX_RECORD_BYTES = 1 << 30
# Bumped when a line's fields change meaning; lines of another version are ignored.
LINEAGE_VERSION = 1
# An S3 piece is written once this many features wait for it, or once the
# oldest has waited S3_PIECE_WAIT_S: at most one extra PUT a second per worker
# (well under 1 % more requests at a few hundred files/s), and features are
# stored, and seen stored, within about a second of being made.
S3_PIECE_FEATURES = 256
S3_PIECE_WAIT_S = 1.0
# Fields of a context line, the same for every feature one worker attempt wrote.
CONTEXT_FIELDS = (
    "model_digest",
    "model_sha256",
    "keras_backend",
    "keras_version",
    "device",
    "precision",
    "shard_id",
    "run_id",
)


def sha256_hex(data: bytes) -> str:
    """Return the hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def record_name(shard_id: str) -> str:
    """Return the store-relative name of a shard's whole record."""
    return f"{LINEAGE_DIR}/{shard_id}{LINEAGE_MARK}{LINEAGE_SUFFIX}"


def is_record(rel: str, shard_id: str | None = None) -> bool:
    """Tell whether ``rel`` is a lineage record (of ``shard_id`` when given): whole or a piece."""
    if not (rel.startswith(f"{LINEAGE_DIR}/") and rel.endswith(LINEAGE_SUFFIX)):
        return False
    name = rel[len(LINEAGE_DIR) + 1 :]
    if shard_id is not None:
        return name.startswith(f"{shard_id}{LINEAGE_MARK}")
    return LINEAGE_MARK in name


def input_stat(source: Store, rel: str) -> list[int] | None:
    """Return a local input's (size, mtime_ns, ctime_ns, inode) now, or None (S3, or nothing a read would get).

    Links are followed as a read follows them (``LocalStore.stat``): this is
    the stat of the bytes a read would get now.
    """
    if not isinstance(source, LocalStore):
        return None
    try:
        return _stat_fields(source.stat(rel))
    except InvalidSpectrogram:
        return None


def read_stat(source: Store, rel: str) -> list[int] | None:
    """Return the (size, mtime_ns, ctime_ns, inode) of the descriptor ``source.read_many`` last read ``rel`` from, once.

    This, not a stat taken before or after the read, is what a record line
    holds: it is the stat of the very bytes hashed. None for S3, and where
    the file changed while or just before it was read (the next run then
    hashes it again).
    """
    if not isinstance(source, LocalStore):
        return None
    st = source.take_read_stat(rel)
    return None if st is None else _stat_fields(st)


def _stat_fields(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def is_piece(rel: str) -> bool:
    """Tell whether ``rel`` is a lineage piece (written ahead by a running or killed worker), not a whole record."""
    return is_record(rel) and not rel.endswith(f"{LINEAGE_MARK}{LINEAGE_SUFFIX}")


def parse_lines(data: bytes) -> Iterator[dict[str, Any]]:
    """Yield the entries of one record: each feature line merged with its context.

    Lines that do not parse (a worker killed mid-append), of another
    version, or naming an unknown context are skipped.
    """
    contexts: dict[str, dict[str, Any]] = {}
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(line, dict) or line.get("v") != LINEAGE_VERSION:
            continue
        if isinstance(ctx := line.get("context"), dict) and isinstance(ctx.get("id"), str):
            contexts[ctx["id"]] = {k: ctx.get(k) for k in CONTEXT_FIELDS}
        elif isinstance(line.get("f"), str) and (ctx := contexts.get(str(line.get("c")))) is not None:
            yield {
                "feature": line["f"],
                "input_sha256": line.get("in"),
                "input_stat": line.get("st"),
                "feature_sha256": line.get("out"),
                **ctx,
            }


def load_entries(
    output: Store, *, listing: Iterable[tuple[str, int]] | None = None, shard_id: str | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Return the lineage entries under ``output`` (of one shard's records when ``shard_id`` is given), by feature.

    ``listing`` is ``output.list()`` when the caller already has it.
    Unreadable records are skipped: their features then have no lineage
    and are extracted again.
    """
    entries: dict[str, list[dict[str, Any]]] = {}
    try:
        names = [rel for rel, _ in (output.list() if listing is None else listing) if is_record(rel, shard_id)]
    except (OSError, StoreError):
        return entries
    for _, data in output.read_many(((rel, 0) for rel in sorted(names)), max_bytes=MAX_RECORD_BYTES) if names else ():
        if isinstance(data, InvalidSpectrogram):
            continue
        for entry in parse_lines(data):
            entries.setdefault(entry["feature"], []).append(entry)
    return entries


def matching_entry(found: list[dict[str, Any]], *, feature_sha256: str, model_digest: str) -> dict[str, Any] | None:
    """Return the entry that made this feature with this model, or None."""
    return next(
        (e for e in reversed(found) if e.get("model_digest") == model_digest and e.get("feature_sha256") == feature_sha256),
        None,
    )


def reusable(
    source: Store,
    digests: dict[str, str],
    entries: dict[str, list[dict[str, Any]]],
    *,
    model_digest: str,
) -> tuple[dict[str, dict[str, Any]], int]:
    """Return, for each feature in ``digests`` (name -> SHA-256) that may be reused, its lineage entry; and how many inputs were hashed.

    A feature is kept only when an entry names the plan's model, the
    feature's current SHA-256, and the input's current digest (the stat fast
    path, else the input read and hashed again).
    """
    matches: dict[str, dict[str, Any]] = {}
    for rel, digest in digests.items():
        if (match := matching_entry(entries.get(rel, []), feature_sha256=digest, model_digest=model_digest)) is not None:
            matches[rel] = match
    return unchanged_inputs(source, matches)


def unchanged_inputs(source: Store, matches: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], int]:
    """Return the entries of ``matches`` whose input still has the recorded digest (with its stat now), and how many were hashed.

    An unchanged local stat (of what a read would get: a link's target)
    trusts the recorded digest; any other input is read and hashed, and a
    kept one then carries the stat of the descriptor its bytes were hashed from.
    """
    kept: dict[str, dict[str, Any]] = {}
    to_hash: dict[str, dict[str, Any]] = {}
    for rel, match in matches.items():
        stat = input_stat(source, rel)
        if stat is not None and match.get("input_stat") == stat:
            kept[rel] = match
        else:
            to_hash[rel] = match
    for rel, data in source.read_many(((rel, 0) for rel in to_hash), max_bytes=MAX_INPUT_BYTES) if to_hash else ():
        stat = read_stat(source, rel)
        match = to_hash[rel]
        if not isinstance(data, InvalidSpectrogram) and sha256_hex(data) == match.get("input_sha256"):
            kept[rel] = {**match, "input_stat": stat}
    return kept, len(to_hash)


def covered_pieces(output: Store, *, idle_before: float) -> list[str]:
    """Return the lineage pieces in ``output`` that reuse no longer needs: a whole record holds every line of each.

    A line is held when a whole record (of any shard: a re-plan may have
    moved its feature to another shard) names the same feature, model,
    feature SHA-256 and input SHA-256, so removing the piece changes no
    reuse decision. Only pieces last written before ``idle_before`` (POSIX
    seconds) are looked at, since a live worker appends to its piece after
    each pass; a piece holding a line of another record version is kept.
    Nothing is read unless such a piece exists.
    """
    listed = output.modified(LINEAGE_DIR)
    idle = [rel for rel, mtime in listed if is_piece(rel) and mtime < idle_before]
    if not idle:
        return []
    wholes = [rel for rel, _ in listed if is_record(rel) and not is_piece(rel)]
    held: set[tuple[Any, ...]] = set()
    for _, data in output.read_many(((rel, 0) for rel in wholes), max_bytes=MAX_RECORD_BYTES) if wholes else ():
        if not isinstance(data, InvalidSpectrogram):
            held.update(_cover_key(entry) for entry in parse_lines(data))
    covered: list[str] = []
    for rel, data in output.read_many(((rel, 0) for rel in idle), max_bytes=MAX_RECORD_BYTES):
        if isinstance(data, InvalidSpectrogram) or not _this_version_only(data):
            continue
        if all(_cover_key(entry) in held for entry in parse_lines(data)):
            covered.append(rel)
    return covered


def _cover_key(entry: dict[str, Any]) -> tuple[Any, ...]:
    """Return what a reuse decision reads from an entry: the feature, its model, and both digests."""
    return (entry["feature"], entry.get("model_digest"), entry.get("feature_sha256"), entry.get("input_sha256"))


def _this_version_only(data: bytes) -> bool:
    """Tell whether every line of ``data`` that parses is of ``LINEAGE_VERSION`` (torn lines are skipped)."""
    for raw in data.split(b"\n"):
        try:
            line = json.loads(raw) if raw.strip() else None
        except ValueError:
            continue
        if line is not None and (not isinstance(line, dict) or line.get("v") != LINEAGE_VERSION):
            return False
    return True


def _context_line(context_id: str, context: dict[str, Any]) -> bytes:
    line = {"v": LINEAGE_VERSION, "context": {"id": context_id, **{k: context.get(k) for k in CONTEXT_FIELDS}}}
    return json.dumps(line, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _feature_line(context_id: str, entry: dict[str, Any]) -> bytes:
    line = {
        "v": LINEAGE_VERSION,
        "c": context_id,
        "f": entry["feature"],
        "in": entry["input_sha256"],
        "st": entry.get("input_stat"),
        "out": entry["feature_sha256"],
    }
    return json.dumps(line, sort_keys=True, separators=(",", ":")).encode("utf-8")


def encode_record(entries: Iterable[dict[str, Any]]) -> bytes:
    """Return a whole record naming ``entries`` (each a full entry, as ``parse_lines`` yields them)."""
    contexts: dict[tuple[Any, ...], str] = {}
    head: list[bytes] = []
    body: list[bytes] = []
    for entry in sorted(entries, key=lambda e: e["feature"]):
        key = tuple(entry.get(k) for k in CONTEXT_FIELDS)
        if key not in contexts:
            contexts[key] = f"c{len(contexts)}"
            head.append(_context_line(contexts[key], dict(zip(CONTEXT_FIELDS, key, strict=True))))
        body.append(_feature_line(contexts[key], entry))
    return b"\n".join([*head, *body]) + b"\n"


@dataclass
class LineageLog:
    """A worker attempt's lineage, written ahead of the features it names.

    ``add`` takes a pass's entries; ``flush`` makes every added entry
    durable in the output before the caller stores those features;
    ``finish`` writes the shard's whole record and removes its pieces.
    """

    output: Store
    shard_id: str
    context: dict[str, Any]
    attempt: str = field(default_factory=lambda: f"{int(time.time())}-{os.getpid()}-{secrets.token_hex(3)}")
    pending: list[dict[str, Any]] = field(default_factory=list)
    pieces: int = 0
    _since: float = 0.0
    # False only for the benchmark's baseline (fault ``no_lineage``): nothing is written.
    enabled: bool = True

    @property
    def local(self) -> bool:
        return isinstance(self.output, LocalStore)

    def add(self, entries: Iterable[dict[str, Any]]) -> None:
        """Queue entries (each with ``feature``, ``input_sha256``, ``input_stat`` and ``feature_sha256``)."""
        if not self.pending:
            self._since = time.monotonic()
        self.pending.extend(entries)

    def due(self) -> bool:
        """Tell whether the queued entries should be made durable now (always locally; per group or second on S3)."""
        if not self.enabled:
            return True
        if not self.pending:
            return False
        return self.local or len(self.pending) >= S3_PIECE_FEATURES or time.monotonic() - self._since >= S3_PIECE_WAIT_S

    def flush(self) -> None:
        """Make every queued entry durable: one append locally, one piece (a PUT) on S3.

        Raises:
            OSError, StoreError: the record could not be written (as a feature could not).
        """
        if not self.pending or not self.enabled:
            return
        lines = [_feature_line("c0", entry) for entry in self.pending]
        if self.local:
            assert isinstance(self.output, LocalStore)
            path = self.output.root / f"{LINEAGE_DIR}/{self.shard_id}{LINEAGE_MARK}-{self.attempt}{LINEAGE_SUFFIX}"
            path.parent.mkdir(parents=True, exist_ok=True)
            # Each append starts on a new line (a line torn by a kill stays unparsable
            # alone) and repeats the context, so it reads without the appends before it.
            data = _context_line("c0", self.context) + b"\n" + b"\n".join(lines) + b"\n"
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                _write_all(fd, b"\n" + data)
            finally:
                os.close(fd)
        else:
            self.pieces += 1
            rel = f"{LINEAGE_DIR}/{self.shard_id}{LINEAGE_MARK}-{self.attempt}-{self.pieces:06d}{LINEAGE_SUFFIX}"
            self.output.write(rel, _context_line("c0", self.context) + b"\n" + b"\n".join(lines) + b"\n")
        self.pending.clear()

    def finish(self, entries: Iterable[dict[str, Any]], *, listing: Iterable[tuple[str, int]]) -> None:
        """Write the shard's whole record (``entries``: every feature it reused or made), then remove its pieces.

        ``listing`` is the output's listing taken when the worker started;
        pieces of earlier, killed attempts in it go too.
        """
        if not self.enabled:
            return
        self.output.write(record_name(self.shard_id), encode_record(entries))
        whole = record_name(self.shard_id)
        pieces = {rel for rel, _ in listing if is_record(rel, self.shard_id) and rel != whole}
        if self.local:
            pieces.add(f"{LINEAGE_DIR}/{self.shard_id}{LINEAGE_MARK}-{self.attempt}{LINEAGE_SUFFIX}")
        else:
            pieces.update(
                f"{LINEAGE_DIR}/{self.shard_id}{LINEAGE_MARK}-{self.attempt}-{n:06d}{LINEAGE_SUFFIX}"
                for n in range(1, self.pieces + 1)
            )
        for rel in sorted(pieces):
            with contextlib.suppress(OSError, StoreError):  # a piece left behind only duplicates the record
                self.output.delete(rel)


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd``; a short write (a full disk) raises instead of losing the rest."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(28, "short write to a lineage record")
        view = view[written:]
