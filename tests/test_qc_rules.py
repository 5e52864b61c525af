"""QC's rule list: the noise measure, the calibration profile and the rules as named functions over the evidence."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from heartseg.runtime.metrics import degenerate_reason
from heartseg.runtime.qc import (
    CALIBRATION_RULES,
    RULES,
    Evidence,
    Plausibility,
    QCConfig,
    Standards,
    judge,
    localiser_flag,
    mask_flag,
    noise_level,
    noise_sigma,
)
from scipy import ndimage

SPACING = (1.25, 1.25, 1.37)
SHAPE = (80, 80, 64)
PLAUSIBLE = Plausibility(volume_ml=(20.0, 200.0), extent_mm=((20.0, 80.0), (25.0, 100.0), (30.0, 120.0)), cases=10)


def ball(shape=SHAPE, radius: float = 14.0) -> np.ndarray:
    """A centred ball of radius voxels."""
    grids = np.meshgrid(*[np.arange(n) - n / 2 for n in shape], indexing="ij")
    return (sum(g * g for g in grids) <= radius * radius).astype(np.uint8)


def smooth_scan(mask: np.ndarray) -> np.ndarray:
    """A bright pool with soft borders on a slowly varying background, contrast about 1, without noise."""
    ramp = np.linspace(0.0, 0.3, mask.shape[0])[:, None, None] * np.ones(mask.shape)
    return ndimage.gaussian_filter(mask.astype(np.float64), 2.0) + ramp


@pytest.mark.parametrize("sigma", [0.01, 0.03, 0.1, 0.3])
def test_noise_sigma_tracks_the_added_noise(sigma: float) -> None:
    mask = ball()
    noisy = smooth_scan(mask) + np.random.default_rng(7).normal(0.0, sigma, mask.shape)
    assert noise_sigma(noisy.astype(np.float32), mask) == pytest.approx(sigma, rel=0.2)


def test_noise_level_ignores_scale_and_offset_and_rises_with_the_noise() -> None:
    mask = ball()
    rng = np.random.default_rng(3)
    quiet = smooth_scan(mask) + rng.normal(0.0, 0.02, mask.shape)
    loud = smooth_scan(mask) + rng.normal(0.0, 0.3, mask.shape)
    assert noise_level(quiet, mask) == pytest.approx(noise_level(400.0 * quiet + 50.0, mask), rel=1e-4)
    assert noise_level(loud, mask) > 5 * noise_level(quiet, mask)
    assert noise_level(quiet, np.zeros_like(mask)) is None and noise_sigma(quiet, np.zeros_like(mask)) is None


def test_the_localiser_flag_is_the_degenerate_rule_at_half_the_grid() -> None:
    empty, full, half = np.zeros(SHAPE, np.uint8), np.ones(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    half[: SHAPE[0] * 3 // 4] = 1
    for mask in (empty, full, half, ball()):
        assert localiser_flag(mask) == degenerate_reason(mask, QCConfig().localiser_max_fraction)
    assert localiser_flag(ball()) is None and localiser_flag(half) is not None


def test_mask_flag_runs_the_calibration_profile() -> None:
    assert mask_flag(ball(), SPACING, PLAUSIBLE) is None
    assert mask_flag(np.zeros(SHAPE, np.uint8), SPACING, PLAUSIBLE) == "empty"
    # Far outside the volume range: flagged like any implausible mask, not set apart as at run time.
    flag = mask_flag(ball(radius=3.0), SPACING, PLAUSIBLE)
    assert flag is not None and flag.startswith("implausible: volume") and "far outside" not in flag
    with pytest.raises(ValueError, match="spacing"):
        mask_flag(ball(), None, PLAUSIBLE)


def test_the_calibration_profile_is_an_ordered_part_of_the_rule_list() -> None:
    assert [r for r in RULES if r in CALIBRATION_RULES] == list(CALIBRATION_RULES)
    assert len({r.__name__ for r in RULES}) == len(RULES)
    assert all(r.__doc__ for r in RULES)


def test_a_rule_is_a_function_of_the_evidence() -> None:
    def tiny(evidence: Evidence, standards: Standards):
        """A volume under 1 mL fails."""
        return ("fail", "tiny") if evidence.volume_ml is not None and evidence.volume_ml < 1.0 else None

    fails, reviews = judge(Evidence(volume_ml=0.5, extents_mm=(10.0, 40.0, 50.0)), Standards(PLAUSIBLE),
                           (*RULES, tiny))
    assert fails == ["volume 0.5 mL far outside the plausible 20.0-200.0 mL", "tiny"]
    assert reviews == ["smallest extent 10 mm outside the plausible 20-80 mm"]


def test_a_very_noisy_scan_asks_for_review_and_a_quiet_one_passes() -> None:
    from heartseg.runtime.contract import ModelContract, StageContract
    from heartseg.runtime.qc import assess

    from heartseg.runtime.qc import scans_plausibility

    mask = ball()
    rng = np.random.default_rng(5)
    quiet = (smooth_scan(mask) + rng.normal(0.0, 0.02, mask.shape)).astype(np.float32)
    loud = (smooth_scan(mask) + rng.normal(0.0, 1.0, mask.shape)).astype(np.float32)
    # The noise ceiling is learned from the training scans, as the other ranges are.
    learned = scans_plausibility([(quiet, mask, SPACING)])
    assert learned.noise_level is not None and learned.noise_level[1] == pytest.approx(3 * learned.noise_level[0])
    ranges = dataclasses.replace(PLAUSIBLE, noise_level=learned.noise_level)
    contract = ModelContract(stages=[StageContract("single", SPACING, (64, 64, 64), threshold=0.5)],
                             plausibility=ranges)
    prob = mask.astype(np.float32) * 0.97
    calm = assess(mask, prob, SPACING, contract, image=quiet)
    noisy = assess(mask, prob, SPACING, contract, image=loud)
    assert calm.verdict == "ok" and calm.measures["noise_level"] < learned.noise_level[1]
    assert noisy.verdict == "review" and any(r.startswith("noise level") for r in noisy.reasons)
    assert assess(mask, prob, SPACING, contract).measures["noise_level"] is None
    # A model trained before the noise level was learned judges nothing by it.
    unlearned = ModelContract(stages=contract.stages, plausibility=PLAUSIBLE)
    assert assess(mask, prob, SPACING, unlearned, image=loud).verdict == "ok"
    # The learned range travels in the contract.
    assert ModelContract.from_json(contract.to_json()).plausibility.noise_level == learned.noise_level


def test_findings_name_their_rules_in_the_order_judge_gives_them() -> None:
    from heartseg.runtime.qc import findings

    evidence, standards = Evidence(volume_ml=0.5, extents_mm=(10.0, 40.0, 50.0)), Standards(PLAUSIBLE)
    found = findings(evidence, standards)
    assert [f.rule for f in found] == ["implausible_volume", "implausible_smallest_extent"]
    assert [f.severity for f in found] == ["fail", "review"]
    fails, reviews = judge(evidence, standards)
    assert [f.reason for f in found] == fails + reviews


def test_the_report_names_the_rule_of_each_reason() -> None:
    from heartseg.runtime.contract import ModelContract, StageContract
    from heartseg.runtime.qc import QCReport, ScoreCalibration, assess

    pessimist = ScoreCalibration(slope=1.0, intercept=-0.3, residual_lo=-0.03, residual_hi=0.03, cases=10)
    contract = ModelContract(stages=[StageContract("single", SPACING, (64, 64, 64), threshold=0.5)],
                             plausibility=PLAUSIBLE, score_calibration=pessimist)
    mask = ball(radius=6.0)  # about 2 mL: a volume far outside, extents below the range
    report = assess(mask, mask.astype(np.float32) * 0.97, SPACING, contract)
    assert report.rules == ["implausible_volume", "implausible_smallest_extent", "implausible_middle_extent",
                            "implausible_largest_extent", "low_estimated_dice"]
    assert len(report.reasons) == len(report.rules) and report.reasons[0].startswith("volume")
    assert report.reasons[-1].startswith("estimated Dice") and report.verdict == "fail"
    # Recorded, read back, and empty in a record written before the names were.
    record = report.to_dict()
    assert record["rules"] == report.rules and QCReport.from_dict(record).rules == report.rules
    del record["rules"]
    assert QCReport.from_dict(record).rules == [] and QCReport.from_dict(record).reasons == report.reasons
