"""QC's image-quality measures on scans whose answer is known: the noise sd, the contrast between a mask's interior
and its surroundings over that noise, the ranges learned from training scans and the verdict beyond them."""

from __future__ import annotations

import numpy as np
import pytest
from heartseg.runtime.contract import ModelContract, StageContract, check_plausibility
from heartseg.runtime.qc import (
    RULES,
    Plausibility,
    RangeConfig,
    Standards,
    assess,
    clipped_intensities,
    gather,
    interior_contrast,
    judge,
    learn_plausibility,
    low_contrast,
    noise_sigma,
    noisy_scan,
    saturation,
    scans_plausibility,
)
from scipy import ndimage

SPACING = (1.25, 1.25, 1.37)
SHAPE = (96, 88, 72)
DARK, BRIGHT, SIGMA = 1.0, 2.0, 0.1
STAGE = StageContract("single", SPACING, (64, 64, 64), threshold=0.5)


def ellipsoid(radii_voxels: tuple[float, float, float] = (20.0, 16.0, 13.0)) -> np.ndarray:
    """A centred binary ellipsoid, its semi-axes in voxels."""
    grids = np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in SHAPE], indexing="ij")
    return (sum((g / r) ** 2 for g, r in zip(grids, radii_voxels)) <= 1.0).astype(np.uint8)


def scan(mask: np.ndarray, sigma: float = SIGMA, seed: int = 0) -> np.ndarray:
    """The mask BRIGHT on a DARK background, its border softened over about a voxel, with white noise of sd sigma."""
    clean = DARK + (BRIGHT - DARK) * ndimage.gaussian_filter(mask.astype(np.float64), 1.0)
    return (clean + np.random.default_rng(seed).normal(0.0, sigma, mask.shape)).astype(np.float32)


@pytest.mark.parametrize("sigma", [0.05, 0.1, 0.2])
def test_noise_sigma_reads_the_added_noise(sigma: float) -> None:
    mask = ellipsoid()
    assert noise_sigma(scan(mask, sigma), mask) == pytest.approx(sigma, rel=0.1)


@pytest.mark.parametrize("sigma", [0.05, 0.1, 0.2])
def test_interior_contrast_is_the_contrast_over_the_noise(sigma: float) -> None:
    mask = ellipsoid()
    assert interior_contrast(scan(mask, sigma), mask, SPACING) == pytest.approx((BRIGHT - DARK) / sigma, rel=0.15)


def test_interior_contrast_halves_with_twice_the_noise_and_ignores_scale_and_offset() -> None:
    mask = ellipsoid()
    quiet, loud = scan(mask, SIGMA), scan(mask, 2 * SIGMA, seed=1)
    quiet_contrast = interior_contrast(quiet, mask, SPACING)
    assert interior_contrast(loud, mask, SPACING) == pytest.approx(quiet_contrast / 2, rel=0.15)
    assert interior_contrast(400.0 * quiet + 50.0, mask, SPACING) == pytest.approx(quiet_contrast, rel=1e-4)
    # A flatter scan with the same noise reads lower, as a noisier one does.
    flat = (DARK + 0.2 * (scan(mask, 0.0) - DARK) + np.random.default_rng(2).normal(0.0, SIGMA, SHAPE))
    assert interior_contrast(flat.astype(np.float32), mask, SPACING) == pytest.approx(quiet_contrast / 5, rel=0.2)
    # An inverted scan's interior is darker than its surroundings.
    assert interior_contrast(-quiet, mask, SPACING) == pytest.approx(-quiet_contrast, rel=1e-4)


def test_interior_contrast_needs_an_interior_surroundings_and_noise() -> None:
    mask = ellipsoid()
    assert interior_contrast(scan(mask), np.zeros_like(mask), SPACING) is None
    assert interior_contrast(scan(mask), np.ones_like(mask), SPACING) is None
    assert interior_contrast(np.full(SHAPE, 3.0, np.float32), mask, SPACING) is None


def training_ranges() -> Plausibility:
    """What a model learns from four clean synthetic training scans of different atria."""
    masks = [ellipsoid(r) for r in ((20.0, 16.0, 13.0), (22.0, 15.0, 12.0), (18.0, 17.0, 14.0), (21.0, 16.0, 11.0))]
    return scans_plausibility((scan(m, SIGMA, seed=i), m, SPACING) for i, m in enumerate(masks))


def test_the_contrast_range_is_learned_from_the_training_scans_and_only_its_low_end_widened() -> None:
    learned = training_ranges()
    assert learned.contrast is not None and learned.noise_level is not None
    low, high = learned.contrast
    assert high == pytest.approx((BRIGHT - DARK) / SIGMA, rel=0.15)
    assert low * RangeConfig().contrast_margin < high
    direct = learn_plausibility([(ellipsoid(), SPACING)], contrast=[8.0, 12.0, None])
    assert direct.contrast == pytest.approx((8.0 / RangeConfig().contrast_margin, 12.0))
    wider = learn_plausibility([(ellipsoid(), SPACING)], contrast=[8.0, 12.0], config=RangeConfig(contrast_margin=4.0))
    assert wider.contrast == pytest.approx((2.0, 12.0))
    assert learn_plausibility([(ellipsoid(), SPACING)]).contrast is None


def _reasons(image: np.ndarray, mask: np.ndarray, ranges: Plausibility) -> tuple[list[str], list[str]]:
    evidence = gather(mask, SPACING, ranges, image=image)
    return judge(evidence, Standards(ranges))


def test_a_scan_noisier_and_flatter_than_any_training_scan_asks_for_review() -> None:
    ranges, mask = training_ranges(), ellipsoid()
    fails, reviews = _reasons(scan(mask, 4 * SIGMA, seed=9), mask, ranges)
    assert fails == []
    assert any(r.startswith("noise level") for r in reviews)
    contrast_reasons = [r for r in reviews if r.startswith("contrast")]
    assert len(contrast_reasons) == 1 and f"{ranges.contrast[0]:.1f}" in contrast_reasons[0]
    assert low_contrast in RULES and noisy_scan in RULES
    # Through the run-time verdict too, with the measure in the report.
    contract = ModelContract(stages=[STAGE], plausibility=ranges)
    report = assess(mask, mask.astype(np.float32) * 0.97, SPACING, contract, image=scan(mask, 4 * SIGMA, seed=9))
    assert report.verdict == "review" and any(r.startswith("contrast") for r in report.reasons)
    assert report.measures["contrast"] < ranges.contrast[0]


def test_a_clean_scan_gets_no_image_quality_reason() -> None:
    ranges, mask = training_ranges(), ellipsoid()
    fails, reviews = _reasons(scan(mask, SIGMA, seed=11), mask, ranges)
    assert fails == [] and not any(r.startswith(("noise level", "contrast")) for r in reviews)
    contract = ModelContract(stages=[STAGE], plausibility=ranges)
    report = assess(mask, mask.astype(np.float32) * 0.97, SPACING, contract, image=scan(mask, SIGMA, seed=11))
    assert report.verdict == "ok" and report.measures["contrast"] > ranges.contrast[0]


def test_a_model_without_a_contrast_range_does_not_measure_or_judge_it() -> None:
    mask = ellipsoid()
    ranges = Plausibility(volume_ml=(1.0, 1000.0), extent_mm=((1.0, 500.0),) * 3)
    evidence = gather(mask, SPACING, ranges, image=scan(mask, 4 * SIGMA))
    assert evidence.contrast is None and low_contrast(evidence, Standards(ranges)) is None


def test_the_contrast_range_travels_in_the_contract_and_older_contracts_load() -> None:
    learned = training_ranges()
    contract = ModelContract(stages=[STAGE], plausibility=learned)
    assert ModelContract.from_json(contract.to_json()).plausibility.contrast == learned.contrast
    old = {key: value for key, value in learned.to_dict().items() if key not in ("contrast", "noise_level")}
    assert Plausibility.from_dict(old).contrast is None
    checked = check_plausibility(old)
    assert checked is not None and checked.contrast is None and checked.volume_ml == learned.volume_ml


def test_saturation_reads_the_share_at_the_brightest_value() -> None:
    mask = ellipsoid()
    image = scan(mask)
    # A float scan's brightest value is one voxel; clipped at its 60th percentile, much of the neighbourhood is there.
    assert saturation(image, mask, SPACING) < 0.001
    clipped = np.minimum(image, np.percentile(image, 60))
    assert saturation(clipped, mask, SPACING) > 0.3
    # Stored as 8 bits, the same scan still has few voxels at its brightest value.
    stored = np.round((image - image.min()) / np.ptp(image) * 255)
    assert saturation(stored, mask, SPACING) < 0.02
    assert saturation(image, np.zeros_like(mask), SPACING) is None


def test_a_scan_clipped_below_the_blood_pool_asks_for_review_and_a_clean_one_does_not() -> None:
    ranges, mask = training_ranges(), ellipsoid()
    assert ranges.saturation is not None and ranges.saturation[1] == pytest.approx(RangeConfig().min_saturation)
    image = scan(mask, SIGMA, seed=11)
    _, reviews = _reasons(np.minimum(image, np.percentile(image, 60)), mask, ranges)
    assert [r for r in reviews if "brightest value" in r]
    _, reviews = _reasons(image, mask, ranges)
    assert not [r for r in reviews if "brightest value" in r]
    assert clipped_intensities in RULES
    contract = ModelContract(stages=[STAGE], plausibility=ranges)
    assert ModelContract.from_json(contract.to_json()).plausibility.saturation == ranges.saturation
    old = {key: value for key, value in ranges.to_dict().items() if key != "saturation"}
    assert check_plausibility(old).saturation is None
