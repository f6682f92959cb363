"""Train an emotion classifier on extracted features, speaker-independently.

``run_training`` (parent side) starts ``python -m cnn_features.training`` in a
fresh CPU-only process; the child loads the manifest and features, holds out
whole actors for the test set, trains a small Keras MLP and writes the model
and a metrics JSON beside the features.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnn_features.config import Settings, load_settings
from cnn_features.datasets import get_dataset
from cnn_features.errors import CnnFeaturesError, InvalidConf, StoreError, StoreMissing
from cnn_features.plan import allowed_roots, checked_location
from cnn_features.procs import RESULT_PREFIX, child_env, die_with_parent, emit, parse_line, python_module_cmd
from cnn_features.s3 import S3Access, S3Location
from cnn_features.storage import save_with
from cnn_features.stores import LocalStore, Store, open_store, read_features

log = logging.getLogger(__name__)

TRAINING_DIR = "training"
MODEL_NAME = "emotion_classifier.keras"
METRICS_NAME = "metrics.json"
# Every fifth actor (in sorted order) is held out: a 20 % speaker-independent test set.
TEST_EVERY = 5
DEFAULT_EPOCHS = 150
SEED = 7
# Largest manifest read when a training conf is checked: ~150 bytes an item,
# so 64 MiB lists over 400,000 features.
MAX_MANIFEST_BYTES = 64 << 20
# Lines of a failed child's error output quoted in the error: its last words, not its whole log.
_TAIL_LINES = 5


class TrainingFailed(CnnFeaturesError):
    """The classifier could not be trained on these features."""


def split_actors(actors: list[str]) -> tuple[list[str], list[str]]:
    """Split sorted actors into (train, test); every fifth actor is a test actor."""
    ordered = sorted(set(actors))
    if len(ordered) < 2:
        msg = f"need at least 2 actors for a speaker-independent split, got {len(ordered)}"
        raise TrainingFailed(msg)
    test = [a for i, a in enumerate(ordered) if i % TEST_EVERY == TEST_EVERY - 1] or [ordered[-1]]
    return [a for a in ordered if a not in test], test


def manifest_store(manifest: str, settings: Settings, *, access: S3Access | None = None) -> tuple[Store, str]:
    """Return the store of the folder or prefix holding ``manifest`` and the manifest's name in it."""
    if manifest.startswith("s3://"):
        folder, _, name = manifest.rpartition("/")
        return open_store(folder, settings, access=access), name
    path = Path(manifest)
    return LocalStore(path.parent), path.name


@dataclass(frozen=True)
class Loaded:
    """A verified manifest's features, and what names them: the manifest's own SHA-256 and the model's."""

    dataset: str
    x: np.ndarray
    emotions: list[str]
    actors: list[str]
    manifest_sha256: str
    model: dict[str, Any]


def load_manifest(store: Store, name: str) -> Loaded:
    """Return a manifest's features (N x D), emotions and actors, every file checked against it.

    Every feature is read without pickle and checked (shape, dtype, finite),
    and its bytes must have the SHA-256 the manifest lists.

    Raises:
        TrainingFailed: the manifest is not a passed one, or a feature is not
            the one verified (the message names it).
    """
    raw = store.read(name)
    manifest = json.loads(raw)
    if (problem := manifest_problem(manifest)) is not None:
        msg = f"{store.name(name)}: {problem}"
        raise TrainingFailed(msg)
    items = manifest["items"]
    if not items:
        msg = f"{store.name(name)}: no features listed"
        raise TrainingFailed(msg)
    digests = {i["feature"]: i["sha256"] for i in items}
    try:
        vectors = [
            vector
            for _, vector in read_features(store, digests, feature_dim=int(manifest["feature_dim"]), sha256=digests)
        ]
    except ValueError as exc:
        msg = f"{exc}: refusing to train on {store.name(name)}"
        raise TrainingFailed(msg) from None
    return Loaded(
        dataset=manifest["dataset"],
        x=np.stack(vectors),
        emotions=[i["emotion"] for i in items],
        actors=[i["actor"] for i in items],
        manifest_sha256=hashlib.sha256(raw).hexdigest(),
        model={k: manifest.get(k) for k in ("model_digest", "model_sha256", "model_path", "verified_by_run")},
    )


def manifest_problem(manifest: Any) -> str | None:
    """Return why a parsed manifest may not be trained on, or None when verification passed it."""
    if not isinstance(manifest, dict) or not isinstance(manifest.get("items"), list):
        return "not a feature manifest (no 'items' list)"
    if manifest.get("passed") is not True:
        return "not marked as passed by verify_features; run cnn_feature_extraction until verification passes"
    if not all(isinstance(i, dict) and isinstance(i.get("sha256"), str) for i in manifest["items"]):
        return "lists features without their SHA-256 (written before checksums); run cnn_feature_extraction to verify them again"
    return None


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Return the (true x predicted) count matrix."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def train(manifest: str, *, epochs: int = DEFAULT_EPOCHS) -> dict[str, Any]:
    """Train and evaluate; write the model and metrics beside the features (local or S3); return the metrics."""
    import keras

    store, manifest_name = manifest_store(manifest, load_settings())
    loaded = load_manifest(store, manifest_name)
    name, x, emotions, actors = loaded.dataset, loaded.x, loaded.emotions, loaded.actors
    classes = [e for e in get_dataset(name).emotions if e in set(emotions)]
    y = np.array([classes.index(e) for e in emotions])
    train_actors, test_actors = split_actors(actors)
    is_test = np.isin(np.array(actors), test_actors)
    x_train, y_train, x_test, y_test = x[~is_test], y[~is_test], x[is_test], y[is_test]

    keras.utils.set_random_seed(SEED)
    norm = keras.layers.Normalization(mean=x_train.mean(axis=0), variance=x_train.var(axis=0) + 1e-6)
    model = keras.Sequential(
        [
            keras.Input(shape=(x.shape[1],)),
            norm,
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(len(classes), activation="softmax"),
        ],
        name="emotion_classifier",
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0, shuffle=True)
    y_pred = np.argmax(model.predict(x_test, verbose=0), axis=1)

    matrix = confusion(y_test, y_pred, len(classes))
    support = matrix.sum(axis=1)
    recall = {c: (float(matrix[i, i] / support[i]) if support[i] else None) for i, c in enumerate(classes)}
    seen = [r for r in recall.values() if r is not None]
    metrics = {
        "dataset": name,
        "classes": classes,
        "accuracy": float(np.mean(y_pred == y_test)),
        "balanced_accuracy": float(np.mean(seen)),
        "chance_accuracy": 1.0 / len(classes),
        "majority_baseline": float(np.bincount(y_test).max() / len(y_test)),
        "per_class_recall": recall,
        "confusion_matrix": matrix.tolist(),
        "n_train": int(len(y_train)),
        "n_test": int(len(y_test)),
        "train_actors": train_actors,
        "test_actors": test_actors,
        "epochs": epochs,
        "features": store.uri,
        "model": store.name(f"{TRAINING_DIR}/{MODEL_NAME}"),
        "manifest": store.name(manifest_name),
        "manifest_sha256": loaded.manifest_sha256,
        "feature_model": loaded.model,
    }
    _save_model(store, model)
    store.write(f"{TRAINING_DIR}/{METRICS_NAME}", (json.dumps(metrics, indent=2, sort_keys=True) + "\n").encode())
    return metrics


def _save_model(store: Store, model: Any) -> None:
    """Save the classifier as ``training/emotion_classifier.keras``: renamed into place locally, one PUT on S3."""
    if isinstance(store, LocalStore):
        out_dir = store.root / TRAINING_DIR
        out_dir.mkdir(parents=True, exist_ok=True)
        save_with(out_dir / MODEL_NAME, model.save)
        return
    with tempfile.TemporaryDirectory(prefix="cnn-training-") as tmp:
        local = Path(tmp) / MODEL_NAME
        model.save(local)
        store.write(f"{TRAINING_DIR}/{MODEL_NAME}", local.read_bytes())


def training_jobs(
    params: dict[str, Any], settings: Settings, *, access: S3Access | None = None
) -> list[dict[str, str]]:
    """Validate a training conf and return one job per dataset.

    Raises:
        InvalidConf: ``datasets`` is not a {name: {features, manifest}} object,
            a dataset is unknown, or a manifest path is unsafe or missing.
    """
    roots = allowed_roots(settings)
    datasets = params.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        msg = "datasets: expected a non-empty object of {name: {features, manifest}}"
        raise InvalidConf(msg)
    jobs = []
    for name, entry in sorted(datasets.items()):
        try:
            get_dataset(name)
        except CnnFeaturesError as exc:
            raise InvalidConf(f"datasets.{name}: {exc}") from None
        if not isinstance(entry, dict) or "manifest" not in entry:
            msg = f"datasets.{name}: expected an object with a 'manifest' path, got {entry!r}"
            raise InvalidConf(msg)
        field = f"datasets.{name}.manifest"
        location = checked_location(field, entry["manifest"], roots)
        manifest = str(location)
        if isinstance(location, S3Location) and not location.prefix:
            msg = f"{field}: {manifest} names a bucket, not a manifest object"
            raise InvalidConf(msg)
        store, manifest_name = manifest_store(manifest, settings, access=access)
        try:
            parsed = json.loads(store.read(manifest_name, max_bytes=MAX_MANIFEST_BYTES))
        except StoreMissing:
            msg = f"{field}: {manifest} does not exist; run cnn_feature_extraction first"
            raise InvalidConf(msg) from None
        except StoreError as exc:
            raise InvalidConf(f"{field}: {exc}") from None
        except ValueError as exc:
            msg = f"{field}: {manifest} is not JSON ({exc})"
            raise InvalidConf(msg) from None
        if (problem := manifest_problem(parsed)) is not None:
            msg = f"{field}: {manifest} is {problem}"
            raise InvalidConf(msg)
        jobs.append({"dataset": name, "manifest": manifest})
    return jobs


def run_training(
    manifest: str, *, epochs: int = DEFAULT_EPOCHS, timeout_s: float = 3600, access: S3Access | None = None
) -> dict[str, Any]:
    """Train in a fresh CPU-only process; return the metrics.

    S3 settings in ``access`` reach the child through its environment only.
    A child still running after ``timeout_s`` seconds is killed (and reaped).

    Raises:
        TrainingFailed: the child failed or ran past ``timeout_s``; the message carries its error.
    """
    try:
        proc = subprocess.run(
            python_module_cmd("cnn_features.training", str(manifest), "--epochs", str(epochs)),
            env=child_env("cpu", (access or S3Access()).env()),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:  # subprocess.run has killed and reaped the child
        msg = f"training on {manifest} did not finish within {timeout_s:g} s ({epochs} epochs); the child was killed"
        if tail := _tail(exc.stderr):
            msg += f": {tail}"
        raise TrainingFailed(msg) from None
    for line in reversed(proc.stdout.splitlines()):
        payload = parse_line(line, RESULT_PREFIX)
        if payload is not None:
            if "error" in payload:
                raise TrainingFailed(payload["error"])
            log.info(
                "%s: accuracy %.3f (balanced %.3f) on %d clips of held-out actors %s; chance %.3f; metrics %s",
                payload["dataset"],
                payload["accuracy"],
                payload["balanced_accuracy"],
                payload["n_test"],
                ",".join(payload["test_actors"]),
                payload["chance_accuracy"],
                f"{payload['features']}/{TRAINING_DIR}/{METRICS_NAME}",
            )
            return payload
    msg = f"training on {manifest} exited with code {proc.returncode}: {_tail(proc.stderr)}"
    raise TrainingFailed(msg)


def _tail(stderr: str | bytes | None) -> str:
    """Return the last lines of a child's error output, joined on one line (a timeout gives bytes, or None)."""
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr or ""
    return " | ".join(text.strip().splitlines()[-_TAIL_LINES:])


def main(argv: list[str] | None = None) -> int:
    """Child entry point: train on one manifest and print the metrics."""
    parser = argparse.ArgumentParser(prog="python -m cnn_features.training")
    parser.add_argument("manifest", help="manifest.json path or s3:// URI")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    args = parser.parse_args(argv)
    die_with_parent()
    try:
        metrics = train(str(args.manifest), epochs=args.epochs)
    except (CnnFeaturesError, OSError, ValueError, KeyError) as exc:
        emit(RESULT_PREFIX, {"error": f"training on {args.manifest} failed: {type(exc).__name__}: {exc}"})
        return 2
    emit(RESULT_PREFIX, metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
