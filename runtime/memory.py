"""A memory budget for the whole pipeline (read, resample, network, postprocess), from the header alone.

The estimate counts the arrays the pipeline holds at once, per voxel of the scan and of each stage's
grid, plus the network's activations (the contract's bytes per voxel). It is checked before any voxel
is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel.orientations as nio
import numpy as np

from .contract import ModelContract
from .errors import InputError
from .image import ScanGeometry
from .preprocess import target_shape
from .sliding_window import padded_shape

MB = 1_000_000
# Bytes per scan voxel at the postprocessing peak: the float32 scan, its canonical copy, the probabilities
# resampled to it, the binary mask, the int32 component labels and two uint8/bool copies.
NATIVE_BYTES = 20
# Bytes per voxel of a stage grid while it is made: resampled, float64 statistics, normalised copies.
STAGE_BYTES = 20
# Bytes per stage-grid voxel beside the network while it runs: the normalised grid and the probabilities,
# plus the blending accumulators of the final stage's tiles.
NETWORK_STAGE_BYTES = 8
TILED_BYTES = 8
# Bytes per scan voxel held while a stage runs: the scan and its canonical copy.
HELD_BYTES = 8
# With test-time augmentation, also the mirrored copy of the scan and the running sum of probabilities.
TTA_HELD_BYTES = 8
DEFAULT_BUDGET_SHARE = 0.8


def physical_memory() -> int | None:
    """Bytes of physical memory of this machine, or None when unknown."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def current_rss() -> int:
    """Resident memory of this process now, in bytes (0 when unknown)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError, IndexError):
        return 0


def default_budget() -> int | None:
    """The budget without --memory-limit-mb: a share of physical memory."""
    total = physical_memory()
    return int(total * DEFAULT_BUDGET_SHARE) if total else None


def canonical_geometry(geometry: ScanGeometry, orientation: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Shape and spacing of the scan once reoriented to orientation (as preprocess.to_canonical does it)."""
    transform = nio.ornt_transform(nio.io_orientation(geometry.affine), nio.axcodes2ornt(tuple(orientation)))
    shape, spacing = [0, 0, 0], [0.0, 0.0, 0.0]
    for source, (target, _) in enumerate(transform):
        shape[int(target)] = geometry.shape[source]
        spacing[int(target)] = geometry.spacing[source]
    return tuple(shape), tuple(spacing)


def largest_final_call(shape: tuple[int, ...], spacing: tuple[float, ...], contract: ModelContract) -> int:
    """The most voxels one call of the final stage's network can take in the model's graph for a canonical scan: its
    grid padded for the network, for a cascade at most its largest box (ModelContract.final_box_cap)."""
    stage = contract.final_stage
    size = target_shape(shape, spacing, stage.spacing)
    cap = contract.final_box_cap if contract.is_cascade else None
    if cap is not None:
        size = tuple(min(n, c) for n, c in zip(size, cap))
    return int(np.prod(padded_shape(size, stage.patch_size, stage.divisor), dtype=np.int64))


@dataclass(frozen=True)
class MemoryPlan:
    """How much a scan needs and how large a network call may be to stay within the budget."""

    fixed_bytes: int
    network_bytes: int
    max_network_voxels: int | None  # None: no budget, whole box; else the final stage in tiles above this many voxels

    @property
    def total_bytes(self) -> int:
        """Peak bytes of the pipeline (without the process's own baseline)."""
        return self.fixed_bytes + self.network_bytes


def plan_memory(geometry: ScanGeometry, contract: ModelContract, budget: int | None, *, baseline: int = 0,
                include_read: bool = True, keep_prob: bool = False, tta: bool = False,
                source: str | Path = "scan") -> MemoryPlan:
    """The pipeline's peak for this scan within budget (bytes for the whole process, of which baseline is in use;
    None: unbounded): how many voxels one call of the final stage's network may take (larger boxes run in tiles);
    InputError when a tile of it, or the localiser's whole grid, does not fit. tta: with test-time augmentation."""
    shape, spacing = canonical_geometry(geometry, contract.orientation)
    voxels = geometry.voxels
    # A loaded scan's float32 voxels are already part of the process's resident memory.
    loaded = 0 if include_read else 4
    read = geometry.read_bytes() if include_read else 0
    grids = [int(np.prod(target_shape(shape, spacing, s.spacing), dtype=np.int64)) for s in contract.stages]
    padded = max(int(np.prod(padded_shape(target_shape(shape, spacing, s.spacing), s.patch_size, s.divisor),
                             dtype=np.int64)) for s in contract.stages)
    postprocess = voxels * (NATIVE_BYTES + (4 if keep_prob else 0) - loaded)
    held = HELD_BYTES + (TTA_HELD_BYTES if tta else 0) - loaded
    making_grids = voxels * held + max(grids) * STAGE_BYTES
    beside_network = voxels * held + max(grids) * (NETWORK_STAGE_BYTES + TILED_BYTES)
    fixed = max(read, postprocess, making_grids)
    bpv = contract.bytes_per_voxel
    if budget is None:
        return MemoryPlan(fixed, max(0, beside_network + padded * bpv - fixed), None)
    # The graph runs only the final stage in tiles: a localiser's whole grid must fit in one call.
    tile = max([int(np.prod(contract.final_stage.patch_size, dtype=np.int64))]
               + [int(np.prod(padded_shape(target_shape(shape, spacing, s.spacing), s.patch_size, s.divisor),
                              dtype=np.int64)) for s in contract.stages if s is not contract.final_stage])
    room = budget - baseline - beside_network
    if fixed > budget - baseline or room < tile * bpv:
        needed = max(fixed, beside_network + tile * bpv)
        raise InputError(f"{source}: needs about {needed / MB:.0f} MB to segment "
                         f"({' x '.join(map(str, geometry.shape))} voxels) beside the {baseline / MB:.0f} MB in use, "
                         f"over the memory budget of {budget / MB:.0f} MB")
    network = min(padded, room // bpv) * bpv
    return MemoryPlan(fixed, max(0, beside_network + network - fixed), int(room // bpv))


# Bytes per voxel of scoring a prediction against a label: both masks, their union, the float32 reads, and the
# distance transform's float64 distances and int32 feature indices (on the masks' bounding box, at worst all).
EVAL_BYTES = 40


def check_eval_budget(geometry: ScanGeometry, source: str | Path, budget: int | None = None) -> None:
    """Refuse, from the header, a mask too large to score within the budget (default: a share of physical memory)."""
    _check_budget(geometry, source, geometry.read_bytes() + geometry.voxels * EVAL_BYTES, "score", budget)


def check_read_budget(geometry: ScanGeometry, source: str | Path, extra: int = 0, budget: int | None = None) -> None:
    """Refuse, from the header, a scan whose read alone (plus extra bytes held with it) would not fit the memory
    budget (default: a share of physical memory) beside what the process already uses."""
    _check_budget(geometry, source, geometry.read_bytes() + extra, "read", budget)


def _check_budget(geometry: ScanGeometry, source: str | Path, needed: int, action: str, budget: int | None) -> None:
    """Refuse needed bytes to action a scan when they do not fit the budget beside what the process already uses."""
    budget = default_budget() if budget is None else budget
    if budget is not None and needed > budget - current_rss():
        raise InputError(f"{source}: needs about {needed / MB:.0f} MB to {action} "
                         f"({' x '.join(map(str, geometry.shape))} voxels), over the memory budget of "
                         f"{budget / MB:.0f} MB")
