"""The model contract: everything that fixes preprocessing, inference and postprocessing.

Training writes it (as a plan, thresholds still empty), export bakes it into the ONNX file's
metadata, and the runtime reads it from there. No caller can override any of it.

Contracts are immutable and valid by construction: every field is checked (type, range, and the
consistency of the stages) when a contract is built, so a bad model is refused when it is opened,
naming the field, never per scan. New contracts are made with dataclasses.replace.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from .errors import ModelError
from .qc.calibration import SCORE_NAME, ScoreCalibration
from .qc.orientation import OrientationAtlases
from .qc.ranges import DEFAULT_INPUT_MARGIN, Plausibility

# 1: a fixed largest foreground fraction; 2: plausibility learned from the training labels;
# 3: an explicit role per stage; 4: the QC blocks a format-3 reader does not know (tta_score_calibration,
# edge_sharpness), so that it asks for an upgrade instead of naming an unknown field; 5: plausibility's
# interior_rank, likewise; 6: a stage's crop context ('scan'). The QC blocks (score_calibration,
# tta_score_calibration, and in plausibility the training scans' voxel sizes, fields of view, skewness, edge
# sharpness and interior rank) are optional in every format from 2: a file without them loads as before.
# 7: `pipeline`, a file that is one graph from scan to mask (PIPELINE_INPUTS in, PIPELINE_OUTPUTS out); the
# stages' ONNX names then name their networks inside it. 8: plausibility's contrast, saturation and orientation
# atlases, and its skewness measured around the atrium; a file of an earlier format learned its skewness over the
# whole scan, a range the measure no longer reads, so it is not judged.
FORMAT_VERSION = 8
# The first format whose skewness range is measured around the atrium.
LOCAL_SKEWNESS_FORMAT = 8
CONTRACT_KEY = "heartseg.contract"
# A pipeline file's graph: the scan's voxels in RAS+ order and their voxel size in, the mask on the same grid, its
# probabilities, the confidence score QC calibrates and the final stage's box (voxels of the scan's grid) out.
PIPELINE_INPUTS = ("image", "spacing")
PIPELINE_OUTPUTS = ("mask", "probability", "score", "box")
# Its optional input: the most voxels one call of the final stage's network may take (default: no limit).
MAX_VOXELS = "max_voxels"
# A variant's file (fp16, int8) names what it is, and records its held-out accuracy measured at export beside the
# model it was made from; its other metadata (cv_metrics, the threshold's calibration) is that model's.
VARIANT_KEY = "heartseg.variant"
VARIANT_METRICS_KEY = "heartseg.variant_metrics"

LOCALISER = "localiser"
SEGMENTER = "segmenter"
ROLES = (LOCALISER, SEGMENTER)
# What fills a stage's crop around the localiser's box up to the stage's patch: the volume's minimum ("pad",
# as every model before format 6), or the scan around the box where it has any ("scan").
CONTEXTS = ("pad", "scan")
# Stage layouts a model may have: a segmenter, a localiser trained alone, or a localiser then a segmenter.
LAYOUTS = ((SEGMENTER,), (LOCALISER,), (LOCALISER, SEGMENTER))
ORIENTATIONS = ("RAS",)  # heartseg trains in RAS only; a model claiming another was not made by it
NORMALIZATIONS = ("zscore",)
SPACING_RANGE_MM = (0.05, 50.0)
MARGIN_RANGE_MM = (0.0, 500.0)
MAX_PATCH = 1024
MAX_DIVISOR = 256
BYTES_PER_VOXEL_RANGE = (1, 1_000_000)
# The confidence scores a runtime can compute, and the fields a score calibration cannot do without.
SCORES = (SCORE_NAME,)
CALIBRATION_REQUIRED = ("slope", "intercept", "residual_lo", "residual_hi", "cases")
# Bound on a calibration's slope, intercept and residuals: a fit on Dice values in [0, 1] stays far inside it.
CALIBRATION_LIMIT = 1000.0


class ContractError(ModelError):
    """A contract field with a wrong type or value; names the field."""

    def __init__(self, field_name: str, problem: str) -> None:
        self.field = field_name
        self.problem = problem
        super().__init__(f"contract field {field_name!r}: {problem}")

    def under(self, prefix: str) -> "ContractError":
        """The same error with its field path prefixed (e.g. 'stages[1].')."""
        return ContractError(prefix + self.field, self.problem)


def _number(value: Any, name: str, lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ContractError(name, f"must be a number, got {value!r}")
    value = float(value)
    below = value <= lo if open_lo else value < lo
    above = value >= hi if open_hi else value > hi
    if not math.isfinite(value) or below or above:
        bounds = f"{'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"
        raise ContractError(name, f"must be a finite number in {bounds}, got {value!r}")
    return value


def _integer(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise ContractError(name, f"must be an integer, got {value!r}")
    if not lo <= int(value) <= hi:
        raise ContractError(name, f"must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def _triple(value: Any, name: str, convert) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 3:
        raise ContractError(name, f"must be three values (one per axis), got {value!r}")
    return tuple(convert(v, f"{name}[{i}]") for i, v in enumerate(value))


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ContractError(name, f"must be a non-empty string, got {value!r}")
    return value


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ContractError(name, f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def _range(value: Any, name: str, lo: float = 0.0, hi: float = math.inf, *,
           closed: bool = False) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise ContractError(name, f"must be a (low, high) pair, got {value!r}")
    bounds = dict(open_lo=not closed, open_hi=not closed)
    low = _number(value[0], f"{name}[0]", lo, hi, **bounds)
    high = _number(value[1], f"{name}[1]", lo, hi, **bounds)
    if low > high:
        raise ContractError(name, f"low {low:g} is above high {high:g}")
    return low, high


def _ranges3(value: Any, name: str) -> tuple[tuple[float, float], ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 3:
        raise ContractError(name, f"must be three (low, high) pairs, got {value!r}")
    return tuple(_range(pair, f"{name}[{i}]") for i, pair in enumerate(value))


def _object(value: Any, name: str, cls: type, required: tuple[str, ...]) -> dict:
    """value as a dict holding only cls's fields and every required one."""
    if not isinstance(value, dict):
        raise ContractError(name, f"must be an object, got {value!r}")
    unknown = set(value) - {f.name for f in fields(cls)}
    if unknown:
        raise ContractError(f"{name}.{sorted(unknown)[0]}", "unknown field")
    missing = [key for key in required if key not in value]
    if missing:
        raise ContractError(f"{name}.{missing[0]}", "missing")
    return value


def check_plausibility(value: Any, name: str = "plausibility") -> Plausibility | None:
    """A validated Plausibility (from itself or its dict form), or None."""
    if value is None:
        return None
    if isinstance(value, Plausibility):
        value = value.to_dict()
    if isinstance(value, dict) and "sharpness" in value:
        # Files of format 3 written before edge_sharpness measured sharpness another way: not comparable, not checked.
        value = {key: item for key, item in value.items() if key != "sharpness"}
    value = _object(value, name, Plausibility, ("volume_ml", "extent_mm"))
    # The training scans' geometry is absent from models trained before QC learned it.
    optional = {key: None if value.get(key) is None else _ranges3(value[key], f"{name}.{key}")
                for key in ("spacing_mm", "fov_mm")}
    return Plausibility(
        volume_ml=_range(value["volume_ml"], f"{name}.volume_ml"),
        extent_mm=_ranges3(value["extent_mm"], f"{name}.extent_mm"),  # type: ignore[arg-type]
        cases=_integer(value.get("cases", 0), f"{name}.cases", 0, 10**9),
        margin=_number(value.get("margin", 1.0), f"{name}.margin", 1.0, 1000.0),
        input_margin=_number(value.get("input_margin", DEFAULT_INPUT_MARGIN), f"{name}.input_margin", 1.0, 1000.0),
        skewness=None if value.get("skewness") is None else _range(value["skewness"], f"{name}.skewness",
                                                                   -math.inf, math.inf),
        edge_sharpness=None if value.get("edge_sharpness") is None else _range(value["edge_sharpness"],
                                                                               f"{name}.edge_sharpness"),
        interior_rank=None if value.get("interior_rank") is None else _range(value["interior_rank"],
                                                                             f"{name}.interior_rank", 0.0, 1.0,
                                                                             closed=True),
        noise_level=None if value.get("noise_level") is None else _range(value["noise_level"],
                                                                         f"{name}.noise_level"),
        contrast=None if value.get("contrast") is None else _range(value["contrast"], f"{name}.contrast",
                                                                   -math.inf, math.inf),
        saturation=None if value.get("saturation") is None else _range(value["saturation"], f"{name}.saturation",
                                                                       0.0, 1.0, closed=True),
        orientation_atlases=_orientation_atlases(value.get("orientation_atlases"), f"{name}.orientation_atlases"),
        **optional,
    )


def _orientation_atlases(value: Any, name: str) -> OrientationAtlases | None:
    """Validated orientation atlases (from themselves or their dict form), or None (models trained before them)."""
    if value is None:
        return None
    if isinstance(value, OrientationAtlases):
        value = value.to_dict()
    value = _object(value, name, OrientationAtlases, ("atlases", "typical", "margin"))
    if not isinstance(value["atlases"], dict) or not isinstance(value["typical"], dict):
        raise ContractError(name, "atlases and typical must map family names to values")
    try:
        return OrientationAtlases.from_dict(value)
    except (TypeError, ValueError) as exc:
        raise ContractError(name, str(exc)) from None


def check_score_calibration(value: Any, name: str = "score_calibration") -> ScoreCalibration | None:
    """A validated ScoreCalibration (from itself or its dict form), or None."""
    if value is None:
        return None
    if isinstance(value, ScoreCalibration):
        value = value.to_dict()
    value = _object(value, name, ScoreCalibration, CALIBRATION_REQUIRED)
    defaults = {f.name: f.default for f in fields(ScoreCalibration) if f.default is not MISSING}
    get = lambda key: value.get(key, defaults[key])  # noqa: E731
    at = lambda key: f"{name}.{key}"  # noqa: E731
    review_below = _number(get("review_below"), at("review_below"), 0.0, 1.0)
    fail_below = _number(get("fail_below"), at("fail_below"), 0.0, 1.0)
    if fail_below > review_below:
        raise ContractError(at("fail_below"), f"{fail_below:g} is above review_below {review_below:g}")
    return ScoreCalibration(
        slope=_number(value["slope"], at("slope"), 0.0, CALIBRATION_LIMIT),
        intercept=_number(value["intercept"], at("intercept"), -CALIBRATION_LIMIT, CALIBRATION_LIMIT),
        residual_lo=_number(value["residual_lo"], at("residual_lo"), -CALIBRATION_LIMIT, 0.0),
        residual_hi=_number(value["residual_hi"], at("residual_hi"), 0.0, CALIBRATION_LIMIT),
        cases=_integer(value["cases"], at("cases"), 1, 10**9),
        coverage=_number(get("coverage"), at("coverage"), 0.0, 1.0, open_lo=True, open_hi=True),
        score=_choice(get("score"), at("score"), SCORES),
        review_below=review_below,
        fail_below=fail_below,
        score_range=_range(get("score_range"), at("score_range"), 0.0, 1.0, closed=True),
    )


@dataclass(frozen=True)
class StageContract:
    """One network of a cascade: its role, grid, patch, calibrated threshold and ONNX names."""

    name: str
    spacing: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    divisor: int = 8
    threshold: float | None = None
    crop_margin_mm: float = 0.0
    input_name: str = "image"
    prob_name: str = "prob"
    mask_name: str = "mask"
    # localiser: finds the target on the whole scan at low resolution; segmenter: makes the mask.
    role: str = SEGMENTER
    context: str = "pad"

    def __post_init__(self) -> None:
        put = lambda key, value: object.__setattr__(self, key, value)  # noqa: E731
        _text(self.name, "name")
        put("role", _choice(self.role, "role", ROLES))
        divisor = _integer(self.divisor, "divisor", 1, MAX_DIVISOR)
        if divisor & (divisor - 1):
            raise ContractError("divisor", f"must be a power of two (the network pools by 2), got {divisor}")
        put("divisor", divisor)
        put("spacing", _triple(self.spacing, "spacing", lambda v, n: _number(v, n, *SPACING_RANGE_MM)))
        patch = _triple(self.patch_size, "patch_size", lambda v, n: _integer(v, n, 1, MAX_PATCH))
        if any(p % divisor for p in patch):
            raise ContractError("patch_size", f"every size must be a multiple of the divisor {divisor}, got {patch}")
        put("patch_size", patch)
        if self.threshold is not None:
            put("threshold", _number(self.threshold, "threshold", 0.0, 1.0, open_lo=True, open_hi=True))
        put("crop_margin_mm", _number(self.crop_margin_mm, "crop_margin_mm", *MARGIN_RANGE_MM))
        put("context", _choice(self.context, "context", CONTEXTS))
        for key in ("input_name", "prob_name", "mask_name"):
            _text(getattr(self, key), key)


@dataclass(frozen=True)
class ModelContract:
    """The whole pre/post-processing contract of a model (a one- or two-stage cascade)."""

    stages: tuple[StageContract, ...]
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
    # The same fitted on test-time-augmented held-out predictions (--tta), whose scores run otherwise;
    # None: --tta uses score_calibration.
    tta_score_calibration: ScoreCalibration | None = None
    # True: the file is one graph from scan to mask; False: the stages' networks side by side (what training and
    # the export's parity checks run, and files exported before format 7).
    pipeline: bool = False

    def __post_init__(self) -> None:
        put = lambda key, value: object.__setattr__(self, key, value)  # noqa: E731
        version = _integer(self.format_version, "format_version", 1, 10**6)
        if version > FORMAT_VERSION:
            ModelContract._newer(version)
        put("format_version", version)
        if isinstance(self.stages, (str, bytes, dict)) or not hasattr(self.stages, "__iter__"):
            raise ContractError("stages", f"must be a list of stages, got {self.stages!r}")
        stages = tuple(self.stages)
        for i, stage in enumerate(stages):
            if not isinstance(stage, StageContract):
                raise ContractError(f"stages[{i}]", f"must be a stage, got {stage!r}")
        roles = tuple(s.role for s in stages)
        if roles not in LAYOUTS:
            raise ContractError("stages", f"roles {list(roles)} are not a model heartseg can run "
                                "(one segmenter, one localiser, or a localiser then a segmenter)")
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ContractError("stages", f"stage names repeat: {names}")
        onnx_names = [n for s in stages for n in (s.input_name, s.prob_name, s.mask_name)]
        if len(set(onnx_names)) != len(onnx_names):
            raise ContractError("stages", f"ONNX input and output names repeat: {onnx_names}")
        put("stages", stages)
        put("orientation", _choice(self.orientation, "orientation", ORIENTATIONS))
        put("normalization", _choice(self.normalization, "normalization", NORMALIZATIONS))
        for key in ("largest_component", "pipeline"):
            if not isinstance(getattr(self, key), bool):
                raise ContractError(key, f"must be true or false, got {getattr(self, key)!r}")
        put("plausibility", check_plausibility(self.plausibility))
        if self.max_foreground_fraction is not None:
            put("max_foreground_fraction", _number(self.max_foreground_fraction, "max_foreground_fraction", 0.0, 1.0,
                                                   open_lo=True))
        put("bytes_per_voxel", _integer(self.bytes_per_voxel, "bytes_per_voxel", *BYTES_PER_VOXEL_RANGE))
        if not isinstance(self.info, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                       for k, v in self.info.items()):
            raise ContractError("info", "must map strings to strings")
        put("info", dict(self.info))
        put("score_calibration", check_score_calibration(self.score_calibration))
        put("tta_score_calibration", check_score_calibration(self.tta_score_calibration, "tta_score_calibration"))

    @property
    def localiser(self) -> StageContract | None:
        """The stage that finds the target for the segmenter, if the model has one in front of it."""
        return self.stages[0] if self.is_cascade else None

    @property
    def is_cascade(self) -> bool:
        """True for a localiser followed by a segmenter."""
        return tuple(s.role for s in self.stages) == (LOCALISER, SEGMENTER)

    @property
    def final_stage(self) -> StageContract:
        """The stage whose probabilities make the mask."""
        return self.stages[-1]

    @property
    def final_box_cap(self) -> tuple[int, ...] | None:
        """The most voxels per axis the final stage's box may span in the model's graph: the largest plausible
        atrium extent plus the margin on both sides, rounded up to the divisor (None without learned ranges)."""
        if self.plausibility is None:
            return None
        final = self.final_stage
        largest = max(hi for _, hi in self.plausibility.extent_mm) + 2 * final.crop_margin_mm
        return tuple(-(-math.ceil(largest / s) // final.divisor) * final.divisor for s in final.spacing)

    def stage(self, name: str) -> StageContract:
        """The stage called name."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    def with_threshold(self, stage_name: str, threshold: float) -> "ModelContract":
        """A new contract whose named stage has the given threshold."""
        self.stage(stage_name)
        return replace(self, stages=tuple(replace(s, threshold=threshold) if s.name == stage_name else s
                                          for s in self.stages))

    def for_qc(self, tta: bool = False) -> "ModelContract":
        """The contract QC judges a mask by: with tta, its test-time-augmented score calibration when it has one."""
        if tta and self.tta_score_calibration is not None:
            return replace(self, score_calibration=self.tta_score_calibration)
        return self

    def require_thresholds(self) -> "ModelContract":
        """Self, when every stage has a calibrated threshold; ContractError otherwise."""
        for i, stage in enumerate(self.stages):
            if stage.threshold is None:
                raise ContractError(f"stages[{i}].threshold", f"stage {stage.name!r} has no calibrated threshold")
        return self

    def to_dict(self) -> dict:
        """Plain JSON form (lists, dicts, numbers and strings)."""
        return json.loads(json.dumps(asdict(self)))

    def to_json(self) -> str:
        """Serialise to JSON."""
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> "ModelContract":
        """Build from a plain dict (as read from JSON); ContractError names the first bad field."""
        if not isinstance(data, dict):
            raise ContractError("(contract)", f"must be an object, got {type(data).__name__}")
        data = dict(data)
        version = data.get("format_version", 1)
        _integer(version, "format_version", 1, 10**6)
        if int(version) > FORMAT_VERSION:
            cls._newer(int(version))
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ContractError(sorted(unknown)[0], "unknown field")
        # A file of an earlier format learned its skewness over the whole scan: a range the measure no longer reads.
        # Dropped as the file is read, not in memory, where a contract's new ranges may meet its old format number.
        plausibility = data.get("plausibility")
        if int(version) < LOCAL_SKEWNESS_FORMAT and isinstance(plausibility, dict) and "skewness" in plausibility:
            data["plausibility"] = {**plausibility, "skewness": None}
        raw_stages = data.pop("stages", None)
        if not isinstance(raw_stages, list) or not raw_stages:
            raise ContractError("stages", f"must be a non-empty list, got {raw_stages!r}")
        if len(raw_stages) > 2:
            raise ContractError("stages", f"at most two stages, got {len(raw_stages)}")
        stages = []
        for i, raw in enumerate(raw_stages):
            stages.append(cls._stage_from_dict(raw, i, len(raw_stages), int(version)))
        return cls(stages=tuple(stages), **data)

    @staticmethod
    def _newer(version: int) -> None:
        raise ContractError("format_version", f"{version} is from a newer heartseg (this one reads formats 1 to "
                            f"{FORMAT_VERSION}); upgrade heartseg to use this model")

    @staticmethod
    def _stage_from_dict(raw: Any, index: int, count: int, version: int) -> StageContract:
        where = f"stages[{index}]"
        if not isinstance(raw, dict):
            raise ContractError(where, f"must be an object, got {raw!r}")
        unknown = set(raw) - {f.name for f in fields(StageContract)}
        if unknown:
            raise ContractError(f"{where}.{sorted(unknown)[0]}", "unknown field")
        missing = {"name", "spacing", "patch_size"} - set(raw)
        if version >= 3:
            missing |= {"role"} - set(raw)
        if missing:
            raise ContractError(f"{where}.{sorted(missing)[0]}", "missing")
        raw = dict(raw)
        if "role" not in raw:
            # Before format 3 a two-stage model was always a localiser followed by the segmenter.
            raw["role"] = LOCALISER if count == 2 and index == 0 else SEGMENTER
        try:
            return StageContract(**raw)
        except ContractError as exc:
            raise exc.under(where + ".") from None

    @classmethod
    def from_json(cls, text: str) -> "ModelContract":
        """Parse the JSON form."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ContractError("(contract)", f"not valid JSON ({exc})") from None
        return cls.from_dict(data)
