"""Progress records: a plan per run and one append-only record file per shard."""

from __future__ import annotations

import json
from pathlib import Path

from cnn_features.progress import ProgressLog, run_folder, write_plan

SHARD = {"shard_id": "ravdess-0001", "label": "ravdess 1/2", "dataset": "ravdess", "files": ["a", "b"], "output": "/o"}


def test_run_folder_is_a_safe_name(tmp_path: Path) -> None:
    """Run ids with ':' and '+' become one safe folder name under the root."""
    folder = run_folder(tmp_path, "manual__2026-01-01T00:00:00+00:00")
    assert folder.parent == tmp_path and folder.name == "run=manual__2026-01-01T00%3A00%3A00%2B00%3A00"


def test_run_folders_are_one_per_run_id_and_stay_under_the_root(tmp_path: Path) -> None:
    """'..', '.', '' and '/' stay under the root, 'a:b' and 'a_b' get different folders, and old-layout runs are still found."""
    ids = ["..", ".", "", "/", "../x", "a:b", "a_b", "a%3Ab", "a b", ".hidden", "x" * 250, "x" * 249 + "y", "é"]
    folders = [run_folder(tmp_path, run_id) for run_id in ids]
    assert len(set(folders)) == len(ids)
    for folder in folders:
        assert folder.parent == tmp_path and not folder.name.startswith(".") and len(folder.name) <= 255
    write_plan(tmp_path / "manual__2026_x", "manual__2026:x", [SHARD])  # written by the first layout
    assert run_folder(tmp_path, "manual__2026:x") == tmp_path / "manual__2026_x"
    assert run_folder(tmp_path, "manual__2026_x") != tmp_path / "manual__2026_x"


def test_plan_and_records_round_trip(tmp_path: Path) -> None:
    """The plan lists every shard; records append with the shard's identity and total."""
    write_plan(tmp_path, "run1", [SHARD])
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["run_id"] == "run1" and plan["shards"][0]["files"] == 2
    log = ProgressLog(tmp_path, SHARD)
    log.write(state="running", done=1)
    log.write(state="success", done=2)
    records = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [r["state"] for r in records] == ["running", "success"]
    assert all(r["total"] == 2 and r["label"] == "ravdess 1/2" and r["ts"] > 0 for r in records)
