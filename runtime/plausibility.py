"""What a plausible left-atrium mask looks like, in physical units learned from training labels.

The ranges are the training labels' own (volume in mL; the mask's extents in mm, sorted so that
they do not depend on which array axis is which) widened by a margin. Calibration refuses a
threshold whose masks leave them, and QC flags such masks.

The scans' own voxel sizes and fields of view (sorted, in mm) are learned too, widened by the input
margin: QC asks for a review of a scan whose geometry the model never saw. So is the skewness of the
scans' intensities (bright blood on a darker background skews right; inverting the intensities flips
its sign): a scan outside the learned range has a contrast the model never saw. And so is the
edge sharpness around the atrium, about the inverse of an edge's width in voxels: a blurred scan has
softer edges than any the model saw, while a scan stored at coarser voxels stays sharp at its own scale.

And so is how bright the atrium's interior is among its surroundings: the share of the voxels around a
mask that are darker than the median of its interior. Blood fills the atrium, and in both bSSFP and
LGE it is brighter than most of what lies around it; a mask whose inside is darker than most of its
surroundings has found another structure, or a scan of a contrast the model never saw (such as inverted
intensities, which a whole-scan skewness misses on crops around the atrium).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

from .metrics import degenerate_reason
from .preprocess import mask_box

# Margin around the training labels' range: a factor on the extremes (low / factor, high * factor).
DEFAULT_MARGIN = 1.5
# Margin around the training scans' voxel sizes and fields of view, the same way.
DEFAULT_INPUT_MARGIN = 1.5

# The learned skewness range is widened on each side by this share of its width, and at least by the floor.
SKEWNESS_MARGIN = 0.25
MIN_SKEWNESS_MARGIN = 0.5

# The interior is the mask deeper than this (the whole mask when none is); its surroundings are the voxels
# outside it within this reach of its box.
INTERIOR_DEPTH_MM = 3.0
SURROUNDINGS_MM = 12.0
# ... measured on every n-th voxel along an axis, n about this many mm over the voxel size (at least 1); the depth
# is measured on those sparser voxels too, the same way in training and in QC.
RANK_VOXEL_MM = 2.0
# The learned interior-rank range is widened on each side by this share of its width, and at least by the floor;
# only its lower end is checked.
RANK_MARGIN = 0.25
MIN_RANK_MARGIN = 0.05

# Edge sharpness is measured in a cube of this many voxels per side around the atrium's box centre.
SHARPNESS_BLOCK = 48
# The upper percentile of its derivatives: the edges, not the flat inside of organs.
SHARPNESS_PERCENTILE = 90.0

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

    def __post_init__(self) -> None:
        object.__setattr__(self, "volume_ml", tuple(float(v) for v in self.volume_ml))
        object.__setattr__(self, "extent_mm", _ranges(self.extent_mm))
        object.__setattr__(self, "spacing_mm", _ranges(self.spacing_mm))
        object.__setattr__(self, "fov_mm", _ranges(self.fov_mm))
        for name in ("skewness", "edge_sharpness", "interior_rank"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))

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


def scan_geometry(shape: Iterable[int], spacing: Iterable[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """A scan's voxel sizes and field of view in mm, each sorted smallest first."""
    spacing = np.asarray(tuple(spacing), float)
    fov = np.asarray(tuple(shape), float) * spacing
    return tuple(float(v) for v in np.sort(spacing)), tuple(float(v) for v in np.sort(fov))


def intensity_skewness(data: np.ndarray) -> float:
    """Skewness of a scan's intensities, from every third voxel along each axis (unchanged by scale and offset)."""
    # Two moments in numpy: importing scipy.stats for them would cost the runtime more than half a second.
    sample = np.asarray(data)[::3, ::3, ::3].astype(np.float64).ravel()
    centred = sample - sample.mean()
    squared = centred * centred
    variance = float(squared.mean())
    if not variance > 0.0:
        return 0.0
    return float(np.dot(squared, centred) / sample.size / variance**1.5)


def image_sharpness(data: np.ndarray, mask: np.ndarray) -> float | None:
    """Edge sharpness around a mask: an upper percentile of the intensities' Laplacian over that of their gradient,
    in a cube around the centre of the mask's box; None for an empty mask, a scan under 5 voxels a side or a cube
    without edges."""
    # A blurred edge of width w voxels has a gradient ~ contrast / w and a Laplacian ~ contrast / w^2: their ratio is
    # about 1 / w whatever the tissues' contrast and the intensity scale, once edges fill a tenth of the cube.
    # Noise added after a blur raises it (the Laplacian amplifies noise): such a scan can read as sharp.
    box = mask_box(mask)
    if box is None:
        return None
    # The cube and one voxel around it, shifted inside the scan; derivatives on its faces are one-sided, so only
    # the inside is measured.
    size = SHARPNESS_BLOCK + 2
    lo = np.clip((box[0] + box[1]) // 2 - size // 2, 0, np.maximum(np.asarray(data.shape) - size, 0))
    cube = np.asarray(data[tuple(slice(int(a), int(a) + size) for a in lo)], np.float32)
    if min(cube.shape) < 5:
        return None
    inside = (slice(1, -1),) * 3
    gradient = np.sqrt(sum(g * g for g in np.gradient(cube)))[inside]
    edges = float(np.percentile(gradient, SHARPNESS_PERCENTILE))
    if not edges > 0.0:
        return None
    curvature = float(np.percentile(np.abs(ndimage.laplace(cube))[inside], SHARPNESS_PERCENTILE))
    # A cube without curvature (a plain ramp) has no edge whose width could be measured.
    return curvature / edges if curvature > 0.0 else None


def interior_rank(data: np.ndarray, mask: np.ndarray, spacing: Iterable[float]) -> float | None:
    """Share of the voxels around a mask that are darker than the median of its interior (ties count half), or None."""
    # Around: outside the mask, within SURROUNDINGS_MM of its box; interior: deeper than INTERIOR_DEPTH_MM. A rank,
    # not a difference of means: unchanged by any monotone change of the intensities (uint8, int16, float, z-scored,
    # gamma), and not swayed by a few bright or dark voxels. Ties count half, so that a clipped or 8-bit scan, where
    # much of the surroundings can equal the blood's value, reads like the same scan stored as float.
    box = mask_box(mask)
    if box is None:
        return None
    spacing = np.asarray(tuple(spacing), float)
    reach = np.ceil(SURROUNDINGS_MM / spacing).astype(int)
    lo = np.maximum(np.asarray(box[0]) - reach, 0)
    hi = np.minimum(np.asarray(box[1]) + reach, np.asarray(mask.shape))
    # Sparser voxels keep QC's cost a few milliseconds on 0.6 mm scans; a rank over thousands of voxels hardly moves.
    step = np.maximum(1, np.round(RANK_VOXEL_MM / spacing)).astype(int)
    crop = tuple(slice(int(a), int(b), int(n)) for a, b, n in zip(lo, hi, step))
    inside = np.asarray(mask[crop]).astype(bool)
    values = np.asarray(data[crop])
    around = values[~inside]
    if around.size == 0 or not inside.any():
        return None
    deep = ndimage.distance_transform_edt(inside, sampling=spacing * step) > INTERIOR_DEPTH_MM
    median = np.median(values[deep] if deep.any() else values[inside])
    darker = np.count_nonzero(around < median) + 0.5 * np.count_nonzero(around == median)
    return float(darker) / around.size


def _spread(values: Iterable[float | None] | None, share: float, floor: float,
            lo: float = -np.inf, hi: float = np.inf) -> tuple[float, float] | None:
    """min..max of the values given (None skipped) widened on each side by max(floor, share x width), clipped to
    [lo, hi]; None without any value."""
    kept = [float(v) for v in values if v is not None] if values is not None else []
    if not kept:
        return None
    low, high = min(kept), max(kept)
    widen = max(floor, share * (high - low))
    return max(lo, low - widen), min(hi, high + widen)


def _widened(rows: np.ndarray, margin: float) -> Ranges3:
    return tuple((float(rows[:, a].min() / margin), float(rows[:, a].max() * margin))  # type: ignore[return-value]
                 for a in range(rows.shape[1]))


def learn_plausibility(labels: Iterable[tuple[np.ndarray, Iterable[float]]], margin: float = DEFAULT_MARGIN,
                       input_margin: float = DEFAULT_INPUT_MARGIN,
                       skewness: Iterable[float] | None = None,
                       edge_sharpness: Iterable[float | None] | None = None,
                       interior_rank: Iterable[float | None] | None = None) -> Plausibility:
    """Ranges from (label, spacing) pairs of training cases, widened by margin (input_margin for the scans);
    skewness, edge_sharpness and interior_rank: the training scans' own, when their ranges are to be learned too."""
    measures, geometry = [], []
    for label, spacing in labels:
        spacing = tuple(spacing)
        geometry.append(scan_geometry(np.shape(label), spacing))
        measures.append(mask_measures(label, spacing))
    measures = [m for m in measures if m[0] > 0]
    if not measures:
        raise ValueError("no labelled foreground to learn a plausible atrium from")
    sharp_range = None
    if edge_sharpness is not None and len(values := [float(v) for v in edge_sharpness if v is not None]):
        sharp_range = (min(values) / input_margin, max(values) * input_margin)
    volumes = np.array([m[0] for m in measures])
    extents = np.array([m[1] for m in measures])
    return Plausibility(
        volume_ml=(float(volumes.min() / margin), float(volumes.max() * margin)),
        extent_mm=_widened(extents, margin),
        cases=len(measures), margin=margin,
        spacing_mm=_widened(np.array([g[0] for g in geometry]), input_margin),
        fov_mm=_widened(np.array([g[1] for g in geometry]), input_margin),
        input_margin=input_margin, skewness=_spread(skewness, SKEWNESS_MARGIN, MIN_SKEWNESS_MARGIN),
        edge_sharpness=sharp_range,
        interior_rank=_spread(interior_rank, RANK_MARGIN, MIN_RANK_MARGIN, 0.0, 1.0),
    )


def scans_plausibility(scans: Iterable[tuple[np.ndarray, np.ndarray, Iterable[float]]]) -> Plausibility:
    """Every learned range from training scans given as (image, label, spacing): the one list of what QC learns."""
    scans = [(image, np.asarray(label), tuple(spacing)) for image, label, spacing in scans]
    return learn_plausibility(((label, spacing) for _, label, spacing in scans),
                              skewness=[intensity_skewness(image) for image, _, _ in scans],
                              edge_sharpness=[image_sharpness(image, label) for image, label, _ in scans],
                              interior_rank=[interior_rank(image, label, spacing) for image, label, spacing in scans])


def input_reasons(shape: Iterable[int], spacing: Iterable[float], plausibility: Plausibility,
                  skewness: float | None = None, edge_sharpness: float | None = None,
                  interior_rank: float | None = None) -> list[str]:
    """Why a scan's voxel size, field of view, intensity skewness, edge sharpness or the brightness of the mask's
    interior among its surroundings is outside what the model trained on."""
    spacing_sorted, fov_sorted = scan_geometry(shape, spacing)
    reasons = []
    for what, values, ranges in (("voxel size", spacing_sorted, plausibility.spacing_mm),
                                 ("field of view", fov_sorted, plausibility.fov_mm)):
        if ranges is None:
            continue
        for name, value, (lo, hi) in zip(("smallest", "middle", "largest"), values, ranges):
            if not lo <= value <= hi:
                digits = 2 if what == "voxel size" else 0
                reasons.append(f"{name} {what} {value:.{digits}f} mm outside the trained {lo:.{digits}f}-"
                               f"{hi:.{digits}f} mm")
    if skewness is not None and plausibility.skewness is not None:
        lo, hi = plausibility.skewness
        if not lo <= skewness <= hi:
            reasons.append(f"intensity skewness {skewness:.2f} outside the trained {lo:.2f} to {hi:.2f} "
                           f"(inverted or unfamiliar contrast)")
    # Only soft edges are flagged: coarser voxels and noise both raise edge sharpness, and the model copes with both.
    limits = plausibility.edge_sharpness
    if edge_sharpness is not None and limits is not None and edge_sharpness < limits[0]:
        reasons.append(f"edge sharpness {edge_sharpness:.2f} below the trained {limits[0]:.2f} (blurred, or "
                       f"interpolated to finer voxels than acquired)")
    # Only a dark interior is flagged: a blood pool brighter than everything around it is what the model expects.
    limits = plausibility.interior_rank
    if interior_rank is not None and limits is not None and interior_rank < limits[0]:
        reasons.append(f"the mask's interior is brighter than only {100 * interior_rank:.0f} % of its surroundings, "
                       f"below the trained {100 * limits[0]:.0f} % (inverted contrast, or not the blood pool)")
    return reasons


def implausible_reasons(mask: np.ndarray, spacing: Iterable[float], plausibility: Plausibility,
                        voxel_volume_mm3: float | None = None) -> list[str]:
    """Why a non-empty mask is outside the plausible ranges (empty list: plausible)."""
    return measure_reasons(*mask_measures(mask, spacing, voxel_volume_mm3), plausibility)


def measure_reasons(volume: float, extents: Iterable[float], plausibility: Plausibility) -> list[str]:
    """Why a mask of this volume (mL) and these sorted extents (mm) is outside the plausible ranges."""
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
