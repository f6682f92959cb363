"""The demo corpus generator: layouts, real counts, determinism, learnable patterns."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from cnn_features.datasets import DATASETS, label_all
from cnn_features.demo import crema_d_clips, generate, ravdess_clips, spectrogram


def test_full_layouts_have_the_real_counts_and_parse() -> None:
    """--full gives 1,440 RAVDESS and 7,442 CREMA-D names, all parsing, none duplicated."""
    ravdess = [c[0] for c in ravdess_clips(full=True)]
    crema = [c[0] for c in crema_d_clips(full=True)]
    assert (len(ravdess), len(crema)) == (1440, 7442)
    for name, files in (("ravdess", ravdess), ("crema_d", crema)):
        labels, rejected = label_all(DATASETS[name], sorted(files))
        assert rejected == {} and len(labels) == len(files)
    assert len({r.split("/")[0] for r in ravdess}) == 24
    assert len({c.split("_")[0] for c in crema}) == 91


def test_small_corpus_is_balanced_and_deterministic(tmp_path: Path) -> None:
    """The default corpus covers every emotion and is byte-identical on a second generation."""
    counts = generate(tmp_path / "a")
    generate(tmp_path / "b")
    assert counts == {"ravdess": 180, "crema_d": 288}
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.npy"))
    assert len(files) == 468
    for rel in files[::37]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    labels, _ = label_all(DATASETS["crema_d"], sorted(p.name for p in (tmp_path / "a" / "crema_d").iterdir()))
    assert set(Counter(label.emotion for label in labels.values()).values()) == {48}


def test_clips_have_realistic_shapes() -> None:
    """128 mel bins; RAVDESS 3-5 s and CREMA-D 2-3 s at a 10 ms hop; a fixed frame option."""
    r = spectrogram("x.npy", "happy", 1, frames_range=(300, 500), frames=None, intense=False)
    assert r.dtype == np.float32 and r.shape[0] == 128 and 300 <= r.shape[1] <= 500
    assert spectrogram("y.npy", "sad", 2, frames_range=(200, 300), frames=256, intense=True).shape == (128, 256)


def test_emotions_differ_in_their_spectra() -> None:
    """Averaged over takes, two emotions' spectra differ far more than two halves of one emotion's takes."""
    def mean_spectrum(emotion: str, takes: range) -> np.ndarray:
        clips = [spectrogram(f"{emotion}{k}", emotion, k % 5 + 1, frames_range=(300, 300), frames=None, intense=False) for k in takes]
        return np.mean([c.mean(axis=1) for c in clips], axis=0)

    same = np.abs(mean_spectrum("angry", range(0, 20)) - mean_spectrum("angry", range(20, 40))).mean()
    other = np.abs(mean_spectrum("angry", range(0, 20)) - mean_spectrum("sad", range(20, 40))).mean()
    assert other > 3 * same
