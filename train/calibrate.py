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


# A model whose masks are flagged on more than this share of the held-out cases at every threshold is
# refused: no threshold can make it usable.
MAX_FLAGGED_SHARE = 0.25


def calibrate_threshold(pairs: list[tuple[np.ndarray, np.ndarray]], to_mask: Callable[[np.ndarray, float], np.ndarray],
                        flag: MaskFlag, thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
                        max_flagged_share: float = MAX_FLAGGED_SHARE) -> Calibration:
    """Pick the threshold that maximises mean Dice over (probability, label) pairs among those that flag the
    fewest cases (flag(case index, mask) says why a mask is unusable, or None).

    A threshold never adds a flagged mask that another threshold avoids; a case flagged at every
    threshold is the model's failure, not the threshold's, and is recorded in `flags`. When even the
    best threshold flags more than max_flagged_share of the cases, calibration fails.
    """
    means, counts, first_flags = [], [], {}
    for threshold in thresholds:
        masks = [to_mask(prob, threshold) for prob, _ in pairs]
        means.append(float(np.mean([dice_score(m, ref) for m, (_, ref) in zip(masks, pairs)])))
        flags = [(i, flag(i, m)) for i, m in enumerate(masks)]
        flags = [(i, f) for i, f in flags if f is not None]
        counts.append(len(flags))
        if flags:
            first_flags[f"{threshold:g}"] = "; ".join(f"case {i}: {f}" for i, f in flags)
    fewest = min(counts)
    if fewest > max_flagged_share * len(pairs):
        example = next(iter(first_flags.items()))
        raise CalibrationError(
            f"threshold calibration failed: every threshold gives an empty or implausible mask on {fewest} or more "
            f"of {len(pairs)} validation cases (at {example[0]}: {example[1]}); the model was not written (train "
            "longer, or check the labels)"
        )
    bad = [c > fewest for c in counts]
    usable = [i for i, b in enumerate(bad) if not b]
    best = max(usable, key=lambda i: means[i])
    return Calibration(float(thresholds[best]), means[best], list(thresholds), means, bad, len(pairs), first_flags)
