"""MetaImage (.mha, .mhd) with SimpleITK, the reference implementation of the format, and SimpleITK images.

SimpleITK indexes its images (x, y, z) but GetArrayFromImage returns the voxels as (z, y, x);
heartseg's arrays are (x, y, z) like nibabel's, so every conversion here transposes.

A MetaImage header is parsed here first (MetaIO's rules: 'Name = value' lines up to ElementDataFile,
'=' or ':' between them, names case-sensitive, the last of a repeated field kept), its data file and
sizes checked against the folder, the bytes present and the memory budget. ITK is then given a
header written from the parsed values only, naming the checked data file: it reads what was checked.
Compressed voxels are inflated here, once, as they are checked, and no further than the declared size.
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..errors import InputError
from ..image import ScanGeometry, Volume, require_regular_file, volume_from_array
from ..memory import check_read_budget
from .base import ScanImage, ScanSource, optional_import
from .voxeldata import (
    MAX_HEADER_BYTES,
    ZLIB_OR_GZIP,
    CheckedCache,
    check_compressed_size,
    check_declared,
    check_stored,
    data_file_inside,
    file_stamp,
    header_bytes,
    inflate,
)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def strip_suffix(name: str) -> str:
    """The file name without .mha / .mhd."""
    for suffix in (".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def sitk_affine(image: Any) -> np.ndarray:
    """The voxel-to-RAS affine of a 3D SimpleITK image (its origin, spacing and direction are LPS)."""
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(np.asarray(image.GetSpacing(), float))
    affine[:3, 3] = np.asarray(image.GetOrigin(), float)
    return LPS_TO_RAS @ affine


def volume_from_sitk(image: Any, source: str = "SimpleITK image") -> Volume:
    """A Volume (x, y, z array, RAS affine) from a 3D scalar SimpleITK image."""
    sitk = optional_import("SimpleITK", "reading SimpleITK images")
    if image.GetDimension() != 3:
        raise InputError(f"{source}: expected a 3D image, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{source}: expected one value per voxel, got {image.GetNumberOfComponentsPerPixel()}")
    data = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    return volume_from_array(data, sitk_affine(image), source)


def sitk_from_array(data: np.ndarray, affine: np.ndarray) -> Any:
    """A SimpleITK image of an (x, y, z) array on a RAS affine (the inverse of volume_from_sitk)."""
    sitk = optional_import("SimpleITK", "building SimpleITK images")
    lps = LPS_TO_RAS @ np.asarray(affine, float)
    spacing = np.sqrt((lps[:3, :3] ** 2).sum(axis=0))
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data).transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    image.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    return image


# The numpy type of each MetaImage element type, byte order apart (MetaIO's MET_SizeOfType: MET_LONG is 32-bit).
ELEMENT_TYPES = {"MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_INT": "i4",
                 "MET_UINT": "u4", "MET_LONG": "i4", "MET_ULONG": "u4", "MET_LONG_LONG": "i8", "MET_ULONG_LONG": "u8",
                 "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}
ELEMENT_BYTES = {name: np.dtype(code).itemsize for name, code in ELEMENT_TYPES.items()}
# The geometry fields passed on to ITK, their values re-written from the parsed numbers (3 per vector, 9 per
# matrix); any field not named here or in MetaHeader.itk_text is left out of what ITK reads.
VECTOR_FIELDS = ("ElementSpacing", "ElementSize", "Offset", "Position", "Origin", "CenterOfRotation")
MATRIX_FIELDS = ("TransformMatrix", "Rotation", "Orientation")
# The byte order fields, in the order ITK looks for them (the first one present decides).
BYTE_ORDER_FIELDS = ("BinaryDataByteOrderMSB", "ElementByteOrderMSB")
# The names MetaIO takes for voxels that follow the header in its own file.
LOCAL_NAMES = ("LOCAL", "Local", "local")
# The line that ends a header: ElementDataFile, then '=' or ':' and its value.
DATA_FILE_LINE = re.compile(rb"(?:^|\n)[ \t\r\f\v]*ElementDataFile[ \t\r\f\v]*[=:][^\n]*\n")


@dataclass(frozen=True)
class MetaHeader:
    """A MetaImage header's parsed fields, and where and how its voxels are stored (checked, not yet read)."""

    shape: tuple[int, int, int]
    element_type: str
    binary: bool
    compressed: bool
    data_path: Path
    offset: int  # the voxels' first byte in data_path
    length: int  # bytes of (compressed or stored) voxel data from offset
    geometry_lines: tuple[str, ...]
    big_endian: bool = False

    @property
    def declared(self) -> int:
        """Bytes of voxels the header declares."""
        return math.prod(self.shape) * ELEMENT_BYTES[self.element_type]

    @property
    def dtype(self) -> np.dtype:
        """The stored voxels' type, in their byte order."""
        return np.dtype(ELEMENT_TYPES[self.element_type]).newbyteorder(">" if self.big_endian else "<")

    def itk_text(self, data_name: str) -> str:
        """The header ITK is given: the parsed values only, its data in data_name from offset."""
        lines = ["ObjectType = Image", "NDims = 3", *self.geometry_lines,
                 f"BinaryData = {self.binary}", f"BinaryDataByteOrderMSB = {self.big_endian}",
                 f"CompressedData = {self.compressed}",
                 *([f"CompressedDataSize = {self.length}"] if self.compressed else []),
                 f"DimSize = {' '.join(map(str, self.shape))}", "ElementNumberOfChannels = 1",
                 f"HeaderSize = {self.offset}", f"ElementType = {self.element_type}", f"ElementDataFile = {data_name}"]
        return "\n".join(lines) + "\n"


def header_fields(path: Path, head: bytes) -> tuple[dict[str, str], int]:
    """The fields of a MetaImage header up to ElementDataFile, and the offset of the byte after that line."""
    fields: dict[str, str] = {}
    position = 0
    while position < len(head):
        end = head.find(b"\n", position)
        end = len(head) if end < 0 else end
        line = head[position:end].decode("latin-1").strip()
        position = end + 1
        if not line:
            continue
        cut = min((i for i in (line.find("="), line.find(":")) if i >= 0), default=-1)
        if cut <= 0:
            raise InputError(f"{path}: not a MetaImage header (line {line[:40]!r} is not 'Name = value')")
        name, value = line[:cut].strip(), line[cut + 1 :].lstrip("=: \t").strip()
        fields[name] = value
        if name == "ElementDataFile":
            return fields, min(position, len(head))
    within = f" in its first {MAX_HEADER_BYTES >> 20} MB" if len(head) >= MAX_HEADER_BYTES else ""
    raise InputError(f"{path}: not a MetaImage header (no ElementDataFile line{within})")


def _numbers(path: Path, fields: dict[str, str], name: str, count: int) -> list[float] | None:
    """count finite numbers of a field, or None when the header has no such field."""
    if name not in fields:
        return None
    try:
        values = [float(v) for v in fields[name].split()]
    except ValueError:
        values = []
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise InputError(f"{path}: the header's {name} must be {count} finite numbers, got {fields[name][:60]!r}")
    return values


def _integer(path: Path, fields: dict[str, str], name: str, default: int, lowest: int = 0) -> int:
    """An integer field (at least lowest), default when absent."""
    values = _numbers(path, fields, name, 1)
    if values is None:
        return default
    if not values[0].is_integer() or values[0] < lowest or values[0] >= 1 << 62:
        raise InputError(f"{path}: the header's {name} must be an integer of at least {lowest}, got {fields[name]!r}")
    return int(values[0])


def _flag(fields: dict[str, str], name: str, default: bool) -> bool:
    """A boolean field as MetaIO reads it: true when it starts with T, t or 1."""
    value = fields.get(name)
    return default if value is None else value[:1] in ("T", "t", "1")


def _shape(path: Path, fields: dict[str, str]) -> tuple[int, int, int]:
    """DimSize of a 3D scalar image; InputError for any other image."""
    if fields.get("ObjectType", "Image") != "Image":
        raise InputError(f"{path}: a MetaImage {fields['ObjectType']!r} object, not an image")
    ndims = _integer(path, fields, "NDims", 0)
    if ndims != 3:
        raise InputError(f"{path}: expected a 3D image, got NDims = {fields.get('NDims', '(none)')}")
    sizes = _numbers(path, fields, "DimSize", 3)
    if sizes is None or not all(s.is_integer() and s >= 1 for s in sizes):
        raise InputError(f"{path}: the header's DimSize must be 3 positive integers, got {fields.get('DimSize')!r}")
    channels = _integer(path, fields, "ElementNumberOfChannels", 1, lowest=1)
    if channels != 1:
        raise InputError(f"{path}: expected one value per voxel, got {channels}")
    return tuple(int(s) for s in sizes)  # type: ignore[return-value]


def _geometry_lines(path: Path, fields: dict[str, str]) -> tuple[str, ...]:
    """The geometry fields, re-written from their parsed values."""
    lines = []
    for names, count in ((VECTOR_FIELDS, 3), (MATRIX_FIELDS, 9)):
        for name in names:
            values = _numbers(path, fields, name, count)
            if values is not None:
                lines.append(f"{name} = {' '.join(repr(v) for v in values)}")
    return tuple(lines)


def _big_endian(fields: dict[str, str]) -> bool:
    """The byte order of multi-byte voxels, as ITK reads it: the first of the byte order fields present."""
    name = next((name for name in BYTE_ORDER_FIELDS if name in fields), None)
    return name is not None and _flag(fields, name, False)


def _head(path: Path) -> bytes:
    """The start of a MetaImage file, up to its ElementDataFile line (unless the header is too long)."""
    return header_bytes(path, lambda head: DATA_FILE_LINE.search(head) is not None)


def _data_location(path: Path, fields: dict[str, str], local_offset: int) -> tuple[Path, int]:
    """The data file (checked to lie in the header's folder) and where its voxels start before HeaderSize."""
    name = fields["ElementDataFile"]
    if name in LOCAL_NAMES:
        return path, local_offset
    if name.startswith("LIST") or "%" in name:
        raise InputError(f"{path}: voxel data in several files (ElementDataFile = {name[:60]}) is not supported")
    return data_file_inside(path, name), 0


def files_of(path: Path) -> list[Path]:
    """The files a MetaImage scan is made of: its header file, and the data file it names (.mhd + .raw)."""
    fields, local_offset = header_fields(path, _head(path))
    data_path, _ = _data_location(path, fields, local_offset)
    return [path] if data_path == path else [path, data_path]


def read_header(path: Path) -> MetaHeader:
    """Parse and check a MetaImage header: its shape, type, data file and the bytes there (no voxel read)."""
    fields, local_offset = header_fields(path, _head(path))
    shape = _shape(path, fields)
    element_type = fields.get("ElementType", "")
    if element_type not in ELEMENT_BYTES:
        raise InputError(f"{path}: unsupported ElementType {element_type[:40]!r} (expected one of "
                         f"{', '.join(ELEMENT_BYTES)})")
    check_declared(path, shape, ELEMENT_BYTES[element_type])
    compressed, binary = _flag(fields, "CompressedData", False), _flag(fields, "BinaryData", True)
    data_path, start = _data_location(path, fields, local_offset)
    declared = math.prod(shape) * ELEMENT_BYTES[element_type]
    start, length = _voxel_range(path, fields, data_path.stat().st_size, start, declared, compressed)
    if compressed:
        check_compressed_size(path, length, declared, ZLIB_OR_GZIP)
    else:  # text voxels take at least one character each
        check_stored(path, length, declared if binary else math.prod(shape))
    # MetaIO swaps the bytes of values read from text too: text has no byte order, so none is passed on.
    return MetaHeader(shape, element_type, binary, compressed, data_path, start, length, _geometry_lines(path, fields),
                      binary and _big_endian(fields))


def _voxel_range(path: Path, fields: dict[str, str], size: int, start: int, declared: int,
                 compressed: bool) -> tuple[int, int]:
    """Where the voxels start in a data file of size bytes (HeaderSize as MetaIO reads it) and how many bytes of
    them there are."""
    header_size = _integer(path, fields, "HeaderSize", 0, lowest=-1)
    if header_size == -1:  # the voxels are the last bytes of the data file
        if compressed:
            raise InputError(f"{path}: HeaderSize = -1 needs uncompressed voxel data")
        start = max(size - declared, 0)
    elif header_size > 0:  # counted from the start of the data file, LOCAL or not
        start = header_size
    available = max(size - start, 0)
    if not compressed:
        return start, available
    length = _integer(path, fields, "CompressedDataSize", available)
    if length > available:
        raise InputError(f"{path}: truncated: CompressedDataSize is {length} bytes, the file holds {available}")
    return start, length


@contextmanager
def _itk_quiet(sitk: Any) -> Iterator[list[str]]:
    """Keep ITK's own messages (MetaIO writes them straight to the process's stderr) out of heartseg's output;
    yields a list that holds them, once the block ends, for an error to quote."""
    caught: list[str] = []
    display = sitk.ProcessObject_GetGlobalWarningDisplay()
    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    try:
        with _stderr_caught(caught):
            yield caught
    finally:
        sitk.ProcessObject_SetGlobalWarningDisplay(display)


# File descriptor 2 is the whole process's: it is redirected by one caller at a time, and only while no other
# thread runs (that thread's messages would be lost, or still go to the temporary file once it is deleted).
_STDERR_LOCK = threading.Lock()


@contextmanager
def _stderr_caught(caught: list[str]) -> Iterator[None]:
    """While the block runs, what is written to file descriptor 2 goes to a temporary file, its lines added to
    caught at the end; stderr is left as it is when other threads run or no temporary file can be made."""
    if threading.active_count() != 1 or not _STDERR_LOCK.acquire(blocking=False):
        yield
        return
    try:
        sink, saved = _redirect_stderr()
        try:
            yield
        finally:
            if saved is not None:
                os.dup2(saved, 2)
                os.close(saved)
            if sink is not None:
                sink.seek(0)
                caught += [line.strip() for line in sink.read(1 << 16).decode("utf-8", "replace").splitlines()
                           if line.strip()]
                sink.close()
    finally:
        _STDERR_LOCK.release()


def _redirect_stderr() -> tuple[IO[bytes] | None, int | None]:
    """Point file descriptor 2 at a new temporary file: (the file, a copy of the descriptor it replaced), or
    (None, None) when that cannot be done."""
    try:
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):  # no Python stderr, or closed
        pass
    try:
        sink = tempfile.TemporaryFile()
    except OSError:
        return None, None
    try:
        saved = os.dup(2)
    except OSError:  # no file descriptor 2 to redirect
        sink.close()
        return None, None
    try:
        os.dup2(sink.fileno(), 2)
    except OSError:
        os.close(saved)
        sink.close()
        return None, None
    return sink, saved


@contextmanager
def _itk_header(header: MetaHeader) -> Iterator[str]:
    """A header file for ITK, written from the checked header, its data file reached through a link beside it
    (so that no path length or character of the real path can change what MetaIO parses)."""
    with tempfile.TemporaryDirectory(prefix="heartseg-mha-") as folder:
        link = os.path.join(folder, "voxels")
        try:
            os.symlink(os.path.abspath(header.data_path), link)
            name = "voxels"
        except OSError:  # no symbolic links here: name the checked file itself
            name = os.path.abspath(header.data_path)
        text = os.path.join(folder, "scan.mhd")
        with open(text, "w", encoding="utf-8") as handle:
            handle.write(header.itk_text(name))
        yield text


def _itk_failure(path: Path, exc: RuntimeError, caught: list[str], text: str) -> InputError:
    """One line for an ITK read that failed after the checks passed: MetaIO's own words when it gave some (the
    header ITK was given, text, named as the scan)."""
    lines = [line for line in str(exc).splitlines() if line.strip() and "No such file" not in line]
    reason = "; ".join(caught[-2:]) if caught else (lines[-1].strip() if lines else "unreadable")
    return InputError(f"{path}: not a readable MetaImage file ({reason.replace(text, str(path))})")


def header_geometry(path: Path, header: MetaHeader) -> ScanGeometry:
    """The voxel grid ITK reads from the checked header (affine in RAS mm), and its voxel storage."""
    sitk = optional_import("SimpleITK", "reading MetaImage (.mha/.mhd)")
    with _itk_header(header) as text, _itk_quiet(sitk) as caught:
        reader = sitk.ImageFileReader()
        reader.SetFileName(text)
        try:
            reader.ReadImageInformation()
        except RuntimeError as exc:
            failure = exc
        else:
            failure = None
    if failure is not None:
        raise _itk_failure(path, failure, caught, text)
    affine = sitk_affine(reader)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{path}: the header's spacing or direction is singular or not finite")
    return ScanGeometry(header.shape, affine, ELEMENT_BYTES[header.element_type])


@dataclass(frozen=True)
class CheckedMetaImage:
    """A MetaImage file's checked header and the grid ITK reads from it."""

    header: MetaHeader
    geometry: ScanGeometry


_CHECKED: CheckedCache[CheckedMetaImage] = CheckedCache()


def checked_metaimage(path: Path) -> CheckedMetaImage:
    """A MetaImage file's header, checked, and its grid; kept while the header and data files are unchanged (a
    scan's grid is checked before it is read: its header is parsed, and given to ITK, once)."""
    return _CHECKED.get(os.path.abspath(path), lambda: _check(path),
                        lambda checked: file_stamp(path, checked.header.data_path))


def _check(path: Path) -> CheckedMetaImage:
    require_regular_file(path)  # never opened otherwise: a named pipe would block
    header = read_header(path)
    return CheckedMetaImage(header, header_geometry(path, header))


def _inflated_voxels(path: Path, header: MetaHeader) -> np.ndarray:
    """Compressed voxels, (x, y, z): inflated to exactly the declared bytes, or InputError."""
    with open(header.data_path, "rb") as handle:
        handle.seek(header.offset)
        inflated = inflate(path, handle, header.length, header.declared, ZLIB_OR_GZIP)
    return np.frombuffer(inflated, header.dtype).reshape(header.shape, order="F")


def _itk_voxels(path: Path, header: MetaHeader) -> np.ndarray:
    """Stored voxels (binary or text), (x, y, z), as ITK reads them through a header written from the checked one."""
    sitk = optional_import("SimpleITK", "reading MetaImage (.mha/.mhd)")
    with _itk_header(header) as text, _itk_quiet(sitk) as caught:
        try:
            image = sitk.ReadImage(text)
        except RuntimeError as exc:
            image, failure = None, exc
    if image is None:
        raise _itk_failure(path, failure, caught, text)
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


class MetaImageReader:
    """Reads 3D scalar MetaImage files with SimpleITK."""

    name = "mha"
    suffixes = (".mha", ".mhd")

    def claims(self, path: Path) -> bool:
        """A file named *.mha or *.mhd."""
        return path.name.lower().endswith(self.suffixes)

    def sources(self, path: Path, series: str | None) -> list[ScanSource]:
        """The file itself."""
        return [ScanSource(path, self.name, strip_suffix(path.name))]

    def geometry(self, source: ScanSource) -> ScanGeometry:
        """The scan's shape, voxel storage and affine from its header; its data file and sizes checked."""
        return checked_metaimage(source.path).geometry

    def read(self, source: ScanSource) -> ScanImage:
        """Check the header, its data file and the memory needed, then load the voxels (compressed ones inflated
        here, stored ones read by ITK)."""
        path = source.path
        checked = checked_metaimage(path)
        header = checked.header
        # ITK's image is copied out to numpy; inflated bytes are the voxels themselves.
        check_read_budget(checked.geometry, path, extra=0 if header.compressed else header.declared)
        data = _inflated_voxels(path, header) if header.compressed else _itk_voxels(path, header)
        return ScanImage(volume_from_array(data, checked.geometry.affine, path), source)
