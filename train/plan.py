"""The training plan: target spacings, patch sizes and the model contract, chosen from the data."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from heartseg.runtime.atomic import write_text_atomic
from heartseg.runtime.contract import (
    CONTEXTS,
    LOCALISER,
    MARGIN_RANGE_MM,
    SEGMENTER,
    SPACING_RANGE_MM,
    ModelContract,
    StageContract,
)
from heartseg.runtime.preprocess import round_up

from .options import ConfigError, integer_at_least, number_in

STAGE_KINDS = ("cascade", "single", "coarse", "fine")


@dataclass
class DataFingerprint:
    """Per-case geometry on the canonical grid, the input of planning."""

    spacings: list[tuple[float, float, float]]
    shapes: list[tuple[int, int, int]]
    box_sizes: list[tuple[int, int, int]]
    datasets: list[str] = field(default_factory=list)

    def by_dataset(self) -> dict[str, "DataFingerprint"]:
        """The fingerprint of each dataset's cases."""
        names = self.datasets or [""] * len(self.spacings)
        out = {}
        for name in sorted(set(names)):
            idx = [i for i, n in enumerate(names) if n == name]
            out[name] = DataFingerprint([self.spacings[i] for i in idx], [self.shapes[i] for i in idx],
                                        [self.box_sizes[i] for i in idx], [name] * len(idx))
        return out

    def medians(self) -> dict[str, np.ndarray]:
        """Median spacing (mm), field of view (mm) and atrium box (mm) per axis."""
        spacings = np.asarray(self.spacings, float)
        return {"spacing": np.median(spacings, axis=0),
                "fov_mm": np.median(np.asarray(self.shapes) * spacings, axis=0),
                "box_mm": np.median(np.asarray(self.box_sizes) * spacings, axis=0)}


@dataclass
class PlanOptions:
    """Overrides of the data-driven choices (None: choose from the data)."""

    fine_spacing: tuple[float, float, float] | None = None
    coarse_spacing: float | None = None
    fine_patch: tuple[int, int, int] | None = None
    coarse_voxels_per_axis: int = 80
    crop_margin_mm: float = 15.0
    # What fills the fine stage's crop up to its patch (runtime.contract.CONTEXTS).
    crop_context: str = "pad"
    divisor: int = 8
    max_patch_voxels: int = 64**3
    # The fine patch must span at least this share of the atrium's longest median extent.
    context_fraction: float = 0.75
    spacing_step_mm: float = 0.125

    def __post_init__(self) -> None:
        integer_at_least(self.divisor, 1, "divisor")
        if self.divisor & (self.divisor - 1):
            raise ConfigError("divisor", self.divisor, "must be a power of two")
        number_in(self.crop_margin_mm, 0.0, MARGIN_RANGE_MM[1], "crop_margin_mm")
        if self.crop_context not in CONTEXTS:
            raise ConfigError("crop_context", self.crop_context, f"choose {' or '.join(CONTEXTS)}")
        if self.coarse_spacing is not None:
            number_in(self.coarse_spacing, SPACING_RANGE_MM[0], SPACING_RANGE_MM[1], "coarse_spacing")
        if self.fine_spacing is not None:
            if len(self.fine_spacing) != 3:
                raise ConfigError("fine_spacing", self.fine_spacing, "give three values")
            for value in self.fine_spacing:
                number_in(value, SPACING_RANGE_MM[0], SPACING_RANGE_MM[1], "fine_spacing")
        if self.fine_patch is not None:
            if len(self.fine_patch) != 3 or any(integer_at_least(p, self.divisor, "fine_patch") % self.divisor
                                                for p in self.fine_patch):
                raise ConfigError("fine_patch", self.fine_patch, f"give three multiples of {self.divisor}")
        integer_at_least(self.coarse_voxels_per_axis, 8, "coarse_voxels_per_axis")
        integer_at_least(self.max_patch_voxels, self.divisor ** 3, "max_patch_voxels")
        number_in(self.context_fraction, 0.0, 10.0, "context_fraction", open_lo=True)
        number_in(self.spacing_step_mm, 0.0, 10.0, "spacing_step_mm", open_lo=True)


def plan_stages(kind: str, fp: DataFingerprint, options: PlanOptions,
                reasons: dict[str, str] | None = None) -> list[StageContract]:
    """Stage contracts for a run of the given kind ('cascade', 'single', 'coarse' or 'fine').

    Each dataset is summarised by its medians, so that a large dataset does not outvote a small one;
    reasons (when given) receives why each choice was made.
    """
    why = reasons if reasons is not None else {}
    per_dataset = {name: part.medians() for name, part in fp.by_dataset().items()}
    finest = np.min([m["spacing"] for m in per_dataset.values()], axis=0)
    longest = float(max(np.max(m["box_mm"]) for m in per_dataset.values()))
    edge = max(options.divisor, int(round(options.max_patch_voxels ** (1 / 3))) // options.divisor * options.divisor)
    if options.fine_spacing:
        fine_spacing = tuple(options.fine_spacing)
        why["fine_spacing"] = "given on the command line"
    else:
        step = options.spacing_step_mm
        context = float(np.ceil(options.context_fraction * longest / edge / step - 1e-9) * step)
        fine_spacing = tuple(float(max(context, s)) for s in finest)
        why["fine_spacing"] = (
            f"the finest median spacing of any dataset ({_fmt(finest)} mm), coarsened where needed so that a "
            f"{edge}-voxel patch spans {options.context_fraction:.0%} of the longest median atrium extent "
            f"({longest:.0f} mm): at least {context:g} mm")
    fov = np.max([m["fov_mm"] for m in per_dataset.values()], axis=0)
    if options.coarse_spacing:
        coarse_mm = float(options.coarse_spacing)
        why["coarse_spacing"] = "given on the command line"
    else:
        coarse_mm = float(np.ceil(fov.max() / options.coarse_voxels_per_axis * 2) / 2)
        why["coarse_spacing"] = (f"about {options.coarse_voxels_per_axis} voxels across the largest median field of "
                                 f"view of any dataset ({fov.max():.0f} mm)")
    coarse_spacing = (coarse_mm,) * 3
    coarse_shape = np.ceil(fov / coarse_mm)
    coarse_patch = tuple(round_up(int(s), options.divisor) for s in coarse_shape)
    why["coarse_patch"] = f"the largest median field of view of any dataset per axis ({_fmt(fov)} mm) at {coarse_mm:g} mm"
    if options.fine_patch:
        fine_patch = tuple(options.fine_patch)
        why["fine_patch"] = "given on the command line"
    else:
        box_mm = np.max([m["box_mm"] for m in per_dataset.values()], axis=0) + 2 * options.crop_margin_mm
        fine_patch = _fit_patch(box_mm / np.asarray(fine_spacing), options.divisor, options.max_patch_voxels)
        why["fine_patch"] = (f"the largest median atrium box of any dataset per axis plus {options.crop_margin_mm:g} mm "
                             f"margins ({_fmt(box_mm)} mm), within {options.max_patch_voxels} voxels")
    coarse = StageContract("coarse", coarse_spacing, coarse_patch, options.divisor, crop_margin_mm=0.0,
                           input_name="coarse_image", prob_name="coarse_prob", mask_name="coarse_mask", role=LOCALISER)
    fine = StageContract("fine", fine_spacing, fine_patch, options.divisor, crop_margin_mm=options.crop_margin_mm,
                         input_name="fine_image", prob_name="fine_prob", mask_name="fine_mask", role=SEGMENTER,
                         context=options.crop_context)
    if kind == "cascade":
        return [coarse, fine]
    if kind == "coarse":
        return [coarse]
    if kind == "fine":
        return [fine]
    whole = _fit_patch(np.median(np.asarray(fp.shapes), axis=0), options.divisor, options.max_patch_voxels)
    return [StageContract("single", fine_spacing, whole, options.divisor, role=SEGMENTER)]


def _fmt(values) -> str:
    return " x ".join(f"{float(v):.3g}" for v in values)


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
    reasons: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        """Write plan.json."""
        data = {"kind": self.kind, "dataset": self.dataset, "fingerprint": self.fingerprint,
                "why": self.reasons, "contract": json.loads(self.contract.to_json())}
        write_text_atomic(path, json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: Path) -> "TrainPlan":
        """Read plan.json."""
        data = json.loads(path.read_text())
        return cls(data["kind"], ModelContract.from_dict(data["contract"]), data["dataset"], data.get("fingerprint", {}),
                   data.get("why", {}))


def fingerprint_dict(fp: DataFingerprint) -> dict:
    """JSON form of a fingerprint: per dataset, its case count and median spacing, field of view and atrium box (mm)."""
    return {name: {"cases": len(part.spacings), **{k: v.round(2).tolist() for k, v in part.medians().items()}}
            for name, part in fp.by_dataset().items()}
