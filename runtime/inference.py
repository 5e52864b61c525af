"""The Python reference of the inference pipeline on a canonical volume, independent of the network backend.

A model file runs this pipeline as one ONNX graph (export/pipeline_graph.py builds it, and the export checks it
against this reference); training validates with these functions and PyTorch networks, and the export's
parity checks run them with the file's networks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .contract import ModelContract, StageContract
from .postprocess import binarize, largest_component
from .preprocess import (
    CanonicalVolume,
    box_with_divisor,
    centred_box,
    crop_padded,
    mask_box,
    paste,
    resample_to_shape,
    stage_grid,
    target_shape,
)
from .qc.measures import scan_geometry
from .sliding_window import predict_volume

StagePredictFn = Callable[[str, np.ndarray], np.ndarray]
Box = tuple[np.ndarray, np.ndarray]

# When the final stage's mask reaches a face of the localiser's box, the box was cut too tight: that face
# moves out by the stage's crop margin and the stage runs again, at most this many times.
MAX_BOX_GROWTH = 2
# The mask (probability above one half, largest component) reaches a face when its area on the face is at
# least this share of its largest cross-section along that axis; a graze of a few voxels does not count.
GROW_FACE_SHARE = 0.05


@dataclass
class CanonicalResult:
    """Probabilities on the canonical grid and where the final stage looked."""

    prob: np.ndarray
    box: Box | None


def stage_shape(canonical: CanonicalVolume, stage: StageContract) -> tuple[int, int, int]:
    """Grid shape of a stage for this scan."""
    return target_shape(canonical.data.shape, canonical.spacing, stage.spacing)


def native_box_to_stage(box: Box, native_shape: tuple[int, ...], stage_shape_: tuple[int, ...],
                        stage: StageContract) -> Box:
    """A half-open native-grid box mapped onto a stage grid, grown by the stage's margin and divisor."""
    scale = np.asarray(stage_shape_, float) / np.asarray(native_shape, float)
    margin = stage.crop_margin_mm / np.asarray(stage.spacing)
    lo = np.asarray(box[0]) * scale - margin
    hi = np.asarray(box[1]) * scale + margin
    return box_with_divisor(lo, hi, stage_shape_, stage.divisor)


def predict_stage(canonical: CanonicalVolume, stage: StageContract, contract: ModelContract,
                  predict: StagePredictFn, box: Box | None = None, max_voxels: int | None = None) -> np.ndarray:
    """A stage's probabilities on its own grid (zero outside box when one is given)."""
    grid = stage_grid(canonical.data, canonical.spacing, stage.spacing, contract.normalization)
    return predict_grid(grid, stage, predict, box, max_voxels)


def predict_grid(grid: np.ndarray, stage: StageContract, predict: StagePredictFn, box: Box | None = None,
                 max_voxels: int | None = None) -> np.ndarray:
    """predict_stage on the stage's grid already made (resampled and normalised)."""

    def run(batch: np.ndarray) -> np.ndarray:
        return predict(stage.name, batch)

    if box is None:
        return predict_volume(grid, run, stage.patch_size, stage.divisor, max_voxels)
    lo, hi = context_box(box, grid.shape, stage) if stage.context == "scan" else box
    crop = predict_volume(crop_padded(grid, lo, hi), run, stage.patch_size, stage.divisor, max_voxels)
    # Only the box's own voxels are kept: the context around it is seen, not segmented.
    inner = tuple(slice(int(a - c), int(b - c)) for a, b, c in zip(box[0], box[1], lo))
    prob = np.zeros(grid.shape, np.float32)
    paste(prob, crop[inner], box[0])
    return prob


def context_box(box: Box, shape: tuple[int, ...], stage: StageContract) -> Box:
    """box widened, about its centre, to at least the stage's patch on each axis as far as the grid reaches
    (shifted inwards at its edges), so that what fills the patch is scan rather than padding."""
    lo, hi = np.asarray(box[0], int), np.asarray(box[1], int)
    size = np.maximum(hi - lo, np.minimum(np.asarray(stage.patch_size, int), np.asarray(shape, int)))
    return centred_box((lo + hi) / 2.0, size, shape)


def locate(canonical: CanonicalVolume, contract: ModelContract, predict: StagePredictFn,
           max_voxels: int | None = None) -> Box | None:
    """The localiser's box around the target on the native canonical grid, or None when it finds nothing."""
    localiser = contract.localiser
    if localiser is None:
        raise ValueError("the contract has no localiser stage")
    prob = predict_stage(canonical, localiser, contract, predict, max_voxels=max_voxels)
    mask = localiser_mask(prob, float(localiser.threshold))
    found = mask_box(mask)
    if found is None:
        return None
    scale = np.asarray(canonical.data.shape, float) / np.asarray(mask.shape, float)
    return found[0] * scale, found[1] * scale


def infer_canonical(canonical: CanonicalVolume, contract: ModelContract, predict: StagePredictFn,
                    max_voxels: int | None = None, box: Box | None = None) -> CanonicalResult:
    """Final-stage probabilities on the native canonical grid (cascade: localise, then crop and refine).

    A box given by the caller (on the native canonical grid) replaces the localiser, as validation of a
    fine stage on its own does; a scan no larger than the final stage's view of a plausible atrium is seen
    whole. A localiser's box that the final mask reaches is grown (see grown_box) and the final stage run again.
    """
    final = contract.final_stage
    located = contract.is_cascade and box is None and not fits_final_stage(canonical, contract)
    if located:
        box = locate(canonical, contract, predict, max_voxels)
        if box is None:
            return CanonicalResult(np.zeros(canonical.data.shape, np.float32), None)
    # Made once: growing the box runs the network again, not the resampling.
    grid = stage_grid(canonical.data, canonical.spacing, final.spacing, contract.normalization)
    stage_box = native_box_to_stage(box, canonical.data.shape, grid.shape, final) if box is not None else None
    prob = predict_grid(grid, final, predict, stage_box, max_voxels)
    if located:
        for _ in range(MAX_BOX_GROWTH):
            grown = grown_box(prob, stage_box, final)
            if grown is None:
                break
            stage_box = grown
            prob = predict_grid(grid, final, predict, stage_box, max_voxels)
    native_shape = canonical.data.shape
    if stage_box is None:
        return CanonicalResult(resample_to_shape(prob, native_shape, order=1), stage_box)
    # Outside the box the probabilities are zero: only the box's footprint on the native grid is resampled.
    region = stage_box_footprint(stage_box, prob.shape, native_shape)
    native = np.zeros(native_shape, np.float32)
    native[tuple(slice(a, b) for a, b in zip(*region))] = resample_to_shape(prob, native_shape, order=1, region=region)
    return CanonicalResult(native, stage_box)


def grown_box(prob: np.ndarray, box: Box, stage: StageContract) -> Box | None:
    """box (on the stage's grid) with every face that the stage's mask reaches moved out by the stage's crop
    margin, or None when the mask reaches no face that can still move."""
    shape = prob.shape
    crop = tuple(slice(int(a), int(b)) for a, b in zip(*box))
    mask = largest_component(binarize(prob[crop], 0.5))
    if not mask.any():
        return None
    step = np.maximum(np.ceil(stage.crop_margin_mm / np.asarray(stage.spacing, float)), stage.divisor).astype(int)
    lo, hi = np.asarray(box[0], int).copy(), np.asarray(box[1], int).copy()
    moved = False
    for axis in range(3):
        profile = mask.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.int64)
        largest = float(profile.max())
        if lo[axis] > 0 and profile[0] >= GROW_FACE_SHARE * largest:
            lo[axis], moved = max(0, lo[axis] - step[axis]), True
        if hi[axis] < shape[axis] and profile[-1] >= GROW_FACE_SHARE * largest:
            hi[axis], moved = min(shape[axis], hi[axis] + step[axis]), True
    return box_with_divisor(lo, hi, shape, stage.divisor) if moved else None


def stage_box_footprint(box: Box, stage_shape_: tuple[int, ...], native_shape: tuple[int, ...]) -> Box:
    """The native-grid voxels whose linear interpolation from a stage grid reads any voxel of box."""
    scale = np.asarray(native_shape, float) / np.asarray(stage_shape_, float)
    lo = np.floor((np.asarray(box[0]) - 0.5) * scale - 0.5).astype(int)
    hi = np.ceil((np.asarray(box[1]) + 0.5) * scale - 0.5).astype(int) + 1
    return np.clip(lo, 0, native_shape), np.clip(hi, 0, native_shape)


def fits_final_stage(canonical: CanonicalVolume, contract: ModelContract) -> bool:
    """Whether the whole scan is no larger than the box the final stage would see around the largest plausible
    atrium (its extents plus the crop margin on both sides, axes sorted): then localising can only lose."""
    if contract.plausibility is None:
        return False
    _, fov = scan_geometry(canonical.data.shape, canonical.spacing)
    largest = np.asarray([hi for _, hi in contract.plausibility.extent_mm])
    return bool(np.all(np.asarray(fov) <= largest + 2 * contract.final_stage.crop_margin_mm))


def localiser_mask(prob: np.ndarray, threshold: float) -> np.ndarray:
    """The localiser's mask: thresholded, largest component (its box is what the final stage sees)."""
    return largest_component(binarize(prob, threshold))

