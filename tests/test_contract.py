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


# (case id, contract edit, field the error must name) -- every case listed in the hardening issue.
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
