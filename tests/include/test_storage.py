"""Atomic writes and feature-file checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnn_features import storage


def test_save_npy_atomic_leaves_only_the_final_file(tmp_path: Path) -> None:
    """After a save, the final file holds the array and no temporary remains."""
    final = tmp_path / "f.npy"
    storage.save_npy_atomic(final, np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(np.load(final), np.arange(4, dtype=np.float32))
    assert os.listdir(tmp_path) == ["f.npy"]


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that dies half-way (disk full) leaves the previous file intact and no temporary behind."""
    final = tmp_path / "f.npy"
    storage.save_npy_atomic(final, np.ones(4, dtype=np.float32))
    real_write = os.write

    def half_then_full(fd: int, data: bytes) -> int:
        if len(data) > 16:
            return real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        storage.save_npy_atomic(final, np.zeros(4, dtype=np.float32))
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(final), np.ones(4, dtype=np.float32))
    assert os.listdir(tmp_path) == ["f.npy"]


def test_file_size_limit_is_an_error_not_a_truncated_file(tmp_path: Path) -> None:
    """Under RLIMIT_FSIZE the save raises EFBIG and leaves no file; C stdio would truncate silently."""
    script = (
        "import resource, signal, sys, numpy as np\n"
        "from pathlib import Path\n"
        "from cnn_features.storage import save_npy_atomic\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512))\n"
        "try:\n"
        "    save_npy_atomic(Path(sys.argv[1]), np.ones(256, np.float32))\n"
        "except OSError as exc:\n"
        "    print('errno', exc.errno)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "f.npy")], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "errno 27"
    assert os.listdir(tmp_path) == []


def test_write_json_atomic_creates_parents(tmp_path: Path) -> None:
    """JSON goes through a temporary file into place, parents created."""
    storage.write_json_atomic(tmp_path / "a" / "b.json", {"x": 1})
    assert (tmp_path / "a" / "b.json").read_text() == '{\n  "x": 1\n}\n'
    assert os.listdir(tmp_path / "a") == ["b.json"]


def test_remove_stale_temps_touches_only_named_outputs(tmp_path: Path) -> None:
    """Only temporaries of the given outputs go; other shards' and real files stay."""
    names = [".a.npy.tmp-11", ".b.npy.tmp-12", "a.npy", ".hidden"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert storage.remove_stale_temps(tmp_path, {"a.npy"}) == 1
    assert sorted(os.listdir(tmp_path)) == [".b.npy.tmp-12", ".hidden", "a.npy"]


@pytest.mark.parametrize(
    ("array", "reason"),
    [
        (np.zeros(8, dtype=np.float32), None),
        (np.zeros(8, dtype=np.float64), "dtype float64"),
        (np.zeros(7, dtype=np.float32), "shape (7,)"),
        (np.full(8, np.nan, dtype=np.float32), "non-finite"),
    ],
)
def test_check_feature_file(tmp_path: Path, array: np.ndarray, reason: str | None) -> None:
    """A feature file must be a finite float32 vector of the model's dimension."""
    np.save(tmp_path / "f.npy", array)
    result = storage.check_feature_file(tmp_path / "f.npy", feature_dim=8)
    assert result == reason if reason is None else reason in result


def test_check_feature_file_missing_and_corrupt(tmp_path: Path) -> None:
    """Missing and unreadable feature files are told apart."""
    assert storage.check_feature_file(tmp_path / "nope.npy", feature_dim=8) == "missing"
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    assert storage.check_feature_file(tmp_path / "bad.npy", feature_dim=8).startswith("unreadable")


@pytest.mark.parametrize(
    "array",
    [np.arange(256, dtype=np.float32), np.zeros((128, 30), dtype=np.float64), np.zeros((1,) * 40, dtype=np.float32)],
    ids=["feature", "spectrogram", "header-past-format-1.0"],
)
def test_npy_bytes_are_what_np_save_writes(tmp_path: Path, array: np.ndarray) -> None:
    """The cached header plus the raw data give byte for byte the file np.save writes."""
    np.save(tmp_path / "ref.npy", array)
    assert storage.npy_bytes(array) == (tmp_path / "ref.npy").read_bytes()


def test_object_arrays_are_never_written() -> None:
    """An object array would need pickle to read back: refused."""
    with pytest.raises(ValueError, match="object arrays"):
        storage.npy_bytes(np.array([{"a": 1}], dtype=object))


def test_feature_files_not_written_by_us_are_still_judged(tmp_path: Path) -> None:
    """A valid vector in another layout passes; a truncated or byte-swapped one is named."""
    header = "{'shape': (8,), 'fortran_order': False, 'descr': '<f4'}"
    text = header + " " * (64 - (10 + len(header) + 1) % 64) + "\n"
    (tmp_path / "other.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode() + bytes(32))
    assert storage.check_feature_file(tmp_path / "other.npy", feature_dim=8) is None
    storage.save_npy_atomic(tmp_path / "cut.npy", np.ones(8, dtype=np.float32))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "cut.npy").read_bytes()[:-4])
    assert storage.check_feature_file(tmp_path / "cut.npy", feature_dim=8).startswith("unreadable")
    np.save(tmp_path / "swapped.npy", np.ones(8, dtype=">f4"))
    assert "dtype >f4" in storage.check_feature_file(tmp_path / "swapped.npy", feature_dim=8)


def _has_unnamed_files(folder: Path) -> bool:
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY)
    except (AttributeError, OSError):
        return False
    os.close(fd)
    return True


def test_a_new_file_appears_without_a_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new output is written nameless and linked in whole: no temporary name, no rename."""
    if not _has_unnamed_files(tmp_path):
        pytest.skip("this file system has no O_TMPFILE; the rename route is tested elsewhere")

    def no_rename(*args: object) -> None:
        raise AssertionError("renamed a temporary into place")

    monkeypatch.setattr(os, "replace", no_rename)
    storage.save_npy_atomic(tmp_path / "f.npy", np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(np.load(tmp_path / "f.npy"), np.arange(4, dtype=np.float32))
    assert os.listdir(tmp_path) == ["f.npy"]


def test_an_existing_file_is_replaced_and_the_named_route_still_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Overwriting replaces the old file whole; without O_TMPFILE every write takes the temporary-and-rename route."""
    final = tmp_path / "f.json"
    storage.write_json_atomic(final, {"v": 1})
    storage.write_json_atomic(final, {"v": 2})
    assert json.loads(final.read_text()) == {"v": 2}
    monkeypatch.setattr(storage, "_O_TMPFILE", None)
    storage.save_npy_atomic(tmp_path / "g.npy", np.ones(3, dtype=np.float32))
    np.testing.assert_array_equal(np.load(tmp_path / "g.npy"), np.ones(3, dtype=np.float32))
    assert sorted(os.listdir(tmp_path)) == ["f.json", "g.npy"]


def test_save_with_renames_a_complete_file_and_cleans_up_a_failed_one(tmp_path: Path) -> None:
    """A path-taking writer gets a temporary with the final suffix; a failure keeps the old file and leaves no temporary."""
    final = tmp_path / "model.keras"
    seen: list[Path] = []

    def save(path: Path) -> None:
        seen.append(path)
        path.write_bytes(b"new")

    storage.save_with(final, save)
    assert final.read_bytes() == b"new"
    assert seen[0].suffix == ".keras" and seen[0].parent == tmp_path and seen[0] != final
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]

    def fails(path: Path) -> None:
        path.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        storage.save_with(final, fails)
    assert final.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]


def test_temporary_names_carry_host_pid_and_a_random_part(tmp_path: Path) -> None:
    """Two temporaries for one output in one process differ, and each names the host and pid (shared volumes)."""
    import os
    import socket

    from cnn_features.storage import temp_path

    first, second = temp_path(tmp_path / "a.npy"), temp_path(tmp_path / "a.npy")
    assert first != second
    assert all(p.name.startswith(f".a.npy.tmp-{socket.gethostname()}-{os.getpid()}-") for p in (first, second))


# A writer that stops half-way through writing its temporary (a slow model save).
_HOLD_A_TEMP = """
import sys, time
from pathlib import Path
from cnn_features import storage

def save(tmp):
    tmp.write_bytes(b"half")
    print(tmp, flush=True)
    time.sleep(600)

storage.save_with(Path(sys.argv[1]), save)
"""


def test_only_temporaries_whose_writer_is_gone_are_removed(tmp_path: Path) -> None:
    """A temporary whose writer is alive (it holds its lock) stays; one whose writer was SIGKILLed is removed."""
    writers = [
        subprocess.Popen([sys.executable, "-c", _HOLD_A_TEMP, str(tmp_path / name)], stdout=subprocess.PIPE, text=True)
        for name in ("alive.npy", "killed.npy")
    ]
    try:
        alive, killed = (Path(w.stdout.readline().strip()) for w in writers)  # type: ignore[union-attr]
        writers[1].kill()
        writers[1].wait()
        assert storage.remove_stale_temps(tmp_path, {"alive.npy", "killed.npy"}) == 1
        assert alive.exists() and not killed.exists()
    finally:
        for writer in writers:
            writer.kill()
            writer.wait()
    assert storage.remove_stale_temps(tmp_path, {"alive.npy"}) == 1
    assert os.listdir(tmp_path) == []
