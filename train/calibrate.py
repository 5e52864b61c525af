"""Decision-threshold calibration on held-out probabilities."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from heartseg.runtime.errors import HeartsegError
from heartseg.runtime.metrics import dice_score

DEFAULT_THRESHOLDS = tuple(np.round(np.arange(0.05, 0.951, 0.05), 2).tolist())


class CalibrationError(HeartsegError):
    """No threshold gives a usable (non-degenerate) mask: the model must not be written."""

    exit_code = 1


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


def calibrate_threshold(pairs: list[tuple[np.ndarray, np.ndarray]], to_mask: Callable[[np.ndarray, float], np.ndarray],
                        flag: MaskFlag, thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS) -> Calibration:
    """Pick the threshold that maximises mean Dice over (probability, label) pairs, never one whose mask of
    some case is flagged (flag(case index, mask) says why a mask is unusable, or None)."""
    means, bad, first_flags = [], [], {}
    for threshold in thresholds:
        masks = [to_mask(prob, threshold) for prob, _ in pairs]
        means.append(float(np.mean([dice_score(m, ref) for m, (_, ref) in zip(masks, pairs)])))
        flags = [(i, flag(i, m)) for i, m in enumerate(masks)]
        flags = [(i, f) for i, f in flags if f is not None]
        bad.append(bool(flags))
        if flags:
            first_flags[f"{threshold:g}"] = f"case {flags[0][0]}: {flags[0][1]}"
    usable = [i for i, b in enumerate(bad) if not b]
    if not usable:
        example = next(iter(first_flags.items()))
        raise CalibrationError(
            "threshold calibration failed: every threshold gives an empty or implausible mask on some "
            f"validation case (at {example[0]}: {example[1]}); the model was not written (train longer, or check "
            "the labels)"
        )
    best = max(usable, key=lambda i: means[i])
    return Calibration(float(thresholds[best]), means[best], list(thresholds), means, bad, len(pairs), first_flags)
