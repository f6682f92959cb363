"""Validate a run conf, check the model, and cut each dataset into stable shards.

Parent side, no TensorFlow: the model check runs in a fresh CPU-only process.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnn_features.config import Settings
from cnn_features.datasets import get_dataset, label_all
from cnn_features.errors import InvalidConf, InvalidInput, ModelError, OutputConflict, PlanMismatch, StoreError
from cnn_features.names import FEATURES_META, PLANS_DIR
from cnn_features.procs import RESULT_PREFIX, child_env, parse_line, python_module_cmd
from cnn_features.s3 import S3Access, S3Location, S3Store, check_reachable, is_s3, parse_s3_uri, unsafe_key_reason
from cnn_features.shipping import ship_model
from cnn_features.storage import file_sha256, write_json_atomic
from cnn_features.stores import Location, Store, open_store

log = logging.getLogger(__name__)

DEVICES = ("auto", "gpu", "cpu")
# Largest shard size a conf may ask for: a shard this big already takes
# minutes; beyond it sharding stops helping. The plan may still raise the size
# past it (``fit_shard_size``) to keep within Airflow's core.max_map_length.
MAX_SHARD_SIZE = 100_000
# Seconds allowed for loading (or creating) the model in the check process.
MODEL_CHECK_TIMEOUT_S = 600
# Names of ignored (non-.npy) files carried in a plan, so a corpus folder full of
# .wav files beside the spectrograms does not bloat it; the count is exact.
MAX_IGNORED_LISTED = 1000
# Version of the plan files' layout (``plan_files``); a reader refuses another.
PLAN_FORMAT = 1
# Fields every shard of one dataset shares: written once, in the plan's index.
_PLAN_COMMON = ("dataset", "input", "output", "model", "batch_size", "count")
_DIGEST = re.compile(r"[0-9a-f]{64}")
# Suffix of the only files the pipeline reads; anything else in a corpus folder
# (README.txt, .wav, .csv) is ignored, listed apart from bad inputs.
INPUT_SUFFIX = ".npy"
# Fields of a model's info (``model.ModelInfo``), as the check process prints them.
_MODEL_INFO_KEYS = frozenset(
    {"path", "sha256", "n_mels", "frames", "channel_axis", "feature_dim", "min_frames", "activation_bytes_per_frame", "digest"}
)


@dataclass(frozen=True)
class DatasetIO:
    """One dataset's input and output: local folders or S3 prefixes, validated."""

    name: str
    input: Location
    output: Location


@dataclass(frozen=True)
class RunConf:
    """A validated run conf."""

    datasets: tuple[DatasetIO, ...]
    device: str
    shard_size: int
    model_path: Path | None
    max_bad_fraction: float


def allowed_roots(settings: Settings) -> tuple[Location, ...]:
    """Return the folders and S3 prefixes run-conf locations must lie in (``CNN_FEATURES_ALLOWED_ROOTS``).

    Entries are separated by ``:`` (an ``s3://`` entry's own colon included).
    """
    raw = os.environ.get("CNN_FEATURES_ALLOWED_ROOTS", "")
    roots: list[Location] = []
    for entry in _split_roots(raw):
        if is_s3(entry):
            roots.append(parse_s3_uri("CNN_FEATURES_ALLOWED_ROOTS", entry))
        else:
            roots.append(Path(entry).expanduser().resolve())
    return tuple(roots) if roots else (settings.home,)


def _split_roots(raw: str) -> list[str]:
    """Split a ``:``-separated list whose entries may be ``s3://`` URIs."""
    parts = raw.split(os.pathsep)
    entries: list[str] = []
    for part in parts:
        if entries and entries[-1] == "s3" and part.startswith("//"):
            entries[-1] = f"s3:{part}"
        else:
            entries.append(part.strip())
    return [e for e in entries if e]


def checked_location(field: str, raw: Any, roots: tuple[Location, ...]) -> Location:
    """Return the validated location of conf field ``field``: a resolved path or an S3 prefix.

    Raises:
        InvalidConf: naming the field: not a string, a relative path, ``..``,
            a bad S3 URI, or outside every allowed root.
    """
    if is_s3(raw):
        location = parse_s3_uri(field, raw)
        if not any(isinstance(root, S3Location) and root.contains(location) for root in roots):
            allowed = ", ".join(str(r) for r in roots if isinstance(r, S3Location)) or "none"
            msg = (
                f"{field}: {raw!r} is outside the allowed S3 prefixes ({allowed}); "
                "add it to CNN_FEATURES_ALLOWED_ROOTS to allow it"
            )
            raise InvalidConf(msg)
        return location
    return checked_path(field, raw, tuple(r for r in roots if isinstance(r, Path)))


def checked_path(field: str, raw: Any, roots: tuple[Path, ...]) -> Path:
    """Return the resolved path of conf field ``field``; raise InvalidConf naming it if unsafe."""
    if not isinstance(raw, str) or not raw.strip():
        msg = f"{field}: expected a non-empty path string or s3:// URI, got {raw!r}"
        raise InvalidConf(msg)
    path = Path(raw)
    if not path.is_absolute():
        msg = f"{field}: {raw!r} is relative; give an absolute path or an s3:// URI"
        raise InvalidConf(msg)
    if ".." in path.parts:
        msg = f"{field}: {raw!r} contains '..'; give a direct path"
        raise InvalidConf(msg)
    real = path.resolve()
    if not any(real == root or root in real.parents for root in roots):
        allowed = ", ".join(str(r) for r in roots) or "none"
        msg = f"{field}: {raw!r} is outside the allowed roots ({allowed}); set CNN_FEATURES_ALLOWED_ROOTS to allow it"
        raise InvalidConf(msg)
    return real


def _overlaps(a: Location, b: Location) -> bool:
    if isinstance(a, S3Location) and isinstance(b, S3Location):
        return a.contains(b) or b.contains(a)
    if isinstance(a, Path) and isinstance(b, Path):
        return a == b or a in b.parents or b in a.parents
    return False


def uses_s3(params: dict[str, Any]) -> bool:
    """Return whether a run conf names any S3 location (so S3 credentials are needed)."""
    datasets = params.get("datasets")
    if not isinstance(datasets, dict):
        return False
    return any(is_s3(v) for io in datasets.values() if isinstance(io, dict) for v in io.values())


def validate_conf(params: dict[str, Any], settings: Settings, *, access: S3Access | None = None) -> RunConf:
    """Check every field of a run conf before any work; errors name the field.

    S3 inputs are checked with one small listing each (``access`` or boto3's
    default chain): the bucket exists, the keys work, the prefix holds objects.

    Raises:
        InvalidConf: a field is missing, of the wrong type, out of range, or a
            location is relative, contains ``..``, escapes the allowed roots,
            or an input folder or prefix is missing or unreachable.
    """
    roots = allowed_roots(settings)
    errors: list[str] = []
    datasets: list[DatasetIO] = []
    datasets_raw = params.get("datasets")
    if not isinstance(datasets_raw, dict) or not datasets_raw:
        errors.append("datasets: expected a non-empty object of {name: {input, output}}")
        datasets_raw = {}
    for name, io in sorted(datasets_raw.items()):
        dataset, problems = _checked_dataset(name, io, roots, settings, access)
        errors += problems
        if dataset is not None:
            datasets.append(dataset)
    errors += _crossed_locations(datasets)

    device = params.get("device", "auto")
    if device not in DEVICES:
        errors.append(f"device: {device!r} is not one of {', '.join(DEVICES)}")
    shard_size = params.get("shard_size", settings.shard_size)
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or not 1 <= shard_size <= MAX_SHARD_SIZE:
        errors.append(f"shard_size: expected an integer from 1 to {MAX_SHARD_SIZE}, got {shard_size!r}")
    model_raw = params.get("model_path")
    local_roots = tuple(r for r in roots if isinstance(r, Path))
    model_path = None
    try:
        model_path = None if model_raw in (None, "") else checked_path("model_path", model_raw, local_roots)
    except InvalidConf as exc:
        errors.append(str(exc))
    fraction = params.get("max_bad_fraction", 0.0)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0.0 <= fraction <= 1.0:
        errors.append(f"max_bad_fraction: expected a number from 0 to 1, got {fraction!r}")
    if len(errors) == 1:
        raise InvalidConf(errors[0])
    if errors:
        msg = f"the run conf has {len(errors)} problems:\n  " + "\n  ".join(errors)
        raise InvalidConf(msg)
    return RunConf(tuple(datasets), device, shard_size, model_path, float(fraction))


def _crossed_locations(datasets: Sequence[DatasetIO]) -> list[str]:
    """Return why datasets' locations overlap: two outputs, or one's output and another's input (local or S3).

    An output inside another dataset's input would have its features listed
    as that dataset's bad inputs; an input inside another's output would
    have its clips taken for stray features there. Each dataset's own input
    and output are checked in ``_checked_dataset``.
    """
    errors: list[str] = []
    for i, a in enumerate(datasets):
        for b in datasets[i + 1 :]:
            if _overlaps(a.output, b.output):
                errors.append(
                    f"datasets.{a.name}.output {a.output} and datasets.{b.name}.output {b.output} overlap; "
                    "give each dataset its own folder"
                )
    for a in datasets:
        for b in datasets:
            if a is not b and _overlaps(a.output, b.input):
                errors.append(
                    f"datasets.{a.name}.output {a.output} and datasets.{b.name}.input {b.input} overlap; "
                    "keep every dataset's features out of every input tree"
                )
    return errors


def _checked_dataset(
    name: str, io: Any, roots: tuple[Location, ...], settings: Settings, access: S3Access | None
) -> tuple[DatasetIO | None, list[str]]:
    """Return one dataset entry of a run conf, validated, and every problem found in it (the entry is None if any).

    Each field is checked on its own, so a relative input and an output under
    a forbidden root are both reported; checks that need both locations (the
    input exists, input and output do not overlap) run once both are valid.
    """
    errors: list[str] = []
    try:
        get_dataset(name)
    except InvalidInput as exc:
        errors.append(f"datasets.{name}: {exc}")
    if not isinstance(io, dict) or set(io) != {"input", "output"}:
        errors.append(f"datasets.{name}: expected exactly the keys 'input' and 'output', got {io!r}")
        return None, errors
    located: dict[str, Location] = {}
    for key in ("input", "output"):
        try:
            located[key] = checked_location(f"datasets.{name}.{key}", io[key], roots)
        except InvalidConf as exc:
            errors.append(str(exc))
    src, dst = located.get("input"), located.get("output")
    if src is not None:
        try:
            store = open_store(src, settings, access=access)
            if isinstance(store, S3Store):
                check_reachable(store, f"datasets.{name}.input")
            elif not store.exists():
                errors.append(f"datasets.{name}.input: {src} does not exist or is not a folder")
        except InvalidConf as exc:
            errors.append(str(exc))
    if src is not None and dst is not None and _overlaps(src, dst):
        errors.append(f"datasets.{name}: input {src} and output {dst} overlap; keep features out of the input tree")
    if errors or src is None or dst is None:
        return None, errors
    return DatasetIO(name, src, dst), []


def check_model(model_path: Path | None, settings: Settings) -> dict[str, Any]:
    """Return the model's ``ModelInfo`` as a dict, loading it in a fresh CPU-only process when needed.

    With no ``model_path``, the seeded reference extractor is used (and
    created on first use). A model file whose SHA-256 was checked before by
    the same Keras version is not loaded again (``settings.model_info_cache``):
    the check process costs seconds of TensorFlow start-up on every run.

    Raises:
        ModelError: the model is missing, not loadable in safe mode, or does
            not map one spectrogram to one feature vector.
    """
    path = model_path or settings.reference_model_path
    sha256 = None  # a missing, unreadable or misnamed model: the check process says why (or creates the reference)
    if path.suffix == ".keras":
        with contextlib.suppress(OSError):
            sha256 = file_sha256(path)
    if sha256 is not None and (cached := _cached_info(settings, sha256)) is not None:
        log.info("model %s: sha256 %s checked before, not loaded again", path, sha256[:12])
        return {**cached, "path": str(path), "sha256": sha256}
    info = _load_in_child(model_path, settings)
    _cache_info(settings, info)
    return info


def _cache_entry(settings: Settings, sha256: str) -> Path:
    try:
        keras_version = importlib.metadata.version("keras")
    except importlib.metadata.PackageNotFoundError:
        keras_version = "unknown"
    return settings.model_info_cache / f"{sha256}-keras-{keras_version}.json"


def _cached_info(settings: Settings, sha256: str) -> dict[str, Any] | None:
    """Return the cached info of the model with this SHA-256, or None if absent or unusable."""
    entry = _cache_entry(settings, sha256)
    try:
        info = json.loads(entry.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("model info cache %s unreadable (%s); checking the model again", entry, exc)
        return None
    if not isinstance(info, dict) or set(info) != _MODEL_INFO_KEYS or info.get("sha256") != sha256:
        log.warning("model info cache %s does not hold this model's info; checking the model again", entry)
        return None
    return info


def _cache_info(settings: Settings, info: dict[str, Any]) -> None:
    try:
        write_json_atomic(_cache_entry(settings, info["sha256"]), info)
    except OSError as exc:  # a read-only home only costs the next run a model check
        log.warning("cannot cache the model info under %s: %s", settings.model_info_cache, exc)


def _load_in_child(model_path: Path | None, settings: Settings) -> dict[str, Any]:
    """Load the model in a fresh CPU-only process and return its ``ModelInfo`` as a dict."""
    args = [str(model_path)] if model_path else [str(settings.reference_model_path), "--create-reference"]
    try:
        proc = subprocess.run(
            python_module_cmd("cnn_features.model", *args),
            env=child_env("cpu"),
            capture_output=True,
            text=True,
            timeout=MODEL_CHECK_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        msg = f"model {args[0]}: loading took over {MODEL_CHECK_TIMEOUT_S} s"
        raise ModelError(msg) from None
    for line in reversed(proc.stdout.splitlines()):
        payload = parse_line(line, RESULT_PREFIX)
        if payload is not None:
            if not payload.pop("ok"):
                raise ModelError(payload["error"])
            return payload
    tail = " | ".join(proc.stderr.strip().splitlines()[-5:])
    msg = f"model {args[0]}: check process exited with code {proc.returncode}: {tail}"
    raise ModelError(msg)


def claim_output(
    dataset: DatasetIO, model: dict[str, Any], *, settings: Settings | None = None, access: S3Access | None = None
) -> None:
    """Record which model writes ``dataset.output``; refuse one made by another model.

    Raises:
        OutputConflict: the folder holds features of a different model, so
            resuming would mix two feature spaces, or it cannot be written.
        ModelError: the model cannot be copied beside the features
            (``shipping.ship_model``: unreadable, too large, or changed).
    """
    store = open_store(dataset.output, settings, access=access)
    meta = {
        "model_digest": model["digest"],
        "model_sha256": model["sha256"],
        "feature_dim": model["feature_dim"],
        "model_path": model["path"],
    }
    where = store.name(FEATURES_META)
    # Create if absent, then read back: of two first runs only one creates the
    # record, and each then sees whose it is (no check-then-write race).
    try:
        store.create(FEATURES_META, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    except (OSError, StoreError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        msg = f"datasets.{dataset.name}.output: cannot write to {store.uri} ({reason})"
        raise OutputConflict(msg) from None
    try:
        existing = json.loads(store.read(FEATURES_META))
    except (StoreError, ValueError) as exc:
        msg = f"{where}: unreadable ({exc}); remove it if the folder's features may be discarded"
        raise OutputConflict(msg) from None
    existing = existing if isinstance(existing, dict) else {}
    # The model is known by its digest (architecture and weights); a folder
    # claimed before digests were recorded is known by its file's SHA-256.
    if "model_digest" not in existing and existing.get("model_sha256") == model["sha256"]:
        store.write(FEATURES_META, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    elif existing.get("model_digest") != model["digest"]:
        msg = (
            f"datasets.{dataset.name}.output: {store.uri} holds features of model "
            f"{existing.get('model_path')} (digest {str(existing.get('model_digest', existing.get('model_sha256')))[:12]}), "
            f"not of {model['path']} (digest {model['digest'][:12]}); use another output folder"
        )
        raise OutputConflict(msg)
    # Workers on hosts without the model file fetch this copy (``shipping.local_model``).
    try:
        ship_model(store, model)
    except (OSError, StoreError) as exc:
        msg = f"datasets.{dataset.name}.output: cannot copy the model into {store.uri} ({exc})"
        raise OutputConflict(msg) from None


@dataclass(frozen=True)
class Listing:
    """One dataset's input files, in sorted order, with what the plan carries about them."""

    files: list[str]
    sizes: dict[str, int]
    rejected: dict[str, str]
    ignored: list[str]


@dataclass(frozen=True)
class RunPlan:
    """Every shard of a run, and the shard size that cut them.

    ``note`` says why ``shard_size`` is larger than the conf asked for
    (``fit_shard_size``), or is None when it is not.
    """

    shards: list[dict[str, Any]]
    shard_size: int
    requested_shard_size: int
    note: str | None


def list_dataset(dataset: DatasetIO, *, settings: Settings | None = None, access: S3Access | None = None) -> Listing:
    """List one dataset's input: the files to extract, their sizes, bad names and ignored files.

    Files that are not ``.npy`` by name (a README, audio) are not inputs:
    they are ``ignored`` and count toward no bad fraction. ``.npy`` names
    that do not parse, duplicate clip ids and S3 keys that would leave the
    prefix are ``rejected``, to be reported, not extracted.
    """
    spec = get_dataset(dataset.name)
    listed, unnamed = _printable_names(open_store(dataset.input, settings, access=access).list())
    files: list[str] = []
    ignored: list[str] = []
    unsafe: dict[str, str] = {}
    for rel, _ in listed:
        if (reason := unsafe_key_reason(rel)) is not None:
            unsafe[rel] = reason
            files.append(rel)
        elif rel.endswith(INPUT_SUFFIX) or rel in unnamed:
            files.append(rel)
        else:
            ignored.append(rel)
    if ignored:
        log.info("dataset %s: %d file(s) that are not %s ignored, e.g. %s", dataset.name, len(ignored), INPUT_SUFFIX, ignored[0])
    _, rejected = label_all(spec, files)
    rejected.update(unsafe)
    rejected.update(unnamed)
    return Listing(files, dict(listed), rejected, ignored)


def cut_shards(dataset: DatasetIO, listing: Listing, *, shard_size: int) -> list[dict[str, Any]]:
    """Cut one dataset's sorted file list into shards of ``shard_size`` with stable ids.

    The same listing and ``shard_size`` always give the same shards, so
    re-running shard ``ravdess-0003`` processes exactly its own files. The
    first shard carries the ignored files (up to ``MAX_IGNORED_LISTED``
    names, and their count); each shard carries its rejected files and the
    size of each file (workers order and limit reads by it).
    """
    files, sizes, rejected = listing.files, listing.sizes, listing.rejected
    chunks = [files[i : i + shard_size] for i in range(0, len(files), shard_size)]
    return [
        {
            "shard_id": f"{dataset.name}-{index:04d}",
            "label": f"{dataset.name} {index}/{len(chunks)}",
            "dataset": dataset.name,
            "index": index,
            "count": len(chunks),
            "input": str(dataset.input),
            "output": str(dataset.output),
            "files": chunk,
            "sizes": [sizes[rel] for rel in chunk],
            "rejected": {rel: rejected[rel] for rel in chunk if rel in rejected},
            "ignored": listing.ignored[:MAX_IGNORED_LISTED] if index == 1 else [],
            "ignored_count": len(listing.ignored) if index == 1 else 0,
        }
        for index, chunk in enumerate(chunks, start=1)
    ]


def plan_dataset(
    dataset: DatasetIO, *, shard_size: int, settings: Settings | None = None, access: S3Access | None = None
) -> list[dict[str, Any]]:
    """List one dataset and cut it into stable shards (``list_dataset``, then ``cut_shards``)."""
    return cut_shards(dataset, list_dataset(dataset, settings=settings, access=access), shard_size=shard_size)


def shard_count(counts: Sequence[int], shard_size: int) -> int:
    """Return how many shards datasets of ``counts`` files make at ``shard_size`` (an empty one makes none)."""
    return sum(-(-n // shard_size) for n in counts)


def fit_shard_size(counts: Sequence[int], *, shard_size: int, max_shards: int) -> int:
    """Return the smallest shard size from ``shard_size`` up whose shards number at most ``max_shards``.

    ``counts`` holds each dataset's file count; each dataset's shards are cut
    apart, so the total is what must fit (Airflow maps one task per shard,
    and refuses more than ``core.max_map_length`` of them).

    Raises:
        InvalidConf: more datasets hold files than ``max_shards``: no size fits.
    """
    if shard_count(counts, shard_size) <= max_shards:
        return shard_size
    filled = sum(1 for n in counts if n > 0)
    if filled > max_shards:
        msg = f"shard_size: {filled} datasets need a shard each, over the {max_shards} mapped tasks core.max_map_length allows"
        raise InvalidConf(msg)
    low, high = max(shard_size + 1, -(-sum(counts) // max_shards)), max(counts)
    while low < high:  # the count only falls as the size grows: the smallest size that fits
        middle = (low + high) // 2
        if shard_count(counts, middle) <= max_shards:
            high = middle
        else:
            low = middle + 1
    return low


def _printable_names(listed: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], dict[str, str]]:
    """Replace names that are not valid UTF-8 by their ``repr()``; return the listing and their reasons.

    Such a name (bytes the file system kept, decoded with surrogates) cannot
    be serialised as JSON (the plan files); it travels only as its ``repr()``, a bad input
    that no worker reads.
    """
    named: list[tuple[str, int]] = []
    reasons: dict[str, str] = {}
    for rel, size in listed:
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            shown = repr(rel)
            reasons[shown] = f"{shown}: file name is not valid UTF-8; rename the file"
            named.append((shown, size))
            continue
        named.append((rel, size))
    return named, reasons


def make_plan(
    conf: RunConf,
    model: dict[str, Any],
    *,
    batch_size: int,
    max_shards: int | None = None,
    settings: Settings | None = None,
    access: S3Access | None = None,
) -> RunPlan:
    """Claim every output, list every dataset and cut the shards, each carrying the model and batch size.

    With ``max_shards`` (Airflow's ``core.max_map_length``), the shard size
    is raised when the conf's would make more shards than that in all, and
    the plan's ``note`` says so.
    """
    listings: list[tuple[DatasetIO, Listing]] = []
    for dataset in conf.datasets:
        claim_output(dataset, model, settings=settings, access=access)
        listings.append((dataset, list_dataset(dataset, settings=settings, access=access)))
    counts = [len(listing.files) for _, listing in listings]
    shard_size = conf.shard_size
    note = None
    if max_shards is not None:
        shard_size = fit_shard_size(counts, shard_size=conf.shard_size, max_shards=max_shards)
    if shard_size != conf.shard_size:
        note = (
            f"shard_size raised from {conf.shard_size:,} to {shard_size:,}: {sum(counts):,} files in shards of "
            f"{conf.shard_size:,} make {shard_count(counts, conf.shard_size):,} shards, over the {max_shards:,} "
            "mapped tasks Airflow allows (core.max_map_length); raise that setting to keep smaller shards"
        )
        log.warning("%s", note)
    shards: list[dict[str, Any]] = []
    for dataset, listing in listings:
        planned = cut_shards(dataset, listing, shard_size=shard_size)
        if not planned:
            log.warning("dataset %s: no files under %s", dataset.name, dataset.input)
        shards.extend({**shard, "model": model, "batch_size": batch_size} for shard in planned)
        log.info(
            "dataset %s: %d files in %d shard(s) of up to %d, %s -> %s",
            dataset.name,
            len(listing.files),
            len(planned),
            shard_size,
            dataset.input,
            dataset.output,
        )
    return RunPlan(shards, shard_size, conf.shard_size, note)


def plan_run(
    conf: RunConf,
    model: dict[str, Any],
    *,
    batch_size: int,
    settings: Settings | None = None,
    access: S3Access | None = None,
) -> list[dict[str, Any]]:
    """Return every shard of the run at the conf's shard size, each carrying the model and batch size."""
    return make_plan(conf, model, batch_size=batch_size, settings=settings, access=access).shards


def plan_digest(data: bytes) -> str:
    """Return the hex SHA-256 that names a plan file holding ``data``."""
    return hashlib.sha256(data).hexdigest()


def _json_bytes(payload: Any) -> bytes:
    """Return ``payload`` as compact, deterministic JSON (sorted keys, no spaces)."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def plan_files(shards: list[dict[str, Any]]) -> tuple[bytes, dict[str, bytes]]:
    """Return one dataset's plan: its index file and each shard's file, by shard id.

    A shard's file holds its own fields (files, sizes, rejected, ignored);
    the index holds the fields every shard shares, once, and for each shard
    its id, label and the SHA-256 of its file. So the index's digest names
    the whole plan, and a worker reads the index and its own shard only.
    Deterministic (sorted keys, no time stamps): the same shards give the
    same bytes, so the same digests and file names.
    """
    common = {key: shards[0][key] for key in _PLAN_COMMON}
    own = {s["shard_id"]: _json_bytes({k: v for k, v in s.items() if k not in _PLAN_COMMON}) for s in shards}
    entries = [{"shard_id": s["shard_id"], "label": s["label"], "sha256": plan_digest(own[s["shard_id"]])} for s in shards]
    return _json_bytes({"format": PLAN_FORMAT, **common, "shards": entries}), own


def publish_plan(
    shards: list[dict[str, Any]], *, settings: Settings | None = None, access: S3Access | None = None
) -> tuple[list[dict[str, Any]], dict[str, dict[str, str]]]:
    """Write each dataset's plan into its output under ``_plans/``; return the shard references and the plan index.

    Every file is named by its SHA-256 (``_plans/<sha256>.json``) and written
    whole (``Store.writer``: a linked nameless file, or one PUT each), shard
    files first and the index last, so a worker on any host that reaches the
    output reads the plan. What travels through XCom is small and does not
    grow with the files: one reference per shard (``dataset``, ``shard_id``,
    ``label``) and, once per run, each dataset's ``output`` and the digest
    of its index.
    """
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for shard in shards:
        by_dataset.setdefault(shard["dataset"], []).append(shard)
    plans: dict[str, dict[str, str]] = {}
    for name, group in by_dataset.items():
        index, own = plan_files(group)
        digest = plan_digest(index)
        store = open_store(group[0]["output"], settings, access=access)
        try:
            with store.writer() as writer:
                for data in own.values():
                    writer.put(plan_file(plan_digest(data)), data)
                writer.flush()
            store.write(plan_file(digest), index)
        except (OSError, StoreError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            msg = f"datasets.{name}.output: cannot write the shard plan under {store.name(PLANS_DIR)} ({reason})"
            raise OutputConflict(msg) from None
        size = len(index) + sum(len(data) for data in own.values())
        log.info("dataset %s: plan of %d shard(s) written to %s (%d bytes)", name, len(group), store.name(plan_file(digest)), size)
        plans[name] = {"output": str(group[0]["output"]), "digest": digest}
    refs = [{"dataset": s["dataset"], "shard_id": s["shard_id"], "label": s["label"]} for s in shards]
    return refs, plans


def plan_file(digest: str) -> str:
    """Return where, in a dataset's output, the plan file with ``digest`` lies."""
    return f"{PLANS_DIR}/{digest}.json"


def _read_checked(store: Store, digest: str, what: str) -> Any:
    """Return the JSON of ``_plans/<digest>.json`` after checking its SHA-256; raise PlanMismatch naming the file."""
    if not _DIGEST.fullmatch(digest):
        msg = f"{store.uri}: {digest!r} is not a plan digest (64 hex digits)"
        raise PlanMismatch(msg)
    rel = plan_file(digest)
    try:
        data = store.read(rel)
    except StoreError as exc:
        msg = f"{store.name(rel)}: {what} unreadable ({exc}); re-run plan_shards"
        raise PlanMismatch(msg) from None
    found = plan_digest(data)
    if found != digest:
        msg = f"{store.name(rel)}: {what} has SHA-256 {found}, not {digest}; the file was changed, re-run plan_shards"
        raise PlanMismatch(msg)
    return json.loads(data)


def read_plan(store: Store, digest: str) -> dict[str, Any]:
    """Return the checked index of the plan ``digest`` in ``store``.

    Raises:
        PlanMismatch: the file is missing or unreadable, its SHA-256 is not
            ``digest`` (the message names the file and both digests), or it
            is of another format.
    """
    payload = _read_checked(store, digest, "shard plan")
    if not isinstance(payload, dict) or payload.get("format") != PLAN_FORMAT:
        got = payload.get("format") if isinstance(payload, dict) else None
        msg = f"{store.name(plan_file(digest))}: shard plan format {got!r}, this version reads {PLAN_FORMAT}; re-run plan_shards"
        raise PlanMismatch(msg)
    return payload


def load_shards(
    refs: Iterable[dict[str, Any]],
    plans: dict[str, dict[str, str]],
    *,
    settings: Settings | None = None,
    access: S3Access | None = None,
) -> list[dict[str, Any]]:
    """Return the full shard of each reference ``publish_plan`` made: its dataset's index (read once), then its own file.

    Raises:
        PlanMismatch: a plan file is missing or changed, or the plan holds
            no shard of that id and label.
    """
    indexes: dict[str, tuple[Store, dict[str, Any], dict[str, dict[str, Any]]]] = {}
    shards: list[dict[str, Any]] = []
    for ref in refs:
        name = str(ref["dataset"])
        where = plans.get(name)
        if where is None:
            msg = f"shard {ref['shard_id']}: the run's plan index names no plan for dataset {name!r}"
            raise PlanMismatch(msg)
        if name not in indexes:
            store = open_store(where["output"], settings, access=access)
            index = read_plan(store, where["digest"])
            indexes[name] = (store, index, {entry["shard_id"]: entry for entry in index["shards"]})
        store, index, entries = indexes[name]
        entry = entries.get(ref["shard_id"])
        if entry is None or entry["label"] != ref["label"] or index["dataset"] != name:
            msg = f"{store.name(plan_file(where['digest']))}: holds no shard {ref['shard_id']} ({ref['label']})"
            raise PlanMismatch(msg)
        own = _read_checked(store, entry["sha256"], f"plan of shard {ref['shard_id']}")
        shards.append({**own, **{key: index[key] for key in _PLAN_COMMON}})
    return shards


def load_shard(
    ref: dict[str, Any],
    plans: dict[str, dict[str, str]],
    *,
    settings: Settings | None = None,
    access: S3Access | None = None,
) -> dict[str, Any]:
    """Return the full shard a reference names (``load_shards``)."""
    return load_shards([ref], plans, settings=settings, access=access)[0]


def load_results(
    shards: list[dict[str, Any]], done: Iterable[str], *, settings: Settings | None = None, access: S3Access | None = None
) -> list[dict[str, Any]]:
    """Return the result of each shard in ``done`` (shard ids), read from ``<output>/_shards/<id>.json``.

    ``runner.run_shard`` writes that file last, after every feature it
    names, so an ``extract_shard`` that succeeded passes only its shard id
    through XCom and its result is read back here.

    Raises:
        PlanMismatch: a finished shard's result file is missing or unreadable.
    """
    from cnn_features.names import SHARDS_DIR as SHARD_RESULTS_DIR

    wanted = set(done)
    results: list[dict[str, Any]] = []
    stores: dict[str, Store] = {}
    for shard in shards:
        if shard["shard_id"] not in wanted:
            continue
        output = shard["output"]
        store = stores.get(output) or stores.setdefault(output, open_store(output, settings, access=access))
        rel = f"{SHARD_RESULTS_DIR}/{shard['shard_id']}.json"
        try:
            result = json.loads(store.read(rel))
        except (StoreError, ValueError) as exc:
            msg = f"{store.name(rel)}: result of finished shard {shard['shard_id']} unreadable ({exc}); clear that shard"
            raise PlanMismatch(msg) from None
        results.append(result)
    return results
