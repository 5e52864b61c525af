"""MetaImage (.mha, .mhd) with SimpleITK, the reference implementation of the format, and SimpleITK images.

SimpleITK indexes its images (x, y, z) but GetArrayFromImage returns the voxels as (z, y, x);
heartseg's arrays are (x, y, z) like nibabel's, so every conversion here transposes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..image import Volume, volume_from_array
from .base import ScanImage, ScanSource, optional_import

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

    def read(self, source: ScanSource) -> ScanImage:
        """Load the voxels and build the voxel-to-RAS affine."""
        sitk = optional_import("SimpleITK", "reading MetaImage (.mha/.mhd)")
        path = source.path
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
            raise InputError(f"{path}: not a readable MetaImage file ({reason})") from None
        affine = sitk_affine(image)
        if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise InputError(f"{path}: the header's spacing or direction is singular or not finite")
        return ScanImage(volume_from_sitk(image, str(path)), source)
