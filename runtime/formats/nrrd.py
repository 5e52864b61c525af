"""NRRD (.nrrd, .nhdr) with pynrrd: a small pure-Python reader of the format 3D Slicer writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError
from ..image import volume_from_array
from .base import ScanImage, ScanSource, optional_import

# NRRD space names (and their 3-letter forms) -> sign flips that take the space to RAS.
_SPACES = {
    "right-anterior-superior": (1, 1, 1), "ras": (1, 1, 1),
    "left-posterior-superior": (-1, -1, 1), "lps": (-1, -1, 1),
    "left-anterior-superior": (-1, 1, 1), "las": (-1, 1, 1),
    "scanner-xyz": (-1, -1, 1),  # scanner coordinates are DICOM's LPS
}


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

    def read(self, source: ScanSource) -> ScanImage:
        """Load the voxels and build the voxel-to-RAS affine."""
        nrrd = optional_import("nrrd", "reading NRRD")
        path = source.path
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        try:
            data, header = nrrd.read(str(path), index_order="F")
        except Exception as exc:  # pynrrd raises NRRDError, ValueError, OSError ...
            raise InputError(f"{path}: not a readable NRRD file ({exc})") from None
        return ScanImage(volume_from_array(data, nrrd_affine(path, header, data.ndim), path), source)


def nrrd_affine(path: Path, header: dict, ndim: int) -> np.ndarray:
    """The voxel-to-RAS affine of a 3D NRRD header (space directions, space origin, space)."""
    directions = header.get("space directions")
    if directions is None:
        raise InputError(f"{path}: the NRRD header has no 'space directions': its voxels have no position in space")
    rows = [np.asarray(d, float) for d in directions if d is not None and not np.all(np.isnan(np.asarray(d, float)))]
    if ndim != 3 or len(rows) != 3 or any(r.shape != (3,) for r in rows):
        raise InputError(f"{path}: expected a 3D scalar NRRD volume, got {ndim} axes with {len(rows)} spatial ones")
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
