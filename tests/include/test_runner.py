"""Shards in fresh worker processes: CPU runs, GPU-to-CPU fallback, resume and atomic outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnn_features.errors import ShardFailed
from cnn_features.faults import CUDA_NOT_INITIALIZED, ENV_VAR
from cnn_features.plan import DatasetIO, plan_dataset
from cnn_features.progress import Tries
from cnn_features.runner import choose_device, run_shard, shard_lock
from tests.conftest import GOOD_EXTRA, add_bad_inputs, make_ravdess, read_only

NO_GPU = {"usable": False, "error": "no GPU in tests"}


def shard_for(tmp_path: Path, model: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    (shard,) = plan_dataset(DatasetIO("ravdess", tmp_path / "in", tmp_path / "out"), shard_size=1000)
    return {**shard, "model": model, "batch_size": 4, **kwargs}


def features(out: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(out).as_posix(): np.load(p) for p in sorted(out.rglob("*.npy"))}


def test_choose_device() -> None:
    """auto follows the probe; gpu and cpu are honoured."""
    assert choose_device("auto", NO_GPU)[0] == "cpu"
    assert choose_device("auto", {"usable": True, "device_name": "H100"}) == ("gpu", "probe found a usable GPU (H100)")
    assert choose_device("gpu", NO_GPU)[0] == "gpu"
    assert choose_device("cpu", {"usable": True})[0] == "cpu"


def test_cpu_shard_extracts_every_file(tmp_path: Path, reference_model: dict[str, Any]) -> None:
    """A CPU shard writes one finite float32 256-d vector per input and records its result."""
    rels = make_ravdess(tmp_path / "in", actors=2, emotions=3)
    result = run_shard(shard_for(tmp_path, reference_model), requested_device="auto", probe=NO_GPU)
    assert result["device"] == "cpu" and result["fallback_reason"] is None
    assert (result["extracted"], result["skipped_existing"], result["bad"]) == (6, 0, [])
    out = features(tmp_path / "out")
    assert sorted(out) == rels
    assert all(v.shape == (256,) and v.dtype == np.float32 and np.isfinite(v).all() for v in out.values())
    saved = json.loads((tmp_path / "out" / "_shards" / "ravdess-0001.json").read_text())
    assert saved["extracted"] == 6


def test_gpu_init_failure_falls_back_to_cpu(tmp_path: Path, reference_model: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU child that fails at CUDA init is re-run on CPU; its features match a CPU-only run."""
    make_ravdess(tmp_path / "in", actors=2, emotions=2)
    monkeypatch.setenv(ENV_VAR, "gpu_init_error")
    result = run_shard(shard_for(tmp_path, reference_model), requested_device="gpu", probe={"usable": True})
    assert result["device"] == "cpu"
    assert CUDA_NOT_INITIALIZED in result["fallback_reason"]
    assert [a["device"] for a in result["attempts"]] == ["gpu", "cpu"]
    assert result["attempts"][0]["status"] == "gpu_init_failed"
    assert result["extracted"] == 4

    monkeypatch.delenv(ENV_VAR)
    cpu_only = tmp_path / "cpu_only"
    run_shard(shard_for(tmp_path, reference_model, output=str(cpu_only)), requested_device="cpu", probe=NO_GPU)
    ours, theirs = features(tmp_path / "out"), features(cpu_only)
    assert ours.keys() == theirs.keys()
    for rel in ours:
        np.testing.assert_array_equal(ours[rel], theirs[rel])


def test_gpu_child_killed_mid_shard_resumes_on_cpu(tmp_path: Path, reference_model: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU child SIGKILLed after 4 files: the CPU re-run keeps those 4 and extracts only the rest."""
    make_ravdess(tmp_path / "in", actors=2, emotions=5)
    monkeypatch.setenv(ENV_VAR, "fake_gpu,gpu_die_after=4")
    result = run_shard(shard_for(tmp_path, reference_model), requested_device="gpu", probe=NO_GPU)
    assert result["device"] == "cpu"
    assert "GPU worker killed by signal 9" in result["fallback_reason"]
    assert (result["skipped_existing"], result["extracted"]) == (4, 6)


def test_killed_cpu_shard_leaves_no_partial_file_and_rerun_completes(tmp_path: Path, reference_model: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU worker killed after 4 files fails the shard; only whole files exist; the re-run does the rest."""
    make_ravdess(tmp_path / "in", actors=2, emotions=5)
    monkeypatch.setenv(ENV_VAR, "die_after=4")
    with pytest.raises(ShardFailed, match="killed by signal 9"):
        run_shard(shard_for(tmp_path, reference_model), requested_device="cpu", probe=NO_GPU)
    assert len(features(tmp_path / "out")) == 4
    leftovers = [p.name for p in (tmp_path / "out").rglob(".*") if p.is_file()]
    assert leftovers == [], f"temporary files left visible: {leftovers}"

    monkeypatch.delenv(ENV_VAR)
    result = run_shard(shard_for(tmp_path, reference_model), requested_device="cpu", probe=NO_GPU)
    assert (result["skipped_existing"], result["extracted"]) == (4, 6)


def test_resume_skips_valid_outputs_and_redoes_invalid_ones(tmp_path: Path, reference_model: dict[str, Any]) -> None:
    """Valid features are skipped; a corrupt or missing feature file is recomputed."""
    rels = make_ravdess(tmp_path / "in", actors=2, emotions=3)
    run_shard(shard_for(tmp_path, reference_model), requested_device="cpu", probe=NO_GPU)
    out = tmp_path / "out"
    before = features(out)
    (out / rels[0]).write_bytes(b"garbage")
    (out / rels[1]).unlink()
    mtime = os.stat(out / rels[2]).st_mtime_ns
    result = run_shard(shard_for(tmp_path, reference_model), requested_device="cpu", probe=NO_GPU)
    assert (result["extracted"], result["skipped_existing"]) == (2, 4)
    assert os.stat(out / rels[2]).st_mtime_ns == mtime
    after = features(out)
    for rel in rels:  # recomputed files ran in other batches: equal within 1e-5
        np.testing.assert_allclose(before[rel], after[rel], rtol=0, atol=1e-5)


def test_bad_inputs_are_listed_and_good_files_still_extracted(tmp_path: Path, reference_model: dict[str, Any]) -> None:
    """Every bad-input class gets its reason in the result; the good files get features; no code runs."""
    good = make_ravdess(tmp_path / "in", actors=2, emotions=3)
    marker = tmp_path / "pwned"
    bad = add_bad_inputs(tmp_path / "in", marker)
    result = run_shard(shard_for(tmp_path, reference_model), requested_device="cpu", probe=NO_GPU)
    reasons = {item["file"]: item["reason"] for item in result["bad"]}
    assert sorted(reasons) == sorted(bad)
    for rel, words in bad.items():
        assert words in reasons[rel], f"{rel}: {reasons[rel]}"
    assert sorted(features(tmp_path / "out")) == sorted([*good, *GOOD_EXTRA])
    assert not marker.exists()


def test_unwritable_output_fails_the_shard_naming_the_cause(
    tmp_path: Path, reference_model: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A read-only output folder fails the shard with the OS error, logged last as one plain line with its try, and leaves nothing behind."""
    make_ravdess(tmp_path / "in", actors=1, emotions=2)
    with (
        read_only(tmp_path / "out" / "Actor_01"),
        pytest.raises(ShardFailed, match="cannot write features") as info,
        caplog.at_level("INFO", logger="cnn_features.runner"),
    ):
        run_shard(shard_for(tmp_path, reference_model), requested_device="cpu", probe=NO_GPU,
                  progress_dir=tmp_path / "p", tries=Tries(2, 3, 30.0))
    assert "Actor_01" in str(info.value)
    assert list((tmp_path / "out" / "Actor_01").iterdir()) == []
    last = [r for r in caplog.records if r.name == "cnn_features.runner"][-1]
    assert last.levelname == "ERROR" and "\n" not in last.getMessage()
    assert last.getMessage().startswith("shard ravdess-0001 (ravdess) failed on CPU: ") and "Actor_01" in last.getMessage()
    assert last.getMessage().endswith("(try 2 of 3)")
    records = [json.loads(line) for line in (tmp_path / "p" / "ravdess-0001.jsonl").read_text().splitlines()]
    assert records[-1]["state"] == "failed"
    assert {(r["try_number"], r["max_tries"], r["retry_delay_s"]) for r in records} == {(2, 3, 30.0)}


def test_progress_records_are_written(tmp_path: Path, reference_model: dict[str, Any]) -> None:
    """With a progress folder, the shard appends running records and a final success record."""
    make_ravdess(tmp_path / "in", actors=1, emotions=3)
    run_shard(shard_for(tmp_path, reference_model), requested_device="cpu", probe=NO_GPU, progress_dir=tmp_path / "p")
    records = [json.loads(line) for line in (tmp_path / "p" / "ravdess-0001.jsonl").read_text().splitlines()]
    assert records[0]["state"] == "running" and records[-1]["state"] == "success"
    assert records[-1]["done"] == records[-1]["total"] == 3 and records[-1]["device"] == "cpu"
    assert all(r["label"] == "ravdess 1/1" for r in records)


def test_a_non_finite_feature_makes_its_input_a_bad_input(tmp_path: Path, reference_model: dict[str, Any]) -> None:
    """A finite but huge spectrogram whose feature overflows is a listed bad input, not a feature, and verification passes at max_bad_fraction 1."""
    from cnn_features.verify import verify_run
    from tests.conftest import tiny_spectrogram, write_clip

    rels = make_ravdess(tmp_path / "in", actors=1, emotions=3)
    write_clip(tmp_path / "in" / rels[0], tiny_spectrogram(5, 32) * np.float32(1e37))
    shard = shard_for(tmp_path, reference_model)
    result = run_shard(shard, requested_device="cpu", probe=NO_GPU)
    assert [item["file"] for item in result["bad"]] == [rels[0]]
    assert "NaN or infinite value(s)" in result["bad"][0]["reason"]
    assert result["extracted"] == 2 and sorted(features(tmp_path / "out")) == rels[1:]
    summary = verify_run([shard], [result], max_bad_fraction=1.0)
    assert summary["datasets"]["ravdess"]["bad_inputs"] == 1 and summary["passed"]


def test_an_internal_error_on_gpu_is_not_rerun_on_cpu(
    tmp_path: Path, reference_model: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the worker (here a spec without batch_size) fails the shard as an internal error, with no CPU re-run."""
    make_ravdess(tmp_path / "in", actors=1, emotions=2)
    monkeypatch.setenv(ENV_VAR, "fake_gpu")
    spec = shard_for(tmp_path, reference_model)
    del spec["batch_size"]
    with pytest.raises(ShardFailed, match="failed on GPU: internal error: KeyError: 'batch_size'") as info:
        run_shard(spec, requested_device="gpu", probe=NO_GPU)
    assert "after GPU failure" not in str(info.value)


def test_a_progress_record_that_cannot_be_written_does_not_stop_the_shard(
    tmp_path: Path, reference_model: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """With the progress file on a full device (ENOSPC), the shard extracts every file and warns once."""
    make_ravdess(tmp_path / "in", actors=1, emotions=3)
    progress = tmp_path / "p"
    progress.mkdir()
    (progress / "ravdess-0001.jsonl").symlink_to("/dev/full")
    with caplog.at_level("WARNING", logger="cnn_features.progress"):
        result = run_shard(shard_for(tmp_path, reference_model), requested_device="cpu", probe=NO_GPU, progress_dir=progress)
    assert result["extracted"] == 3 and len(features(tmp_path / "out")) == 3
    warnings = [r.getMessage() for r in caplog.records if r.name == "cnn_features.progress"]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]


_HOLD_A_CLAIM = """
import json, sys, time
from cnn_features.runner import shard_lock
with shard_lock(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_shard_guard_is_keyed_to_files_not_shard_ids(tmp_path: Path) -> None:
    """Overlapping shards of runs with different shard sizes conflict; the same id over other files does not; a dead holder's claim is freed."""
    import subprocess
    import sys

    out = tmp_path / "out"
    files = [f"Actor_01/{i:02d}.npy" for i in range(20)]
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_A_CLAIM, str(out), "ravdess-0001", json.dumps(files[:10])], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        overlapping = shard_lock(out, "ravdess-0002", files[5:15])  # shard_size 5 in another run
        with pytest.raises(ShardFailed, match=rf"5 of its files in {out} are being extracted by pid {holder.pid} "), overlapping:
            pass
        with shard_lock(out, "ravdess-0001", files[10:]):  # same id, other files: no conflict
            pass
        with pytest.raises(ShardFailed, match=f"is being extracted by pid {holder.pid}"), shard_lock(out, "ravdess-0001", files[:10]):
            pass
    finally:
        holder.kill()
        holder.wait()
    with shard_lock(out, "ravdess-0009", files):  # the killed holder's claim is stale
        claims = [p.name for p in (out / "_shards").glob("*.lock")]
        assert len(claims) == 1 and claims[0].startswith("ravdess-0009-")
