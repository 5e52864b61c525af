"""NIfTI input and output: validated loading and atomic writing."""

from __future__ import annotations

import gzip
import os
import stat
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener

from .atomic import atomic_output
from .errors import InputError

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


_FILE_KINDS = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def require_regular_file(path: Path, what: str | None = None) -> None:
    """Refuse a path that is not a regular file (a folder, named pipe, device or socket) without opening it.

    Opening a named pipe blocks until something writes to it and a device such as /dev/zero never ends,
    so inputs are checked by stat alone. what prefixes the message (default: the path).
    """
    what = what or str(path)
    try:
        mode = Path(path).stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{what}: no such file") from None
    except OSError as exc:
        raise InputError(f"{what}: cannot read it ({exc.strerror or exc})") from None
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise InputError(f"{what}: is a folder, not a file")
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
    raise InputError(f"{what}: not a regular file ({kind}); give a file on disk")


@dataclass
class Volume:
    """A 3D image on a voxel grid: data (i, j, k) and the voxel-to-world affine (RAS+ mm)."""

    data: np.ndarray
    affine: np.ndarray
    path: Path | None = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis."""
        return voxel_sizes(self.affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape."""
        return tuple(int(s) for s in self.data.shape)  # type: ignore[return-value]


@dataclass(frozen=True)
class ScanGeometry:
    """What the header says about a scan: its 3D shape, voxel storage and affine (no voxel read)."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    itemsize: int = 4
    scaled: bool = False

    @property
    def voxels(self) -> int:
        """Number of voxels."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis."""
        return tuple(float(s) for s in np.sqrt((np.asarray(self.affine)[:3, :3] ** 2).sum(axis=0)))  # type: ignore

    def read_bytes(self) -> int:
        """Peak bytes of reading voxels as float32: the stored array, scaling in float64, the copy, a finite check."""
        return self.voxels * (self.itemsize + (8 if self.scaled else 0) + 4 + 1)


def voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm of each axis, from the affine's column norms (correct for oblique affines)."""
    sizes = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return tuple(float(s) for s in sizes)  # type: ignore[return-value]


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume of one voxel in mm^3: |det| of the affine's 3x3 part (exact for sheared and oblique grids)."""
    return float(abs(np.linalg.det(np.asarray(affine, float)[:3, :3])))


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


def _squeeze_to_3d(path: Path | str, data: np.ndarray) -> np.ndarray:
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        raise InputError(f"{path}: 4D image with {data.shape[3]} volumes; give one 3D volume")
    if data.ndim != 3:
        raise InputError(f"{path}: expected a 3D image, got {data.ndim}D with shape {data.shape}")
    if min(data.shape) < 2:
        raise InputError(f"{path}: expected a 3D image, got shape {data.shape} (a 2D slice?)")
    return data


def _geometry(image: nib.Nifti1Image) -> ScanGeometry:
    header = image.header
    slope, inter = header.get_slope_inter()
    scaled = slope is not None and (slope != 1 or (inter or 0) != 0)
    return ScanGeometry(tuple(int(n) for n in image.shape[:3]), np.asarray(image.affine, float),  # type: ignore
                        int(header.get_data_dtype().itemsize), bool(scaled))


def read_geometry(path: str | os.PathLike) -> ScanGeometry:
    """A scan's shape, voxel storage and affine from its validated header, without reading any voxel."""
    path = Path(path)
    image = _read_nifti(path)
    _check_header_shape(path, tuple(int(n) for n in image.shape))
    _check_geometry(path, image)
    return _geometry(image)


def load_volume(path: str | os.PathLike, dtype: type = np.float32,
                check: Callable[[ScanGeometry], None] | None = None) -> Volume:
    """Load and validate a 3D NIfTI scan (or a 4D one with a single volume).

    check, when given, sees the header's geometry before any voxel is read (and may refuse it).
    """
    path = Path(path)
    image = _read_nifti(path)
    _check_header_shape(path, tuple(int(n) for n in image.shape))
    _check_geometry(path, image)
    if check is not None:
        check(_geometry(image))
    _check_file_size(path, image)
    try:
        data = np.asanyarray(image.dataobj)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise InputError(f"{path}: could not read the voxel data, the file is truncated or corrupt ({exc})") from None
    return volume_from_array(data, image.affine, path, dtype)


def volume_from_array(data: np.ndarray, affine: np.ndarray, source: str | os.PathLike = "image",
                      dtype: type = np.float32) -> Volume:
    """Validate voxel data (3D, or 4D with one volume; numeric; finite) and wrap it as a Volume."""
    data = _squeeze_to_3d(source, np.asanyarray(data))
    if not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise InputError(f"{source}: unsupported voxel type {data.dtype}")
    data = _to_float(source, data, dtype)
    path = Path(source) if isinstance(source, (str, os.PathLike)) and source != "image" else None
    return Volume(data=data, affine=np.asarray(affine, dtype=np.float64), path=path)


def _to_float(source: str | os.PathLike, data: np.ndarray, dtype: type) -> np.ndarray:
    """data as dtype; refuses NaN / infinite voxels, and finite ones that dtype cannot hold (float64 beyond float32)."""
    with np.errstate(over="ignore"):
        cast = np.asarray(data, dtype=dtype)
    if np.all(np.isfinite(cast)):  # one pass over the voxels in the usual case
        return cast
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        raise InputError(f"{source}: the image contains NaN or infinite voxels")
    peak = float(max(data.max(), -data.min()))
    limit = float(np.finfo(dtype).max)
    raise InputError(f"{source}: voxel values up to {peak:.3g} in magnitude are beyond the {np.dtype(dtype).name} "
                     f"range (+-{limit:.3g}); they are finite but too large, rescale the image")


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


def same_grid(a: Volume, b: Volume, atol: float = 1e-3) -> bool:
    """True when two volumes share shape and affine."""
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=atol)


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
