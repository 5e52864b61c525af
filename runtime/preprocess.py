"""Preprocessing shared by training and inference: orientation, resampling, normalisation, crops."""

from __future__ import annotations

from dataclasses import dataclass

import nibabel.orientations as nio
import numpy as np
from scipy import ndimage

from .errors import InputError
from .image import Volume, voxel_sizes


@dataclass
class CanonicalVolume:
    """A volume reoriented to the model's axis order, and how to undo that."""

    data: np.ndarray
    spacing: tuple[float, float, float]
    transform: np.ndarray
    original_shape: tuple[int, int, int]


def to_canonical(volume: Volume, orientation: str = "RAS") -> CanonicalVolume:
    """Reorient array axes to the nearest orientation code (e.g. RAS); oblique affines go to the closest axes."""
    source = nio.io_orientation(volume.affine)
    target = nio.axcodes2ornt(tuple(orientation))
    transform = nio.ornt_transform(source, target)
    data = nio.apply_orientation(volume.data, transform)
    spacing = tuple(float(voxel_sizes(volume.affine)[int(axis)]) for axis in _inverse_axes(transform))
    return CanonicalVolume(np.ascontiguousarray(data), spacing, transform, volume.shape)  # type: ignore[arg-type]


def _inverse_axes(transform: np.ndarray) -> list[int]:
    # transform[i, 0] is the output axis of input axis i; we want, per output axis, its input axis.
    order = [0, 0, 0]
    for source_axis, (target_axis, _) in enumerate(transform):
        order[int(target_axis)] = source_axis
    return order


def from_canonical(data: np.ndarray, canonical: CanonicalVolume) -> np.ndarray:
    """Map an array on the canonical grid back to the scan's own axis order."""
    inverse = np.empty_like(canonical.transform)
    for source_axis, (target_axis, flip) in enumerate(canonical.transform):
        inverse[int(target_axis)] = (source_axis, flip)
    out = nio.apply_orientation(data, inverse)
    if out.shape != tuple(canonical.original_shape):
        raise AssertionError(f"orientation round trip gave {out.shape}, expected {canonical.original_shape}")
    return np.ascontiguousarray(out)


def target_shape(shape: tuple[int, ...], spacing: tuple[float, ...], new_spacing: tuple[float, ...]) -> tuple[int, int, int]:
    """Grid shape that covers the same extent at new_spacing."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing))  # type: ignore[return-value]


def resample_to_shape(data: np.ndarray, shape: tuple[int, ...], order: int = 1,
                      region: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Resample to a grid of the same extent and the given shape (voxel centres aligned, edges clamped).

    region: only the half-open box [lo, hi) of that grid is computed and returned.
    """
    shape = tuple(int(s) for s in shape)
    lo, hi = (np.zeros(3, int), np.asarray(shape)) if region is None else (np.asarray(region[0]), np.asarray(region[1]))
    if tuple(data.shape) == shape and region is None:
        return data
    if order == 1:
        return _linear_separable(data, shape, lo, hi)
    scale = np.asarray(data.shape, float) / np.asarray(shape, float)
    offset = 0.5 * scale - 0.5 + lo * scale
    return ndimage.affine_transform(
        data, scale, offset=offset, output_shape=tuple(int(n) for n in hi - lo), order=order, mode="nearest",
        output=data.dtype, prefilter=False,
    )


def _linear_separable(data: np.ndarray, shape: tuple[int, ...], lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    # Trilinear interpolation is linear interpolation along each axis in turn: three 1-D passes, the one that
    # shrinks the array most first, cost a fraction of a general 3-D affine transform.
    out = data.astype(np.float32, copy=False)
    for axis in sorted(range(3), key=lambda a: shape[a] / data.shape[a]):
        n, m = data.shape[axis], shape[axis]
        if n == m and lo[axis] == 0 and hi[axis] == m:
            continue
        scale = n / m
        x = np.clip((np.arange(lo[axis], hi[axis]) + 0.5) * scale - 0.5, 0.0, n - 1)
        i0 = np.floor(x).astype(np.intp)
        i1 = np.minimum(i0 + 1, n - 1)
        view = [1, 1, 1]
        view[axis] = -1
        w = (x - i0).astype(np.float32).reshape(view)
        a = np.take(out, i0, axis=axis)
        b = np.take(out, i1, axis=axis)
        b -= a
        b *= w
        a += b
        out = a
    return out if out is not data else out.copy()


def check_contrast(data: np.ndarray) -> None:
    """InputError for a constant image (no contrast to segment): from its extremes, a fraction of zscore's cost."""
    low, high = float(data.min()), float(data.max())
    if not high - low > 1e-6 * max(1.0, abs(low), abs(high)):
        raise InputError("the image is constant (no contrast to segment)")


def zscore(data: np.ndarray) -> np.ndarray:
    """Per-volume z-score normalisation; a constant image is an error."""
    mean = float(data.mean(dtype=np.float64))
    std = float(data.std(dtype=np.float64))
    if not np.isfinite(std) or std < 1e-6 * max(1.0, abs(mean)):
        raise InputError("the image is constant (no contrast to segment)")
    return ((data - mean) / std).astype(np.float32)


def normalize(data: np.ndarray, method: str) -> np.ndarray:
    """Apply the contract's intensity normalisation."""
    if method == "zscore":
        return zscore(data)
    raise InputError(f"unknown normalisation {method!r} in the model contract")


def stage_grid(canonical_data: np.ndarray, spacing: tuple[float, float, float], stage_spacing: tuple[float, float, float],
               normalization: str = "zscore") -> np.ndarray:
    """A canonical volume resampled to a stage's spacing and normalised: the network's whole-scan input."""
    shape = target_shape(canonical_data.shape, spacing, stage_spacing)
    resampled = resample_to_shape(canonical_data, shape, order=1)
    return normalize(resampled, normalization)


def round_up(n: int, divisor: int) -> int:
    """Smallest multiple of divisor that is >= n."""
    return -(-int(n) // divisor) * divisor


def box_with_divisor(lo: np.ndarray, hi: np.ndarray, shape: tuple[int, ...], divisor: int) -> tuple[np.ndarray, np.ndarray]:
    """Grow the half-open box [lo, hi) to sizes that are multiples of divisor, kept inside shape where possible."""
    lo = np.maximum(np.floor(lo).astype(int), 0)
    hi = np.minimum(np.ceil(hi).astype(int), shape)
    size = np.array([round_up(max(h - l, divisor), divisor) for l, h in zip(lo, hi)])
    size = np.minimum(size, [round_up(s, divisor) for s in shape])
    return centred_box((lo + hi) / 2.0, size, shape)


def centred_box(centre: np.ndarray, size: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The half-open box of the given size about centre, shifted inwards where it leaves shape (a box larger
    than shape starts at 0)."""
    size = np.asarray(size, int)
    lo = np.floor(np.asarray(centre, float) - size / 2.0).astype(int)
    lo = np.clip(lo, 0, np.maximum(np.asarray(shape) - size, 0))
    return lo, lo + size


def crop_padded(data: np.ndarray, lo: np.ndarray, hi: np.ndarray, fill: float | None = None) -> np.ndarray:
    """Crop [lo, hi) from data, padding with fill (default: the volume's minimum) where it leaves the volume."""
    fill = float(data.min()) if fill is None else fill
    size = np.asarray(hi) - np.asarray(lo)
    out = np.full(tuple(int(s) for s in size), fill, dtype=data.dtype)
    src_lo = np.maximum(lo, 0)
    src_hi = np.minimum(hi, data.shape)
    if np.any(src_hi <= src_lo):
        return out
    dst_lo = src_lo - lo
    dst_hi = dst_lo + (src_hi - src_lo)
    out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))] = data[tuple(slice(a, b) for a, b in zip(src_lo, src_hi))]
    return out


def paste(target: np.ndarray, patch: np.ndarray, lo: np.ndarray) -> None:
    """Write patch into target at lo, clipped to target's bounds (inverse of crop_padded)."""
    hi = np.asarray(lo) + patch.shape
    dst_lo = np.maximum(lo, 0)
    dst_hi = np.minimum(hi, target.shape)
    if np.any(dst_hi <= dst_lo):
        return
    src_lo = dst_lo - lo
    src_hi = src_lo + (dst_hi - dst_lo)
    target[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))] = patch[tuple(slice(a, b) for a, b in zip(src_lo, src_hi))]


def mask_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Half-open bounding box [lo, hi) of the nonzero voxels, or None when empty."""
    # Per-axis projections: no coordinate list, whose size would be 24 bytes per foreground voxel. The first axis's
    # projection is taken inside the box the others give: the array is read once whole and once within the box, not
    # once per axis.
    if mask.ndim < 2:
        line = np.flatnonzero(mask)
        return None if line.size == 0 else (np.array([int(line[0])]), np.array([int(line[-1]) + 1]))
    rest = np.any(mask, axis=0)
    inner = mask_box(rest)
    if inner is None:
        return None
    crop = (slice(None),) + tuple(slice(int(a), int(b)) for a, b in zip(*inner))
    line = np.flatnonzero(np.any(mask[crop], axis=tuple(range(1, mask.ndim))))
    return np.concatenate([[int(line[0])], inner[0]]), np.concatenate([[int(line[-1]) + 1], inner[1]])
