"""The model travels with the features: a copy in each output, fetched by workers on other hosts.

Planning writes the model file into every output it claims, under
``_models/<sha256>.keras``. A worker runs the model at the plan's path when
that file exists on its host (``worker`` then refuses one whose digest is not
the plan's); on a host without it (a Celery worker whose data folder is not
the planner's) it fetches the output's copy into its cache, checks the
SHA-256 on arrival and runs that. The copy also records, beside the
features, exactly which model made them.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from cnn_features.errors import ModelError, StoreError, StoreMissing
from cnn_features.storage import file_sha256, write_atomic
from cnn_features.stores import Store

log = logging.getLogger(__name__)

# Folder of model copies in an output (``_`` folders hold no features).
MODELS_DIR = "_models"
# Largest model file shipped or fetched.
MAX_MODEL_BYTES = 4 << 30


def model_name(sha256: str) -> str:
    """Return the store-relative name of a model's copy in an output."""
    return f"{MODELS_DIR}/{sha256}.keras"


def ship_model(output: Store, model: dict[str, Any]) -> None:
    """Copy the model file into ``output`` unless a copy of its size is there.

    Raises:
        ModelError: the model file cannot be read.
        OSError, StoreError: the copy cannot be written.
    """
    rel = model_name(str(model["sha256"]))
    path = Path(model["path"])
    try:
        size = path.stat().st_size
    except OSError as exc:
        msg = f"model {path}: cannot be read to copy beside the features ({exc.strerror or exc})"
        raise ModelError(msg) from None
    try:
        if len(output.read(rel, max_bytes=MAX_MODEL_BYTES)) == size:
            return
    except StoreMissing:
        pass
    output.write(rel, path.read_bytes())
    log.info("model %s copied to %s", path, output.name(rel))


def local_model(info: dict[str, Any], output: Store, cache: Path) -> Path:
    """Return a path on this host holding the plan's model: its own path, or the output's copy fetched into ``cache``.

    Raises:
        ModelError: the model is neither at its path nor in the output, or the
            copy's SHA-256 is not the plan's.
    """
    path, sha256 = Path(info["path"]), str(info["sha256"])
    if path.is_file():
        return path
    cached = cache / f"{sha256}.keras"
    if cached.is_file() and file_sha256(cached) == sha256:
        return cached
    rel = model_name(sha256)
    try:
        data = output.read(rel, max_bytes=MAX_MODEL_BYTES)
    except StoreError as exc:
        msg = f"model {path}: not on this host, and its copy {output.name(rel)} cannot be read ({exc})"
        raise ModelError(msg) from None
    if (got := hashlib.sha256(data).hexdigest()) != sha256:
        msg = f"model copy {output.name(rel)}: SHA-256 {got} on arrival, expected {sha256}; not used"
        raise ModelError(msg)
    cache.mkdir(parents=True, exist_ok=True)
    write_atomic(cached, data)
    log.info("model %s is not on this host: fetched its copy %s (SHA-256 checked)", path, output.name(rel))
    return cached
