"""Quality control of one prediction: plausibility rules, a confidence score, and a verdict.

The verdict is "ok", "review" (look at this mask) or "fail" (do not use it), with the reasons:

* fail: the mask is empty, all foreground or above the model's plausible share of the scan; its
  volume is beyond the plausible range by more than a further factor; or the estimated Dice is
  below the calibration's fail_below.
* review: volume or extents outside the range learned from the training labels; a fragmented
  mask (the kept component holds too little of the thresholded foreground); the mask cut by the
  fine stage's box or by the edge of the scan; a voxel size, field of view, intensity skewness,
  edge sharpness around the mask or a mask interior darker among its surroundings than those the model
  trained on; a scan far noisier, or with a flatter contrast between the mask's interior and its surroundings, than
  any it was made for; or an estimated Dice below the calibration's
  review_below.

Models without learned plausibility (format 1) get the degenerate-mask rules only; models without
a score calibration report the raw score and no estimated Dice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .calibration import soft_dice_score
from .evidence import gather
from .measures import Box
from .rules import RULES, QCConfig, Standards, findings

if TYPE_CHECKING:  # the contract imports this package's ranges and calibration
    from ..contract import ModelContract

VERDICTS = ("ok", "review", "fail")
# The order to check masks in: fails, then reviews, then the rest.
_CHECK_FIRST = {"fail": 0, "review": 1, "ok": 2}


def review_order(verdict: str, estimated_dice: float | None, score: float | None = None) -> tuple[int, float]:
    """A sort key for the order to check masks in: fails, then reviews, then ok masks; within each, the lowest
    estimated Dice (else the score) first, and a mask with neither first of its verdict. Keys compare alike for
    reports of one model (all with an estimated Dice, or none)."""
    value = estimated_dice if estimated_dice is not None else score
    return _CHECK_FIRST.get(verdict, 0), float(value) if value is not None and np.isfinite(value) else -np.inf


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
    # The name of the rule behind each reason, in the same order (empty in records written before they were).
    rules: list[str] = field(default_factory=list)

    @property
    def check_order(self) -> tuple[int, float]:
        """This mask's review_order key."""
        return review_order(self.verdict, self.estimated_dice, self.score)

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
                "measures": self.measures, "seconds": self.seconds, "rules": list(self.rules)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QCReport":
        """Inverse of to_dict (a report read back from a per-scan record)."""
        interval = data.get("dice_interval")
        return cls(str(data["verdict"]), list(data.get("reasons") or []), data.get("score"),
                   data.get("estimated_dice"), tuple(interval) if interval else None,  # type: ignore[arg-type]
                   dict(data.get("measures") or {}), float(data.get("seconds") or 0.0), list(data.get("rules") or []))


def assess(mask: np.ndarray, prob: np.ndarray, spacing: tuple[float, float, float], contract: ModelContract,
           box: Box | None = None, config: QCConfig = QCConfig(), voxel_volume_mm3: float | None = None,
           image: np.ndarray | None = None, score: float | None = None) -> QCReport:
    """QC of a final mask and the probabilities it came from, on one grid (voxel size spacing): the run-time profile.

    box is where the final stage looked, on the same grid (None: the whole scan); volumes use
    voxel_volume_mm3 when given (|det| of the affine, exact for sheared grids), else the product of spacing;
    image (the scan on the same grid) lets its intensity skewness, its edge sharpness around the mask, the
    brightness of the mask's interior among its surroundings, its noise and that contrast over the noise be
    measured; score, when the model's graph computed it already, is the soft Dice of prob against mask.
    """
    start = time.perf_counter()
    score = soft_dice_score(prob, mask) if score is None else float(score)
    evidence = gather(mask, spacing, contract.plausibility, max_fraction=contract.max_foreground_fraction,
                      score=score, prob=prob, threshold=contract.final_stage.threshold, box=box,
                      voxel_volume_mm3=voxel_volume_mm3, image=image)
    found = findings(evidence, Standards(contract.plausibility, contract.score_calibration, config), RULES)
    report = QCReport("ok", score=score, measures=evidence.measures())
    if contract.score_calibration is not None:
        estimate, low, high = contract.score_calibration.estimate(score)
        report.estimated_dice, report.dice_interval = estimate, (low, high)
    report.verdict = "fail" if any(f.severity == "fail" for f in found) else "review" if found else "ok"
    report.reasons, report.rules = [f.reason for f in found], [f.rule for f in found]
    report.seconds = time.perf_counter() - start
    return report
