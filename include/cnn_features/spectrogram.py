"""Read and validate spectrogram ``.npy`` files, never unpickling anything."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnn_features.errors import InvalidSpectrogram

# Largest spectrogram accepted, in elements, checked from the header before any
# data is read: 128 mel bins x 100,000 frames (over 16 minutes at a 10 ms hop)
# is far beyond any clip in these corpora and still only 51 MB as float32.
MAX_ELEMENTS = 128 * 100_000
# Real floating dtypes a spectrogram may be stored in; all are read as float32.
_FLOAT_KINDS = "f"


@dataclass(frozen=True)
class Header:
    """What an ``.npy`` header promises about the array."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool


def resolve_inside(root: Path, relpath: str) -> Path:
    """Return ``root/relpath``, refusing anything that resolves outside ``root``.

    Catches ``..`` components and symlinks (of the file or any folder on the
    way) that point out of the dataset.
    """
    root_real = root.resolve()
    path = root / relpath
    real = path.resolve()
    if real != root_real and root_real not in real.parents:
        msg = f"{relpath}: resolves to {real}, outside the dataset root {root_real}"
        raise InvalidSpectrogram(msg)
    return path


def read_header(path: Path, relpath: str | None = None) -> Header:
    """Read an ``.npy`` header without reading the data."""
    name = relpath or str(path)
    try:
        with open(path, "rb") as fh:
            try:
                major, _minor = np.lib.format.read_magic(fh)
            except ValueError as exc:
                msg = f"{name}: not a .npy file ({exc})"
                raise InvalidSpectrogram(msg) from None
            try:
                if major == 1:
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
                elif major in (2, 3):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
                else:
                    msg = f"{name}: unsupported .npy format version {major}"
                    raise InvalidSpectrogram(msg)
            except (ValueError, SyntaxError) as exc:
                msg = f"{name}: corrupt .npy header ({exc})"
                raise InvalidSpectrogram(msg) from None
    except OSError as exc:
        msg = f"{name}: cannot read ({exc.strerror or exc})"
        raise InvalidSpectrogram(msg) from None
    return Header(shape=tuple(shape), dtype=np.dtype(dtype), fortran_order=fortran)


def check_header(
    header: Header, name: str, *, n_mels: int | None, min_frames: int, frames: int | None = None
) -> None:
    """Raise unless the header describes a usable (mels x frames) real float array."""
    if header.dtype.hasobject:
        msg = f"{name}: holds Python objects (pickled data); refused, pickles are never loaded"
        raise InvalidSpectrogram(msg)
    if header.dtype.kind not in _FLOAT_KINDS:
        msg = f"{name}: expected real floating-point data, got dtype {header.dtype}"
        raise InvalidSpectrogram(msg)
    if len(header.shape) != 2:
        msg = f"{name}: expected a 2-D (mel bins x frames) spectrogram, got shape {header.shape}"
        raise InvalidSpectrogram(msg)
    mels, n_frames = header.shape
    if mels * n_frames > MAX_ELEMENTS:
        msg = f"{name}: shape {header.shape} exceeds the {MAX_ELEMENTS:,}-element limit; not loaded"
        raise InvalidSpectrogram(msg)
    if n_mels is not None and mels != n_mels:
        msg = f"{name}: expected {n_mels} mel bins, got {mels} (shape {header.shape})"
        raise InvalidSpectrogram(msg)
    if n_frames < min_frames:
        msg = f"{name}: {n_frames} frames, the model needs at least {min_frames}"
        raise InvalidSpectrogram(msg)
    if frames is not None and n_frames != frames:
        msg = f"{name}: the model takes exactly {frames} frames, got {n_frames}"
        raise InvalidSpectrogram(msg)


def load_spectrogram(
    path: Path,
    *,
    relpath: str | None = None,
    n_mels: int | None,
    min_frames: int,
    frames: int | None = None,
) -> np.ndarray:
    """Load a validated spectrogram as C-contiguous float32 (mels x frames).

    Raises:
        InvalidSpectrogram: the file is not ``.npy``, is truncated, holds
            pickled objects, has the wrong ndim/dtype/size, or non-finite values.
    """
    name = relpath or str(path)
    header = read_header(path, name)
    check_header(header, name, n_mels=n_mels, min_frames=min_frames, frames=frames)
    expected = header.dtype.itemsize * int(np.prod(header.shape))
    try:
        size = os.path.getsize(path)
        if size < expected:
            msg = f"{name}: truncated, {size} bytes on disk for {expected} bytes of data"
            raise InvalidSpectrogram(msg)
        array = np.load(path, allow_pickle=False, mmap_mode=None)
    except (ValueError, EOFError, OSError) as exc:
        msg = f"{name}: unreadable .npy ({exc})"
        raise InvalidSpectrogram(msg) from None
    # Cast first: a float64 value beyond float32's range becomes inf here.
    with np.errstate(over="ignore", invalid="ignore"):
        array = np.ascontiguousarray(array, dtype=np.float32)
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        msg = f"{name}: {bad} NaN or infinite value(s)"
        raise InvalidSpectrogram(msg)
    return array
