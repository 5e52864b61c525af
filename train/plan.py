"""The training plan: target spacings, patch sizes and the model contract, chosen from the data."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from heartseg.runtime.atomic import write_text_atomic
from heartseg.runtime.contract import ModelContract, StageContract
from heartseg.runtime.preprocess import round_up

STAGE_KINDS = ("cascade", "single", "coarse", "fine")


@dataclass
class DataFingerprint:
    """Per-case geometry on the canonical grid, the input of planning."""

    spacings: list[tuple[float, float, float]]
    shapes: list[tuple[int, int, int]]
    box_sizes: list[tuple[int, int, int]]


@dataclass
class PlanOptions:
    """Overrides of the data-driven choices (None: choose from the data)."""

    fine_spacing: tuple[float, float, float] | None = None
    coarse_spacing: float | None = None
    fine_patch: tuple[int, int, int] | None = None
    coarse_voxels_per_axis: int = 80
    crop_margin_mm: float = 15.0
    divisor: int = 8
    max_patch_voxels: int = 64**3


def plan_stages(kind: str, fp: DataFingerprint, options: PlanOptions) -> list[StageContract]:
    """Stage contracts for a run of the given kind ('cascade', 'single', 'coarse' or 'fine')."""
    median_spacing = tuple(float(s) for s in np.median(np.asarray(fp.spacings), axis=0))
    fine_spacing = options.fine_spacing or median_spacing
    extent = np.median(np.asarray(fp.shapes) * np.asarray(fp.spacings), axis=0)
    coarse_mm = options.coarse_spacing or float(np.ceil(extent.max() / options.coarse_voxels_per_axis * 2) / 2)
    coarse_spacing = (coarse_mm,) * 3
    coarse_shape = np.ceil(extent / coarse_mm)
    coarse_patch = tuple(round_up(int(s), options.divisor) for s in coarse_shape)
    if options.fine_patch:
        fine_patch = tuple(options.fine_patch)
    else:
        box_mm = np.median(np.asarray(fp.box_sizes) * np.asarray(fp.spacings), axis=0) + 2 * options.crop_margin_mm
        fine_patch = _fit_patch(box_mm / np.asarray(fine_spacing), options.divisor, options.max_patch_voxels)
    coarse = StageContract("coarse", coarse_spacing, coarse_patch, options.divisor, crop_margin_mm=0.0,
                           input_name="coarse_image", prob_name="coarse_prob", mask_name="coarse_mask")
    fine = StageContract("fine", fine_spacing, fine_patch, options.divisor, crop_margin_mm=options.crop_margin_mm,
                         input_name="fine_image", prob_name="fine_prob", mask_name="fine_mask")
    if kind == "cascade":
        return [coarse, fine]
    if kind == "coarse":
        return [coarse]
    if kind == "fine":
        return [fine]
    whole = _fit_patch(np.median(np.asarray(fp.shapes), axis=0), options.divisor, options.max_patch_voxels)
    return [StageContract("single", fine_spacing, whole, options.divisor)]


def _fit_patch(size: np.ndarray, divisor: int, max_voxels: int) -> tuple[int, int, int]:
    patch = np.array([round_up(max(int(np.ceil(s)), divisor), divisor) for s in size])
    while np.prod(patch) > max_voxels:
        axis = int(patch.argmax())
        patch[axis] -= divisor
    return tuple(int(p) for p in patch)  # type: ignore[return-value]


@dataclass
class TrainPlan:
    """Everything that fixes a run's preprocessing: the contract without thresholds, plus the data's identity."""

    kind: str
    contract: ModelContract
    dataset: str
    fingerprint: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        """Write plan.json."""
        data = {"kind": self.kind, "dataset": self.dataset, "fingerprint": self.fingerprint,
                "contract": json.loads(self.contract.to_json())}
        write_text_atomic(path, json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: Path) -> "TrainPlan":
        """Read plan.json."""
        data = json.loads(path.read_text())
        return cls(data["kind"], ModelContract.from_dict(data["contract"]), data["dataset"], data.get("fingerprint", {}))


def fingerprint_dict(fp: DataFingerprint) -> dict:
    """JSON form of a fingerprint, summarised."""
    return {k: np.median(np.asarray(v), axis=0).tolist() for k, v in asdict(fp).items()}
