"""NIfTI (.nii, .nii.gz): the reference format. Reading validates the header before any voxel is read
(voxel sizes as stored, dimensions, affine, file size); writing is atomic."""

from __future__ import annotations

import gzip
import os
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener

from ..atomic import atomic_output
from ..errors import InputError
from ..image import ScanGeometry, Volume, require_regular_file, volume_from_array
from .base import ScanImage, ScanSource

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti_path(path: Path) -> bool:
    """True when the file name ends in .nii or .nii.gz, in any case (.NII.GZ too)."""
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    """The file name without .nii / .nii.gz (in any case)."""
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _read_nifti(path: Path) -> nib.Nifti1Image:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a NIfTI file")
    if not is_nifti_path(path):
        raise InputError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
    require_regular_file(path)
    _check_raw_spacing(path)
    # nibabel warns about oddities while it parses a header; when the file then turns out unreadable,
    # those warnings are noise in front of the one-line error, so they are dropped in that case only.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            image = nib.load(str(path))
        except Exception as exc:  # nibabel raises many types for bad headers
            image, failure = None, exc
    if image is None:
        raise InputError(f"{path}: not a readable NIfTI file ({failure})") from None
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{path}: not a NIfTI-1/2 image")
    return image


def _raw_header(path: Path) -> nib.Nifti1Header | None:
    """The NIfTI-1 or NIfTI-2 header as stored, unfixed; None when the file holds neither (nib.load reports it)."""
    try:
        with warnings.catch_warnings(), ImageOpener(str(path)) as handle:
            warnings.simplefilter("ignore")  # nib.load below warns about the same header, if at all
            block = handle.read(nib.Nifti2Header.sizeof_hdr)
            # The classes in the order nib.load tries them for a .nii file.
            for klass in (nib.Nifti1Header, nib.Nifti2Header):
                if klass.may_contain_header(block):
                    return klass(block[: klass.sizeof_hdr], check=False)
    except Exception:  # unreadable: nib.load reports it
        return None
    return None


def _check_raw_spacing(path: Path) -> None:
    """Reject zero / negative / non-finite voxel sizes as stored in the file (NIfTI-1 and NIfTI-2).

    nibabel's loader silently "fixes" such headers (0 becomes 1, negatives their absolute value) and
    logs a warning, so the check must read the header bytes before nib.load does.
    """
    header = _raw_header(path)
    if header is None:
        return
    ndim = int(header["dim"][0])
    if not 1 <= ndim <= 7:
        return
    pixdim = [float(v) for v in header["pixdim"][1 : 1 + min(ndim, 3)]]
    if any(not np.isfinite(v) or v <= 0 for v in pixdim):
        shown = tuple(round(v, 6) for v in pixdim)
        raise InputError(f"{path}: voxel spacing in the header must be positive, got {shown}")


def _check_header_shape(path: Path, shape: tuple[int, ...]) -> None:
    """The dimension checks of _squeeze_to_3d, from the header alone (before reading any voxels)."""
    if len(shape) == 4 and shape[3] > 1:
        raise InputError(f"{path}: 4D image with {shape[3]} volumes; give one 3D volume")
    spatial = shape[:3] if len(shape) == 4 else shape
    if len(spatial) != 3:
        raise InputError(f"{path}: expected a 3D image, got {len(shape)}D with shape {tuple(shape)}")


def _check_geometry(path: Path, image: nib.Nifti1Image) -> None:
    zooms = image.header.get_zooms()[:3]
    if len(zooms) < 3 or any(not np.isfinite(z) or z <= 0 for z in zooms):
        raise InputError(f"{path}: voxel spacing in the header must be positive, got {tuple(float(z) for z in zooms)}")
    affine = image.affine
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(f"{path}: the header's affine is singular or not finite")


def _check_file_size(path: Path, image: nib.Nifti1Image) -> None:
    """An uncompressed file shorter than its header's voxel data is truncated: say so before reading it."""
    if path.name.lower().endswith(".gz"):
        return
    header = image.header
    # A single-file NIfTI's voxels start after its header even when vox_offset says less.
    offset = max(int(header.get_data_offset()), int(getattr(header, "single_vox_offset", 0)))
    expected = offset + int(np.prod(image.shape, dtype=np.int64)) * header.get_data_dtype().itemsize
    actual = path.stat().st_size
    if actual < expected:
        raise InputError(f"{path}: truncated, the header describes {expected} bytes of voxel data and offset but the "
                         f"file has {actual}")


def _geometry(image: nib.Nifti1Image) -> ScanGeometry:
    header = image.header
    slope, inter = header.get_slope_inter()
    scaled = slope is not None and (slope != 1 or (inter or 0) != 0)
    return ScanGeometry(tuple(int(n) for n in image.shape[:3]), np.asarray(image.affine, float),  # type: ignore
                        int(header.get_data_dtype().itemsize), bool(scaled))


def _checked_image(path: Path) -> nib.Nifti1Image:
    """The parsed image, its header checked (dimensions, voxel sizes, affine) before any voxel is read."""
    image = _read_nifti(path)
    _check_header_shape(path, tuple(int(n) for n in image.shape))
    _check_geometry(path, image)
    return image


def read_geometry(path: str | os.PathLike) -> ScanGeometry:
    """A scan's shape, voxel storage and affine from its validated header, without reading any voxel."""
    path = Path(path)
    return _geometry(_checked_image(path))


def load_volume(path: str | os.PathLike, dtype: type = np.float32,
                check: Callable[[ScanGeometry], None] | None = None) -> Volume:
    """Load and validate a 3D NIfTI scan (or a 4D one with a single volume).

    check, when given, sees the header's geometry before any voxel is read (and may refuse it).
    """
    path = Path(path)
    image = _checked_image(path)
    if check is not None:
        check(_geometry(image))
    _check_file_size(path, image)
    try:
        data = np.asanyarray(image.dataobj)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise InputError(f"{path}: could not read the voxel data, the file is truncated or corrupt ({exc})") from None
    return volume_from_array(data, image.affine, path, dtype)


def load_mask(path: str | os.PathLike) -> Volume:
    """Load a binary label mask (any nonzero voxel is foreground) as uint8."""
    volume = load_volume(path, dtype=np.float32)
    volume.data = (volume.data != 0).astype(np.uint8)
    return volume


def load_label(path: str | os.PathLike, value: float | None = None, what: str = "label",
               check: Callable[[ScanGeometry], None] | None = None) -> Volume:
    """Load a mask as uint8 0/1: voxels equal to value when given (at least one must), else a file that must
    hold only 0 and 1."""
    volume = load_volume(path, dtype=np.float32, check=check)
    data = volume.data

    def values(shown: int = 6) -> str:
        found = np.unique(data)
        more = f", ... ({found.size} values)" if found.size > shown else ""
        return ", ".join(f"{v:g}" for v in found[:shown]) + more

    if value is not None:
        volume.data = (data == value).astype(np.uint8)
        if not volume.data.any():
            raise InputError(f"{what} {path}: no voxel equals --label-value {value:g} (its values: {values()})")
        return volume
    if np.any((data != 0) & (data != 1)):
        hint = "; pass --label-value V to score the voxels equal to V" if what == "label" else ""
        raise InputError(f"{what} {path}: not binary (values {values()}){hint}")
    volume.data = data.astype(np.uint8)
    return volume


def save_volume(data: np.ndarray, affine: np.ndarray, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write a NIfTI file atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path}: exists (use --overwrite to replace it)")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"{folder}: output folder does not exist")
    if not os.access(folder, os.W_OK):
        raise InputError(f"{folder}: output folder is not writable")
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_output(path) as tmp:
        nib.save(image, str(tmp))
    return path


class NiftiReader:
    """Reads NIfTI-1/2 scans with nibabel."""

    name = "nifti"
    suffixes = NIFTI_SUFFIXES

    def claims(self, path: Path) -> bool:
        """A file named *.nii or *.nii.gz."""
        return is_nifti_path(path)

    def sources(self, path: Path, series: str | None) -> list[ScanSource]:
        """The file itself."""
        return [ScanSource(path, self.name, strip_nifti_suffix(path.name))]

    def geometry(self, source: ScanSource) -> ScanGeometry:
        """The scan's grid and voxel storage from its validated header."""
        return read_geometry(source.path)

    def read(self, source: ScanSource) -> ScanImage:
        """Load and validate the scan."""
        return ScanImage(load_volume(source.path), source)


class NiftiWriter:
    """Writes uint8 masks as NIfTI-1 with the scan's affine in both qform and sform."""

    name = "nifti"
    suffix = "_mask.nii.gz"

    def write(self, scan: ScanImage, mask: np.ndarray, path: Path, overwrite: bool) -> Path:
        """Write the mask on the scan's grid."""
        return save_volume(mask.astype(np.uint8), scan.volume.affine, path, overwrite=overwrite)
