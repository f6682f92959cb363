"""Loading spectrograms: every bad-input class is refused with a reason naming the file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cnn_features.errors import InvalidSpectrogram
from cnn_features.spectrogram import load_spectrogram, read_header
from tests.conftest import add_bad_inputs, tiny_spectrogram, write_clip


def load(root: Path, rel: str) -> np.ndarray:
    return load_spectrogram(root / rel, relpath=rel, n_mels=128, min_frames=16, inside=root.resolve())


def test_good_file_loads_as_float32(tmp_path: Path) -> None:
    """A float64 spectrogram loads as C-contiguous float32 with the same values."""
    data = tiny_spectrogram(1, 30).astype(np.float64)
    write_clip(tmp_path / "a.npy", np.asfortranarray(data))
    out = load(tmp_path, "a.npy")
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, data.astype(np.float32))


def test_every_bad_input_class_is_refused_with_its_reason(tmp_path: Path) -> None:
    """Truncated, pickled, wrong ndim/dtype, NaN, too short, not-npy by content, huge and escaping files each raise."""
    root = tmp_path / "ravdess"
    marker = tmp_path / "pwned"
    bad = add_bad_inputs(root, marker)
    checked = 0
    for rel, words in bad.items():
        if words in ("does not follow RAVDESS", "duplicate clip id"):
            continue  # name-level problems, found by datasets.label_all
        with pytest.raises(InvalidSpectrogram) as info:
            load(root, rel)
        assert rel in str(info.value)
        assert words in str(info.value), f"{rel}: {info.value}"
        checked += 1
    assert checked == 10
    assert not marker.exists(), "unpickling ran code"


def test_float64_beyond_float32_range_is_refused(tmp_path: Path) -> None:
    """Values that overflow float32 count as infinite."""
    data = tiny_spectrogram(2, 30).astype(np.float64)
    data[0, 0] = 1e300
    write_clip(tmp_path / "a.npy", data)
    with pytest.raises(InvalidSpectrogram, match="1 NaN or infinite"):
        load(tmp_path, "a.npy")


def test_wrong_mel_count_and_fixed_frames(tmp_path: Path) -> None:
    """A model's fixed mel and frame counts are enforced per file."""
    write_clip(tmp_path / "a.npy", np.zeros((64, 30), dtype=np.float32))
    with pytest.raises(InvalidSpectrogram, match="expected 128 mel bins, got 64"):
        load(tmp_path, "a.npy")
    write_clip(tmp_path / "b.npy", np.zeros((128, 30), dtype=np.float32))
    with pytest.raises(InvalidSpectrogram, match="exactly 256 frames, got 30"):
        load_spectrogram(tmp_path / "b.npy", n_mels=128, min_frames=16, frames=256)


def test_dotdot_path_is_refused(tmp_path: Path) -> None:
    """A relative path climbing out of the root is refused."""
    (tmp_path / "root").mkdir()
    write_clip(tmp_path / "x.npy", tiny_spectrogram(3, 30))
    with pytest.raises(InvalidSpectrogram, match="outside the dataset root"):
        load(tmp_path / "root", "../x.npy")


def test_symlinked_folder_inside_root_is_allowed(tmp_path: Path) -> None:
    """A symlink that stays inside the dataset root is fine."""
    write_clip(tmp_path / "real" / "a.npy", tiny_spectrogram(4, 30))
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    assert load(tmp_path, "alias/a.npy").shape == (128, 30)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(128 * 20, dtype=np.float32).reshape(128, 20),
        np.asfortranarray(np.arange(128 * 20, dtype=np.float64).reshape(128, 20)),
        np.arange(128 * 20, dtype=">f4").reshape(128, 20),
        np.arange(128 * 20, dtype=np.float16).reshape(128, 20),
    ],
    ids=["float32", "fortran-float64", "big-endian", "float16"],
)
def test_header_read_fast_agrees_with_numpy(tmp_path: Path, array: np.ndarray) -> None:
    """Headers numpy writes are parsed without numpy's parser, to the same shape, dtype and order, and load the same values."""
    write_clip(tmp_path / "a.npy", array)
    header = read_header(tmp_path / "a.npy")
    with open(tmp_path / "a.npy", "rb") as fh:
        assert np.lib.format.read_magic(fh) == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        offset = fh.tell()
    assert (header.shape, header.dtype, header.fortran_order, header.offset) == (shape, dtype, fortran, offset)
    np.testing.assert_array_equal(load(tmp_path, "a.npy"), np.load(tmp_path / "a.npy").astype(np.float32))


def test_unusual_header_layout_goes_through_numpy(tmp_path: Path) -> None:
    """A valid header in another layout (format 2.0, keys reordered) still loads, through numpy's own parser."""
    data = tiny_spectrogram(5, 30)
    header = "{'shape': (128, 30), 'fortran_order': False, 'descr': '<f4'}"
    text = header + " " * (64 - (12 + len(header) + 1) % 64) + "\n"
    raw = b"\x93NUMPY\x02\x00" + len(text).to_bytes(4, "little") + text.encode("latin1") + data.tobytes()
    (tmp_path / "a.npy").write_bytes(raw)
    np.testing.assert_array_equal(load(tmp_path, "a.npy"), data)


def test_corrupt_header_is_refused(tmp_path: Path) -> None:
    """A header that is not a Python literal dict is a corrupt header, not a crash."""
    text = "{'descr': __import__('os').system('true')}" + " " * 20 + "\n"
    (tmp_path / "a.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode())
    with pytest.raises(InvalidSpectrogram, match="a.npy: corrupt .npy header"):
        load(tmp_path, "a.npy")


def test_file_ending_inside_its_header_is_refused(tmp_path: Path) -> None:
    """A file cut inside its header says so."""
    write_clip(tmp_path / "a.npy", tiny_spectrogram(6, 30))
    (tmp_path / "a.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:40])
    with pytest.raises(InvalidSpectrogram, match="file ends inside it"):
        load(tmp_path, "a.npy")


def test_fifo_in_the_dataset_is_refused_without_hanging(tmp_path: Path) -> None:
    """A named pipe posing as a spectrogram is refused at once; opening it never blocks."""
    os.mkfifo(tmp_path / "a.npy")
    with pytest.raises(InvalidSpectrogram, match="a.npy: not a regular file"):
        load(tmp_path, "a.npy")


def test_escape_is_checked_on_the_opened_file(tmp_path: Path) -> None:
    """With ``inside``, a symlink out of the root is refused however the path was checked before."""
    (tmp_path / "root").mkdir()
    write_clip(tmp_path / "x.npy", tiny_spectrogram(3, 30))
    (tmp_path / "root" / "a.npy").symlink_to(tmp_path / "x.npy")
    root = (tmp_path / "root").resolve()
    with pytest.raises(InvalidSpectrogram, match="outside the dataset root"):
        load_spectrogram(tmp_path / "root" / "a.npy", relpath="a.npy", n_mels=128, min_frames=16, inside=root)
    with pytest.raises(InvalidSpectrogram, match="outside the dataset root"):
        read_header(tmp_path / "root" / "a.npy", "a.npy", inside=root)


def test_a_fifo_outside_the_root_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    """A symlink to a FIFO outside the root is refused without opening the FIFO: a writer waiting on it stays blocked."""
    import os
    import threading
    import time

    from cnn_features.spectrogram import MAX_INPUT_BYTES, read_input

    root = tmp_path / "root"
    root.mkdir()
    fifo = tmp_path / "outside.fifo"
    os.mkfifo(fifo)
    (root / "x.npy").symlink_to(fifo)
    opened = threading.Event()

    def writer() -> None:
        with open(fifo, "wb"):  # blocks until someone opens the read end
            opened.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    time.sleep(0.3)  # let the writer block in open()
    try:
        with pytest.raises(InvalidSpectrogram, match="outside the dataset root"):
            read_input(root / "x.npy", "x.npy", inside=root.resolve(), max_bytes=MAX_INPUT_BYTES)
        assert not opened.wait(0.5), "the FIFO was opened before it was refused"
    finally:
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # release the writer
        thread.join(5)
        os.close(fd)
