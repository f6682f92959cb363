"""Mixed-device datasets: a sample of features not made on CPU is re-extracted there and must agree within 1e-4."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnn_features import lineage
from cnn_features.config import load_settings
from cnn_features.crosscheck import check_dataset, describe, sample
from cnn_features.plan import DatasetIO, claim_output, plan_dataset
from cnn_features.runner import run_shard
from cnn_features.stores import LocalStore
from cnn_features.verify import verify_dataset
from tests.conftest import make_ravdess

NO_GPU = {"usable": False, "error": "no GPU in tests"}
# What a GPU worker records in its lineage (``worker.lineage_context``): no GPU is here to make it.
GPU_MADE = {"device": "gpu:0 NVIDIA Test GPU", "precision": "tf32"}


@pytest.fixture
def run(tmp_path: Path, reference_model: dict[str, Any], home: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Two shards extracted on CPU, as an all-CPU run's results say."""
    monkeypatch.setenv("CNN_FEATURES_ALLOWED_ROOTS", str(tmp_path))
    make_ravdess(tmp_path / "in", actors=2, emotions=3)
    shards = [
        {**s, "model": reference_model, "batch_size": 4}
        for s in plan_dataset(DatasetIO("ravdess", tmp_path / "in", tmp_path / "out"), shard_size=3)
    ]
    results = {s["shard_id"]: run_shard(s, requested_device="cpu", probe=NO_GPU) for s in shards}
    assert {r["device"] for r in results.values()} == {"cpu"}
    return {"shards": shards, "results": results, "out": tmp_path / "out"}


def relabel(out: Path, shard_id: str, context: dict[str, Any]) -> None:
    """Rewrite a shard's lineage as if another worker (an earlier run's GPU worker) made its features as they are now."""
    store = LocalStore(out)
    found = lineage.load_entries(store, shard_id=shard_id)
    entries = [{**found[rel][-1], **context, "feature_sha256": lineage.sha256_hex((out / rel).read_bytes())} for rel in found]
    store.write(lineage.record_name(shard_id), lineage.encode_record(entries))


def matched(out: Path) -> dict[str, dict[str, Any]]:
    """Return each feature's newest lineage entry, as verification matches them for an unchanged output."""
    return {rel: found[-1] for rel, found in lineage.load_entries(LocalStore(out)).items()}


def test_sample_is_spread_and_deterministic() -> None:
    """The sample takes files evenly across the sorted list, the same every time."""
    files = [f"f{i:02d}" for i in range(10)]
    assert sample(files, 5) == ["f00", "f02", "f04", "f06", "f08"]
    assert sample(files[::-1], 5) == sample(files, 5)
    assert sample(files[:3], 5) == files[:3] and sample(files, 0) == []


def test_features_made_one_way_are_not_rechecked(run: dict[str, Any]) -> None:
    """Features all made on one device at one precision (CPU, or all GPU) need no re-extraction, and the report says so."""
    report = check_dataset(run["shards"], matched(run["out"]), bad=set())
    assert (report["mixed"], report["checked"], report["passed"]) == (False, False, True)
    assert report["made_with"] == {"cpu float32": 6} and "one device" in describe(report)
    for shard in run["shards"]:
        relabel(run["out"], shard["shard_id"], GPU_MADE)
    assert check_dataset(run["shards"], matched(run["out"]), bad=set())["made_with"] == {"gpu tf32": 6}


def test_gpu_features_of_an_earlier_run_are_checked_in_an_all_cpu_run(run: dict[str, Any]) -> None:
    """Features whose lineage says a GPU made them are re-extracted on CPU even when this run's shards all ran on CPU."""
    relabel(run["out"], run["shards"][0]["shard_id"], GPU_MADE)
    report = verify_dataset(
        "ravdess", run["shards"], run["results"], feature_dim=256, max_bad_fraction=0.0, settings=load_settings()
    )
    check = report["device_crosscheck"]
    assert check["mixed"] and check["checked"] and check["passed"] and report["passed"]
    assert check["made_with"] == {"cpu float32": 3, "gpu tf32": 3}
    assert check["files"] == 3 and check["max_rel_diff"] <= 1e-6
    assert "within the 0.0001 limit" in describe(check)


def test_mixed_run_that_disagrees_fails_verification(run: dict[str, Any]) -> None:
    """A GPU-made feature 1 % off its CPU re-extraction fails the dataset's verification, naming the file."""
    rel = run["shards"][0]["files"][1]
    path = run["out"] / rel
    vector = np.load(path) * np.float32(1.01)
    buffer = io.BytesIO()
    np.save(buffer, vector, allow_pickle=False)
    path.write_bytes(buffer.getvalue())
    relabel(run["out"], run["shards"][0]["shard_id"], GPU_MADE)
    report = verify_dataset(
        "ravdess", run["shards"], run["results"], feature_dim=256, max_bad_fraction=0.0, settings=load_settings()
    )
    check = report["device_crosscheck"]
    assert not report["passed"] and not check["passed"]
    assert check["worst_file"] == rel and 0.005 < check["max_rel_diff"] < 0.02
    assert any("ABOVE the 0.0001 limit" in problem for problem in report["problems"])


def test_the_cpu_re_extraction_runs_the_outputs_copy_when_the_models_path_holds_another_file(
    run: dict[str, Any], reference_model: dict[str, Any], tmp_path: Path
) -> None:
    """On a verifying host whose file at the plan's model path is another one, the re-extraction fetches the output's checked copy."""
    claim_output(DatasetIO("ravdess", tmp_path / "in", run["out"]), reference_model)  # planning ships the copy
    relabel(run["out"], run["shards"][0]["shard_id"], GPU_MADE)
    other = tmp_path / "verifier" / "model.keras"
    other.parent.mkdir()
    other.write_bytes(b"this host's own model.keras, another file")
    shards = [{**s, "model": {**reference_model, "path": str(other)}} for s in run["shards"]]
    report = check_dataset(shards, matched(run["out"]), bad=set())
    assert report.get("error") is None and report["checked"] and report["passed"]
    assert report["files"] == 3 and report["max_rel_diff"] <= 1e-6
