"""The --mesh files open in the mesh libraries people use: meshio, and trimesh (which reads .vtk through meshio).

meshio reads legacy VTK files only as an UNSTRUCTURED_GRID (not POLYDATA), so that is what heartseg
writes; VTK itself, pyvista and 3D Slicer read that too. Both libraries must give back the vertices
(LPS, as written) and the triangles of the surface, closed and facing outwards.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from heartseg.runtime.mesh import Mesh, surface_mesh, write_mesh

pytest.importorskip("skimage", reason="scikit-image is not installed (pip install 'heartseg[mesh]')")


def ball_mesh(radius: float = 7.0) -> Mesh:
    """The surface of a ball of radius voxels on an anisotropic grid away from the origin."""
    size = int(2 * radius + 6)
    grid = np.indices((size, size, size)) - (size - 1) / 2
    mask = np.sqrt((grid ** 2).sum(axis=0)) <= radius
    affine = np.diag([0.9, 1.1, 1.3, 1.0])
    affine[:3, 3] = (12.0, -30.0, 45.0)
    return surface_mesh(mask, affine)


@pytest.fixture
def vtk_file(tmp_path: Path) -> tuple[Mesh, Path]:
    mesh = ball_mesh()
    return mesh, write_mesh(mesh, tmp_path / "la_mesh.vtk", "vtk", "lps")


def test_vtk_mesh_reads_in_meshio(vtk_file) -> None:
    meshio = pytest.importorskip("meshio", reason="meshio is not installed (pip install meshio)")
    mesh, path = vtk_file
    read = meshio.read(str(path))
    np.testing.assert_allclose(read.points, mesh.in_space("lps"), atol=1e-4)
    assert [block.type for block in read.cells] == ["triangle"]
    np.testing.assert_array_equal(read.cells_dict["triangle"], mesh.faces)


def test_vtk_mesh_reads_in_trimesh(vtk_file) -> None:
    trimesh = pytest.importorskip("trimesh", reason="trimesh is not installed (pip install trimesh)")
    pytest.importorskip("meshio", reason="trimesh reads .vtk through meshio, which is not installed")
    if "vtk" not in trimesh.available_formats():
        pytest.skip(f"trimesh {trimesh.__version__} reads no .vtk files (its meshio loader is gone)")
    mesh, path = vtk_file
    read = trimesh.load(str(path), force="mesh", process=False)
    np.testing.assert_allclose(read.vertices, mesh.in_space("lps"), atol=1e-4)
    np.testing.assert_array_equal(read.faces, mesh.faces)
    assert read.is_watertight
    # LPS negates two axes (a rotation), so the enclosed volume and the outward faces are kept.
    assert read.volume == pytest.approx(mesh.enclosed_mm3, rel=1e-4)
    assert read.volume > 0
