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
    ("networks-claiming-pipeline", _set("pipeline", True), "pipeline"),
    ("pipeline-not-boolean", _set("pipeline", "yes"), "pipeline"),
]
# Cases about the stages' own ONNX names, which only a file of the networks side by side exposes as its inputs and
# outputs: built without the pipeline graph around them.
NETWORKS_CASES = {"unknown-output", "unknown-input", "networks-claiming-pipeline"}


@pytest.mark.parametrize("case,edit,field", BAD_CONTRACTS, ids=[c[0] for c in BAD_CONTRACTS])
def test_bad_contract_is_refused_when_the_model_opens(tmp_path: Path, run_cli, case: str, edit, field: str) -> None:
    model = build_test_model(tmp_path / "bad.onnx", cascade=True, edit_contract=edit, pipeline=case not in NETWORKS_CASES)
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
    from heartseg.runtime.qc import ScoreCalibration
    from heartseg.runtime.qc import Plausibility

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


# --- the model digest: a model whose graph or contract changed after export is refused when it opens ------

DIGEST_KEY = "heartseg.model_digest"


def expected_digest(proto) -> str:
    """The model digest by its definition, computed with onnx from a file onnx wrote (fields in number order):
    SHA-256 of the ModelProto without metadata_props, followed by the contract's JSON."""
    import hashlib

    bare = type(proto)()
    bare.CopyFrom(proto)
    del bare.metadata_props[:]
    contract = {p.key: p.value for p in proto.metadata_props}["heartseg.contract"]
    return hashlib.sha256(bare.SerializeToString() + contract.encode("utf-8")).hexdigest()


def _edit_proto(path: Path, edit) -> Path:
    """Load the model file with onnx, let edit change the ModelProto in place, and save it back."""
    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(path))
    edit(proto)
    onnx.save(proto, str(path))
    return path


def _flip_sign(name: str):
    """An edit that negates one initializer, leaving the metadata (the recorded digest too) as it was."""
    from onnx import numpy_helper

    def edit(proto) -> None:
        (index,) = [i for i, init in enumerate(proto.graph.initializer) if init.name == name]
        flipped = -numpy_helper.to_array(proto.graph.initializer[index])
        proto.graph.initializer[index].CopyFrom(numpy_helper.from_array(flipped, name))

    return edit


def _drop_metadata(key: str):
    def edit(proto) -> None:
        kept = [(p.key, p.value) for p in proto.metadata_props if p.key != key]
        del proto.metadata_props[:]
        for k, v in kept:
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v

    return edit


def test_a_model_whose_weights_changed_after_export_is_refused(tmp_path: Path, run_cli) -> None:
    model = build_test_model(tmp_path / "m.onnx", cascade=True, bias=-2.0)
    scan, _ = make_scan(tmp_path / "scans" / "s.nii.gz")
    assert run_cli(infer_app, scan, "-o", tmp_path / "before", "--model", model).exit_code == 0
    _edit_proto(model, _flip_sign("fine_bias"))
    with pytest.raises(ModelError, match="altered or damaged"):
        read_contract(model)
    out = tmp_path / "out"
    result = run_cli(infer_app, scan, "-o", out, "--model", model)
    assert_one_line_error(result, str(model), "altered or damaged")
    assert_nothing_written(out)
    assert_one_line_error(run_cli(infer_app, "--model", model, "--info"), str(model), "altered or damaged")


def test_a_damaged_byte_in_the_weights_is_refused(tmp_path: Path) -> None:
    """A single flipped bit in a stored weight (the file still loads in ONNX Runtime) is caught without onnx."""
    import struct

    model = build_test_model(tmp_path / "m.onnx", scale=1.8173)
    data = bytearray(model.read_bytes())
    weight = struct.pack("<f", 1.8173)
    assert data.count(weight) == 1
    data[data.index(weight) + 3] ^= 0x01  # a bit of the exponent: 1.8173 becomes about 0.454
    model.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="altered or damaged"):
        read_contract(model)


def _file_digest(model: Path) -> str:
    from heartseg.runtime.model_digest import scan_model

    onnx = pytest.importorskip("onnx")
    contract = {p.key: p.value for p in onnx.load(str(model)).metadata_props}["heartseg.contract"]
    return scan_model(model.read_bytes()).digest(contract)


def test_the_digest_is_of_all_but_the_metadata_and_other_metadata_may_change(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    model = build_test_model(tmp_path / "m.onnx", cascade=True)
    proto = onnx.load(str(model))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta[DIGEST_KEY] == expected_digest(proto)
    assert _file_digest(model) == meta[DIGEST_KEY]

    def annotate(proto) -> None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = "site.note", "reviewed"

    _edit_proto(model, annotate)
    contract, meta = read_contract(model)
    assert meta["site.note"] == "reviewed" and meta[DIGEST_KEY] == _file_digest(model)


def test_a_model_without_a_digest_opens_with_a_warning(tmp_path: Path) -> None:
    """Files exported before the digest was recorded still run, but say that their weights cannot be checked."""
    from heartseg.runtime.model_digest import UnverifiedModelWarning

    model = _edit_proto(build_test_model(tmp_path / "old.onnx"), _drop_metadata(DIGEST_KEY))
    with pytest.warns(UnverifiedModelWarning, match="no weights digest"):
        contract, meta = read_contract(model)
    assert DIGEST_KEY not in meta and contract.final_stage.name == "single"


@pytest.mark.parametrize("raw,problem", [
    (b"", "no graph"),
    (b"\x3a\x02ab\x3a\x01c", "more than one graph"),
    (b"\x3a\x05ab", "ends inside"),
    (b"\x08\xff", "ends inside"),
    (b"\x0b", "wire type 3"),
], ids=["empty", "two-graphs", "truncated-graph", "truncated-varint", "group"])
def test_the_digest_reader_refuses_a_malformed_file(raw: bytes, problem: str) -> None:
    from heartseg.runtime.model_digest import DigestError, scan_model

    with pytest.raises(DigestError, match=problem):
        scan_model(raw)


def test_a_model_without_a_digest_is_one_warning_line_in_the_cli(tmp_path: Path) -> None:
    """The CLI shows the missing digest as one 'warning:' line, not as Python's warning with file and line."""
    import subprocess
    import sys

    model = _edit_proto(build_test_model(tmp_path / "old.onnx"), _drop_metadata(DIGEST_KEY))
    scan, _ = make_scan(tmp_path / "in" / "s.nii.gz")
    proc = subprocess.run([sys.executable, "-m", "heartseg.runtime.cli_infer", str(scan), "-o", str(tmp_path / "out"),
                           "--model", str(model), "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode in (0, 3), proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "no weights digest" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: "), proc.stderr
    assert "UserWarning" not in proc.stderr and "warnings.warn" not in proc.stderr
    assert (tmp_path / "out" / "s_mask.nii.gz").is_file()


def _bump_opset(proto) -> None:
    proto.opset_import[0].version += 1


def _add_function(proto) -> None:
    from onnx import helper

    proto.functions.append(helper.make_function("site.local", "Unused", ["x"], ["y"],
                                                [helper.make_node("Identity", ["x"], ["y"])],
                                                [helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("edit", [_bump_opset, _add_function], ids=["opset", "model-local-function"])
def test_a_model_changed_outside_its_graph_after_export_is_refused(tmp_path: Path, edit) -> None:
    """The operator sets and model-local functions decide what the graph computes: they are digested too."""
    model = _edit_proto(build_test_model(tmp_path / "m.onnx"), edit)
    with pytest.raises(ModelError, match="altered or damaged"):
        read_contract(model)


def test_a_model_whose_contract_changed_after_export_is_refused(tmp_path: Path) -> None:
    """An edited threshold in the metadata would change every mask as surely as an edited weight."""

    def lower_threshold(proto) -> None:
        (entry,) = [p for p in proto.metadata_props if p.key == "heartseg.contract"]
        contract = json.loads(entry.value)
        contract["stages"][0]["threshold"] = 0.25
        entry.value = json.dumps(contract)

    model = _edit_proto(build_test_model(tmp_path / "m.onnx"), lower_threshold)
    with pytest.raises(ModelError, match="altered or damaged"):
        read_contract(model)


def test_a_model_with_external_weights_is_refused_at_export_and_when_it_opens(tmp_path: Path, monkeypatch) -> None:
    """Weights in a file beside the model are outside any digest of the model file: never written, never run."""
    onnx = pytest.importorskip("onnx")
    from heartseg.export.stamp import write_model
    from heartseg.runtime.errors import HeartsegError

    external = tmp_path / "external.onnx"
    proto = onnx.load(str(build_test_model(tmp_path / "m.onnx")))
    for tensor in proto.graph.initializer:  # raw bytes, the form onnx moves into external files
        tensor.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor), tensor.name))
    onnx.save(proto, str(external), save_as_external_data=True, location="external.weights", size_threshold=0)
    assert (tmp_path / "external.weights").stat().st_size > 0
    proto = onnx.load(str(external), load_external_data=False)
    with pytest.raises(HeartsegError, match="external data"):
        write_model(proto, tmp_path / "stamped.onnx")
    assert not (tmp_path / "stamped.onnx").exists()
    monkeypatch.chdir(tmp_path)  # where ONNX Runtime looks for the weights of a model given as bytes
    with pytest.raises(ModelError, match="external data"):
        read_contract(external)


def test_a_session_keeps_the_file_sha256_and_runs_the_bytes_it_verified(tmp_path: Path, monkeypatch) -> None:
    import hashlib

    import onnxruntime
    from heartseg.runtime.session import OnnxSession

    model = build_test_model(tmp_path / "m.onnx", cascade=True)
    parsed = []
    real = onnxruntime.InferenceSession

    def recording(source, *args, **kwargs):
        parsed.append(source)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    session = OnnxSession(model, device="cpu", threads=1)
    assert session.file_sha256 == hashlib.sha256(model.read_bytes()).hexdigest()
    (source,) = parsed  # the file is parsed once, from the bytes that were hashed
    assert isinstance(source, bytes) and hashlib.sha256(source).hexdigest() == session.file_sha256


def test_a_skewness_range_learned_over_the_whole_scan_is_not_judged() -> None:
    """Files before format 8 learned the intensity skewness over the whole scan; the measure now reads it around the
    atrium, so such a range is dropped when the file is read, and a format-8 range is kept."""
    from heartseg.runtime.contract import LOCAL_SKEWNESS_FORMAT
    from heartseg.runtime.qc import Plausibility

    plausibility = Plausibility(volume_ml=(10.0, 200.0), extent_mm=((10, 60), (20, 80), (30, 90)),
                                skewness=(-0.5, 2.0))
    contract = ModelContract(stages=(StageContract("fine", (1.25, 1.25, 1.25), (64, 64, 64)),),
                             plausibility=plausibility)
    data = json.loads(contract.to_json())
    assert ModelContract.from_dict(data).plausibility.skewness == (-0.5, 2.0)
    data["format_version"] = LOCAL_SKEWNESS_FORMAT - 1
    older = ModelContract.from_dict(data).plausibility
    assert older.skewness is None and older.volume_ml == (10.0, 200.0)
