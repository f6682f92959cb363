"""The GPU check kit's smoke mode on CPU: every step runs or says why not, and the kit needs no TensorFlow, Airflow or boto3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.py"
# Steps that need a GPU and are skipped, saying so, on a machine without one.
GPU_ONLY = ("tf32", "torch")
# Every step the kit records, in order.
STEPS = ("environment", "corpus", "probe", "model", "np_load", "stage", "precision", "fork", "varlen", "tf32", "torch")


def kit_env() -> dict[str, str]:
    """The environment of a kit run: this checkout's package on PYTHONPATH, no test faults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNN_FEATURES_")}
    env["PYTHONPATH"] = str(REPO / "include")
    return env


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One smoke run of the kit (tiny corpus, JAX on CPU)."""
    root = tmp_path_factory.mktemp("gpu_check")
    out = root / "out" / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--work", str(root / "work")],
        env=kit_env(), capture_output=True, text=True, timeout=900, check=False,
    )
    assert out.exists(), proc.stderr[-3000:]
    report = json.loads(out.read_text())
    report["stdout"], report["returncode"] = proc.stdout, proc.returncode
    if report["steps"]["probe"]["report"]["usable"]:
        pytest.skip("a usable GPU is here: run the kit without --smoke (docs/gpu.md)")
    return report


def test_smoke_run_passes_and_records_every_step(report: dict[str, Any]) -> None:
    """Every step is recorded; all pass except the GPU-only ones, skipped with 'no GPU'; a table is printed."""
    assert tuple(report["steps"]) == STEPS
    assert report["passed"] and report["returncode"] == 0, json.dumps(report["steps"], indent=1)[:3000]
    for name in GPU_ONLY:
        assert report["steps"][name]["status"] == "skipped"
        assert report["steps"][name]["reason"].startswith("no GPU")
    assert "GPU check (smoke" in report["stdout"] and "PASSED" in report["stdout"]
    assert "stage_files_per_s" in report["stdout"]


def test_stage_records_backend_and_precision(report: dict[str, Any]) -> None:
    """Each stage shard ran through the runner on JAX in full float32, and says so."""
    stage = report["steps"]["stage"]
    assert stage["device"] == "cpu" and stage["extracted"] == 48
    assert {(s["keras_backend"], s["precision"], s["device"]) for s in stage["shards"]} == {("jax", "float32", "cpu")}
    assert stage["stage_files_per_s"] > 0 and stage["vs_cpu_stage_docs"] > 0


def test_precision_compares_stored_features_with_cpu(report: dict[str, Any]) -> None:
    """The precision step re-extracted stored features on CPU; same-device features agree exactly."""
    compared = report["steps"]["precision"]["float32"]
    assert compared["files"] == 8 and compared["keras_backend"] == "jax"
    assert compared["max_rel_diff"] == 0.0


def test_fork_step_falls_back_to_cpu_on_gpu_init_failure(report: dict[str, Any]) -> None:
    """Without a GPU the CUDA parts are skipped as such; the injected GPU init failure still completes on CPU."""
    parts = report["steps"]["fork"]["parts"]
    for name in ("driver_fork", "jax_fork", "runner_from_cuda_parent"):
        assert parts[name] == {"status": "skipped", "reason": "no GPU"}
    fault = parts["runner_gpu_init_fault"]
    assert fault["device"] == "cpu" and "CUDA_ERROR_NOT_INITIALIZED" in fault["fallback_reason"]
    assert [a["device"] for a in fault["attempts"]] == ["gpu", "cpu"]


def test_varlen_counts_one_compile_per_length(report: dict[str, Any]) -> None:
    """Clips of three lengths compile three times per worker, and both runs give the same features."""
    varlen = report["steps"]["varlen"]
    assert varlen["distinct_lengths"] == 3
    assert [run["compiles"] for run in varlen["runs"]] == [3, 3]
    assert varlen["runs_agree_max_rel_diff"] == 0.0


def test_kit_needs_no_tensorflow_airflow_or_boto3(tmp_path: Path) -> None:
    """The kit, the runner, the worker's imports and the JAX model code load with TensorFlow, Airflow and boto3 blocked."""
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorflow', 'airflow', 'boto3', 'botocore'):\n"
        "            raise ImportError(f'{name} is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import bench.gpu_check, cnn_features.runner, cnn_features.plan, cnn_features.probe\n"
        "import cnn_features.crosscheck, cnn_features.worker, cnn_features.model\n"
        "import keras\n"
        "print(keras.backend.backend())\n"
    )
    env = {**kit_env(), "CNN_FEATURES_KERAS_BACKEND": "jax", "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "jax"


def test_a_hung_forked_child_is_killed_and_reported(tmp_path: Path) -> None:
    """A forked child that never answers is reported as hung after the time limit, and killed."""
    script = (
        "import json, os, time\n"
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "from bench.gpu_check import _wait_child\n"
        "r, w = os.pipe()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    time.sleep(600)\n"
        "    os._exit(0)\n"
        "os.close(w)\n"
        "started = time.monotonic()\n"
        "out = _wait_child(pid, r, 1.0)\n"
        "print(json.dumps({**out, 'waited': time.monotonic() - started}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=kit_env(), capture_output=True, text=True, timeout=60, check=True)
    out = json.loads(done.stdout)
    assert out["outcome"] == "hung" and out["waited"] < 10
