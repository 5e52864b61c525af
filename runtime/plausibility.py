"""What a plausible left-atrium mask looks like, in physical units learned from training labels.

The ranges are the training labels' own (volume in mL; the mask's extents in mm, sorted so that
they do not depend on which array axis is which) widened by a margin. Calibration refuses a
threshold whose masks leave them, and QC flags such masks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from .metrics import degenerate_reason
from .preprocess import mask_box

# Margin around the training labels' range: a factor on the extremes (low / factor, high * factor).
DEFAULT_MARGIN = 1.5


@dataclass(frozen=True)
class Plausibility:
    """Ranges of atrium volume (mL) and sorted extents (mm, smallest first) a mask may have."""

    volume_ml: tuple[float, float]
    extent_mm: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    cases: int = 0
    margin: float = DEFAULT_MARGIN

    def __post_init__(self) -> None:
        object.__setattr__(self, "volume_ml", tuple(float(v) for v in self.volume_ml))
        object.__setattr__(self, "extent_mm", tuple(tuple(float(v) for v in pair) for pair in self.extent_mm))

    def to_dict(self) -> dict:
        """JSON-able form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Plausibility":
        """Inverse of to_dict."""
        return cls(**data)


def mask_measures(mask: np.ndarray, spacing: Iterable[float],
                  voxel_volume_mm3: float | None = None) -> tuple[float, tuple[float, float, float]]:
    """A mask's volume in mL (voxel_volume_mm3, else the product of spacing) and its bounding-box extents in mm,
    sorted smallest first."""
    spacing = np.asarray(tuple(spacing), float)
    voxel = float(np.prod(spacing)) if voxel_volume_mm3 is None else float(voxel_volume_mm3)
    volume = float(np.count_nonzero(mask)) * voxel / 1000.0
    box = mask_box(mask)
    if box is None:
        return volume, (0.0, 0.0, 0.0)
    extents = np.sort((np.asarray(box[1]) - np.asarray(box[0])) * spacing)
    return volume, tuple(float(e) for e in extents)  # type: ignore[return-value]


def learn_plausibility(labels: Iterable[tuple[np.ndarray, Iterable[float]]],
                       margin: float = DEFAULT_MARGIN) -> Plausibility:
    """Ranges from (label, spacing) pairs of training cases, widened by margin."""
    measures = [mask_measures(label, spacing) for label, spacing in labels]
    measures = [m for m in measures if m[0] > 0]
    if not measures:
        raise ValueError("no labelled foreground to learn a plausible atrium from")
    volumes = np.array([m[0] for m in measures])
    extents = np.array([m[1] for m in measures])
    return Plausibility(
        volume_ml=(float(volumes.min() / margin), float(volumes.max() * margin)),
        extent_mm=tuple((float(extents[:, a].min() / margin), float(extents[:, a].max() * margin))  # type: ignore[arg-type]
                        for a in range(3)),
        cases=len(measures), margin=margin,
    )


def implausible_reasons(mask: np.ndarray, spacing: Iterable[float], plausibility: Plausibility,
                        voxel_volume_mm3: float | None = None) -> list[str]:
    """Why a non-empty mask is outside the plausible ranges (empty list: plausible)."""
    volume, extents = mask_measures(mask, spacing, voxel_volume_mm3)
    reasons = []
    lo, hi = plausibility.volume_ml
    if not lo <= volume <= hi:
        reasons.append(f"volume {volume:.1f} mL outside the plausible {lo:.1f}-{hi:.1f} mL")
    for name, value, (lo, hi) in zip(("smallest", "middle", "largest"), extents, plausibility.extent_mm):
        if not lo <= value <= hi:
            reasons.append(f"{name} extent {value:.0f} mm outside the plausible {lo:.0f}-{hi:.0f} mm")
    return reasons


def mask_flag(mask: np.ndarray, spacing: Iterable[float], plausibility: Plausibility | None,
              max_fraction: float | None = None, voxel_volume_mm3: float | None = None) -> str | None:
    """Why a mask must not be reported as a result (empty, all foreground, implausible), or None."""
    reason = degenerate_reason(mask, max_fraction)
    if reason is not None or plausibility is None:
        return reason
    reasons = implausible_reasons(mask, spacing, plausibility, voxel_volume_mm3)
    return "implausible: " + "; ".join(reasons) if reasons else None
