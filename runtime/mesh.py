"""The atrium's surface: marching cubes on the mask (scikit-image), in scanner coordinates, as STL or VTK.

The mask is smoothed with a Gaussian of one voxel before marching cubes at the 0.5 level: on the
raw voxels the surface follows their staircase, which inflates a sphere's area by about 10 %;
smoothed, it is within 1 % for a sphere of 16 voxels' radius (the size of a left atrium at 1.25 mm).

Vertices are placed with the scan's affine, so the surface lies where the atrium is in the scanner
(oblique and anisotropic grids included) and triangles face outwards. Files are in LPS (DICOM
patient coordinates, what 3D Slicer assumes for STL and VTK) unless RAS is asked for; the space is
named in each file's header, where Slicer reads it. The VTK file is legacy binary VTK holding an
unstructured grid of triangles, which VTK, pyvista, 3D Slicer, meshio and trimesh (through meshio) read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scipy import ndimage

from .atomic import atomic_output
from .errors import InputError
from .formats.base import optional_import

MESH_FORMATS = ("stl", "vtk")
SPACES = ("lps", "ras")
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
SMOOTHING_VOXELS = 1.0
VTK_TRIANGLE = 5  # VTK cell type


@dataclass
class Mesh:
    """A closed triangle surface: vertices (n, 3) in RAS mm and faces (m, 3) of vertex indices, outward."""

    vertices: np.ndarray
    faces: np.ndarray

    @property
    def area_mm2(self) -> float:
        """Total triangle area in mm^2."""
        a, b, c = (self.vertices[self.faces[:, i]] for i in range(3))
        return float(0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1).sum())

    @property
    def enclosed_mm3(self) -> float:
        """Volume enclosed by the surface in mm^3 (divergence theorem; positive when faces point outwards)."""
        a, b, c = (self.vertices[self.faces[:, i]] for i in range(3))
        return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)

    def in_space(self, space: str) -> np.ndarray:
        """Vertices in 'ras' or 'lps' coordinates."""
        return self.vertices if space == "ras" else self.vertices @ RAS_TO_LPS.T


def surface_mesh(mask: np.ndarray, affine: np.ndarray) -> Mesh:
    """The surface at the 0.5 level of a binary mask, in the world coordinates of affine (RAS mm)."""
    measure = optional_import("skimage.measure", "the atrium's surface (statistics, meshes)")
    mask = np.asarray(mask) != 0
    if not mask.any():
        return Mesh(np.zeros((0, 3)), np.zeros((0, 3), np.int64))
    pad = 3  # room for the smoothing, and a closed surface where the mask touches the border
    field = ndimage.gaussian_filter(np.pad(mask.astype(np.float32), pad), SMOOTHING_VOXELS)
    if field.max() <= 0.5:  # a mask too thin to survive smoothing keeps its voxel surface
        field = np.pad(mask.astype(np.float32), pad)
    verts, faces, _, _ = measure.marching_cubes(field, level=0.5)
    affine = np.asarray(affine, float)
    world = (verts - pad) @ affine[:3, :3].T + affine[:3, 3]
    mesh = Mesh(world, faces.astype(np.int64))
    if mesh.enclosed_mm3 < 0:  # mirrored affines (and marching cubes' own convention) can turn faces inwards
        mesh.faces = mesh.faces[:, ::-1].copy()
    return mesh


def write_mesh(mesh: Mesh, path: Path, kind: str, space: str = "lps", overwrite: bool = True) -> Path:
    """Write the mesh as binary STL or legacy binary VTK (an unstructured grid of triangles), atomically."""
    if kind not in MESH_FORMATS:
        raise InputError(f"unknown mesh format {kind!r}: choose one of {', '.join(MESH_FORMATS)}")
    if space not in SPACES:
        raise InputError(f"unknown mesh space {space!r}: choose one of {', '.join(SPACES)}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path}: exists (use --overwrite to replace it)")
    vertices = mesh.in_space(space)
    payload = _stl(vertices, mesh.faces, space) if kind == "stl" else _vtk(vertices, mesh.faces, space)
    with atomic_output(path) as tmp:
        tmp.write_bytes(payload)
    return path


def _stl(vertices: np.ndarray, faces: np.ndarray, space: str) -> bytes:
    triangles = vertices[faces].astype(np.float32)  # (m, 3 corners, 3)
    normals = np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])
    lengths = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = np.divide(normals, lengths, out=np.zeros_like(normals), where=lengths > 0)
    record = np.dtype([("normal", "<f4", 3), ("corners", "<f4", (3, 3)), ("attribute", "<u2")])
    data = np.zeros(len(faces), record)
    data["normal"], data["corners"] = normals, triangles
    header = f"heartseg left atrium SPACE={space.upper()}".encode("ascii").ljust(80, b" ")
    return header + struct.pack("<I", len(faces)) + data.tobytes()


def _vtk(vertices: np.ndarray, faces: np.ndarray, space: str) -> bytes:
    # An UNSTRUCTURED_GRID of triangles, not POLYDATA: meshio (and trimesh through it) reads legacy VTK
    # only as a grid, and VTK, pyvista and 3D Slicer read both. The cell layout is the pre-5.1 one
    # (counts inline), which every VTK version reads.
    cells = np.hstack([np.full((len(faces), 1), 3), faces]).astype(">i4")
    return b"".join([
        f"# vtk DataFile Version 3.0\nheartseg left atrium SPACE={space.upper()}\nBINARY\n"
        f"DATASET UNSTRUCTURED_GRID\nPOINTS {len(vertices)} float\n".encode("ascii"),
        vertices.astype(">f4").tobytes(),
        f"\nCELLS {len(faces)} {cells.size}\n".encode("ascii"),
        cells.tobytes(),
        f"\nCELL_TYPES {len(faces)}\n".encode("ascii"),
        np.full(len(faces), VTK_TRIANGLE, ">i4").tobytes(),
        b"\n",
    ])
