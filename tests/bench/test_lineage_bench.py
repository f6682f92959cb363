"""The lineage benchmark's smoke mode: both stage modes measured, and the two re-runs reuse every feature."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from tests.bench import smoke_report

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "lineage.py"
sys.path.insert(0, str(REPO))

from bench.extraction import SMOKE_NOTE  # noqa: E402
from bench.lineage import SMOKE_COUNTS  # noqa: E402


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return smoke_report(SCRIPT, tmp_path_factory.mktemp("bench-lineage"))


def test_both_modes_extract_every_file_and_the_ratio_is_theirs(report: dict[str, Any]) -> None:
    """Each shard is run with and without lineage, each run extracting all its files; the ratio is the pairs' median."""
    files = sum(SMOKE_COUNTS.values())
    assert report["files"] == files
    for mode in ("without lineage", "with lineage"):
        runs = report["rounds"][mode]
        assert len(runs) == report["pairs"] == 2
        assert sum(r["files"] for r in runs) == files and all(r["skipped"] == 0 and r["files_per_s"] > 0 for r in runs)
    pairs = [w["files_per_s"] / wo["files_per_s"] for w, wo in zip(report["rounds"]["with lineage"], report["rounds"]["without lineage"], strict=True)]
    assert report["pair_ratios"] == pytest.approx(pairs)
    assert report["ratio"] == pytest.approx(sorted(pairs)[0] + (sorted(pairs)[1] - sorted(pairs)[0]) / 2)
    assert report["first_run"]["files"] == files


def test_the_reruns_reuse_everything_hashing_inputs_only_when_their_stat_changed(report: dict[str, Any]) -> None:
    """Unchanged: every feature reused, no input hashed. Every mtime changed: every input hashed, still nothing redone."""
    files = sum(SMOKE_COUNTS.values())
    assert (report["rerun"]["skipped"], report["rerun"]["files"], report["rerun"]["inputs_hashed"]) == (files, 0, 0)
    touched = report["rerun_touched"]
    assert (touched["skipped"], touched["files"], touched["inputs_hashed"]) == (files, 0, files)


def test_the_smoke_table_judges_no_target(report: dict[str, Any]) -> None:
    """A smoke run says what it is and leaves its targets unjudged."""
    assert report["stdout"].startswith(SMOKE_NOTE)
    assert "not judged (smoke run)" in report["stdout"] and "NOT met" not in report["stdout"]
