"""The code base passes ruff with the project's rules (pyproject.toml), Airflow's AIR rules included."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_ruff_check_is_clean() -> None:
    """`ruff check` finds nothing in dags/, include/, plugins/, scripts/, bench/ and tests/."""
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        found = shutil.which("ruff")
        if found is None:
            pytest.skip("ruff is not installed (scripts/setup.sh installs it from requirements.txt)")
        ruff = Path(found)
    proc = subprocess.run([str(ruff), "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
