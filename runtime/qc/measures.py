"""What QC measures on a mask, its probabilities and its scan: plain functions of arrays, in physical units.

Training measures its labels and scans with the same functions (ranges.py), so that a scan at run time is
compared with the training scans measured the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

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


def face_shares(mask: np.ndarray, box: Box | None = None) -> tuple[float, float]:
    """(box share, scan-edge share): the largest share of the mask's cross-section on a face of box / of the array.

    Each share is the mask's area on one face over its largest cross-section along that axis: near 0
    when the mask only grazes the face, near 1 when the face cuts it. box is half-open, on mask's grid
    (floats allowed); a box face on the array's own edge counts for the scan edge only.
    """
    crop = bounding_slices(mask)
    if crop is None:
        return 0.0, 0.0
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


def _centre_cube(data: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray | None:
    """A cube of size voxels a side around the centre of the mask's box, shifted inside the scan (float32);
    None for an empty mask."""
    box = mask_box(mask)
    if box is None:
        return None
    lo = np.clip((box[0] + box[1]) // 2 - size // 2, 0, np.maximum(np.asarray(data.shape) - size, 0))
    return np.asarray(data[tuple(slice(int(a), int(a) + size) for a in lo)], np.float32)


def image_sharpness(data: np.ndarray, mask: np.ndarray, config: MeasureConfig = MEASURES) -> float | None:
    """Edge sharpness around a mask: an upper percentile of the intensities' Laplacian over that of their gradient,
    in a cube around the centre of the mask's box; None for an empty mask, a scan under 5 voxels a side or a cube
    without edges."""
    # A blurred edge of width w voxels has a gradient ~ contrast / w and a Laplacian ~ contrast / w^2: their ratio is
    # about 1 / w whatever the tissues' contrast and the intensity scale, once edges fill a tenth of the cube.
    # Noise added after a blur raises it (the Laplacian amplifies noise): such a scan can read as sharp.
    # The cube and one voxel around it: derivatives on its faces are one-sided, so only the inside is measured.
    cube = _centre_cube(data, mask, config.block + 2)
    if cube is None or min(cube.shape) < 5:
        return None
    inside = (slice(1, -1),) * 3
    gradient = np.sqrt(sum(g * g for g in np.gradient(cube)))[inside]
    edges = float(np.percentile(gradient, config.sharpness_percentile))
    if not edges > 0.0:
        return None
    curvature = float(np.percentile(np.abs(ndimage.laplace(cube))[inside], config.sharpness_percentile))
    # A cube without curvature (a plain ramp) has no edge whose width could be measured.
    return curvature / edges if curvature > 0.0 else None


def _cube_noise(cube: np.ndarray) -> float:
    """Noise sd of a cube (float32, at least 3 voxels a side) from the median absolute deviation of its Laplacian."""
    # The Laplacian is 6 x (the mean of a voxel's 6 face neighbours minus the voxel): a high-pass residual, in which
    # white noise of sd s has sd s * sqrt(36 + 6). Anatomy is smooth at this scale except at edges, a minority of
    # the cube that the median absolute deviation does not see.
    residual = ndimage.laplace(cube)[(slice(1, -1),) * 3]
    mad = float(np.median(np.abs(residual - np.median(residual))))
    return _MAD_TO_SD * mad / _LAPLACE_GAIN


def noise_sigma(data: np.ndarray, mask: np.ndarray, config: MeasureConfig = MEASURES) -> float | None:
    """The scan's noise sd in its own intensity units, in the cube around the mask's box centre (white Gaussian
    noise of sd s reads s); None for an empty mask or a scan under 5 voxels a side."""
    cube = _centre_cube(data, mask, config.block + 2)
    return None if cube is None or min(cube.shape) < 5 else _cube_noise(cube)


def noise_level(data: np.ndarray, mask: np.ndarray, config: MeasureConfig = MEASURES) -> float | None:
    """noise_sigma over the intensity spread of the same cube once blurred (unchanged by scale and offset; grows
    with the noise without bound); None as noise_sigma or for a flat cube."""
    cube = _centre_cube(data, mask, config.block + 2)
    if cube is None or min(cube.shape) < 5:
        return None
    low, high = np.percentile(ndimage.gaussian_filter(cube, config.spread_blur_voxels), config.spread_percentiles)
    return _cube_noise(cube) / float(high - low) if high > low else None


def interior_rank(data: np.ndarray, mask: np.ndarray, spacing: Iterable[float],
                  config: MeasureConfig = MEASURES) -> float | None:
    """Share of the voxels around a mask that are darker than the median of its interior (ties count half), or None."""
    # Around: outside the mask, within surroundings_mm of its box; interior: deeper than interior_depth_mm. A rank,
    # not a difference of means: unchanged by any monotone change of the intensities (uint8, int16, float, z-scored,
    # gamma), and not swayed by a few bright or dark voxels. Ties count half, so that a clipped or 8-bit scan, where
    # much of the surroundings can equal the blood's value, reads like the same scan stored as float.
    box = mask_box(mask)
    if box is None:
        return None
    spacing = np.asarray(tuple(spacing), float)
    reach = np.ceil(config.surroundings_mm / spacing).astype(int)
    lo = np.maximum(np.asarray(box[0]) - reach, 0)
    hi = np.minimum(np.asarray(box[1]) + reach, np.asarray(mask.shape))
    # Sparser voxels keep QC's cost a few milliseconds on 0.6 mm scans; a rank over thousands of voxels hardly moves.
    step = np.maximum(1, np.round(config.rank_voxel_mm / spacing)).astype(int)
    crop = tuple(slice(int(a), int(b), int(n)) for a, b, n in zip(lo, hi, step))
    inside = np.asarray(mask[crop]).astype(bool)
    values = np.asarray(data[crop])
    around = values[~inside]
    if around.size == 0 or not inside.any():
        return None
    deep = ndimage.distance_transform_edt(inside, sampling=spacing * step) > config.interior_depth_mm
    median = np.median(values[deep] if deep.any() else values[inside])
    darker = np.count_nonzero(around < median) + 0.5 * np.count_nonzero(around == median)
    return float(darker) / around.size
