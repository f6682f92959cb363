"""The per-backend benchmark's smoke mode: every backend measured through run_shard, JAX's compiles counted."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from tests.bench import smoke_report

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "backends.py"
sys.path.insert(0, str(REPO))

from bench.backends import SMOKE_COUNTS, table  # noqa: E402
from bench.extraction import SMOKE_NOTE  # noqa: E402

pytest.importorskip("jax", reason="the JAX backend (CPU build, requirements.txt) is not installed")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One smoke run on the variable-length corpus under TensorFlow, JAX and (where installed) torch."""
    root = tmp_path_factory.mktemp("bench-backends")
    return smoke_report(SCRIPT, root, "--corpus", "realistic")


def test_every_installed_backend_is_measured_and_compared_with_tensorflow(report: dict[str, Any]) -> None:
    """Each backend extracts every file of the corpus on CPU, with files/s and its ratio to TensorFlow."""
    corpus = report["corpora"]["realistic"]
    files = sum(SMOKE_COUNTS.values())
    assert corpus["files"] == files
    for backend in ("tensorflow", "jax", "jax (cache warm)"):
        run = corpus["runs"][backend]
        assert run["files"] == files and run["files_per_s"] > 0 and run["devices"] == ["cpu"], backend
        assert run["vs_tensorflow"] == pytest.approx(run["files_per_s"] / corpus["runs"]["tensorflow"]["files_per_s"])
    torch = corpus["runs"]["torch"]
    assert "files_per_s" in torch or torch == {"backend": "torch", "skipped": "not installed"}


def test_jax_reports_a_compile_per_clip_length_and_tensorflow_none(report: dict[str, Any]) -> None:
    """JAX compiles at least once per distinct clip length, with its seconds; TensorFlow reports no compiles."""
    corpus = report["corpora"]["realistic"]
    jax = corpus["runs"]["jax"]
    assert jax["compiles"] >= corpus["distinct_lengths"] > 1
    assert jax["compile_s"] > 0
    assert corpus["runs"]["tensorflow"]["compiles"] is None


def test_smoke_output_says_its_figures_are_not_measurements(report: dict[str, Any]) -> None:
    """The smoke run's printed table and JSON say its figures are not measurements; a full table does not."""
    assert report["smoke"] and report["note"] == SMOKE_NOTE
    assert report["stdout"].startswith(SMOKE_NOTE)
    assert "| jax |" in report["stdout"] and "torch" in report["stdout"]
    assert not table(report["corpora"]).startswith(SMOKE_NOTE)
