"""The local Airflow launcher's settings (scripts/airflow_local.py), without starting Airflow."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "airflow_local.py"


@pytest.fixture(scope="module")
def launcher() -> ModuleType:
    spec = importlib.util.spec_from_file_location("airflow_local", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["airflow_local"] = module
    spec.loader.exec_module(module)
    return module


def test_parallelism_is_sized_to_the_machine_not_airflows_32(launcher: ModuleType, tmp_path: Path) -> None:
    """The stack's task slots (LocalExecutor workers) follow the usable cores, at least 4; a deployment's own value wins."""
    cores = len(os.sched_getaffinity(0))
    env = launcher.airflow_env(home=tmp_path, port=8080, base={"PATH": "/usr/bin"})
    assert env["AIRFLOW__CORE__PARALLELISM"] == str(max(4, 2 * cores))
    assert int(env["AIRFLOW__CORE__PARALLELISM"]) < 32 or cores >= 16
    own = launcher.airflow_env(home=tmp_path, port=8080, base={"PATH": "/usr/bin", "AIRFLOW__CORE__PARALLELISM": "7"})
    assert own["AIRFLOW__CORE__PARALLELISM"] == "7"
