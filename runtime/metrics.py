"""Overlap and surface-distance metrics for binary 3D segmentation masks.

All distances are in millimetres and all volumes in millilitres; ``spacing``
is the voxel size in mm along each array axis (the same axis order as the
arrays, not necessarily x, y, z).

Surface voxels are foreground voxels with at least one 6-neighbour that is
background. Voxels outside the array count as background, so a mask that
touches the edge of the volume has a surface there.

Defined values for empty masks (never NaN for the ratios):

* both masks empty: dice = iou = precision = recall = 1, hd95 = assd = 0.
* prediction empty, reference not: dice = iou = precision = recall = 0,
  hd95 = assd = NaN.
* reference empty, prediction not: dice = iou = precision = recall = 0,
  hd95 = assd = NaN.

In short: precision with an empty prediction is 1.0 if the reference is also
empty, else 0.0; recall with an empty reference is 1.0 if the prediction is
also empty, else 0.0; surface distances are NaN when exactly one mask is empty
(there is no surface to measure to).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
from scipy import ndimage

__all__ = [
    "SegmentationMetrics",
    "compute_metrics",
    "degenerate_reason",
    "dice_score",
    "foreground_fraction",
    "summarize",
]


@dataclass(frozen=True)
class SegmentationMetrics:
    """Metrics of one predicted mask against one reference mask."""

    dice: float
    iou: float
    precision: float
    recall: float
    hd95_mm: float
    assd_mm: float
    volume_pred_ml: float
    volume_ref_ml: float

    def to_dict(self) -> dict[str, float | None]:
        """Return the metrics as plain floats, with NaN replaced by None."""
        return {
            key: (None if math.isnan(value) else float(value))
            for key, value in asdict(self).items()
        }


def _as_binary(mask: np.ndarray, name: str) -> np.ndarray:
    """Return ``mask`` as a bool array, rejecting values other than 0 and 1."""
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        return mask
    binary = mask != 0
    # A label map (e.g. values 0..3) passed by mistake would otherwise be
    # silently collapsed into one foreground class.
    if not np.array_equal(binary, mask == 1):
        raise ValueError(f"{name} must be a binary mask (values 0 and 1 only)")
    return binary


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Slices of the nonzero voxels' bounding box (from per-axis projections, no coordinate list)."""
    box = []
    for axis in range(mask.ndim):
        line = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(int(line[0]), int(line[-1]) + 1))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Return the foreground voxels that have a background 6-neighbour."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    # border_value=0 treats outside the array as background, so voxels on
    # the volume edge are surface voxels.
    eroded = ndimage.binary_erosion(mask, structure=structure, border_value=0)
    return mask & ~eroded


def _directed_distances(
    from_surface: np.ndarray, to_surface: np.ndarray, spacing: tuple[float, ...]
) -> np.ndarray:
    """Return the distance (mm) from each ``from_surface`` voxel to the nearest ``to_surface`` voxel."""
    distance_to = ndimage.distance_transform_edt(~to_surface, sampling=spacing)
    return distance_to[from_surface]


def compute_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float],
    voxel_volume_mm3: float | None = None,
) -> SegmentationMetrics:
    """Compare a binary prediction with a binary reference of the same shape.

    HD95 is the larger of the two directed 95th percentiles (prediction
    surface to reference surface, and reference to prediction), each taken
    with numpy's default linear interpolation. This is the MONAI
    ``compute_hausdorff_distance(percentile=95)`` convention; MedPy/nnU-Net
    instead take one percentile over both directed distance sets pooled,
    which can be smaller, never meaningfully larger. ASSD is the mean over
    both directed distance sets pooled (the MedPy convention).

    Volumes use ``voxel_volume_mm3`` when given (|det| of the affine's 3x3
    part, exact for sheared grids), else the product of ``spacing``.
    """
    pred_b = _as_binary(pred, "pred")
    ref_b = _as_binary(ref, "ref")
    if pred_b.shape != ref_b.shape:
        raise ValueError(
            f"pred and ref must have the same shape, got {pred_b.shape} and {ref_b.shape}"
        )
    spacing_t = tuple(float(s) for s in spacing)
    if len(spacing_t) != pred_b.ndim:
        raise ValueError(
            f"spacing has {len(spacing_t)} values but the masks have {pred_b.ndim} dimensions"
        )
    if not all(math.isfinite(s) and s > 0 for s in spacing_t):
        raise ValueError(f"spacing must be positive and finite, got {spacing_t}")

    n_pred = int(np.count_nonzero(pred_b))
    n_ref = int(np.count_nonzero(ref_b))
    n_both = int(np.count_nonzero(pred_b & ref_b))
    if voxel_volume_mm3 is not None and not (math.isfinite(voxel_volume_mm3) and voxel_volume_mm3 > 0):
        raise ValueError(f"voxel volume must be positive and finite, got {voxel_volume_mm3}")
    voxel_ml = (math.prod(spacing_t) if voxel_volume_mm3 is None else float(voxel_volume_mm3)) / 1000.0
    volume_pred_ml = n_pred * voxel_ml
    volume_ref_ml = n_ref * voxel_ml

    if n_pred == 0 and n_ref == 0:
        return SegmentationMetrics(1.0, 1.0, 1.0, 1.0, 0.0, 0.0, volume_pred_ml, volume_ref_ml)

    dice = 2.0 * n_both / (n_pred + n_ref)
    iou = n_both / (n_pred + n_ref - n_both)
    precision = n_both / n_pred if n_pred else 0.0
    recall = n_both / n_ref if n_ref else 0.0

    if n_pred == 0 or n_ref == 0:
        hd95 = assd = math.nan
    else:
        # Crop to the union's bounding box: the distance transforms get much
        # cheaper and stay exact, since every surface voxel is inside it. The
        # crop edge adds no false surface: a foreground voxel on the box edge
        # already has a background (or outside-volume) neighbour beyond it.
        crop = _bounding_box(pred_b | ref_b)
        pred_surface = _surface(pred_b[crop])
        ref_surface = _surface(ref_b[crop])
        pred_to_ref = _directed_distances(pred_surface, ref_surface, spacing_t)
        ref_to_pred = _directed_distances(ref_surface, pred_surface, spacing_t)
        hd95 = float(
            max(np.percentile(pred_to_ref, 95), np.percentile(ref_to_pred, 95))
        )
        assd = float(
            (pred_to_ref.sum() + ref_to_pred.sum()) / (pred_to_ref.size + ref_to_pred.size)
        )

    return SegmentationMetrics(
        dice=float(dice),
        iou=float(iou),
        precision=float(precision),
        recall=float(recall),
        hd95_mm=hd95,
        assd_mm=assd,
        volume_pred_ml=float(volume_pred_ml),
        volume_ref_ml=float(volume_ref_ml),
    )


def dice_score(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two binary masks, without the distance metrics (1.0 when both are empty)."""
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    return 1.0 if total == 0 else 2.0 * float(np.count_nonzero(np.logical_and(pred, ref))) / total


def foreground_fraction(mask: np.ndarray) -> float:
    """Return the fraction of voxels in ``mask`` that are non-zero (0.0 for an empty array)."""
    mask = np.asarray(mask)
    if mask.size == 0:
        return 0.0
    return np.count_nonzero(mask) / mask.size


def degenerate_reason(mask: np.ndarray, max_fraction: float | None = None) -> str | None:
    """Return why ``mask`` is not a plausible segmentation, or None if it looks fine."""
    mask = np.asarray(mask)
    n_fg = int(np.count_nonzero(mask))
    if n_fg == 0:
        return "empty"
    if n_fg == mask.size:
        return "all foreground"
    frac = n_fg / mask.size
    if max_fraction is not None and frac > max_fraction:
        return (
            f"implausibly large: {100 * frac:.1f} % of the scan "
            f"(limit {100 * max_fraction:.1f} %)"
        )
    return None


def summarize(rows: list[SegmentationMetrics]) -> dict[str, float]:
    """Return the mean of each metric over ``rows``, ignoring NaN (NaN if a metric is NaN in every row)."""
    if not rows:
        raise ValueError("summarize() needs at least one row")
    summary: dict[str, float] = {}
    for field in fields(SegmentationMetrics):
        values = np.array([getattr(row, field.name) for row in rows], dtype=np.float64)
        finite = values[~np.isnan(values)]
        summary[field.name] = float(finite.mean()) if finite.size else math.nan
    return summary
