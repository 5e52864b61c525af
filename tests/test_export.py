"""heartseg-export: parity, graph, baked threshold, metadata, refusal of unsafe or incomplete checkpoints,
and the exported file running in heartseg-infer without PyTorch.

Reuses the tiny cascade trained once per session by `trained_run` (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("torch", reason="the training side needs PyTorch: pip install -e '.[train]'")
import onnx
import pytest
import torch
from conftest import unwrapped
from heartseg.export.cli import app
from heartseg.export.pipeline_file import networks_file
from heartseg.runtime.contract import ModelContract
from heartseg.runtime.errors import HeartsegError
from heartseg.runtime.formats.nifti import load_volume
from heartseg.runtime.preprocess import stage_grid, to_canonical
from heartseg.runtime.session import OnnxSession, read_contract
from typer.testing import CliRunner

SCAN = "syn_001.nii.gz"
HELD_OUT = "syn_000"  # fold 0 validates on syn_000 and syn_005


def _export(checkpoint: Path, output: Path, *extra: str):
    return CliRunner().invoke(app, [str(checkpoint), "-o", str(output), "--threads", "1", *extra])


def _assert_refused(result, needles: list[str]) -> None:
    text = unwrapped(result.output)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output and "error:" in text, text
    for needle in needles:
        assert needle in text, (needle, text)


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    """trained_run's model.pt exported (with the parity check on one scan): the ONNX path."""
    out = tmp_path_factory.mktemp("export") / "M.onnx"
    result = _export(trained_run.model, out, "--scan", str(trained_run.data / "imagesTr" / SCAN))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    return out


@pytest.fixture(scope="module")
def checkpoint(trained_run) -> dict:
    return torch.load(trained_run.model, map_location="cpu", weights_only=True)


def _fine_input(trained_run, contract: ModelContract, name: str = SCAN) -> np.ndarray:
    """A real scan on the fine stage's grid, cropped to multiples of 8: (1, 1, X, Y, Z)."""
    stage = contract.stage("fine")
    canonical = to_canonical(load_volume(trained_run.data / "imagesTr" / name), contract.orientation)
    grid = stage_grid(canonical.data, canonical.spacing, stage.spacing, contract.normalization)
    keep = tuple(slice(0, s - s % stage.divisor) for s in grid.shape)
    return np.ascontiguousarray(grid[keep][None, None], dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------
# Parity and graph


def test_parity_report_within_tolerances(exported):
    report = json.loads(exported.with_name("M.parity.json").read_text())
    # PyTorch against ONNX Runtime on the networks; then the pipeline graph against the reference pipeline.
    networks = [r for r in report if not r["what"].endswith(": pipeline graph")]
    graph = [r for r in report if r["what"].endswith(": pipeline graph")]
    whats = [r["what"] for r in networks]
    assert any(w.startswith("coarse") for w in whats) and any(w.startswith("fine") for w in whats)
    assert any(w.startswith(SCAN) for w in whats), whats
    assert len(networks) == 3
    for r in networks:
        assert r["ok"] is True, r
        assert r["max_abs_diff"] <= 1e-4, r
        assert r["mask_agreement"] >= 0.9999, r
    assert [r["what"] for r in graph] == [f"{SCAN}: pipeline graph"]
    assert graph[0]["ok"] is True and graph[0]["dice"] >= 0.995, graph


def test_parity_refuses_a_file_that_computes_something_else(trained_run, exported):
    """The check can fail: PyTorch weights nudged after export make the same ONNX file disagree."""
    from heartseg.export.model_file import load_trained_model
    from heartseg.export.parity import ParityError, check_parity

    model = load_trained_model(trained_run.model)
    with networks_file(exported) as networks:
        assert all(r.ok for r in check_parity(model, networks, [trained_run.data / "imagesTr" / SCAN], threads=1))
        with torch.no_grad():
            for parameter in model.networks["fine"].parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
        with pytest.raises(ParityError, match="fine: random input"):
            check_parity(model, networks, threads=1)


def test_scan_tolerance_is_wider_than_the_random_input_one():
    from heartseg.export.parity import MAX_ABS_DIFF, MAX_ABS_DIFF_SCAN, _compare

    ref = np.array([0.2, 0.6, 0.9], np.float32)
    got = ref + np.float32(5e-4)
    assert not _compare("fine: random input", ref, got, ref > 0.5, got > 0.5, MAX_ABS_DIFF).ok
    assert _compare("scan: whole pipeline", ref, got, ref > 0.5, got > 0.5, MAX_ABS_DIFF_SCAN).ok
    flipped = np.array([0.2, 0.4, 0.9], np.float32)  # a voxel across the threshold: masks disagree
    assert not _compare("scan: whole pipeline", ref, flipped, ref > 0.5, flipped > 0.5, 1.0).ok


def test_batchnorm_is_folded_into_the_convolutions(trained_run, tmp_path):
    from dataclasses import replace

    from heartseg.export.model_file import load_trained_model
    from heartseg.export.onnx_export import export_onnx
    from heartseg.train.unet import build_unet

    model = load_trained_model(trained_run.model)
    unets = {name: replace(cfg, norm="batch") for name, cfg in model.unets.items()}
    networks = {name: build_unet(cfg).eval() for name, cfg in unets.items()}
    assert any(isinstance(m, torch.nn.BatchNorm3d) for net in networks.values() for m in net.modules())
    path = export_onnx(replace(model, networks=networks, unets=unets), tmp_path / "bn.onnx")
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops and "Conv" in ops


def test_graph_is_thresholded(exported):
    with networks_file(exported) as networks:
        model = onnx.load(str(networks))
    ops = {node.op_type for node in model.graph.node}
    assert "BatchNormalization" not in ops
    assert {"Sigmoid", "Greater", "Conv"} <= ops
    outputs = {o.name: o.type.tensor_type.elem_type for o in model.graph.output}
    assert outputs == {"coarse_mask": onnx.TensorProto.UINT8, "coarse_prob": onnx.TensorProto.FLOAT,
                       "fine_mask": onnx.TensorProto.UINT8, "fine_prob": onnx.TensorProto.FLOAT}
    assert [i.name for i in model.graph.input] == ["coarse_image", "fine_image"]


def test_dynamic_spatial_axes(exported):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    with networks_file(exported) as networks:
        session = ort.InferenceSession(str(networks), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for shape in [(1, 1, 16, 16, 16), (2, 1, 24, 8, 32)]:
        x = rng.standard_normal(shape).astype(np.float32)
        small = np.zeros((1, 1, 8, 8, 8), np.float32)
        mask, prob, cmask, cprob = session.run(["fine_mask", "fine_prob", "coarse_mask", "coarse_prob"],
                                               {"fine_image": x, "coarse_image": small})
        assert prob.shape == mask.shape == shape and prob.dtype == np.float32 and mask.dtype == np.uint8
        assert cprob.shape == cmask.shape == small.shape
        assert np.all((prob >= 0) & (prob <= 1))


def test_unaccepted_size_is_a_clear_error(exported):
    with networks_file(exported) as networks:
        session = OnnxSession(networks, device="cpu", threads=1)
    with pytest.raises(HeartsegError, match="multiples? of 8"):
        session.predict("fine", np.zeros((1, 1, 12, 16, 16), np.float32))
    with pytest.raises(HeartsegError, match="multiples? of 8"):
        session.mask("coarse", np.zeros((1, 1, 16, 16, 20), np.float32))


# ----------------------------------------------------------------------------------------------------------
# The calibrated threshold is baked into the graph


def test_baked_threshold_follows_the_checkpoint(exported, trained_run, checkpoint, tmp_path):
    original = float(checkpoint["contract"]["stages"][1]["threshold"])
    changed = 0.1 if original >= 0.5 else 0.9
    edited = json.loads(json.dumps(checkpoint["contract"]))
    edited["stages"][1]["threshold"] = changed
    altered_pt = tmp_path / "model.pt"
    torch.save({**checkpoint, "contract": edited}, altered_pt)
    altered = tmp_path / "altered.onnx"
    result = _export(altered_pt, altered)
    assert result.exit_code == 0, result.output

    with networks_file(exported) as networks_a, networks_file(altered) as networks_b:
        a, b = OnnxSession(networks_a, device="cpu", threads=1), OnnxSession(networks_b, device="cpu", threads=1)
    assert a.contract.final_stage.threshold == original and b.contract.final_stage.threshold == changed
    x = _fine_input(trained_run, a.contract)
    prob_a, prob_b = a.predict("fine", x), b.predict("fine", x)
    np.testing.assert_allclose(prob_a, prob_b, atol=1e-6)
    low, high = sorted([original, changed])
    assert np.any((prob_a > low) & (prob_a <= high)), "no voxel between the thresholds: the test proves nothing"
    mask_a, mask_b = a.mask("fine", x), b.mask("fine", x)
    np.testing.assert_array_equal(mask_a, (prob_a > np.float32(original)).astype(np.uint8))
    np.testing.assert_array_equal(mask_b, (prob_b > np.float32(changed)).astype(np.uint8))
    assert not np.array_equal(mask_a, mask_b)
    assert float(b.metadata["heartseg.threshold"]) == changed


# ----------------------------------------------------------------------------------------------------------
# Metadata


def test_metadata_round_trip(exported, trained_run, checkpoint):
    contract, meta = read_contract(exported)
    expected = ModelContract.from_dict(checkpoint["contract"])
    # The file is the pipeline around the checkpoint's networks: its contract is the checkpoint's, as a pipeline's.
    assert contract == replace(expected, pipeline=True)
    assert [s.threshold for s in contract.stages] == [s["threshold"] for s in checkpoint["contract"]["stages"]]
    assert contract.stage("fine").patch_size == (16, 16, 16)
    assert contract.stage("coarse").spacing == (4.0, 4.0, 4.0)

    metrics = json.loads((trained_run.run / "fold_0" / "metrics.json").read_text())
    fine = contract.final_stage
    assert float(meta["heartseg.threshold"]) == fine.threshold
    calibration = meta["heartseg.threshold_calibration"]
    assert "held-out" in calibration and f"over {len(metrics['val_cases'])} held-out cases" in calibration
    assert "CC0" in meta["heartseg.licence"]
    assert meta["heartseg.stages"] == "coarse,fine"
    assert json.loads(meta["heartseg.spacing_mm"]) == {s.name: list(s.spacing) for s in contract.stages}
    assert json.loads(meta["heartseg.patch_size"]) == {s.name: list(s.patch_size) for s in contract.stages}
    versions = json.loads(meta["heartseg.versions"])
    assert {"heartseg", "torch", "onnx", "numpy", "export_torch"} <= set(versions)
    assert versions["onnx"] == onnx.__version__
    cv = json.loads(meta["heartseg.cv_metrics"])
    assert cv["val_cases"] == metrics["val_cases"]
    assert cv["mean"]["dice"] == pytest.approx(metrics["mean"]["dice"])
    assert "held-out" in cv["split"]


def test_metadata_carries_the_qc_calibration(exported, trained_run):
    """The score calibration fitted on the fold's held-out cases travels in the contract."""
    from heartseg.runtime.qc import ScoreCalibration

    contract, _ = read_contract(exported)
    metrics = json.loads((trained_run.run / "fold_0" / "metrics.json").read_text())
    assert contract.score_calibration is not None
    assert contract.score_calibration == ScoreCalibration.from_dict(metrics["score_calibration"])
    assert contract.score_calibration.cases == len(metrics["val_cases"])
    assert contract.plausibility is not None and contract.plausibility.spacing_mm is not None


def test_export_takes_the_pooled_score_calibration(trained_run, tmp_path):
    from heartseg.runtime.qc import ScoreCalibration

    summary = json.loads((trained_run.run / "summary.json").read_text())
    pooled = summary["score_calibration"]
    assert pooled["cases"] == summary["cases"]
    out = tmp_path / "pooled.onnx"
    result = _export(trained_run.model, out, "--score-calibration", str(trained_run.run / "summary.json"))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    contract, _ = read_contract(out)
    assert contract.score_calibration == ScoreCalibration.from_dict(pooled)
    assert contract.tta_score_calibration == ScoreCalibration.from_dict(summary["tta_score_calibration"])
    # --tta's calibration travels with it when the file has one.
    edited = tmp_path / "edited.json"
    tta = {**summary["tta_score_calibration"], "intercept": summary["tta_score_calibration"]["intercept"] - 0.01}
    edited.write_text(json.dumps({"score_calibration": pooled, "tta_score_calibration": tta}))
    result = _export(trained_run.model, tmp_path / "edited.onnx", "--score-calibration", str(edited))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    assert read_contract(tmp_path / "edited.onnx")[0].tta_score_calibration == ScoreCalibration.from_dict(tta)
    bad = tmp_path / "bad.json"
    bad.write_text('{"dice": 1}')
    _assert_refused(_export(trained_run.model, tmp_path / "x.onnx", "--score-calibration", str(bad)),
                    ["no QC score calibration"])
    # The file is held to the contract's schema: a field out of range is named, and nothing is written.
    bad.write_text(json.dumps({"score_calibration": {**pooled, "slope": -1.0}}))
    _assert_refused(_export(trained_run.model, tmp_path / "x.onnx", "--score-calibration", str(bad)),
                    ["no QC score calibration", "score_calibration.slope"])
    assert not (tmp_path / "x.onnx").exists()


def test_format_2_checkpoint_without_roles_exports(trained_run, checkpoint, tmp_path):
    """A model.pt written before stages had roles (format 2) exports, with roles from position and its QC blocks."""
    old = json.loads(json.dumps(checkpoint["contract"]))
    old["format_version"] = 2
    for stage in old["stages"]:
        del stage["role"]
    old_pt = tmp_path / "model.pt"
    torch.save({**checkpoint, "contract": old}, old_pt)
    out = tmp_path / "old.onnx"
    result = _export(old_pt, out)
    assert result.exit_code == 0, result.output
    contract, _ = read_contract(out)
    assert [s.role for s in contract.stages] == ["localiser", "segmenter"]
    expected = ModelContract.from_dict(checkpoint["contract"])
    assert expected.score_calibration is not None and contract.score_calibration == expected.score_calibration
    # Its skewness range was learned over the whole scan, which the measure no longer reads: it is not carried.
    assert contract.plausibility == replace(expected.plausibility, skewness=None)
    assert contract.plausibility.spacing_mm is not None and expected.plausibility.skewness is not None


# ----------------------------------------------------------------------------------------------------------
# Refusals


class Evil:
    """Pickles to a shell command: loading it with plain pickle runs the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _write_pickle(path: Path, how: str, command: str) -> None:
    payload = {"format": "heartseg-model", "x": Evil(command)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle, protocol=2)


def _unsafe_load(path: Path, how: str) -> None:
    if how == "torch.save":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as handle:
            pickle.load(handle)


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, how):
    # The payload is live: an unsafe load of the same kind of file runs it.
    control = tmp_path / "CONTROL"
    _write_pickle(tmp_path / "control.pt", how, f"touch {control}")
    _unsafe_load(tmp_path / "control.pt", how)
    assert control.exists()

    marker = tmp_path / "MARKER"
    path = tmp_path / "model.pt"
    _write_pickle(path, how, f"touch {marker}")
    result = _export(path, tmp_path / "out.onnx")
    _assert_refused(result, ["refused", "weights_only"])
    assert not marker.exists(), "the pickled payload ran"
    assert not (tmp_path / "out.onnx").exists()


def _drop_networks(ckpt: dict) -> list[str]:
    del ckpt["networks"]
    return ["incomplete", "networks"]


def _drop_fine_threshold(ckpt: dict) -> list[str]:
    ckpt["contract"]["stages"][1]["threshold"] = None
    return ["incomplete", "'fine'", "threshold"]


def _drop_fine_weights(ckpt: dict) -> list[str]:
    del ckpt["networks"]["fine"]
    return ["incomplete", "weights of stage 'fine'"]


def _drop_contract(ckpt: dict) -> list[str]:
    del ckpt["contract"]
    return ["incomplete", "contract"]


def _wrong_format(ckpt: dict) -> list[str]:
    ckpt["format"] = "something-else"
    return ["not a heartseg model"]


@pytest.mark.parametrize("breaker", [_drop_networks, _drop_fine_threshold, _drop_fine_weights, _drop_contract,
                                     _wrong_format])
def test_incomplete_checkpoint_names_what_is_missing(trained_run, tmp_path, breaker):
    ckpt = torch.load(trained_run.model, map_location="cpu", weights_only=True)
    needles = breaker(ckpt)
    path = tmp_path / "model.pt"
    torch.save(ckpt, path)
    result = _export(path, tmp_path / "out.onnx")
    _assert_refused(result, needles)
    assert not (tmp_path / "out.onnx").exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".onnx"], "a temporary file was left behind"


def test_existing_output_is_not_replaced_without_overwrite(trained_run, tmp_path):
    out = tmp_path / "M.onnx"
    out.write_bytes(b"keep me")
    result = _export(trained_run.model, out)
    _assert_refused(result, ["exists", "--overwrite"])
    assert out.read_bytes() == b"keep me"


def test_missing_checkpoint_is_clear(tmp_path):
    result = _export(tmp_path / "nope.pt", tmp_path / "out.onnx")
    _assert_refused(result, ["not found"])


# ----------------------------------------------------------------------------------------------------------
# The exported file in heartseg-infer, with PyTorch made unimportable


def test_heartseg_infer_runs_the_export_without_torch(exported, trained_run, tmp_path):
    scan = trained_run.data / "imagesTr" / f"{HELD_OUT}.nii.gz"
    out = tmp_path / "out"
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any 'import torch' now raises ImportError\n"
        "from heartseg.runtime.cli_infer import main\n"
        f"sys.argv = ['heartseg-infer', {str(scan)!r}, '-o', {str(out)!r}, '-m', {str(exported)!r},"
        " '--device', 'cpu', '--threads', '1']\n"
        "try:\n"
        "    main()\n"
        "finally:\n"
        "    assert sys.modules.get('torch') is None, 'torch was imported'\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    masks = list(out.glob("*mask*.nii*"))
    assert len(masks) == 1, list(out.iterdir())
    mask, source = nib.load(masks[0]), nib.load(scan)
    assert mask.shape == source.shape
    np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
    data = np.asarray(mask.dataobj)
    assert set(np.unique(data).tolist()) <= {0, 1}
    label = np.asarray(nib.load(trained_run.data / "labelsTr" / f"{HELD_OUT}.nii.gz").dataobj) > 0
    dice = 2 * np.logical_and(data > 0, label).sum() / (np.count_nonzero(data) + label.sum())
    assert dice > 0.8, dice


# ----------------------------------------------------------------------------------------------------------
# Edge variants


def test_fp16_and_int8_variants_are_measured_on_held_out_cases(trained_run, tmp_path, monkeypatch):
    monkeypatch.setenv("HEARTSEG_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "V.onnx"
    result = _export(trained_run.model, out, "--fp16", "--int8", "--data", str(trained_run.data))
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    reports = json.loads(out.with_name("V.variants.json").read_text())
    assert [r["variant"] for r in reports] == ["fp16", "int8"]
    metrics = json.loads((trained_run.run / "fold_0" / "metrics.json").read_text())
    for report in reports:
        path = Path(report["path"])
        assert path.is_file() and path.name == f"V.{report['variant']}.onnx"
        assert report["cases"] == metrics["val_cases"]
        assert report["dice_change"] == pytest.approx(report["dice_variant"] - report["dice_fp32"])
        assert report["within_tolerance"] == (report["dice_fp32"] - report["dice_variant"] <= 0.005)
        meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert meta["heartseg.variant"] == report["variant"]
        # The file carries its own measurement, and the report the size of the file as finally written.
        recorded = json.loads(meta["heartseg.variant_metrics"])
        assert {k: recorded[k] for k in ("dice_fp32", "dice_variant", "cases")} == \
            {k: report[k] for k in ("dice_fp32", "dice_variant", "cases")}
        assert report["size_mb"] == path.stat().st_size / 1e6
        assert read_contract(path)[0] == read_contract(out)[0] and read_contract(path)[0].pipeline
        assert report["variant"] in unwrapped(result.output)
    # The int8 file stores int8 weights: it must be markedly smaller than the fp32 one.
    assert Path(reports[1]["path"]).stat().st_size < 0.6 * out.stat().st_size


def test_variants_need_the_dataset(trained_run, tmp_path):
    out = tmp_path / "V.onnx"
    _assert_refused(_export(trained_run.model, out, "--int8"), ["--data"])
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------
# Every written file passes the full ONNX checker and records the digest of its own graph


@pytest.fixture(scope="module")
def fresh_variants(exported, tmp_path_factory) -> dict[str, Path]:
    """fp16 and int8 variants of the exported tiny model (int8 calibrated on random patches)."""
    from heartseg.export.variants import make_fp16, make_int8

    folder = tmp_path_factory.mktemp("variants")
    contract, _ = read_contract(exported)
    rng = np.random.default_rng(0)
    feeds = [{s.input_name: rng.standard_normal((1, 1, *s.patch_size)).astype(np.float32) for s in contract.stages}
             for _ in range(2)]
    return {"fp16": make_fp16(exported, folder / "M.fp16.onnx"),
            "int8": make_int8(exported, folder / "M.int8.onnx", feeds)}


def test_variants_are_pipeline_files_around_their_rounded_networks(exported, fresh_variants, trained_run):
    from heartseg.runtime.contract import PIPELINE_INPUTS, PIPELINE_OUTPUTS
    from heartseg.runtime.inference import infer_canonical
    from heartseg.runtime.postprocess import mask_from_prob
    from heartseg.runtime.metrics import dice_score
    from onnx import numpy_helper

    fp32 = onnx.load(str(exported))
    graph_constants = {t.name for t in fp32.graph.initializer if t.name.startswith("const/")}
    assert graph_constants
    fp32_session = OnnxSession(exported, device="cpu", threads=1)
    canonical = to_canonical(load_volume(trained_run.data / "imagesTr" / SCAN), "RAS")
    reference = fp32_session.segment(canonical.data, canonical.spacing).mask > 0
    for variant, path in fresh_variants.items():
        proto = onnx.load(str(path))
        defaults = {t.name for t in proto.graph.initializer}
        assert [i.name for i in proto.graph.input if i.name not in defaults] == list(PIPELINE_INPUTS), variant
        assert [o.name for o in proto.graph.output] == list(PIPELINE_OUTPUTS), variant
        assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in proto.graph.input
                   if i.name in PIPELINE_INPUTS)
        weights = {t.name: t for t in proto.graph.initializer}
        # The graph around the networks computes in float32 whatever the networks' precision.
        assert all(weights[name].data_type != onnx.TensorProto.FLOAT16 for name in graph_constants if name in weights)
        if variant == "fp16":
            assert weights["heads.1.network.head.weight"].data_type == onnx.TensorProto.FLOAT16
        else:
            kernels = [t for t in proto.graph.initializer
                       if t.data_type == onnx.TensorProto.INT8 and numpy_helper.to_array(t).ndim == 5]
            assert len(kernels) >= 10, len(kernels)
        session = OnnxSession(path, device="cpu", threads=1)
        assert session.contract.pipeline
        mask = session.segment(canonical.data, canonical.spacing).mask > 0
        # The networks inside come back out of the graph and run on their own as the runtime's reference does.
        with networks_file(path) as networks:
            inside = OnnxSession(networks, device="cpu", threads=1)
            expected = mask_from_prob(infer_canonical(canonical, inside.contract, inside.predict).prob, inside.contract)
        assert dice_score(mask, expected > 0) >= 0.995, variant
        if variant == "fp16":  # (the int8 one here is calibrated on noise: its accuracy is measured elsewhere)
            assert dice_score(mask, reference) > 0.9


@pytest.mark.parametrize("variant", ["fp32", "fp16", "int8"])
def test_export_and_its_variants_pass_the_full_onnx_checker(exported, fresh_variants, variant):
    path = exported if variant == "fp32" else fresh_variants[variant]
    onnx.checker.check_model(str(path), full_check=True)


def test_export_and_its_variants_record_the_digest_of_their_own_graph(exported, fresh_variants):
    from heartseg.runtime.model_digest import DIGEST_KEY
    from test_contract import expected_digest

    digests = []
    for path in (exported, *fresh_variants.values()):
        proto = onnx.load(str(path))
        keys = [p.key for p in proto.metadata_props]
        assert keys.count(DIGEST_KEY) == 1, keys
        digests.append({p.key: p.value for p in proto.metadata_props}[DIGEST_KEY])
        assert digests[-1] == expected_digest(proto)
        assert OnnxSession(path, device="cpu", threads=1).contract == read_contract(exported)[0]
    assert len(set(digests)) == 3  # each file its own digest, not that of the file it was converted from


def test_an_export_whose_head_changed_afterwards_is_refused(exported, tmp_path):
    from onnx import numpy_helper

    proto = onnx.load(str(exported))
    (head,) = [t for t in proto.graph.initializer if t.name == "heads.1.network.head.bias"]
    head.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(head), head.name))
    altered = tmp_path / "altered.onnx"
    onnx.save(proto, str(altered))
    with pytest.raises(HeartsegError, match="altered or damaged"):
        OnnxSession(altered, device="cpu", threads=1)


def test_a_variant_records_its_accuracy_and_info_shows_it_first(fresh_variants, tmp_path, run_cli):
    from heartseg.export.variants import VariantReport, record_metrics
    from heartseg.runtime.cli_infer import app as infer_app

    path = tmp_path / "M.fp16.onnx"
    path.write_bytes(fresh_variants["fp16"].read_bytes())
    report = record_metrics(VariantReport("fp16", str(path), 0.0, ["syn_000", "syn_005"], 0.91, 0.9075, -0.0025,
                                          True))
    assert report.size_mb == path.stat().st_size / 1e6
    result = run_cli(infer_app, "--info", "--model", path)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"model: {path}" and lines[1].startswith("variant: fp16"), lines[:3]
    assert lines[2] == "held-out Dice 0.9075 on 2 cases (fp32 0.9100, change -0.0025: within the 0.005 allowed)"
    assert lines[3].startswith("weights: SHA-256 ")


def test_recording_a_variants_accuracy_does_not_check_the_model_again(fresh_variants, tmp_path, monkeypatch):
    """The variant was checked in full when it was made; recording its accuracy changes only its metadata."""
    from heartseg.export.variants import VariantReport, record_metrics

    path = tmp_path / "M.int8.onnx"
    path.write_bytes(fresh_variants["int8"].read_bytes())
    checks = []
    monkeypatch.setattr(onnx.checker, "check_model", lambda *args, **kwargs: checks.append(args))
    record_metrics(VariantReport("int8", str(path), 0.0, ["syn_000"], 0.91, 0.905, -0.005, True))
    assert not checks
    monkeypatch.undo()
    onnx.checker.check_model(str(path), full_check=True)
    assert OnnxSession(path, device="cpu", threads=1).contract == read_contract(fresh_variants["int8"])[0]
