"""The environment and command lines of fresh child processes."""

from __future__ import annotations

import platform

import pytest

from cnn_features import procs


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN is turned on only on x86-64")
def test_children_run_convolutions_through_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    """On x86-64 every child gets TF_ENABLE_ONEDNN_OPTS=1, whatever CPU TensorFlow would pick it for."""
    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    assert procs.child_env("cpu")["TF_ENABLE_ONEDNN_OPTS"] == "1"
    assert procs.child_env("gpu")["TF_ENABLE_ONEDNN_OPTS"] == "1"


def test_a_deployment_can_turn_onednn_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A value the deployment set itself is passed on unchanged."""
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    assert procs.child_env("cpu")["TF_ENABLE_ONEDNN_OPTS"] == "0"


def test_cpu_children_never_see_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU child has CUDA hidden; a GPU child does not."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert procs.child_env("cpu")["CUDA_VISIBLE_DEVICES"] == "-1"
    assert procs.child_env("gpu").get("CUDA_VISIBLE_DEVICES") != "-1"

