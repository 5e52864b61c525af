"""The model contract: everything that fixes preprocessing, inference and postprocessing.

Training writes it (as a plan, thresholds still empty), export bakes it into the ONNX file's
metadata, and the runtime reads it from there. No caller can override any of it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from .confidence import ScoreCalibration
from .plausibility import Plausibility

# 2: plausibility learned from the training labels (format 1 had a fixed foreground fraction).
FORMAT_VERSION = 2
CONTRACT_KEY = "heartseg.contract"


@dataclass
class StageContract:
    """One network of a cascade: its grid, its patch, its calibrated threshold and its ONNX names."""

    name: str
    spacing: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    divisor: int = 8
    threshold: float | None = None
    crop_margin_mm: float = 0.0
    input_name: str = "image"
    prob_name: str = "prob"
    mask_name: str = "mask"

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]


@dataclass
class ModelContract:
    """The whole pre/post-processing contract of a model (a one- or two-stage cascade)."""

    stages: list[StageContract]
    orientation: str = "RAS"
    normalization: str = "zscore"
    largest_component: bool = True
    plausibility: Plausibility | None = None
    # Format 1 models only: the largest plausible share of the scan, before plausibility was learned.
    max_foreground_fraction: float | None = None
    bytes_per_voxel: int = 600
    format_version: int = FORMAT_VERSION
    info: dict[str, str] = field(default_factory=dict)
    # --- QC: the confidence score's calibration into an estimated Dice, fitted on held-out cases.
    # None in models calibrated before it existed (their QC verdict comes from the mask rules only).
    score_calibration: ScoreCalibration | None = None

    @property
    def is_cascade(self) -> bool:
        """True for a localiser followed by a full-resolution stage."""
        return len(self.stages) == 2

    @property
    def final_stage(self) -> StageContract:
        """The stage whose probabilities make the mask."""
        return self.stages[-1]

    def stage(self, name: str) -> StageContract:
        """The stage called name."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def to_json(self) -> str:
        """Serialise to JSON."""
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelContract":
        """Build from a plain dict (as read from JSON)."""
        data = dict(data)
        stages = [StageContract(**s) for s in data.pop("stages")]
        plausibility = data.pop("plausibility", None)
        if isinstance(plausibility, dict):
            plausibility = Plausibility.from_dict(plausibility)
        # --- QC score calibration (optional).
        score_calibration = data.pop("score_calibration", None)
        if isinstance(score_calibration, dict):
            score_calibration = ScoreCalibration.from_dict(score_calibration)
        return cls(stages=stages, plausibility=plausibility, score_calibration=score_calibration, **data)

    @classmethod
    def from_json(cls, text: str) -> "ModelContract":
        """Parse the JSON form."""
        return cls.from_dict(json.loads(text))
