"""What every scan format shares: the Volume and its header's ScanGeometry, validated voxel data, voxel sizes,
and the regular-file check made before any reader opens an input."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError

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


def same_grid(a: Volume, b: Volume, atol: float = 1e-3) -> bool:
    """True when two volumes share shape and affine."""
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=atol)
