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



def test_children_get_an_allowlist_not_the_parents_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Airflow's JWT secret and database URL are absent in a real child; what Python, TF, JAX, CUDA, boto3 and S3 need passes."""
    import json
    import subprocess
    import sys

    monkeypatch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", "jwt-secret-value")
    monkeypatch.setenv("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "postgresql://u:pw@h/db")
    monkeypatch.setenv("SOME_OTHER_TOKEN", "t")
    kept = {"KERAS_BACKEND": "jax", "XLA_FLAGS": "--x", "JAX_PLATFORMS": "cpu", "NVIDIA_VISIBLE_DEVICES": "0",
            "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:1", "AWS_CA_BUNDLE": "/ca.pem", "HTTPS_PROXY": "http://p:3128",
            "CNN_FEATURES_HOME": "/h", "PYTHONPATH": "/p", "MPLBACKEND": "Agg"}
    for name, value in kept.items():
        monkeypatch.setenv(name, value)
    env = procs.child_env("cpu", {"AWS_SECRET_ACCESS_KEY": "s3-secret"})
    seen = json.loads(subprocess.run(
        [sys.executable, "-c", "import json, os; print(json.dumps(dict(os.environ)))"],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    ).stdout)
    assert not {"AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "SOME_OTHER_TOKEN"} & set(seen)
    assert all(seen[name] == value for name, value in kept.items())
    assert seen["AWS_SECRET_ACCESS_KEY"] == "s3-secret" and seen["CUDA_VISIBLE_DEVICES"] == "-1"
