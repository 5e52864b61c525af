"""Whole-volume or sliding-window prediction with Gaussian blending of overlapping tiles."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import lru_cache

import numpy as np

from .preprocess import crop_padded, round_up

PredictFn = Callable[[np.ndarray], np.ndarray]


@lru_cache(maxsize=8)
def gaussian_weights(patch_size: tuple[int, int, int], sigma_scale: float = 0.125) -> np.ndarray:
    """Importance map for blending: a Gaussian centred on the tile, never zero."""
    grids = np.meshgrid(*[np.arange(p, dtype=np.float32) for p in patch_size], indexing="ij")
    weights = np.ones(patch_size, dtype=np.float32)
    for grid, size in zip(grids, patch_size):
        sigma = max(size * sigma_scale, 1e-3)
        weights *= np.exp(-0.5 * ((grid - (size - 1) / 2.0) / sigma) ** 2)
    weights /= weights.max()
    return np.maximum(weights, 1e-3 * weights.max())


def tile_starts(size: int, patch: int, step_fraction: float = 0.5) -> list[int]:
    """Start offsets of tiles of length patch covering [0, size) with about step_fraction * patch stride."""
    if size <= patch:
        return [0]
    count = int(np.ceil((size - patch) / (patch * step_fraction))) + 1
    return [int(round(i * (size - patch) / (count - 1))) for i in range(count)]


def iter_tiles(shape: tuple[int, ...], patch: tuple[int, ...], step_fraction: float = 0.5) -> Iterator[tuple[int, int, int]]:
    """All tile origins for a volume of shape."""
    for z in tile_starts(shape[0], patch[0], step_fraction):
        for y in tile_starts(shape[1], patch[1], step_fraction):
            for x in tile_starts(shape[2], patch[2], step_fraction):
                yield z, y, x


def padded_shape(shape: tuple[int, ...], patch_size: tuple[int, ...] | None, divisor: int) -> tuple[int, ...]:
    """The network's input shape for a volume: a multiple of divisor, and at least the training patch.

    A volume smaller than the patch is padded up to it (with its minimum), as training pads its patches:
    networks with instance norm see the same share of padding in both.
    """
    minimum = patch_size or (0,) * len(shape)
    return tuple(max(round_up(s, divisor), int(p)) for s, p in zip(shape, minimum))


def predict_whole(volume: np.ndarray, predict: PredictFn, divisor: int,
                  patch_size: tuple[int, int, int] | None = None) -> np.ndarray:
    """One pass over the volume padded to padded_shape; returns probabilities on volume's grid."""
    padded = crop_padded(volume, np.zeros(3, int), np.asarray(padded_shape(volume.shape, patch_size, divisor)))
    prob = predict(padded[None, None])[0, 0]
    return np.ascontiguousarray(prob[tuple(slice(0, s) for s in volume.shape)], dtype=np.float32)


def predict_tiled(volume: np.ndarray, predict: PredictFn, patch_size: tuple[int, int, int], divisor: int,
                  step_fraction: float = 0.5) -> np.ndarray:
    """Sliding-window prediction with Gaussian-weighted averaging of overlapping tiles."""
    # Tiles cover the volume padded exactly as predict_whole pads it, so both see the same edges.
    shape = padded_shape(volume.shape, patch_size, divisor)
    padded = crop_padded(volume, np.zeros(3, int), np.asarray(shape))
    patch = tuple(min(p, s) for p, s in zip(patch_size, shape))
    weights = gaussian_weights(patch)
    acc = np.zeros(shape, np.float32)
    norm = np.zeros(shape, np.float32)
    for origin in iter_tiles(shape, patch, step_fraction):
        region = tuple(slice(o, o + p) for o, p in zip(origin, patch))
        prob = predict(padded[region][None, None])[0, 0]
        acc[region] += prob * weights
        norm[region] += weights
    out = acc / norm
    return np.ascontiguousarray(out[tuple(slice(0, s) for s in volume.shape)])


def predict_volume(volume: np.ndarray, predict: PredictFn, patch_size: tuple[int, int, int], divisor: int,
                   max_voxels: int | None = None) -> np.ndarray:
    """Whole-volume inference when it fits in max_voxels, else sliding window; same result up to rounding."""
    padded_voxels = int(np.prod(padded_shape(volume.shape, patch_size, divisor)))
    if max_voxels is None or padded_voxels <= max_voxels:
        return predict_whole(volume, predict, divisor, patch_size)
    return predict_tiled(volume, predict, patch_size, divisor)
