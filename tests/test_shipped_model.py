"""The model shipped in models/: its metadata, and that it segments the bundled example and a real scan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from heartseg.runtime.qc.calibration import MIN_SLOPE
from heartseg.runtime.formats.nifti import load_mask, load_volume
from heartseg.runtime.image import Volume
from heartseg.runtime.metrics import compute_metrics
from heartseg.runtime.segmenter import DEFAULT_MODEL_NAME, Segmenter, default_model_path
from heartseg.runtime.session import read_contract

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "la_029_crop.nii.gz"
EXAMPLE_LABEL = REPO / "examples" / "la_029_crop_label.nii.gz"


@pytest.fixture(scope="module")
def shipped() -> Path:
    path = default_model_path()
    assert path.name == DEFAULT_MODEL_NAME
    return path


def test_shipped_model_is_small_and_carries_its_contract(shipped):
    assert shipped.stat().st_size <= 25e6
    contract, meta = read_contract(shipped)
    assert [s.name for s in contract.stages] == ["coarse", "fine"]
    assert all(0.0 < s.threshold < 1.0 for s in contract.stages)
    assert float(meta["heartseg.threshold"]) == contract.final_stage.threshold
    assert contract.orientation == "RAS" and contract.normalization == "zscore"
    cv = json.loads(meta["heartseg.cv_metrics"])
    # The metadata's accuracy is held-out accuracy: none of its cases is a training case of the model.
    train_cases = set(contract.info["train_cases"].split(","))
    assert cv["val_cases"] and not train_cases & set(cv["val_cases"])
    # Trained on both sequences: held-out accuracy is recorded for each, and the file knows both datasets.
    assert cv["mean"]["dice"] >= 0.8
    assert set(contract.info["datasets"].split(",")) == {"Task02_Heart", "LA2018"}
    assert contract.plausibility is not None and contract.score_calibration is not None
    assert contract.plausibility.interior_rank is not None
    # Never flatter than the score: a low score never reads as a good estimated Dice.
    assert contract.score_calibration.slope >= MIN_SLOPE and contract.tta_score_calibration.slope >= MIN_SLOPE
    assert "CC-BY-SA" in meta["heartseg.licence"]
    assert "torch" in json.loads(meta["heartseg.versions"])


def test_shipped_model_segments_the_bundled_example(shipped):
    scan, label = load_volume(EXAMPLE), load_mask(EXAMPLE_LABEL)
    prediction = Segmenter(shipped, device="cpu").segment(scan)
    assert prediction.mask.shape == scan.shape
    assert compute_metrics(prediction.mask, label.data, scan.spacing).dice >= 0.85


def test_shipped_model_sends_an_intensity_inverted_scan_to_review(shipped):
    scan = load_volume(EXAMPLE)
    segmenter = Segmenter(shipped, device="cpu")
    plain = segmenter.segment(scan).report
    inverted = segmenter.segment(Volume(float(scan.data.max()) + float(scan.data.min()) - scan.data,
                                        scan.affine)).report
    low = read_contract(shipped)[0].plausibility.interior_rank[0]
    assert plain.verdict == "ok" and plain.measures["interior_rank"] > low
    assert inverted.verdict != "ok" and inverted.measures["interior_rank"] < low
    assert any(reason.startswith("the mask's interior is brighter than only") for reason in inverted.reasons)


def test_infer_without_model_option_uses_the_shipped_model(data_dir, tmp_path):
    scan = data_dir / "imagesTr" / "la_011.nii.gz"
    result = subprocess.run([sys.executable, "-m", "heartseg.runtime.cli_infer", str(scan), "-o", str(tmp_path),
                             "--device", "cpu", "--json", str(tmp_path / "r.json")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert Path(report["model"]).name == DEFAULT_MODEL_NAME and report["device"] == "cpu"
    mask = nib.load(tmp_path / "la_011_mask.nii.gz")
    original = nib.load(scan)
    assert mask.shape == original.shape and np.allclose(mask.affine, original.affine)
    reference = np.asarray(nib.load(data_dir / "labelsTr" / "la_011.nii.gz").dataobj) > 0
    overlap = np.logical_and(np.asarray(mask.dataobj) > 0, reference).sum()
    assert overlap > 0.8 * reference.sum()


# --- every shipped file: the full ONNX checker, its recorded weights digest, and --model/--info by name -----

MODELS = REPO / "models"
SHIPPED = sorted(p.name for p in MODELS.glob("*.onnx"))
SHIPPED_NAMES = ("fp32", "fp16", "int8", "ensemble")


def test_every_shipped_model_is_listed_by_name():
    from heartseg.runtime.segmenter import VARIANTS

    assert sorted(VARIANTS) == sorted(SHIPPED_NAMES) and sorted(VARIANTS.values()) == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_passes_the_full_onnx_checker(name):
    onnx = pytest.importorskip("onnx")
    onnx.checker.check_model(str(MODELS / name), full_check=True)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_model_is_one_graph_from_scan_to_mask(name):
    """What the runtime runs: the scan's voxels (RAS+) and their size in; mask, probabilities, score and box out."""
    import onnxruntime as ort

    from heartseg.runtime.contract import FORMAT_VERSION, PIPELINE_INPUTS, PIPELINE_OUTPUTS

    contract, meta = read_contract(MODELS / name)
    assert contract.pipeline is True and contract.format_version == FORMAT_VERSION == 8
    assert meta["heartseg.format_version"] == "8"
    session = ort.InferenceSession(str(MODELS / name), providers=["CPUExecutionProvider"])
    inputs = {i.name: (i.type, len(i.shape)) for i in session.get_inputs()}
    assert {k: inputs[k] for k in PIPELINE_INPUTS} == {"image": ("tensor(float)", 3), "spacing": ("tensor(float)", 1)}
    outputs = {o.name: (o.type, o.shape) for o in session.get_outputs()}
    assert [o.name for o in session.get_outputs()] == list(PIPELINE_OUTPUTS)
    assert outputs["mask"][0] == "tensor(uint8)" and len(outputs["mask"][1]) == 3
    assert outputs["probability"][0] == "tensor(float)" and len(outputs["probability"][1]) == 3
    assert outputs["score"] == ("tensor(float)", []) and outputs["box"] == ("tensor(float)", [2, 3])
    # Dynamic shapes: any scan size in, the same size out; nothing else to feed.
    image = session.get_inputs()[0].shape
    assert sorted(inputs) == sorted(PIPELINE_INPUTS) and all(isinstance(d, str) for d in image)
    assert outputs["mask"][1] == outputs["probability"][1] == image and session.get_inputs()[1].shape == [3]


def test_the_shipped_parity_reports_record_the_graph_on_their_scans():
    """Each report: ONNX Runtime against PyTorch on the networks inside the file, then the file's graph against the
    reference pipeline with those networks on the same scans."""
    for report in ("heartseg-la.parity.json", "heartseg-la.ensemble.parity.json"):
        rows = json.loads((MODELS / report).read_text())
        scans = [r["what"].removesuffix(": whole pipeline") for r in rows if r["what"].endswith(": whole pipeline")]
        graph = {r["what"].removesuffix(": pipeline graph"): r for r in rows if r["what"].endswith(": pipeline graph")}
        assert scans and sorted(graph) == sorted(scans), (report, scans, sorted(graph))
        for row in graph.values():
            assert row["min_dice"] == 0.995 and row["ok"] == (row["dice"] >= row["min_dice"]), row
            assert 0.0 <= row["dice"] <= 1.0 and 0.0 <= row["mask_agreement"] <= 1.0
    fp32 = json.loads((MODELS / "heartseg-la.parity.json").read_text())
    assert all(r["ok"] for r in fp32), fp32


@pytest.mark.parametrize("variant", ["fp16", "int8"])
def test_the_variants_report_is_what_each_variant_file_records(variant):
    (report,) = [r for r in json.loads((MODELS / "heartseg-la.variants.json").read_text()) if r["variant"] == variant]
    path = MODELS / Path(report["path"]).name
    contract, meta = read_contract(path)
    # Measured through the file's own graph, what the runtime runs (the fp32 Dice beside it likewise).
    assert contract.pipeline
    recorded = json.loads(meta["heartseg.variant_metrics"])
    assert {k: recorded[k] for k in ("cases", "dice_fp32", "dice_variant", "dice_change", "within_tolerance")} == \
        {k: report[k] for k in ("cases", "dice_fp32", "dice_variant", "dice_change", "within_tolerance")}
    assert report["size_mb"] == path.stat().st_size / 1e6


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_records_the_digest_of_its_own_graph_and_contract(name):
    import warnings

    from heartseg.runtime.model_digest import DIGEST_KEY
    from test_contract import expected_digest

    onnx = pytest.importorskip("onnx")
    proto = onnx.load(str(MODELS / name))
    keys = [p.key for p in proto.metadata_props]
    assert keys.count(DIGEST_KEY) == 1 and len(keys) == len(set(keys)), keys
    recorded = {p.key: p.value for p in proto.metadata_props}[DIGEST_KEY]
    assert recorded == expected_digest(proto)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a verified file opens without the unverified-weights warning
        read_contract(MODELS / name)


def test_shipped_model_with_a_flipped_head_weight_is_refused(tmp_path):
    """The fine stage's output layer negated after export would move the volume and still read as ok: refused."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    proto = onnx.load(str(default_model_path()))
    (head,) = [t for t in proto.graph.initializer if t.name == "heads.1.network.head.weight"]
    head.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(head), head.name))
    altered = tmp_path / "altered.onnx"
    onnx.save(proto, str(altered))
    result = subprocess.run([sys.executable, "-m", "heartseg.runtime.cli_infer", str(EXAMPLE), "-o",
                             str(tmp_path / "out"), "--model", str(altered), "--device", "cpu"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and "altered or damaged" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _infer(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "heartseg.runtime.cli_infer", *args], capture_output=True,
                          text=True, timeout=300)


def test_an_unknown_model_name_lists_the_shipped_ones(tmp_path):
    for args in (["--model", "int4", "--info"], ["--model", "int4", str(EXAMPLE), "-o", str(tmp_path / "out")]):
        result = _infer(*args)
        assert result.returncode == 2, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "int4" in lines[0], result.stderr
        assert all(name in lines[0] for name in SHIPPED_NAMES), lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("variant", ["fp16", "int8"])
def test_info_on_a_variant_starts_with_its_own_identity_and_accuracy(variant):
    (report,) = [r for r in json.loads((MODELS / "heartseg-la.variants.json").read_text())
                 if r["variant"] == variant]
    result = _infer("--model", variant, "--info")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    head = "\n".join(lines[:lines.index(next(line for line in lines if line.startswith("kind:")))])
    assert f"heartseg-la.{variant}.onnx" in head and f"variant: {variant}" in head, head
    assert f"held-out Dice {report['dice_variant']:.4f}" in head, head
    assert f"fp32 {report['dice_fp32']:.4f}" in head and f"{len(report['cases'])} cases" in head, head
    assert "weights: SHA-256" in head, head


@pytest.mark.parametrize("name,kind", [("fp32", "fp32"), ("ensemble", "ensemble of 3")])
def test_info_on_a_full_precision_model_starts_with_its_own_accuracy(name, kind):
    path = MODELS / ("heartseg-la.onnx" if name == "fp32" else f"heartseg-la.{name}.onnx")
    cv = json.loads(read_contract(path)[1]["heartseg.cv_metrics"])
    result = _infer("--model", name, "--info")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    head = "\n".join(lines[:lines.index(next(line for line in lines if line.startswith("kind:")))])
    assert f"variant: {kind}" in head and f"held-out Dice {cv['mean']['dice']:.4f}" in head, head
    assert f"{len(cv['val_cases'])} cases" in head, head
