"""Progress read side: a run's shards, datasets, rates and ETA from plan.json and shard records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cnn_features.progress import ProgressLog, run_folder, write_plan
from cnn_features.progress_report import (
    ProgressNotFound,
    combined_state,
    find_run,
    format_duration,
    format_run,
    list_runs,
    load_run,
    read_records,
    to_dict,
)

RUN_ID = "manual__2026-01-01T00:00:00+00:00"


def shard(dataset: str, index: int, count: int, files: int) -> dict[str, Any]:
    """A plan entry as plan_shards makes it (only the fields progress uses)."""
    return {
        "shard_id": f"{dataset}-{index:04d}",
        "label": f"{dataset} {index}/{count}",
        "dataset": dataset,
        "files": [f"f{i}.npy" for i in range(files)],
        "output": f"/out/{dataset}",
    }


@pytest.fixture
def run(tmp_path: Path) -> dict[str, Any]:
    """A run of three shards: one finished, one half done on CPU after a GPU failure, one not started."""
    folder = run_folder(tmp_path, RUN_ID)
    shards = [shard("ravdess", 1, 2, 10), shard("ravdess", 2, 2, 10), shard("crema_d", 1, 1, 20)]
    write_plan(folder, RUN_ID, shards)
    lines = [
        {"state": "running", "device": "cpu", "done": 0, "files_per_s": 0.0, "fallback_reason": None, "ts": 1000.0},
        {"state": "running", "device": "cpu", "done": 6, "extracted": 6, "skipped": 0, "bad": 0, "files_per_s": 3.0, "ts": 1002.0},
        {"state": "success", "device": "cpu", "done": 10, "extracted": 9, "skipped": 0, "bad": 1, "files_per_s": 3.5, "ts": 1004.0},
    ]
    half = [
        {"state": "running", "device": "gpu", "done": 0, "files_per_s": 0.0, "fallback_reason": None, "ts": 1005.0},
        {"state": "running", "device": "cpu", "done": 4, "extracted": 4, "skipped": 0, "bad": 0, "files_per_s": 2.0,
         "fallback_reason": "GPU worker killed by signal 9", "ts": 1010.0},
    ]
    for spec, records in ((shards[0], lines), (shards[1], half)):
        path = folder / f"{spec['shard_id']}.jsonl"
        path.write_text("".join(json.dumps({"shard_id": spec["shard_id"], "label": spec["label"], "dataset": spec["dataset"],
                                            "total": len(spec["files"]), **r}) + "\n" for r in records))
    return {"root": tmp_path, "folder": folder, "shards": shards}


def test_shards_show_state_counts_device_and_fallback(run: dict[str, Any]) -> None:
    """Each shard shows its last record's state, done/total, device and the reason it fell back to CPU."""
    progress = load_run(run["folder"])
    by_id = {s.shard_id: s for s in progress.shards}
    finished, half, waiting = by_id["ravdess-0001"], by_id["ravdess-0002"], by_id["crema_d-0001"]
    assert (finished.state, finished.done, finished.total, finished.bad, finished.eta_s) == ("success", 10, 10, 1, 0.0)
    assert (half.state, half.done, half.total, half.device) == ("running", 4, 10, "cpu")
    assert half.fallback_reason == "GPU worker killed by signal 9"
    assert half.eta_s == pytest.approx(3.0)  # 6 files left at 2 files/s
    assert (waiting.state, waiting.done, waiting.total, waiting.device, waiting.eta_s) == ("pending", 0, 20, None, None)
    assert half.attempts == 1 and waiting.attempts == 0


def test_run_and_datasets_sum_their_shards(run: dict[str, Any]) -> None:
    """Datasets and the run add up their shards; the run rate spans first to last record, and gives the ETA."""
    progress = load_run(run["folder"])
    assert progress.run_id == RUN_ID
    assert [(d.name, d.done, d.total, d.state) for d in progress.datasets] == [
        ("ravdess", 14, 20, "running"),
        ("crema_d", 0, 20, "pending"),
    ]
    assert (progress.done, progress.total, progress.state) == (14, 40, "running")
    assert progress.files_per_s == pytest.approx(14 / 10)
    assert progress.eta_s == pytest.approx(26 / 1.4)
    assert progress.updated == 1010.0


def test_throughput_samples_follow_the_records_in_time(run: dict[str, Any]) -> None:
    """Chart samples are the worker records, in time order, in seconds since the run's first record."""
    samples = load_run(run["folder"]).samples
    assert [(s.t, s.shard_id, s.done, s.files_per_s) for s in samples] == [
        (2.0, "ravdess-0001", 6, 3.0),
        (4.0, "ravdess-0001", 10, 3.5),
        (10.0, "ravdess-0002", 4, 2.0),
    ]


def test_failed_shard_keeps_its_counts_and_error(run: dict[str, Any]) -> None:
    """A failure record has no counts: the shard keeps the last counts and shows the error."""
    spec = run["shards"][1]
    ProgressLog(run["folder"], spec).write(state="failed", device="cpu", fallback_reason=None,
                                           error="shard ravdess-0002 (ravdess) failed on CPU: cannot write")
    progress = load_run(run["folder"])
    failed = next(s for s in progress.shards if s.shard_id == "ravdess-0002")
    assert (failed.state, failed.done, failed.eta_s) == ("failed", 4, None)
    assert failed.error is not None and "cannot write" in failed.error
    assert progress.datasets[0].state == "failed"


def test_a_cleared_shard_counts_as_a_new_attempt(run: dict[str, Any]) -> None:
    """A shard run again after clearing starts a new attempt; its standing is the new attempt's."""
    spec = run["shards"][1]
    log = ProgressLog(run["folder"], spec)
    log.write(state="failed", device="cpu", fallback_reason=None, error="boom")
    log.write(state="running", device="cpu", done=0, files_per_s=0.0, fallback_reason=None)
    log.write(state="running", device="cpu", done=7, extracted=3, skipped=4, bad=0, files_per_s=5.0)
    again = next(s for s in load_run(run["folder"]).shards if s.shard_id == "ravdess-0002")
    assert (again.state, again.done, again.attempts, again.skipped, again.error) == ("running", 7, 2, 4, None)


def test_half_written_lines_are_skipped(tmp_path: Path) -> None:
    """A line being appended (not yet whole JSON) is skipped, not fatal."""
    path = tmp_path / "s.jsonl"
    path.write_text('{"state": "running", "done": 1}\n{"state": "runn')
    assert read_records(path) == [{"state": "running", "done": 1}]
    assert read_records(tmp_path / "missing.jsonl") == []


def test_combined_state() -> None:
    """A group runs while any shard runs or some but not all wait; fails only when none is left to run."""
    assert combined_state(["pending", "pending"]) == "pending"
    assert combined_state(["success", "pending"]) == "running"
    assert combined_state(["failed", "running"]) == "running"
    assert combined_state(["failed", "success"]) == "failed"
    assert combined_state(["success", "success"]) == "success"


def test_runs_are_listed_newest_first_and_found_by_id(tmp_path: Path) -> None:
    """Runs list newest first; a run id finds its folder; an unknown run or empty root says so."""
    with pytest.raises(ProgressNotFound, match="no progress records under"):
        find_run(tmp_path, None)
    write_plan(run_folder(tmp_path, "old"), "old", [shard("ravdess", 1, 1, 3)])
    write_plan(run_folder(tmp_path, RUN_ID), RUN_ID, [shard("ravdess", 1, 1, 3), shard("crema_d", 1, 1, 4)])
    runs = list_runs(tmp_path)
    assert [(r.run_id, r.shards, r.files) for r in runs] == [(RUN_ID, 2, 7), ("old", 1, 3)]
    assert find_run(tmp_path, None) == run_folder(tmp_path, RUN_ID)
    assert find_run(tmp_path, "old") == run_folder(tmp_path, "old")
    with pytest.raises(ProgressNotFound, match="'nope'"):
        find_run(tmp_path, "nope")


def test_plots_are_listed_when_written(run: dict[str, Any]) -> None:
    """Plots in the run's plots/ folder are listed, in page order, and serialise by name."""
    assert load_run(run["folder"]).plots == ()
    (run["folder"] / "plots").mkdir()
    for name in ("throughput.png", "pca.png", "other.png"):
        (run["folder"] / "plots" / name).write_bytes(b"png")
    progress = load_run(run["folder"])
    assert [p.name for p in progress.plots] == ["pca.png", "throughput.png"]
    data = json.loads(json.dumps(to_dict(progress)))
    assert data["plots"] == ["pca.png", "throughput.png"]
    assert data["datasets"][0]["shards"][0]["label"] == "ravdess 1/2"


def test_terminal_table_shows_every_shard(run: dict[str, Any]) -> None:
    """The terminal table names each shard with state, done/total, files/s, ETA, device and fallback reason."""
    text = format_run(load_run(run["folder"]), now=1015.0)
    assert "run manual__2026-01-01T00:00:00+00:00: running, 14/40 files" in text
    assert "last record 5s ago" in text
    lines = {line.split()[0] + " " + line.split()[1]: line for line in text.splitlines() if line.startswith("  ") and "/" in line}
    assert "success" in lines["ravdess 1/2"] and "10/10" in lines["ravdess 1/2"]
    assert "4/10" in lines["ravdess 2/2"] and "CPU (fallback: GPU worker killed by signal 9)" in lines["ravdess 2/2"]
    assert "pending" in lines["crema_d 1/1"] and "0/20" in lines["crema_d 1/1"]


def test_durations_read_like_a_clock() -> None:
    """Durations print as 42s, 3m05s, 1h02m; unknown as '-'."""
    assert [format_duration(s) for s in (42, 185, 3720, None)] == ["42s", "3m05s", "1h02m", "-"]


def test_progress_command_prints_the_newest_run(run: dict[str, Any]) -> None:
    """`python -m cnn_features progress` prints the newest run's table; --json its data; a missing run exits 2."""
    env = {"CNN_FEATURES_HOME": str(run["root"].parent / "home"), "PATH": "/usr/bin:/bin"}
    (run["root"].parent / "home").mkdir()
    (run["root"].parent / "home" / "progress").symlink_to(run["root"])
    cmd = [sys.executable, "-m", "cnn_features", "progress"]
    table = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "ravdess 2/2" in table.stdout and "4/10" in table.stdout
    data = subprocess.run([*cmd, RUN_ID, "--json"], env=env, capture_output=True, text=True, check=False, timeout=60)
    assert json.loads(data.stdout)["done"] == 14
    missing = subprocess.run([*cmd, "nope"], env=env, capture_output=True, text=True, check=False, timeout=60)
    assert missing.returncode == 2 and "no progress records for run 'nope'" in missing.stderr
