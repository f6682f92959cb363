"""The feature CNN: the built-in reference extractor and loading of user models.

Imports Keras at module level, so only fresh child processes (shard workers,
the model check) import this module; the Airflow side never does.
Keras 3 APIs only, so the same code runs on the TensorFlow, JAX or PyTorch
backend, the one the settings name (``backends.prepare_process`` runs before
Keras is imported). Per backend: TensorFlow gets its thread pools and one
traced predict function; JAX one compiled function per input shape (exact
lengths, never padded frames); PyTorch runs the model under inference mode.
BatchNormalization folding is plain Keras and applies to all three.

The fast inference path (``inference_model`` + ``make_predictor``) is what the
shard worker runs; ``predict`` is the plain reference it is checked against.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cnn_features.backends import prepare_process


@contextlib.contextmanager
def _hidden(module: str) -> Iterator[None]:
    """Make ``import module`` fail inside the block, unless it is already imported; restore it after."""
    if module in sys.modules:
        yield
        return
    sys.modules[module] = None  # type: ignore[assignment]  # import system: "not importable"
    try:
        yield
    finally:
        if sys.modules.get(module) is None:
            del sys.modules[module]


# Before Keras is imported: KERAS_BACKEND and the framework's own variables.
prepare_process()

# Keras imports matplotlib.pyplot at start-up for plotting helpers this
# package never calls (they raise ImportError without it): about 0.6 s of
# every worker start. Later imports of matplotlib work as usual.
with _hidden("matplotlib"):
    import keras

from cnn_features.errors import ModelError, ModelMismatch
from cnn_features.memory import activation_bytes_per_frame
from cnn_features.procs import RESULT_PREFIX, die_with_parent, emit
from cnn_features.storage import file_sha256, save_with

# Mel bins of the reference extractor's input (the demo corpus and the usual
# log-mel front end for speech emotion).
REFERENCE_N_MELS = 128
# Filters of the four conv blocks; the last one is the feature dimension.
REFERENCE_FILTERS = (32, 64, 128, 256)
# Seed of the reference weights. They are drawn with NumPy's generator, not
# the backend's, so every process that builds the model from scratch, on any
# Keras backend and machine, gets the same weights and so the same digest.
REFERENCE_SEED = 1234
# Four 2x2 max-pools halve each axis four times, so an input needs at least
# 2**4 frames (and mel bins) for the last pool to have an output.
REFERENCE_MIN_FRAMES = 2 ** len(REFERENCE_FILTERS)
# Frame counts tried, smallest first, to learn what a user model accepts.
_MIN_FRAME_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Frames of the probe input on which a folded model must match the original:
# a few milliseconds of compute, and long enough for the reference CNN's pools.
_FOLD_CHECK_FRAMES = 64
# Largest difference allowed between folded and original features, relative to
# the largest feature: folding only reorders float32 rounding (about 1e-7
# relative); a wrong fold is off by orders of magnitude more.
_FOLD_RTOL = 1e-5
# Layers whose kernel ends in the output-channel axis and that a following
# BatchNormalization can be folded into (channels_last only).
_FOLDABLE = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D, keras.layers.Dense)

log = logging.getLogger(__name__)

Predictor = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ModelInfo:
    """What the pipeline needs to know about a feature model.

    ``digest`` is the model's identity (``model_digest``: its architecture and
    weights), what lineage, reuse and output folders are keyed on;
    ``sha256`` is the file's, which also changes when identical weights are
    saved again (a ``.keras`` file records its save date).
    """

    path: str
    sha256: str
    n_mels: int
    frames: int | None
    channel_axis: bool
    feature_dim: int
    min_frames: int
    # Peak bytes of activations per input frame (``memory.activation_bytes_per_frame``);
    # 0 in the info of an older plan: workers then assume the fallback figure.
    activation_bytes_per_frame: int = 0
    digest: str = ""


def model_digest(model: keras.Model) -> str:
    """Return the hex SHA-256 of a model's architecture (its config, canonical JSON) and every weight.

    Two saves of the same model hash alike; any change to a layer, a shape
    or one weight changes it.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(_without_trainable(model.get_config()), sort_keys=True, default=str).encode("utf-8"))
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"\n{weight.path}:{value.dtype.str}:{value.shape}\n".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _without_trainable(config: object) -> object:
    """Return a config without its ``trainable`` flags: freezing a model for inference does not change it."""
    if isinstance(config, dict):
        return {k: _without_trainable(v) for k, v in config.items() if k != "trainable"}
    if isinstance(config, list):
        return [_without_trainable(v) for v in config]
    return config


def _reference_kernel(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Return He-normal weights for a conv kernel of ``shape``, drawn by NumPy (truncated at two deviations)."""
    fan_in = int(np.prod(shape[:-1]))
    std = np.sqrt(2.0 / fan_in) / 0.87962566103423978  # the truncated normal's own deviation, as Keras's HeNormal
    values = np.random.default_rng(seed).standard_normal(int(np.prod(shape)))
    while (outside := np.abs(values) > 2.0).any():
        values[outside] = np.random.default_rng([seed, int(outside.sum())]).standard_normal(int(outside.sum()))
    return (values * std).reshape(shape).astype(np.float32)


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
            kernel_initializer="zeros",  # replaced below by NumPy-drawn weights
            name=f"conv{block}",
        )(x)
        x = keras.layers.BatchNormalization(name=f"bn{block}")(x)
        x = keras.layers.ReLU(name=f"relu{block}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{block}")(x)
    outputs = keras.layers.GlobalAveragePooling2D(name="features")(x)
    model = keras.Model(inputs, outputs, name="reference_cnn_v2")
    for block in range(1, len(REFERENCE_FILTERS) + 1):
        conv = model.get_layer(f"conv{block}")
        conv.kernel.assign(_reference_kernel(tuple(conv.kernel.shape), seed + block))
    return model


def ensure_reference_model(path: Path) -> Path:
    """Create the reference model file at ``path`` unless it exists; return ``path``.

    Saved through a temporary name and a rename, so concurrent callers never
    see half a file; the first rename wins and later ones replace it with
    identical weights.
    """
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    save_with(path, build_reference_model().save)
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


def check_digest(info: dict[str, object], model: keras.Model) -> None:
    """Refuse a loaded model that is not the one the plan checked (``info``).

    Raises:
        ModelMismatch: its architecture or weights differ from the plan's, so
            its features would be in another space than the folder's.
    """
    got = model_digest(model)
    if got != info.get("digest"):
        msg = (
            f"model {info.get('path')}: its digest (architecture and weights) is {got}, but the plan checked "
            f"{info.get('digest')}; the file was replaced after planning and its features would mix with another "
            "model's: re-run the whole DAG to plan with this model"
        )
        raise ModelMismatch(msg)


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
    per_frame = activation_bytes_per_frame(model, n_mels=info.n_mels, frames=info.frames, channel_axis=channel_axis)
    return ModelInfo(
        **{**asdict(info), "min_frames": int(min_frames), "activation_bytes_per_frame": per_frame, "digest": model_digest(model)}
    )


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


def configure_cpu_threads(*, streams: int) -> bool:
    """Give TensorFlow one thread per op and ``streams`` ops at once; return whether it applied.

    The shard worker runs ``streams`` forward passes side by side, one per
    core, each single-threaded: on the 2-core reference machine that keeps the
    convolutions at about 95 % of numpy's matrix-product rate, against about
    85 % for one pass spread over both cores (``docs/benchmarks.md``). Must run
    before TensorFlow starts its runtime (before any model is loaded);
    a no-op on other backends.
    """
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(streams)
    except RuntimeError as exc:  # the runtime already started: keep its pools
        log.warning("TensorFlow thread pools already set up, left as they are: %s", exc)
        return False
    return True


def _fold_pairs(model: keras.Model) -> dict[keras.layers.Layer, keras.layers.Layer]:
    """Return {batch norm: layer before it} for each BN that can be folded into its producer.

    Only a BN that normalises the last axis, called once, right after a
    linear Conv/Dense layer (channels_last, called once, feeding nothing else).
    """
    pairs: dict[keras.layers.Layer, keras.layers.Layer] = {}
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization) or len(layer._inbound_nodes) != 1:
            continue
        parents = layer._inbound_nodes[0].parent_nodes
        if len(parents) != 1:
            continue
        producer = parents[0].operation
        ndim = len(layer.input.shape)
        if (
            isinstance(producer, _FOLDABLE)
            and layer.axis in (-1, ndim - 1)
            and getattr(producer, "data_format", "channels_last") == "channels_last"
            and producer.activation in (None, keras.activations.linear)
            and len(producer._inbound_nodes) == 1
            and len(producer._outbound_nodes) == 1
        ):
            pairs[layer] = producer
    return pairs


class _FoldedAway(keras.layers.Layer):
    """Stands where a BatchNormalization was, after it was folded into the layer before it."""

    def call(self, inputs: object, mask: object = None, training: object = None) -> object:
        return inputs


def _folded_weights(producer: keras.layers.Layer, bn: keras.layers.Layer) -> list[np.ndarray]:
    """Return kernel and bias of ``producer`` with ``bn``'s inference transform folded in (float64 maths)."""
    kernel = keras.ops.convert_to_numpy(producer.kernel).astype(np.float64)
    channels = kernel.shape[-1]
    bias = (
        keras.ops.convert_to_numpy(producer.bias).astype(np.float64)
        if producer.use_bias
        else np.zeros(channels)
    )
    gamma = keras.ops.convert_to_numpy(bn.gamma).astype(np.float64) if bn.scale else np.ones(channels)
    beta = keras.ops.convert_to_numpy(bn.beta).astype(np.float64) if bn.center else np.zeros(channels)
    mean = keras.ops.convert_to_numpy(bn.moving_mean).astype(np.float64)
    variance = keras.ops.convert_to_numpy(bn.moving_variance).astype(np.float64)
    scale = gamma / np.sqrt(variance + bn.epsilon)
    return [(kernel * scale).astype(np.float32), ((bias - mean) * scale + beta).astype(np.float32)]


def _fold(model: keras.Model, pairs: dict[keras.layers.Layer, keras.layers.Layer]) -> keras.Model:
    producers = {producer: bn for bn, producer in pairs.items()}

    def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
        if layer in pairs:
            return _FoldedAway(name=layer.name)
        if layer in producers:
            return layer.__class__.from_config({**layer.get_config(), "use_bias": True})
        return layer  # shared, weights and all: the copy is only ever run forward

    folded = keras.models.clone_model(model, clone_function=clone)
    for producer, bn in producers.items():
        folded.get_layer(producer.name).set_weights(_folded_weights(producer, bn))
    folded.trainable = False
    return folded


def inference_model(model: keras.Model, info: ModelInfo) -> keras.Model:
    """Return ``model`` with every foldable BatchNormalization folded into the layer before it.

    In inference a BatchNormalization is a per-channel scale and shift, so it
    can live in the preceding convolution's kernel and bias: one pass over
    each activation map less, and TensorFlow fuses the bias and ReLU into the
    convolution. The reference CNN runs about 25 % faster. The copy is checked
    on a probe input against the original (``_FOLD_RTOL``); any model that
    cannot be folded, or whose copy disagrees, is returned unchanged.
    """
    pairs = _fold_pairs(model)
    if not pairs:
        return model
    try:
        folded = _fold(model, pairs)
    except (ValueError, TypeError, KeyError) as exc:  # a graph clone_model cannot copy
        log.warning("model %s: BatchNormalization not folded (%s: %s)", info.path, type(exc).__name__, exc)
        return model
    frames = info.frames or max(info.min_frames, _FOLD_CHECK_FRAMES)
    probe = np.random.default_rng(0).standard_normal((2, info.n_mels, frames)).astype(np.float32)
    expected, got = predict(model, probe, info), predict(folded, probe, info)
    error = float(np.max(np.abs(expected - got)))
    if not error <= _FOLD_RTOL * max(1.0, float(np.max(np.abs(expected)))):
        log.warning("model %s: folded copy differs by %.3g on a probe input; using the model as it is", info.path, error)
        return model
    log.info("model %s: %d BatchNormalization layer(s) folded for inference", info.path, len(pairs))
    return folded


class JaxPredictor:
    """A model compiled by JAX once per input shape; counts its compiles.

    JAX compiles per distinct shape. Frames are never padded: zeros beyond a
    clip's end would change every globally pooled feature. So each clip
    length is its own bucket, compiled on first use and cached for the
    process (and on disk, ``cache_dir``, for the next ones). Only the batch
    axis is padded, with zero clips that are cut off again: in inference each
    clip's features depend on that clip alone, and a shard's last, shorter
    pass of each length reuses that length's compiled function. One pass runs
    at a time: XLA spreads one pass over every core already (on 2 cores, two
    passes side by side ran at 103 files/s, one at a time at 161).
    """

    def __init__(self, model: keras.Model, info: ModelInfo, *, cache_dir: Path | None = None) -> None:
        import jax

        if cache_dir is not None:
            _enable_jax_cache(cache_dir)

        def forward(trainable: list, non_trainable: list, x: object) -> object:
            out, _ = model.stateless_call(trainable, non_trainable, x, training=False)
            return out

        self._forward = jax.jit(forward)
        self._variables = (
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
        )
        self._info = info
        self._lock = threading.Lock()
        self._widest: dict[tuple[int, ...], int] = {}
        self._shapes: set[tuple[int, ...]] = set()
        self.compiles = 0
        self.compile_s = 0.0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        n, clip = batch.shape[0], batch.shape[1:]
        with self._lock:
            size = max(n, self._widest.get(clip, 0))
            self._widest[clip] = size
            x = batch if size == n else np.concatenate([batch, np.zeros((size - n, *clip), dtype=batch.dtype)])
            if self._info.channel_axis:
                x = x[..., None]
            first = x.shape not in self._shapes
            started = time.monotonic()
            out = np.asarray(self._forward(*self._variables, x))
            if first:
                self._shapes.add(x.shape)
                self.compiles += 1
                self.compile_s += time.monotonic() - started
        return np.asarray(out[:n], dtype=np.float32)

    def stats(self) -> dict[str, float | int]:
        """Return the compiles so far and their seconds (first call of each shape, run included)."""
        return {"compiles": self.compiles, "compile_s": round(self.compile_s, 3)}


def _enable_jax_cache(folder: Path) -> None:
    """Keep JAX's compiled functions in ``folder`` so later processes skip the compile."""
    import jax

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("JAX compile cache %s not usable (%s); compiling in memory only", folder, exc)
        return
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # Cache every compile: one clip length costs ~0.3 s on CPU, more on a GPU.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def make_predictor(model: keras.Model, info: ModelInfo, *, cache_dir: Path | None = None) -> Predictor:
    """Return a thread-safe function mapping a (batch, mels, frames) float32 array to features.

    On TensorFlow the forward pass is traced once into a graph whose batch and
    frame axes stay open, so every clip length reuses one trace (no per-shape
    retracing) and runs without Python between the layers; the trace is made
    here, before any thread calls it. On JAX a ``JaxPredictor`` (one compile
    per clip length, cached in ``cache_dir``); on PyTorch the model runs
    eagerly under ``torch.inference_mode``.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        return JaxPredictor(model, info, cache_dir=cache_dir)
    if backend == "torch":
        import torch

        def run_torch(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return predict(model, batch, info)

        return run_torch
    if backend != "tensorflow":
        return lambda batch: predict(model, batch, info)
    import tensorflow as tf

    shape = (None, info.n_mels, info.frames, 1) if info.channel_axis else (None, info.n_mels, info.frames)
    forward = tf.function(
        lambda x: model(x, training=False),
        input_signature=[tf.TensorSpec(shape, tf.float32)],
        autograph=False,
    )

    def run(batch: np.ndarray) -> np.ndarray:
        x = batch[..., None] if info.channel_axis else batch
        return np.asarray(forward(x).numpy(), dtype=np.float32)

    run(np.zeros((1, info.n_mels, info.frames or max(info.min_frames, 1)), dtype=np.float32))
    return run


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
