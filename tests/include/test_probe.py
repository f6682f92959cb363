"""The GPU probe runs in a fresh process and never fails the DAG."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cnn_features.faults import ENV_VAR
from cnn_features.probe import run_probe
from tests.stub_cuda import build_stub_driver

REPORT_KEYS = {
    "usable", "device_name", "memory_total_mb", "driver_version", "cuda_version",
    "cudnn_version", "framework", "framework_version", "precision", "error", "elapsed_s",
}


def test_probe_reports_no_gpu_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine without a usable GPU the probe says so, with versions and the error text."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    report = run_probe(timeout_s=120)
    assert set(report) >= REPORT_KEYS
    if report["usable"]:
        pytest.skip(f"a usable GPU is present ({report['device_name']}); the no-GPU path cannot be seen")
    assert report["error"]
    assert report["framework"] == "tensorflow" and report["framework_version"]


def test_hanging_probe_means_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe child that hangs is killed at the time limit and reported as no usable GPU."""
    monkeypatch.setenv(ENV_VAR, "probe_hang")
    started = time.monotonic()
    report = run_probe(timeout_s=3)
    assert time.monotonic() - started < 30
    assert report["usable"] is False
    assert "did not finish within 3 s" in report["error"]


def test_crashing_probe_means_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe child that aborts is reported as no usable GPU, naming the signal."""
    monkeypatch.setenv(ENV_VAR, "probe_crash")
    report = run_probe(timeout_s=60)
    assert report["usable"] is False
    assert "killed by signal 6" in report["error"]


def test_probe_names_the_configured_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The report names the Keras backend it checked and the precision GPU shards would run at."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("CNN_FEATURES_KERAS_BACKEND", "jax")
    report = run_probe(timeout_s=120)
    assert report["framework"] == "jax" and report["framework_version"]
    assert report["precision"] == "float32"


@pytest.mark.parametrize(("backend", "words"), [("tensorflow", "tensorflow[and-cuda]"), ("jax", "jax[cuda13]")])
def test_driver_with_cpu_only_build_says_how_to_fix(
    backend: str, words: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """With a driver present but a CPU-only build of the backend, the report and the task log say exactly that and how to fix it."""
    stub = build_stub_driver(tmp_path / "driver")
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("LD_LIBRARY_PATH", str(stub))
    monkeypatch.setenv("CNN_FEATURES_KERAS_BACKEND", backend)
    report = run_probe(timeout_s=120)
    if report["usable"]:
        pytest.skip(f"a real GPU build of {backend} is installed here")
    assert report["driver_found"] is True
    assert (report["device_name"], report["device_count"], report["driver_version"]) == ("Stub GPU", 1, "13.0")
    assert f"NVIDIA driver 13.0 and 1 GPU(s) found, but {backend} cannot use them" in report["error"]
    assert "Fix:" in report["error"] and words in report["fix"]
    logged = [r.getMessage() for r in caplog.records if r.name == "cnn_features.probe" and r.levelname == "WARNING"]
    assert any("cannot use them" in m and report["fix"] in m for m in logged), logged
