"""Mixed-device runs: a sample of GPU-made features is re-extracted on CPU and must agree within 1e-4."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnn_features.config import load_settings
from cnn_features.crosscheck import check_dataset, describe, sample
from cnn_features.plan import DatasetIO, plan_dataset
from cnn_features.runner import run_shard
from cnn_features.verify import verify_dataset
from tests.conftest import make_ravdess

NO_GPU = {"usable": False, "error": "no GPU in tests"}


@pytest.fixture
def run(tmp_path: Path, reference_model: dict[str, Any], home: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Two shards extracted on CPU; the first one's result then says it ran on the GPU, as a mixed run's would."""
    monkeypatch.setenv("CNN_FEATURES_ALLOWED_ROOTS", str(tmp_path))
    make_ravdess(tmp_path / "in", actors=2, emotions=3)
    shards = [
        {**s, "model": reference_model, "batch_size": 4}
        for s in plan_dataset(DatasetIO("ravdess", tmp_path / "in", tmp_path / "out"), shard_size=3)
    ]
    results = {s["shard_id"]: run_shard(s, requested_device="cpu", probe=NO_GPU) for s in shards}
    results[shards[0]["shard_id"]]["device"] = "gpu"
    return {"shards": shards, "results": results, "out": tmp_path / "out"}


def test_sample_is_spread_and_deterministic() -> None:
    """The sample takes files evenly across the sorted list, the same every time."""
    files = [f"f{i:02d}" for i in range(10)]
    assert sample(files, 5) == ["f00", "f02", "f04", "f06", "f08"]
    assert sample(files[::-1], 5) == sample(files, 5)
    assert sample(files[:3], 5) == files[:3] and sample(files, 0) == []


def test_one_device_runs_are_not_rechecked(run: dict[str, Any]) -> None:
    """Features from one device only need no re-extraction, and the report says so."""
    shard = run["shards"][1]
    report = check_dataset([shard], {shard["shard_id"]: run["results"][shard["shard_id"]]}, bad=set())
    assert (report["mixed"], report["checked"], report["passed"]) == (False, False, True)
    assert "one device" in describe(report)


def test_mixed_run_that_agrees_passes(run: dict[str, Any]) -> None:
    """A mixed run's GPU-made sample, re-extracted on CPU, agrees within the limit; the report gives the difference."""
    report = check_dataset(run["shards"], run["results"], bad=set())
    assert report["mixed"] and report["checked"] and report["passed"]
    assert report["files"] == 3 and report["max_rel_diff"] <= 1e-6
    assert "within the 0.0001 limit" in describe(report)


def test_mixed_run_that_disagrees_fails_verification(run: dict[str, Any]) -> None:
    """A GPU-made feature 1 % off its CPU re-extraction fails the dataset's verification, naming the file."""
    rel = run["shards"][0]["files"][1]
    path = run["out"] / rel
    vector = np.load(path) * np.float32(1.01)
    buffer = io.BytesIO()
    np.save(buffer, vector, allow_pickle=False)
    path.write_bytes(buffer.getvalue())
    report = verify_dataset(
        "ravdess", run["shards"], run["results"], feature_dim=256, max_bad_fraction=0.0, settings=load_settings()
    )
    check = report["device_crosscheck"]
    assert not report["passed"] and not check["passed"]
    assert check["worst_file"] == rel and 0.005 < check["max_rel_diff"] < 0.02
    assert any("ABOVE the 0.0001 limit" in problem for problem in report["problems"])
