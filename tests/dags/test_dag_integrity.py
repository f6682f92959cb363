"""DAG integrity: the DAG files import cleanly, fast, without TensorFlow, with tags and retries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"

# Loads the DAG folder in a fresh interpreter, as the DAG processor does, and
# reports what the tests check. A fresh process, so nothing this test session
# imported (Keras in other tests) can hide an import the DAG files make.
_INSPECT = r"""
import json, sys, time
started = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
elapsed = time.perf_counter() - started
print("REPORT " + json.dumps({
    "import_errors": {k: str(v) for k, v in bag.import_errors.items()},
    "seconds": elapsed,
    "heavy_modules": sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "jax", "torch")),
    "dags": {
        dag_id: {
            "tags": sorted(dag.tags),
            "doc_md": bool(dag.doc_md),
            "params": {k: {"title": p.schema.get("title"), "description": p.description or p.schema.get("description")} for k, p in dag.params.items()},
            "tasks": {t.task_id: {"retries": t.retries, "map_index_template": getattr(t, "map_index_template", None),
                                  "queue": t.queue, "pool": t.pool, "trigger_rule": getattr(t.trigger_rule, "value", t.trigger_rule)} for t in dag.tasks},
        }
        for dag_id, dag in bag.dags.items()
    },
    "datasets_form": {
        name: _verdict(bag.dags["cnn_feature_extraction"].params.get_param("datasets"), value)
        for name, value in json.loads(sys.argv[2]).items()
    } if "cnn_feature_extraction" in bag.dags else {},
}))
"""
# Put before the report: what the trigger form's schema says of a datasets value.
_INSPECT = _INSPECT.replace("elapsed = time", """def _verdict(param, value):
    from airflow.sdk.exceptions import ParamValidationError
    try:
        param.resolve(value)
    except ParamValidationError as exc:
        return "refused: " + str(exc)
    return "accepted"
elapsed = time""", 1)
# Values of the datasets field put to the trigger form's own schema.
FORM_VALUES = {
    "local and s3": {"ravdess": {"input": "/data/in", "output": "s3://feature-bucket/ravdess"}},
    "relative input": {"ravdess": {"input": "data/in", "output": "/data/out"}},
    "no output": {"ravdess": {"input": "/data/in"}},
    "unknown dataset": {"savee": {"input": "/data/in", "output": "/data/out"}},
    "extra key": {"ravdess": {"input": "/data/in", "output": "/data/out", "shard": 3}},
    "bad bucket": {"ravdess": {"input": "s3://A/in", "output": "/data/out"}},
    "empty": {},
}


def _load(home: Path, **extra: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNN_FEATURES_GPU_")}
    env.update({"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "CNN_FEATURES_HOME": str(home / "data"), **extra})
    proc = subprocess.run([sys.executable, "-c", _INSPECT, str(DAGS), json.dumps(FORM_VALUES)], env=env,
                          capture_output=True, text=True, check=False, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, f"DagBag load failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("REPORT ") :])


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _load(tmp_path_factory.mktemp("airflow"))


def test_every_dag_file_imports_without_errors(report: dict[str, Any]) -> None:
    """The DAG folder loads with no import errors and holds both DAGs."""
    assert report["import_errors"] == {}
    assert set(report["dags"]) == {"cnn_feature_extraction", "emotion_training"}


def test_parsing_imports_no_tensorflow(report: dict[str, Any]) -> None:
    """Parsing the DAG files imports no TensorFlow, Keras, JAX or PyTorch module."""
    assert report["heavy_modules"] == []


def test_dags_have_tags_docs_and_retries(report: dict[str, Any]) -> None:
    """Each DAG has tags and a doc page; shard extraction retries."""
    for dag_id, dag in report["dags"].items():
        assert dag["tags"], dag_id
        assert dag["doc_md"], dag_id
    tasks = report["dags"]["cnn_feature_extraction"]["tasks"]
    assert tasks["extract_shard"]["retries"] >= 1
    assert tasks["plan_shards"]["retries"] >= 1


def test_extraction_dag_shape(report: dict[str, Any]) -> None:
    """probe_gpu, plan_shards, the two routes, extract_shard and extract_shard_gpu (named per shard), verify_features, trigger_training."""
    tasks = report["dags"]["cnn_feature_extraction"]["tasks"]
    assert set(tasks) == {
        "probe_gpu", "plan_shards", "route_gpu_shards", "route_cpu_shards", "extract_shard", "extract_shard_gpu",
        "verify_features", "trigger_training",
    }
    for name in ("extract_shard", "extract_shard_gpu"):
        assert "label" in tasks[name]["map_index_template"], name
        assert tasks[name]["retries"] >= 1, name
    # One extraction task maps no shard and is skipped; verification must still run.
    assert tasks["verify_features"]["trigger_rule"] == "none_failed"


def test_without_a_gpu_queue_every_task_uses_the_default_queue_and_pool(report: dict[str, Any]) -> None:
    """With no CNN_FEATURES_GPU_QUEUE (LocalExecutor, CPU-only Celery) no task names a queue or pool that may not exist."""
    tasks = report["dags"]["cnn_feature_extraction"]["tasks"]
    assert {t["queue"] for t in tasks.values()} == {"default"}
    assert {t["pool"] for t in tasks.values()} == {"default_pool"}


def test_gpu_shards_go_to_the_gpu_queue_and_pool(tmp_path: Path) -> None:
    """With CNN_FEATURES_GPU_QUEUE/POOL set, extract_shard_gpu is on that queue and pool, and every other task on the default ones."""
    tasks = _load(tmp_path, CNN_FEATURES_GPU_QUEUE="gpu-a100", CNN_FEATURES_GPU_POOL="a100s")["dags"]["cnn_feature_extraction"]["tasks"]
    assert (tasks["extract_shard_gpu"]["queue"], tasks["extract_shard_gpu"]["pool"]) == ("gpu-a100", "a100s")
    others = {name: (t["queue"], t["pool"]) for name, t in tasks.items() if name != "extract_shard_gpu"}
    assert set(others.values()) == {("default", "default_pool")}, others


def test_params_have_titles_and_descriptions(report: dict[str, Any]) -> None:
    """Every trigger-form param explains itself."""
    params = report["dags"]["cnn_feature_extraction"]["params"]
    assert set(params) == {"datasets", "device", "shard_size", "model_path", "aws_conn_id", "max_bad_fraction"}
    for name, p in params.items():
        assert p["title"] and p["description"], name


def test_dag_files_import_only_light_modules() -> None:
    """The DAG sources import TensorFlow/Keras nowhere at module level."""
    for path in DAGS.glob("*.py"):
        top = [line for line in path.read_text().splitlines() if line.startswith(("import ", "from "))]
        assert not [line for line in top if "tensorflow" in line or "keras" in line], path


def test_the_trigger_forms_schema_refuses_a_bad_datasets_value_before_a_run(report: dict[str, Any]) -> None:
    """The datasets Param's JSON schema, which the trigger form and REST apply before a run exists, refuses relative paths, missing keys and unknown layouts."""
    verdicts = report["datasets_form"]
    assert verdicts.pop("local and s3") == "accepted"
    for name, verdict in verdicts.items():
        assert verdict.startswith("refused: "), (name, verdict)
    assert "does not match" in verdicts["relative input"] and "'output' is a required property" in verdicts["no output"]
    assert "savee" in verdicts["unknown dataset"]
