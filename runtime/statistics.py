"""Left-atrium statistics of a mask: volume, surface area, sphericity and maximal diameters.

Diameters are the mask's largest extents along the scanner's anatomical axes, taken from the scan's
affine (RAS): mediolateral along R-L, anteroposterior along A-P, superoinferior along S-I. Each is
measured from the outer faces of the outermost voxels, so a mask one voxel thick spans one voxel's
size. The directions are only as anatomical as the scan's header: a dataset stored with an
axis-aligned affine that is not known to be RAS (LA2018's, for one) gives extents along its array
axes, whatever they are.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .mesh import surface_mesh

# (name, RAS axis) of each reported diameter.
DIAMETER_AXES = (("ml_diameter_mm", 0), ("ap_diameter_mm", 1), ("si_diameter_mm", 2))


@dataclass(frozen=True)
class AtriumStatistics:
    """Shape statistics of one mask (None where an empty mask leaves them undefined)."""

    volume_ml: float
    surface_area_cm2: float | None
    sphericity: float | None
    ap_diameter_mm: float | None
    si_diameter_mm: float | None
    ml_diameter_mm: float | None

    def to_dict(self) -> dict[str, float | None]:
        """A JSON-ready record."""
        return asdict(self)


def axis_extents(mask: np.ndarray, affine: np.ndarray) -> np.ndarray | None:
    """Extent (mm) of the mask's voxels along the world x, y and z axes, voxel faces included; None when empty."""
    index = np.argwhere(np.asarray(mask) != 0)
    if index.size == 0:
        return None
    linear = np.asarray(affine, float)[:3, :3]
    centres = index @ linear.T
    # A voxel spans half of each column of the affine either way; its width along world axis w is sum_i |A[w, i]|.
    width = np.abs(linear).sum(axis=1)
    return centres.max(axis=0) - centres.min(axis=0) + width


def atrium_statistics(mask: np.ndarray, affine: np.ndarray) -> AtriumStatistics:
    """Volume (mL, voxel count), surface area (cm^2, mesh.surface_mesh), sphericity and RAS-axis diameters (mm)."""
    mask = np.asarray(mask) != 0
    voxel_mm3 = abs(float(np.linalg.det(np.asarray(affine, float)[:3, :3])))
    volume_mm3 = float(mask.sum()) * voxel_mm3
    extents = axis_extents(mask, affine)
    if extents is None:
        return AtriumStatistics(0.0, None, None, None, None, None)
    area = surface_mesh(mask, affine).area_mm2
    # Sphericity: the surface of the sphere with the same volume, over the actual surface (1 for a sphere).
    sphericity = math.pi ** (1 / 3) * (6.0 * volume_mm3) ** (2 / 3) / area if area > 0 else None
    diameters = {name: float(extents[axis]) for name, axis in DIAMETER_AXES}
    return AtriumStatistics(volume_mm3 / 1000.0, area / 100.0, sphericity, **diameters)
