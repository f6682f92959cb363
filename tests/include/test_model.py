"""The reference CNN and user models (Keras, in this test process, CPU only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cnn_features.errors import ModelError  # noqa: E402
from cnn_features.model import (  # noqa: E402
    build_reference_model,
    ensure_reference_model,
    load_feature_model,
    model_digest,
    predict,
)
from cnn_features.procs import child_env  # noqa: E402
from tests.conftest import tiny_spectrogram  # noqa: E402


@pytest.fixture(scope="module")
def loaded(reference_model: dict[str, Any]) -> tuple[keras.Model, Any]:
    return load_feature_model(Path(reference_model["path"]))


def test_reference_architecture() -> None:
    """4 conv blocks of 32/64/128/256 filters with BN, ReLU and pooling, then GAP to 256-d."""
    model = build_reference_model()
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.filters for c in convs] == [32, 64, 128, 256]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers) == 4
    assert sum(isinstance(layer, keras.layers.MaxPooling2D) for layer in model.layers) == 4
    assert model.output_shape == (None, 256)


def test_reference_weights_are_seeded() -> None:
    """Two builds give identical weights, so any process computes identical features."""
    a, b = build_reference_model(), build_reference_model()
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)


def test_the_reference_model_is_the_same_wherever_it_is_built(tmp_path: Path) -> None:
    """Its digest (architecture and weights) is the same built here, saved twice, loaded, and built under JAX;
    the two files' SHA-256s differ (a .keras file records its save date), the digests do not."""
    import time

    from cnn_features.storage import file_sha256

    built = model_digest(build_reference_model())
    first = ensure_reference_model(tmp_path / "a.keras")
    time.sleep(1.1)
    second = ensure_reference_model(tmp_path / "b.keras")
    assert file_sha256(first) != file_sha256(second)
    assert load_feature_model(first)[1].digest == load_feature_model(second)[1].digest == built
    pytest.importorskip("jax", reason="the JAX backend (CPU build, requirements.txt) is not installed")
    code = "from cnn_features.model import build_reference_model, model_digest; print(model_digest(build_reference_model()))"
    env = {**child_env("cpu"), "CNN_FEATURES_KERAS_BACKEND": "jax"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=300)
    assert proc.stdout.split()[-1] == built


def test_a_changed_weight_changes_the_digest() -> None:
    """One weight nudged, or the model frozen for inference: the first changes the digest, the second does not."""
    model = build_reference_model()
    before = model_digest(model)
    model.trainable = False
    assert model_digest(model) == before
    kernel = model.get_layer("conv2").kernel
    kernel.assign(keras.ops.convert_to_numpy(kernel) + np.float32(1e-7))
    assert model_digest(model) != before


def test_saved_model_reproduces_built_model(tmp_path: Path) -> None:
    """The .keras file gives the same features as the in-memory model."""
    path = ensure_reference_model(tmp_path / "ref.keras")
    model, info = load_feature_model(path)
    x = np.stack([tiny_spectrogram(1, 32)])
    expected = keras.ops.convert_to_numpy(build_reference_model()(x[..., None], training=False))
    np.testing.assert_allclose(predict(model, x, info), expected, rtol=0, atol=1e-6)


def test_batched_equals_one_at_a_time(loaded: tuple[keras.Model, Any]) -> None:
    """A batch of equal-shape inputs gives each file's features within 1e-5 of running it alone."""
    model, info = loaded
    batch = np.stack([tiny_spectrogram(seed, 37) for seed in range(8)])
    together = predict(model, batch, info)
    alone = np.concatenate([predict(model, batch[i : i + 1], info) for i in range(len(batch))])
    assert together.shape == (8, 256) and together.dtype == np.float32
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)


def test_variable_lengths_run_on_the_whole_spectrogram(loaded: tuple[keras.Model, Any]) -> None:
    """Different frame counts are accepted; the features depend on every frame."""
    model, info = loaded
    x = tiny_spectrogram(3, 64)
    full = predict(model, x[None], info)
    cut = predict(model, x[None, :, :48], info)
    assert np.isfinite(full).all() and not np.allclose(full, cut)


def test_user_model_without_channel_axis_and_fixed_frames(tmp_path: Path) -> None:
    """A (mels, frames) model with a fixed frame count is described as such."""
    inputs = keras.Input(shape=(128, 100))
    outputs = keras.layers.Dense(16)(keras.layers.GlobalAveragePooling1D()(inputs))
    path = tmp_path / "user.keras"
    keras.Model(inputs, outputs).save(path)
    model, info = load_feature_model(path)
    assert (info.channel_axis, info.frames, info.min_frames, info.feature_dim) == (False, 100, 100, 16)
    assert predict(model, np.zeros((2, 128, 100), np.float32), info).shape == (2, 16)


@pytest.mark.parametrize(
    ("shape", "words"),
    [((128, None, 3), "3 channels"), ((None, None, 1), "mel axis open"), ((128,), "expected (batch, mels")],
)
def test_user_model_with_wrong_input_shape_is_refused(tmp_path: Path, shape: tuple, words: str) -> None:
    """Models that cannot take a one-channel spectrogram are refused with the reason."""
    inputs = keras.Input(shape=shape)
    x = inputs
    if len(shape) == 3:
        x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4)(x))
    path = tmp_path / "wrong.keras"
    model.save(path)
    with pytest.raises(ModelError, match=words.replace("(", r"\(")):
        load_feature_model(path)


def test_unsafe_lambda_model_is_refused_in_safe_mode(tmp_path: Path) -> None:
    """A model carrying Python code (a Lambda layer) is not deserialised."""
    inputs = keras.Input(shape=(128, None, 1))
    x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    path = tmp_path / "lambda.keras"
    model.save(path)
    with pytest.raises(ModelError, match="safe mode"):
        load_feature_model(path)


def test_non_keras_file_is_refused(tmp_path: Path) -> None:
    """Only .keras files are accepted."""
    (tmp_path / "m.h5").write_bytes(b"x")
    with pytest.raises(ModelError, match="expected a .keras file"):
        load_feature_model(tmp_path / "m.h5")


def test_model_module_skips_matplotlib_but_leaves_it_importable() -> None:
    """Importing the model code does not pay for matplotlib, and matplotlib still imports afterwards."""
    script = (
        "import sys\n"
        "import cnn_features.model\n"
        "print('matplotlib' in sys.modules)\n"
        "import matplotlib.pyplot\n"
        "print('matplotlib.pyplot' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], env=child_env("cpu"), capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
