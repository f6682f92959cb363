"""Progress read side: a run's shards, datasets, rates and ETA from plan.json and shard records."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cnn_features.progress import ProgressLog, run_folder, write_plan
from cnn_features.progress_report import (
    ProgressNotFound,
    combined_state,
    find_run,
    format_duration,
    format_run,
    history_text,
    list_runs,
    load_run,
    read_records,
    state_text,
    to_dict,
)

RUN_ID = "manual__2026-01-01T00:00:00+00:00"


def shard(dataset: str, index: int, count: int, files: int) -> dict[str, Any]:
    """A plan entry as plan_shards makes it (only the fields progress uses)."""
    return {
        "shard_id": f"{dataset}-{index:04d}",
        "label": f"{dataset} {index}/{count}",
        "dataset": dataset,
        "files": [f"f{i}.npy" for i in range(files)],
        "output": f"/out/{dataset}",
    }


@pytest.fixture
def run(tmp_path: Path) -> dict[str, Any]:
    """A run of three shards: one finished, one half done on CPU after a GPU failure, one not started."""
    folder = run_folder(tmp_path, RUN_ID)
    shards = [shard("ravdess", 1, 2, 10), shard("ravdess", 2, 2, 10), shard("crema_d", 1, 1, 20)]
    write_plan(folder, RUN_ID, shards)
    lines = [
        {"state": "running", "device": "cpu", "done": 0, "files_per_s": 0.0, "fallback_reason": None, "ts": 1000.0},
        {"state": "running", "device": "cpu", "done": 6, "extracted": 6, "skipped": 0, "bad": 0, "files_per_s": 3.0, "ts": 1002.0},
        {"state": "success", "device": "cpu", "done": 10, "extracted": 9, "skipped": 0, "bad": 1, "files_per_s": 3.5, "ts": 1004.0},
    ]
    half = [
        {"state": "running", "device": "gpu", "done": 0, "files_per_s": 0.0, "fallback_reason": None, "ts": 1005.0},
        {"state": "running", "device": "cpu", "done": 4, "extracted": 4, "skipped": 0, "bad": 0, "files_per_s": 2.0,
         "fallback_reason": "GPU worker killed by signal 9", "ts": 1010.0},
    ]
    for spec, records in ((shards[0], lines), (shards[1], half)):
        path = folder / f"{spec['shard_id']}.jsonl"
        path.write_text("".join(json.dumps({"shard_id": spec["shard_id"], "label": spec["label"], "dataset": spec["dataset"],
                                            "total": len(spec["files"]), **r}) + "\n" for r in records))
    return {"root": tmp_path, "folder": folder, "shards": shards}


def test_shards_show_state_counts_device_and_fallback(run: dict[str, Any]) -> None:
    """Each shard shows its last record's state, done/total, device and the reason it fell back to CPU."""
    progress = load_run(run["folder"])
    by_id = {s.shard_id: s for s in progress.shards}
    finished, half, waiting = by_id["ravdess-0001"], by_id["ravdess-0002"], by_id["crema_d-0001"]
    assert (finished.state, finished.done, finished.total, finished.bad, finished.eta_s) == ("success", 10, 10, 1, 0.0)
    assert (half.state, half.done, half.total, half.device) == ("running", 4, 10, "cpu")
    assert half.fallback_reason == "GPU worker killed by signal 9"
    assert half.eta_s == pytest.approx(3.0)  # 6 files left at 2 files/s
    assert (waiting.state, waiting.done, waiting.total, waiting.device, waiting.eta_s) == ("pending", 0, 20, None, None)
    assert half.attempts == 1 and waiting.attempts == 0


def test_run_and_datasets_sum_their_shards(run: dict[str, Any]) -> None:
    """Datasets and the run add up their shards; the run rate is files extracted per second some shard worked, and gives the ETA."""
    progress = load_run(run["folder"])
    assert progress.run_id == RUN_ID
    assert [(d.name, d.done, d.total, d.state) for d in progress.datasets] == [
        ("ravdess", 14, 20, "running"),
        ("crema_d", 0, 20, "pending"),
    ]
    assert (progress.done, progress.total, progress.state) == (14, 40, "running")
    # Shards worked 1000-1004 and 1005-1010: 9 s, not the 10 s between the first and last record.
    assert progress.busy_s == pytest.approx(9.0)
    assert progress.files_per_s == pytest.approx(13 / 9, abs=1e-3)
    assert progress.eta_s == pytest.approx(26 / (13 / 9))
    assert progress.updated == 1010.0


def test_throughput_samples_follow_the_records_in_time(run: dict[str, Any]) -> None:
    """Chart samples are the worker records, in time order, in seconds since the run's first record."""
    samples = load_run(run["folder"]).samples
    assert [(s.t, s.shard_id, s.done, s.files_per_s) for s in samples] == [
        (2.0, "ravdess-0001", 6, 3.0),
        (4.0, "ravdess-0001", 10, 3.5),
        (10.0, "ravdess-0002", 4, 2.0),
    ]


def test_failed_shard_keeps_its_counts_and_error(run: dict[str, Any]) -> None:
    """A failure record has no counts: the shard keeps the last counts and shows the error."""
    spec = run["shards"][1]
    ProgressLog(run["folder"], spec).write(state="failed", device="cpu", fallback_reason=None,
                                           error="shard ravdess-0002 (ravdess) failed on CPU: cannot write")
    progress = load_run(run["folder"])
    failed = next(s for s in progress.shards if s.shard_id == "ravdess-0002")
    assert (failed.state, failed.done, failed.eta_s) == ("failed", 4, None)
    assert failed.error is not None and "cannot write" in failed.error
    assert progress.datasets[0].state == "failed"


def test_a_cleared_shard_counts_as_a_new_attempt(run: dict[str, Any]) -> None:
    """A shard run again after clearing starts a new attempt; its standing is the new attempt's."""
    spec = run["shards"][1]
    log = ProgressLog(run["folder"], spec)
    log.write(state="failed", device="cpu", fallback_reason=None, error="boom")
    log.write(state="running", device="cpu", done=0, files_per_s=0.0, fallback_reason=None)
    log.write(state="running", device="cpu", done=7, extracted=3, skipped=4, bad=0, files_per_s=5.0)
    again = next(s for s in load_run(run["folder"]).shards if s.shard_id == "ravdess-0002")
    assert (again.state, again.done, again.attempts, again.skipped, again.error) == ("running", 7, 2, 4, None)


def test_half_written_lines_are_skipped(tmp_path: Path) -> None:
    """A line being appended (not yet whole JSON) is skipped, not fatal."""
    path = tmp_path / "s.jsonl"
    path.write_text('{"state": "running", "done": 1}\n{"state": "runn')
    assert read_records(path) == [{"state": "running", "done": 1}]
    assert read_records(tmp_path / "missing.jsonl") == []


def test_combined_state() -> None:
    """A group runs while any shard runs or some but not all wait; fails only when none is left to run."""
    assert combined_state(["pending", "pending"]) == "pending"
    assert combined_state(["success", "pending"]) == "running"
    assert combined_state(["failed", "running"]) == "running"
    assert combined_state(["failed", "success"]) == "failed"
    assert combined_state(["success", "success"]) == "success"


def test_runs_are_listed_newest_first_and_found_by_id(tmp_path: Path) -> None:
    """Runs list newest first; a run id finds its folder; an unknown run or empty root says so."""
    with pytest.raises(ProgressNotFound, match="no progress records under"):
        find_run(tmp_path, None)
    write_plan(run_folder(tmp_path, "old"), "old", [shard("ravdess", 1, 1, 3)])
    write_plan(run_folder(tmp_path, RUN_ID), RUN_ID, [shard("ravdess", 1, 1, 3), shard("crema_d", 1, 1, 4)])
    runs = list_runs(tmp_path)
    assert [(r.run_id, r.shards, r.files) for r in runs] == [(RUN_ID, 2, 7), ("old", 1, 3)]
    assert find_run(tmp_path, None) == run_folder(tmp_path, RUN_ID)
    assert find_run(tmp_path, "old") == run_folder(tmp_path, "old")
    with pytest.raises(ProgressNotFound, match="'nope'"):
        find_run(tmp_path, "nope")


def test_plots_are_listed_when_written(run: dict[str, Any]) -> None:
    """Plots in the run's plots/ folder are listed, in page order, and serialise by name."""
    assert load_run(run["folder"]).plots == ()
    (run["folder"] / "plots").mkdir()
    for name in ("throughput.png", "pca.png", "other.png"):
        (run["folder"] / "plots" / name).write_bytes(b"png")
    progress = load_run(run["folder"])
    assert [p.name for p in progress.plots] == ["pca.png", "throughput.png"]
    data = json.loads(json.dumps(to_dict(progress)))
    assert data["plots"] == ["pca.png", "throughput.png"]
    assert data["datasets"][0]["shards"][0]["label"] == "ravdess 1/2"


def test_terminal_table_shows_every_shard(run: dict[str, Any]) -> None:
    """The terminal table names each shard with state, done/total, files/s, ETA, device and fallback reason."""
    text = format_run(load_run(run["folder"]), now=1015.0)
    assert "run manual__2026-01-01T00:00:00+00:00: running, 14/40 files" in text
    assert "last record 5s ago" in text
    lines = {line.split()[0] + " " + line.split()[1]: line for line in text.splitlines() if line.startswith("  ") and "/" in line}
    assert "success" in lines["ravdess 1/2"] and "10/10" in lines["ravdess 1/2"]
    assert "4/10" in lines["ravdess 2/2"] and "CPU (fallback: GPU worker killed by signal 9)" in lines["ravdess 2/2"]
    assert "pending" in lines["crema_d 1/1"] and "0/20" in lines["crema_d 1/1"]


def test_durations_read_like_a_clock() -> None:
    """Durations print as 42s, 3m05s, 1h02m; unknown as '-'."""
    assert [format_duration(s) for s in (42, 185, 3720, None)] == ["42s", "3m05s", "1h02m", "-"]


def test_progress_command_prints_the_newest_run(run: dict[str, Any]) -> None:
    """`python -m cnn_features progress` prints the newest run's table; --json its data; a missing run exits 2."""
    env = {"CNN_FEATURES_HOME": str(run["root"].parent / "home"), "PATH": "/usr/bin:/bin"}
    (run["root"].parent / "home").mkdir()
    (run["root"].parent / "home" / "progress").symlink_to(run["root"])
    cmd = [sys.executable, "-m", "cnn_features", "progress"]
    table = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "ravdess 2/2" in table.stdout and "4/10" in table.stdout
    data = subprocess.run([*cmd, RUN_ID, "--json"], env=env, capture_output=True, text=True, check=False, timeout=60)
    assert json.loads(data.stdout)["done"] == 14
    missing = subprocess.run([*cmd, "nope"], env=env, capture_output=True, text=True, check=False, timeout=60)
    assert missing.returncode == 2 and "no progress records for run 'nope'" in missing.stderr


def finish(run: dict[str, Any], *, skipped: bool = False) -> None:
    """Append a success record to every shard of the ``run`` fixture."""
    for spec in run["shards"]:
        total = len(spec["files"])
        extracted, skip = (0, total) if skipped else (total, 0)
        ProgressLog(run["folder"], spec).write(
            state="success", device="cpu", fallback_reason=None, done=total, extracted=extracted, skipped=skip, bad=0,
            files_per_s=0.0 if skipped else 4.0, elapsed_s=1.0,
        )


def test_a_run_whose_verification_failed_is_failed_everywhere(run: dict[str, Any]) -> None:
    """Every shard done but verification failed: the run, the terminal line, the JSON and the page say failed; the command exits 1."""
    from cnn_features.progress import write_verification

    finish(run)
    progress = load_run(run["folder"])
    assert (progress.state, progress.verification) == ("verifying", "pending")
    assert load_run(run["folder"], dag_state="failed").state == "failed"
    write_verification(
        run["folder"], passed=False, problems=["ravdess: 1 of 20 inputs are bad (5.0%), above max_bad_fraction 0.0%"],
        datasets={"ravdess": {"passed": False, "bad_inputs": 1, "ignored": 2}, "crema_d": {"passed": True, "bad_inputs": 0}},
    )
    progress = load_run(run["folder"])
    assert (progress.state, progress.verification, progress.bad) == ("failed", "failed", 1)
    assert progress.error is not None and "1 of 20 inputs are bad" in progress.error
    assert [(d.name, d.state) for d in progress.datasets] == [("ravdess", "failed"), ("crema_d", "success")]
    assert to_dict(progress)["state"] == "failed"
    text = format_run(progress, now=2000.0)
    assert text.startswith(f"run {RUN_ID}: failed, 40/40 files (40 extracted, 0 skipped, 1 bad, 0 ignored)")
    assert "verification: failed" in text

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins"))
    try:
        import cnn_progress_page
    finally:
        sys.path.pop(0)
    page = cnn_progress_page.render_run(progress, base="/", now=2000.0)
    assert 'id="run-state" data-state="failed"' in page and 'data-bad="1"' in page and "state-success" in page  # crema_d only
    assert "1 of 20 inputs are bad" in page

    home = run["root"] / "cli-home"
    home.mkdir()
    (home / "progress").symlink_to(run["root"])
    env = {"CNN_FEATURES_HOME": str(home), "PATH": "/usr/bin:/bin"}
    shown = subprocess.run([sys.executable, "-m", "cnn_features", "progress", RUN_ID], env=env, capture_output=True,
                           text=True, check=False, timeout=60)
    assert shown.returncode == 1 and f"run {RUN_ID}: failed" in shown.stdout, shown.stderr

    write_verification(run["folder"], passed=True, problems=[], datasets={})
    assert load_run(run["folder"]).state == "success"


def test_ignored_counts_come_from_the_plan(tmp_path: Path) -> None:
    """Files ignored by the plan (not .npy) are counted per dataset and for the run."""
    folder = run_folder(tmp_path, "r")
    write_plan(folder, "r", [{**shard("ravdess", 1, 1, 3), "ignored_count": 2}])
    progress = load_run(folder)
    assert (progress.ignored, progress.datasets[0].ignored) == (2, 2)


def test_a_raised_shard_size_is_noted_on_the_run_page(tmp_path: Path) -> None:
    """The plan's note (shard size raised to fit core.max_map_length) reaches the run and its page; a plan without one shows none."""
    folder = run_folder(tmp_path, "r")
    note = "shard_size raised from 10 to 977: ... (core.max_map_length)"
    write_plan(folder, "r", [shard("ravdess", 1, 1, 3)], note=note)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins"))
    try:
        import cnn_progress_page
    finally:
        sys.path.pop(0)
    assert load_run(folder).note == note
    assert '<p class="muted" id="run-note">shard_size raised from 10 to 977' in cnn_progress_page.render_run(load_run(folder), base="/")
    write_plan(folder, "r", [shard("ravdess", 1, 1, 3)])
    assert load_run(folder).note is None and "run-note" not in cnn_progress_page.render_run(load_run(folder), base="/")


def test_every_run_is_listed_with_its_state_and_a_plan_error(tmp_path: Path) -> None:
    """The run list shows each run's state; a run whose plan failed shows the error; Airflow's runs without records are listed."""
    from cnn_features.progress import write_plan_error

    write_plan(run_folder(tmp_path, "ok"), "ok", [shard("ravdess", 1, 1, 3)])
    write_plan_error(run_folder(tmp_path, "bad-conf"), "bad-conf", "shard_size: expected an integer from 1 to 100000, got -1")
    runs = {r.run_id: r for r in list_runs(tmp_path, dag_runs={"ok": ("running", 5.0), "early": ("failed", 9.0)})}
    assert (runs["ok"].state, runs["ok"].error) == ("pending", None)
    assert runs["bad-conf"].state == "failed" and "shard_size" in str(runs["bad-conf"].error)
    assert runs["early"].state == "failed" and "no plan recorded" in str(runs["early"].error)
    with pytest.raises(ProgressNotFound):
        find_run(tmp_path, "early")
    assert load_run(run_folder(tmp_path, "bad-conf")).state == "failed"


def test_a_rerun_that_skips_every_file_shows_skipped_not_a_zero_rate(run: dict[str, Any]) -> None:
    """Shards that skipped every file show them in a skipped column and '-' for files/s, not 0.0."""
    from cnn_features.progress_report import rate_text

    for spec in run["shards"]:
        (run["folder"] / f"{spec['shard_id']}.jsonl").unlink(missing_ok=True)
    finish(run, skipped=True)
    progress = load_run(run["folder"])
    assert all(rate_text(s) == "-" and s.skipped == s.total for s in progress.shards)
    text = format_run(progress, now=2000.0)
    assert "skipped" in text.splitlines()[3]
    row = next(line for line in text.splitlines() if line.startswith("  ravdess 1/2"))
    assert row.split()[4:7] == ["10", "0", "-"]  # skipped, bad, files/s


def test_the_gpu_probe_report_is_shown_with_its_fix(run: dict[str, Any]) -> None:
    """A driver with a CPU-only build: the terminal and the page show the probe's error and its fix, and nothing outside PROBE_FIELDS is kept."""
    from cnn_features.probe import _GPU_BUILD_FIX
    from cnn_features.progress import PROBE_NAME, write_probe

    assert load_run(run["folder"]).probe is None
    assert "GPU: not probed yet" in format_run(load_run(run["folder"]), now=2000.0)
    fix = _GPU_BUILD_FIX["tensorflow"]
    error = (
        "NVIDIA driver 580.159.04 and 1 GPU(s) found, but tensorflow cannot use them: "
        f"TensorFlow 2.21.0 is a CPU-only build (tensorflow-cpu). Fix: {fix}"
    )
    write_probe(run["folder"], {
        "usable": False, "driver_found": True, "framework": "tensorflow", "framework_version": "2.21.0",
        "error": error, "fix": fix, "elapsed_s": 3.2, "environ": {"AWS_SECRET_ACCESS_KEY": "s3cr3t"},
    })
    assert "s3cr3t" not in (run["folder"] / PROBE_NAME).read_text()
    progress = load_run(run["folder"])
    assert progress.probe is not None and progress.probe["fix"] == fix and to_dict(progress)["probe"]["usable"] is False
    text = format_run(progress, now=2000.0)
    assert "GPU: not usable, shards run on CPU: NVIDIA driver 580.159.04 and 1 GPU(s) found" in text
    assert "CPU-only build" in text and f"GPU fix: {fix}" in text and text.count(fix) == 1

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins"))
    try:
        import cnn_progress_page
    finally:
        sys.path.pop(0)
    page = cnn_progress_page.render_run(progress, base="/", now=2000.0)
    assert 'id="run-gpu" data-usable="no"' in page and "CPU-only build (tensorflow-cpu)" in page
    assert 'id="run-gpu-fix"' in page and "CNN_FEATURES_GPU=1 bash scripts/setup.sh" in page
    assert page.index('id="run-gpu"') < page.index('class="dataset"')  # above the shards

    write_probe(run["folder"], {"usable": True, "device_name": "NVIDIA H200", "memory_total_mb": 143771,
                                "framework": "jax", "framework_version": "0.11.2", "error": None})
    progress = load_run(run["folder"])
    assert "GPU: usable: NVIDIA H200, 143771 MiB (jax 0.11.2)" in format_run(progress, now=2000.0)
    page = cnn_progress_page.render_run(progress, base="/", now=2000.0)
    assert 'data-usable="yes"' in page and "NVIDIA H200" in page and 'id="run-gpu-fix"' not in page


# The one-line reason a try of the broken shard fails with, as the runner records it.
CANNOT_WRITE = (
    "shard ravdess-0002 (ravdess) failed on CPU: cannot write features under /out/ravdess: "
    "Operation not permitted (errno 1) in Actor_09/"
)


def try_records(log: ProgressLog, try_number: int, *, ts: float, fail: bool, max_tries: int = 3) -> None:
    """Append one Airflow try of a shard: its start, one batch, and its end (failed or done)."""
    tries = {"try_number": try_number, "max_tries": max_tries, "retry_delay_s": 30.0}
    log.path.open("a").write("".join(json.dumps({**log.base, **tries, **r}) + "\n" for r in (
        {"state": "running", "device": "cpu", "done": 0, "files_per_s": 0.0, "fallback_reason": None, "ts": ts},
        {"state": "running", "device": "cpu", "done": 10, "extracted": 4, "skipped": 6, "bad": 0, "files_per_s": 2.0, "ts": ts + 2},
        {"state": "failed", "device": "cpu", "fallback_reason": None, "error": CANNOT_WRITE + "\nTraceback ...", "ts": ts + 4}
        if fail else
        {"state": "success", "device": "cpu", "done": 10, "extracted": 4, "skipped": 6, "bad": 0, "files_per_s": 2.0, "ts": ts + 4},
    )))


def broken_shard(
    run: dict[str, Any], tries: list[bool], *, max_tries: int = 3, dag_state: str | None = None
) -> tuple[Any, Any]:
    """Record the tries of shard ravdess 2/2 (True: the try failed) 40 s apart; return the run and that shard."""
    log = ProgressLog(run["folder"], run["shards"][1])
    log.path.unlink()
    for number, fail in enumerate(tries, start=1):
        try_records(log, number, ts=2000.0 + 40 * (number - 1), fail=fail, max_tries=max_tries)
    progress = load_run(run["folder"], dag_state=dag_state)
    return progress, next(s for s in progress.shards if s.shard_id == "ravdess-0002")


def test_a_failed_try_with_tries_left_is_retrying_not_failed(run: dict[str, Any]) -> None:
    """Try 1 of 3 failed: the shard, its dataset and the run read "retrying (try 2 of 3, next in …)", never "failed"."""
    progress, shard = broken_shard(run, [True])
    assert (shard.state, shard.try_number, shard.max_tries, shard.retry_at) == ("retrying", 1, 3, 2034.0)
    assert state_text(shard, now=2014.0) == "retrying (try 2 of 3, next in 20s)"
    assert state_text(shard, now=2040.0) == "retrying (try 2 of 3, due now)"
    assert [d.state for d in progress.datasets] == ["retrying", "pending"]
    assert progress.state == "running"  # crema_d has not started: the run goes on
    text = format_run(progress, now=2014.0)
    assert "retrying (try 2 of 3, next in 20s)" in text and "last error: " + CANNOT_WRITE in text
    assert " failed" not in text.split("\n")[0]
    assert combined_state(["success", "retrying"]) == "retrying"


def test_the_last_try_failing_is_failed(run: dict[str, Any]) -> None:
    """Try 3 of 3 failed: the shard is failed, and its history says all three tries failed and why."""
    progress, shard = broken_shard(run, [True, True, True])
    assert (shard.state, shard.retry_at) == ("failed", None)
    assert progress.datasets[0].state == "failed"
    assert history_text(shard) == "failed ×3: " + CANNOT_WRITE


def test_a_run_airflow_marked_failed_has_no_retrying_shard(run: dict[str, Any]) -> None:
    """When Airflow says the DAG run failed, a shard that still had tries left reads failed: no try is coming."""
    progress, shard = broken_shard(run, [True], dag_state="failed")
    assert (shard.state, progress.state) == ("failed", "failed")
    assert progress.verification == "not run"  # the run failed before verify_features could say


def test_a_repaired_shard_keeps_the_history_of_its_failed_tries(run: dict[str, Any]) -> None:
    """Three failed tries, then a clear and a 4th try that succeeds: the shard reads success and says what happened before."""
    progress, shard = broken_shard(run, [True, True, True, False], max_tries=6)
    assert (shard.state, shard.attempts, shard.error) == ("success", 4, None)
    assert history_text(shard) == "failed ×3: " + CANNOT_WRITE + "; succeeded on try 4"
    assert "tries: failed ×3" in format_run(progress, now=3000.0)


def test_a_gpu_fallback_is_kept_in_the_history(run: dict[str, Any]) -> None:
    """A try whose GPU worker failed and whose CPU re-run succeeded says so in the history, even as its only try."""
    _, shard = broken_shard(run, [])
    ProgressLog(run["folder"], run["shards"][1]).write(state="running", device="gpu", done=0, files_per_s=0.0, fallback_reason=None)
    ProgressLog(run["folder"], run["shards"][1]).write(
        state="success", device="cpu", done=10, extracted=10, skipped=0, bad=0, files_per_s=5.0,
        fallback_reason="GPU worker failed at CUDA initialisation: CUDA_ERROR_NOT_INITIALIZED",
    )
    shard = next(s for s in load_run(run["folder"]).shards if s.shard_id == "ravdess-0002")
    assert history_text(shard) == (
        "succeeded on try 1 (re-run on CPU: GPU worker failed at CUDA initialisation: CUDA_ERROR_NOT_INITIALIZED)"
    )


def test_the_run_rate_leaves_out_retry_waits(run: dict[str, Any]) -> None:
    """Files/s counts only the seconds shards worked: three 4 s tries 40 s apart are 12 s of work, not 84 s of wall time."""
    for spec in run["shards"][:1]:
        (run["folder"] / f"{spec['shard_id']}.jsonl").unlink()
    progress, _ = broken_shard(run, [True, True, False], max_tries=3)
    assert progress.busy_s == pytest.approx(12.0)
    assert progress.files_per_s == pytest.approx(12 / 12.0)  # each try extracted 4 files


def test_the_page_shows_retrying_failed_and_repaired_as_the_terminal_does(run: dict[str, Any]) -> None:
    """The progress page's shard row says retrying with the next try, then failed, then the repaired history; its rate says what it counts."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins"))
    try:
        import cnn_progress_page
    finally:
        sys.path.pop(0)

    def row(page: str) -> str:
        return next(part for part in page.split("<tr ") if 'data-shard-id="ravdess-0002"' in part)

    progress, _ = broken_shard(run, [True])
    page = cnn_progress_page.render_run(progress, base="/", now=2014.0)
    assert 'data-state="retrying"' in row(page) and "retrying (try 2 of 3, next in 20s)" in row(page)
    assert 'class="state state-failed"' not in page and 'http-equiv="refresh"' in page
    progress, _ = broken_shard(run, [True, True, True])
    assert 'data-state="failed"' in row(cnn_progress_page.render_run(progress, base="/", now=2200.0))
    progress, _ = broken_shard(run, [True, True, True, False], max_tries=6)
    page = cnn_progress_page.render_run(progress, base="/", now=2200.0)
    assert 'data-state="success"' in row(page) and "tries: failed ×3: shard ravdess-0002" in row(page)
    assert "succeeded on try 4" in row(page)
    assert 'id="run-rate-note"' in page and "retry waits and time spent queued are not counted" in page
