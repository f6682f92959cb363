"""The benchmark script's smoke mode: every figure measured, every ratio computed from them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.bench import smoke_report

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "extraction.py"
sys.path.insert(0, str(REPO))

from bench.extraction import TARGET_DAG_VS_LIMIT, TARGET_STAGE_VS_LIMIT, ratios, table, task_seconds, targets  # noqa: E402

# Every figure the README and docs/benchmarks.md quote.
FIGURES = (
    "files",
    "corpus_gflop",
    "limit_gflops",
    "model_alone_files_per_s",
    "model_alone_gflops",
    "stage_files_per_s",
    "stage_gflops",
    "stage_shards",
    "worker_startup_s_per_shard",
    "naive_files_per_s",
    "dag_wall_s",
    "dag_gflops",
    "dag_warmup_wall_s",
    "dags_test_wall_s",
    "rss_1x_gib",
    "rss_4x_gib",
    "dag_parse_s",
    "dag_parse_cold_s",
)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One smoke run of the benchmark (tiny corpus, short rounds, the DAG through Airflow)."""
    root = tmp_path_factory.mktemp("bench")
    return smoke_report(SCRIPT, root, "--corpus", "fixed")


def test_smoke_run_measures_every_figure(report: dict[str, Any]) -> None:
    """The JSON holds every figure as a positive number, for the corpus it generated."""
    figures = report["corpora"]["fixed"]["figures"]
    for name in FIGURES:
        assert isinstance(figures[name], int | float) and figures[name] > 0, name
    assert figures["files"] == 48 and figures["rss_files_1x"] == 48 and figures["rss_files_4x"] == 4 * 48
    assert figures["dag_features_written"] == 48 and figures["dags_test_features_written"] == 48
    assert figures["dag_parse_heavy_modules"] == []
    for tasks in (figures["dag_tasks_s"], figures["dags_test_tasks_s"]):
        assert {"probe_gpu", "plan_shards", "extract_shard", "verify_features", "trigger_training"} <= set(tasks)
    assert report["shared"]["blas"]["kernel"], "the BLAS kernel the limit ran on is reported"


def test_ratios_are_computed_from_the_measured_figures(report: dict[str, Any]) -> None:
    """Each ratio in the JSON equals the one recomputed from its figures, and the targets follow from them."""
    result = report["corpora"]["fixed"]
    figures = result["figures"]
    assert result["ratios"] == pytest.approx(ratios(figures))
    assert result["ratios"]["stage_vs_limit"] == pytest.approx(figures["stage_gflops"] / figures["limit_gflops"])
    assert result["ratios"]["stage_vs_naive"] == pytest.approx(figures["stage_files_per_s"] / figures["naive_files_per_s"])
    assert result["targets"] == targets(figures, result["ratios"])


def test_the_table_shows_every_ratio_and_target(report: dict[str, Any]) -> None:
    """The printed table carries the figures, the ratios and a met / NOT met line per target."""
    printed = report["stdout"]
    text = table(report["corpora"], report["shared"])
    for line in ("stage / limit", "DAG / limit", "running Airflow", "airflow dags test", "stage / naive", "peak RSS, 4x corpus", "target: >= 10x naive"):
        assert line in text and line in printed


def test_targets_follow_the_thresholds() -> None:
    """A stage at exactly 85 % of the limit meets its target; just below does not."""
    figures = {
        "limit_gflops": 100.0, "model_alone_gflops": 95.0, "stage_gflops": 100.0 * TARGET_STAGE_VS_LIMIT,
        "dag_gflops": 100.0 * TARGET_DAG_VS_LIMIT - 1, "dag_wall_s": 10.0, "corpus_gflop": 600.0, "dags_test_gflops": 50.0,
        "stage_files_per_s": 300.0, "naive_files_per_s": 30.0, "rss_1x_gib": 1.0, "rss_4x_gib": 1.09,
        "dag_parse_s": 0.2, "dag_parse_heavy_modules": [],
    }
    met = targets(figures, ratios(figures))
    assert met["stage >= 85 % of limit"] and not met["DAG >= 2/3 of limit"] and met[">= 10x naive"]
    assert met["RSS flat 1x -> 4x (<= 10 %)"] and met["peak RSS <= 1.5 GiB"]
    figures["stage_gflops"] -= 0.01
    assert not targets(figures, ratios(figures))["stage >= 85 % of limit"]


def test_task_seconds_are_read_from_dags_test_output() -> None:
    """Start/end lines of `airflow dags test` give each task's seconds, mapped instances summed."""
    lines = [
        "2026-11-25T08:14:39.000000Z [info ] [DAG TEST] starting task_id=probe_gpu map_index=-1 [x]",
        "2026-11-25T08:14:44.500000Z [info ] [DAG TEST] end task task_id=probe_gpu map_index=-1 [x]",
        "2026-11-25T08:14:47.000000Z [info ] [DAG TEST] starting task_id=extract_shard map_index=0 [x]",
        "2026-11-25T08:14:50.000000Z [info ] [DAG TEST] end task task_id=extract_shard map_index=0 [x]",
        "2026-11-25T08:14:50.000000Z [info ] [DAG TEST] starting task_id=extract_shard map_index=1 [x]",
        "2026-11-25T08:14:52.000000Z [info ] [DAG TEST] end task task_id=extract_shard map_index=1 [x]",
    ]
    assert task_seconds(lines) == {"probe_gpu": 5.5, "extract_shard": 5.0}


def test_smoke_tables_say_they_measure_no_target_and_help_hides_internals() -> None:
    """A smoke table says its figures are not measurements and judges no target; --help lists no internal subcommand."""
    from bench.extraction import SMOKE_NOTE, SMOKE_VERDICT

    results = {"fixed": {"figures": {"files": 10}, "ratios": {"dag_vs_limit": 0.007}, "targets": {"DAG >= 66.7 % of limit": False}}}
    smoke = table(results, {"streams": 2, "smoke": True})
    assert smoke.startswith(SMOKE_NOTE) and "NOT met" not in smoke and SMOKE_VERDICT in smoke
    assert "NOT met" in table(results, {"streams": 2})
    shown = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True, timeout=120).stdout
    assert "--smoke" in shown and not any(name in shown for name in ("_matmul", "_model", "_naive", "_parse"))
