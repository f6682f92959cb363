"""GPU shards pinned one per GPU: slot locks, the environment each worker gets, and the result naming the GPU.

The GPU machines this has run on have one GPU, so contention is tested here on CPU, with
GPU ids that no real deployment uses and the ``fake_gpu`` fault hook.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from cnn_features.faults import ENV_VAR
from cnn_features.plan import DatasetIO, plan_dataset
from cnn_features.procs import child_env
from cnn_features.runner import gpu_slot, run_shard
from tests.conftest import make_ravdess

# Seconds a test waits for a slot it expects to get at once.
_PROMPT_S = 5.0


@pytest.fixture
def gpu_ids() -> list[str]:
    """Two GPU ids unique to this test, so its slot locks meet no one else's."""
    tag = uuid.uuid4().hex[:8]
    return [f"test-{tag}-a", f"test-{tag}-b"]


def test_each_holder_gets_its_own_gpu_and_a_third_waits(gpu_ids: list[str]) -> None:
    """Two shards on two GPUs get one each; a third waits until one is released, then gets that one."""
    with gpu_slot(gpu_ids, "s1") as first, gpu_slot(gpu_ids, "s2") as second:
        assert {first, second} == set(gpu_ids)
        got: list[str] = []

        def third() -> None:
            with gpu_slot(gpu_ids, "s3", poll_s=0.01) as gpu:
                got.append(gpu)

        waiter = threading.Thread(target=third)
        waiter.start()
        time.sleep(0.3)
        assert got == [], "all GPUs are held: the third shard must wait"
    waiter.join(timeout=_PROMPT_S)
    assert got and got[0] in gpu_ids


def test_slot_of_a_killed_holder_is_freed(gpu_ids: list[str]) -> None:
    """A GPU slot whose holding process is SIGKILLed is free again at once."""
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time\n"
            "from cnn_features.runner import gpu_slot\n"
            f"with gpu_slot({gpu_ids[:1]!r}, 'holder'):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(600)\n"
        )],
        env=child_env("cpu"), stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        got: list[str] = []
        waiter = threading.Thread(target=lambda: got.extend(_take(gpu_ids[:1])))
        waiter.start()
        time.sleep(0.3)
        assert got == []
        os.kill(holder.pid, signal.SIGKILL)
        waiter.join(timeout=_PROMPT_S)
        assert got == gpu_ids[:1]
    finally:
        holder.kill()
        holder.wait()


def _take(gpus: list[str]) -> list[str]:
    with gpu_slot(gpus, "waiter", poll_s=0.01) as gpu:
        return [gpu]


def _shard(tmp_path: Path, model: dict[str, Any]) -> dict[str, Any]:
    make_ravdess(tmp_path / "in", actors=1, emotions=2)
    (shard,) = plan_dataset(DatasetIO("ravdess", tmp_path / "in", tmp_path / "out"), shard_size=1000)
    return {**shard, "model": model, "batch_size": 4}


def test_gpu_worker_is_pinned_to_a_free_gpu_and_named(
    tmp_path: Path, reference_model: dict[str, Any], gpu_ids: list[str], monkeypatch: pytest.MonkeyPatch, home: Path
) -> None:
    """A GPU worker sees only the GPU whose slot it holds (CUDA_VISIBLE_DEVICES), and its result names that GPU."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(gpu_ids))
    monkeypatch.setenv(ENV_VAR, "fake_gpu")
    with gpu_slot(gpu_ids, "busy") as busy:
        result = run_shard(_shard(tmp_path, reference_model), requested_device="gpu", probe={"usable": True, "device_count": 2})
    free = next(g for g in gpu_ids if g != busy)
    assert result["device"] == "gpu" and result["extracted"] == 2
    assert result["gpu_index"] == free
    assert result["gpu_name"].startswith("none (fake_gpu")
    assert (result["keras_backend"], result["precision"]) == ("tensorflow", "float32")


def test_cpu_worker_is_never_pinned(tmp_path: Path, reference_model: dict[str, Any], gpu_ids: list[str], monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    """A CPU shard takes no GPU slot and names no GPU, even on a GPU host."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(gpu_ids))
    with gpu_slot(gpu_ids, "busy-1"), gpu_slot(gpu_ids, "busy-2"):
        result = run_shard(_shard(tmp_path, reference_model), requested_device="cpu", probe={"usable": True, "device_count": 2})
    assert result["device"] == "cpu" and result["gpu_index"] is None and result["gpu_name"] is None


def test_gpu_shard_with_a_planted_slot_folder_runs_on_cpu_naming_it(
    tmp_path: Path, reference_model: dict[str, Any], gpu_ids: list[str], monkeypatch: pytest.MonkeyPatch, home: Path
) -> None:
    """A GPU shard meeting a planted 0777 slot folder with a symlinked lock starts no GPU worker and re-runs on CPU, naming why."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(gpu_ids))
    folder = tmp_path / f"cnn-features-{os.getuid()}"
    folder.mkdir()
    folder.chmod(0o777)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (folder / f"gpu-slot-{gpu_ids[0]}.lock").symlink_to(victim)
    shard = _shard(tmp_path, reference_model)
    result = run_shard(shard, requested_device="gpu", probe={"usable": True, "device_count": 2})
    assert [(a["device"], a["status"]) for a in result["attempts"]] == [("gpu", "no_gpu_slot"), ("cpu", "ok")]
    assert result["device"] == "cpu" and result["extracted"] == len(shard["files"])
    assert str(folder) in result["fallback_reason"] and "mode 0777, not 0700" in result["fallback_reason"]
    assert victim.read_text() == "precious\n"
