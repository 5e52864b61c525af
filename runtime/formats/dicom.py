"""DICOM series (a folder, or a zip of one) with pydicom: slices sorted by position, affine from the headers.

A folder or zip may hold several series: each is listed, and one is chosen by SeriesNumber or
SeriesInstanceUID (or all of them, in turn). Only a volume heartseg can place in space exactly is
accepted: single-frame slices of one orientation and pixel grid, evenly spaced along the slice
normal, with none missing. Anything else is an InputError (exit 2) that says what was found.

Series are listed from the members' headers alone (read as streams, pixel data and any large element
skipped), and a member is read whole only when its size fits the slice its header describes: a small
zip that inflates to gigabytes is refused before it does. A listing is kept while the folder's files
(or the zip) are unchanged: a series found, its grid checked and its slices read are listed once.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..image import ScanGeometry, volume_from_array
from ..memory import MB, check_read_budget
from .base import ScanImage, ScanSource, optional_import
from .voxeldata import CheckedCache, file_stamp

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Series that are not images to segment: segmentations, structure sets, reports, presentation states.
NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "SR", "PR", "KO", "REG"}
# Relative tolerance on slice spacing and orientation agreement.
SPACING_TOLERANCE = 0.01
ORIENTATION_TOLERANCE = 1e-4
ALL_SERIES = "all"
# Elements larger than this are skipped, not read, while a header is listed (pixel data is never read then).
DEFER_BYTES = MB
# A slice's file may hold this much (or as much as its pixels, if more) beside its pixel data: headers,
# private elements, overlays. A member larger than that is refused before it is read.
HEADER_ALLOWANCE = 4 * MB
# zipfile inflates stored and deflated members as it reads them; others (bzip2, LZMA) a whole compressed chunk at
# a time, which may inflate to all of the member: those may not inflate to more than this.
STREAMED = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
MAX_UNSTREAMED_BYTES = 32 * MB
# What reading a zip member or a file can raise besides pydicom's InvalidDicomError: a corrupt deflate stream,
# an encrypted or unsupported member, a truncated file.
READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError)


@dataclass
class SeriesInfo:
    """One series found in a folder or zip: its identity and the members holding its slices."""

    uid: str
    number: str
    description: str
    modality: str
    members: list[str] = field(default_factory=list)
    headers: list[Any] = field(default_factory=list, repr=False)  # each member's header, without pixel data

    def label(self) -> str:
        """'number "description" (N files, modality)' for listings."""
        return f"{self.number or '?'} {self.description!r} ({len(self.members)} files, {self.modality or '?'})"


def _pydicom() -> Any:
    return optional_import("pydicom", "reading DICOM")


class _Container:
    """The files of a folder (recursively) or of a zip, read as DICOM on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.zip: zipfile.ZipFile | None = None
        if path.is_file():
            try:
                self.zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise InputError(f"{path}: not a readable zip file ({exc})") from None

    def __enter__(self) -> "_Container":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.zip is not None:
            self.zip.close()

    def members(self) -> list[str]:
        """Names of the candidate files, sorted (hidden files and folders skipped)."""
        if self.zip is not None:
            names = [i.filename for i in self.zip.infolist() if not i.is_dir()]
        else:
            names = [str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file()]
        return sorted(n for n in names if not any(part.startswith(".") for part in Path(n).parts)
                      and not n.startswith("__MACOSX"))

    def size(self, member: str) -> int:
        """Bytes of the member once read (a zip member: inflated)."""
        if self.zip is not None:
            return self.zip.getinfo(member).file_size
        return (self.path / member).stat().st_size

    def read(self, member: str, header_only: bool) -> Any | None:
        """The member as a pydicom Dataset, or None when it is not DICOM. A header is read as a stream up to the
        pixel data, elements over DEFER_BYTES skipped; a whole member only after check_size."""
        pydicom = _pydicom()
        options: dict[str, Any] = {"stop_before_pixels": True, "defer_size": DEFER_BYTES} if header_only else {}
        try:
            if self.zip is None:
                return pydicom.dcmread(str(self.path / member), **options)
            self._check_unstreamed(member)
            with _MemberStream(self.zip.open(member)) as handle:
                return pydicom.dcmread(handle, **options)
        except pydicom.errors.InvalidDicomError:
            return None
        except READ_ERRORS as exc:
            raise InputError(f"{self.path}: {member} is not a readable DICOM file ({exc})") from None

    def _check_unstreamed(self, member: str) -> None:
        """Refuse a large member that zipfile cannot inflate a little at a time."""
        info = self.zip.getinfo(member)  # type: ignore[union-attr]
        if info.compress_type not in STREAMED and info.file_size > MAX_UNSTREAMED_BYTES:
            method = zipfile.compressor_names.get(info.compress_type, str(info.compress_type))
            raise InputError(f"{self.path}: {member} inflates to {info.file_size / MB:.0f} MB at once ({method} "
                             "compression): refusing a possible zip bomb; zip the series with deflate")

    def check_size(self, where: str, member: str, header: Any) -> int:
        """The member's size, when it fits the slice its header describes; InputError (a zip bomb?) when not."""
        size = self.size(member)
        pixels = slice_bytes(header)
        if size <= pixels + max(HEADER_ALLOWANCE, pixels):
            return size
        grid = f"{header.get('Rows', '?')} x {header.get('Columns', '?')}"
        if self.zip is not None:
            raise InputError(f"{where}: {member} inflates to {size / MB:.0f} MB, far more than one {grid} slice needs: "
                             "refusing a possible zip bomb")
        raise InputError(f"{where}: {member} is {size / MB:.0f} MB, far more than one {grid} slice needs")


class _MemberStream:
    """A zip member as pydicom reads it. It has no name (pydicom would take a member's name for a path in the
    working folder), and once closed it lets go of the member and its inflater, which the dataset read from it
    would otherwise keep alive (an LZMA inflater holds its whole dictionary)."""

    def __init__(self, handle: Any) -> None:
        self._handle: Any = handle

    def __enter__(self) -> "_MemberStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """True once closed."""
        return self._handle is None

    def _open(self) -> Any:
        if self._handle is None:
            raise ValueError("I/O operation on a closed zip member")
        return self._handle

    def read(self, size: int = -1) -> bytes:
        """Up to size bytes (all that is left when size < 0)."""
        return self._open().read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        """Move to offset (from the start, the current position or the end)."""
        return self._open().seek(offset, whence)

    def tell(self) -> int:
        """The current position."""
        return self._open().tell()

    def close(self) -> None:
        """Close the member and drop it."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _count(ds: Any, keyword: str, default: int) -> int:
    """A non-negative integer element of a header, default when absent or malformed."""
    try:
        return max(int(ds.get(keyword, default) or default), 0)
    except (TypeError, ValueError):
        return default


def slice_bytes(ds: Any) -> int:
    """Bytes of uncompressed pixel data that a slice's header describes."""
    frames = _count(ds, "NumberOfFrames", 1)
    samples = _count(ds, "SamplesPerPixel", 1)
    depth = -(-_count(ds, "BitsAllocated", 16) // 8)  # bytes per sample, rounded up
    return _count(ds, "Rows", 0) * _count(ds, "Columns", 0) * samples * frames * depth


def is_dicom_file(path: Path) -> bool:
    """True when the file has the DICOM preamble ('DICM' at byte 128)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def container_members(path: Path) -> list[str]:
    """The files the reader looks at in a DICOM folder or zip: relative names, sorted (hidden and __MACOSX skipped)."""
    with _Container(path) as container:
        return container.members()


def list_series(path: Path) -> list[SeriesInfo]:
    """The image series in a folder or zip, by SeriesNumber then UID (from the members' headers alone)."""
    series: dict[str, SeriesInfo] = {}
    with _Container(path) as container:
        for member in container.members():
            ds = container.read(member, header_only=True)
            if ds is None:
                continue
            try:
                if "SeriesInstanceUID" not in ds:
                    continue
                uid, modality = str(ds.SeriesInstanceUID), str(ds.get("Modality", ""))
                number, description = str(ds.get("SeriesNumber", "") or ""), str(ds.get("SeriesDescription", "") or "")
            except Exception as exc:  # a malformed element, decoded only when it is asked for
                raise InputError(f"{path}: {member} is not a readable DICOM file ({exc})") from None
            if modality in NON_IMAGE_MODALITIES:
                continue
            info = series.setdefault(uid, SeriesInfo(uid, number, description, modality))
            info.members.append(member)
            info.headers.append(ds)
    return sorted(series.values(), key=lambda s: (_number_key(s.number), s.uid))


_LISTINGS: CheckedCache[list[SeriesInfo]] = CheckedCache()


def listed_series(path: Path) -> list[SeriesInfo]:
    """list_series' answer, kept while the folder's files (names, sizes, times) or the zip are unchanged."""
    return _LISTINGS.get(os.path.abspath(path), lambda: list_series(path), lambda _: _container_stamp(path))


def _container_stamp(path: Path) -> tuple:
    """What tells a folder's files or a zip changed: each file's name, size, time and inode."""
    if path.is_dir():
        return file_stamp(path, *sorted(p for p in path.rglob("*") if p.is_file()))
    return file_stamp(path)


def _number_key(number: str) -> tuple[int, str]:
    return (int(number), "") if number.strip().lstrip("-").isdigit() else (1 << 30, number)


def select_series(path: Path, found: list[SeriesInfo], wanted: str | None) -> list[SeriesInfo]:
    """The series asked for: the only one, the one whose SeriesNumber or UID is wanted, or all."""
    if not found:
        raise InputError(f"{path}: no DICOM image series found")
    listing = "; ".join(s.label() for s in found)
    if wanted is None:
        if len(found) > 1:
            raise InputError(f"{path}: holds {len(found)} series ({listing}); choose one with --series NUMBER|UID, "
                             "or --series all")
        return found
    if wanted == ALL_SERIES:
        return found
    chosen = [s for s in found if wanted in (s.uid, s.number)]
    if not chosen:
        raise InputError(f"{path}: no series {wanted!r} (found: {listing})")
    if len(chosen) > 1:
        raise InputError(f"{path}: {len(chosen)} series have the number {wanted!r}; choose one by its UID "
                         f"({', '.join(s.uid for s in chosen)})")
    return chosen


def single_file_error(path: Path) -> None:
    """Explain why one DICOM file is not a scan: a multi-frame file, or a single slice of a series."""
    ds = _pydicom().dcmread(str(path), stop_before_pixels=True, defer_size=DEFER_BYTES)
    frames = _count(ds, "NumberOfFrames", 1)
    if frames > 1:
        raise InputError(f"{path}: multi-frame DICOM ({frames} frames in one file) is not supported; "
                         "export the series as one file per slice")
    raise InputError(f"{path}: a single DICOM slice; give the folder (or zip) that holds the whole series")


def series_name(path: Path, info: SeriesInfo, several: bool) -> str:
    """Output name of a series: the folder or zip name, plus the series number when there are several."""
    base = path.name[:-4] if path.name.lower().endswith(".zip") else path.name
    if not several:
        return base
    return f"{base}_series{info.number}" if info.number else f"{base}_{info.uid.rsplit('.', 1)[-1]}"


@dataclass
class DicomSeries:
    """The slices of one series, sorted along the slice normal, and the affine that places them."""

    datasets: list[Any]
    affine: np.ndarray  # voxel (column, row, slice) -> RAS mm


class DicomReader:
    """Reads one DICOM image series from a folder or a zip."""

    name = "dicom"

    def claims(self, path: Path) -> bool:
        """A folder (holding no other scans), a zip, or a file with the DICOM preamble."""
        return path.is_dir() or path.name.lower().endswith(".zip") or (path.is_file() and is_dicom_file(path))

    def sources(self, path: Path, series: str | None) -> list[ScanSource]:
        """One source per selected series."""
        if path.is_file() and not path.name.lower().endswith(".zip"):
            single_file_error(path)
        found = listed_series(path)
        chosen = select_series(path, found, series)
        several = len(found) > 1
        return [ScanSource(path, self.name, series_name(path, info, several), info.uid) for info in chosen]

    def geometry(self, source: ScanSource) -> ScanGeometry:
        """The series' shape, voxel storage and affine from its slices' headers; every slice's size checked."""
        return self._checked(source)[1]

    def read(self, source: ScanSource) -> ScanImage:
        """Load the series' slices, check they form one evenly spaced volume, and stack them."""
        info, geometry, held = self._checked(source)
        check_read_budget(geometry, source, extra=held)  # the slices' files are held until they are stacked
        with _Container(source.path) as container:
            datasets = [ds for ds in (container.read(m, header_only=False) for m in info.members) if ds is not None]
        series = stack_geometry(str(source), datasets)
        data = np.stack([_pixels(str(source), ds) for ds in series.datasets], axis=-1)
        volume = volume_from_array(data, series.affine, source.path)
        return ScanImage(volume, source, {"dicom": series})

    def _checked(self, source: ScanSource) -> tuple[SeriesInfo, ScanGeometry, int]:
        """The series, its geometry from the headers, and the bytes of its members (each checked to fit its slice)."""
        found = {s.uid: s for s in listed_series(source.path)}
        info = found.get(source.series or "") if source.series else (next(iter(found.values())) if found else None)
        if info is None:
            raise InputError(f"{source}: series not found")
        where = str(source)
        with _Container(source.path) as container:
            held = sum(container.check_size(where, m, ds) for m, ds in zip(info.members, info.headers))
        series = stack_geometry(where, info.headers, pixels=False)
        first = series.datasets[0]
        scaled = "RescaleSlope" in first or "RescaleIntercept" in first
        shape = (_count(first, "Columns", 0), _count(first, "Rows", 0), len(series.datasets))
        itemsize = max(1, -(-_count(first, "BitsAllocated", 16) // 8))
        return info, ScanGeometry(shape, series.affine, itemsize, scaled), held


def _vector(ds: Any, keyword: str, length: int, where: str) -> np.ndarray:
    value = ds.get(keyword)
    if value is None:
        raise InputError(f"{where}: a slice has no {keyword}; heartseg cannot place it in space")
    try:
        array = np.asarray([float(v) for v in value], float)
    except (TypeError, ValueError):  # a single value, or not numbers
        array = np.zeros(0)
    if array.shape != (length,) or not np.all(np.isfinite(array)):
        raise InputError(f"{where}: {keyword} must be {length} finite numbers, got {str(value)[:80]!r}")
    return array


def _grid(ds: Any, where: str) -> tuple[int, int, tuple[float, ...]]:
    """A slice's pixel grid: rows, columns and pixel spacing."""
    try:
        return int(ds.Rows), int(ds.Columns), tuple(float(v) for v in ds.get("PixelSpacing", ()) or ())
    except (AttributeError, TypeError, ValueError):
        raise InputError(f"{where}: a slice has no valid Rows, Columns or PixelSpacing") from None


def stack_geometry(where: str, datasets: list[Any], pixels: bool = True) -> DicomSeries:
    """Sort single-frame slices along their normal and derive the affine; InputError for any surprise.
    pixels: the datasets must hold pixel data (False for headers read without it)."""
    if not datasets:
        raise InputError(f"{where}: the series has no readable slices")
    frames = [_count(ds, "NumberOfFrames", 1) for ds in datasets]
    if max(frames) > 1:
        raise InputError(f"{where}: multi-frame DICOM ({max(frames)} frames in one file) is not supported; "
                         "export the series as one file per slice")
    if pixels and "PixelData" not in datasets[0]:
        raise InputError(f"{where}: the series holds no pixel data")
    if len(datasets) < 2:
        raise InputError(f"{where}: the series has a single slice; a 3D volume needs at least two")
    orientations = np.stack([_vector(ds, "ImageOrientationPatient", 6, where) for ds in datasets])
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        distinct = len({tuple(np.round(o, 3)) for o in orientations})
        raise InputError(f"{where}: mixed orientations ({distinct} different ImageOrientationPatient values in one "
                         "series, e.g. a localiser); give a series of parallel slices")
    grids = {_grid(ds, where) for ds in datasets}
    if len(grids) > 1:
        raise InputError(f"{where}: slices of different sizes or pixel spacings in one series ({len(grids)} kinds)")
    row_dir, col_dir = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-3 or abs(row_dir @ col_dir) > 1e-3:
        raise InputError(f"{where}: ImageOrientationPatient is not two orthogonal unit vectors")
    positions = np.stack([_vector(ds, "ImagePositionPatient", 3, where) for ds in datasets])
    distance = positions @ normal
    order = np.argsort(distance, kind="stable")
    datasets = [datasets[i] for i in order]
    positions, distance = positions[order], distance[order]
    gaps = np.diff(distance)
    if np.any(gaps < 1e-4):
        raise InputError(f"{where}: two slices at the same position ({int(np.sum(gaps < 1e-4)) + 1} slices share "
                         "one; several echoes, phases or acquisitions in one series?)")
    step = float(np.median(gaps))
    tolerance = SPACING_TOLERANCE * step
    if np.abs(gaps - step).max() > tolerance:
        multiples = gaps / step
        if np.all(np.abs(multiples - np.round(multiples)) * step <= tolerance):
            missing = int(np.round(multiples).sum() - len(gaps))
            first = int(np.argmax(multiples > 1.5))
            raise InputError(f"{where}: {missing} slice(s) missing (a {gaps[first]:.3g} mm gap after slice "
                             f"{first + 1} of {len(datasets)}; the others are {step:.3g} mm apart)")
        raise InputError(f"{where}: non-uniform slice spacing ({gaps.min():.3g} to {gaps.max():.3g} mm); "
                         "heartseg needs evenly spaced slices")
    spacing = list(_grid(datasets[0], where)[2])
    if len(spacing) != 2 or min(spacing) <= 0:
        raise InputError(f"{where}: PixelSpacing must be two positive numbers, got {spacing}")
    lps = np.eye(4)
    lps[:3, 0] = row_dir * spacing[1]  # along a row: the column index grows, one column spacing per step
    lps[:3, 1] = col_dir * spacing[0]  # down a column: the row index grows, one row spacing per step
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(datasets) - 1)  # keeps a gantry tilt's shear
    lps[:3, 3] = positions[0]
    return DicomSeries(datasets, LPS_TO_RAS @ lps)


def _pixels(where: str, ds: Any) -> np.ndarray:
    """One slice as a float32 (column, row) array, with the rescale slope and intercept applied."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if not photometric.startswith("MONOCHROME"):
        raise InputError(f"{where}: {photometric} pixels; heartseg reads greyscale (MONOCHROME) images only")
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # missing decoders raise RuntimeError, NotImplementedError, ...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise InputError(f"{where}: cannot decode the pixel data (transfer syntax {name}): "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if pixels.ndim != 2:
        raise InputError(f"{where}: expected one 2D frame per file, got pixel data of shape {pixels.shape}")
    try:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        raise InputError(f"{where}: RescaleSlope and RescaleIntercept must be numbers") from None
    return (pixels.astype(np.float32) * slope + intercept).T
