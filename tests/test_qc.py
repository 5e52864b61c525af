"""QC: every plausibility rule catches the mask built to break it and passes a plausible one; the
confidence score, its calibration, and the calibration's trip through the ONNX metadata."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from heartseg.runtime.qc.calibration import REVIEW_BELOW, ScoreCalibration, fit_score_calibration, soft_dice_score
from heartseg.runtime.contract import ModelContract, StageContract
from heartseg.runtime.qc import (
    Plausibility,
    image_sharpness,
    input_reasons,
    intensity_skewness,
    interior_contrast,
    saturation,
    interior_rank,
    learn_plausibility,
    noise_level,
    scans_plausibility,
)
from heartseg.runtime.postprocess import largest_component
from heartseg.runtime.qc import assess, bounding_slices, component_sizes, face_shares
from heartseg.runtime.session import read_contract
from onnx_models import build_test_model

SPACING = (1.25, 1.25, 1.37)
SHAPE = (96, 96, 80)
PLAUSIBLE = Plausibility(volume_ml=(20.0, 200.0), extent_mm=((20.0, 80.0), (25.0, 100.0), (30.0, 120.0)), cases=10,
                         spacing_mm=((0.5, 2.0), (0.5, 2.0), (0.5, 2.5)),
                         fov_mm=((50.0, 400.0), (100.0, 500.0), (100.0, 500.0)))
CALIBRATION = ScoreCalibration(slope=1.0, intercept=-0.05, residual_lo=-0.04, residual_hi=0.03, cases=10)
STAGE = StageContract("single", SPACING, (64, 64, 64), threshold=0.5)
CONTRACT = ModelContract(stages=[STAGE], plausibility=PLAUSIBLE, score_calibration=CALIBRATION)
FORMAT_1 = ModelContract(stages=[STAGE], max_foreground_fraction=0.05, format_version=1)


def ellipsoid(shape=SHAPE, spacing=SPACING, centre_mm=None, radii_mm=(22.0, 22.0, 22.0)) -> np.ndarray:
    """A binary ellipsoid, centre and radii in mm (centre: the middle of the grid by default)."""
    grids = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing="ij")
    centre = centre_mm if centre_mm is not None else [n * s / 2 for n, s in zip(shape, spacing)]
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii_mm))
    return (r2 <= 1.0).astype(np.uint8)


def confident(mask: np.ndarray) -> np.ndarray:
    """A sharp probability map that agrees with mask."""
    return mask.astype(np.float32) * 0.97


def check(mask, prob=None, spacing=SPACING, contract=CONTRACT, box=None):
    prob = confident(mask) if prob is None else prob
    final = largest_component((prob > 0.5).astype(np.uint8)) if mask is None else mask
    return assess(final, prob, spacing, contract, box)


def test_plausible_mask_is_ok() -> None:
    report = check(ellipsoid())
    assert report.verdict == "ok" and report.reasons == [] and report.flag is None
    assert 40 < report.measures["volume_ml"] < 50 and report.measures["components"] == 1
    assert report.score == pytest.approx(2 * 0.97 / 1.97, abs=1e-4)
    assert report.estimated_dice == pytest.approx(report.score - 0.05)
    low, high = report.dice_interval
    assert low < report.estimated_dice < high


@pytest.mark.parametrize("kind", ["empty", "all"])
def test_degenerate_masks_fail(kind: str) -> None:
    mask = np.zeros(SHAPE, np.uint8) if kind == "empty" else np.ones(SHAPE, np.uint8)
    report = check(mask)
    assert report.verdict == "fail"
    assert report.reasons == ["empty" if kind == "empty" else "all foreground"]


def test_volume_above_range_asks_for_review_and_far_above_fails() -> None:
    above = check(ellipsoid(radii_mm=(38.0, 38.0, 38.0)))  # 230 mL, within twice the 200 mL limit
    assert above.verdict == "review"
    assert any(r.startswith("volume") and "outside the plausible" in r for r in above.reasons)
    far = check(ellipsoid(radii_mm=(50.0, 50.0, 50.0)))  # 524 mL
    assert far.verdict == "fail" and any("far outside" in r for r in far.reasons)


def test_volume_below_range_asks_for_review() -> None:
    small = check(ellipsoid(radii_mm=(12.0, 12.0, 12.0)))  # 7 mL
    assert small.verdict in ("review", "fail") and any(r.startswith("volume") for r in small.reasons)


def test_implausible_extent_asks_for_review() -> None:
    shape = (130, 60, 60)
    long = ellipsoid(shape, radii_mm=(70.0, 12.0, 12.0))  # 42 mL but 140 mm long
    report = check(long)
    assert report.verdict == "review"
    assert any("largest extent 140 mm" in r for r in report.reasons), report.reasons


def test_fragmented_mask_asks_for_review() -> None:
    big = ellipsoid(centre_mm=(40, 60, 55))
    second = ellipsoid(centre_mm=(95, 60, 55), radii_mm=(14.0, 14.0, 14.0))
    prob = confident(big | second)
    report = check(None, prob)
    assert report.measures["components"] == 2 and report.measures["largest_share"] < 0.9
    assert any(r.startswith("fragmented") for r in report.reasons), report.reasons
    speck = big.copy()
    speck[2, 2, 2] = 1  # one stray voxel: not fragmented
    passing = check(None, confident(speck))
    assert passing.measures["components"] == 2 and not any(r.startswith("fragmented") for r in passing.reasons)


def test_mask_cut_by_the_box_asks_for_review() -> None:
    mask = ellipsoid()
    centre = 48
    cut = mask.copy()
    cut[centre:] = 0  # the fine stage saw only [0, centre) along the first axis
    box = (np.array([0.0, 10.0, 5.0]), np.array([float(centre), 86.0, 75.0]))
    report = check(cut, box=box)
    assert report.measures["box_border_share"] > 0.9
    assert any("fine stage's box" in r for r in report.reasons)
    roomy = (np.array([5.0, 5.0, 5.0]), np.array([91.0, 91.0, 75.0]))
    assert check(mask, box=roomy).measures["box_border_share"] == 0.0
    assert check(mask, box=roomy).verdict == "ok"


def test_mask_cut_by_the_scan_edge_asks_for_review() -> None:
    report = check(ellipsoid(centre_mm=(2.0, 60.0, 55.0)))
    assert report.measures["scan_edge_share"] > 0.9
    assert any("edge of the scan" in r for r in report.reasons), report.reasons


def test_thick_slices_ask_for_review() -> None:
    spacing = (1.25, 1.25, 5.0)
    shape = (96, 96, 22)
    report = check(ellipsoid(shape, spacing), spacing=spacing)
    assert report.verdict == "review"
    assert any("largest voxel size 5.00 mm outside" in r for r in report.reasons), report.reasons


def test_large_field_of_view_asks_for_review() -> None:
    shape = (480, 96, 80)  # 600 mm along the first axis
    report = check(ellipsoid(shape, centre_mm=(300, 60, 55)), spacing=SPACING)
    assert any("largest field of view 600 mm outside" in r for r in report.reasons), report.reasons


def test_input_reasons_pass_the_training_geometry() -> None:
    assert input_reasons(SHAPE, SPACING, PLAUSIBLE) == []
    no_ranges = replace(PLAUSIBLE, spacing_mm=None, fov_mm=None)
    assert input_reasons((10, 10, 10), (9.0, 9.0, 9.0), no_ranges) == []


def bright_blood_scan(mask: np.ndarray) -> np.ndarray:
    """A scan where the masked blood pool is bright on a darker, noisy background (right-skewed)."""
    noise = np.random.default_rng(0).normal(0.0, 0.1, mask.shape)
    return (np.where(mask, 3.0, 1.0) + noise).astype(np.float32)


def test_an_inverted_scan_asks_for_review_and_a_familiar_one_passes() -> None:
    mask = ellipsoid()
    scan = bright_blood_scan(mask)
    skewness = intensity_skewness(scan, mask, SPACING)
    assert skewness > 2.0 and intensity_skewness(-scan, mask, SPACING) == pytest.approx(-skewness)
    # Unchanged by the storage's scale and offset (uint8, int16, float).
    assert intensity_skewness(40.0 * scan + 300.0, mask, SPACING) == pytest.approx(skewness, abs=1e-6)
    learned = replace(PLAUSIBLE, skewness=(1.0, 8.0))
    contract = replace(CONTRACT, plausibility=learned)
    familiar = assess(mask, confident(mask), SPACING, contract, image=scan)
    assert familiar.verdict == "ok" and familiar.measures["skewness"] > 2.0
    inverted = assess(mask, confident(mask), SPACING, contract, image=-scan)
    assert inverted.verdict == "review"
    assert any(r.startswith("intensity skewness -") and "outside the trained 1.00 to 8.00" in r
               for r in inverted.reasons), inverted.reasons
    # Without an image, or with a model that never learned the range, the rule does not apply.
    assert assess(mask, confident(mask), SPACING, contract).verdict == "ok"
    assert assess(mask, confident(mask), SPACING, CONTRACT, image=-scan).verdict == "ok"


def test_skewness_is_measured_around_the_atrium_whatever_the_field_of_view() -> None:
    mask = ellipsoid()
    scan = bright_blood_scan(mask)
    skewness = intensity_skewness(scan, mask, SPACING)
    # Padded in-plane with its background to a wider field of view: the atrium's neighbourhood is the same.
    pads = ((60, 60), (60, 60), (0, 0))
    padded, padded_mask = np.pad(scan, pads, constant_values=float(scan.min())), np.pad(mask, pads)
    assert intensity_skewness(padded, padded_mask, SPACING) == pytest.approx(skewness, abs=1e-9)
    # Inverted: the sign flips.
    assert skewness > 1.0 and intensity_skewness(scan.max() + scan.min() - scan, mask, SPACING) == pytest.approx(
        -skewness)
    assert intensity_skewness(scan, np.zeros_like(mask), SPACING) is None
    # So a model that learned the unpadded scan's skewness passes the padded one.
    contract = replace(CONTRACT, plausibility=replace(PLAUSIBLE, skewness=(skewness - 0.5, skewness + 0.5)))
    report = assess(padded_mask, confident(padded_mask), SPACING, contract, image=padded)
    assert report.verdict == "ok", report.reasons
    assert report.measures["skewness"] == pytest.approx(skewness, abs=1e-9)


def test_interior_rank_is_high_for_a_bright_pool_and_unchanged_by_monotone_intensities() -> None:
    mask = ellipsoid()
    scan = bright_blood_scan(mask)
    rank = interior_rank(scan, mask, SPACING)
    assert rank == pytest.approx(1.0, abs=1e-3)
    assert interior_rank(-scan, mask, SPACING) == pytest.approx(0.0, abs=1e-3)
    # A rank: the same for the scan stored as int16 at another scale, or with a gamma applied.
    assert interior_rank(np.exp(scan), mask, SPACING) == rank
    assert interior_rank(40.0 * scan + 300.0, mask, SPACING) == rank
    # A pool of middling brightness: darker than the bright half of its surroundings.
    around = ellipsoid(radii_mm=(34.0, 34.0, 34.0)).astype(bool) & ~mask.astype(bool)
    half = np.where(mask, 2.0, np.where(around & (np.indices(SHAPE)[0] < SHAPE[0] // 2), 3.0, 1.0)).astype(np.float32)
    assert 0.2 < interior_rank(half, mask, SPACING) < 0.8
    assert interior_rank(scan, np.zeros(SHAPE, np.uint8), SPACING) is None
    assert interior_rank(scan, np.ones(SHAPE, np.uint8), SPACING) is None


def test_interior_rank_counts_ties_half_and_copes_with_thin_and_cut_masks() -> None:
    mask = ellipsoid()
    # A clipped scan: the blood and a third of its surroundings at the same top value.
    around = ellipsoid(radii_mm=(34.0, 34.0, 34.0)).astype(bool) & ~mask.astype(bool)
    upper = np.indices(SHAPE)[0] < SHAPE[0] // 3
    clipped = np.where(mask | (around & upper), 255, 40).astype(np.uint8)
    tied = interior_rank(clipped, mask, SPACING)
    # The same scan in float, the blood a little above or a little below those bright surroundings.
    above = interior_rank(clipped + np.where(mask, 0.5, 0.0), mask, SPACING)
    below = interior_rank(clipped - np.where(mask, 0.5, 0.0), mask, SPACING)
    assert above == pytest.approx(1.0) and 0.5 < below < 0.95
    assert tied == pytest.approx((above + below) / 2)
    # A mask thinner than the interior depth: its whole self is the interior.
    slab = np.zeros(SHAPE, np.uint8)
    slab[30:60, 30:60, 40:42] = 1
    assert interior_rank(np.where(slab, 2.0, 1.0), slab, SPACING) == pytest.approx(1.0)
    # A mask cut by the scan's edge: its surroundings are what the scan holds.
    edge = ellipsoid(centre_mm=(5.0, 60.0, 55.0))
    assert edge[0].any() and interior_rank(bright_blood_scan(edge), edge, SPACING) == pytest.approx(1.0, abs=1e-3)


def test_a_mask_darker_than_its_surroundings_asks_for_review() -> None:
    mask = ellipsoid()
    scan = bright_blood_scan(mask)
    contract = replace(CONTRACT, plausibility=replace(PLAUSIBLE, interior_rank=(0.5, 1.0)))
    familiar = assess(mask, confident(mask), SPACING, contract, image=scan)
    assert familiar.verdict == "ok" and familiar.measures["interior_rank"] == pytest.approx(1.0, abs=1e-3)
    inverted = assess(mask, confident(mask), SPACING, contract, image=-scan)
    assert inverted.verdict == "review" and inverted.measures["interior_rank"] < 0.01
    assert any(r.startswith("the mask's interior is brighter than only 0 % of its surroundings, below the trained "
                            "50 %") for r in inverted.reasons), inverted.reasons
    # Without an image, or with a model that never learned the range, the rule does not apply.
    assert assess(mask, confident(mask), SPACING, contract).verdict == "ok"
    unlearned = assess(mask, confident(mask), SPACING, CONTRACT, image=-scan)
    assert unlearned.verdict == "ok" and unlearned.measures["interior_rank"] is None


def textured_scan(mask: np.ndarray) -> np.ndarray:
    """Bright blood among tissue patches of other intensities with sharp borders, as around a real atrium."""
    rng = np.random.default_rng(2)
    patches = rng.uniform(0.0, 2.0, tuple(n // 4 + 1 for n in mask.shape))
    tissue = np.kron(patches, np.ones((4, 4, 4)))[: mask.shape[0], : mask.shape[1], : mask.shape[2]]
    return (np.where(mask, 3.0, tissue) + rng.normal(0.0, 0.05, mask.shape)).astype(np.float32)


def test_a_blurred_scan_asks_for_review_and_a_coarser_one_passes() -> None:
    from scipy import ndimage

    mask = ellipsoid()
    scan = textured_scan(mask)
    sharp = image_sharpness(scan, mask)
    learned = learn_plausibility([(mask, SPACING)], edge_sharpness=[sharp, None])
    assert learned.edge_sharpness == pytest.approx((sharp / 1.5, sharp * 1.5))  # the input margin; None is skipped
    contract = replace(CONTRACT, plausibility=learned)
    assert assess(mask, confident(mask), SPACING, contract, image=scan).verdict == "ok"
    blurred = ndimage.gaussian_filter(scan, 3.0)
    report = assess(mask, confident(mask), SPACING, contract, image=blurred)
    assert report.verdict == "review" and report.measures["edge_sharpness"] < sharp / 1.5
    assert any(r.startswith("edge sharpness") and "below the trained" in r for r in report.reasons), report.reasons
    # Stored at half the resolution, edges stay one voxel wide: sharpness is per voxel, not per mm.
    coarse_mask = mask[::2, ::2, ::2]
    coarse = assess(coarse_mask, confident(coarse_mask), tuple(2 * s for s in SPACING),
                    replace(contract, plausibility=replace(learned, spacing_mm=None, fov_mm=None)),
                    image=scan[::2, ::2, ::2])
    assert not any(r.startswith("edge sharpness") for r in coarse.reasons), coarse.reasons
    assert coarse.measures["edge_sharpness"] > sharp  # above the range: only soft edges are flagged
    noisy = scan + np.random.default_rng(1).normal(0.0, 1.0, scan.shape).astype(np.float32)
    assert assess(mask, confident(mask), SPACING, contract, image=noisy).verdict == "ok"
    assert image_sharpness(scan, np.zeros_like(mask)) is None
    assert image_sharpness(np.ones_like(scan), mask) is None  # a flat cube has no edges to measure
    ramp = np.broadcast_to(np.arange(scan.shape[0], dtype=np.float32)[:, None, None], scan.shape)
    assert image_sharpness(ramp, mask) is None  # nor a ramp without curvature (0 would be no usable range)
    back = ModelContract.from_json(contract.to_json())
    assert back.plausibility.edge_sharpness == pytest.approx(learned.edge_sharpness)


def test_edge_sharpness_ignores_the_intensity_scale_and_falls_with_the_edge_width() -> None:
    from scipy import ndimage

    mask = ellipsoid()
    scan = textured_scan(mask)
    assert image_sharpness(0.2 * scan + 7.0, mask) == pytest.approx(image_sharpness(scan, mask), rel=1e-4)
    sharpness = [image_sharpness(ndimage.gaussian_filter(scan, sigma), mask) for sigma in (1.0, 2.0, 4.0)]
    # About 1 / edge width once edges are wider than a voxel: halved when the blur doubles.
    assert sharpness[0] / sharpness[1] == pytest.approx(2.0, rel=0.2)
    assert sharpness[1] / sharpness[2] == pytest.approx(2.0, rel=0.2)


def test_a_sharpness_range_of_an_older_file_is_not_checked() -> None:
    import json

    data = json.loads(CONTRACT.to_json())
    del data["plausibility"]["edge_sharpness"]
    data["plausibility"]["sharpness"] = [5.0, 9.0]  # another measure's range: every scan would be "blurred" against it
    contract = ModelContract.from_json(json.dumps(data))
    assert contract.plausibility.edge_sharpness is None
    mask = ellipsoid()
    assert assess(mask, confident(mask), SPACING, contract, image=textured_scan(mask)).verdict == "ok"


def test_learn_plausibility_widens_the_training_skewness() -> None:
    labels = [(ellipsoid(), SPACING)] * 3
    narrow = learn_plausibility(labels, skewness=[1.5, 1.7, 2.0])
    assert narrow.skewness == pytest.approx((1.0, 2.5))  # widened by the floor (0.5) on each side
    wide = learn_plausibility(labels, skewness=[-0.3, 2.6, 1.0])
    assert wide.skewness == pytest.approx((-0.3 - 0.725, 2.6 + 0.725))  # by a quarter of the width
    assert learn_plausibility(labels).skewness is None
    assert Plausibility.from_dict(wide.to_dict()) == wide
    back = ModelContract.from_json(replace(CONTRACT, plausibility=wide).to_json())
    assert back.plausibility.skewness == pytest.approx(wide.skewness)


def test_scans_plausibility_learns_every_range_from_the_scans() -> None:
    masks = [ellipsoid(), ellipsoid(radii_mm=(18.0, 24.0, 28.0))]
    scans = [(bright_blood_scan(m), m, SPACING) for m in masks]
    learned = scans_plausibility(scans)
    expected = learn_plausibility([(m, SPACING) for m in masks],
                                  skewness=[intensity_skewness(i, m, SPACING) for i, m, _ in scans],
                                  edge_sharpness=[image_sharpness(i, m) for i, m, _ in scans],
                                  interior_rank=[interior_rank(i, m, SPACING) for i, m, _ in scans],
                                  noise=[noise_level(i, m) for i, m, _ in scans],
                                  contrast=[interior_contrast(i, m, SPACING) for i, m, _ in scans],
                                  saturation=[saturation(i, m, SPACING) for i, m, _ in scans])
    assert learned == expected
    assert None not in (learned.skewness, learned.interior_rank, learned.noise_level, learned.contrast,
                        learned.saturation)
    assert learned.cases == 2


def test_learn_plausibility_widens_the_training_interior_ranks() -> None:
    labels = [(ellipsoid(), SPACING)] * 3
    narrow = learn_plausibility(labels, interior_rank=[0.8, 0.82, None])
    assert narrow.interior_rank == pytest.approx((0.75, 0.87))  # widened by the floor (0.05) on each side
    wide = learn_plausibility(labels, interior_rank=[0.56, 0.98, 0.9])
    assert wide.interior_rank == pytest.approx((0.56 - 0.105, 1.0))  # by a quarter of the width, within [0, 1]
    assert learn_plausibility(labels, interior_rank=[0.02, 0.5]).interior_rank == pytest.approx((0.0, 0.62))
    assert learn_plausibility(labels).interior_rank is None
    back = ModelContract.from_json(replace(CONTRACT, plausibility=wide).to_json())
    assert back.plausibility.interior_rank == pytest.approx(wide.interior_rank)


def test_uncertain_probabilities_ask_for_review_or_fail() -> None:
    mask = ellipsoid()
    shell = ellipsoid(radii_mm=(28.0, 28.0, 28.0)) & ~mask.astype(bool)
    hesitant = np.where(mask, 0.6, np.where(shell, 0.4, 0.0)).astype(np.float32)
    review = check(mask, hesitant)
    assert review.verdict == "review" and 0.5 <= review.estimated_dice < 0.85
    assert any(r.startswith("estimated Dice") for r in review.reasons)
    wide = ellipsoid(radii_mm=(37.0, 37.0, 37.0)) & ~mask.astype(bool)
    lost = np.where(mask, 0.51, np.where(wide, 0.45, 0.0)).astype(np.float32)
    failed = check(mask, lost)
    assert failed.verdict == "fail" and failed.estimated_dice < 0.5


def test_format_1_contract_uses_the_degenerate_rules_only() -> None:
    long = ellipsoid((130, 60, 60), radii_mm=(70.0, 12.0, 12.0))
    report = check(long, contract=FORMAT_1)
    assert report.verdict == "ok" and report.estimated_dice is None and report.score is not None
    big = check(ellipsoid(radii_mm=(38.0, 38.0, 38.0)), contract=FORMAT_1)  # 15 % of the scan
    assert big.verdict == "fail" and big.reasons[0].startswith("implausibly large")


def test_soft_dice_score() -> None:
    mask = ellipsoid()
    assert soft_dice_score(mask.astype(np.float32), mask) == pytest.approx(1.0)
    assert soft_dice_score(np.zeros(SHAPE, np.float32), np.zeros(SHAPE, np.uint8)) == 0.0  # nothing found
    assert soft_dice_score(np.zeros(SHAPE, np.float32), mask) == 0.0
    half = mask.astype(np.float32) * 0.5
    assert soft_dice_score(half, mask) == pytest.approx(2 * 0.5 / 1.5)


def test_helpers() -> None:
    mask = np.zeros((10, 12, 14), np.uint8)
    assert bounding_slices(mask) is None and face_shares(mask) == (0.0, 0.0)
    mask[2:5, 3:7, 4:9] = 1
    mask[8, 10, 12] = 1
    assert bounding_slices(mask) == (slice(2, 9), slice(3, 11), slice(4, 13))
    assert component_sizes(mask).tolist() == [60, 1]


def test_calibration_fits_a_line_and_covers_the_held_out_cases() -> None:
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.7, 0.98, 40)
    dices = -0.5 + 1.5 * scores + rng.normal(0, 0.01, 40)
    calibration = fit_score_calibration(scores, dices)
    assert calibration.slope == pytest.approx(1.5, abs=0.05) and calibration.cases == 40
    estimates = np.array([calibration.estimate(s) for s in scores])
    inside = np.mean((estimates[:, 1] <= dices) & (dices <= estimates[:, 2]))
    assert inside >= 0.85
    assert np.all(np.diff(estimates[np.argsort(scores), 0]) >= 0)  # monotone


def test_calibration_is_never_flatter_than_the_score() -> None:
    # Nineteen easy cases and one hard case whose Dice is far better than its low score: a least-squares line
    # through them is flat, and would call a low-scoring mask good.
    rng = np.random.default_rng(1)
    easy = rng.uniform(0.88, 0.93, 19)
    scores = np.append(easy, 0.57)
    dices = np.append(easy + 0.02 + rng.normal(0, 0.01, 19), 0.78)
    flat_slope, flat_intercept = np.polyfit(scores, dices, 1)
    assert flat_slope < 0.6 and flat_intercept + flat_slope * 0.79 > REVIEW_BELOW
    calibration = fit_score_calibration(scores, dices)
    assert calibration.slope == 1.0 and calibration.intercept == pytest.approx(float(np.median(dices - scores)))
    assert calibration.estimate(0.79)[0] < REVIEW_BELOW
    assert calibration.estimate(0.91)[0] == pytest.approx(0.91 + calibration.intercept)
    # A steeper line stays as fitted.
    spread = np.linspace(0.7, 0.95, 12)
    assert fit_score_calibration(spread, 2.0 * spread - 0.9).slope == pytest.approx(2.0)


def test_calibration_with_few_cases_shifts_the_score() -> None:
    calibration = fit_score_calibration([0.95, 0.96, 0.97], [0.90, 0.93, 0.92])
    # Residuals -0.05, -0.03, -0.05: the score shifted by their median.
    assert calibration.slope == 1.0 and calibration.intercept == pytest.approx(-0.05)
    estimate, low, high = calibration.estimate(0.96)
    assert estimate == pytest.approx(0.91) and low <= 0.88 and high >= 0.94  # at least the floor's width
    assert calibration.estimate(2.0)[0] == 1.0  # clipped
    with pytest.raises(ValueError):
        fit_score_calibration([], [])
    with pytest.raises(ValueError):
        fit_score_calibration([0.9, float("nan")], [0.9, 0.9])


def test_learn_plausibility_records_the_training_geometry() -> None:
    labels = [(ellipsoid(), SPACING), (ellipsoid((80, 80, 40), (0.625, 0.625, 0.625), radii_mm=(10, 10, 10)),
                                       (0.625, 0.625, 0.625))]
    learned = learn_plausibility(labels, input_margin=2.0)
    assert learned.spacing_mm[0] == pytest.approx((0.3125, 2.5))
    assert learned.spacing_mm[2] == pytest.approx((0.3125, 2.74))
    assert learned.fov_mm[0] == pytest.approx((12.5, 219.2))
    assert Plausibility.from_dict(learned.to_dict()) == learned


def test_contract_round_trip_through_json() -> None:
    back = ModelContract.from_json(CONTRACT.to_json())
    assert back.score_calibration == CALIBRATION and back.plausibility == PLAUSIBLE
    old = ModelContract.from_json(FORMAT_1.to_json().replace('"score_calibration": null,', ""))
    assert old.score_calibration is None and old.plausibility is None


def test_calibration_is_stored_in_and_read_from_the_onnx_metadata(tmp_path) -> None:
    path = build_test_model(tmp_path / "calibrated.onnx",
                            contract_fields={"plausibility": PLAUSIBLE, "score_calibration": CALIBRATION})
    contract, meta = read_contract(path)
    assert contract.score_calibration == CALIBRATION and contract.plausibility == PLAUSIBLE
    assert '"score_calibration"' in meta["heartseg.contract"]


# --- heartseg-infer with a model that carries plausibility and a score calibration ---

SCAN_PLAUSIBLE = Plausibility(volume_ml=(1.0, 50.0), extent_mm=((5.0, 60.0), (5.0, 60.0), (5.0, 60.0)), cases=3,
                              spacing_mm=((0.5, 3.0), (0.5, 3.0), (0.5, 3.0)),
                              fov_mm=((20.0, 200.0), (20.0, 200.0), (20.0, 200.0)))


def _qc_model(path, review_below: float):
    from onnx_models import TEST_MODEL_BIAS

    calibration = ScoreCalibration(slope=1.0, intercept=0.0, residual_lo=-0.05, residual_hi=0.05, cases=5,
                                   review_below=review_below, fail_below=min(0.3, review_below))
    return build_test_model(path, bias=TEST_MODEL_BIAS,
                            contract_fields={"plausibility": SCAN_PLAUSIBLE, "score_calibration": calibration})


def test_tta_is_judged_by_its_own_score_calibration(tmp_path) -> None:
    from heartseg.runtime.formats.nifti import load_volume
    from heartseg.runtime.segmenter import Segmenter
    from onnx_models import TEST_MODEL_BIAS, make_scan

    lenient = ScoreCalibration(slope=1.0, intercept=0.0, residual_lo=-0.05, residual_hi=0.05, cases=5,
                               review_below=0.3, fail_below=0.2)
    strict = replace(lenient, intercept=-0.9)  # every estimate near 0: fail
    model = build_test_model(tmp_path / "m.onnx", bias=TEST_MODEL_BIAS, contract_fields={
        "plausibility": SCAN_PLAUSIBLE, "score_calibration": lenient, "tta_score_calibration": strict})
    scan, _ = make_scan(tmp_path / "s.nii.gz")
    volume = load_volume(scan)
    plain = Segmenter(model, device="cpu", threads=1).segment(volume).report
    flipped = Segmenter(model, device="cpu", threads=1, tta=True).segment(volume).report
    assert plain.verdict == "ok" and flipped.verdict == "fail", (plain.reasons, flipped.reasons)
    assert flipped.estimated_dice == pytest.approx(strict.estimate(flipped.score)[0])
    # A model without one judges --tta by the plain calibration.
    contract = read_contract(model)[0]
    assert replace(contract, tta_score_calibration=None).for_qc(tta=True).score_calibration == lenient
    assert contract.for_qc(tta=True).score_calibration == strict and contract.for_qc().score_calibration == lenient


@pytest.mark.parametrize("review_below, verdict, code", [(0.3, "ok", 0), (0.999, "review", 3)])
def test_infer_reports_the_verdict_and_estimated_dice(tmp_path, run_cli, review_below, verdict, code) -> None:
    import csv
    import json

    from heartseg.runtime.cli_infer import app
    from onnx_models import make_scan

    model = _qc_model(tmp_path / "qc.onnx", review_below)
    scan, label = make_scan(tmp_path / "in" / "s.nii.gz")
    report, table = tmp_path / "r.json", tmp_path / "r.csv"
    result = run_cli(app, scan, "-o", tmp_path / "out", "--model", model, "--threads", 1, "--label", label,
                     "--json", report, "--csv", table)
    assert result.exit_code == code, result.output
    assert "est. Dice" in result.stdout and verdict in result.stdout
    record = json.loads(report.read_text())["scans"][0]
    assert record["verdict"] == verdict and record["status"] == ("ok" if verdict == "ok" else "flagged")
    qc = record["qc_report"]
    assert record["estimated_dice"] == pytest.approx(qc["score"], abs=1e-9)
    assert qc["measures"]["components"] >= 1 and qc["seconds"] > 0
    low, high = record["dice_interval"]
    assert low < record["estimated_dice"] < high
    assert len(qc["rules"]) == len(qc["reasons"])
    if verdict == "review":
        assert any(r.startswith("estimated Dice") for r in qc["reasons"]) and "low_estimated_dice" in qc["rules"]
    (row,) = list(csv.DictReader(table.open()))
    assert row["verdict"] == verdict and float(row["estimated_dice"]) == pytest.approx(record["estimated_dice"],
                                                                                        abs=1e-4)
    assert float(row["dice"]) == pytest.approx(record["metrics"]["dice"], abs=1e-4)


def test_overlay_title_carries_the_verdict(tmp_path, run_cli, monkeypatch) -> None:
    from heartseg.runtime import cli_infer
    from onnx_models import make_scan

    titles = []

    def fake_overlay(path, image, mask, label, title):
        titles.append(title)
        path.write_bytes(b"png")
        return path

    from heartseg.runtime import overlay

    monkeypatch.setattr(overlay, "save_overlay", fake_overlay)
    monkeypatch.setattr(overlay, "require_pyplot", lambda: None)
    model = _qc_model(tmp_path / "qc.onnx", 0.999)
    scan, _ = make_scan(tmp_path / "in" / "s.nii.gz")
    result = run_cli(cli_infer.app, scan, "-o", tmp_path / "out", "--model", model, "--threads", 1, "--overlay",
                     "--tta")
    assert result.exit_code == 3, result.output
    assert "QC REVIEW" in titles[0] and "est. Dice" in titles[0] and "estimated Dice" in titles[0]


def test_eval_compares_estimated_with_true_dice(tmp_path, run_cli) -> None:
    import json

    from heartseg.runtime import cli_eval, cli_infer
    from onnx_models import make_scan

    model = _qc_model(tmp_path / "qc.onnx", 0.3)
    for i, name in enumerate(("a", "b", "c")):
        make_scan(tmp_path / "in" / f"{name}.nii.gz", seed=i, label_path=tmp_path / "labels" / f"{name}.nii.gz")
    report = tmp_path / "infer.json"
    infer = run_cli(cli_infer.app, tmp_path / "in", "-o", tmp_path / "out", "--model", model, "--threads", 1,
                    "--json", report)
    assert infer.exit_code == 0, infer.output
    estimates = {s["name"]: s["estimated_dice"] for s in json.loads(report.read_text())["scans"]}
    metrics = tmp_path / "eval.json"
    result = run_cli(cli_eval.app, tmp_path / "out", tmp_path / "labels", "--qc-report", report, "--json", metrics)
    assert result.exit_code == 0, result.output
    assert "QC: estimated vs true Dice over 3 cases" in result.stdout and "est. Dice" in result.stdout
    data = json.loads(metrics.read_text())
    for case in data["cases"]:
        assert case["qc"]["estimated_dice"] == pytest.approx(estimates[case["case"]])
    agreement = data["qc_vs_true"]
    errors = [abs(c["qc"]["estimated_dice"] - c["dice"]) for c in data["cases"]]
    assert agreement["cases"] == 3 and agreement["mean_abs_error"] == pytest.approx(np.mean(errors))
    assert agreement["silent_failures"] == sum(c["dice"] < 0.8 for c in data["cases"])
    broken = tmp_path / "broken.json"
    broken.write_text("{}")
    refused = run_cli(cli_eval.app, tmp_path / "out", tmp_path / "labels", "--qc-report", broken)
    assert refused.exit_code == 2 and "not a heartseg-infer JSON report" in refused.output


def test_review_order_puts_fails_then_reviews_then_ok_each_lowest_estimate_first() -> None:
    from types import SimpleNamespace

    from heartseg.runtime.cli_infer import in_check_order
    from heartseg.runtime.qc import QCReport, review_order

    reports = {"ok high": QCReport("ok", score=0.95, estimated_dice=0.93),
               "ok low": QCReport("ok", score=0.90, estimated_dice=0.86),
               "review high": QCReport("review", ["a"], score=0.96, estimated_dice=0.94),
               "review low": QCReport("review", ["b"], score=0.80, estimated_dice=0.78),
               "review no estimate": QCReport("review", ["c"]),
               "fail": QCReport("fail", ["d"], score=0.99, estimated_dice=0.97)}
    order = sorted(reports, key=lambda name: reports[name].check_order)
    assert order == ["fail", "review no estimate", "review low", "review high", "ok low", "ok high"]
    # Without a calibration the score ranks within a verdict.
    assert review_order("ok", None, None) < review_order("ok", None, 0.7) < review_order("ok", None, 0.9)
    results = [SimpleNamespace(report=reports[name], name=name) for name in ("ok low", "review high", "fail")]
    results.append(SimpleNamespace(report=None, name="no report"))
    assert [r.name for r in in_check_order(results)] == ["no report", "fail", "review high", "ok low"]
