"""Both DAGs end to end through Airflow (`airflow dags test`, SQLite) on a small demo corpus."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnn_features.demo import generate
from cnn_features.progress import run_folder
from tests.conftest import add_bad_inputs

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
from demo import AirflowFailed, airflow, triggered_run  # noqa: E402

pytestmark = pytest.mark.e2e

# Frames of every demo clip here: small, so extraction takes seconds.
FRAMES = 48


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An Airflow home with a migrated SQLite DB and a demo corpus with bad inputs."""
    root = tmp_path_factory.mktemp("e2e")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(root / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "CNN_FEATURES_HOME": str(root / "data"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("CNN_FEATURES_TEST_FAULT", None)
    (root / "airflow").mkdir()
    log = root / "airflow.log"
    airflow("db", "migrate", log=log, env=env)
    corpus = root / "data" / "demo"
    counts = generate(corpus, frames=FRAMES)
    bad = add_bad_inputs(corpus / "ravdess", root / "pwned")
    datasets = {
        name: {"input": str(corpus / name), "output": str(root / "data" / "features" / name)} for name in counts
    }
    return {"root": root, "env": env, "log": log, "counts": counts, "bad": bad, "datasets": datasets}


def run_extraction(stack: dict[str, Any], **conf: Any) -> None:
    full = {"datasets": stack["datasets"], "device": "auto", "shard_size": 100, **conf}
    airflow("dags", "test", "cnn_feature_extraction", "-c", json.dumps(full), log=stack["log"], env=stack["env"])


def test_bad_inputs_fail_verification_and_block_training(stack: dict[str, Any]) -> None:
    """With max_bad_fraction 0 the run fails at verification, names the bad files, and triggers no training."""
    with pytest.raises(AirflowFailed):
        run_extraction(stack, max_bad_fraction=0.0)
    log = stack["log"].read_text()
    assert "verification failed" in log and "angry_take_3.npy" in log
    ravdess = json.loads((Path(stack["datasets"]["ravdess"]["output"]) / "verification_report.json").read_text())
    assert not ravdess["passed"] and len(ravdess["bad_inputs"]) == len(stack["bad"])
    assert not (stack["root"] / "pwned").exists()


def test_full_pipeline_through_airflow(stack: dict[str, Any]) -> None:
    """Tolerating the bad files, extraction passes, triggers training with the manifests, and training beats chance."""
    run_extraction(stack, max_bad_fraction=0.2)
    expected = {"ravdess": stack["counts"]["ravdess"] + 1, "crema_d": stack["counts"]["crema_d"]}
    for name, io in stack["datasets"].items():
        out = Path(io["output"])
        report = json.loads((out / "verification_report.json").read_text())
        assert report["passed"], report["problems"]
        assert report["features_ok"] == expected[name]
        assert report["devices"] == ["cpu"]
        features = [p for p in out.rglob("*.npy")]
        assert len(features) == expected[name]
        vec = np.load(features[0], allow_pickle=False)
        assert vec.shape == (256,) and vec.dtype == np.float32
        assert not [p for p in out.rglob(".*.tmp-*")]
    ravdess = json.loads((Path(stack["datasets"]["ravdess"]["output"]) / "verification_report.json").read_text())
    reasons = {b["file"]: b["reason"] for b in ravdess["bad_inputs"]}
    assert sorted(reasons) == sorted(stack["bad"])

    run_id, conf = triggered_run(env=stack["env"])
    assert run_id.startswith("features__")
    assert conf["datasets"]["ravdess"]["manifest"] == str(Path(stack["datasets"]["ravdess"]["output"]) / "manifest.json")

    airflow("dags", "test", "emotion_training", "-c", json.dumps({**conf, "epochs": 60}), log=stack["log"], env=stack["env"])
    for name, io in stack["datasets"].items():
        metrics = json.loads((Path(io["output"]) / "training" / "metrics.json").read_text())
        assert metrics["accuracy"] > 2 * metrics["chance_accuracy"], (name, metrics["accuracy"])
        assert set(metrics["per_class_recall"]) == set(metrics["classes"])
        assert not set(metrics["test_actors"]) & set(metrics["train_actors"])


def test_rerun_skips_everything_already_extracted(stack: dict[str, Any]) -> None:
    """A second run of the same conf recomputes nothing: every shard reports its files as already done."""
    before = {p: p.stat().st_mtime_ns for p in Path(stack["datasets"]["crema_d"]["output"]).glob("*.npy")}
    run_extraction(stack, max_bad_fraction=0.2)
    after = {p: p.stat().st_mtime_ns for p in Path(stack["datasets"]["crema_d"]["output"]).glob("*.npy")}
    assert before == after
    shard = json.loads((Path(stack["datasets"]["crema_d"]["output"]) / "_shards" / "crema_d-0001.json").read_text())
    assert shard["extracted"] == 0 and shard["skipped_existing"] == 100


def test_file_lists_stay_out_of_xcom_and_the_shards_fit_max_map_length(stack: dict[str, Any]) -> None:
    """With max_map_length 3, the shard size is raised so both datasets make 3 shards, said on the plan record; XCom holds no file name."""
    env = {**stack["env"], "AIRFLOW__CORE__MAX_MAP_LENGTH": "3"}
    full = {"datasets": stack["datasets"], "device": "auto", "shard_size": 100, "max_bad_fraction": 0.2}
    airflow("dags", "test", "cnn_feature_extraction", "-c", json.dumps(full), log=stack["log"], env=env)
    with contextlib.closing(sqlite3.connect(stack["root"] / "airflow" / "airflow.db")) as db:
        (run_id,) = db.execute(
            "SELECT run_id FROM dag_run WHERE dag_id = 'cnn_feature_extraction' ORDER BY id DESC LIMIT 1"
        ).fetchone()
        xcoms = db.execute("SELECT task_id, key, CAST(value AS TEXT) FROM xcom WHERE run_id = ?", (run_id,)).fetchall()
    record = json.loads((run_folder(Path(stack["env"]["CNN_FEATURES_HOME"]) / "progress", run_id) / "plan.json").read_text())
    assert len(record["shards"]) == 3 and "shard_size raised from 100 to" in record["note"]
    refs = json.loads(next(value for task, key, value in xcoms if task == "plan_shards" and key == "return_value"))
    assert [r["label"] for r in refs] == ["crema_d 1/2", "crema_d 2/2", "ravdess 1/1"]
    assert sum(len(value) for _, _, value in xcoms) < 20_000, "every XCom of the run, small"
    assert not [value for _, _, value in xcoms if ".npy" in value], "no file name travels through XCom"
    plans = json.loads(next(value for task, key, value in xcoms if task == "plan_shards" and key == "plans"))
    for name, io in stack["datasets"].items():
        written = list((Path(io["output"]) / "_plans").glob("*.json"))  # this run's plan and the earlier runs'
        assert all(path.stem == hashlib.sha256(path.read_bytes()).hexdigest() for path in written), name
        assert plans[name] == {"output": io["output"], "digest": plans[name]["digest"]}
        assert plans[name]["digest"] in {path.stem for path in written}


def test_model_path_with_dotdot_is_refused_before_shards(stack: dict[str, Any]) -> None:
    """A model path with `..` fails plan_shards with the field named; no shard runs."""
    with pytest.raises(AirflowFailed):
        run_extraction(stack, model_path="/tmp/../etc/model.keras")
    last_run = stack["log"].read_text().split("\n$ airflow ")[-1]
    assert "model_path: '/tmp/../etc/model.keras' contains '..'" in last_run
    assert "starting task_id=extract_shard" not in last_run


def test_demo_script_prints_where_results_are(tmp_path: Path) -> None:
    """The README's main command's script runs both DAGs on the demo corpus and prints the result paths."""
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "CNN_FEATURES_HOME": str(tmp_path / "data"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "demo.py")], env=env, capture_output=True, text=True, timeout=1200, check=False
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for words in ("verification report:", "training metrics:", "accuracy"):
        assert words in proc.stdout
    assert (tmp_path / "data" / "features" / "ravdess" / "training" / "metrics.json").is_file()
    # No run is left queued for a scheduler started later to run again.
    code = (
        "from airflow.models.dagrun import DagRun\n"
        "from airflow.utils.session import create_session\n"
        "with create_session() as s:\n"
        "    print('RUNS', sorted((r.dag_id, str(r.state)) for r in s.query(DagRun)))\n"
    )
    runs = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    line = next(line for line in runs.splitlines() if line.startswith("RUNS"))
    assert "queued" not in line and "running" not in line and "emotion_training" in line, line
