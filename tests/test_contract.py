"""The contract schema: a bad model is refused when it is opened (exit 2, one line naming the model and
the field), never per scan and never by writing wrong masks."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from heartseg.runtime.cli_infer import app as infer_app
from heartseg.runtime.contract import FORMAT_VERSION, ContractError, ModelContract, StageContract
from heartseg.runtime.errors import ModelError
from heartseg.runtime.session import read_contract
from onnx_models import build_test_model, make_scan
from test_bad_input import assert_nothing_written, assert_one_line_error


def _set(path: str, value):
    """An edit that sets a dotted path (stages.1.threshold) in the contract dict."""

    def edit(contract: dict) -> None:
        keys = path.split(".")
        target = contract
        for key in keys[:-1]:
            target = target[int(key)] if isinstance(target, list) else target[key]
        last = keys[-1]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return edit


# A valid score calibration (QC's estimated Dice), for the cases that break one of its fields.
CALIBRATION = {"slope": 1.0, "intercept": 0.0, "residual_lo": -0.05, "residual_hi": 0.05, "cases": 5}
EXTENTS = [[10, 60], [20, 80], [30, 90]]


_DROP = object()  # a _calibration change that removes the field


def _calibration(**changes) -> dict:
    return {key: value for key, value in {**CALIBRATION, **changes}.items() if value is not _DROP}

# (case id, contract edit, field the error must name) -- every case listed in the hardening issue, and the QC blocks.
BAD_CONTRACTS = [
    ("threshold-text", _set("stages.1.threshold", "abc"), "stages[1].threshold"),
    ("threshold-nan", _set("stages.1.threshold", math.nan), "stages[1].threshold"),
    ("threshold-above-1", _set("stages.1.threshold", 1.5), "stages[1].threshold"),
    ("threshold-negative", _set("stages.1.threshold", -1), "stages[1].threshold"),
    ("localiser-threshold-missing", _set("stages.0.threshold", None), "stages[0].threshold"),
    ("spacing-zero", _set("stages.1.spacing", [0, 1.25, 1.25]), "stages[1].spacing[0]"),
    ("spacing-two-values", _set("stages.1.spacing", [1.25, 1.25]), "stages[1].spacing"),
    ("spacing-negative", _set("stages.0.spacing", [-5, 5, 5]), "stages[0].spacing[0]"),
    ("divisor-zero", _set("stages.1.divisor", 0), "stages[1].divisor"),
    ("divisor-seven", _set("stages.1.divisor", 7), "stages[1].divisor"),
    ("divisor-negative", _set("stages.1.divisor", -8), "stages[1].divisor"),
    ("patch-not-multiple", _set("stages.1.patch_size", [60, 64, 64]), "stages[1].patch_size"),
    ("margin-negative", _set("stages.1.crop_margin_mm", -1000), "stages[1].crop_margin_mm"),
    ("orientation-xyz", _set("orientation", "XYZ"), "orientation"),
    ("orientation-lps", _set("orientation", "LPS"), "orientation"),
    ("unknown-output", _set("stages.1.prob_name", "no_such_output"), "stages[1].prob_name"),
    ("unknown-input", _set("stages.0.input_name", "no_such_input"), "stages[0].input_name"),
    ("no-stages", _set("stages", []), "stages"),
    ("two-segmenters", _set("stages.0.role", "segmenter"), "stages"),
    ("bad-role", _set("stages.0.role", "detector"), "stages[0].role"),
    ("bytes-per-voxel-zero", _set("bytes_per_voxel", 0), "bytes_per_voxel"),
    ("unknown-field", _set("colour", "red"), "colour"),
    ("normalization", _set("normalization", "minmax"), "normalization"),
    ("plausibility-inverted", _set("plausibility", {"volume_ml": [90, 10], "extent_mm": [[1, 2], [1, 2], [1, 2]]}),
     "plausibility.volume_ml"),
    ("plausibility-negative", _set("plausibility", {"volume_ml": [1, 10], "extent_mm": [[-1, 2], [1, 2], [1, 2]]}),
     "plausibility.extent_mm[0][0]"),
    ("max-fraction", _set("max_foreground_fraction", 1.5), "max_foreground_fraction"),
    ("format-version-text", _set("format_version", "two"), "format_version"),
    ("calibration-not-object", _set("score_calibration", "abc"), "score_calibration"),
    ("calibration-slope-nan", _set("score_calibration", _calibration(slope=math.nan)), "score_calibration.slope"),
    ("calibration-slope-negative", _set("score_calibration", _calibration(slope=-1.0)), "score_calibration.slope"),
    ("calibration-no-intercept", _set("score_calibration", _calibration(intercept=_DROP)),
     "score_calibration.intercept"),
    ("calibration-lower-residual-positive", _set("score_calibration", _calibration(residual_lo=0.1)),
     "score_calibration.residual_lo"),
    ("calibration-no-cases", _set("score_calibration", _calibration(cases=0)), "score_calibration.cases"),
    ("calibration-unknown-score", _set("score_calibration", _calibration(score="entropy")), "score_calibration.score"),
    ("calibration-fail-above-review", _set("score_calibration", _calibration(review_below=0.5, fail_below=0.8)),
     "score_calibration.fail_below"),
    ("calibration-score-range", _set("score_calibration", _calibration(score_range=[0.2, 1.5])),
     "score_calibration.score_range[1]"),
    ("calibration-unknown-field", _set("score_calibration", _calibration(bias=0.1)), "score_calibration.bias"),
    ("plausibility-spacing-inverted", _set("plausibility", {"volume_ml": [1, 10], "extent_mm": EXTENTS,
                                                            "spacing_mm": [[2, 1], [1, 2], [1, 2]]}),
     "plausibility.spacing_mm[0]"),
    ("plausibility-fov-two-ranges", _set("plausibility", {"volume_ml": [1, 10], "extent_mm": EXTENTS,
                                                          "fov_mm": [[100, 200], [100, 200]]}),
     "plausibility.fov_mm"),
    ("plausibility-interior-rank-above-one", _set("plausibility", {"volume_ml": [1, 10], "extent_mm": EXTENTS,
                                                                  "interior_rank": [0.5, 1.2]}),
     "plausibility.interior_rank[1]"),
    ("plausibility-input-margin", _set("plausibility", {"volume_ml": [1, 10], "extent_mm": EXTENTS,
                                                        "input_margin": 0.5}),
     "plausibility.input_margin"),
]


@pytest.mark.parametrize("edit,field", [c[1:] for c in BAD_CONTRACTS], ids=[c[0] for c in BAD_CONTRACTS])
def test_bad_contract_is_refused_when_the_model_opens(tmp_path: Path, run_cli, edit, field: str) -> None:
    model = build_test_model(tmp_path / "bad.onnx", cascade=True, edit_contract=edit)
    scan, _ = make_scan(tmp_path / "scans" / "s.nii.gz")
    out = tmp_path / "out"
    result = run_cli(infer_app, scan, "-o", out, "--model", model)
    assert_one_line_error(result, str(model), repr(field))
    assert scan.name not in result.output  # the model is at fault, not the scan
    assert_nothing_written(out)
    info = run_cli(infer_app, "--model", model, "--info")
    assert_one_line_error(info, str(model), repr(field))


def test_model_from_a_newer_heartseg(tmp_path: Path, run_cli) -> None:
    model = build_test_model(tmp_path / "new.onnx", edit_contract=_set("format_version", FORMAT_VERSION + 1))
    scan, _ = make_scan(tmp_path / "s.nii.gz")
    result = run_cli(infer_app, scan, "-o", tmp_path / "out", "--model", model)
    assert_one_line_error(result, str(model), "newer heartseg", "upgrade")


def test_format_1_contract_still_loads_with_inferred_roles(tmp_path: Path) -> None:
    def as_format_1(contract: dict) -> None:
        contract["format_version"] = 1
        contract["max_foreground_fraction"] = 0.05
        for stage in contract["stages"]:
            del stage["role"]

    model = build_test_model(tmp_path / "old.onnx", cascade=True, edit_contract=as_format_1)
    contract, _ = read_contract(model)
    assert [s.role for s in contract.stages] == ["localiser", "segmenter"]
    assert contract.is_cascade and contract.localiser is contract.stages[0]


def test_format_3_needs_explicit_roles() -> None:
    good = json.loads(ModelContract(stages=(StageContract("s", (1, 1, 1), (8, 8, 8), threshold=0.5),)).to_json())
    del good["stages"][0]["role"]
    with pytest.raises(ContractError, match=r"stages\[0\]\.role"):
        ModelContract.from_dict(good)


def _stage(name: str, spacing: float, role: str) -> StageContract:
    return StageContract(name, (spacing,) * 3, (16, 16, 16), threshold=0.5, role=role, input_name=f"{name}_image",
                         prob_name=f"{name}_prob", mask_name=f"{name}_mask")


def test_contract_is_immutable_and_calibration_builds_a_new_one() -> None:
    stages = (_stage("loc", 4, "localiser"), _stage("seg", 1, "segmenter"))
    contract = ModelContract(stages=stages)
    with pytest.raises(dataclasses.FrozenInstanceError):
        contract.stages[1].threshold = 0.7  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        contract.orientation = "LPS"  # type: ignore[misc]
    changed = contract.with_threshold("seg", 0.7)
    assert changed.final_stage.threshold == 0.7 and contract.final_stage.threshold == 0.5
    with pytest.raises(ContractError, match="threshold"):
        contract.with_threshold("seg", 1.5)
    with pytest.raises(ContractError):
        dataclasses.replace(contract, orientation="LPS")


def test_role_decides_the_localiser_not_the_name() -> None:
    stages = (_stage("first", 4, "localiser"), _stage("coarse", 1, "segmenter"))
    contract = ModelContract(stages=stages)
    assert contract.localiser.name == "first" and contract.final_stage.name == "coarse"
    alone = ModelContract(stages=(stages[1],))
    assert alone.localiser is None and not alone.is_cascade


def test_contract_error_is_a_model_error() -> None:
    assert issubclass(ContractError, ModelError)
    assert ContractError("x", "bad").exit_code == 2


def _qc_contract() -> ModelContract:
    from heartseg.runtime.confidence import ScoreCalibration
    from heartseg.runtime.plausibility import Plausibility

    plausibility = Plausibility(volume_ml=(20.0, 200.0), extent_mm=((20.0, 80.0), (25.0, 100.0), (30.0, 120.0)),
                                cases=12, margin=1.5, spacing_mm=((0.5, 2.0), (0.5, 2.0), (0.6, 2.5)),
                                fov_mm=((60.0, 400.0), (100.0, 500.0), (120.0, 520.0)), input_margin=2.0)
    calibration = ScoreCalibration(slope=0.8, intercept=0.12, residual_lo=-0.06, residual_hi=0.04, cases=12,
                                   coverage=0.8, review_below=0.8, fail_below=0.4, score_range=(0.61, 0.97))
    stages = (_stage("loc", 4, "localiser"), _stage("seg", 1, "segmenter"))
    return ModelContract(stages=stages, plausibility=plausibility, score_calibration=calibration)


def test_qc_blocks_round_trip_through_json_and_dict() -> None:
    contract = _qc_contract()
    assert ModelContract.from_json(contract.to_json()) == contract
    assert ModelContract.from_dict(contract.to_dict()) == contract
    back = ModelContract.from_json(contract.to_json())
    assert back.score_calibration.score_range == (0.61, 0.97) and back.score_calibration.fail_below == 0.4
    assert back.plausibility.fov_mm[2] == (120.0, 520.0) and back.plausibility.input_margin == 2.0


def test_qc_blocks_are_validated_on_replace_and_built_from_their_dict_form() -> None:
    contract = _qc_contract()
    with pytest.raises(ContractError, match=r"score_calibration\.residual_hi"):
        dataclasses.replace(contract, score_calibration={**contract.score_calibration.to_dict(), "residual_hi": -0.1})
    with pytest.raises(ContractError, match=r"plausibility\.spacing_mm\[1\]\[0\]"):
        dataclasses.replace(contract, plausibility={**contract.plausibility.to_dict(),
                                                    "spacing_mm": [[0.5, 2], [0, 2], [0.5, 2]]})
    with pytest.raises(dataclasses.FrozenInstanceError):
        contract.score_calibration.slope = 2.0  # type: ignore[misc]
    rebuilt = dataclasses.replace(contract, score_calibration=contract.score_calibration.to_dict())
    assert rebuilt == contract and type(rebuilt.score_calibration) is type(contract.score_calibration)
    uncalibrated = dataclasses.replace(contract, score_calibration=None)
    assert uncalibrated.score_calibration is None and contract.score_calibration is not None


def test_format_2_contract_without_roles_keeps_its_qc_blocks() -> None:
    """What heartseg-train wrote before roles existed: format 2, no roles, QC's calibration and geometry."""
    data = _qc_contract().to_dict()
    data["format_version"] = 2
    for stage in data["stages"]:
        del stage["role"]
    contract = ModelContract.from_dict(data)
    assert [s.role for s in contract.stages] == ["localiser", "segmenter"] and contract.format_version == 2
    assert contract.score_calibration == _qc_contract().score_calibration
    assert contract.plausibility == _qc_contract().plausibility
    assert ModelContract.from_json(contract.to_json()) == contract


def test_qc_blocks_are_optional() -> None:
    """Models from before QC: no calibration, plausibility without the training scans' geometry."""
    data = _qc_contract().to_dict()
    del data["score_calibration"]
    for key in ("spacing_mm", "fov_mm", "input_margin"):
        del data["plausibility"][key]
    contract = ModelContract.from_dict(data)
    assert contract.score_calibration is None
    assert contract.plausibility.spacing_mm is None and contract.plausibility.fov_mm is None


def test_a_stage_context_round_trips_and_a_format_5_stage_reads_as_padded() -> None:
    stage = StageContract("fine", (1.25, 1.25, 1.25), (64, 64, 64), context="scan")
    contract = ModelContract(stages=[stage])
    assert ModelContract.from_json(contract.to_json()).stages[0].context == "scan"
    old = contract.to_dict()
    old["format_version"] = 5
    del old["stages"][0]["context"]
    assert ModelContract.from_dict(old).stages[0].context == "pad"
    with pytest.raises(ContractError, match="context"):
        StageContract("fine", (1.25, 1.25, 1.25), (64, 64, 64), context="mirror")
