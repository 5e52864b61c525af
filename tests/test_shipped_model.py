"""The model shipped in models/: its metadata, and that it segments the bundled example and a real scan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from heartseg.runtime.confidence import MIN_SLOPE
from heartseg.runtime.image import Volume, load_mask, load_volume
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
