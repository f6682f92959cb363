"""Verification against the plan: reports, manifests and the list of problems."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnn_features.errors import VerificationFailed
from cnn_features.plan import DatasetIO, plan_dataset
from cnn_features.verify import verify_run
from tests.conftest import make_ravdess, record_lineage

DIM = 8
MODEL = {"feature_dim": DIM, "sha256": "0" * 64, "digest": "1" * 64, "path": "/m.keras"}


def planned(tmp_path: Path, **kw: Any) -> list[dict[str, Any]]:
    make_ravdess(tmp_path / "in", actors=2, emotions=3, **kw)
    shards = plan_dataset(DatasetIO("ravdess", tmp_path / "in", tmp_path / "out"), shard_size=4)
    return [{**s, "model": MODEL} for s in shards]


def fake_extract(shards: list[dict[str, Any]], *, skip: int = 0) -> list[dict[str, Any]]:
    """Write a valid feature for every planned file but the first ``skip``."""
    files = [(Path(s["output"]), rel) for s in shards for rel in s["files"]]
    for out, rel in files[skip:]:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(out / rel, np.ones(DIM, dtype=np.float32))
    record_lineage(shards)
    return [{"shard_id": s["shard_id"], "bad": [], "device": "cpu", "fallback_reason": None} for s in shards]


def test_complete_run_passes_and_writes_report_and_manifest(tmp_path: Path) -> None:
    """All features present: passed, with a JSON report and a labelled manifest."""
    shards = planned(tmp_path)
    summary = verify_run(shards, fake_extract(shards), max_bad_fraction=0.0)
    assert summary["passed"] and summary["datasets"]["ravdess"]["features_ok"] == 6
    report = json.loads((tmp_path / "out" / "verification_report.json").read_text())
    assert report["passed"] and report["input_files"] == 6 and report["problems"] == []
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {i["emotion"] for i in manifest["items"]} == {"neutral", "calm", "happy"}
    assert summary["training_conf"]["datasets"]["ravdess"]["manifest"] == str(tmp_path / "out" / "manifest.json")


def test_missing_and_invalid_features_fail_listing_each(tmp_path: Path) -> None:
    """A missing feature and a wrong-shape one are both named; the report is still written."""
    shards = planned(tmp_path)
    results = fake_extract(shards, skip=1)
    wrong = Path(shards[1]["output"]) / shards[1]["files"][0]
    np.save(wrong, np.ones(DIM + 1, dtype=np.float32))
    with pytest.raises(VerificationFailed) as info:
        verify_run(shards, results, max_bad_fraction=0.0)
    text = str(info.value)
    assert f"{shards[0]['files'][0]}: no feature file" in text
    assert f"{shards[1]['files'][0]}: feature file shape (9,)" in text
    report = json.loads((tmp_path / "out" / "verification_report.json").read_text())
    assert not report["passed"] and len(report["missing_features"]) == 1 and len(report["invalid_features"]) == 1


def test_bad_inputs_fail_unless_tolerated(tmp_path: Path) -> None:
    """Bad inputs fail verification at max_bad_fraction 0 and pass (still listed) when tolerated."""
    shards = planned(tmp_path)
    results = fake_extract(shards)
    first = shards[0]["files"][0]
    (Path(shards[0]["output"]) / first).unlink()
    results[0]["bad"] = [{"file": first, "reason": f"{first}: 3 NaN or infinite value(s)"}]
    with pytest.raises(VerificationFailed, match=r"(?s)1 of 6 inputs are bad .*NaN"):
        verify_run(shards, results, max_bad_fraction=0.0)
    summary = verify_run(shards, results, max_bad_fraction=0.2)
    assert summary["passed"] and summary["datasets"]["ravdess"]["bad_inputs"] == 1
    report = json.loads((tmp_path / "out" / "verification_report.json").read_text())
    assert report["bad_inputs"] == [{"file": first, "reason": f"{first}: 3 NaN or infinite value(s)"}]


def test_orphans_and_stale_temps_are_reported(tmp_path: Path) -> None:
    """A feature without an input fails verification, named, and is moved aside; temporaries are reported.

    The next verification passes: the folder again holds only features of planned inputs.
    """
    shards = planned(tmp_path)
    results = fake_extract(shards)
    out = tmp_path / "out"
    (out / "Actor_09").mkdir()
    np.save(out / "Actor_09" / "x.npy", np.ones(DIM, np.float32))
    (out / "Actor_01" / ".y.npy.tmp-1").write_bytes(b"")
    with pytest.raises(VerificationFailed, match=r"(?s)1 problem.*no input in the plan.*Actor_09/x\.npy: moved to .*_orphans/Actor_09/x\.npy"):
        verify_run(shards, results, max_bad_fraction=0.0)
    report = json.loads((out / "verification_report.json").read_text())
    assert report["orphan_features"] == ["Actor_09/x.npy"]
    assert report["stale_temp_files"] == ["Actor_01/.y.npy.tmp-1"]
    assert not (out / "Actor_09" / "x.npy").exists() and (out / "_orphans" / "Actor_09" / "x.npy").is_file()
    assert verify_run(shards, results, max_bad_fraction=0.0)["passed"]


def test_a_failing_dataset_leaves_no_manifest_and_training_refuses_an_unpassed_one(home: Path) -> None:
    """A failing verification removes the manifest (none to train on); a manifest not marked passed is refused by training."""
    from cnn_features.config import load_settings
    from cnn_features.errors import InvalidConf
    from cnn_features.training import TrainingFailed, load_manifest, training_jobs
    from cnn_features.stores import LocalStore

    shards = planned(home / "v")
    results = fake_extract(shards)
    verify_run(shards, results, max_bad_fraction=0.0)
    out = home / "v" / "out"
    assert json.loads((out / "manifest.json").read_text())["passed"] is True
    (out / shards[0]["files"][0]).unlink()
    with pytest.raises(VerificationFailed):
        verify_run(shards, results, max_bad_fraction=0.0)
    assert not (out / "manifest.json").exists()
    assert json.loads((out / "verification_report.json").read_text())["passed"] is False

    (out / "manifest.json").write_text(json.dumps({"dataset": "ravdess", "feature_dim": DIM, "items": []}))
    with pytest.raises(InvalidConf, match="not marked as passed"):
        training_jobs({"datasets": {"ravdess": {"manifest": str(out / "manifest.json")}}}, load_settings())
    with pytest.raises(TrainingFailed, match="not marked as passed"):
        load_manifest(LocalStore(out), "manifest.json")


def test_files_that_are_not_spectrograms_are_ignored_not_bad(tmp_path: Path) -> None:
    """A README.txt and a .DS_Store pass verification at max_bad_fraction 0, listed as ignored; a broken .npy is still bad."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "README.txt").write_text("corpus notes\n")
    (tmp_path / "in" / ".DS_Store").write_bytes(b"\0Bud1")
    shards = planned(tmp_path)
    assert all("README.txt" not in s["files"] and ".DS_Store" not in s["files"] for s in shards)
    summary = verify_run(shards, fake_extract(shards), max_bad_fraction=0.0)
    assert summary["passed"] and summary["datasets"]["ravdess"]["ignored"] == 1
    report = json.loads((tmp_path / "out" / "verification_report.json").read_text())
    assert report["ignored_files"] == ["README.txt"] and report["bad_inputs"] == []

    (tmp_path / "in" / "Actor_01" / "take.npy").write_bytes(b"not numpy")
    shards = [{**s, "model": MODEL} for s in plan_dataset(DatasetIO("ravdess", tmp_path / "in", tmp_path / "out"), shard_size=4)]
    with pytest.raises(VerificationFailed, match="1 of 7 inputs are bad"):
        verify_run(shards, fake_extract(shards), max_bad_fraction=0.0)
