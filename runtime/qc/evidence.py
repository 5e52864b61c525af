"""Everything QC's rules look at, measured once per mask into one record."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..metrics import degenerate_reason
from ..preprocess import mask_box
from .measures import Box, ImageMeasures, bounding_slices, component_sizes, face_shares, mask_measures, scan_geometry
from .orientation import OrientationMatch, orientation_evidence
from .ranges import Plausibility


@dataclass(frozen=True)
class Evidence:
    """What was measured on one mask (and its probabilities and scan); None where it was not measured.

    The mask's own measures are only taken for a mask that is not degenerate and a model with learned ranges;
    the image measures only with the scan, and only those the model has a learned range for.
    """

    degenerate: str | None = None
    score: float | None = None
    volume_ml: float | None = None
    extents_mm: tuple[float, float, float] | None = None
    component_voxels: tuple[int, ...] | None = None
    voxel_ml: float | None = None
    box_border_share: float | None = None
    scan_edge_share: float | None = None
    spacing_mm: tuple[float, ...] | None = None
    fov_mm: tuple[float, ...] | None = None
    skewness: float | None = None
    edge_sharpness: float | None = None
    interior_rank: float | None = None
    noise_level: float | None = None
    contrast: float | None = None
    saturation: float | None = None
    orientation: OrientationMatch | None = None

    @property
    def largest_share(self) -> float | None:
        """The kept (largest) component's share of the thresholded foreground, None without components."""
        sizes = self.component_voxels
        return float(sizes[0]) / float(np.sum(sizes)) if sizes else None

    def measures(self) -> dict[str, Any]:
        """The JSON-able measures a QC report records."""
        out: dict[str, Any] = {"score": self.score}
        if self.volume_ml is None:
            return out
        sizes = self.component_voxels or ()
        out.update(volume_ml=self.volume_ml, extents_mm=list(self.extents_mm or ()), components=len(sizes),
                   component_ml=[float(n) * float(self.voxel_ml or 0.0) for n in sizes[:3]])
        if sizes:
            out["largest_share"] = self.largest_share
        out.update(box_border_share=self.box_border_share, scan_edge_share=self.scan_edge_share,
                   spacing_mm=list(self.spacing_mm or ()), fov_mm=list(self.fov_mm or ()), skewness=self.skewness,
                   edge_sharpness=self.edge_sharpness, interior_rank=self.interior_rank,
                   noise_level=self.noise_level, contrast=self.contrast, saturation=self.saturation)
        if self.orientation is not None:
            out["orientation"] = self.orientation.to_dict()
        return out


def mask_evidence(mask: np.ndarray, spacing: Iterable[float], voxel_volume_mm3: float | None = None,
                  prob: np.ndarray | None = None, threshold: float | None = None,
                  box: Box | None = None, bounds: Box | None = None) -> dict[str, Any]:
    """The mask's own measures: volume and extents (within the box of prob above threshold when given, else of the
    mask), the components of prob above threshold when given, and the mask's share on box's and the scan's faces;
    bounds, the mask's bounding box when the caller has it, saves finding it again."""
    spacing = tuple(float(s) for s in spacing)
    bounds = mask_box(mask) if bounds is None else bounds
    if prob is None or threshold is None:
        above = np.asarray(mask).astype(bool)
        crop = None if bounds is None else tuple(slice(int(lo), int(hi)) for lo, hi in zip(*bounds))
    else:
        above = prob > float(threshold)
        crop = bounding_slices(above)
    region = mask[crop] if crop is not None else mask
    volume, extents = mask_measures(region, spacing, voxel_volume_mm3)
    sizes = None
    if prob is not None and threshold is not None:
        sizes = tuple(int(n) for n in component_sizes(above[crop])) if crop is not None else ()
    box_share, edge_share = face_shares(mask, box, bounds)
    return dict(volume_ml=volume, extents_mm=extents, component_voxels=sizes,
                voxel_ml=float(np.prod(spacing) if voxel_volume_mm3 is None else voxel_volume_mm3) / 1000.0,
                box_border_share=box_share if box is not None else None, scan_edge_share=edge_share)


def image_evidence(image: np.ndarray | None, mask: np.ndarray, spacing: Iterable[float],
                   ranges: Plausibility, bounds: Box | None = None) -> dict[str, Any]:
    """The scan's measures around the mask: its geometry always; with the image, those it has a learned range for
    (a measure nothing judges is not worth its cost); bounds as mask_evidence's."""
    spacing_sorted, fov_sorted = scan_geometry(mask.shape, spacing)
    found: dict[str, Any] = dict(spacing_mm=spacing_sorted, fov_mm=fov_sorted)
    if image is not None:
        scan = ImageMeasures(image, mask, spacing, bounds=bounds)
        # Only those with a learned range: a measure nothing judges is not worth its cost.
        for name, measure in (("skewness", scan.skewness), ("edge_sharpness", scan.sharpness),
                              ("interior_rank", scan.interior_rank), ("noise_level", scan.noise_level),
                              ("contrast", scan.contrast), ("saturation", scan.saturation)):
            found[name] = measure() if getattr(ranges, name) is not None else None
    return found


def shape_evidence(mask: np.ndarray, spacing: Iterable[float], ranges: Plausibility,
                   bounds: Box | None = None) -> dict[str, Any]:
    """How the mask's shape fits the training families' atria as given and permuted or mirrored, when the model has
    their atlases; bounds as mask_evidence's."""
    atlases = ranges.orientation_atlases
    return dict(orientation=orientation_evidence(mask, spacing, atlases, bounds) if atlases is not None else None)


def gather(mask: np.ndarray, spacing: Iterable[float], ranges: Plausibility | None, *,
           max_fraction: float | None = None, score: float | None = None, prob: np.ndarray | None = None,
           threshold: float | None = None, box: Box | None = None, voxel_volume_mm3: float | None = None,
           image: np.ndarray | None = None, orientation: bool = True) -> Evidence:
    """The evidence on one mask: whether it is degenerate; for a model with learned ranges and a mask that is not,
    the mask's measures (components of prob above threshold when given), the scan's and (orientation) how its shape
    fits the training atria."""
    degenerate = degenerate_reason(mask, max_fraction)
    if ranges is None or degenerate is not None:
        return Evidence(degenerate=degenerate, score=score)
    spacing = tuple(float(s) for s in spacing)
    # The mask's bounding box, found once for every measure that needs it (a whole-grid pass each).
    bounds = mask_box(mask)
    return Evidence(degenerate=None, score=score,
                    **mask_evidence(mask, spacing, voxel_volume_mm3, prob, threshold, box, bounds),
                    **image_evidence(image, mask, spacing, ranges, bounds),
                    **(shape_evidence(mask, spacing, ranges, bounds) if orientation else {}))
