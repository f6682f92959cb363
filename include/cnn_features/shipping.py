"""The model travels with the features: a copy in each output, fetched by workers on other hosts.

Planning writes the model file into every output it claims, under
``_models/<sha256>.keras``, and rewrites a copy there whose SHA-256 is not
its name. A worker runs the model at the plan's path when the file there
has the plan's SHA-256; on a host without it, or with another file under
that name (a Celery worker whose data folder is not the planner's), it
fetches the output's copy into its cache, checks the SHA-256 on arrival and
runs that (``worker`` then checks the loaded model's digest too). The copy
also records, beside the features, exactly which model made them.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from cnn_features.errors import InvalidSpectrogram, ModelError, StoreError, StoreMissing
from cnn_features.names import MODELS_DIR
from cnn_features.storage import file_sha256, write_atomic
from cnn_features.stores import LocalStore, Store

log = logging.getLogger(__name__)

# Largest model file shipped or fetched: under S3's 5 GiB limit on one PUT
# (a copy is written whole, never in parts), and held in memory once.
MAX_MODEL_BYTES = 4 << 30


def model_name(sha256: str) -> str:
    """Return the store-relative name of a model's copy in an output."""
    return f"{MODELS_DIR}/{sha256}.keras"


def ship_model(output: Store, model: dict[str, Any]) -> None:
    """Copy the model file into ``output`` unless a copy with the plan's SHA-256 is there; rewrite one that differs.

    A local copy is hashed as it streams from disk; an S3 copy is read once
    and hashed (S3 keeps no digest of its own that every server gives back).
    The bytes written are hashed first, so a copy never holds another file
    than its name says.

    Raises:
        ModelError: the model file cannot be read, is larger than
            ``MAX_MODEL_BYTES``, or no longer has the SHA-256 it was checked with.
        OSError, StoreError: the copy cannot be read or written.
    """
    sha256 = str(model["sha256"])
    rel = model_name(sha256)
    path = Path(model["path"])
    try:
        size = path.stat().st_size
    except OSError as exc:
        msg = f"model {path}: cannot be read to copy beside the features ({exc.strerror or exc})"
        raise ModelError(msg) from None
    if size > MAX_MODEL_BYTES:
        msg = (
            f"model {path}: {size:,} bytes, over the {MAX_MODEL_BYTES:,}-byte limit of a model copied beside "
            "the features (workers on other hosts fetch that copy, an S3 output takes it in one PUT); use a smaller model file"
        )
        raise ModelError(msg)
    found = _copy_state(output, rel)
    if found == sha256:
        return
    try:
        data = path.read_bytes()
    except OSError as exc:
        msg = f"model {path}: cannot be read to copy beside the features ({exc.strerror or exc})"
        raise ModelError(msg) from None
    if (got := hashlib.sha256(data).hexdigest()) != sha256:
        msg = (
            f"model {path}: SHA-256 {got} now, not the {sha256} it was checked with; "
            "the file changed during planning: trigger the DAG again"
        )
        raise ModelError(msg)
    output.write(rel, data)
    if found is None:
        log.info("model %s copied to %s", path, output.name(rel))
    else:
        log.warning(
            "model copy %s was not the model (found %s, expected SHA-256 %s): rewritten from %s", output.name(rel), found, sha256, path
        )


def _copy_state(output: Store, rel: str) -> str | None:
    """Return the SHA-256 of the model copy ``rel`` in ``output``; None when there is none.

    A copy too large to be the model gives a description instead, which
    matches no digest.

    Raises:
        OSError, StoreError: the copy is there but cannot be read.
    """
    if isinstance(output, LocalStore):
        try:
            return file_sha256(output.root / rel)
        except FileNotFoundError:
            return None
    try:
        return hashlib.sha256(output.read(rel, max_bytes=MAX_MODEL_BYTES)).hexdigest()
    except StoreMissing:
        return None
    except InvalidSpectrogram:  # S3 refuses to download an object over the limit
        return f"over the {MAX_MODEL_BYTES:,}-byte limit"


def local_model(info: dict[str, Any], output: Store, cache: Path) -> Path:
    """Return a path on this host holding the plan's model: its own path, or the output's copy fetched into ``cache``.

    The file at the plan's path is used only when its SHA-256 is the plan's:
    another host may keep a different model under the same name.

    Raises:
        ModelError: no file with the plan's SHA-256 is at its path, and the
            output's copy cannot be read or its SHA-256 is not the plan's.
    """
    path, sha256 = Path(info["path"]), str(info["sha256"])
    here, where = _host_file(path, sha256)
    if here == sha256:
        return path
    if path.exists():
        log.warning("model %s: %s; using the output's copy", path, where)
    cached = cache / f"{sha256}.keras"
    if cached.is_file() and file_sha256(cached) == sha256:
        return cached
    rel = model_name(sha256)
    try:
        data = output.read(rel, max_bytes=MAX_MODEL_BYTES)
    except (StoreError, InvalidSpectrogram) as exc:
        msg = (
            f"model {path}: {where}, and its copy {output.name(rel)} cannot be read ({exc}); "
            f"trigger the DAG again from a host that has the model at {path} to copy it there"
        )
        raise ModelError(msg) from None
    if (got := hashlib.sha256(data).hexdigest()) != sha256:
        msg = (
            f"model copy {output.name(rel)}: SHA-256 {got} on arrival, expected {sha256}; not used: the copy is "
            f"damaged. Trigger the DAG again from a host that has the model at {path} (planning rewrites a copy "
            "whose SHA-256 is wrong), or give this host that model file at that path"
        )
        raise ModelError(msg)
    cache.mkdir(parents=True, exist_ok=True)
    write_atomic(cached, data)
    log.info("model %s: %s, fetched its copy %s (SHA-256 checked)", path, where, output.name(rel))
    return cached


def _host_file(path: Path, sha256: str) -> tuple[str | None, str]:
    """Return the SHA-256 of the model file at ``path`` on this host (None when absent or unreadable), and what is there in words."""
    if not path.is_file():
        return None, "not on this host"
    try:
        found = file_sha256(path)
    except OSError as exc:
        return None, f"unreadable on this host ({exc.strerror or exc})"
    return found, f"the file on this host has SHA-256 {found}, not the plan's {sha256}"
