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


def test_an_underscore_corpus_folder_is_verified_and_one_named_like_a_pipeline_folder_is_refused(tmp_path: Path) -> None:
    """Inputs under ``_extra/`` are features like any other and verify; one under ``_models/`` would lie among the
    model copies, so the plan refuses it by name."""
    from tests.conftest import tiny_spectrogram, write_clip

    extra = "_extra/Actor_03/03-01-01-01-01-01-03.npy"
    clash = "_models/Actor_04/03-01-01-01-01-01-04.npy"
    for seed, rel in enumerate((extra, clash)):
        write_clip(tmp_path / "in" / rel, tiny_spectrogram(seed))
    shards = planned(tmp_path)
    rejected = {rel: reason for s in shards for rel, reason in s["rejected"].items()}
    assert list(rejected) == [clash] and "the output's _models/ folder" in rejected[clash]
    results = fake_extract(shards)
    (tmp_path / "out" / clash).unlink()  # a worker writes no feature for a refused input
    summary = verify_run(shards, results, max_bad_fraction=0.2)
    assert summary["passed"] and summary["datasets"]["ravdess"]["features_ok"] == 7
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert extra in {i["feature"] for i in manifest["items"]}


def test_the_feature_of_an_input_now_bad_is_moved_aside(tmp_path: Path) -> None:
    """A feature left from an earlier run whose input is now bad (unreadable) is moved under ``_orphans/`` and listed;
    a dataset that tolerates the bad input still passes."""
    shards = planned(tmp_path)
    results = fake_extract(shards)
    first, out = shards[0]["files"][0], tmp_path / "out"
    results[0]["bad"] = [{"file": first, "reason": f"{first}: cannot read (Permission denied)"}]
    summary = verify_run(shards, results, max_bad_fraction=0.2)
    assert summary["passed"] and summary["datasets"]["ravdess"]["features_ok"] == 5
    assert not (out / first).exists() and (out / "_orphans" / first).is_file()
    report = json.loads((out / "verification_report.json").read_text())
    assert report["bad_input_features"] == [first] and report["orphan_features"] == []
    assert first not in {i["feature"] for i in json.loads((out / "manifest.json").read_text())["items"]}


def test_a_passing_verification_removes_old_plans_of_other_runs_and_covered_lineage_pieces(tmp_path: Path) -> None:
    """Other runs' plans older than PLAN_KEEP_S and idle lineage pieces whose every line a whole record holds are removed;
    this run's plan (however old), a recent plan, a piece still being written and one with a line of its own stay."""
    import os
    import time

    from cnn_features import lineage, verify
    from cnn_features.plan import load_shards, publish_plan

    refs, plans = publish_plan([{**s, "batch_size": 4} for s in planned(tmp_path)])
    shards = load_shards(refs, plans)
    results = fake_extract(shards)
    out, now = tmp_path / "out", time.time()
    ours = sorted((out / "_plans").iterdir())
    old_plan, recent_plan = out / "_plans" / f"{'a' * 64}.json", out / "_plans" / f"{'b' * 64}.json"
    for path in (old_plan, recent_plan):
        path.write_text("{}")
    for path in (*ours, old_plan):
        os.utime(path, (now - verify.PLAN_KEEP_S - 60,) * 2)
    sid = shards[0]["shard_id"]
    whole = (out / "_shards" / f"{sid}.lineage.jsonl").read_bytes()
    entry = next(iter(lineage.parse_lines(whole)))
    covered, live, own = (out / "_shards" / f"{sid}.lineage-{n}-1-abcdef.jsonl" for n in (1, 2, 3))
    covered.write_bytes(whole)
    live.write_bytes(whole)
    own.write_bytes(lineage.encode_record([{**entry, "feature_sha256": "f" * 64}]))
    for path in (covered, own):
        os.utime(path, (now - verify.PIECE_IDLE_S - 60,) * 2)
    assert verify_run(shards, results, max_bad_fraction=0.0)["passed"]
    report = json.loads((out / "verification_report.json").read_text())
    assert report["leftovers_removed"] == [f"_plans/{old_plan.name}", f"_shards/{covered.name}"]
    assert all(p.exists() for p in (*ours, recent_plan, live, own)) and not old_plan.exists() and not covered.exists()
    assert load_shards(refs, plans) == shards
