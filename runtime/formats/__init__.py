"""Scan readers and mask writers, one module per format, in two registries.

Readers: NIfTI (nibabel, always there), NRRD (pynrrd, heartseg[nrrd]), MetaImage (SimpleITK,
heartseg[itk]) and DICOM series (pydicom, heartseg[dicom]). Writers: NIfTI and DICOM SEG
(highdicom, heartseg[dicom]). The optional libraries are imported only when a scan needs them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import InputError
from ..image import ScanGeometry, require_regular_file
from .base import ScanImage, ScanSource, optional_import
from .dicom import DicomReader, is_dicom_file
from .dicom_seg import DicomSegWriter
from .metaimage import MetaImageReader
from .nifti import NiftiReader, NiftiWriter
from .nrrd import NrrdReader

__all__ = ["READERS", "WRITERS", "ScanImage", "ScanSource", "discover_sources", "optional_import", "read_scan",
           "scan_files", "scan_geometry", "scan_name", "writer"]

# File readers first; the DICOM reader takes folders and zips, so it is asked last.
FILE_READERS = (NiftiReader(), NrrdReader(), MetaImageReader())
DICOM_READER = DicomReader()
READERS = {reader.name: reader for reader in (*FILE_READERS, DICOM_READER)}
WRITERS = {writer.name: writer for writer in (NiftiWriter(), DicomSegWriter())}
SCAN_SUFFIXES = tuple(suffix for reader in FILE_READERS for suffix in reader.suffixes)
KNOWN = "a NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd) file, or a DICOM folder or .zip"
# Suffixes of the files heartseg-infer writes; folder discovery skips them so that an output
# folder inside (or equal to) an input folder is not segmented again on the next run.
OUTPUT_SUFFIXES = ("_mask", "_prob")
UNKNOWN = "unknown"


def _file_reader(path: Path):
    return next((reader for reader in FILE_READERS if reader.claims(path)), None)


def scan_name(path: Path) -> str:
    """A scan file's name without its format's suffix (.nii.gz, .nrrd, .mha, ...)."""
    reader = _file_reader(path)
    if reader is not None:
        return reader.sources(path, None)[0].name
    return path.name[:-4] if path.name.lower().endswith(".zip") else path.name


def scan_files(folder: Path, skip_outputs: bool = False) -> list[Path]:
    """The scan files (NIfTI, NRRD, MetaImage) directly inside folder, sorted; hidden files skipped."""
    files = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or _file_reader(path) is None:
            continue
        if skip_outputs and scan_name(path).endswith(OUTPUT_SUFFIXES):
            continue
        files.append(path)
    return files


def _holds_dicom(folder: Path) -> bool:
    return any(p.is_file() and not p.name.startswith(".") and (p.suffix.lower() == ".dcm" or is_dicom_file(p))
               for p in folder.rglob("*"))


def sources_of(item: Path, series: str | None = None) -> list[ScanSource]:
    """The scans one command-line input holds: a scan file, a folder of them, a DICOM folder or zip."""
    if not item.exists():
        raise InputError(f"{item}: no such file or folder")
    if item.is_dir():
        files = scan_files(item, skip_outputs=True)
        if files:
            return [source for path in files for source in sources_of(path)]
        if _holds_dicom(item):
            return DICOM_READER.sources(item, series)
        return []
    require_regular_file(item)  # before any reader opens it: a named pipe would block, a device never end
    reader = _file_reader(item)
    if reader is not None:
        return reader.sources(item, None)
    if DICOM_READER.claims(item):
        return DICOM_READER.sources(item, series)
    return [ScanSource(item, UNKNOWN, item.stem)]  # reported when read, like any other unreadable scan


def discover_sources(inputs: Iterable[Path], series: str | None = None) -> list[ScanSource]:
    """Every scan in the inputs, in order, without duplicates; InputError when there is none."""
    inputs = [Path(i) for i in inputs]
    found: list[ScanSource] = []
    seen: set[tuple[Path, str | None]] = set()
    for item in inputs:
        for source in sources_of(item, series):
            key = (source.path.resolve(), source.series)
            if key not in seen:
                seen.add(key)
                found.append(source)
    if not found:
        where = ", ".join(str(i) for i in inputs) or "(nothing given)"
        raise InputError(f"no scans found in {where} (looked for {KNOWN})")
    return found


def read_scan(source: ScanSource) -> ScanImage:
    """Read one scan with its format's reader."""
    reader = READERS.get(source.format)
    if reader is None:
        raise InputError(f"{source.path}: not a scan heartseg reads (expected {KNOWN})")
    return reader.read(source)


def scan_geometry(source: ScanSource) -> ScanGeometry | None:
    """What a scan's header says about its grid and voxel storage, before any voxel is read (its data checked
    to be there); None for a format whose reader does not read its header apart."""
    geometry = getattr(READERS.get(source.format), "geometry", None)
    return geometry(source) if geometry is not None else None


def writer(name: str):
    """The mask writer called name ('nifti' or 'dicom-seg')."""
    if name not in WRITERS:
        raise InputError(f"unknown output format {name!r}: choose one of {', '.join(WRITERS)}")
    return WRITERS[name]


def reader_names() -> Sequence[str]:
    """Names of the registered readers."""
    return tuple(READERS)
