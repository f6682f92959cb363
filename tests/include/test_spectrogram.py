"""Loading spectrograms: every bad-input class is refused with a reason naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cnn_features.errors import InvalidSpectrogram
from cnn_features.spectrogram import load_spectrogram, resolve_inside
from tests.conftest import add_bad_inputs, tiny_spectrogram, write_clip


def load(root: Path, rel: str) -> np.ndarray:
    return load_spectrogram(resolve_inside(root, rel), relpath=rel, n_mels=128, min_frames=16)


def test_good_file_loads_as_float32(tmp_path: Path) -> None:
    """A float64 spectrogram loads as C-contiguous float32 with the same values."""
    data = tiny_spectrogram(1, 30).astype(np.float64)
    write_clip(tmp_path / "a.npy", np.asfortranarray(data))
    out = load(tmp_path, "a.npy")
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, data.astype(np.float32))


def test_every_bad_input_class_is_refused_with_its_reason(tmp_path: Path) -> None:
    """Truncated, pickled, wrong ndim/dtype, NaN, too short, not-npy, huge and escaping files each raise."""
    root = tmp_path / "ravdess"
    marker = tmp_path / "pwned"
    bad = add_bad_inputs(root, marker)
    checked = 0
    for rel, words in bad.items():
        if words in ("does not follow RAVDESS", "duplicate clip id"):
            continue  # name-level problems, found by datasets.label_all
        if rel.endswith(".txt"):
            continue  # never loaded: not .npy by name
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
    """A relative path climbing out of the root is refused before it is opened."""
    (tmp_path / "root").mkdir()
    write_clip(tmp_path / "x.npy", tiny_spectrogram(3, 30))
    with pytest.raises(InvalidSpectrogram, match="outside the dataset root"):
        resolve_inside(tmp_path / "root", "../x.npy")


def test_symlinked_folder_inside_root_is_allowed(tmp_path: Path) -> None:
    """A symlink that stays inside the dataset root is fine."""
    write_clip(tmp_path / "real" / "a.npy", tiny_spectrogram(4, 30))
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    assert load(tmp_path, "alias/a.npy").shape == (128, 30)
