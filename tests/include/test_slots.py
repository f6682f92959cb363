"""The device slot pool: one checked per-user folder of lock files for GPU and CPU slots alike.

Each test points the temporary directory at its own folder, so the slot
folder it plants or checks is its own, never the machine's.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pytest

from cnn_features.runner import gpu_slot
from cnn_features.slots import SlotUnavailable, slot_folder
from cnn_features.worker import cpu_slot

VICTIM_TEXT = "precious\n"


@pytest.fixture
def tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary directory of this test's own, where the slot folder is looked for."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file a planted lock symlink points at."""
    path = tmp_path / "victim.txt"
    path.write_text(VICTIM_TEXT)
    return path


def test_gpu_slot_in_a_planted_open_folder_is_refused_and_the_victim_untouched(tmp_dir: Path, victim: Path) -> None:
    """A pre-made 0777 slot folder whose GPU lock file links to a victim: no slot is taken, the error names the folder and its mode."""
    folder = tmp_dir / f"cnn-features-{os.getuid()}"
    folder.mkdir()
    folder.chmod(0o777)
    (folder / "gpu-slot-0.lock").symlink_to(victim)
    with pytest.raises(SlotUnavailable) as caught, gpu_slot(["0"], "s1"):
        pytest.fail("a slot was taken in a planted folder")
    assert str(folder) in str(caught.value)
    assert "mode 0777, not 0700" in str(caught.value)
    assert victim.read_text() == VICTIM_TEXT


def test_gpu_slot_refuses_a_symlinked_lock_file_in_its_own_folder(tmp_dir: Path, victim: Path) -> None:
    """In a private folder, a GPU lock file planted as a symlink is refused by name and never written through."""
    folder = slot_folder()
    folder.mkdir(mode=0o700)
    lock = folder / "gpu-slot-0.lock"
    lock.symlink_to(victim)
    with pytest.raises(SlotUnavailable, match=r"slot lock file is a symlink; refusing it") as caught, gpu_slot(["0"], "s1"):
        pytest.fail("a slot was taken through a symlink")
    assert str(lock) in str(caught.value)
    assert victim.read_text() == VICTIM_TEXT


def test_a_lock_file_that_is_not_a_plain_file_is_refused(tmp_dir: Path) -> None:
    """A FIFO in a GPU lock file's place is refused by name, not locked."""
    folder = slot_folder()
    folder.mkdir(mode=0o700)
    os.mkfifo(folder / "gpu-slot-0.lock")
    with pytest.raises(SlotUnavailable, match=r"gpu-slot-0\.lock: slot lock file is not a plain file"), gpu_slot(["0"], "s1"):
        pytest.fail("a slot was taken on a FIFO")


def test_a_symlinked_slot_folder_is_refused_and_its_target_untouched(tmp_dir: Path) -> None:
    """A slot folder that is a symlink to another folder is refused by name; nothing is created where it points."""
    elsewhere = tmp_dir / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    slot_folder().symlink_to(elsewhere)
    with pytest.raises(SlotUnavailable, match=r"slot folder is a symlink or not a folder; refusing it") as caught, gpu_slot(["0"], "s1"):
        pytest.fail("a slot was taken in a symlinked folder")
    assert str(slot_folder()) in str(caught.value)
    assert list(elsewhere.iterdir()) == []


def test_cpu_slot_meets_the_same_checks_and_runs_without_a_slot(
    tmp_dir: Path, victim: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A CPU lock file planted as a symlink is refused with the same reason, logged by name; the worker runs on, the victim untouched."""
    folder = slot_folder()
    folder.mkdir(mode=0o700)
    for i in range(len(os.sched_getaffinity(0))):
        (folder / f"cpu-slot-{i}.lock").symlink_to(victim)
    ran = False
    with caplog.at_level(logging.WARNING), cpu_slot(1, "s1"):
        ran = True
    assert ran
    assert f"{folder / 'cpu-slot-0.lock'}: slot lock file is a symlink; refusing it" in caplog.text
    assert "running without one" in caplog.text
    assert victim.read_text() == VICTIM_TEXT


def test_gpu_and_cpu_slots_are_held_in_one_private_folder(tmp_dir: Path) -> None:
    """A GPU slot and a CPU slot held at once lock files of the same 0700 folder, each naming its shard."""
    with gpu_slot(["7"], "gpu-shard") as gpu, cpu_slot(len(os.sched_getaffinity(0)), "cpu-shard"):
        assert gpu == "7"
        folder = slot_folder()
        assert folder.stat().st_mode & 0o777 == 0o700
        assert sorted(p.name for p in folder.iterdir()) == ["cpu-slot-0.lock", "gpu-slot-7.lock"]
        assert (folder / "gpu-slot-7.lock").read_text().startswith("shard gpu-shard, pid ")
        assert (folder / "cpu-slot-0.lock").read_text().startswith("shard cpu-shard, pid ")
