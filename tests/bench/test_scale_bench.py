"""The scale benchmark's smoke mode: the plan timed step by step, one live DAG run measured from its database and /proc."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from tests.bench import smoke_report

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "scale.py"
sys.path.insert(0, str(REPO))

from bench.scale import SMOKE_FILES, SMOKE_MAX_MAP_LENGTH, SMOKE_NOTE, SMOKE_SHARD_SIZE, clip_name  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One smoke run of the scale benchmark (tiny corpus, its own live Airflow)."""
    return smoke_report(SCRIPT, tmp_path_factory.mktemp("bench-scale"), name="scale_results.json")


def test_the_plan_is_timed_and_fitted_to_max_map_length(report: dict[str, Any]) -> None:
    """The corpus is planned whole, its shard size raised to fit the small max_map_length, every step timed."""
    (planned,) = report["plan"]
    assert planned["files"] == SMOKE_FILES and planned["rejected"] == 0
    assert planned["requested_shard_size"] == SMOKE_SHARD_SIZE and planned["shards"] <= SMOKE_MAX_MAP_LENGTH
    assert planned["shard_size"] == SMOKE_FILES // SMOKE_MAX_MAP_LENGTH and "core.max_map_length" in planned["note"]
    assert planned["plan_s"] > 0 and all(seconds >= 0 for seconds in planned["steps_s"].values())
    assert {"list: walk + stat", "labels: label_all", "plan files: write"} <= set(planned["steps_s"])
    assert planned["plan_file_bytes"] > SMOKE_FILES * len(clip_name(0)), "the plan files hold every name"
    assert planned["refs_json_bytes"] < planned["plan_file_bytes"] and planned["largest_shard_file_bytes"] < planned["plan_file_bytes"]


def test_one_live_run_is_measured_from_its_database_and_proc(report: dict[str, Any]) -> None:
    """The DAG extracts every clip; its XCom bytes, rows added, scheduler CPU and wall are measured, and the raise is recorded."""
    dag = report["dag"]
    assert dag["features"] == dag["files"] == SMOKE_FILES
    assert dag["shards"] == SMOKE_MAX_MAP_LENGTH and "raised" in dag["plan_note"]
    assert 0 < dag["xcom_bytes"] < 20_000 and any(task.startswith("plan_shards") for task in dag["xcom_bytes_by_task"])
    assert dag["db_rows_added_by_table"]["task_instance"] >= SMOKE_MAX_MAP_LENGTH + 3
    assert dag["scheduler_cpu_s"] > 0 and dag["wall_s"] > 0
    assert set(report["targets"]) == {"plan_s <= 60", "xcom_bytes <= 256 KB"}
    assert report["stdout"].startswith(SMOKE_NOTE) and "XCom bytes per run" in report["stdout"]
