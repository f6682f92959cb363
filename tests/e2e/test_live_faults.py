"""Faults on a running Airflow (PostgreSQL, LocalExecutor): a task killed mid-shard is retried and resumes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from cnn_features.storage import check_feature_file
from tests.e2e.live import DAG_ID, LiveAirflow, mid_shard, wait_for, workers_of

pytestmark = pytest.mark.e2e

# Seconds each worker sleeps after a batch (CNN_FEATURES_TEST_FAULT=slow), so a
# shard of 180 files in batches of 8 stays busy for several seconds.
SLOW_S = "0.3"
# Features the killed try has stored, at least, when its task is killed: three
# batches, so its retry has some to skip.
KILL_AFTER_FILES = 24


def test_task_killed_mid_shard_is_retried_and_resumes(live_airflow: LiveAirflow) -> None:
    """SIGKILL the task process mid-shard: its worker dies too, Airflow fails that try and retries, the retry skips the finished files."""
    live = live_airflow
    conf = live.conf("killed_task", datasets=("ravdess",), shard_size=1000)
    out = Path(conf["datasets"]["ravdess"]["output"])
    with live.scheduler_env(CNN_FEATURES_TEST_FAULT=f"slow={SLOW_S}"), live.dag_paused("emotion_training"):
        run_id = live.trigger(conf)
        caught = mid_shard(out, at_least=KILL_AFTER_FILES, total=live.counts["ravdess"])
        with live.workers_frozen_when(run_id, caught, what="the shard mid-way"):
            (worker,) = workers_of(live.home)
            task = int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1])  # the worker's parent
            assert "cnn_features.worker" not in Path(f"/proc/{task}/cmdline").read_bytes().decode(errors="replace")
            os.kill(task, signal.SIGKILL)
            wait_for(lambda: worker not in workers_of(live.home) or None, timeout_s=30, what="the orphaned worker to die")
        for path in out.rglob("*.npy"):
            assert check_feature_file(path, feature_dim=256) is None, f"partial feature after the kill: {path}"
        done_before = {p.name for p in out.rglob("*.npy")}
        assert 0 < len(done_before) < live.counts["ravdess"]

        run = live.api.wait_run(DAG_ID, run_id)
        assert run["state"] == "success"
        (ti,) = live.api.mapped(DAG_ID, run_id, "extract_shard")
        assert ti["state"] == "success" and ti["try_number"] >= 2
    saved = json.loads((out / "_shards" / "ravdess-0001.json").read_text())
    assert saved["device"] == "cpu"
    assert saved["skipped_existing"] >= len(done_before)
    assert saved["extracted"] + saved["skipped_existing"] == live.counts["ravdess"]
    features = sorted(out.rglob("*.npy"))
    assert len(features) == live.counts["ravdess"]
    assert all(check_feature_file(p, feature_dim=256) is None for p in features)
