"""The inference path's geometry: separable resampling, the box's native footprint, when the localiser runs, and the
largest component kept inside the foreground's box."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from heartseg.runtime.contract import LOCALISER, ModelContract, StageContract
import heartseg.runtime.inference as inference
from heartseg.runtime.inference import fits_final_stage, grown_box, infer_canonical, stage_box_footprint
from heartseg.runtime.qc import Plausibility
from heartseg.runtime.postprocess import largest_component
from heartseg.runtime.preprocess import CanonicalVolume, resample_to_shape


def affine_reference(data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Trilinear resampling with aligned voxel centres and clamped edges, as one general 3-D affine transform."""
    scale = np.asarray(data.shape, float) / np.asarray(shape, float)
    return ndimage.affine_transform(data.astype(np.float32), scale, offset=0.5 * scale - 0.5, output_shape=shape,
                                    order=1, mode="nearest", output=np.float32, prefilter=False)


@pytest.mark.parametrize("source,target", [((9, 10, 11), (5, 20, 11)), ((9, 10, 11), (18, 4, 7)),
                                           ((30, 31, 17), (61, 13, 17)), ((40, 40, 22), (20, 20, 11)),
                                           ((7, 8, 9), (1, 1, 1))])
def test_separable_resampling_equals_the_affine_transform(source, target) -> None:
    data = np.random.default_rng(sum(source)).standard_normal(source).astype(np.float32)
    reference = affine_reference(data, target)
    np.testing.assert_allclose(resample_to_shape(data, target), reference, atol=2e-6)
    lo = np.minimum([1, 0, 2], np.asarray(target) - 1)
    hi = np.minimum(np.asarray(target), lo + [4, 5, 6])
    part = resample_to_shape(data, target, region=(lo, hi))
    np.testing.assert_allclose(part, reference[tuple(slice(a, b) for a, b in zip(lo, hi))], atol=2e-6)


def test_resampling_a_region_of_the_same_grid_is_a_crop() -> None:
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    lo, hi = np.array([1, 2, 0]), np.array([3, 5, 4])
    np.testing.assert_array_equal(resample_to_shape(data, data.shape, region=(lo, hi)), data[1:3, 2:5, 0:4])


@pytest.mark.parametrize("stage_shape,native_shape", [((40, 40, 44), (80, 80, 22)), ((50, 30, 20), (37, 61, 20)),
                                                      ((16, 16, 16), (16, 16, 16))])
def test_footprint_holds_every_voxel_the_box_reaches(stage_shape, native_shape) -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        lo = rng.integers(0, np.asarray(stage_shape) - 2)
        hi = lo + rng.integers(1, np.asarray(stage_shape) - lo + 1)
        prob = np.zeros(stage_shape, np.float32)
        prob[tuple(slice(a, b) for a, b in zip(lo, hi))] = rng.random(tuple(hi - lo)).astype(np.float32) + 0.1
        whole = resample_to_shape(prob, native_shape)
        f_lo, f_hi = stage_box_footprint((lo, hi), stage_shape, native_shape)
        inside = np.zeros(native_shape, bool)
        inside[tuple(slice(a, b) for a, b in zip(f_lo, f_hi))] = True
        assert not whole[~inside].any(), "a nonzero voxel outside the footprint"
        assert whole[inside].any()


PLAUSIBLE = Plausibility(volume_ml=(10.0, 200.0), extent_mm=((20.0, 100.0), (30.0, 140.0), (50.0, 200.0)))
LOCALISER_STAGE = StageContract("coarse", (4.0, 4.0, 4.0), (16, 16, 16), threshold=0.5, role=LOCALISER,
                                input_name="coarse_image", prob_name="coarse_prob", mask_name="coarse_mask")
FINE_STAGE = StageContract("fine", (2.0, 2.0, 2.0), (16, 16, 16), threshold=0.5, crop_margin_mm=15.0,
                           input_name="fine_image", prob_name="fine_prob", mask_name="fine_mask")
CASCADE = ModelContract(stages=(LOCALISER_STAGE, FINE_STAGE), plausibility=PLAUSIBLE)


def canonical(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> CanonicalVolume:
    data = np.random.default_rng(1).random(shape).astype(np.float32)
    return CanonicalVolume(data, spacing, np.array([[0, 1], [1, 1], [2, 1]], float), shape)


def stages_called(volume: CanonicalVolume, contract: ModelContract) -> set[str]:
    called: set[str] = set()

    def predict(stage: str, batch: np.ndarray) -> np.ndarray:
        called.add(stage)
        return np.full(batch.shape, 0.9, np.float32)

    infer_canonical(volume, contract, predict)
    return called


def test_a_scan_within_the_final_stages_view_skips_the_localiser() -> None:
    # Largest view: sorted extents' maxima plus 15 mm on each side = (130, 170, 230) mm.
    small = canonical((60, 40, 20), (2.0, 2.0, 2.0))      # 120 x 80 x 40 mm: a crop around the atrium
    wide = canonical((160, 160, 60), (2.0, 2.0, 2.0))     # 320 x 320 x 120 mm: a thorax
    assert fits_final_stage(small, CASCADE) and not fits_final_stage(wide, CASCADE)
    assert stages_called(small, CASCADE) == {"fine"}
    assert stages_called(wide, CASCADE) == {"coarse", "fine"}
    # Axes are compared sorted: the same crop stored with other axis order fits too.
    assert fits_final_stage(canonical((20, 60, 40), (2.0, 2.0, 2.0)), CASCADE)
    # One axis too long is enough to localise.
    assert not fits_final_stage(canonical((60, 40, 120), (2.0, 2.0, 2.0)), CASCADE)


def test_without_learned_plausibility_the_localiser_always_runs() -> None:
    contract = ModelContract(stages=(LOCALISER_STAGE, FINE_STAGE))
    small = canonical((60, 40, 20), (2.0, 2.0, 2.0))
    assert not fits_final_stage(small, contract)
    assert stages_called(small, contract) == {"coarse", "fine"}


def blob_prob(shape: tuple[int, int, int], lo: tuple[int, int, int], hi: tuple[int, int, int]) -> np.ndarray:
    prob = np.zeros(shape, np.float32)
    prob[tuple(slice(a, b) for a, b in zip(lo, hi))] = 0.9
    return prob


def test_a_box_grows_only_on_the_faces_the_mask_reaches() -> None:
    box = (np.array([20, 20, 20]), np.array([44, 44, 44]))
    # 15 mm margin at 2 mm: faces move by 8 voxels (and never by less than the divisor).
    reaching = blob_prob((80, 80, 80), (24, 24, 30), (40, 40, 60))  # cut by the box's upper face on axis 2
    lo, hi = grown_box(reaching, box, FINE_STAGE)
    assert lo.tolist() == [20, 20, 20] and hi.tolist() == [44, 44, 52]
    assert grown_box(blob_prob((80, 80, 80), (24, 24, 24), (40, 40, 40)), box, FINE_STAGE) is None
    # A graze of a few voxels on a face is not a cut.
    grazing = blob_prob((80, 80, 80), (24, 24, 24), (40, 40, 40))
    grazing[30, 30, 40:44] = 0.9
    assert grown_box(grazing, box, FINE_STAGE) is None
    # A face on the edge of the grid cannot move.
    at_edge = (np.array([20, 20, 56]), np.array([44, 44, 80]))
    assert grown_box(blob_prob((80, 80, 80), (24, 24, 60), (40, 40, 80)), at_edge, FINE_STAGE) is None
    assert grown_box(np.zeros((80, 80, 80), np.float32), box, FINE_STAGE) is None


def test_the_final_stage_follows_a_mask_that_the_localisers_box_cuts(monkeypatch) -> None:
    shape = (80, 80, 80)  # 160 mm at 2 mm: larger than the final stage's view, so the localiser runs
    image = np.zeros(shape, np.float32)
    image[20:60, 30:50, 30:50] = 1.0  # an 80 mm long bright target
    volume = CanonicalVolume(image, (2.0, 2.0, 2.0), np.array([[0, 1], [1, 1], [2, 1]], float), shape)
    tight = (np.array([20.0, 30.0, 30.0]), np.array([36.0, 50.0, 50.0]))  # the localiser saw 32 mm of it
    monkeypatch.setattr(inference, "locate", lambda *args, **kwargs: tight)

    def predict(stage: str, batch: np.ndarray) -> np.ndarray:
        return np.where(batch > 0, 0.9, 0.1).astype(np.float32)

    target = image > 0
    grown = infer_canonical(volume, CASCADE, predict).prob > 0.5
    assert np.array_equal(grown, target)
    monkeypatch.setattr(inference, "MAX_BOX_GROWTH", 0)
    cut = infer_canonical(volume, CASCADE, predict).prob > 0.5
    assert cut.sum() < 0.7 * target.sum() and not (cut & ~target).any()
    # A box given by the caller (validation of a fine stage on its own) is used as it is.
    monkeypatch.setattr(inference, "MAX_BOX_GROWTH", 2)
    given = infer_canonical(volume, CASCADE, predict, box=tight).prob > 0.5
    assert np.array_equal(given, cut)


def _largest_on_the_whole_grid(mask: np.ndarray) -> np.ndarray:
    """Reference: label every voxel of the grid, keep the most frequent label (the first on ties)."""
    labels = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))[0]
    values, counts = np.unique(labels[labels > 0], return_counts=True)
    return (labels == values[np.argmax(counts)]).astype(np.uint8) if values.size else mask.astype(np.uint8)


@pytest.mark.parametrize("seed", range(12))
def test_largest_component_inside_the_foreground_box_equals_the_whole_grid(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(4, 24, size=3))
    # Sparse to dense masks: several components, ties, components on the faces of the grid.
    mask = (rng.random(shape) < rng.uniform(0.02, 0.4)).astype(np.uint8)
    if seed == 0:
        mask[:] = 0
    elif seed == 1:
        mask[:] = 0
        mask[-1, -1, -1] = 1
    got = largest_component(mask)
    assert got.dtype == np.uint8 and got.shape == mask.shape
    np.testing.assert_array_equal(got, _largest_on_the_whole_grid(mask))
    np.testing.assert_array_equal(largest_component(mask.astype(bool)), got)


def _fine(patch=(16, 16, 16), context="scan") -> StageContract:
    return StageContract("fine", (1.0, 1.0, 1.0), patch, 8, crop_margin_mm=2.0, context=context)


@pytest.mark.parametrize("box,shape,expected", [
    (((20, 20, 20), (28, 36, 44)), (64, 64, 64), ((16, 20, 20), (32, 36, 44))),  # widened about its centre
    (((0, 56, 8), (8, 64, 24)), (64, 64, 64), ((0, 48, 8), (16, 64, 24))),      # shifted inwards at the edges
    (((0, 0, 0), (8, 8, 8)), (12, 64, 10), ((0, 0, 0), (12, 16, 10))),         # no wider than the grid
])
def test_the_context_box_reaches_the_patch_with_scan_and_holds_the_box(box, shape, expected) -> None:
    lo, hi = inference.context_box((np.array(box[0]), np.array(box[1])), shape, _fine())
    assert (tuple(lo), tuple(hi)) == expected
    assert np.all(lo <= box[0]) and np.all(hi >= box[1]) and np.all(lo >= 0) and np.all(hi <= shape)


def test_scan_context_feeds_the_network_scan_around_the_box_and_keeps_its_mask_inside() -> None:
    grid = np.random.default_rng(0).standard_normal((48, 40, 32)).astype(np.float32) + 5.0
    box = (np.array([16, 8, 8]), np.array([24, 16, 16]))
    seen = {}

    def predict(name, batch):
        seen[name] = batch[0, 0].copy()
        return np.full(batch.shape, 0.9, np.float32)

    prob = inference.predict_grid(grid, _fine(context="scan"), predict, box)
    assert seen["fine"].shape == (16, 16, 16)
    np.testing.assert_array_equal(seen["fine"], grid[12:28, 4:20, 4:20])
    inside = np.zeros(grid.shape, bool)
    inside[16:24, 8:16, 8:16] = True
    assert np.all(prob[inside] == np.float32(0.9)) and not prob[~inside].any()

    inference.predict_grid(grid, _fine(context="pad"), predict, box)
    padded = seen["fine"]
    assert padded.shape == (16, 16, 16)
    np.testing.assert_array_equal(padded[:8, :8, :8], grid[16:24, 8:16, 8:16])
    assert np.all(padded[8:] == grid[16:24, 8:16, 8:16].min())


def test_only_a_box_smaller_than_the_patch_is_predicted_otherwise_with_scan_context() -> None:
    grid = np.random.default_rng(1).standard_normal((40, 40, 40)).astype(np.float32)

    def predict(name, batch):
        # Like instance norm: every output depends on the whole input it is given.
        return (batch - batch.mean()).astype(np.float32)

    for box, alike in (((np.array([8, 8, 8]), np.array([32, 32, 32])), True),
                       ((np.array([8, 8, 8]), np.array([16, 32, 32])), False)):
        pad, scan = (inference.predict_grid(grid, _fine(context=c), predict, box) for c in ("pad", "scan"))
        assert np.array_equal(pad, scan) == alike
