"""The runtime's core: orientation, resampling, whole vs sliding-window inference, thresholds from the file."""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from heartseg.runtime.cli_infer import app
from heartseg.runtime.formats.nifti import load_volume
from heartseg.runtime.image import Volume
from heartseg.runtime.postprocess import largest_component
from heartseg.runtime.preprocess import from_canonical, resample_to_shape, to_canonical
from heartseg.runtime.segmenter import Segmenter
from heartseg.runtime.session import OnnxSession
from heartseg.runtime.sliding_window import predict_tiled, predict_volume, predict_whole
from onnx_models import (
    TEST_MODEL_BIAS,
    build_test_model,
    default_affine,
    ellipsoid_image,
    make_scan,
    rotation_affine,
)

# --- orientation ------------------------------------------------------------------------------


def permuted_affine(perm: tuple[int, int, int], flips: tuple[int, int, int], spacing=(0.9, 1.3, 2.1)) -> np.ndarray:
    """An axis-aligned affine whose array axes run along world axes perm, flipped where flips is -1."""
    affine = np.zeros((4, 4))
    for array_axis, (world_axis, flip) in enumerate(zip(perm, flips)):
        affine[world_axis, array_axis] = flip * spacing[array_axis]
    affine[:3, 3] = (12.0, -7.0, 3.5)
    affine[3, 3] = 1.0
    return affine


def check_canonical(data: np.ndarray, affine: np.ndarray) -> None:
    """to_canonical agrees with nibabel's as_closest_canonical, and from_canonical undoes it exactly."""
    canonical = to_canonical(Volume(data, affine), "RAS")
    reference = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    np.testing.assert_array_equal(canonical.data, np.asanyarray(reference.dataobj))
    np.testing.assert_allclose(canonical.spacing, reference.header.get_zooms()[:3], rtol=1e-6)
    assert nib.aff2axcodes(reference.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(from_canonical(canonical.data, canonical), data)


ALL_ORIENTATIONS = list(itertools.product(itertools.permutations(range(3)), itertools.product((1, -1), repeat=3)))
ORIENTATION_IDS = ["".join(f"{'-' if f < 0 else '+'}{'xyz'[a]}" for a, f in zip(p, fl)) for p, fl in ALL_ORIENTATIONS]


@pytest.mark.parametrize("perm,flips", ALL_ORIENTATIONS, ids=ORIENTATION_IDS)
def test_orientation_round_trip(perm, flips) -> None:
    """Every axis permutation and flip (all 48 axis-aligned orientations)."""
    rng = np.random.default_rng(ALL_ORIENTATIONS.index((perm, flips)))
    data = rng.standard_normal((5, 6, 7)).astype(np.float32)
    check_canonical(data, permuted_affine(perm, flips))


def test_orientation_round_trip_oblique() -> None:
    rng = np.random.default_rng(7)
    data = rng.standard_normal((6, 5, 8)).astype(np.float32)
    for angles in [(20.0, -12.0, 8.0), (-35.0, 10.0, 40.0), (5.0, 170.0, -80.0)]:
        check_canonical(data, rotation_affine(angles_deg=angles))


# --- resampling -------------------------------------------------------------------------------


def test_resample_identity_and_shape() -> None:
    rng = np.random.default_rng(0)
    data = rng.standard_normal((9, 10, 11)).astype(np.float32)
    np.testing.assert_array_equal(resample_to_shape(data, data.shape), data)
    for shape in [(5, 20, 11), (18, 4, 7), (1, 1, 1)]:
        out = resample_to_shape(data, shape)
        assert out.shape == shape and out.dtype == np.float32
        assert data.min() - 1e-5 <= out.min() and out.max() <= data.max() + 1e-5  # linear: no overshoot
    np.testing.assert_allclose(resample_to_shape(np.full((4, 6, 8), 3.5, np.float32), (9, 3, 17)), 3.5, rtol=1e-6)
    labels = rng.integers(0, 3, (9, 10, 11)).astype(np.uint8)
    nearest = resample_to_shape(labels, (18, 20, 22), order=0)
    assert nearest.dtype == np.uint8 and set(np.unique(nearest)) <= {0, 1, 2}
    # Upsampling by 2 with nearest neighbour and aligned voxel centres repeats each voxel twice.
    np.testing.assert_array_equal(nearest, labels.repeat(2, 0).repeat(2, 1).repeat(2, 2))


# --- whole volume vs sliding window -----------------------------------------------------------


@pytest.mark.parametrize("shape", [(37, 50, 29), (70, 45, 83), (8, 64, 17)])
def test_whole_equals_tiled(single_networks: Path, shape) -> None:
    session = OnnxSession(single_networks, device="cpu", threads=1)

    def predict(batch: np.ndarray) -> np.ndarray:
        return session.predict("single", batch)

    rng = np.random.default_rng(sum(shape))
    volume = rng.standard_normal(shape).astype(np.float32) * 2.0
    whole = predict_whole(volume, predict, divisor=8)
    tiled = predict_tiled(volume, predict, patch_size=(24, 32, 16), divisor=8)
    assert whole.shape == tiled.shape == shape
    np.testing.assert_allclose(tiled, whole, atol=1e-5, rtol=0)
    # And the pointwise model really is sigmoid(x + bias) on every voxel.
    np.testing.assert_allclose(whole, 1 / (1 + np.exp(-(volume + TEST_MODEL_BIAS))), atol=1e-5)
    # predict_volume switches to tiles under a voxel budget and must not change the answer.
    np.testing.assert_allclose(predict_volume(volume, predict, (24, 32, 16), 8, max_voxels=1000), whole, atol=1e-5)


def _conv_like(batch: np.ndarray) -> np.ndarray:
    """A 3x3x3 mean filter with zero padding, then a sigmoid: a network whose tiles see their borders."""
    from scipy import ndimage

    out = np.empty_like(batch)
    for n in range(batch.shape[0]):
        out[n, 0] = ndimage.uniform_filter(batch[n, 0], size=3, mode="constant", cval=0.0)
    return 1.0 / (1.0 + np.exp(-out))


def test_tiled_blending_hides_tile_borders_of_a_real_convolution() -> None:
    """With a receptive field, tiles differ from the whole volume at their own borders (zero padding
    inside the volume). Away from tile borders, tiled and whole agree exactly (both pad the volume
    the same way); at tile borders, Gaussian blending keeps the error
    several times smaller than plain averaging."""
    rng = np.random.default_rng(3)
    volume = rng.standard_normal((40, 37, 29)).astype(np.float32)
    whole = predict_whole(volume, _conv_like, 8)
    diff = np.abs(whole - predict_tiled(volume, _conv_like, (16, 16, 16), 8))
    assert float(np.mean(diff < 1e-5)) > 0.55
    assert np.percentile(diff, 99) < 0.03
    uniform = np.abs(whole - _tiled_with_uniform_weights(volume))
    assert diff.mean() < 0.3 * uniform.mean()


def _tiled_with_uniform_weights(volume: np.ndarray) -> np.ndarray:
    from heartseg.runtime import sliding_window

    original = sliding_window.gaussian_weights
    sliding_window.gaussian_weights = lambda patch, sigma_scale=0.125: np.ones(patch, np.float32)
    try:
        return predict_tiled(volume, _conv_like, (16, 16, 16), 8)
    finally:
        sliding_window.gaussian_weights = original


@pytest.mark.parametrize("stage", ["coarse", "fine"])
def test_whole_equals_tiled_cascade_stages(cascade_networks: Path, stage: str) -> None:
    session = OnnxSession(cascade_networks, device="cpu", threads=1)
    volume = np.random.default_rng(1).standard_normal((30, 41, 26)).astype(np.float32)
    whole = predict_whole(volume, lambda b: session.predict(stage, b), 8)
    tiled = predict_tiled(volume, lambda b: session.predict(stage, b), (16, 16, 16), 8)
    np.testing.assert_allclose(tiled, whole, atol=1e-5, rtol=0)


def test_memory_limit_gives_the_same_mask(any_model: Path) -> None:
    image, _ = ellipsoid_image((40, 48, 36), seed=4)
    volume = Volume(image, default_affine())
    whole = Segmenter(any_model, device="cpu", threads=1).segment(volume, keep_prob=True)
    tiled = Segmenter(any_model, device="cpu", threads=1, max_network_voxels=83).segment(volume, keep_prob=True)
    np.testing.assert_allclose(tiled.prob, whole.prob, atol=1e-5)
    np.testing.assert_array_equal(tiled.mask, whole.mask)


# --- the Python API ---------------------------------------------------------------------------


def test_segmenter_predict_keeps_the_affine(any_model: Path) -> None:
    image, label = ellipsoid_image((40, 48, 36), seed=6)
    affine = rotation_affine(angles_deg=(25.0, -15.0, 30.0))
    result = Segmenter(any_model, device="cpu", threads=1).predict(nib.Nifti1Image(image, affine)).mask
    assert isinstance(result, nib.Nifti1Image)
    assert result.shape == image.shape
    np.testing.assert_allclose(result.affine, affine, atol=1e-6)
    mask = np.asanyarray(result.dataobj)
    assert mask.dtype == np.uint8
    assert 2 * np.count_nonzero(mask & label) / (mask.sum() + label.sum()) > 0.85


def test_segmenter_predict_accepts_4d_singleton(single_model: Path) -> None:
    image, _ = ellipsoid_image((20, 24, 18))
    result = Segmenter(single_model, device="cpu", threads=1).predict(nib.Nifti1Image(image[..., None], np.eye(4)))
    assert result.mask.shape == (20, 24, 18)


# --- the threshold is the file's, and soft probabilities are resampled ------------------------


def test_threshold_comes_from_the_model_file(tmp_path: Path) -> None:
    low = build_test_model(tmp_path / "t03.onnx", threshold=0.3, bias=TEST_MODEL_BIAS)
    high = build_test_model(tmp_path / "t07.onnx", threshold=0.7, bias=TEST_MODEL_BIAS)
    scan, _ = make_scan(tmp_path / "s.nii.gz", edge=0.15)
    volume = load_volume(scan)
    masks = {}
    for threshold, model in ((0.3, low), (0.7, high)):
        segmenter = Segmenter(model, device="cpu", threads=1)
        assert segmenter.contract.final_stage.threshold == threshold
        prediction = segmenter.segment(volume, keep_prob=True)
        # The mask is exactly the largest component of (soft probability > the file's threshold) on the scan grid.
        np.testing.assert_array_equal(prediction.mask, largest_component(prediction.prob > threshold))
        masks[threshold] = prediction.mask
    assert masks[0.3].sum() > masks[0.7].sum() > 0
    assert np.all(masks[0.3] >= masks[0.7])


def test_saved_probabilities_are_soft(tmp_path: Path, single_model: Path, run_cli) -> None:
    scan, _ = make_scan(tmp_path / "in" / "s.nii.gz", affine=rotation_affine())
    out = tmp_path / "out"
    result = run_cli(app, scan, "-o", out, "--model", single_model, "--threads", 1, "--save-prob")
    assert result.exit_code == 0, result.output
    prob_image = nib.load(str(out / "s_prob.nii.gz"))
    mask = np.asanyarray(nib.load(str(out / "s_mask.nii.gz")).dataobj)
    assert prob_image.shape == mask.shape == nib.load(str(scan)).shape
    np.testing.assert_allclose(prob_image.affine, nib.load(str(scan)).affine, atol=1e-5)
    prob = np.asanyarray(prob_image.dataobj)
    assert prob.dtype == np.float32
    assert prob.min() >= 0.0 and prob.max() <= 1.0
    assert len(np.unique(prob)) > 1000  # soft, not a resampled binary mask
    assert np.count_nonzero((prob > 0.05) & (prob < 0.95)) > 100
    np.testing.assert_array_equal(mask, largest_component(prob > 0.5))


def test_a_volume_smaller_than_the_patch_is_padded_up_to_it_as_in_training() -> None:
    """Instance-normalised networks see the share of padding they saw in training: a volume smaller
    than the training patch along an axis is padded to the patch with its minimum, whole or tiled."""
    seen: list[np.ndarray] = []

    def record(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.copy())
        return np.full(batch.shape, 0.25, np.float32)

    volume = np.random.default_rng(5).standard_normal((30, 70, 12)).astype(np.float32)
    whole = predict_whole(volume, record, 8, patch_size=(64, 64, 64))
    assert seen[-1].shape == (1, 1, 64, 72, 64) and whole.shape == volume.shape
    padding = seen[-1][0, 0, 30:, :, :]
    assert np.all(padding == volume.min())
    seen.clear()
    tiled = predict_tiled(volume, record, (64, 64, 64), 8)
    assert all(batch.shape == (1, 1, 64, 64, 64) for batch in seen) and len(seen) == 2
    np.testing.assert_allclose(tiled, whole)
    assert predict_volume(volume, record, (64, 64, 64), 8).shape == volume.shape
