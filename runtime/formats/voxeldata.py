"""The voxel data a NRRD or MetaImage header points to, checked before it is read, and headers kept once checked.

A header may name any file as its data, and declare or compress any number of bytes: the data file
must lie in the header's folder, and the bytes there must be able to hold what the header declares
(and, compressed, inflate to exactly that) before any voxel is read. A header checked to find a
scan's grid is kept, while its files are unchanged, for the read that follows.
"""

from __future__ import annotations

import bz2
import math
import os
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import BinaryIO, Generic, TypeVar

import numpy as np

from ..errors import InputError
from ..image import require_regular_file
from ..memory import MB

# A header is text at the start of its file: this much is read first, and more, up to MAX_HEADER_BYTES, only when
# the header has not ended in it; a header longer than that is not a scan's header.
HEADER_CHUNK = 64 * 1024
MAX_HEADER_BYTES = 4 * MB
# DEFLATE cannot make more than about 1032 bytes of one compressed byte.
MAX_DEFLATE_RATIO = 1032
# Compressed data is at most a little larger than what it inflates to (stored blocks, bzip2's worst case)...
MAX_EXPANSION = 1.02
# ...plus room for what a header may put before its voxels (line skips, a container's own header).
SLACK_BYTES = MB
CHUNK = MB
# More bytes of voxels than any scan holds (256 TB): refused before any arithmetic on them.
MAX_DECLARED_BYTES = 1 << 48
# zlib window bits: gzip only (as NRRD's gzip encoding), or zlib and gzip detected (as MetaImage does).
GZIP, ZLIB_OR_GZIP, BZIP2 = 16 + 15, 32 + 15, "bzip2"
# Checked headers kept for the reads that follow (each a few KB; a DICOM listing, its slices' headers).
KEPT_HEADERS = 8

T = TypeVar("T")


def header_bytes(path: Path, ended: Callable[[bytes], bool]) -> bytes:
    """The start of a file, for its header to be parsed from: HEADER_CHUNK bytes, or up to MAX_HEADER_BYTES when
    the header has not ended in them (ended(head) is False); the whole file when shorter."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(HEADER_CHUNK)
            if len(head) == HEADER_CHUNK and not ended(head):
                head += handle.read(MAX_HEADER_BYTES - HEADER_CHUNK)
            return head
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def data_file_inside(header: Path, name: str) -> Path:
    """The data file that a detached header names: it must lie in the header's folder (or below it) and be a file."""
    # As for dataset.json, checked on the path as written, not its symlink target: a folder of symlinks to
    # files kept elsewhere is fine, while '..' or an absolute path that climbs out of the folder is not.
    folder = Path(os.path.abspath(header.parent))
    path = Path(os.path.normpath(folder / name))
    what = f"{header}: data file {name[:200]!r}"
    if not name or folder not in path.parents:
        raise InputError(f"{what} leaves the folder of its header ({folder})")
    try:
        exists = path.exists()
    except OSError:  # a name too long for the file system
        exists = False
    if not exists:
        raise InputError(f"{what} does not exist beside its header")
    require_regular_file(path, what)
    return path


def check_stored(source: str | Path, available: int, declared: int) -> None:
    """Uncompressed voxels: the data must hold at least the bytes the header declares."""
    if available < declared:
        raise InputError(f"{source}: truncated: {available} bytes of voxel data, the header declares {declared}")


def check_declared(source: str | Path, shape: tuple[int, ...], itemsize: int) -> None:
    """Refuse sizes no scan has (their byte count would overflow the arithmetic of a memory plan)."""
    if math.prod(shape) * itemsize > MAX_DECLARED_BYTES:
        raise InputError(f"{source}: the header declares {' x '.join(map(str, shape))} voxels, more than any scan")


def check_compressed_size(source: str | Path, length: int, declared: int, codec: int | str) -> None:
    """Compressed voxels, from their size alone: length bytes must be able to inflate to the declared bytes,
    and be no larger than data that inflates to them can be."""
    if codec != BZIP2 and declared > length * MAX_DEFLATE_RATIO:
        raise InputError(f"{source}: truncated: {length} bytes of compressed voxel data cannot hold the "
                         f"{declared} bytes the header declares")
    if length > declared * MAX_EXPANSION + SLACK_BYTES:
        raise InputError(f"{source}: {length} bytes of compressed voxel data, more than the {declared} bytes "
                         "the header declares they inflate to")


def inflate(source: str | Path, handle: BinaryIO, length: int, declared: int, codec: int | str) -> np.ndarray:
    """Compressed voxels (the next length bytes of handle), inflated: exactly the declared bytes (uint8), or
    InputError. Inflation stops one chunk past the declared size: a small file that would inflate to gigabytes
    costs nothing, and the memory for the declared bytes is taken only as they come."""
    inflated = _Inflated(declared)
    window = _Window(handle, length)
    try:
        if codec == BZIP2:
            _bzip2_into(window, inflated)
        else:
            _zlib_into(window, inflated, int(codec))
    except (zlib.error, OSError, EOFError, ValueError) as exc:
        raise InputError(f"{source}: not valid compressed data ({exc})") from None
    if inflated.total > declared:
        raise InputError(f"{source}: the compressed voxel data inflates to more than the {declared} bytes its "
                         "header declares")
    if inflated.total < declared:
        raise InputError(f"{source}: truncated: the compressed voxel data inflates to {inflated.total} bytes, the "
                         f"header declares {declared}")
    return inflated.buffer


class _Window:
    """The next length bytes of a file, read in chunks."""

    def __init__(self, handle: BinaryIO, length: int) -> None:
        self.handle, self.left = handle, length

    def read(self, size: int) -> bytes:
        """Up to size bytes, none past the window's end."""
        data = self.handle.read(min(size, self.left))
        self.left -= len(data)
        return data


class _Inflated:
    """The bytes inflated so far: kept while they fit the declared size, counted past it."""

    def __init__(self, declared: int) -> None:
        self.buffer = np.empty(declared, np.uint8)  # not filled: its pages are taken as the data comes
        self.total = 0

    @property
    def over(self) -> bool:
        """True once more bytes than declared have come."""
        return self.total > len(self.buffer)

    def add(self, data: bytes) -> None:
        """Keep data after the bytes so far (count it only, when it does not fit)."""
        end = self.total + len(data)
        if end <= len(self.buffer):
            self.buffer[self.total : end] = np.frombuffer(data, np.uint8)
        self.total = end


def _zlib_into(handle: _Window, inflated: _Inflated, wbits: int) -> None:
    """Inflate the zlib or gzip stream at handle (its first member), stopping just past the declared size."""
    inflater = zlib.decompressobj(wbits)
    while not inflater.eof and not inflated.over:
        data = handle.read(CHUNK)
        if not data:
            inflated.add(inflater.flush())
            break
        while data and not inflater.eof and not inflated.over:
            inflated.add(inflater.decompress(data, CHUNK))
            data = inflater.unconsumed_tail


def _bzip2_into(handle: _Window, inflated: _Inflated) -> None:
    """Inflate the bzip2 stream at handle, stopping just past the declared size."""
    inflater = bz2.BZ2Decompressor()
    while not inflater.eof and not inflated.over:
        data = b""
        if inflater.needs_input:
            data = handle.read(CHUNK)
            if not data:
                break
        inflated.add(inflater.decompress(data, CHUNK))


def file_stamp(*paths: Path) -> tuple[tuple[str, int, int, int], ...]:
    """Name, size, modification time and inode of each file: what tells a file changed since it was checked."""
    stamps = []
    for path in paths:
        status = os.stat(path)
        stamps.append((os.fspath(path), status.st_size, status.st_mtime_ns, status.st_ino))
    return tuple(stamps)


class CheckedCache(Generic[T]):
    """The last few checked headers, each reused while the files it was checked from are unchanged: a scan's header
    checked for its grid is not parsed (nor its data inflated, nor a DICOM series listed) again to read it."""

    def __init__(self, size: int = KEPT_HEADERS) -> None:
        self._size = size
        self._entries: OrderedDict[Hashable, tuple[T, Hashable]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, check: Callable[[], T], stamp: Callable[[T], Hashable]) -> T:
        """The value kept for key while stamp(value) is unchanged; else check() (InputError is not kept)."""
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None and _stamp_or_none(stamp, entry[0]) == entry[1]:
            with self._lock:
                if key in self._entries:
                    self._entries.move_to_end(key)
            return entry[0]
        value = check()
        seen = _stamp_or_none(stamp, value)
        with self._lock:
            self._entries.pop(key, None)
            if seen is not None:
                self._entries[key] = (value, seen)
                while len(self._entries) > self._size:
                    self._entries.popitem(last=False)
        return value


def _stamp_or_none(stamp: Callable[[T], Hashable], value: T) -> Hashable | None:
    try:
        return stamp(value)
    except OSError:  # a file gone: check again
        return None
