"""Postprocessing of binary masks."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .contract import ModelContract
from .preprocess import mask_box


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 26-connected foreground component (empty stays empty)."""
    box = mask_box(mask)
    if box is None:
        return mask.astype(np.uint8, copy=False)
    # Labelled inside the foreground's bounding box: the same components, a fraction of a scan's voxels.
    region = tuple(slice(int(lo), int(hi)) for lo, hi in zip(*box))
    labels, count = ndimage.label(mask[region], structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return mask.astype(np.uint8, copy=False)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    out = np.zeros(mask.shape, np.uint8)
    out[region] = labels == int(sizes.argmax())
    return out


def binarize(prob: np.ndarray, threshold: float) -> np.ndarray:
    """Mask of voxels whose probability exceeds the model's calibrated threshold."""
    return (prob > threshold).astype(np.uint8)


def mask_from_prob(prob: np.ndarray, contract: ModelContract, threshold: float | None = None) -> np.ndarray:
    """Binary mask with the model's own threshold (or the given one, when calibrating) and postprocessing."""
    mask = binarize(prob, float(contract.final_stage.threshold if threshold is None else threshold))
    return largest_component(mask) if contract.largest_component else mask
