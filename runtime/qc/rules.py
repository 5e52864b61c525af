"""QC's rules: named functions over the evidence, each returning None or (severity, reason), and the one rule list.

A rule sees the evidence and the standards it is judged by (the model's learned ranges and score calibration,
and the fixed thresholds of QCConfig); a rule whose evidence or standard is missing (a degenerate mask, a model
trained before a range was learned, no scan given) returns None. Severity is "review" or "fail"; a report lists
the fails first, then the reviews, each in the order of the rule list.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .calibration import ScoreCalibration
from .evidence import Evidence, gather
from .measures import scan_geometry
from .orientation import transform_kind, transform_name
from .ranges import Plausibility

Finding = tuple[str, str]


class NamedFinding(NamedTuple):
    """A rule's finding with the rule's name (its function's __name__)."""

    rule: str
    severity: str
    reason: str


_ORDINALS = ("smallest", "middle", "largest")


@dataclass(frozen=True)
class QCConfig:
    """Thresholds of the rules that are not learned from data."""

    # The kept (largest) component must hold at least this share of the thresholded foreground.
    min_largest_share: float = 0.9
    # Mask area on one face of the fine stage's box (or of the scan), over the mask's largest
    # cross-section along that axis: near 0 when the mask only grazes the face, near 1 when cut.
    max_border_share: float = 0.25
    # A volume beyond the plausible range by this further factor fails instead of asking for review.
    volume_fail_factor: float = 2.0
    # The largest share of its grid a localiser's mask may cover when its threshold is calibrated.
    localiser_max_fraction: float = 0.5
    # Refusal (exit 2, from the header) is for scans no model could use, review for scans outside what training
    # saw: a scan is refused only when a voxel size lies beyond the learned range (already widened by the input
    # margin) by this further factor, or its field of view beyond the learned largest one by refusal_fov_factor.
    refusal_spacing_factor: float = 6.0
    refusal_fov_factor: float = 1.5
    # Without learned ranges (older models, tiny test models), the stages' bounds: spacings within this factor of
    # the finest and coarsest stage spacing, and a field of view of at most stage_fov_factor times the largest
    # patch extent of any stage (at least min_stage_fov_mm).
    stage_spacing_factor: float = 8.0
    stage_fov_factor: float = 2.0
    min_stage_fov_mm: float = 500.0


@dataclass(frozen=True)
class Standards:
    """What the evidence is judged against: the model's learned ranges and score calibration (None: not learned)."""

    ranges: Plausibility | None = None
    calibration: ScoreCalibration | None = None
    config: QCConfig = QCConfig()


Rule = Callable[[Evidence, Standards], "Finding | None"]


def degenerate_mask(evidence: Evidence, standards: Standards) -> Finding | None:
    """An empty mask, one of all foreground, or one above the model's plausible share of the scan."""
    return None if evidence.degenerate is None else ("fail", evidence.degenerate)


def implausible_volume(evidence: Evidence, standards: Standards) -> Finding | None:
    """A volume outside the learned range; beyond it by volume_fail_factor, a fail."""
    volume, ranges = evidence.volume_ml, standards.ranges
    if volume is None or ranges is None:
        return None
    lo, hi = ranges.volume_ml
    factor = standards.config.volume_fail_factor
    if not lo / factor <= volume <= hi * factor:
        return "fail", f"volume {volume:.1f} mL far outside the plausible {lo:.1f}-{hi:.1f} mL"
    if not lo <= volume <= hi:
        return "review", f"volume {volume:.1f} mL outside the plausible {lo:.1f}-{hi:.1f} mL"
    return None


def implausible_extent(axis: int) -> Rule:
    """The rule on the mask's axis-th smallest extent: outside the learned range."""
    def rule(evidence: Evidence, standards: Standards) -> Finding | None:
        if evidence.extents_mm is None or standards.ranges is None:
            return None
        value, (lo, hi) = evidence.extents_mm[axis], standards.ranges.extent_mm[axis]
        if lo <= value <= hi:
            return None
        return "review", f"{_ORDINALS[axis]} extent {value:.0f} mm outside the plausible {lo:.0f}-{hi:.0f} mm"

    rule.__name__ = f"implausible_{_ORDINALS[axis]}_extent"
    rule.__doc__ = f"The mask's {_ORDINALS[axis]} extent outside the learned range."
    return rule


def fragmented(evidence: Evidence, standards: Standards) -> Finding | None:
    """The kept component holds too little of the thresholded foreground."""
    share = evidence.largest_share
    if share is None or share >= standards.config.min_largest_share:
        return None
    return "review", (f"fragmented: the kept component is {100 * share:.0f} % of the foreground "
                      f"({len(evidence.component_voxels or ())} components)")


def cut_by_box(evidence: Evidence, standards: Standards) -> Finding | None:
    """The mask cut by the face of the fine stage's box."""
    share = evidence.box_border_share
    if share is None or not share > standards.config.max_border_share:
        return None
    return "review", f"cut by the fine stage's box ({100 * share:.0f} % of a cross-section on its border)"


def cut_by_scan_edge(evidence: Evidence, standards: Standards) -> Finding | None:
    """The mask cut by the edge of the scan."""
    share = evidence.scan_edge_share
    if share is None or not share > standards.config.max_border_share:
        return None
    return "review", f"cut by the edge of the scan ({100 * share:.0f} % of a cross-section on it)"


def unfamiliar_orientation(evidence: Evidence, standards: Standards) -> Finding | None:
    """The atrium's shape fits the training atria better with its axes permuted or mirrored, by more than the margin
    learned on the training labels: the scan's axes are not what its header says."""
    match = evidence.orientation
    atlases = standards.ranges.orientation_atlases if standards.ranges is not None else None
    if match is None or atlases is None or not match.gain > atlases.margin:
        return None
    return "review", (f"the atrium looks {transform_kind(match.transform)}: axes {transform_name(match.transform)} "
                      f"fit the trained shape better ({match.best:.2f} against {match.as_given:.2f})")


def _geometry_rule(what: str, field: str, axis: int, digits: int) -> Rule:
    """The rule on a scan's axis-th smallest voxel size or field of view (field of Evidence and Plausibility)."""
    def rule(evidence: Evidence, standards: Standards) -> Finding | None:
        values = getattr(evidence, field)
        ranges = getattr(standards.ranges, field) if standards.ranges is not None else None
        if values is None or ranges is None:
            return None
        value, (lo, hi) = values[axis], ranges[axis]
        if lo <= value <= hi:
            return None
        return "review", (f"{_ORDINALS[axis]} {what} {value:.{digits}f} mm outside the trained {lo:.{digits}f}-"
                          f"{hi:.{digits}f} mm")

    rule.__name__ = f"untrained_{_ORDINALS[axis]}_{what.replace(' ', '_')}"
    rule.__doc__ = f"The scan's {_ORDINALS[axis]} {what} outside the training scans' range."
    return rule


def untrained_voxel_size(axis: int) -> Rule:
    """The rule on the scan's axis-th smallest voxel size: outside the training scans' range."""
    return _geometry_rule("voxel size", "spacing_mm", axis, 2)


def untrained_field_of_view(axis: int) -> Rule:
    """The rule on the scan's axis-th smallest field of view: outside the training scans' range."""
    return _geometry_rule("field of view", "fov_mm", axis, 0)


def _learned(evidence: Evidence, standards: Standards, name: str) -> tuple[float, tuple[float, float]] | None:
    """The evidence's measure and the model's learned range of that name, or None when either is missing."""
    value = getattr(evidence, name)
    limits = getattr(standards.ranges, name) if standards.ranges is not None else None
    return None if value is None or limits is None else (value, limits)


def untrained_contrast(evidence: Evidence, standards: Standards) -> Finding | None:
    """Intensity skewness outside the training scans' range (inverted or unfamiliar contrast)."""
    found = _learned(evidence, standards, "skewness")
    if found is None or found[1][0] <= found[0] <= found[1][1]:
        return None
    value, limits = found
    return "review", (f"intensity skewness {value:.2f} outside the trained {limits[0]:.2f} to {limits[1]:.2f} "
                      f"(inverted or unfamiliar contrast)")


def _below(evidence: Evidence, standards: Standards, name: str) -> tuple[float, float] | None:
    """(the measure, the learned low end) when the measure of that name lies below its learned range, else None."""
    found = _learned(evidence, standards, name)
    return (found[0], found[1][0]) if found is not None and found[0] < found[1][0] else None


def _above(evidence: Evidence, standards: Standards, name: str) -> tuple[float, float] | None:
    """(the measure, the learned high end) when the measure of that name lies above its learned range, else None."""
    found = _learned(evidence, standards, name)
    return (found[0], found[1][1]) if found is not None and found[0] > found[1][1] else None


def soft_edges(evidence: Evidence, standards: Standards) -> Finding | None:
    """Edges softer than any the model trained on."""
    # Only soft edges are flagged: coarser voxels and noise both raise edge sharpness, and the model copes with both.
    found = _below(evidence, standards, "edge_sharpness")
    return None if found is None else ("review", f"edge sharpness {found[0]:.2f} below the trained {found[1]:.2f} "
                                                 "(blurred, or interpolated to finer voxels than acquired)")


def dark_interior(evidence: Evidence, standards: Standards) -> Finding | None:
    """A mask interior darker among its surroundings than the training labels'."""
    # Only a dark interior is flagged: a blood pool brighter than everything around it is what the model expects.
    found = _below(evidence, standards, "interior_rank")
    return None if found is None else (
        "review", f"the mask's interior is brighter than only {100 * found[0]:.0f} % of its surroundings, below the "
                  f"trained {100 * found[1]:.0f} % (inverted contrast, or not the blood pool)")


def noisy_scan(evidence: Evidence, standards: Standards) -> Finding | None:
    """Noise far above that of the noisiest scan the model trained on (learned as the other ranges are)."""
    found = _above(evidence, standards, "noise_level")
    return None if found is None else ("review", f"noise level {found[0]:.2f} above the trained {found[1]:.2f} of "
                                                 "the intensity spread (a very noisy scan)")


def low_contrast(evidence: Evidence, standards: Standards) -> Finding | None:
    """A mask's interior against its surroundings, over the noise, flatter than in any scan the model trained on."""
    # Only the low end is judged: a blurred scan reads high (the blur removes the noise), and soft edges catch it.
    found = _below(evidence, standards, "contrast")
    return None if found is None else ("review", f"contrast {found[0]:.1f} below the trained {found[1]:.1f} (the "
                                                 "mask's interior against its surroundings, in noise sd: a very "
                                                 "noisy, flat or inverted scan)")


def clipped_intensities(evidence: Evidence, standards: Standards) -> Finding | None:
    """More of the atrium's neighbourhood at the scan's brightest value than in any scan the model trained on."""
    found = _above(evidence, standards, "saturation")
    return None if found is None else (
        "review", f"{100 * found[0]:.0f} % of the voxels around the atrium at their brightest value, above the "
                  f"trained {100 * found[1]:.0f} % (intensities clipped below the blood pool's brightness)")


def low_estimated_dice(evidence: Evidence, standards: Standards) -> Finding | None:
    """An estimated Dice below the calibration's fail_below (fail) or review_below (review)."""
    calibration = standards.calibration
    if calibration is None or evidence.score is None or evidence.degenerate is not None:
        return None
    estimate = calibration.estimate(evidence.score)[0]
    if estimate < calibration.fail_below:
        return "fail", f"estimated Dice {estimate:.2f} below {calibration.fail_below:g}"
    if estimate < calibration.review_below:
        return "review", f"estimated Dice {estimate:.2f} below {calibration.review_below:g}"
    return None


EXTENT_RULES = tuple(implausible_extent(axis) for axis in range(3))
INPUT_RULES = (*(untrained_voxel_size(axis) for axis in range(3)),
               *(untrained_field_of_view(axis) for axis in range(3)),
               untrained_contrast, soft_edges, dark_interior)

# The one rule list, in the order a report gives the reasons of each severity.
RULES: tuple[Rule, ...] = (
    degenerate_mask,
    implausible_volume,
    *EXTENT_RULES,
    fragmented,
    cut_by_box,
    cut_by_scan_edge,
    unfamiliar_orientation,
    *INPUT_RULES,
    noisy_scan,
    low_contrast,
    clipped_intensities,
    low_estimated_dice,
)

# The run-time profile (heartseg-infer's verdict) is every rule. The calibration profile judges the held-out
# masks a threshold makes while the threshold is being calibrated: only what a threshold can change and has a
# standard yet, the degenerate mask and the learned volume and extents. The scan's geometry and contrast do not
# depend on the threshold, box and edge cuts or fragments are left to run time, and the score calibration is
# fitted after the threshold. Every flag counts the same there, so a volume far outside the range is not set apart
# (an infinite fail factor keeps its reason "outside the plausible").
CALIBRATION_RULES: tuple[Rule, ...] = tuple(r for r in RULES if r in {degenerate_mask, implausible_volume,
                                                                     *EXTENT_RULES})
CALIBRATION_CONFIG = QCConfig(volume_fail_factor=math.inf)


def findings(evidence: Evidence, standards: Standards, rules: Iterable[Rule] = RULES) -> list[NamedFinding]:
    """The findings of the rules that find something, each with its rule's name: the fails, then the reviews, each
    in rule order."""
    found = [NamedFinding(rule.__name__, *f) for rule in rules if (f := rule(evidence, standards)) is not None]
    return [f for f in found if f.severity == "fail"] + [f for f in found if f.severity == "review"]


def judge(evidence: Evidence, standards: Standards, rules: Iterable[Rule] = RULES) -> tuple[list[str], list[str]]:
    """(fail reasons, review reasons) of the rules that find something, each in rule order."""
    found = findings(evidence, standards, rules)
    return [f.reason for f in found if f.severity == "fail"], [f.reason for f in found if f.severity == "review"]


def input_reasons(shape: Iterable[int], spacing: Iterable[float], plausibility: Plausibility,
                  skewness: float | None = None, edge_sharpness: float | None = None,
                  interior_rank: float | None = None) -> list[str]:
    """Why a scan's voxel size, field of view, intensity skewness, edge sharpness or the brightness of the mask's
    interior among its surroundings is outside what the model trained on."""
    spacing_sorted, fov_sorted = scan_geometry(shape, spacing)
    evidence = Evidence(spacing_mm=spacing_sorted, fov_mm=fov_sorted, skewness=skewness,
                        edge_sharpness=edge_sharpness, interior_rank=interior_rank)
    fails, reviews = judge(evidence, Standards(plausibility), INPUT_RULES)
    return fails + reviews


def mask_flag(mask: np.ndarray, spacing: Iterable[float] | None, plausibility: Plausibility | None,
              max_fraction: float | None = None, voxel_volume_mm3: float | None = None,
              config: QCConfig = CALIBRATION_CONFIG) -> str | None:
    """Why a mask must not be reported as a result (empty, all foreground, implausible), or None: the calibration
    profile's rules (spacing may be None without plausibility)."""
    if plausibility is not None and spacing is None:
        raise ValueError("a mask judged against learned ranges needs its voxel spacing")
    # The calibration profile has no orientation rule: its shape comparison is not worth its cost per threshold.
    evidence = gather(mask, spacing or (), plausibility, max_fraction=max_fraction, voxel_volume_mm3=voxel_volume_mm3,
                      orientation=False)
    if evidence.degenerate is not None:
        return evidence.degenerate
    fails, reviews = judge(evidence, Standards(plausibility, None, config), CALIBRATION_RULES)
    return "implausible: " + "; ".join(fails + reviews) if fails or reviews else None


def localiser_flag(mask: np.ndarray, config: QCConfig = QCConfig()) -> str | None:
    """Why a localiser's mask must not be used while its threshold is calibrated (empty, all foreground, or above
    config.localiser_max_fraction of its grid), or None."""
    return mask_flag(mask, None, None, config.localiser_max_fraction)
