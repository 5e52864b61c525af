"""Quality control of one prediction: plausibility rules, a confidence score, and a verdict.

The verdict is "ok", "review" (look at this mask) or "fail" (do not use it), with the reasons:

* fail: the mask is empty, all foreground or above the model's plausible share of the scan; its
  volume is beyond the plausible range by more than a further factor; or the estimated Dice is
  below the calibration's fail_below.
* review: volume or extents outside the range learned from the training labels; a fragmented
  mask (the kept component holds too little of the thresholded foreground); the mask cut by the
  fine stage's box or by the edge of the scan; a voxel size, field of view, intensity skewness,
  edge sharpness around the mask or a mask interior darker among its surroundings than those the model
  trained on; or an estimated Dice below the calibration's review_below.

Models without learned plausibility (format 1) get the degenerate-mask rules only; models without
a score calibration report the raw score and no estimated Dice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from .confidence import soft_dice_score
from .contract import ModelContract
from .metrics import degenerate_reason
from .plausibility import (
    image_sharpness,
    input_reasons,
    intensity_skewness,
    interior_rank,
    mask_measures,
    measure_reasons,
    scan_geometry,
)
from .preprocess import mask_box

VERDICTS = ("ok", "review", "fail")
Box = tuple[np.ndarray, np.ndarray]
_CONNECTIVITY = np.ones((3, 3, 3), bool)


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


@dataclass
class QCReport:
    """The verdict on one mask, its reasons, the confidence score and what the rules measured."""

    verdict: str
    reasons: list[str] = field(default_factory=list)
    score: float | None = None
    estimated_dice: float | None = None
    dice_interval: tuple[float, float] | None = None
    measures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def flag(self) -> str | None:
        """'review: reasons' or 'fail: reasons', or None when the verdict is ok."""
        return None if self.verdict == "ok" else self.summary()

    def summary(self) -> str:
        """One line: the verdict and its reasons."""
        return self.verdict if not self.reasons else f"{self.verdict}: " + "; ".join(self.reasons)

    def dice_text(self) -> str:
        """'0.91 [0.86-0.94]', or 'n/a' without a calibration."""
        if self.estimated_dice is None or self.dice_interval is None:
            return "n/a"
        return f"{self.estimated_dice:.2f} [{self.dice_interval[0]:.2f}-{self.dice_interval[1]:.2f}]"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"verdict": self.verdict, "reasons": list(self.reasons), "score": self.score,
                "estimated_dice": self.estimated_dice,
                "dice_interval": list(self.dice_interval) if self.dice_interval is not None else None,
                "measures": self.measures, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QCReport":
        """Inverse of to_dict (a report read back from a per-scan record)."""
        interval = data.get("dice_interval")
        return cls(str(data["verdict"]), list(data.get("reasons") or []), data.get("score"),
                   data.get("estimated_dice"), tuple(interval) if interval else None,  # type: ignore[arg-type]
                   dict(data.get("measures") or {}), float(data.get("seconds") or 0.0))


def stage_box_on_native(box: Box, native_shape: tuple[int, ...], stage_shape: tuple[int, ...]) -> Box:
    """A box on a stage's grid (as infer_canonical returns it) in voxel coordinates of the native grid."""
    scale = np.asarray(native_shape, float) / np.asarray(stage_shape, float)
    return np.asarray(box[0], float) * scale, np.asarray(box[1], float) * scale


def bounding_slices(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Slices of the nonzero voxels' bounding box, or None when empty."""
    box = mask_box(mask)
    return None if box is None else tuple(slice(int(lo), int(hi)) for lo, hi in zip(*box))


def component_sizes(binary: np.ndarray) -> np.ndarray:
    """Voxel counts of the 26-connected foreground components, largest first."""
    labels, count = ndimage.label(binary, structure=_CONNECTIVITY)
    if count == 0:
        return np.zeros(0, np.int64)
    return np.sort(np.bincount(labels.ravel())[1:])[::-1]


def face_shares(mask: np.ndarray, box: Box | None = None) -> tuple[float, float]:
    """(box share, scan-edge share): the largest share of the mask's cross-section on a face of box / of the array.

    Each share is the mask's area on one face over its largest cross-section along that axis: near 0
    when the mask only grazes the face, near 1 when the face cuts it. box is half-open, on mask's grid
    (floats allowed); a box face on the array's own edge counts for the scan edge only.
    """
    crop = bounding_slices(mask)
    if crop is None:
        return 0.0, 0.0
    inner = mask[crop]
    shape = mask.shape
    box_share = edge_share = 0.0
    for axis in range(3):
        profile = inner.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64)
        largest = float(profile.max())
        first, stop = crop[axis].start, crop[axis].stop

        def at(index: int) -> float:
            return float(profile[index - first]) / largest if first <= index < stop else 0.0

        edge_share = max(edge_share, at(0), at(shape[axis] - 1))
        if box is not None:
            lo = int(np.ceil(float(box[0][axis])))
            hi = int(np.floor(float(box[1][axis])))
            if lo > 0:
                box_share = max(box_share, at(lo))
            if hi < shape[axis]:
                box_share = max(box_share, at(hi - 1))
    return box_share, edge_share


def assess(mask: np.ndarray, prob: np.ndarray, spacing: tuple[float, float, float], contract: ModelContract,
           box: Box | None = None, config: QCConfig = QCConfig(), voxel_volume_mm3: float | None = None,
           image: np.ndarray | None = None) -> QCReport:
    """QC of a final mask and the probabilities it came from, on one grid (voxel size spacing).

    box is where the final stage looked, on the same grid (None: the whole scan); volumes use
    voxel_volume_mm3 when given (|det| of the affine, exact for sheared grids), else the product of spacing;
    image (the scan on the same grid) lets its intensity skewness, its edge sharpness around the mask and the
    brightness of the mask's interior among its surroundings be checked.
    """
    start = time.perf_counter()
    fails: list[str] = []
    reviews: list[str] = []
    measures: dict[str, Any] = {}
    score = soft_dice_score(prob, mask)
    measures["score"] = score
    degenerate = degenerate_reason(mask, contract.max_foreground_fraction)
    if degenerate is not None:
        fails.append(degenerate)
    plausibility = contract.plausibility
    if plausibility is not None and degenerate is None:
        above = prob > float(contract.final_stage.threshold)
        crop = bounding_slices(above)
        region = mask[crop] if crop is not None else mask
        volume, extents = mask_measures(region, spacing, voxel_volume_mm3)
        sizes = component_sizes(above[crop]) if crop is not None else []
        voxel_ml = float(np.prod(spacing) if voxel_volume_mm3 is None else voxel_volume_mm3) / 1000.0
        measures.update(volume_ml=volume, extents_mm=list(extents), components=len(sizes),
                        component_ml=[float(n) * voxel_ml for n in sizes[:3]])
        implausible = measure_reasons(volume, extents, plausibility)
        lo, hi = plausibility.volume_ml
        if not lo / config.volume_fail_factor <= volume <= hi * config.volume_fail_factor:
            fails.append(f"volume {volume:.1f} mL far outside the plausible {lo:.1f}-{hi:.1f} mL")
            implausible = [r for r in implausible if not r.startswith("volume")]
        reviews += implausible
        if len(sizes):
            largest_share = float(sizes[0]) / float(np.sum(sizes))
            measures["largest_share"] = largest_share
            if largest_share < config.min_largest_share:
                reviews.append(f"fragmented: the kept component is {100 * largest_share:.0f} % of the foreground "
                               f"({len(sizes)} components)")
        box_share, edge_share = face_shares(mask, box)
        measures.update(box_border_share=box_share if box is not None else None, scan_edge_share=edge_share)
        if box_share > config.max_border_share:
            reviews.append(f"cut by the fine stage's box ({100 * box_share:.0f} % of a cross-section on its border)")
        if edge_share > config.max_border_share:
            reviews.append(f"cut by the edge of the scan ({100 * edge_share:.0f} % of a cross-section on it)")
        spacing_sorted, fov_sorted = scan_geometry(mask.shape, spacing)
        skewness = intensity_skewness(image) if image is not None and plausibility.skewness is not None else None
        edges = (image_sharpness(image, mask) if image is not None and plausibility.edge_sharpness is not None
                 else None)
        rank = (interior_rank(image, mask, spacing) if image is not None and plausibility.interior_rank is not None
                else None)
        measures.update(spacing_mm=list(spacing_sorted), fov_mm=list(fov_sorted), skewness=skewness,
                        edge_sharpness=edges, interior_rank=rank)
        reviews += input_reasons(mask.shape, spacing, plausibility, skewness, edges, rank)
    report = QCReport("ok", score=score, measures=measures)
    calibration = contract.score_calibration
    if calibration is not None:
        estimate, low, high = calibration.estimate(score)
        report.estimated_dice, report.dice_interval = estimate, (low, high)
        if degenerate is None and estimate < calibration.fail_below:
            fails.append(f"estimated Dice {estimate:.2f} below {calibration.fail_below:g}")
        elif degenerate is None and estimate < calibration.review_below:
            reviews.append(f"estimated Dice {estimate:.2f} below {calibration.review_below:g}")
    report.verdict = "fail" if fails else "review" if reviews else "ok"
    report.reasons = fails + reviews
    report.seconds = time.perf_counter() - start
    return report
