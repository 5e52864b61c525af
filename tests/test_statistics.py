"""Atrium statistics and meshes against hand-computed values on constructed shapes."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("skimage", reason="scikit-image is not installed (pip install 'heartseg[mesh]')")

from heartseg.runtime.mesh import surface_mesh, write_mesh  # noqa: E402
from heartseg.runtime.statistics import atrium_statistics  # noqa: E402
from scan_formats import rotation  # noqa: E402

RADIUS_MM = 20.0
SPACING = (0.8, 1.0, 1.3)


def sphere(radius: float = RADIUS_MM, spacing=SPACING, centre_offset=(3.0, -2.0, 5.0)):
    """A voxelised ball of radius mm (voxel centres inside it) and its grid's affine, centred off the origin."""
    shape = [int(2 * radius / s) + 8 for s in spacing]
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    mask = (x**2 + y**2 + z**2) <= radius**2
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * spacing + np.asarray(centre_offset)
    return mask, affine


def test_sphere_statistics_match_the_formulas() -> None:
    mask, affine = sphere()
    stats = atrium_statistics(mask, affine)
    volume_ml = 4 / 3 * math.pi * RADIUS_MM**3 / 1000
    area_cm2 = 4 * math.pi * RADIUS_MM**2 / 100
    assert stats.volume_ml == pytest.approx(volume_ml, rel=0.01)
    assert stats.surface_area_cm2 == pytest.approx(area_cm2, rel=0.02)
    assert stats.sphericity == pytest.approx(1.0, abs=0.03)
    # Extents from the outer faces of the outermost voxels: the diameter, within one voxel.
    for name, spacing in (("ml_diameter_mm", SPACING[0]), ("ap_diameter_mm", SPACING[1]),
                          ("si_diameter_mm", SPACING[2])):
        assert abs(getattr(stats, name) - 2 * RADIUS_MM) <= spacing, name


def test_box_diameters_follow_the_ras_axes() -> None:
    # A box 10 x 20 x 30 voxels of 1 x 2 x 3 mm stored with its array axes as (S, R, A): extents 20, 60, 30 mm.
    mask = np.zeros((40, 30, 40), bool)
    mask[5:15, 5:25, 5:35] = True
    affine = np.zeros((4, 4))
    affine[2, 0], affine[0, 1], affine[1, 2], affine[3, 3] = 2.0, 1.0, 3.0, 1.0
    stats = atrium_statistics(mask, affine)
    assert stats.si_diameter_mm == pytest.approx(20.0)  # axis 0: 10 voxels x 2 mm along S
    assert stats.ml_diameter_mm == pytest.approx(20.0)  # axis 1: 20 voxels x 1 mm along R
    assert stats.ap_diameter_mm == pytest.approx(90.0)  # axis 2: 30 voxels x 3 mm along A
    assert stats.volume_ml == pytest.approx(10 * 20 * 30 * 6 / 1000)
    # A long box is far from a sphere: the same-volume sphere's area over the box's is 0.66; the surface's
    # one-voxel smoothing rounds the box's edges (less area), so its value lies a little above.
    a, b, c = 20.0, 20.0, 90.0
    box = math.pi ** (1 / 3) * (6 * a * b * c) ** (2 / 3) / (2 * (a * b + b * c + a * c))
    assert box <= stats.sphericity <= box + 0.1


def test_oblique_grid_keeps_volume_area_and_sphericity() -> None:
    mask, affine = sphere(radius=12.0, spacing=(1.0, 1.0, 1.0))
    turned = affine.copy()
    turned[:3, :3] = rotation((30.0, 20.0, 10.0)) @ affine[:3, :3]
    straight, oblique = atrium_statistics(mask, affine), atrium_statistics(mask, turned)
    assert oblique.volume_ml == pytest.approx(straight.volume_ml, rel=1e-9)
    assert oblique.surface_area_cm2 == pytest.approx(straight.surface_area_cm2, rel=1e-6)
    assert oblique.sphericity == pytest.approx(straight.sphericity, rel=1e-6)


def test_empty_mask_has_no_shape() -> None:
    stats = atrium_statistics(np.zeros((5, 5, 5), bool), np.eye(4))
    assert stats.volume_ml == 0.0 and stats.surface_area_cm2 is None and stats.ap_diameter_mm is None


def _read_stl(path: Path) -> tuple[str, np.ndarray, np.ndarray]:
    raw = path.read_bytes()
    count = struct.unpack_from("<I", raw, 80)[0]
    record = np.dtype([("normal", "<f4", 3), ("corners", "<f4", (3, 3)), ("attribute", "<u2")])
    data = np.frombuffer(raw, record, count=count, offset=84)
    assert len(raw) == 84 + count * 50
    return raw[:80].decode("ascii").strip(), data["corners"].astype(float), data["normal"].astype(float)


def test_stl_mesh_is_closed_outward_and_in_scanner_space(tmp_path: Path) -> None:
    mask, affine = sphere(radius=10.0, spacing=(1.0, 1.0, 1.0), centre_offset=(30.0, -40.0, 50.0))
    mesh = surface_mesh(mask, affine)
    header, corners, normals = _read_stl(write_mesh(mesh, tmp_path / "la.stl", "stl", "ras"))
    assert "SPACE=RAS" in header
    centre = corners.reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(centre, (30.0, -40.0, 50.0), atol=0.2)  # where the ball is in the scanner
    outward = np.einsum("ij,ij->i", normals, corners.mean(axis=1) - centre)
    assert (outward > 0).mean() > 0.99
    # LPS: x and y negated.
    header, lps, _ = _read_stl(write_mesh(mesh, tmp_path / "la_lps.stl", "stl", "lps"))
    assert "SPACE=LPS" in header
    np.testing.assert_allclose(lps.reshape(-1, 3).mean(axis=0), (-30.0, 40.0, 50.0), atol=0.2)
    # A mirrored affine (LAS storage) must not turn the faces inwards.
    mirrored = affine.copy()
    mirrored[0, 0] = -1.0
    assert surface_mesh(mask, mirrored).enclosed_mm3 > 0


def test_vtk_mesh_reads_back(tmp_path: Path) -> None:
    mask, affine = sphere(radius=6.0, spacing=(1.0, 1.0, 1.0))
    mesh = surface_mesh(mask, affine)
    raw = write_mesh(mesh, tmp_path / "la.vtk", "vtk", "lps").read_bytes()
    head, _, rest = raw.partition(b"POINTS ")
    assert b"SPACE=LPS" in head and b"DATASET UNSTRUCTURED_GRID" in head
    count = int(rest.split(b" ")[0])
    body = rest[rest.index(b"\n") + 1:]
    points = np.frombuffer(body, ">f4", count=3 * count).reshape(-1, 3)
    np.testing.assert_allclose(points, mesh.in_space("lps"), atol=1e-4)
    polygons = body[12 * count:]
    assert polygons.startswith(f"\nCELLS {len(mesh.faces)} {4 * len(mesh.faces)}\n".encode())
    assert f"\nCELL_TYPES {len(mesh.faces)}\n".encode() in polygons  # each cell a triangle (VTK type 5)
