"""The Python API: from heartseg import Segmenter; predict on paths, nibabel and SimpleITK images, numpy arrays."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from heartseg.runtime.errors import InputError
from onnx_models import ellipsoid_image, make_scan, rotation_affine

SPACING = (0.7, 1.0, 2.0)  # anisotropic, so that an axis mix-up shows


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory):
    from heartseg import Segmenter
    from onnx_models import TEST_MODEL_BIAS, build_test_model

    model = build_test_model(tmp_path_factory.mktemp("api") / "single.onnx", bias=TEST_MODEL_BIAS)
    return Segmenter(model, device="cpu", threads=1)


def test_top_level_package_and_version(repo_root: Path) -> None:
    import heartseg
    from heartseg.runtime import __version__ as runtime_version

    declared = re.search(r'^version = "([^"]+)"', (repo_root / "pyproject.toml").read_text(), re.M).group(1)
    assert heartseg.__version__ == runtime_version == declared
    assert heartseg.Segmenter.__module__ == "heartseg.runtime.segmenter"


def test_path_and_nibabel_image_give_the_same_result(tmp_path: Path, segmenter) -> None:
    scan, label = make_scan(tmp_path / "s.nii.gz", affine=rotation_affine(), seed=4)
    from_path = segmenter.predict(scan)
    from_image = segmenter.predict(nib.load(str(scan)))
    for result in (from_path, from_image):
        assert isinstance(result.mask, nib.Nifti1Image) and isinstance(result.probabilities, nib.Nifti1Image)
        np.testing.assert_allclose(result.mask.affine, nib.load(str(scan)).affine, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(from_path.mask.dataobj), np.asarray(from_image.mask.dataobj))
    probabilities = np.asarray(from_path.probabilities.dataobj)
    assert probabilities.dtype == np.float32 and 0.0 <= probabilities.min() and probabilities.max() <= 1.0
    truth = np.asarray(nib.load(str(label)).dataobj)
    mask = from_path.mask_array
    assert 2 * np.count_nonzero(mask & truth) / (mask.sum() + truth.sum()) > 0.85
    assert from_path.volume_ml == pytest.approx(mask.sum() * abs(np.linalg.det(from_path.affine[:3, :3])) / 1000)
    assert from_path.qc is None
    assert {"read", "preprocess", "network", "postprocess"} <= set(from_path.timings)
    assert from_path.timings["read"] > 0 and from_image.timings["read"] == 0


def test_numpy_array_with_spacing_or_affine(segmenter) -> None:
    image, label = ellipsoid_image((40, 48, 36), seed=2)
    result = segmenter.predict(image, spacing=SPACING)
    assert isinstance(result.mask, np.ndarray) and result.mask.shape == image.shape and result.mask.dtype == np.uint8
    np.testing.assert_allclose(result.affine, np.diag([*SPACING, 1.0]))
    affine = rotation_affine()
    with_affine = segmenter.predict(image, affine=affine)
    np.testing.assert_array_equal(with_affine.mask, segmenter.predict(nib.Nifti1Image(image, affine)).mask_array)
    with pytest.raises(InputError, match="spacing"):
        segmenter.predict(image)
    with pytest.raises(InputError, match="disagrees"):
        segmenter.predict(image, spacing=(1, 1, 1), affine=affine)


def test_simpleitk_image_and_the_axis_order_trap(segmenter) -> None:
    sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is not installed (pip install 'heartseg[itk]')")
    pytest.importorskip("skimage", reason="scikit-image is not installed (pip install 'heartseg[mesh]')")
    image, _ = ellipsoid_image((40, 48, 36), seed=5, centre=(0.4, 0.55, 0.6), radii=(0.3, 0.2, 0.15))
    itk = sitk.GetImageFromArray(image.transpose(2, 1, 0).copy())  # SimpleITK arrays are (z, y, x)
    itk.SetSpacing(SPACING)
    result = segmenter.predict(itk)
    assert isinstance(result.mask, sitk.Image)
    assert result.mask.GetSize() == itk.GetSize() and result.mask.GetSpacing() == itk.GetSpacing()
    assert result.mask.GetDirection() == itk.GetDirection() and result.mask.GetOrigin() == itk.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.mask).transpose(2, 1, 0), result.mask_array)
    # The reference: the same voxels as a nibabel-ordered (x, y, z) array with its spacing. SimpleITK's
    # identity direction is LPS, the array's RAS: mirrored storage, equal up to voxels at the threshold.
    reference = segmenter.predict(image, spacing=SPACING)
    assert dice(result.mask_array, reference.mask) > 0.995
    zyx = sitk.GetArrayFromImage(itk)
    # Right: the spacing in the array's own axis order, (z, y, x).
    right = segmenter.predict(zyx, spacing=tuple(reversed(itk.GetSpacing())))
    # Its RAS axes are the array's (z, y, x), resampled to the model's spacing in that order: border voxels differ.
    assert dice(right.mask, sitk.GetArrayFromImage(result.mask)) > 0.98
    extents = (reference.statistics.ml_diameter_mm, reference.statistics.ap_diameter_mm,
               reference.statistics.si_diameter_mm)
    assert sorted(extents) == pytest.approx(sorted((right.statistics.ml_diameter_mm, right.statistics.ap_diameter_mm,
                                                     right.statistics.si_diameter_mm)), abs=2.0)
    # The trap: GetArrayFromImage with GetSpacing() as it comes puts 0.7 mm on z and 2 mm on x. The volume
    # (a product of the spacings) survives; the atrium's shape does not.
    wrong = segmenter.predict(zyx, spacing=itk.GetSpacing())
    assert wrong.volume_ml == pytest.approx(reference.volume_ml, rel=0.05)
    wrong_extents = sorted((wrong.statistics.ml_diameter_mm, wrong.statistics.ap_diameter_mm,
                            wrong.statistics.si_diameter_mm))
    assert max(abs(a - b) for a, b in zip(wrong_extents, sorted(extents))) > 5.0


def test_run_writes_like_heartseg_infer(tmp_path: Path, segmenter) -> None:
    from heartseg import segment_files
    from heartseg.runtime.pipeline import OutputOptions

    scan, _ = make_scan(tmp_path / "in" / "s.nii.gz")
    results = segment_files(segmenter, [scan], tmp_path / "out", OutputOptions(save_prob=True))
    assert [r.status for r in results] == ["ok"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["s_mask.nii.gz", "s_prob.nii.gz"]
    assert results[0].timings["write"] > 0


def test_unsupported_input_type(segmenter) -> None:
    with pytest.raises(InputError, match="cannot segment a list"):
        segmenter.predict([1, 2, 3])
