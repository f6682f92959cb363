"""The GPU probe runs in a fresh process and never fails the DAG."""

from __future__ import annotations

import time

import pytest

from cnn_features.faults import ENV_VAR
from cnn_features.probe import run_probe

REPORT_KEYS = {
    "usable", "device_name", "memory_total_mb", "driver_version", "cuda_version",
    "cudnn_version", "framework", "framework_version", "error", "elapsed_s",
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
