"""benchmarks/robustness.py: the variants move image and label together, and the script runs end to end."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from heartseg.runtime.preprocess import to_canonical
from heartseg.runtime.image import Volume

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import robustness  # noqa: E402


@pytest.mark.parametrize("name", list(robustness.VARIANTS))
def test_variants_keep_image_and_label_aligned(name):
    rng = np.random.default_rng(0)
    label = np.zeros((10, 12, 8), np.uint8)
    label[2:5, 3:9, 1:4] = 1
    image = (rng.random(label.shape) * 50 + 150 * label).astype(np.float32)
    affine = np.diag([1.2, 0.8, 1.5, 1.0])
    data, ref, new_affine = robustness.VARIANTS[name](image, label, affine)
    assert data.shape == ref.shape
    bright = np.asarray(data, float) > np.median(np.asarray(data, float)[ref == 0]) * 1.0
    # The label still marks the bright voxels wherever the variant moved them.
    assert bright[ref > 0].mean() > 0.95
    if name.startswith("slices"):
        return  # thicker slices: their own test
    spacing_before = sorted(np.sqrt((affine[:3, :3] ** 2).sum(0)))
    assert sorted(np.sqrt((new_affine[:3, :3] ** 2).sum(0))) == pytest.approx(spacing_before)


def test_thick_slice_variant_averages_slabs_and_places_them_at_their_centres():
    image = np.broadcast_to(np.arange(9, dtype=np.float32), (3, 4, 9)).copy()
    label = np.zeros(image.shape, np.uint8)
    label[..., 2:6] = 1
    affine = np.diag([1.0, 1.0, 0.625, 1.0])
    affine[:3, 3] = (5.0, 6.0, 7.0)
    data, ref, new_affine = robustness.VARIANTS["slices 2.5 mm, axis 2"](image, label, affine)
    # Four 0.625 mm slices to a slab: two slabs (the ninth slice dropped), each the mean of its slices.
    assert data.shape == (3, 4, 2) and np.allclose(data[0, 0], [1.5, 5.5])
    assert np.array_equal(ref[0, 0], [1, 1])  # slices 2-3 of 0-3 and 4-5 of 4-7: half of each, rounded up
    assert np.allclose(new_affine[:3, 2], [0.0, 0.0, 2.5])
    # The new voxel's centre is its slab's centre: slice 1.5 of the old grid.
    assert np.allclose(new_affine @ [0, 0, 0, 1], affine @ [0, 0, 1.5, 1])


def test_lps_variant_is_the_same_anatomy():
    image = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    data, _, lps = robustness.VARIANTS["LPS header"](image, image, affine)
    assert nib.aff2axcodes(lps) == ("L", "P", "S")
    assert np.array_equal(to_canonical(Volume(data, lps)).data, image)


@pytest.mark.parametrize("axis", [0, 2])
def test_fov_cut_variants_end_the_scan_halfway_through_the_atrium(axis):
    label = np.zeros((10, 12, 8), np.uint8)
    label[2:6, 3:9, 2:6] = 1
    image = np.arange(label.size, dtype=np.float32).reshape(label.shape)
    affine = np.diag([1.2, 0.8, 1.5, 1.0])
    data, ref, new_affine = robustness.VARIANTS[f"field of view cut, axis {axis}"](image, label, affine)
    assert data.shape[axis] == 4 and np.array_equal(data, np.take(image, range(4), axis=axis))
    assert np.array_equal(ref, np.take(label, range(4), axis=axis)) and ref.sum() == label.sum() // 2
    assert np.array_equal(new_affine, affine)


def test_script_runs_on_a_tiny_model(tmp_path):
    from onnx_models import build_test_model, make_scan

    root = tmp_path / "data"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    scan, label = make_scan(tmp_path / "c1.nii.gz")
    (root / "imagesTr" / "c1.nii.gz").write_bytes(scan.read_bytes())
    (root / "labelsTr" / "c1.nii.gz").write_bytes(label.read_bytes())
    model = build_test_model(tmp_path / "m.onnx",
                             edit_contract=lambda contract: contract.setdefault("info", {}).update(val_cases="c1"))
    out = tmp_path / "r.json"
    assert robustness.main(["--model", str(model), "--data", str(root), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {r["variant"] for r in rows} == set(robustness.VARIANTS) and all(r["case"] == "c1" for r in rows)
    assert all(0.0 <= r["dice"] <= 1.0 for r in rows)
