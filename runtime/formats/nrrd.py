"""NRRD (.nrrd, .nhdr): the header parsed with pynrrd (a small pure-Python reader of the format 3D Slicer
writes), the voxels read here.

The header is parsed first, and its data file, the bytes there and the memory the voxels need are
checked before any voxel is read; then exactly the declared bytes are read (compressed data inflated
once, and no further than the declared size) in the header's type and byte order.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import InputError
from ..image import ScanGeometry, require_regular_file, volume_from_array
from ..memory import check_read_budget
from .base import ScanImage, ScanSource, optional_import
from .voxeldata import (
    BZIP2,
    GZIP,
    MAX_HEADER_BYTES,
    SLACK_BYTES,
    CheckedCache,
    check_compressed_size,
    check_declared,
    check_stored,
    data_file_inside,
    file_stamp,
    header_bytes,
    inflate,
)

# NRRD space names (and their 3-letter forms) -> sign flips that take the space to RAS.
_SPACES = {
    "right-anterior-superior": (1, 1, 1), "ras": (1, 1, 1),
    "left-posterior-superior": (-1, -1, 1), "lps": (-1, -1, 1),
    "left-anterior-superior": (-1, 1, 1), "las": (-1, 1, 1),
    "scanner-xyz": (-1, -1, 1),  # scanner coordinates are DICOM's LPS
}
CODECS = {"gzip": GZIP, "gz": GZIP, "bzip2": BZIP2, "bz2": BZIP2}
TEXT = ("ASCII", "ascii", "text", "txt")  # as pynrrd spells them
# Characters a text-encoded value may take ('-1.2345678901234567e+308' and a separator).
MAX_TEXT_CHARS = 32
# The NRRD format's type names -> numpy types (byte order apart); 'block' has no numeric value.
TYPES = {"signed char": "i1", "int8": "i1", "int8_t": "i1", "uchar": "u1", "unsigned char": "u1", "uint8": "u1",
         "uint8_t": "u1", "short": "i2", "short int": "i2", "signed short": "i2", "signed short int": "i2",
         "int16": "i2", "int16_t": "i2", "ushort": "u2", "unsigned short": "u2", "unsigned short int": "u2",
         "uint16": "u2", "uint16_t": "u2", "int": "i4", "signed int": "i4", "int32": "i4", "int32_t": "i4",
         "uint": "u4", "unsigned int": "u4", "uint32": "u4", "uint32_t": "u4", "longlong": "i8", "long long": "i8",
         "long long int": "i8", "signed long long": "i8", "signed long long int": "i8", "int64": "i8",
         "int64_t": "i8", "ulonglong": "u8", "unsigned long long": "u8", "unsigned long long int": "u8",
         "uint64": "u8", "uint64_t": "u8", "float": "f4", "double": "f8"}
ENDIANS = {"little": "<", "big": ">"}
# The longest line that 'line skip' passes over: the lines of another format's header.
MAX_SKIPPED_LINE = 64 * 1024
# The blank line that ends a header (pynrrd strips a line's trailing white space).
HEADER_END = re.compile(rb"\n[ \t\r]*\n")


@dataclass(frozen=True)
class NrrdLayout:
    """A NRRD header and where its voxels lie (checked against the folder and the bytes present, not yet read)."""

    header: dict
    geometry: ScanGeometry
    dtype: np.dtype  # of the stored voxels, in their byte order
    data_path: Path
    offset: int  # where the data starts in data_path (before the lines and bytes the header skips)
    available: int  # bytes of data_path from offset
    detached: bool

    @property
    def encoding(self) -> str:
        """The header's encoding, as written."""
        return str(self.header.get("encoding", ""))

    @property
    def declared(self) -> int:
        """Bytes of voxels the header declares."""
        return self.geometry.voxels * self.geometry.itemsize

    def field(self, *names: str, default: Any = 0) -> Any:
        """The first of names the header has (NRRD spells some fields with or without a space)."""
        return next((self.header[n] for n in names if n in self.header), default)


def strip_suffix(name: str) -> str:
    """The file name without .nrrd / .nhdr."""
    for suffix in (".nrrd", ".nhdr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


class NrrdReader:
    """Reads 3D scalar NRRD volumes; the affine comes from space directions, space origin and space."""

    name = "nrrd"
    suffixes = (".nrrd", ".nhdr")

    def claims(self, path: Path) -> bool:
        """A file named *.nrrd or *.nhdr."""
        return path.name.lower().endswith(self.suffixes)

    def sources(self, path: Path, series: str | None) -> list[ScanSource]:
        """The file itself."""
        return [ScanSource(path, self.name, strip_suffix(path.name))]

    def geometry(self, source: ScanSource) -> ScanGeometry:
        """The scan's shape, voxel storage and affine from its header; its data file and sizes checked."""
        return checked_layout(source.path).geometry

    def read(self, source: ScanSource) -> ScanImage:
        """Check the header, its data file and the memory needed, then load the voxels and build the affine."""
        path = source.path
        layout = checked_layout(path)
        # Text is held whole, and once more as it is parsed; inflated or stored bytes are the voxels themselves.
        check_read_budget(layout.geometry, path, extra=2 * layout.available if layout.encoding in TEXT else 0)
        return ScanImage(volume_from_array(read_voxels(path, layout), layout.geometry.affine, path), source)


_LAYOUTS: CheckedCache[NrrdLayout] = CheckedCache()


def checked_layout(path: Path) -> NrrdLayout:
    """read_layout's answer, kept while the header and data files are unchanged (a scan's grid is checked before
    it is read: its header is parsed once)."""
    return _LAYOUTS.get(os.path.abspath(path), lambda: read_layout(path),
                        lambda layout: file_stamp(path, layout.data_path))


def _parse_header(path: Path) -> tuple[dict, int]:
    """The header's fields (pynrrd's parser) and the offset of the byte after it."""
    nrrd = optional_import("nrrd", "reading NRRD")
    require_regular_file(path)  # never opened otherwise: a named pipe would block
    head = header_bytes(path, lambda text: HEADER_END.search(text) is not None)
    handle = io.BytesIO(head)
    try:
        header = nrrd.read_header(handle)
    except Exception as exc:  # pynrrd raises NRRDError, ValueError, KeyError ...
        raise InputError(f"{path}: not a readable NRRD file ({exc})") from None
    offset = handle.tell()
    missing = [name for name in ("type", "dimension", "sizes", "encoding") if name not in header]
    if missing:
        raise InputError(f"{path}: not a readable NRRD file (its header has no {', '.join(missing)})")
    if offset >= MAX_HEADER_BYTES and "data file" not in header and "datafile" not in header:
        raise InputError(f"{path}: not a readable NRRD file (no end of its header in the first "
                         f"{MAX_HEADER_BYTES >> 20} MB)")
    return dict(header), offset


def _voxel_dtype(path: Path, header: dict) -> np.dtype:
    """The stored voxels' dtype, from the header's type and (for multi-byte binary voxels) endian."""
    name = str(header.get("type"))
    if name not in TYPES:
        raise InputError(f"{path}: not a readable NRRD file (unsupported type {name[:40]!r})")
    dtype = np.dtype(TYPES[name])
    if dtype.itemsize == 1 or header.get("encoding") in TEXT:  # no byte order to choose
        return dtype
    endian = header.get("endian")
    if endian not in ENDIANS:
        raise InputError(f"{path}: not a readable NRRD file (endian must be 'little' or 'big' for {name} voxels, "
                         f"got {endian!r})")
    return dtype.newbyteorder(ENDIANS[endian])


def _shape(path: Path, header: dict) -> tuple[int, int, int]:
    """The sizes of a 3D volume; InputError for any other."""
    sizes = [int(s) for s in np.asarray(header.get("sizes", []), dtype=object).ravel()]
    if len(sizes) != 3 or int(header.get("dimension", -1)) != 3:
        raise InputError(f"{path}: expected a 3D scalar NRRD volume, got dimension {header.get('dimension')} "
                         f"and sizes {sizes}")
    if min(sizes) < 1:
        raise InputError(f"{path}: the NRRD sizes must be positive, got {sizes}")
    return tuple(sizes)  # type: ignore[return-value]


def read_layout(path: Path) -> NrrdLayout:
    """Parse and check a NRRD header: its 3D grid, its data file and the bytes there (no voxel read)."""
    header, offset = _parse_header(path)
    shape = _shape(path, header)
    dtype = _voxel_dtype(path, header)
    check_declared(path, shape, dtype.itemsize)
    geometry = ScanGeometry(shape, nrrd_affine(path, header), dtype.itemsize)
    name = header.get("data file", header.get("datafile"))
    detached = name is not None
    data_path = data_file_inside(path, str(name)) if detached else path
    start = 0 if detached else offset
    available = max(data_path.stat().st_size - start, 0)
    layout = NrrdLayout(header, geometry, dtype, data_path, start, available, detached)
    _check_sizes(path, layout)
    return layout


def files_of(path: Path) -> list[Path]:
    """The files a NRRD scan is made of: its header file, and the data file a detached header names."""
    header, _ = _parse_header(path)
    name = header.get("data file", header.get("datafile"))
    return [path] if name is None else [path, data_file_inside(path, str(name))]


def _check_sizes(path: Path, layout: NrrdLayout) -> None:
    """The bytes present must hold the voxels the header declares, and not hold far more."""
    encoding, declared, available = layout.encoding, layout.declared, layout.available
    skip = int(layout.field("byte skip", "byteskip"))
    lines = int(layout.field("line skip", "lineskip"))
    if skip < -1 or not 0 <= lines <= available or (skip == -1 and encoding in TEXT):
        raise InputError(f"{path}: not a readable NRRD file (byte skip {skip}, line skip {lines})")
    if encoding in CODECS:
        check_compressed_size(path, available, declared + max(skip, 0), CODECS[encoding])
    elif encoding in TEXT:
        count = layout.geometry.voxels
        if available < count or available > count * MAX_TEXT_CHARS + SLACK_BYTES:
            raise InputError(f"{path}: {available} bytes of text cannot hold the {count} values the header declares")
    elif encoding == "raw":
        check_stored(path, available - max(skip, 0), declared)
        if skip != -1 and available > declared + skip + SLACK_BYTES:
            raise InputError(f"{path}: {available} bytes of voxel data, more than the {declared} the header declares")
    else:
        raise InputError(f"{path}: unsupported NRRD encoding {layout.header.get('encoding')!r}")


def read_voxels(path: Path, layout: NrrdLayout) -> np.ndarray:
    """The voxels of a checked layout, (x, y, z) in the stored type: exactly the declared bytes are read (compressed
    data inflated no further), after the lines and bytes the header skips."""
    skip = int(layout.field("byte skip", "byteskip"))
    with open(layout.data_path, "rb") as handle:
        handle.seek(layout.offset)
        _skip_lines(path, handle, int(layout.field("line skip", "lineskip")))  # before inflating, as NRRD has it
        length = layout.available - (handle.tell() - layout.offset)
        if layout.encoding in CODECS:  # the bytes to skip are at the start of the inflated data
            inflated = inflate(path, handle, length, layout.declared + max(skip, 0), CODECS[layout.encoding])
            flat = np.frombuffer(inflated, layout.dtype, offset=max(skip, 0))
        elif layout.encoding in TEXT:
            flat = _text_values(path, handle, length, layout)
        else:
            flat = np.frombuffer(_stored_bytes(path, handle, skip, layout), layout.dtype)
    return flat.reshape(layout.geometry.shape, order="F")


def _skip_lines(path: Path, handle: BinaryIO, lines: int) -> None:
    """Read past the lines the header skips at the start of its data: lines of a header, none longer than
    MAX_SKIPPED_LINE (a file without line ends is not read whole)."""
    for number in range(1, lines + 1):
        if not handle.readline(MAX_SKIPPED_LINE).endswith(b"\n"):
            raise InputError(f"{path}: not a readable NRRD file (line skip {lines}: line {number} of its data has no "
                             f"end in {MAX_SKIPPED_LINE >> 10} KB)")


def _stored_bytes(path: Path, handle: BinaryIO, skip: int, layout: NrrdLayout) -> np.ndarray:
    """The declared bytes of raw voxels (uint8): after skip bytes, or the data's last bytes (byte skip -1); the data
    must hold no more voxels than that."""
    declared = layout.declared
    position = handle.tell()
    end = handle.seek(0, os.SEEK_END)
    start = max(end - declared, 0) if skip == -1 else position + skip
    handle.seek(start)
    data = np.empty(declared, np.uint8)
    count = 0
    while count < declared and (read := handle.readinto(memoryview(data)[count:])):
        count += read
    check_stored(path, count, declared)
    if end - start - declared >= layout.dtype.itemsize:  # as many bytes past the voxels as one more voxel
        raise InputError(f"{path}: {end - start} bytes of voxel data, more than the {declared} the header declares")
    return data


def _text_values(path: Path, handle: BinaryIO, length: int, layout: NrrdLayout) -> np.ndarray:
    """Voxels written as text (the next length bytes of handle, after the bytes the header skips): exactly as many
    values as the header declares."""
    skip = int(layout.field("byte skip", "byteskip"))
    handle.seek(skip, os.SEEK_CUR)
    text = handle.read(max(length - skip, 0))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)  # numpy < 2.3 only warns of text that is not a number
            values = np.fromstring(text, layout.dtype, sep=" ")
    except (ValueError, DeprecationWarning) as exc:
        raise InputError(f"{path}: not a readable NRRD file (its text voxels: {exc})") from None
    if values.size != layout.geometry.voxels:
        raise InputError(f"{path}: {values.size} values of text voxel data, the header declares "
                         f"{layout.geometry.voxels}")
    return values


def nrrd_affine(path: Path, header: dict) -> np.ndarray:
    """The voxel-to-RAS affine of a 3D NRRD header (space directions, space origin, space)."""
    directions = header.get("space directions")
    if directions is None:
        raise InputError(f"{path}: the NRRD header has no 'space directions': its voxels have no position in space")
    rows = [np.asarray(d, float) for d in directions if d is not None and not np.all(np.isnan(np.asarray(d, float)))]
    if len(rows) != 3 or any(r.shape != (3,) for r in rows):
        raise InputError(f"{path}: expected a 3D scalar NRRD volume, got {len(rows)} spatial axes")
    space = str(header.get("space", "")).lower()
    if space not in _SPACES:
        raise InputError(f"{path}: unsupported NRRD space {header.get('space')!r} (expected RAS, LPS or LAS)")
    flip = np.diag([*_SPACES[space], 1.0])
    affine = np.eye(4)
    affine[:3, :3] = np.stack(rows, axis=1)  # each direction is the world step of one array axis
    affine[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), float)
    affine = flip @ affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{path}: the NRRD header's space directions are singular or not finite")
    return affine
