"""heartseg-infer on a real Task02_Heart scan (skipped when the dataset is not there)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from heartseg.runtime.cli_infer import app

pytestmark = pytest.mark.data

CASE = "la_004"


def test_cascade_on_a_real_scan(tmp_path: Path, data_dir: Path, cascade_model: Path, run_cli) -> None:
    scan = data_dir / "imagesTr" / f"{CASE}.nii.gz"
    label = data_dir / "labelsTr" / f"{CASE}.nii.gz"
    if not scan.is_file():
        pytest.skip(f"{scan} not found in the dataset")
    args = [scan, "-o", tmp_path / "out", "--model", cascade_model, "--threads", 1, "--json", tmp_path / "r.json"]
    if label.is_file():
        args += ["--label", label]
    result = run_cli(app, *args)
    # The pointwise test model is no atrium detector: its mask may well be flagged by QC (exit 3).
    assert result.exit_code in (0, 3), result.output
    assert "Traceback" not in result.output
    source = nib.load(str(scan))
    written = nib.load(str(tmp_path / "out" / f"{CASE}_mask.nii.gz"))
    assert written.shape == source.shape[:3]
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    mask = np.asanyarray(written.dataobj)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    record = json.loads((tmp_path / "r.json").read_text())["scans"][0]
    assert record["status"] in ("ok", "flagged")
    assert record["volume_ml"] == pytest.approx(mask.sum() * np.prod(source.header.get_zooms()[:3]) / 1000, rel=1e-4)
    if label.is_file():
        assert 0.0 <= record["metrics"]["dice"] <= 1.0
