"""Speaker-independent training on extracted features."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnn_features import training
from cnn_features.config import load_settings
from cnn_features.errors import InvalidConf
from cnn_features.training import TrainingFailed, confusion, run_training, split_actors, training_jobs


def test_every_fifth_actor_is_held_out() -> None:
    """Actors are split whole: every fifth in sorted order is a test actor, never in training."""
    train, test = split_actors([f"{a:02d}" for a in range(1, 25)] * 3)
    assert test == ["05", "10", "15", "20"]
    assert not set(train) & set(test) and len(train) == 20


def test_split_needs_two_actors() -> None:
    """One actor cannot be split speaker-independently."""
    assert split_actors(["01", "02"]) == (["01"], ["02"])
    with pytest.raises(TrainingFailed, match="at least 2 actors"):
        split_actors(["01", "01"])


def test_confusion_matrix_counts() -> None:
    """Rows are true classes, columns predictions."""
    m = confusion(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 2]), 3)
    assert m.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]


def test_training_beats_chance_on_separable_features(tmp_path: Path) -> None:
    """On features that carry the emotion, held-out accuracy is far above chance; model and metrics are written."""
    rng = np.random.default_rng(0)
    items = []
    emotions = ["neutral", "happy", "sad", "angry"]
    for actor in range(1, 11):
        for k, emotion in enumerate(emotions):
            for rep in range(3):
                rel = f"a{actor}_{emotion}_{rep}.npy"
                vec = rng.normal(0, 1, 32).astype(np.float32)
                vec[k * 4 : k * 4 + 4] += 3.0
                np.save(tmp_path / rel, vec)
                digest = hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest()
                items.append({"feature": rel, "clip_id": rel, "emotion": emotion, "actor": f"{1000 + actor}", "sha256": digest})
    manifest = {"dataset": "crema_d", "feature_dim": 32, "passed": True, "model_digest": "d" * 64, "items": items}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    metrics = run_training(tmp_path / "manifest.json", epochs=40)
    assert metrics["manifest"] == str(tmp_path / "manifest.json")
    assert metrics["manifest_sha256"] == hashlib.sha256((tmp_path / "manifest.json").read_bytes()).hexdigest()
    assert metrics["feature_model"]["model_digest"] == "d" * 64
    assert metrics["test_actors"] == ["1005", "1010"] and metrics["n_test"] == 24
    assert metrics["accuracy"] > 0.8 > 3 * metrics["chance_accuracy"]
    assert metrics["classes"] == ["neutral", "happy", "sad", "angry"]
    assert np.array(metrics["confusion_matrix"]).sum() == 24
    saved = json.loads((tmp_path / "training" / "metrics.json").read_text())
    assert saved["accuracy"] == metrics["accuracy"]
    assert (tmp_path / "training" / "emotion_classifier.keras").is_file()


def test_training_failure_carries_the_reason(tmp_path: Path) -> None:
    """An empty manifest fails with a message naming it."""
    (tmp_path / "manifest.json").write_text(json.dumps({"dataset": "ravdess", "feature_dim": 8, "passed": True, "items": []}))
    with pytest.raises(TrainingFailed, match="no features listed"):
        run_training(tmp_path / "manifest.json", epochs=1)


def test_training_conf_is_validated(home: Path) -> None:
    """Unknown datasets, unsafe paths and missing manifests are rejected by field."""
    settings = load_settings()
    with pytest.raises(InvalidConf, match="datasets.x"):
        training_jobs({"datasets": {"x": {"manifest": str(home / "m.json")}}}, settings)
    with pytest.raises(InvalidConf, match="datasets.ravdess.manifest: '/etc/passwd' is outside"):
        training_jobs({"datasets": {"ravdess": {"manifest": "/etc/passwd"}}}, settings)
    with pytest.raises(InvalidConf, match="does not exist"):
        training_jobs({"datasets": {"ravdess": {"manifest": str(home / "nope.json")}}}, settings)


def test_a_manifest_without_checksums_is_refused(tmp_path: Path) -> None:
    """A manifest from before lineage lists no feature SHA-256s: training will not check what it cannot, so it refuses."""
    np.save(tmp_path / "a.npy", np.ones(8, np.float32))
    item = {"feature": "a.npy", "clip_id": "a", "emotion": "happy", "actor": "01"}
    (tmp_path / "manifest.json").write_text(json.dumps({"dataset": "ravdess", "feature_dim": 8, "passed": True, "items": [item]}))
    with pytest.raises(TrainingFailed, match="lists features without their SHA-256"):
        run_training(tmp_path / "manifest.json", epochs=1)


def test_training_past_its_time_limit_fails_naming_the_manifest_and_leaves_no_child(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training child still running at the time limit is killed and reaped, and TrainingFailed names the manifest and the limit."""
    started: list[subprocess.Popen[str]] = []

    class Recorded(subprocess.Popen):  # type: ignore[type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    slow = [sys.executable, "-c", "import sys, time; print('loading', file=sys.stderr, flush=True); time.sleep(600)"]
    monkeypatch.setattr(training, "python_module_cmd", lambda *args: slow)
    monkeypatch.setattr(subprocess, "Popen", Recorded)
    manifest = tmp_path / "manifest.json"
    with pytest.raises(TrainingFailed, match=r"did not finish within 0\.5 s") as caught:
        run_training(manifest, epochs=1, timeout_s=0.5)
    assert str(manifest) in str(caught.value)
    (child,) = started
    assert child.returncode == -signal.SIGKILL, "the slow child was not killed and reaped"
