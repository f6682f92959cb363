"""The feature CNN: the built-in reference extractor and loading of user models.

Imports Keras at module level, so only fresh child processes (shard workers,
the model check) import this module; the Airflow side never does.
Keras 3 APIs only, so the same code runs on the JAX or PyTorch backends.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np

from cnn_features.errors import ModelError
from cnn_features.procs import RESULT_PREFIX, die_with_parent, emit
from cnn_features.storage import TMP_MARKER

# Mel bins of the reference extractor's input (the demo corpus and the usual
# log-mel front end for speech emotion).
REFERENCE_N_MELS = 128
# Filters of the four conv blocks; the last one is the feature dimension.
REFERENCE_FILTERS = (32, 64, 128, 256)
# Seed of the reference weights: every process that builds the model from
# scratch gets the same weights, and the saved file pins them for good.
REFERENCE_SEED = 1234
# Four 2x2 max-pools halve each axis four times, so an input needs at least
# 2**4 frames (and mel bins) for the last pool to have an output.
REFERENCE_MIN_FRAMES = 2 ** len(REFERENCE_FILTERS)
# Frame counts tried, smallest first, to learn what a user model accepts.
_MIN_FRAME_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class ModelInfo:
    """What the pipeline needs to know about a feature model."""

    path: str
    sha256: str
    n_mels: int
    frames: int | None
    channel_axis: bool
    feature_dim: int
    min_frames: int


def file_sha256(path: Path) -> str:
    """Return the hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_reference_model(*, n_mels: int = REFERENCE_N_MELS, seed: int = REFERENCE_SEED) -> keras.Model:
    """Build the reference extractor: 4 x (Conv3x3 + BN + ReLU + MaxPool2x2), then GAP."""
    inputs = keras.Input(shape=(n_mels, None, 1), name="spectrogram")
    x = inputs
    for block, filters in enumerate(REFERENCE_FILTERS, start=1):
        x = keras.layers.Conv2D(
            filters,
            3,
            padding="same",
            use_bias=False,
            kernel_initializer=keras.initializers.HeNormal(seed=seed + block),
            name=f"conv{block}",
        )(x)
        x = keras.layers.BatchNormalization(name=f"bn{block}")(x)
        x = keras.layers.ReLU(name=f"relu{block}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{block}")(x)
    outputs = keras.layers.GlobalAveragePooling2D(name="features")(x)
    return keras.Model(inputs, outputs, name="reference_cnn_v1")


def ensure_reference_model(path: Path) -> Path:
    """Create the reference model file at ``path`` unless it exists; return ``path``.

    Saved through a temporary name and a rename, so concurrent callers never
    see half a file; the first rename wins and later ones replace it with
    identical weights.
    """
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}{TMP_MARKER}{os.getpid()}.keras")
    try:
        build_reference_model().save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_feature_model(path: Path) -> tuple[keras.Model, ModelInfo]:
    """Load a ``.keras`` model in safe mode and check it maps a spectrogram to a vector.

    Raises:
        ModelError: the file is missing, not a loadable Keras model (or needs
            unsafe deserialisation), or its input/output shapes do not fit.
    """
    if not path.is_file():
        msg = f"model {path}: file not found"
        raise ModelError(msg)
    if path.suffix != ".keras":
        msg = f"model {path}: expected a .keras file"
        raise ModelError(msg)
    try:
        model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for a bad file
        msg = f"model {path}: cannot be loaded in safe mode ({type(exc).__name__}: {exc})"
        raise ModelError(msg) from None
    model.trainable = False
    return model, _describe(model, path)


def _describe(model: keras.Model, path: Path) -> ModelInfo:
    shape = model.input_shape
    if isinstance(shape, list):
        msg = f"model {path}: takes {len(shape)} inputs, expected one spectrogram input"
        raise ModelError(msg)
    if len(shape) == 4:
        if shape[3] != 1:
            msg = f"model {path}: input shape {shape} has {shape[3]} channels, expected 1"
            raise ModelError(msg)
        channel_axis = True
    elif len(shape) == 3:
        channel_axis = False
    else:
        msg = f"model {path}: input shape {shape}, expected (batch, mels, frames[, 1])"
        raise ModelError(msg)
    n_mels, frames = shape[1], shape[2]
    if n_mels is None:
        msg = f"model {path}: input shape {shape} leaves the mel axis open; it must be fixed"
        raise ModelError(msg)
    out = model.output_shape
    if isinstance(out, list) or len(out) != 2 or out[1] is None:
        msg = f"model {path}: output shape {out}, expected (batch, features)"
        raise ModelError(msg)
    info = ModelInfo(
        path=str(path),
        sha256=file_sha256(path),
        n_mels=int(n_mels),
        frames=None if frames is None else int(frames),
        channel_axis=channel_axis,
        feature_dim=int(out[1]),
        min_frames=0,
    )
    min_frames = frames if frames is not None else _smallest_frames(model, info)
    return ModelInfo(**{**asdict(info), "min_frames": int(min_frames)})


def _smallest_frames(model: keras.Model, info: ModelInfo) -> int:
    for frames in _MIN_FRAME_CANDIDATES:
        probe = np.zeros((1, info.n_mels, frames), dtype=np.float32)
        try:
            out = predict(model, probe, info)
        except Exception:  # noqa: BLE001, S112 - any failure means "too short"
            continue
        if out.shape == (1, info.feature_dim) and np.isfinite(out).all():
            return frames
    msg = f"model {info.path}: no input of up to {_MIN_FRAME_CANDIDATES[-1]} frames gives a finite feature vector"
    raise ModelError(msg)


def predict(model: keras.Model, batch: np.ndarray, info: ModelInfo) -> np.ndarray:
    """Run the model in inference mode on a (batch, mels, frames) float32 array."""
    x = batch[..., None] if info.channel_axis else batch
    out = model(x, training=False)
    return np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    """Check a model (creating the reference model if asked) and print its info as JSON."""
    parser = argparse.ArgumentParser(prog="python -m cnn_features.model")
    parser.add_argument("path", type=Path, help="the .keras file")
    parser.add_argument(
        "--create-reference",
        action="store_true",
        help="build the seeded reference extractor at PATH if it does not exist",
    )
    args = parser.parse_args(argv)
    die_with_parent()
    try:
        if args.create_reference:
            ensure_reference_model(args.path)
        _, info = load_feature_model(args.path)
    except ModelError as exc:
        emit(RESULT_PREFIX, {"ok": False, "error": str(exc)})
        return 2
    emit(RESULT_PREFIX, {"ok": True, **asdict(info)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
