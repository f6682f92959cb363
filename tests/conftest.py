"""Shared fixtures: tiny corpora, an isolated CNN_FEATURES_HOME, the reference model."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.s3_server import s3_bucket, s3_server  # noqa: F401 - fixtures for every test module

# Frames of the tiny test clips: above the reference CNN's 16-frame minimum,
# small enough that a shard of a dozen files extracts in well under a second.
TINY_FRAMES = (24, 40)


@pytest.fixture(scope="session")
def model_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CNN_FEATURES_HOME shared by the session, so the reference model is built once."""
    return tmp_path_factory.mktemp("home")


@pytest.fixture
def home(model_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the package's settings at the session home and allow paths under it."""
    monkeypatch.setenv("CNN_FEATURES_HOME", str(model_home))
    monkeypatch.delenv("CNN_FEATURES_ALLOWED_ROOTS", raising=False)
    monkeypatch.delenv("CNN_FEATURES_TEST_FAULT", raising=False)
    return model_home


@pytest.fixture(scope="session")
def reference_model(model_home: Path) -> dict[str, Any]:
    """The reference model's info, created (in a fresh process) once per session."""
    from cnn_features.config import load_settings
    from cnn_features.plan import check_model

    old = os.environ.get("CNN_FEATURES_HOME")
    os.environ["CNN_FEATURES_HOME"] = str(model_home)
    try:
        return check_model(None, load_settings())
    finally:
        if old is None:
            del os.environ["CNN_FEATURES_HOME"]
        else:
            os.environ["CNN_FEATURES_HOME"] = old


def write_clip(path: Path, array: np.ndarray) -> Path:
    """Save an array as .npy, creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, array, allow_pickle=False)
    return path


def tiny_spectrogram(seed: int, frames: int | None = None) -> np.ndarray:
    """A 128 x frames float32 spectrogram, deterministic per seed."""
    rng = np.random.default_rng(seed)
    n = frames if frames is not None else int(rng.integers(*TINY_FRAMES))
    return rng.standard_normal((128, n)).astype(np.float32)


def make_ravdess(root: Path, *, actors: int = 2, emotions: int = 3, frames: int | None = None) -> list[str]:
    """Write a small RAVDESS-layout corpus; return the relative paths."""
    rels = []
    for actor in range(1, actors + 1):
        for emotion in range(1, emotions + 1):
            rel = f"Actor_{actor:02d}/03-01-{emotion:02d}-01-01-01-{actor:02d}.npy"
            write_clip(root / rel, tiny_spectrogram(actor * 100 + emotion, frames))
            rels.append(rel)
    return sorted(rels)


class PickleBomb:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def add_bad_inputs(root: Path, marker: Path) -> dict[str, str]:
    """Add one file of each bad-input class to a RAVDESS-layout root; return rel -> expected reason words.

    Everything goes into ``Actor_77``, a folder no generated corpus uses.
    """
    bad: dict[str, str] = {}
    actor = root / "Actor_77"
    actor.mkdir(parents=True, exist_ok=True)

    full = actor / "03-01-04-01-01-01-77.npy"
    np.save(full, tiny_spectrogram(7, 32))
    data = full.read_bytes()
    (actor / "03-01-04-01-01-01-77.npy").write_bytes(data[: len(data) // 2])
    bad["Actor_77/03-01-04-01-01-01-77.npy"] = "truncated"

    with open(actor / "03-01-04-01-01-02-77.npy", "wb") as fh:
        np.save(fh, np.array([PickleBomb(marker)], dtype=object), allow_pickle=True)
    bad["Actor_77/03-01-04-01-01-02-77.npy"] = "pickle"

    write_clip(actor / "03-01-04-01-02-01-77.npy", np.zeros((128, 32, 2), dtype=np.float32))
    bad["Actor_77/03-01-04-01-02-01-77.npy"] = "2-D"

    nan = tiny_spectrogram(8, 32)
    nan[3, 5] = np.nan
    nan[4, 6] = np.inf
    write_clip(actor / "03-01-04-01-02-02-77.npy", nan)
    bad["Actor_77/03-01-04-01-02-02-77.npy"] = "NaN"

    write_clip(actor / "03-01-04-02-01-01-77.npy", tiny_spectrogram(9, 8))
    bad["Actor_77/03-01-04-02-01-01-77.npy"] = "frames"

    write_clip(actor / "03-01-04-02-01-02-77.npy", np.ones((128, 32), dtype=np.int16))
    bad["Actor_77/03-01-04-02-01-02-77.npy"] = "dtype int16"

    write_clip(actor / "03-01-04-02-02-01-77.npy", np.ones((128, 32), dtype=np.complex64))
    bad["Actor_77/03-01-04-02-02-01-77.npy"] = "dtype complex64"

    (actor / "notes.txt").write_text("not a spectrogram\n")  # not an input: ignored, not bad (IGNORED_EXTRA)

    (actor / "03-01-04-02-02-02-77.npy").write_bytes(b"this is not numpy at all")
    bad["Actor_77/03-01-04-02-02-02-77.npy"] = "not a .npy file"

    outside = root.parent / "outside.npy"
    np.save(outside, tiny_spectrogram(10, 32))
    (actor / "03-01-05-01-01-01-77.npy").symlink_to(outside)
    bad["Actor_77/03-01-05-01-01-01-77.npy"] = "outside the dataset root"

    write_clip(actor / "angry_take_3.npy", tiny_spectrogram(11, 32))
    bad["Actor_77/angry_take_3.npy"] = "does not follow RAVDESS"

    # The audio-visual (01-) and audio-only (03-) files of one take are one clip:
    # the first in sorted order is extracted, the second reported.
    write_clip(actor / "01-01-06-01-01-01-77.npy", tiny_spectrogram(12, 32))
    write_clip(actor / "03-01-06-01-01-01-77.npy", tiny_spectrogram(13, 32))
    bad["Actor_77/03-01-06-01-01-01-77.npy"] = "duplicate clip id"

    # A header promising 128 x 10^9 float32 (512 GB): refused before any data is read.
    with open(actor / "03-01-05-01-01-02-77.npy", "wb") as fh:
        np.lib.format.write_array_header_2_0(fh, {"descr": "<f4", "fortran_order": False, "shape": (128, 10**9)})
        fh.write(b"\0" * 64)
    bad["Actor_77/03-01-05-01-01-02-77.npy"] = "element limit"
    return bad


# Good files add_bad_inputs writes besides the bad ones.
GOOD_EXTRA = ("Actor_77/01-01-06-01-01-01-77.npy",)
# Files add_bad_inputs writes that are not spectrograms by name: ignored, neither bad nor extracted.
IGNORED_EXTRA = ("Actor_77/notes.txt",)


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make ``folder`` refuse new files, even to root, and undo it afterwards.

    As root, permission bits are ignored, so the folder is made immutable
    (``chattr +i``); otherwise its write bits are removed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        mode = folder.stat().st_mode
        folder.chmod(0o500)
        try:
            yield
        finally:
            folder.chmod(mode)
        return
    if shutil.which("chattr") is None:
        import pytest

        pytest.skip("running as root without chattr: cannot make a folder read-only")
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        import pytest

        pytest.skip(f"chattr +i not supported here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def record_lineage(shards: list[dict[str, Any]], *, device: str = "cpu") -> None:
    """Write each shard's lineage record for the features already in its (local) output, as a worker would.

    For tests that write features by hand: verification checks every
    feature against its record.
    """
    from cnn_features import lineage
    from cnn_features.stores import LocalStore

    for shard in shards:
        source, output = LocalStore(Path(shard["input"])), LocalStore(Path(shard["output"]))
        context = {
            "model_digest": shard["model"]["digest"],
            "model_sha256": shard["model"]["sha256"],
            "keras_backend": "test",
            "keras_version": "test",
            "device": device,
            "precision": "float32",
            "shard_id": shard["shard_id"],
            "run_id": "test",
        }
        entries = [
            {
                **context,
                "feature": rel,
                "input_sha256": lineage.sha256_hex((source.root / rel).read_bytes()),
                "input_stat": lineage.input_stat(source, rel),
                "feature_sha256": lineage.sha256_hex((output.root / rel).read_bytes()),
            }
            for rel in shard["files"]
            if (output.root / rel).is_file()
        ]
        output.write(lineage.record_name(shard["shard_id"]), lineage.encode_record(entries))
