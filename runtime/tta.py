"""Test-time augmentation: the final probabilities averaged over mirrored copies of the scan.

Each copy is mirrored along some canonical axes, segmented by the whole pipeline (localiser included),
and its probabilities mirrored back before averaging. It costs one full inference per copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from .contract import ModelContract
from .inference import Box, CanonicalResult, StagePredictFn, infer_canonical, stage_shape
from .preprocess import CanonicalVolume

# The scan as it is, and mirrored along each axis in turn: 4 inferences.
DEFAULT_FLIPS: tuple[tuple[int, ...], ...] = ((), (0,), (1,), (2,))


def _unflip_box(box: Box, axes: Sequence[int], shape: tuple[int, ...]) -> Box:
    """A box found on a mirrored grid, on the original grid."""
    lo, hi = np.array(box[0], float), np.array(box[1], float)
    for axis in axes:
        lo[axis], hi[axis] = shape[axis] - float(box[1][axis]), shape[axis] - float(box[0][axis])
    return lo, hi


def infer_canonical_tta(canonical: CanonicalVolume, contract: ModelContract, predict: StagePredictFn,
                        max_voxels: int | None = None,
                        flips: Sequence[tuple[int, ...]] = DEFAULT_FLIPS,
                        plain: CanonicalResult | None = None) -> CanonicalResult:
    """infer_canonical averaged over mirrored copies; the box is the union of the copies' final-stage boxes.

    plain: the unmirrored copy's result, when the caller has it already (it is not inferred again)."""

    def run(data: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, Box | None]:
        result = plain if not axes and plain is not None else \
            infer_canonical(replace(canonical, data=data), contract, predict, max_voxels)
        return result.prob, result.box

    total, box = flipped_average(canonical.data, run, flips, stage_shape(canonical, contract.final_stage))
    return CanonicalResult(total, box)


def flipped_average(data: np.ndarray, run: Callable[[np.ndarray, tuple[int, ...]], tuple[np.ndarray, Box | None]],
                    flips: Sequence[tuple[int, ...]] = DEFAULT_FLIPS,
                    box_shape: tuple[int, ...] | None = None) -> tuple[np.ndarray, Box | None]:
    """Probabilities averaged over mirrored copies of a canonical scan, and the union of the boxes the final stage
    looked in; run maps a copy (and the axes it is mirrored along) to its probabilities and box, the box on a grid of
    box_shape (default: the scan's)."""
    total: np.ndarray | None = None
    boxes: list[Box] = []
    for axes in flips:
        axes = tuple(int(a) for a in axes)
        prob, box = run(np.ascontiguousarray(np.flip(data, axes)) if axes else data, axes)
        prob = np.flip(prob, axes) if axes else prob
        total = prob.astype(np.float32, copy=True) if total is None else total + prob
        if box is not None:
            boxes.append(_unflip_box(box, axes, data.shape if box_shape is None else box_shape))
    if total is None:
        raise ValueError("test-time augmentation needs at least one copy")
    total /= float(len(flips))
    box = (np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)) if boxes else None
    return total, box
