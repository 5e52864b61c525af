"""What a plausible left-atrium mask looks like, in physical units learned from training labels.

The ranges are the training labels' own (volume in mL; the mask's extents in mm, sorted so that
they do not depend on which array axis is which) widened by a margin. Calibration refuses a
threshold whose masks leave them, and QC flags such masks.

The scans' own voxel sizes and fields of view (sorted, in mm) are learned too, widened by the input
margin: QC asks for a review of a scan whose geometry the model never saw. So is the skewness of the
scans' intensities around the atrium (within a reach of its box, so that the background a wider field of
view adds does not move it; inverting the intensities flips its sign): a scan outside the learned range
has a contrast the model never saw. And so is the
edge sharpness around the atrium, about the inverse of an edge's width in voxels: a blurred scan has
softer edges than any the model saw, while a scan stored at coarser voxels stays sharp at its own scale.

And so is how bright the atrium's interior is among its surroundings: the share of the voxels around a
mask that are darker than the median of its interior. Blood fills the atrium, and in both bSSFP and
LGE it is brighter than most of what lies around it; a mask whose inside is darker than most of its
surroundings has found another structure, or a scan of a contrast the model never saw (such as inverted
intensities, which a whole-scan skewness misses on crops around the atrium).

And so is the image quality around the atrium: its noise level (above the noisiest training scan's by a factor,
a review) and its interior contrast, the difference between the median of the atrium's interior and that of its
surroundings over the noise sd (below the flattest or noisiest training scan's by a factor, a review).

And, per training family (dataset), the atrium's shape as an atlas (orientation.py): a mask that fits it better with
its axes permuted or mirrored comes from a scan whose axes are not what its header says.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace

import numpy as np

from .measures import ImageMeasures, mask_measures, scan_geometry
from .orientation import OrientationAtlases, learn_orientation_atlases


@dataclass(frozen=True)
class RangeConfig:
    """How far the learned ranges reach beyond what the training labels and scans showed."""

    # Margin around the training labels' range: a factor on the extremes (low / factor, high * factor).
    margin: float = 1.5
    # Margin around the training scans' voxel sizes, fields of view and edge sharpness, the same way.
    input_margin: float = 1.5
    # The learned skewness range is widened on each side by this share of its width, and at least by the floor.
    skewness_margin: float = 0.25
    min_skewness_margin: float = 0.5
    # The learned interior-rank range likewise; only its lower end is checked.
    rank_margin: float = 0.25
    min_rank_margin: float = 0.05
    # The learned noise level's ceiling: the noisiest training scan's level times this factor.
    noise_margin: float = 3.0
    # The learned contrast's floor: the flattest (or noisiest) training scan's contrast over this factor, about
    # twice its noise.
    contrast_margin: float = 2.0
    # The learned saturation's ceiling: the most saturated training scan's share times this factor, and at least
    # min_saturation (a float scan's maximum is one voxel; an 8-bit one clipped at its 99.5th percentile holds about
    # 1 % of the atrium's neighbourhood there).
    saturation_margin: float = 4.0
    min_saturation: float = 0.02


RANGES = RangeConfig()
# The defaults by name: a stored Plausibility's margins default to them (the contract's format).
DEFAULT_MARGIN = RANGES.margin
DEFAULT_INPUT_MARGIN = RANGES.input_margin

Ranges3 = tuple[tuple[float, float], tuple[float, float], tuple[float, float]]


def _ranges(values) -> Ranges3 | None:
    return None if values is None else tuple(tuple(float(v) for v in pair) for pair in values)  # type: ignore[return-value]


@dataclass(frozen=True)
class Plausibility:
    """Ranges of atrium volume (mL) and sorted extents (mm, smallest first) a mask may have."""

    volume_ml: tuple[float, float]
    extent_mm: tuple[tuple[float, float], tuple[float, float], tuple[float, float]]
    cases: int = 0
    margin: float = DEFAULT_MARGIN
    # Sorted voxel sizes and fields of view (mm) of the training scans, widened by input_margin;
    # None in models trained before they were learned.
    spacing_mm: Ranges3 | None = None
    fov_mm: Ranges3 | None = None
    input_margin: float = DEFAULT_INPUT_MARGIN
    # Range of the training scans' intensity skewness, widened; None in models trained before it was learned.
    skewness: tuple[float, float] | None = None
    # Range of the training scans' edge sharpness around the atrium, widened by input_margin; None in older models.
    edge_sharpness: tuple[float, float] | None = None
    # Range of the training labels' interior rank (see interior_rank), widened; None in older models.
    interior_rank: tuple[float, float] | None = None
    # Range of the training scans' noise level (see noise_level), its top widened; None in older models.
    noise_level: tuple[float, float] | None = None
    # Range of the training labels' interior contrast (see interior_contrast), its low end widened; None in older
    # models.
    contrast: tuple[float, float] | None = None
    # Range of the training scans' saturation (see saturation), its top widened; None in older models.
    saturation: tuple[float, float] | None = None
    # Each training family's atrium atlas and the margin learned with them (see orientation.py); None in older models.
    orientation_atlases: OrientationAtlases | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "volume_ml", tuple(float(v) for v in self.volume_ml))
        object.__setattr__(self, "extent_mm", _ranges(self.extent_mm))
        object.__setattr__(self, "spacing_mm", _ranges(self.spacing_mm))
        object.__setattr__(self, "fov_mm", _ranges(self.fov_mm))
        for name in ("skewness", "edge_sharpness", "interior_rank", "noise_level", "contrast", "saturation"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if isinstance(self.orientation_atlases, dict):
            object.__setattr__(self, "orientation_atlases", OrientationAtlases.from_dict(self.orientation_atlases))

    def to_dict(self) -> dict:
        """JSON-able form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Plausibility":
        """Inverse of to_dict."""
        return cls(**data)


def _spread(values: Iterable[float | None] | None, share: float, floor: float,
            lo: float = -np.inf, hi: float = np.inf) -> tuple[float, float] | None:
    """min..max of the values given (None skipped) widened on each side by max(floor, share x width), clipped to
    [lo, hi]; None without any value."""
    kept = _kept(values)
    if not kept:
        return None
    low, high = min(kept), max(kept)
    widen = max(floor, share * (high - low))
    return max(lo, low - widen), min(hi, high + widen)


def _kept(values: Iterable[float | None] | None) -> list[float]:
    """The values given, None skipped."""
    return [float(v) for v in values if v is not None] if values is not None else []


def _floor_widened(values: Iterable[float | None] | None, factor: float) -> tuple[float, float] | None:
    """min..max of the values given (None skipped), the min moved away from the max by factor (divided when
    positive, multiplied when negative); None without any value."""
    kept = _kept(values)
    if not kept:
        return None
    low = min(kept)
    return (low / factor if low > 0.0 else low * factor), max(kept)


def _ceiling_widened(values: Iterable[float | None] | None, factor: float, floor: float = -np.inf,
                     cap: float = np.inf) -> tuple[float, float] | None:
    """min..max of the values given (None skipped), the max multiplied by factor, then raised to floor and lowered
    to cap; None without any value."""
    kept = _kept(values)
    return (min(kept), min(cap, max(max(kept) * factor, floor))) if kept else None


def _widened(rows: np.ndarray, margin: float) -> Ranges3:
    return tuple((float(rows[:, a].min() / margin), float(rows[:, a].max() * margin))  # type: ignore[return-value]
                 for a in range(rows.shape[1]))


def learn_plausibility(labels: Iterable[tuple[np.ndarray, Iterable[float]]], margin: float = DEFAULT_MARGIN,
                       input_margin: float = DEFAULT_INPUT_MARGIN,
                       skewness: Iterable[float] | None = None,
                       edge_sharpness: Iterable[float | None] | None = None,
                       interior_rank: Iterable[float | None] | None = None,
                       noise: Iterable[float | None] | None = None,
                       config: RangeConfig = RANGES,
                       contrast: Iterable[float | None] | None = None,
                       saturation: Iterable[float | None] | None = None) -> Plausibility:
    """Ranges from (label, spacing) pairs of training cases, widened by margin (input_margin for the scans);
    skewness, edge_sharpness, interior_rank, noise, contrast and saturation: the training scans' own, when their
    ranges are to be learned too."""
    measures, geometry = [], []
    for label, spacing in labels:
        spacing = tuple(spacing)
        geometry.append(scan_geometry(np.shape(label), spacing))
        measures.append(mask_measures(label, spacing))
    measures = [m for m in measures if m[0] > 0]
    if not measures:
        raise ValueError("no labelled foreground to learn a plausible atrium from")
    sharp = _kept(edge_sharpness)
    volumes = np.array([m[0] for m in measures])
    extents = np.array([m[1] for m in measures])
    return Plausibility(
        volume_ml=(float(volumes.min() / margin), float(volumes.max() * margin)),
        extent_mm=_widened(extents, margin),
        cases=len(measures), margin=margin,
        spacing_mm=_widened(np.array([g[0] for g in geometry]), input_margin),
        fov_mm=_widened(np.array([g[1] for g in geometry]), input_margin),
        input_margin=input_margin, skewness=_spread(skewness, config.skewness_margin, config.min_skewness_margin),
        edge_sharpness=(min(sharp) / input_margin, max(sharp) * input_margin) if sharp else None,
        interior_rank=_spread(interior_rank, config.rank_margin, config.min_rank_margin, 0.0, 1.0),
        noise_level=_ceiling_widened(noise, config.noise_margin),
        contrast=_floor_widened(contrast, config.contrast_margin),
        saturation=_ceiling_widened(saturation, config.saturation_margin, config.min_saturation, 1.0),
    )


def scans_plausibility(scans: Iterable[tuple[np.ndarray, np.ndarray, Iterable[float]]],
                       families: Iterable[str] | None = None) -> Plausibility:
    """Every learned range from training scans given as (image, label, spacing): the one list of what QC learns; with
    each scan's family (its dataset), the families' atrium atlases too."""
    scans = [(image, np.asarray(label), tuple(spacing)) for image, label, spacing in scans]
    # One scan at a time: what its measures share is kept only while they are taken.
    measured = [_scan_measures(ImageMeasures(image, label, spacing)) for image, label, spacing in scans]
    plausibility = learn_plausibility(((label, spacing) for _, label, spacing in scans),
                                      **{name: [m[name] for m in measured] for name in _LEARNED})
    if families is None:
        return plausibility
    atlases = learn_orientation_atlases((label, spacing, family)
                                        for (_, label, spacing), family in zip(scans, families, strict=True))
    return replace(plausibility, orientation_atlases=atlases)


# What learn_plausibility learns from the training scans, by its argument's name, and the ImageMeasures method.
_LEARNED = {"skewness": "skewness", "edge_sharpness": "sharpness", "interior_rank": "interior_rank",
            "noise": "noise_level", "contrast": "contrast", "saturation": "saturation"}


def _scan_measures(scan: ImageMeasures) -> dict[str, float | None]:
    return {name: getattr(scan, method)() for name, method in _LEARNED.items()}
