"""The fault matrix (docs/reliability.md): killed writers, full disks, read-only and shared outputs, orphans."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnn_features.config import load_settings
from cnn_features.errors import ModelError, OutputConflict, ShardFailed
from cnn_features.faults import ENV_VAR
from cnn_features.plan import DatasetIO, check_model, claim_output, plan_dataset
from cnn_features.procs import PROGRESS_PREFIX, child_env, python_module_cmd
from cnn_features.runner import run_shard, shard_lock
from cnn_features.storage import check_feature_file, write_json_atomic
from tests.conftest import make_ravdess, read_only

NO_GPU = {"usable": False, "error": "no GPU in tests"}
# Kill-at-a-random-point rounds: each starts a worker (about 2-3 s of
# TensorFlow import) and kills it somewhere inside its extraction loop.
KILL_ROUNDS = 12
# Seconds a worker sleeps after each pass in the kill test (the 'slow' fault):
# stretches a 200-file shard over about a second, so kills land mid-shard.
KILL_TEST_SLOW_S = 0.05


def shard_for(tmp_path: Path, model: dict[str, Any], *, batch_size: int = 4) -> dict[str, Any]:
    (shard,) = plan_dataset(DatasetIO("ravdess", tmp_path / "in", tmp_path / "out"), shard_size=10_000)
    return {**shard, "model": model, "batch_size": batch_size}


def visible_outputs(out: Path) -> list[Path]:
    return sorted(p for p in out.rglob("*.npy") if not p.name.startswith("."))


def test_sigkill_at_random_points_never_leaves_a_partial_feature(tmp_path: Path, reference_model: dict[str, Any]) -> None:
    """Workers SIGKILLed at random moments while writing leave only whole features; the re-run makes exactly the rest."""
    rels = make_ravdess(tmp_path / "in", actors=25, emotions=8, frames=64)
    spec = shard_for(tmp_path, reference_model, batch_size=2)
    spec_path = tmp_path / "spec.json"
    write_json_atomic(spec_path, spec)
    out = tmp_path / "out"
    rng = random.Random(1234)
    killed_mid_run = 0
    env = {**child_env("cpu"), ENV_VAR: f"slow={KILL_TEST_SLOW_S}"}
    for _ in range(KILL_ROUNDS):
        proc = subprocess.Popen(
            python_module_cmd("cnn_features.worker", "--spec", str(spec_path), "--device", "cpu"),
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:  # the first progress line comes once the model is loaded
            if line.startswith(PROGRESS_PREFIX):
                break
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode == -signal.SIGKILL:
            killed_mid_run += 1
        for path in visible_outputs(out):
            assert check_feature_file(path, feature_dim=256) is None, f"partial feature visible: {path}"
        if len(visible_outputs(out)) == len(rels):
            break
    assert killed_mid_run >= 3
    before = {p: p.stat().st_mtime_ns for p in visible_outputs(out)}
    assert len(before) < len(rels), "the kills came too late to leave work undone"
    result = run_shard(spec, requested_device="cpu", probe=NO_GPU)
    assert result["skipped_existing"] == len(before)
    assert result["extracted"] == len(rels) - len(before)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert [p.relative_to(out).as_posix() for p in visible_outputs(out)] == rels
    assert not [p for p in out.rglob(".*.tmp-*")], "temporaries of killed writers were not cleaned"


def test_file_size_limit_fails_the_shard_cleanly(tmp_path: Path, reference_model: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Under RLIMIT_FSIZE the shard fails naming the folder and 'File too large'; nothing partial; the re-run completes."""
    rels = make_ravdess(tmp_path / "in", actors=1, emotions=3)
    monkeypatch.setenv(ENV_VAR, "fsize_limit=512")
    with pytest.raises(ShardFailed, match=r"cannot write features under .*File too large"):
        run_shard(shard_for(tmp_path, reference_model), requested_device="cpu", probe=NO_GPU)
    out = tmp_path / "out"
    assert visible_outputs(out) == []
    assert not [p for p in out.rglob(".*.tmp-*")]
    monkeypatch.delenv(ENV_VAR)
    assert run_shard(shard_for(tmp_path, reference_model), requested_device="cpu", probe=NO_GPU)["extracted"] == len(rels)


# Address space a worker may still grow by once its model is loaded (the
# 'as_headroom' fault): 1.5 GiB. A 100,000-frame clip (what MAX_ELEMENTS lets
# in) takes about 3.7 GB through the reference CNN and crashed the worker
# under it; 4,000-frame clips take about 0.1 GB each.
LONG_CLIP_HEADROOM = 3 << 29


def test_long_clips_under_a_memory_limit_are_bad_inputs_and_the_shard_completes(
    tmp_path: Path, reference_model: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under RLIMIT_AS a clip too long for any pass is a bad input naming the limit; the other long and short clips are extracted."""
    make_ravdess(tmp_path / "in", actors=1, emotions=2)
    clips = {3: 4_000, 4: 4_000, 5: 100_000}
    for emotion, frames in clips.items():
        np.save(tmp_path / "in" / "Actor_01" / f"03-01-{emotion:02d}-01-01-01-01.npy", np.ones((128, frames), dtype=np.float32))
    monkeypatch.setenv(ENV_VAR, f"as_headroom={LONG_CLIP_HEADROOM}")
    result = run_shard(shard_for(tmp_path, reference_model), requested_device="cpu", probe=NO_GPU)
    assert result["extracted"] == 4
    (bad,) = result["bad"]
    assert bad["file"] == "Actor_01/03-01-05-01-01-01-01.npy"
    assert "100,000 frames need about" in bad["reason"] and "MiB pass memory limit" in bad["reason"] and "RLIMIT_AS" in bad["reason"]
    assert 0 < result["pass_memory_budget_mb"] < LONG_CLIP_HEADROOM >> 20
    assert len(visible_outputs(tmp_path / "out")) == 4


def test_full_disk_fails_the_shard_cleanly(tmp_path: Path, reference_model: dict[str, Any]) -> None:
    """On a real full filesystem (a 64 KiB tmpfs) the shard fails with ENOSPC; every visible feature is whole."""
    make_ravdess(tmp_path / "in", actors=4, emotions=8, frames=24)
    out = tmp_path / "out"
    out.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(out)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        with pytest.raises(ShardFailed, match="No space left on device"):
            run_shard(shard_for(tmp_path, reference_model), requested_device="cpu", probe=NO_GPU)
        written = visible_outputs(out)
        assert written, "the disk filled before any feature was written"
        for path in written:
            assert check_feature_file(path, feature_dim=256) is None
        assert not [p for p in out.rglob(".*.tmp-*")]
    finally:
        subprocess.run(["umount", str(out)], check=True)


def test_read_only_output_folder_is_refused_before_shard_work(tmp_path: Path, reference_model: dict[str, Any]) -> None:
    """A read-only output folder fails planning (and a shard) with the folder named."""
    make_ravdess(tmp_path / "in", actors=1, emotions=2)
    out = tmp_path / "out"
    with read_only(out):
        with pytest.raises(OutputConflict, match=f"cannot write to {out}"):
            claim_output(DatasetIO("ravdess", tmp_path / "in", out), reference_model)
        with pytest.raises(ShardFailed, match=f"cannot write to output folder {out}"):
            run_shard(shard_for(tmp_path, reference_model), requested_device="cpu", probe=NO_GPU)


def test_second_run_on_a_busy_shard_fails_fast(tmp_path: Path, reference_model: dict[str, Any]) -> None:
    """While one process extracts a shard into a folder, another run of that shard fails naming the holder."""
    make_ravdess(tmp_path / "in", actors=1, emotions=2)
    spec = shard_for(tmp_path, reference_model)
    with shard_lock(tmp_path / "out", spec["shard_id"], spec["files"]), pytest.raises(ShardFailed, match=rf"is being extracted by pid {os.getpid()}"):
        run_shard(spec, requested_device="cpu", probe=NO_GPU)
    assert run_shard(spec, requested_device="cpu", probe=NO_GPU)["extracted"] == 2


def test_two_concurrent_runs_of_a_shard_produce_one_valid_set(tmp_path: Path, reference_model: dict[str, Any]) -> None:
    """Two runs racing on the same shard: one extracts, the other is refused; the features are complete and valid."""
    rels = make_ravdess(tmp_path / "in", actors=2, emotions=4)
    spec = shard_for(tmp_path, reference_model)
    outcomes: list[str] = []

    def attempt() -> None:
        try:
            outcomes.append(f"ok {run_shard(spec, requested_device='cpu', probe=NO_GPU)['extracted']}")
        except ShardFailed as exc:
            outcomes.append(f"refused {exc}")

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o.split()[0] for o in outcomes) == ["ok", "refused"], outcomes
    assert [p.relative_to(tmp_path / "out").as_posix() for p in visible_outputs(tmp_path / "out")] == rels


def test_model_with_wrong_input_shape_fails_before_shards(home: Path, tmp_path: Path) -> None:
    """A model taking 3-channel images is refused by the model check with the reason."""
    script = (
        "import keras, sys\n"
        "i = keras.Input(shape=(128, None, 3))\n"
        "keras.Model(i, keras.layers.GlobalAveragePooling2D()(i)).save(sys.argv[1])\n"
    )
    path = home / "rgb.keras"
    subprocess.run([sys.executable, "-c", script, str(path)], env=child_env("cpu"), check=True, capture_output=True)
    with pytest.raises(ModelError, match="3 channels, expected 1"):
        check_model(path, load_settings())


def test_zero_frame_input_is_a_bad_input(tmp_path: Path, reference_model: dict[str, Any]) -> None:
    """A spectrogram with no frames is listed as bad; its neighbours are extracted."""
    make_ravdess(tmp_path / "in", actors=1, emotions=2)
    np.save(tmp_path / "in" / "Actor_01" / "03-01-05-01-01-01-01.npy", np.zeros((128, 0), dtype=np.float32))
    result = run_shard(shard_for(tmp_path, reference_model), requested_device="cpu", probe=NO_GPU)
    assert result["extracted"] == 2
    assert [b["reason"] for b in result["bad"]] == ["Actor_01/03-01-05-01-01-01-01.npy: 0 frames, the model needs at least 16"]


_RUN_SHARD = """
import json, signal, sys
from pathlib import Path
from cnn_features.runner import run_shard

def stop(signum, frame):  # as Airflow's task runner does on SIGTERM
    raise SystemExit("terminated")

signal.signal(signal.SIGTERM, stop)
spec = json.loads(Path(sys.argv[1]).read_text())
run_shard(spec, requested_device="cpu", probe={"usable": False, "error": "test"})
"""


def _workers_of(spec_path: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "cnn_features.worker" in cmdline and str(spec_path.parent) in cmdline:
                pids.append(int(entry.name))
    return pids


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_stopped_task_leaves_no_orphan_worker(tmp_path: Path, reference_model: dict[str, Any], sig: signal.Signals, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the task process is SIGKILLed or SIGTERMed mid-shard, its worker process dies with it."""
    make_ravdess(tmp_path / "in", actors=6, emotions=8, frames=32)
    spec_path = tmp_path / "shard.json"
    spec_path.write_text(json.dumps(shard_for(tmp_path, reference_model, batch_size=1)))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the runner's spec copy, and so the worker's cmdline, lands here
    task = subprocess.Popen([sys.executable, "-c", _RUN_SHARD, str(spec_path)], env={**os.environ, "TMPDIR": str(tmp_path)})
    deadline = time.monotonic() + 60
    while not _workers_of(spec_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = _workers_of(spec_path)
    assert workers, "the worker never started"
    task.send_signal(sig)
    task.wait(timeout=30)
    deadline = time.monotonic() + 15
    while _workers_of(spec_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _workers_of(spec_path) == [], "worker outlived its task"
