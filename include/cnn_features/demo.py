"""Generate a demo corpus in the RAVDESS and CREMA-D layouts.

Each clip is a log-mel-like spectrogram (128 mel bins, 10 ms hop) whose
texture depends on the emotion: harmonic spacing, modulation rate, loudness,
roughness and bandwidth, varied per actor and file, so a classifier on CNN
features can learn the emotions. Every file is generated from a seed derived
from its name, so the corpus is the same on every machine and in any order.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnn_features.datasets import CREMA_D_EMOTIONS, RAVDESS_EMOTIONS
from cnn_features.storage import save_npy_atomic

log = logging.getLogger(__name__)

N_MELS = 128
# Frames per second at a 10 ms hop.
FRAMES_PER_S = 100
# Clip lengths in frames: RAVDESS sentences last about 3-5 s, CREMA-D 2-3 s.
RAVDESS_FRAMES = (300, 500)
CREMA_D_FRAMES = (200, 300)
# Actors and sentences of the small default corpus: enough actors for a
# speaker-independent split, few enough files to extract in seconds.
SMALL_RAVDESS_ACTORS = 12
SMALL_CREMA_D_ACTORS = 12
SMALL_CREMA_D_SENTENCES = 4
CREMA_D_SENTENCES = ("IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI")
# CREMA-D has 7,442 clips, 20 fewer than its full design of 91 x 82.
CREMA_D_TOTAL = 7442


@dataclass(frozen=True)
class Style:
    """How an emotion sounds in the generated spectrograms."""

    level: float  # loudness above the floor
    spacing: float  # harmonic stripe spacing, mel bins
    rate: float  # amplitude modulation, Hz
    roughness: float  # noise inside the voiced band
    width: float  # bandwidth of the voiced band, mel bins


STYLES = {
    "neutral": Style(0.0, 6.0, 2.0, 0.3, 20.0),
    "calm": Style(-0.5, 8.0, 1.0, 0.2, 15.0),
    "happy": Style(1.0, 4.0, 5.0, 0.5, 35.0),
    "sad": Style(-1.0, 10.0, 1.5, 0.3, 12.0),
    "angry": Style(1.5, 3.0, 7.0, 0.9, 45.0),
    "fearful": Style(0.5, 5.0, 9.0, 0.7, 25.0),
    "disgust": Style(0.2, 7.0, 3.0, 0.8, 30.0),
    "surprised": Style(1.2, 9.0, 6.0, 0.4, 40.0),
}


def spectrogram(name: str, emotion: str, actor: int, *, frames_range: tuple[int, int], frames: int | None, intense: bool) -> np.ndarray:
    """Return the (128 x frames) float32 spectrogram of one clip, seeded by its name."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    actor_rng = np.random.default_rng(actor)
    style = STYLES[emotion]
    n = frames if frames is not None else int(rng.integers(frames_range[0], frames_range[1] + 1))
    m = np.arange(N_MELS, dtype=np.float32)[:, None]
    t = np.arange(n, dtype=np.float32)[None, :]
    # Speakers and takes vary: the emotion sets a style, not exact values.
    center = 40.0 + actor_rng.uniform(-8, 8) + rng.uniform(-4, 4)
    spacing = style.spacing * actor_rng.uniform(0.85, 1.15) * rng.uniform(0.9, 1.1)
    level = style.level + actor_rng.uniform(-0.5, 0.5) + rng.uniform(-0.4, 0.4) + (0.3 if intense else 0.0)
    width = style.width * rng.uniform(0.75, 1.25)
    rate = style.rate * rng.uniform(0.75, 1.25)
    band = np.exp(-0.5 * ((m - center) / width) ** 2)
    stripes = 0.5 + 0.5 * np.cos(2 * np.pi * m / spacing)
    modulation = 0.6 + 0.4 * np.sin(2 * np.pi * rate * t / FRAMES_PER_S + rng.uniform(0, 2 * np.pi))
    onset, offset = int(n * rng.uniform(0.05, 0.15)), int(n * rng.uniform(0.85, 0.95))
    voiced = np.zeros((1, n), dtype=np.float32)
    voiced[:, onset:offset] = 1.0
    floor = -4.0 - 2.0 * m / N_MELS + 0.3 * rng.standard_normal((N_MELS, n))
    voice = (2.5 + level) * band * stripes * modulation + style.roughness * band * rng.standard_normal((N_MELS, n))
    return (floor + voice * voiced).astype(np.float32)


def ravdess_clips(*, full: bool) -> Iterator[tuple[str, str, int, bool]]:
    """Yield (relpath, emotion, actor, intense) in the RAVDESS speech layout."""
    actors = range(1, 25) if full else range(1, SMALL_RAVDESS_ACTORS + 1)
    for actor in actors:
        for code, emotion in enumerate(RAVDESS_EMOTIONS, start=1):
            intensities = (1,) if emotion == "neutral" else (1, 2)
            statements = (1, 2) if full else (1,)
            repetitions = (1, 2) if full else (1,)
            for intensity in intensities:
                for statement in statements:
                    for rep in repetitions:
                        name = f"03-01-{code:02d}-{intensity:02d}-{statement:02d}-{rep:02d}-{actor:02d}.npy"
                        yield f"Actor_{actor:02d}/{name}", emotion, actor, intensity == 2


def crema_d_clips(*, full: bool) -> Iterator[tuple[str, str, int, bool]]:
    """Yield (relpath, emotion, actor, intense) in the CREMA-D flat layout."""
    actors = range(1001, 1092) if full else range(1001, 1001 + SMALL_CREMA_D_ACTORS)
    sentences = CREMA_D_SENTENCES if full else CREMA_D_SENTENCES[1 : 1 + SMALL_CREMA_D_SENTENCES]
    clips = []
    for actor in actors:
        for sentence in sentences:
            for code, emotion in CREMA_D_EMOTIONS.items():
                levels = ("LO", "MD", "HI") if sentence == "IEO" and code != "NEU" else ("XX",)
                clips.extend((f"{actor}_{sentence}_{code}_{level}.npy", emotion, actor, level == "HI") for level in levels)
    if full:
        # Drop the 20 clips with the smallest name hashes: a fixed, spread-out choice.
        drop = set(sorted((c[0] for c in clips), key=lambda n: zlib.crc32(n.encode()))[: len(clips) - CREMA_D_TOTAL])
        clips = [c for c in clips if c[0] not in drop]
    yield from clips


def generate(root: Path, *, full: bool = False, frames: int | None = None) -> dict[str, int]:
    """Write the demo corpus under ``root/ravdess`` and ``root/crema_d``; keep existing files.

    Args:
        full: the real corpus sizes (1,440 + 7,442 files) instead of the small subset.
        frames: a fixed frame count for every clip instead of realistic lengths.

    Returns:
        Files per dataset.
    """
    counts: dict[str, int] = {}
    for dataset, clips, frames_range in (
        ("ravdess", ravdess_clips(full=full), RAVDESS_FRAMES),
        ("crema_d", crema_d_clips(full=full), CREMA_D_FRAMES),
    ):
        count = 0
        for rel, emotion, actor, intense in clips:
            path = root / dataset / rel
            count += 1
            if path.exists():
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            save_npy_atomic(path, spectrogram(rel, emotion, actor, frames_range=frames_range, frames=frames, intense=intense))
        counts[dataset] = count
        log.info("demo corpus %s: %d files under %s", dataset, count, root / dataset)
    return counts
