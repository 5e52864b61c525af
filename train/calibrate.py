"""Decision-threshold calibration on held-out probabilities."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from heartseg.runtime.errors import HeartsegError
from heartseg.runtime.metrics import dice_score

DEFAULT_THRESHOLDS = tuple(np.round(np.arange(0.05, 0.951, 0.05), 2).tolist())


# What a calibration failure tells the user to do, unless its caller knows better.
ADVICE = "the model was not written (train longer, or check the labels)"


class CalibrationError(HeartsegError):
    """No threshold gives a usable (non-degenerate) mask: the model must not be written."""

    exit_code = 1

    def __init__(self, diagnosis: str, stage: str | None = None, advice: str = ADVICE) -> None:
        self.diagnosis, self.stage, self.advice = diagnosis, stage, advice
        super().__init__(f"{diagnosis}; {advice}")

    def __reduce__(self):
        # Pickled (across processes) as its fields: the default would rebuild it from the finished message.
        return type(self), (self.diagnosis, self.stage, self.advice)

    def with_advice(self, advice: str) -> CalibrationError:
        """The same failure with other advice (what the caller knows the user can do)."""
        return CalibrationError(self.diagnosis, self.stage, advice)


@dataclass
class Calibration:
    """The chosen threshold and the sweep that chose it."""

    threshold: float
    dice: float
    thresholds: list[float]
    mean_dice: list[float]
    degenerate: list[bool]
    cases: int
    flags: dict[str, str] | None = None

    def to_dict(self) -> dict:
        """JSON-able form."""
        return asdict(self)


MaskFlag = Callable[[int, np.ndarray], "str | None"]


# A model whose masks are flagged on more than this share of the held-out cases at every threshold is
# refused: no threshold can make it usable.
MAX_FLAGGED_SHARE = 0.25


def calibrate_threshold(pairs: list[tuple[np.ndarray, np.ndarray]], to_mask: Callable[[np.ndarray, float], np.ndarray],
                        flag: MaskFlag, thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
                        max_flagged_share: float = MAX_FLAGGED_SHARE, names: Sequence[str] | None = None,
                        stage: str | None = None) -> Calibration:
    """Pick the threshold that maximises mean Dice over (probability, label) pairs among those that flag the
    fewest cases (flag(case index, mask) says why a mask is unusable, or None).

    A threshold never adds a flagged mask that another threshold avoids; a case flagged at every
    threshold is the model's failure, not the threshold's, and is recorded in `flags`. When even the
    best threshold flags more than max_flagged_share of the cases, calibration fails, naming the cases
    (by names, else by index) and the stage.
    """
    label = (lambda i: names[i]) if names is not None else (lambda i: f"case {i}")
    means, flagged = [], []
    for threshold in thresholds:
        masks = [to_mask(prob, threshold) for prob, _ in pairs]
        means.append(float(np.mean([dice_score(m, ref) for m, (_, ref) in zip(masks, pairs)])))
        flags = [(i, flag(i, m)) for i, m in enumerate(masks)]
        flagged.append([(label(i), f) for i, f in flags if f is not None])
    counts = [len(f) for f in flagged]
    fewest = min(counts)
    best = max((i for i, c in enumerate(counts) if c == fewest), key=lambda i: means[i])
    if fewest > max_flagged_share * len(pairs):
        cases = ", ".join(f"{name} ({reason})" for name, reason in flagged[best])
        of = f" of stage {stage!r}" if stage else ""
        raise CalibrationError(
            f"threshold calibration{of} failed: every threshold gives an empty or implausible mask on {fewest} or "
            f"more of {len(pairs)} validation cases; the best threshold tried, {thresholds[best]:g} (mean Dice "
            f"{means[best]:.3f}), refuses {cases}", stage)
    first_flags = {f"{t:g}": "; ".join(f"{name}: {reason}" for name, reason in f)
                   for t, f in zip(thresholds, flagged) if f}
    bad = [c > fewest for c in counts]
    return Calibration(float(thresholds[best]), means[best], list(thresholds), means, bad, len(pairs), first_flags)
