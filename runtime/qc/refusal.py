"""The refusal of a scan no model could use, from its header alone: its voxel spacing and field of view.

The bounds are the model's learned ranges (the training scans' voxel sizes and fields of view, see ranges.py)
widened by QCConfig's refusal factors, so that one set of ranges decides both review and refusal. A model
without them (trained before they were learned, or a tiny test model) is bounded by its stages' spacings and
patch sizes instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .rules import QCConfig

if TYPE_CHECKING:
    from ..contract import ModelContract


def spacing_bounds(contract: ModelContract, config: QCConfig = QCConfig()) -> tuple[float, float]:
    """The voxel sizes (mm, on every axis) a scan may have: the learned range widened by refusal_spacing_factor,
    else the stages' spacings widened by stage_spacing_factor."""
    learned = contract.plausibility.spacing_mm if contract.plausibility is not None else None
    if learned is not None:
        low, high = min(lo for lo, _ in learned), max(hi for _, hi in learned)
        return low / config.refusal_spacing_factor, high * config.refusal_spacing_factor
    spacings = [s for stage in contract.stages for s in stage.spacing]
    return min(spacings) / config.stage_spacing_factor, max(spacings) * config.stage_spacing_factor


def max_fov_mm(contract: ModelContract, config: QCConfig = QCConfig()) -> float:
    """The largest field of view (mm, on any axis) a scan may have: the learned largest widened by
    refusal_fov_factor, else stage_fov_factor times the largest patch extent of any stage (at least
    min_stage_fov_mm)."""
    learned = contract.plausibility.fov_mm if contract.plausibility is not None else None
    if learned is not None:
        return max(hi for _, hi in learned) * config.refusal_fov_factor
    longest = max(p * s for stage in contract.stages for p, s in zip(stage.patch_size, stage.spacing))
    return max(config.min_stage_fov_mm, config.stage_fov_factor * longest)


def refusal_reason(shape: Iterable[int], spacing: Iterable[float], contract: ModelContract,
                   config: QCConfig = QCConfig()) -> str | None:
    """Why a scan of this shape and voxel spacing (mm) is refused, in one line naming the allowed range, or None."""
    shape, spacing = tuple(int(n) for n in shape), tuple(float(s) for s in spacing)
    low, high = spacing_bounds(contract, config)
    if any(not low <= s <= high for s in spacing):
        shown = " x ".join(f"{s:.4g}" for s in spacing)
        return f"voxel spacing {shown} mm is outside what this model can segment ({low:.3g} to {high:.3g} mm per axis)"
    largest = max_fov_mm(contract, config)
    fov = [n * s for n, s in zip(shape, spacing)]
    if max(fov) > largest:
        shown = " x ".join(f"{f:.0f}" for f in fov)
        return (f"field of view {shown} mm ({' x '.join(map(str, shape))} voxels) is larger than this model can "
                f"plausibly be given (at most {largest:.0f} mm per axis)")
    return None
