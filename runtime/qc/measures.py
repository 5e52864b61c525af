"""What QC measures on a mask, its probabilities and its scan: plain functions of arrays, in physical units.

Training measures its labels and scans with the same functions (ranges.py), so that a scan at run time is
compared with the training scans measured the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import ndimage

from ..preprocess import mask_box

Box = tuple[np.ndarray, np.ndarray]
_CONNECTIVITY = np.ones((3, 3, 3), bool)
# Median absolute deviation of a normal distribution, in standard deviations.
_MAD_TO_SD = 1.4826
# The sd of the discrete Laplacian of unit white noise: sqrt(6 * 6 + 6 * 1).
_LAPLACE_GAIN = float(np.sqrt(42.0))


@dataclass(frozen=True)
class MeasureConfig:
    """Where and how finely the image measures look; the same in training and at run time."""

    # The interior is the mask deeper than this (the whole mask when none is); its surroundings are the voxels
    # outside it within this reach of its box.
    interior_depth_mm: float = 3.0
    surroundings_mm: float = 12.0
    # ... measured on every n-th voxel along an axis, n about this many mm over the voxel size (at least 1); the
    # depth is measured on those sparser voxels too.
    rank_voxel_mm: float = 2.0
    # Intensity skewness is measured on the voxels within this reach of the mask's box (its own included), on the
    # same sparser voxels: the atrium's neighbourhood, not the background a wider field of view adds (a wider reach
    # takes in more of it: 30 mm moved padded fold-0 scans by up to 1.0, 12 mm by under 0.2).
    skewness_mm: float = 12.0
    # Edge sharpness and noise are measured in a cube of this many voxels per side around the atrium's box centre.
    block: int = 48
    # The upper percentile of its derivatives: the edges, not the flat inside of organs.
    sharpness_percentile: float = 90.0
    # The noise is given relative to the cube's intensity spread between these percentiles, once blurred by this
    # sigma (voxels): the spread of the anatomy, which the noise itself would otherwise widen.
    spread_percentiles: tuple[float, float] = (5.0, 95.0)
    spread_blur_voxels: float = 1.5


MEASURES = MeasureConfig()


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


def bounding_slices(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Slices of the nonzero voxels' bounding box, or None when empty."""
    box = mask_box(mask)
    return None if box is None else tuple(slice(int(lo), int(hi)) for lo, hi in zip(*box))


def component_sizes(binary: np.ndarray) -> np.ndarray:
    """Voxel counts of the 26-connected foreground components, largest first."""
    labels, count = ndimage.label(binary, structure=_CONNECTIVITY)
    if count == 0:
        return np.zeros(0, np.int64)
    return np.sort(np.bincount(labels.ravel())[1:])[::-1]


def face_shares(mask: np.ndarray, box: Box | None = None, bounds: Box | None = None) -> tuple[float, float]:
    """(box share, scan-edge share): the largest share of the mask's cross-section on a face of box / of the array.

    Each share is the mask's area on one face over its largest cross-section along that axis: near 0
    when the mask only grazes the face, near 1 when the face cuts it. box is half-open, on mask's grid
    (floats allowed); a box face on the array's own edge counts for the scan edge only. bounds, the mask's own
    bounding box when the caller has it already, saves finding it again.
    """
    bounds = mask_box(mask) if bounds is None else bounds
    if bounds is None:
        return 0.0, 0.0
    crop = tuple(slice(int(lo), int(hi)) for lo, hi in zip(*bounds))
    inner = mask[crop]
    shape = mask.shape
    box_share = edge_share = 0.0
    for axis in range(3):
        profile = inner.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64)
        largest = float(profile.max())
        first, stop = crop[axis].start, crop[axis].stop

        def at(index: int) -> float:
            return float(profile[index - first]) / largest if first <= index < stop else 0.0

        edge_share = max(edge_share, at(0), at(shape[axis] - 1))
        if box is not None:
            lo = int(np.ceil(float(box[0][axis])))
            hi = int(np.floor(float(box[1][axis])))
            if lo > 0:
                box_share = max(box_share, at(lo))
            if hi < shape[axis]:
                box_share = max(box_share, at(hi - 1))
    return box_share, edge_share


class ImageMeasures:
    """The measures of a scan around one mask. What several of them share (the cube around the atrium and its
    Laplacian, the neighbourhood on sparser voxels, the interior and its surroundings, the noise) is computed once,
    when first needed: QC takes all of them per scan, training one at a time. bounds, the mask's bounding box when
    the caller has it already, saves finding it again."""

    def __init__(self, data: np.ndarray, mask: np.ndarray, spacing: Iterable[float] | None = None,
                 config: MeasureConfig = MEASURES, bounds: Box | None = None) -> None:
        self.data, self.mask, self.config = data, mask, config
        self.spacing = None if spacing is None else np.asarray(tuple(spacing), float)
        self._box = mask_box(mask) if bounds is None else bounds

    @cached_property
    def _cube(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The cube of block + 2 voxels a side around the centre of the mask's box, shifted inside the scan, and its
        Laplacian; None for an empty mask or a scan under 5 voxels a side."""
        if self._box is None:
            return None
        size = self.config.block + 2
        highest = np.maximum(np.asarray(self.data.shape) - size, 0)
        lo = np.clip((self._box[0] + self._box[1]) // 2 - size // 2, 0, highest)
        cube = np.asarray(self.data[tuple(slice(int(a), int(a) + size) for a in lo)], np.float32)
        return None if min(cube.shape) < 5 else (cube, ndimage.laplace(cube))

    def _neighbourhood(self, reach_mm: float) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """The slices of the mask's box widened by reach_mm (within the array) on every n-th voxel (n about
        rank_voxel_mm over the voxel size), and n per axis; None for an empty mask."""
        if self._box is None:
            return None
        reach = np.ceil(reach_mm / self.spacing).astype(int)
        lo = np.maximum(np.asarray(self._box[0]) - reach, 0)
        hi = np.minimum(np.asarray(self._box[1]) + reach, np.asarray(self.mask.shape))
        # Sparser voxels keep QC's cost a few milliseconds on 0.6 mm scans; a median over thousands of voxels hardly
        # moves.
        step = np.maximum(1, np.round(self.config.rank_voxel_mm / self.spacing)).astype(int)
        return tuple(slice(int(a), int(b), int(n)) for a, b, n in zip(lo, hi, step)), step

    @cached_property
    def _near(self) -> np.ndarray | None:
        """The intensities within skewness_mm of the mask's box, on sparser voxels (float64, flat); None for an empty
        mask."""
        found = self._neighbourhood(self.config.skewness_mm)
        return None if found is None else np.asarray(self.data[found[0]]).astype(np.float64).ravel()

    @cached_property
    def _regions(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The intensities of the mask's interior (deeper than interior_depth_mm, the whole mask when none is) and of
        its surroundings (outside it, within surroundings_mm of its box), on sparser voxels; None when either is
        empty."""
        found = self._neighbourhood(self.config.surroundings_mm)
        if found is None:
            return None
        crop, step = found
        inside = np.asarray(self.mask[crop]).astype(bool)
        values = np.asarray(self.data[crop])
        around = values[~inside]
        if around.size == 0 or not inside.any():
            return None
        deep = ndimage.distance_transform_edt(inside, sampling=self.spacing * step) > self.config.interior_depth_mm
        return (values[deep] if deep.any() else values[inside]), around

    @cached_property
    def _sigma(self) -> float | None:
        """noise_sigma, computed once."""
        # The Laplacian is 6 x (the mean of a voxel's 6 face neighbours minus the voxel): a high-pass residual, in
        # which white noise of sd s has sd s * sqrt(36 + 6). Anatomy is smooth at this scale except at edges, a
        # minority of the cube that the median absolute deviation does not see.
        if self._cube is None:
            return None
        residual = self._cube[1][(slice(1, -1),) * 3]
        return _MAD_TO_SD * float(np.median(np.abs(residual - np.median(residual)))) / _LAPLACE_GAIN

    def skewness(self) -> float | None:
        """Skewness of the intensities within skewness_mm of the mask's box (unchanged by scale and offset, and by the
        background a wider field of view adds); None for an empty mask."""
        sample = self._near
        if sample is None:
            return None
        # Two moments in numpy: importing scipy.stats for them would cost the runtime more than half a second.
        centred = sample - sample.mean()
        squared = centred * centred
        variance = float(squared.mean())
        if not variance > 0.0:
            return 0.0
        return float(np.dot(squared, centred) / sample.size / variance**1.5)

    def saturation(self) -> float | None:
        """Share of the intensities within skewness_mm of the mask's box at their maximum (a scan clipped below its
        blood pool's brightness holds much of it there); None for an empty mask."""
        sample = self._near
        return None if sample is None or sample.size == 0 else float(np.mean(sample >= sample.max()))

    def sharpness(self) -> float | None:
        """Edge sharpness: an upper percentile of the cube's Laplacian over that of its gradient; None without a cube
        or for a cube without edges."""
        # A blurred edge of width w voxels has a gradient ~ contrast / w and a Laplacian ~ contrast / w^2: their ratio
        # is about 1 / w whatever the tissues' contrast and the intensity scale, once edges fill a tenth of the cube.
        # Noise added after a blur raises it (the Laplacian amplifies noise): such a scan can read as sharp.
        # Derivatives on the cube's faces are one-sided, so only its inside is measured.
        if self._cube is None:
            return None
        cube, laplace = self._cube
        inside = (slice(1, -1),) * 3
        gradient = np.sqrt(sum(g * g for g in np.gradient(cube)))[inside]
        edges = float(np.percentile(gradient, self.config.sharpness_percentile))
        if not edges > 0.0:
            return None
        curvature = float(np.percentile(np.abs(laplace[inside]), self.config.sharpness_percentile))
        # A cube without curvature (a plain ramp) has no edge whose width could be measured.
        return curvature / edges if curvature > 0.0 else None

    def noise_sigma(self) -> float | None:
        """Noise sd of the cube in the scan's own units, from the median absolute deviation of its Laplacian; None
        without a cube."""
        return self._sigma

    def noise_level(self) -> float | None:
        """noise_sigma over the intensity spread of the cube once blurred (unchanged by scale and offset; grows with
        the noise without bound); None as noise_sigma or for a flat cube."""
        sigma = self.noise_sigma()
        if sigma is None:
            return None
        cube = self._cube[0]  # type: ignore[index]
        low, high = np.percentile(ndimage.gaussian_filter(cube, self.config.spread_blur_voxels),
                                  self.config.spread_percentiles)
        return sigma / float(high - low) if high > low else None

    def interior_rank(self) -> float | None:
        """Share of the surroundings darker than the median of the interior (ties count half), or None."""
        # A rank, not a difference of means: unchanged by any monotone change of the intensities (uint8, int16,
        # float, z-scored, gamma), and not swayed by a few bright or dark voxels. Ties count half, so that a clipped
        # or 8-bit scan, where much of the surroundings can equal the blood's value, reads like the same scan stored
        # as float.
        regions = self._regions
        if regions is None:
            return None
        interior, around = regions
        median = np.median(interior)
        darker = np.count_nonzero(around < median) + 0.5 * np.count_nonzero(around == median)
        return float(darker) / around.size

    def contrast(self) -> float | None:
        """The median of the interior minus that of the surroundings, over noise_sigma: a contrast-to-noise ratio,
        unchanged by scale and offset; None as interior_rank, or for a scan without noise."""
        # Both a noisier and a flatter scan lower it; a blurred one raises it (the blur removes noise), which soft
        # edges catch instead.
        regions = self._regions
        sigma = self._sigma if regions is not None else None
        if regions is None or sigma is None or not sigma > 0.0:
            return None
        interior, around = regions
        return float(np.median(interior) - np.median(around)) / sigma


def intensity_skewness(data: np.ndarray, mask: np.ndarray, spacing: Iterable[float],
                       config: MeasureConfig = MEASURES) -> float | None:
    """Skewness of a scan's intensities within skewness_mm of a mask's box, on sparser voxels (unchanged by scale and
    offset, and by the background a wider field of view adds); None for an empty mask."""
    return ImageMeasures(data, mask, spacing, config).skewness()


def saturation(data: np.ndarray, mask: np.ndarray, spacing: Iterable[float],
               config: MeasureConfig = MEASURES) -> float | None:
    """Share of a scan's intensities within skewness_mm of a mask's box at their maximum, on sparser voxels; None for
    an empty mask."""
    return ImageMeasures(data, mask, spacing, config).saturation()


def image_sharpness(data: np.ndarray, mask: np.ndarray, config: MeasureConfig = MEASURES) -> float | None:
    """Edge sharpness around a mask, in a cube around the centre of its box (ImageMeasures.sharpness); None for an
    empty mask, a scan under 5 voxels a side or a cube without edges."""
    return ImageMeasures(data, mask, None, config).sharpness()


def noise_sigma(data: np.ndarray, mask: np.ndarray, config: MeasureConfig = MEASURES) -> float | None:
    """The scan's noise sd in its own intensity units, in the cube around the mask's box centre (white Gaussian
    noise of sd s reads s); None for an empty mask or a scan under 5 voxels a side."""
    return ImageMeasures(data, mask, None, config).noise_sigma()


def noise_level(data: np.ndarray, mask: np.ndarray, config: MeasureConfig = MEASURES) -> float | None:
    """noise_sigma over the intensity spread of the same cube once blurred (unchanged by scale and offset; grows
    with the noise without bound); None as noise_sigma or for a flat cube."""
    return ImageMeasures(data, mask, None, config).noise_level()


def interior_rank(data: np.ndarray, mask: np.ndarray, spacing: Iterable[float],
                  config: MeasureConfig = MEASURES) -> float | None:
    """Share of the voxels around a mask that are darker than the median of its interior (ties count half), or None:
    around is outside the mask, within surroundings_mm of its box; the interior, deeper than interior_depth_mm."""
    return ImageMeasures(data, mask, spacing, config).interior_rank()


def interior_contrast(data: np.ndarray, mask: np.ndarray, spacing: Iterable[float],
                      config: MeasureConfig = MEASURES) -> float | None:
    """The median of a mask's interior minus that of its surroundings (as interior_rank's), over the scan's noise
    sd (noise_sigma): a contrast-to-noise ratio, unchanged by scale and offset; None as interior_rank, or for a
    scan without noise."""
    return ImageMeasures(data, mask, spacing, config).contrast()
