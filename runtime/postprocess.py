"""Postprocessing of binary masks."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected foreground component (empty stays empty)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return mask.astype(np.uint8, copy=False)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return (labels == int(sizes.argmax())).astype(np.uint8)


def binarize(prob: np.ndarray, threshold: float) -> np.ndarray:
    """Mask of voxels whose probability exceeds the model's calibrated threshold."""
    return (prob > threshold).astype(np.uint8)
