"""Settings come from the environment, coerced explicitly."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnn_features.config import DEFAULT_SHARD_SIZE, SettingsError, load_settings


def test_defaults_without_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing set, data lives in the checkout's data/ folder and defaults apply."""
    for name in ("CNN_FEATURES_HOME", "CNN_FEATURES_SHARD_SIZE", "CNN_FEATURES_BATCH_SIZE"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.home == Path(__file__).resolve().parents[2] / "data"
    assert settings.shard_size == DEFAULT_SHARD_SIZE
    assert settings.default_datasets()["ravdess"] == {
        "input": str(settings.home / "demo" / "ravdess"),
        "output": str(settings.home / "features" / "ravdess"),
    }


def test_values_are_coerced_from_strings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Integers and floats from the environment become ints and floats."""
    monkeypatch.setenv("CNN_FEATURES_HOME", str(tmp_path))
    monkeypatch.setenv("CNN_FEATURES_SHARD_SIZE", "250")
    monkeypatch.setenv("CNN_FEATURES_PROBE_TIMEOUT_S", "2.5")
    settings = load_settings()
    assert (settings.home, settings.shard_size, settings.probe_timeout_s) == (tmp_path, 250, 2.5)


@pytest.mark.parametrize(
    ("name", "value"),
    [("CNN_FEATURES_SHARD_SIZE", "lots"), ("CNN_FEATURES_BATCH_SIZE", "0"), ("CNN_FEATURES_GPU_QUEUE", "gpu queue"),
     ("CNN_FEATURES_GPU_POOL", "gpu/pool")],
)
def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    """A value that is not a number, or out of range, names the variable."""
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError, match=name):
        load_settings()


def test_progress_records_go_where_the_deployment_says(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """By default under the home; with CNN_FEATURES_PROGRESS_ROOT (a folder every host shares), there, whatever the home."""
    monkeypatch.setenv("CNN_FEATURES_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CNN_FEATURES_PROGRESS_ROOT", raising=False)
    assert load_settings().progress_root == tmp_path / "home" / "progress"
    monkeypatch.setenv("CNN_FEATURES_PROGRESS_ROOT", str(tmp_path / "shared" / "progress"))
    assert load_settings().progress_root == tmp_path / "shared" / "progress"


def test_gpu_queue_and_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU queue by default: the GPU extraction task then sits on the default queue and pool; set, it uses them."""
    monkeypatch.delenv("CNN_FEATURES_GPU_QUEUE", raising=False)
    monkeypatch.delenv("CNN_FEATURES_GPU_POOL", raising=False)
    settings = load_settings()
    assert (settings.gpu_queue, settings.gpu_task_queue, settings.gpu_task_pool) == ("", "default", "default_pool")
    monkeypatch.setenv("CNN_FEATURES_GPU_QUEUE", "gpu")
    monkeypatch.setenv("CNN_FEATURES_GPU_POOL", "h100s")
    settings = load_settings()
    assert (settings.gpu_task_queue, settings.gpu_task_pool) == ("gpu", "h100s")
