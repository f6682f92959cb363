"""Verification plots: PCA of the features by emotion and throughput per shard, as PNG files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnn_features.plots import load_features, pca_2d, plot_throughput, write_run_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Return (width, height) from a PNG header."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def make_output(root: Path, emotions: list[str], *, per_emotion: int = 6, dim: int = 16) -> Path:
    """Write features (one cluster per emotion) and their manifest as verify would."""
    rng = np.random.default_rng(0)
    items = []
    for e, emotion in enumerate(emotions):
        centre = np.zeros(dim, dtype=np.float32)
        centre[e] = 10.0
        for i in range(per_emotion):
            rel = f"Actor_{i + 1:02d}/{emotion}-{i}.npy"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            np.save(root / rel, (centre + rng.standard_normal(dim)).astype(np.float32))
            items.append({"feature": rel, "clip_id": f"{emotion}-{i}", "emotion": emotion, "actor": f"{i + 1:02d}"})
    (root / "manifest.json").write_text(json.dumps({"dataset": root.name, "feature_dim": dim, "items": items}))
    return root


def test_pca_finds_the_direction_of_largest_spread() -> None:
    """Points spread along one axis project onto PC1 with almost all the variance, with a fixed sign."""
    rng = np.random.default_rng(1)
    x = np.zeros((200, 5))
    x[:, 2] = rng.standard_normal(200) * 10
    x[:, 4] = rng.standard_normal(200) * 0.1
    points, explained = pca_2d(x)
    assert points.shape == (200, 2)
    assert explained[0] > 0.99
    assert np.allclose(np.abs(points[:, 0]), np.abs(x[:, 2] - x[:, 2].mean()), atol=1e-2)
    again, _ = pca_2d(x * 1.0)
    assert np.array_equal(points, again)
    with pytest.raises(ValueError, match="at least 2 rows"):
        pca_2d(np.zeros((1, 3)))


def test_pca_agrees_with_the_svd_of_the_rows() -> None:
    """Projection and explained variance match an SVD of the centred rows, up to each axis's sign."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 16)) @ rng.standard_normal((16, 16))
    points, explained = pca_2d(x)
    centred = x - x.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[:2].T
    assert np.allclose(np.abs(points), np.abs(expected), atol=1e-8)
    assert np.allclose(explained, singular[:2] ** 2 / (singular**2).sum())


def test_load_features_subsamples_the_same_files_every_time(tmp_path: Path) -> None:
    """Over the limit, the same hashed subset of the manifest is loaded each time, with its emotions."""
    out = make_output(tmp_path / "ravdess", ["angry", "calm"], per_emotion=10)
    features, emotions = load_features(out, limit=7)
    again, emotions_again = load_features(out, limit=7)
    assert features.shape == (7, 16) and np.array_equal(features, again) and emotions == emotions_again
    everything, all_emotions = load_features(out)
    assert everything.shape == (20, 16) and sorted(set(all_emotions)) == ["angry", "calm"]


def test_run_plots_are_written_as_png(tmp_path: Path) -> None:
    """A verified run gets pca.png and throughput.png in the given folder, and no temporary files."""
    outputs = {
        "ravdess": make_output(tmp_path / "ravdess", ["neutral", "happy", "angry"]),
        "crema_d": make_output(tmp_path / "crema_d", ["sad", "disgust"]),
    }
    shards = [{"dataset": name, "output": str(out)} for name, out in outputs.items()]
    results: list[dict[str, Any]] = [
        {"shard_id": "ravdess-0001", "label": "ravdess 1/1", "dataset": "ravdess", "device": "cpu",
         "files_per_s": 40.0, "extracted": 18, "skipped_existing": 0, "fallback_reason": "CUDA_ERROR_NOT_INITIALIZED"},
        {"shard_id": "crema_d-0001", "label": "crema_d 1/1", "dataset": "crema_d", "device": "gpu",
         "files_per_s": 90.0, "extracted": 12, "skipped_existing": 0, "fallback_reason": None},
    ]
    written = write_run_plots(tmp_path / "plots", shards, results)
    assert [p.name for p in written] == ["pca.png", "throughput.png"]
    wide, high = png_size(tmp_path / "plots" / "pca.png")
    assert wide > 2 * high * 0.9  # one panel per dataset, side by side
    assert png_size(tmp_path / "plots" / "throughput.png")[0] > 300
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["pca.png", "throughput.png"]


def test_a_missing_manifest_skips_the_pca_but_not_the_throughput(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Plots never fail a run: an unreadable manifest only costs the PCA picture, with a warning."""
    out = tmp_path / "ravdess"
    out.mkdir()
    (out / "manifest.json").write_text("{not json")
    written = write_run_plots(tmp_path / "plots", [{"dataset": "ravdess", "output": str(out)}], [])
    assert [p.name for p in written] == ["throughput.png"]
    assert "PCA plot not written" in caplog.text


def test_throughput_plot_handles_shards_that_only_skipped(tmp_path: Path) -> None:
    """A re-run where every shard skipped its files (0 files/s) still draws a chart."""
    path = plot_throughput([{"shard_id": "a", "device": "cpu", "files_per_s": 0.0, "extracted": 0, "skipped_existing": 9}],
                           tmp_path / "t.png")
    assert png_size(path)[0] > 300


def test_plots_do_not_import_pyplot_or_need_a_display() -> None:
    """Drawing uses the Agg canvas only: no pyplot, no GUI backend, in a fresh process without DISPLAY."""
    code = (
        "import sys, tempfile, pathlib\n"
        "from cnn_features.plots import plot_throughput\n"
        "assert 'matplotlib' not in sys.modules\n"
        "plot_throughput([], pathlib.Path(tempfile.mkdtemp()) / 't.png')\n"
        "print('pyplot' if 'matplotlib.pyplot' in sys.modules else 'no-pyplot')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no-pyplot"
