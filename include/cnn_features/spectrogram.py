"""Read and validate spectrogram ``.npy`` files, never unpickling anything."""

from __future__ import annotations

import io
import math
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnn_features.errors import InvalidSpectrogram

# Largest spectrogram accepted, in elements, checked from the header before any
# data is read: 128 mel bins x 100,000 frames (over 16 minutes at a 10 ms hop)
# is far beyond any clip in these corpora and 51 MB as float32. What such a clip
# costs in the model (gigabytes of activations) is bounded separately: each
# worker sizes its passes to a memory budget (``memory``, ``worker.pass_size``).
MAX_ELEMENTS = 128 * 100_000
# Real floating dtypes a spectrogram may be stored in; all are read as float32.
_FLOAT_KINDS = "f"
# Largest input file or object read, checked before reading it: the element
# limit at the widest float (16-byte long double) plus room for a header.
MAX_INPUT_BYTES = MAX_ELEMENTS * 16 + 65_536
_MAGIC = b"\x93NUMPY"
# Magic string plus the two version bytes; the header length follows.
_MAGIC_LEN = len(_MAGIC) + 2
# Bytes read first: every header numpy writes for a 2-D array (128 bytes in
# format 1.0), and the start of the data.
_HEAD_BYTES = 4096
# A file changed less than this before it was read is read, but its stat does
# not vouch for the bytes (``read_input_stat``): the kernel stamps ctime from
# a clock that ticks every 1-10 ms, so a write in the same tick as the read's
# ``fstat`` leaves it unchanged. Ten ticks of the coarsest clock; its only
# cost is that the next run hashes such a file again.
RACY_WINDOW_NS = 100_000_000
# The clock a read is timed by, against file ctimes (the same real-time clock).
_clock_ns = time.time_ns
# The header exactly as numpy writes it: parsed with this instead of numpy's
# tokenizer and ``ast.literal_eval`` (~70 us a file). Any other layout still
# goes through numpy's parser.
_NUMPY_LAYOUT = re.compile(
    rb"\{'descr': '([<>|=]?[a-zA-Z]\d*)', 'fortran_order': (True|False), "
    rb"'shape': \(((?:\d+, )*\d+,?)?\), \} *\n"
)


@dataclass(frozen=True)
class Header:
    """What an ``.npy`` header promises about the array."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    # Bytes before the data: magic string, version, length field and header.
    offset: int = 0

    @property
    def nbytes(self) -> int:
        """Return how many bytes of data the header promises."""
        return self.dtype.itemsize * math.prod(self.shape)


def _check_inside(real: str, root_real: Path, name: str) -> None:
    root = str(root_real)
    if real != root and not real.startswith(root if root.endswith(os.sep) else root + os.sep):
        msg = f"{name}: resolves to {real}, outside the dataset root {root_real}"
        raise InvalidSpectrogram(msg)


def _open(path: Path, name: str, inside: Path | None) -> int:
    """Open a regular file for reading; with ``inside`` (a resolved root), refuse one that lies outside it.

    Where the system has ``O_PATH`` and ``/proc``, the path is first resolved
    without opening what it names (a device, a FIFO or a FUSE file is never
    opened): containment and the file type are checked on that handle, and
    the file is then opened through it, so a symlink swapped in meanwhile
    cannot redirect the read. The opened file is checked again either way.
    ``O_NONBLOCK`` keeps a FIFO planted in the dataset from hanging the open.
    """
    located = _locate(path, name, inside)
    try:
        if located is not None:
            try:
                fd = os.open(f"/proc/self/fd/{located}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except FileNotFoundError:  # no /proc: open by path, checked again below
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        else:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        msg = f"{name}: cannot read ({exc.strerror or exc})"
        raise InvalidSpectrogram(msg) from None
    finally:
        if located is not None:
            os.close(located)
    try:
        if inside is not None:
            try:
                real = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # no /proc: resolve the path instead
                real = os.path.realpath(path)
            _check_inside(real, inside, name)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            msg = f"{name}: not a regular file"
            raise InvalidSpectrogram(msg)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _locate(path: Path, name: str, inside: Path | None) -> int | None:
    """Return an ``O_PATH`` handle on ``path`` once it is checked to be a regular file inside ``inside``.

    Nothing is opened for reading here. Returns None where the system has no
    ``O_PATH`` or no ``/proc`` (the caller checks the opened file instead).
    """
    o_path = getattr(os, "O_PATH", None)
    if o_path is None or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        handle = os.open(path, o_path | os.O_CLOEXEC)
    except OSError as exc:
        msg = f"{name}: cannot read ({exc.strerror or exc})"
        raise InvalidSpectrogram(msg) from None
    try:
        if inside is not None:
            _check_inside(os.readlink(f"/proc/self/fd/{handle}"), inside, name)
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            msg = f"{name}: not a regular file"
            raise InvalidSpectrogram(msg)
    except BaseException:
        os.close(handle)
        raise
    return handle


def _read_head(fd: int, name: str) -> tuple[Header, bytes]:
    """Read and parse the header at the start of ``fd``; return it and every byte read so far."""
    try:
        head = os.read(fd, _HEAD_BYTES)
    except OSError as exc:
        msg = f"{name}: cannot read ({exc.strerror or exc})"
        raise InvalidSpectrogram(msg) from None
    if len(head) < _MAGIC_LEN + 2 or head[: len(_MAGIC)] != _MAGIC:
        msg = f"{name}: not a .npy file (no {_MAGIC!r} magic string at the start)"
        raise InvalidSpectrogram(msg)
    major = head[len(_MAGIC)]
    _, end = _header_span(head, major, name)
    if len(head) < end:
        head += _read_exactly(fd, end - len(head))
    if len(head) < end:
        msg = f"{name}: corrupt .npy header (file ends inside it)"
        raise InvalidSpectrogram(msg)
    return _parse_header(head[:end], major, name), head


def _header_span(head: bytes, major: int, name: str) -> tuple[int, int]:
    """Return where the header text starts and ends, from the version and length bytes."""
    if major == 1:
        start = _MAGIC_LEN + 2
    elif major in (2, 3):
        start = _MAGIC_LEN + 4
    else:
        msg = f"{name}: unsupported .npy format version {major}"
        raise InvalidSpectrogram(msg)
    length = int.from_bytes(head[_MAGIC_LEN:start], "little") if len(head) >= start else 0
    return start, start + length


def _parse_header(raw: bytes, major: int, name: str) -> Header:
    """Parse header bytes (magic included); numpy's own layout fast, anything else with numpy's parser."""
    start = _MAGIC_LEN + (2 if major == 1 else 4)
    if (match := _NUMPY_LAYOUT.fullmatch(raw, start)) is not None:
        descr, fortran, dims = match.groups()
        shape = tuple(int(d) for d in dims.split(b",") if d.strip())
        try:
            dtype = np.dtype(descr.decode("ascii"))
        except TypeError as exc:
            msg = f"{name}: corrupt .npy header ({exc})"
            raise InvalidSpectrogram(msg) from None
        return Header(shape=shape, dtype=dtype, fortran_order=fortran == b"True", offset=len(raw))
    fh = io.BytesIO(raw[_MAGIC_LEN:])
    try:
        if major == 1:
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(fh)
    except (ValueError, SyntaxError) as exc:
        msg = f"{name}: corrupt .npy header ({exc})"
        raise InvalidSpectrogram(msg) from None
    return Header(shape=tuple(shape), dtype=np.dtype(dtype), fortran_order=fortran_order, offset=len(raw))


def _read_exactly(fd: int, size: int) -> bytes:
    """Read up to ``size`` bytes from ``fd``, fewer only at the end of the file."""
    chunks: list[bytes] = []
    while size > 0 and (chunk := os.read(fd, size)):
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_header(path: Path, relpath: str | None = None, *, inside: Path | None = None) -> Header:
    """Read an ``.npy`` header without reading the data.

    With ``inside`` (a resolved dataset root), a file that resolves outside
    it is refused.
    """
    name = relpath or str(path)
    fd = _open(path, name, inside)
    try:
        header, _ = _read_head(fd, name)
    finally:
        os.close(fd)
    return header


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


def read_input(path: Path, name: str, *, inside: Path | None = None, max_bytes: int) -> bytes:
    """Return the whole file at ``path`` after checking it is a regular file of at most ``max_bytes``.

    With ``inside`` (a resolved dataset root), a file that resolves outside
    it is refused. The size is checked from ``fstat`` before anything is read.
    """
    return read_input_stat(path, name, inside=inside, max_bytes=max_bytes)[0]


def read_input_stat(
    path: Path, name: str, *, inside: Path | None = None, max_bytes: int
) -> tuple[bytes, os.stat_result | None]:
    """Return the whole file at ``path`` (as ``read_input``) and the ``fstat`` of the descriptor it was read from.

    The stat is taken before the first byte is read, so it describes the
    file whose bytes these are (a link's target, never the link). It is None
    when the file changed while it was read (a second ``fstat`` differs) or
    changed less than ``RACY_WINDOW_NS`` before it (a write within the same
    timestamp tick would leave its ctime as it is): such a stat cannot vouch
    for these bytes.
    """
    fd = _open(path, name, inside)
    try:
        started = _clock_ns()
        before = os.fstat(fd)
        if before.st_size > max_bytes:
            msg = f"{name}: {before.st_size:,} bytes, over the {max_bytes:,}-byte input limit; not read"
            raise InvalidSpectrogram(msg)
        data = _read_exactly(fd, before.st_size + 1)
        after = os.fstat(fd)
    except OSError as exc:
        msg = f"{name}: unreadable .npy ({exc.strerror or exc})"
        raise InvalidSpectrogram(msg) from None
    finally:
        os.close(fd)
    steady = _identity(before) == _identity(after) and len(data) == before.st_size
    return data, before if steady and abs(started - before.st_ctime_ns) >= RACY_WINDOW_NS else None


def stat_input(path: Path, name: str, *, inside: Path | None = None) -> os.stat_result:
    """Return the stat of the regular file a read of ``path`` would get: links followed, as ``_open`` follows them.

    A path that is itself a regular file costs one ``lstat``. A link is
    resolved without opening what it names (``_locate``); with ``inside``
    (a resolved dataset root) one that resolves outside it is refused.

    Raises:
        InvalidSpectrogram: missing, not a regular file, or outside ``inside``.
    """
    try:
        found = os.lstat(path)
        if stat.S_ISREG(found.st_mode):
            return found
        handle = _locate(path, name, inside)
        if handle is None:  # no O_PATH or /proc: resolve the path instead
            found = os.stat(path)
            if inside is not None:
                _check_inside(os.path.realpath(path), inside, name)
        else:
            try:
                found = os.fstat(handle)
            finally:
                os.close(handle)
    except OSError as exc:
        msg = f"{name}: cannot stat ({exc.strerror or exc})"
        raise InvalidSpectrogram(msg) from None
    if not stat.S_ISREG(found.st_mode):
        msg = f"{name}: not a regular file"
        raise InvalidSpectrogram(msg)
    return found


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """Return what changes whenever a file's bytes do: device, inode, size, mtime and ctime."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def parse_spectrogram(
    data: bytes | bytearray | memoryview,
    name: str,
    *,
    n_mels: int | None,
    min_frames: int,
    frames: int | None = None,
) -> np.ndarray:
    """Return the validated spectrogram held in ``data`` (a whole ``.npy`` file) as C-contiguous float32.

    The header is parsed and checked before the data is looked at; nothing
    is ever unpickled. Local files and S3 objects both come through here.

    Raises:
        InvalidSpectrogram: not ``.npy``, truncated, pickled objects, wrong
            ndim/dtype/size, or non-finite values.
    """
    header = _header_of(bytes(data[:_HEAD_BYTES]), data, name)
    check_header(header, name, n_mels=n_mels, min_frames=min_frames, frames=frames)
    available = len(data) - header.offset
    if available < header.nbytes:
        msg = f"{name}: truncated, {len(data)} bytes for {header.offset + header.nbytes} expected"
        raise InvalidSpectrogram(msg)
    count = header.nbytes // header.dtype.itemsize
    array = np.frombuffer(data, dtype=header.dtype, count=count, offset=header.offset)
    array = array.reshape(header.shape, order="F" if header.fortran_order else "C")
    # Cast first: a float64 value beyond float32's range becomes inf here.
    with np.errstate(over="ignore", invalid="ignore"):
        array = np.ascontiguousarray(array, dtype=np.float32)
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(array.size - np.count_nonzero(finite))
        msg = f"{name}: {bad} NaN or infinite value(s)"
        raise InvalidSpectrogram(msg)
    return array


def _header_of(head: bytes, data: bytes | bytearray | memoryview, name: str) -> Header:
    """Parse the header at the start of a whole file held in memory."""
    if len(head) < _MAGIC_LEN + 2 or head[: len(_MAGIC)] != _MAGIC:
        msg = f"{name}: not a .npy file (no {_MAGIC!r} magic string at the start)"
        raise InvalidSpectrogram(msg)
    major = head[len(_MAGIC)]
    _, end = _header_span(head, major, name)
    if len(data) < end:
        msg = f"{name}: corrupt .npy header (file ends inside it)"
        raise InvalidSpectrogram(msg)
    return _parse_header(bytes(data[:end]), major, name)


def load_spectrogram(
    path: Path,
    *,
    relpath: str | None = None,
    n_mels: int | None,
    min_frames: int,
    frames: int | None = None,
    inside: Path | None = None,
) -> np.ndarray:
    """Load a validated spectrogram file as C-contiguous float32 (mels x frames).

    One open and one read (``read_input``), then ``parse_spectrogram``. With
    ``inside`` (a resolved dataset root), a file that resolves outside it is
    refused.
    """
    name = relpath or str(path)
    data = read_input(path, name, inside=inside, max_bytes=MAX_INPUT_BYTES)
    return parse_spectrogram(data, name, n_mels=n_mels, min_frames=min_frames, frames=frames)
