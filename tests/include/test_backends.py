"""Keras backends: settings, child variables, JAX's per-length compiles, and features that agree across backends."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnn_features.backends import backend_env, visible_gpus
from cnn_features.config import SettingsError, load_settings
from cnn_features.procs import child_env
from tests.conftest import tiny_spectrogram

# Relative agreement every backend must reach on CPU.
BACKEND_RTOL = 1e-5
# Backends compared with TensorFlow: JAX is in requirements.txt; torch only where installed.
BACKENDS = [
    "jax",
    pytest.param(
        "torch",
        marks=pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed (kept out of CI: gigabytes of CUDA wheels)"),
    ),
]

# Runs in a fresh process on the backend the environment names; prints JSON.
_CHILD = r"""
import json, sys
import numpy as np
from pathlib import Path
mode, *args = sys.argv[1:]
if mode == "build-user":
    import keras
    inputs = keras.Input(shape=(128, None, 1))
    x = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Activation("gelu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.5)(x)
    x = keras.layers.Dense(24, activation="gelu", name="d1")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    outputs = keras.layers.Dense(16, name="d2")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(5)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.3, n), rng.normal(0, 0.5, n), rng.uniform(0.5, 2.0, n)])
    model.save(args[0])
    print(json.dumps({"ok": True}))
elif mode == "features":
    from cnn_features.model import inference_model, load_feature_model, make_predictor
    import keras
    model, info = load_feature_model(Path(args[0]))
    batch = np.load(args[1], allow_pickle=False)
    predictor = make_predictor(inference_model(model, info), info)
    np.save(args[2], predictor(batch), allow_pickle=False)
    print(json.dumps({"backend": keras.backend.backend()}))
elif mode == "jax-lengths":
    from cnn_features.backends import set_precision
    from cnn_features.model import JaxPredictor, load_feature_model, predict
    set_precision("jax", "float32")
    model, info = load_feature_model(Path(args[0]))
    p = JaxPredictor(model, info, cache_dir=Path(args[1]))
    rng = np.random.default_rng(0)
    out = {"worst": 0.0}
    for frames, n in [(24, 4), (24, 3), (25, 4), (26, 1), (24, 4)]:
        batch = rng.standard_normal((n, 128, frames)).astype(np.float32)
        got = p(batch)
        want = predict(model, batch, info)
        assert got.shape == want.shape, (got.shape, want.shape)
        out["worst"] = max(out["worst"], float(np.max(np.abs(got - want)) / np.max(np.abs(want))))
    out.update(p.stats())
    import jax
    out["precision"] = str(jax.config.jax_default_matmul_precision)
    print(json.dumps(out))
"""


def run_child(backend: str, *args: str) -> dict[str, Any]:
    """Run the helper in a fresh CPU-only process on ``backend``; return its JSON line."""
    extra = backend_env(backend, "cpu", precision="float32")
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *args], env=child_env("cpu", extra), capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def user_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user model with Conv, BatchNormalization, GELU, Dropout and Dense layers, non-trivial BN statistics."""
    path = tmp_path_factory.mktemp("user") / "user.keras"
    run_child("tensorflow", "build-user", str(path))
    return path


def test_backend_env_for_each_device() -> None:
    """A JAX CPU child is kept off CUDA; GPU children never preallocate; float32 turns TF32 off in cuBLAS/cuDNN."""
    cpu = backend_env("jax", "cpu", precision="float32")
    assert cpu["KERAS_BACKEND"] == "jax" and cpu["JAX_PLATFORMS"] == "cpu" and cpu["NVIDIA_TF32_OVERRIDE"] == "0"
    gpu = backend_env("jax", "gpu", precision="tf32")
    assert "JAX_PLATFORMS" not in gpu and gpu["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert "NVIDIA_TF32_OVERRIDE" not in gpu and gpu["CNN_FEATURES_GPU_PRECISION"] == "tf32"
    assert backend_env("tensorflow", "cpu", precision="float32")["KERAS_BACKEND"] == "tensorflow"


def test_backend_and_precision_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend comes from CNN_FEATURES_KERAS_BACKEND, else KERAS_BACKEND, else TensorFlow; bad values are refused."""
    for name in ("CNN_FEATURES_KERAS_BACKEND", "KERAS_BACKEND", "CNN_FEATURES_GPU_PRECISION"):
        monkeypatch.delenv(name, raising=False)
    assert (load_settings().keras_backend, load_settings().gpu_precision) == ("tensorflow", "float32")
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert load_settings().keras_backend == "jax"
    monkeypatch.setenv("CNN_FEATURES_KERAS_BACKEND", "torch")
    assert load_settings().keras_backend == "torch"
    monkeypatch.setenv("CNN_FEATURES_KERAS_BACKEND", "numpy")
    with pytest.raises(SettingsError, match="CNN_FEATURES_KERAS_BACKEND='numpy'"):
        load_settings()
    monkeypatch.delenv("CNN_FEATURES_KERAS_BACKEND")
    monkeypatch.setenv("CNN_FEATURES_GPU_PRECISION", "bf16")
    with pytest.raises(SettingsError, match="float32, tf32"):
        load_settings()


def test_visible_gpus_follow_the_deployment() -> None:
    """GPU ids come from the deployment's CUDA_VISIBLE_DEVICES (kept as given), or count from the probe."""
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-aa, GPU-bb"}, count=1) == ["GPU-aa"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}, count=4) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpus({}, count=4) == ["0", "1", "2", "3"]


def test_default_shard_concurrency_follows_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """With more GPUs than the default two shards, the default concurrency is one shard per GPU."""
    monkeypatch.delenv("CNN_FEATURES_SHARD_CONCURRENCY", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert load_settings().shard_concurrency == 8
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert load_settings().shard_concurrency == 2
    monkeypatch.setenv("CNN_FEATURES_SHARD_CONCURRENCY", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    assert load_settings().shard_concurrency == 3


@pytest.fixture(scope="module")
def tensorflow_features(reference_model: dict[str, Any], user_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Each model's features on TensorFlow (the default backend), and the batch they came from."""
    folder = tmp_path_factory.mktemp("agree")
    batch = np.stack([tiny_spectrogram(seed, 40) for seed in range(4)])
    np.save(folder / "batch.npy", batch)
    models = {"reference": Path(reference_model["path"]), "user": user_model}
    features = {}
    for which, path in models.items():
        out = folder / f"{which}-tensorflow.npy"
        assert run_child("tensorflow", "features", str(path), str(folder / "batch.npy"), str(out))["backend"] == "tensorflow"
        features[which] = np.load(out)
    return {"folder": folder, "models": models, "features": features}


@pytest.mark.parametrize("which", ["reference", "user"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_features_agree_across_backends(which: str, backend: str, tensorflow_features: dict[str, Any]) -> None:
    """The reference CNN and a user model (BN, GELU, Dropout, Dense) give TensorFlow's features on this backend, within 1e-5."""
    folder = tensorflow_features["folder"]
    reference = tensorflow_features["features"][which]
    assert np.isfinite(reference).all() and np.abs(reference).max() > 0
    out = folder / f"{which}-{backend}.npy"
    path = tensorflow_features["models"][which]
    assert run_child(backend, "features", str(path), str(folder / "batch.npy"), str(out))["backend"] == backend
    worst = float(np.max(np.abs(np.load(out) - reference)) / np.max(np.abs(reference)))
    assert worst <= BACKEND_RTOL, f"{which} model on {backend}: {worst:.3g} relative from TensorFlow"


def test_jax_compiles_once_per_length_and_pads_only_the_batch(reference_model: dict[str, Any], tmp_path: Path) -> None:
    """JAX compiles one function per clip length (a shorter last pass reuses it) and its features match the model's."""
    out = run_child("jax", "jax-lengths", reference_model["path"], str(tmp_path / "cache"))
    # lengths 24, 25, 26 -> three compiles; (24, 3) and the second (24, 4) reuse the first.
    assert out["compiles"] == 3
    assert out["compile_s"] > 0
    assert out["worst"] <= BACKEND_RTOL
    assert out["precision"] == "highest", "full float32 asked of JAX, whatever the device"
    assert any((tmp_path / "cache").iterdir()), "compiled functions are kept on disk for the next process"
