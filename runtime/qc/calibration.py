"""A confidence score from the model's own probabilities, and its calibration into an estimated Dice.

The score is the soft Dice between the probability map and the final mask: the Dice the mask would
have if the probabilities were the truth. A sharp, confident map scores near 1; a map that hesitates
over large regions, or whose mass lies outside the kept component, scores lower. It costs a few
passes over the probability map.

The calibration maps the score to an estimated Dice with an interval, fitted on held-out cases
(score, true Dice): a straight line when the held-out scores spread enough to fit a slope, else the
score shifted by the median residual; the interval is the residuals' quantiles, never narrower than
a floor. The line is never flatter than the score itself (slope 1): the score is already a Dice
estimate, and a flatter line, which one hard case among a few easy ones can produce, would promise a
good Dice for a low score and let through the masks QC is there to catch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

SCORE_NAME = "soft_dice"


@dataclass(frozen=True)
class FitConfig:
    """How a score calibration is fitted, and the verdict thresholds a new calibration carries."""

    # A slope is only fitted when the held-out scores spread this much (sd) over at least this many cases;
    # otherwise it is 1.
    min_score_sd: float = 0.02
    min_cases_for_slope: int = 8
    # A fitted slope is never below this: a drop of the score never means a smaller drop of the estimated Dice.
    min_slope: float = 1.0
    # The interval is never narrower than this on either side: a handful of held-out cases cannot show
    # the tails of the error distribution.
    min_half_width: float = 0.03
    coverage: float = 0.9
    # Verdict thresholds on the estimated Dice.
    review_below: float = 0.85
    fail_below: float = 0.5


FIT = FitConfig()
# The defaults by name: a stored calibration's fields default to them (the contract's format).
MIN_SLOPE = FIT.min_slope
DEFAULT_COVERAGE = FIT.coverage
REVIEW_BELOW = FIT.review_below
FAIL_BELOW = FIT.fail_below
# A mask below this true Dice that QC lets through as ok is a silent failure (benchmarks and heartseg-eval).
SILENT_BELOW = 0.80
# Each calibration the contract holds, and the per-case (score, true Dice) entries of a run's metrics it is fitted on.
CALIBRATED_SCORES = {"score_calibration": ("qc_score", "dice"), "tta_score_calibration": ("qc_score_tta", "dice_tta")}


def soft_dice_score(prob: np.ndarray, mask: np.ndarray) -> float:
    """Soft Dice between a probability map and a binary mask of the same grid; 0.0 for an empty mask.

    Finding no atrium is never a confident result, even where the probabilities agree that there is none.
    """
    prob = np.asarray(prob, dtype=np.float32)
    fg = np.asarray(mask).astype(bool, copy=False)
    count = int(np.count_nonzero(fg))
    if count == 0:
        return 0.0
    overlap = float(prob[fg].sum(dtype=np.float64))
    return 2.0 * overlap / (float(prob.sum(dtype=np.float64)) + count)


@dataclass(frozen=True)
class ScoreCalibration:
    """Estimated Dice = clip(intercept + slope * score); interval = estimate + residual quantiles."""

    slope: float
    intercept: float
    residual_lo: float
    residual_hi: float
    cases: int
    coverage: float = DEFAULT_COVERAGE
    score: str = SCORE_NAME
    review_below: float = REVIEW_BELOW
    fail_below: float = FAIL_BELOW
    score_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "score_range", tuple(float(v) for v in self.score_range))

    def estimate(self, score: float) -> tuple[float, float, float]:
        """(estimated Dice, lower, upper), each clipped to [0, 1]."""
        centre = self.intercept + self.slope * float(score)
        clip = lambda v: float(min(1.0, max(0.0, v)))  # noqa: E731
        return clip(centre), clip(centre + self.residual_lo), clip(centre + self.residual_hi)

    def to_dict(self) -> dict:
        """JSON-able form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ScoreCalibration":
        """Inverse of to_dict."""
        return cls(**data)


def fit_score_calibration(scores: Sequence[float], dices: Sequence[float], coverage: float = DEFAULT_COVERAGE,
                          review_below: float = REVIEW_BELOW, fail_below: float = FAIL_BELOW,
                          config: FitConfig = FIT) -> ScoreCalibration:
    """Fit the score -> Dice map on held-out (score, true Dice) pairs."""
    s = np.asarray(scores, float)
    d = np.asarray(dices, float)
    if s.shape != d.shape or s.size == 0:
        raise ValueError(f"need as many scores as Dice values, at least one (got {s.size} and {d.size})")
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(d))):
        raise ValueError("scores and Dice values must be finite")
    if s.size >= config.min_cases_for_slope and s.std() >= config.min_score_sd:
        slope, intercept = np.polyfit(s, d, 1)
        slope = max(float(slope), config.min_slope)
        intercept = float(np.median(d - slope * s))
    else:
        slope, intercept = 1.0, float(np.median(d - s))
    residuals = d - (intercept + slope * s)
    tail = (1.0 - coverage) / 2.0
    lo = min(float(np.quantile(residuals, tail)), -config.min_half_width)
    hi = max(float(np.quantile(residuals, 1.0 - tail)), config.min_half_width)
    return ScoreCalibration(slope=float(slope), intercept=intercept, residual_lo=lo, residual_hi=hi, cases=int(s.size),
                            coverage=coverage, review_below=review_below, fail_below=fail_below,
                            score_range=(float(s.min()), float(s.max())))


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation, None with fewer than 3 pairs or a constant side."""
    x, y = np.asarray(list(a), float), np.asarray(list(b), float)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    from scipy.stats import spearmanr

    return float(spearmanr(x, y)[0])


def pooled_score_calibration(per_case: Mapping[str, Mapping], score_key: str = "qc_score",
                             dice_key: str = "dice") -> ScoreCalibration | None:
    """Refit on held-out cases pooled over folds ({case: {score_key, dice_key}}); None without any scored case."""
    pairs = [(m[score_key], m[dice_key]) for m in per_case.values()
             if m.get(score_key) is not None and m.get(dice_key) is not None]
    if not pairs:
        return None
    return fit_score_calibration([p[0] for p in pairs], [p[1] for p in pairs])
