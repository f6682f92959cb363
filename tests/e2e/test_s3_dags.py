"""Both DAGs through Airflow (`airflow dags test`) with datasets on a real S3 server, in every direction."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from cnn_features.demo import generate
from cnn_features.progress_report import find_run, list_runs, load_run
from cnn_features.s3 import S3Location
from tests.e2e.test_s3_shards import upload

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
from demo import airflow, triggered_run  # noqa: E402

pytestmark = pytest.mark.e2e

# Frames of every clip: small, so each run extracts in seconds.
FRAMES = 32


@pytest.fixture(scope="module")
def s3_stack(s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An Airflow home (SQLite) whose `aws_default` connection points at the test server, and a corpus on disk and in a bucket."""
    root = tmp_path_factory.mktemp("s3dags")
    bucket = "dags-e2e"
    s3_server.create_bucket(bucket)
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(root / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "CNN_FEATURES_HOME": str(root / "data"),
        "CNN_FEATURES_ALLOWED_ROOTS": f"{root / 'data'}:s3://{bucket}",
        "AIRFLOW_CONN_AWS_DEFAULT": s3_server.airflow_connection_json(),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    for name in ("CNN_FEATURES_TEST_FAULT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"):
        env.pop(name, None)
    (root / "airflow").mkdir()
    log = root / "airflow.log"
    airflow("db", "migrate", log=log, env=env)
    corpus = root / "data" / "demo"
    generate(corpus, frames=FRAMES)
    upload(s3_server, corpus / "ravdess", S3Location(bucket, "corpus/ravdess"))
    return {"root": root, "env": env, "log": log, "bucket": bucket, "server": s3_server, "corpus": corpus}


def extract(stack: dict[str, Any], src: str, dst: str) -> None:
    conf = {"datasets": {"ravdess": {"input": src, "output": dst}}, "shard_size": 100}
    airflow("dags", "test", "cnn_feature_extraction", "-c", json.dumps(conf), log=stack["log"], env=stack["env"])


def features_at(stack: dict[str, Any], location: str) -> dict[str, bytes]:
    """Every feature under a folder or S3 prefix, by relative path."""
    if location.startswith("s3://"):
        client = stack["server"].client()
        prefix = location.split("/", 3)[3] + "/"
        found = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=stack["bucket"], Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :]
                if rel.endswith(".npy") and "/" in rel and not rel.startswith(("_", "training/")):
                    found[rel] = client.get_object(Bucket=stack["bucket"], Key=obj["Key"])["Body"].read()
        return found
    return {p.relative_to(location).as_posix(): p.read_bytes() for p in Path(location).rglob("*.npy")}


def read_json(stack: dict[str, Any], location: str) -> Any:
    if location.startswith("s3://"):
        key = location.split("/", 3)[3]
        return json.loads(stack["server"].client().get_object(Bucket=stack["bucket"], Key=key)["Body"].read())
    return json.loads(Path(location).read_text())


def test_every_direction_gives_the_local_bytes_and_training_runs_on_s3(s3_stack: dict[str, Any]) -> None:
    """S3 -> S3, S3 -> local and local -> S3 runs verify and write features byte-identical to a local run; training reads and writes S3."""
    bucket, data = s3_stack["bucket"], s3_stack["root"] / "data"
    local_in = str(s3_stack["corpus"] / "ravdess")
    runs = {
        "local": (local_in, str(data / "features" / "local")),
        "s3-s3": (f"s3://{bucket}/corpus/ravdess", f"s3://{bucket}/features/s3-s3"),
        "s3-local": (f"s3://{bucket}/corpus/ravdess", str(data / "features" / "s3-local")),
        "local-s3": (local_in, f"s3://{bucket}/features/local-s3"),
    }
    got = {}
    for name, (src, dst) in runs.items():
        extract(s3_stack, src, dst)
        report = read_json(s3_stack, f"{dst}/verification_report.json")
        assert report["passed"], (name, report["problems"])
        got[name] = features_at(s3_stack, dst)
    assert got["local"] and len(got["local"]) == report["features_ok"]
    for name in ("s3-s3", "s3-local", "local-s3"):
        assert got[name] == got["local"], name

    run_id, conf = triggered_run(env=s3_stack["env"])
    assert conf["datasets"]["ravdess"]["manifest"] == f"s3://{bucket}/features/local-s3/manifest.json"
    assert conf["aws_conn_id"] == "aws_default"
    airflow("dags", "test", "emotion_training", "-c", json.dumps({**conf, "epochs": 40}), log=s3_stack["log"], env=s3_stack["env"])
    metrics = read_json(s3_stack, f"s3://{bucket}/features/local-s3/training/metrics.json")
    assert metrics["accuracy"] > metrics["chance_accuracy"]
    assert metrics["model"] == f"s3://{bucket}/features/local-s3/training/emotion_classifier.keras"
    progress = s3_stack["root"] / "data" / "progress"
    runs = [load_run(find_run(progress, summary.run_id)) for summary in list_runs(progress)]
    assert len(runs) == 4 and {run.state for run in runs} == {"success"}
    for run in runs:  # the progress page's view of every run, S3 ones included
        assert run.done == run.total == report["input_files"]
        assert {p.name for p in run.plots} == {"pca.png", "throughput.png"}, run.run_id


def test_secret_key_appears_in_no_log_report_or_xcom(s3_stack: dict[str, Any]) -> None:
    """After the S3 runs, the secret key is in no task log, report, manifest, shard result, progress record or metadata DB."""
    secret = s3_stack["server"].credentials["secret_access_key"].encode()
    extract(s3_stack, f"s3://{s3_stack['bucket']}/corpus/ravdess", f"s3://{s3_stack['bucket']}/features/s3-s3")
    leaks = [p for p in s3_stack["root"].rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert not leaks, leaks
    client = s3_stack["server"].client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3_stack["bucket"], Prefix="features/"):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith(".json"):
                body = client.get_object(Bucket=s3_stack["bucket"], Key=obj["Key"])["Body"].read()
                assert secret not in body, obj["Key"]
