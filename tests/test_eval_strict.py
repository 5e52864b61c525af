"""heartseg-eval refuses to leave labels out silently or to binarise label maps; volumes use the affine's
determinant, so sheared grids are measured right."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from heartseg.runtime.cli_eval import app
from heartseg.runtime.image import Volume
from heartseg.runtime.metrics import compute_metrics
from heartseg.runtime.qc import mask_measures
from heartseg.runtime.segmenter import Prediction
from test_bad_input import assert_one_line_error

SHAPE = (20, 22, 24)


def write(data: np.ndarray, path: Path, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.diag([1.5, 1.2, 2.0, 1.0]) if affine is None else affine), str(path))
    return path


def blob(lo=(4, 4, 4), hi=(12, 14, 16), value: int = 1) -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = value
    return mask


def test_labels_without_predictions_fail_and_are_listed(tmp_path: Path, run_cli) -> None:
    for name in ("a", "b", "c"):
        write(blob(), tmp_path / "gt" / f"{name}.nii.gz")
    write(blob(), tmp_path / "pred" / "a_mask.nii.gz")
    report = tmp_path / "r.json"
    result = run_cli(app, tmp_path / "pred", tmp_path / "gt", "--json", report)
    assert_one_line_error(result, "2 label(s)", "b, c")
    assert not report.exists()
    allowed = run_cli(app, tmp_path / "pred", tmp_path / "gt", "--json", report, "--allow-missing")
    assert allowed.exit_code == 0, allowed.output
    data = json.loads(report.read_text())
    assert data["n_cases"] == 1
    assert sorted(Path(p).name for p in data["missing_predictions"]) == ["b.nii.gz", "c.nii.gz"]


def test_multiclass_label_refused_unless_a_value_is_chosen(tmp_path: Path, run_cli) -> None:
    label = blob() + blob((6, 6, 6), (9, 9, 9), value=1)  # values 0, 1, 2
    gt = write(label, tmp_path / "gt.nii.gz")
    pred = write((label == 2).astype(np.uint8), tmp_path / "pred.nii.gz")
    result = run_cli(app, pred, gt)
    assert_one_line_error(result, "not binary", "--label-value")
    report = tmp_path / "r.json"
    chosen = run_cli(app, pred, gt, "--label-value", 2, "--json", report)
    assert chosen.exit_code == 0, chosen.output
    assert json.loads(report.read_text())["cases"][0]["dice"] == 1.0


def test_non_binary_prediction_refused(tmp_path: Path, run_cli) -> None:
    gt = write(blob(), tmp_path / "gt.nii.gz")
    pred = write(blob() * 255, tmp_path / "pred.nii.gz")
    assert_one_line_error(run_cli(app, pred, gt), "prediction", "not binary")


def sheared_affine() -> np.ndarray:
    affine = np.diag([1.5, 1.2, 2.0, 1.0])
    affine[0, 1] = 0.6  # a sheared grid: column norms overstate the voxel volume
    return affine


def test_volume_uses_the_determinant_on_a_sheared_grid(tmp_path: Path, run_cli) -> None:
    affine = sheared_affine()
    voxels = int(blob().sum())
    expected = voxels * abs(np.linalg.det(affine[:3, :3])) / 1000.0
    column_norms = voxels * float(np.prod(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))) / 1000.0
    assert abs(column_norms - expected) > 0.01 * expected  # the case tells the two apart

    prediction = Prediction(blob(), affine, None, None, "cpu")
    assert abs(prediction.volume_ml - expected) < 1e-9

    gt = write(blob(), tmp_path / "gt.nii.gz", affine)
    pred = write(blob(), tmp_path / "pred.nii.gz", affine)
    report = tmp_path / "r.json"
    assert run_cli(app, pred, gt, "--json", report).exit_code == 0
    case = json.loads(report.read_text())["cases"][0]
    assert abs(case["volume_ref_ml"] - expected) < 1e-6 and abs(case["volume_pred_ml"] - expected) < 1e-6

    spacing = Volume(blob(), affine).spacing
    assert abs(compute_metrics(blob(), blob(), spacing, abs(np.linalg.det(affine[:3, :3]))).volume_ref_ml
               - expected) < 1e-9
    assert abs(mask_measures(blob(), spacing, abs(np.linalg.det(affine[:3, :3])))[0] - expected) < 1e-9


def test_label_value_the_label_does_not_hold_is_refused_naming_its_values(tmp_path: Path, run_cli) -> None:
    label = blob() + blob((6, 6, 6), (9, 9, 9), value=1)  # values 0, 1, 2
    gt = write(label, tmp_path / "gt.nii.gz")
    pred = write((label == 2).astype(np.uint8), tmp_path / "pred.nii.gz")
    report = tmp_path / "r.json"
    result = run_cli(app, pred, gt, "--label-value", 7, "--json", report)
    assert_one_line_error(result, str(gt), "--label-value 7", "0, 1, 2")
    assert not report.exists()


def test_label_value_names_a_few_of_many_values(tmp_path: Path, run_cli) -> None:
    label = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 40).astype(np.int16) * 3  # 40 values: 0, 3, ..., 117
    gt = write(label, tmp_path / "gt.nii.gz")
    pred = write(blob(), tmp_path / "pred.nii.gz")
    result = run_cli(app, pred, gt, "--label-value", 1)
    assert_one_line_error(result, "--label-value 1", "0, 3, 6", "...")
    assert "117" not in result.output


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_label_value_that_is_not_finite_is_refused(tmp_path: Path, run_cli, value: str) -> None:
    gt = write(blob(), tmp_path / "gt.nii.gz")
    pred = write(blob(), tmp_path / "pred.nii.gz")
    report = tmp_path / "r.json"
    result = run_cli(app, pred, gt, "--label-value", value, "--json", report)
    assert_one_line_error(result, "--label-value", "finite")
    assert not report.exists()


def test_load_label_refuses_a_value_no_voxel_holds_naming_its_values(tmp_path: Path) -> None:
    from heartseg.runtime.errors import InputError
    from heartseg.runtime.formats.nifti import load_label

    gt = write(blob() + blob((6, 6, 6), (9, 9, 9), value=1), tmp_path / "gt.nii.gz")  # values 0, 1, 2
    with pytest.raises(InputError, match=r"no voxel equals --label-value 7 \(its values: 0, 1, 2\)"):
        load_label(gt, 7)
    assert load_label(gt, 2).data.sum() == 27


def test_one_label_of_a_cohort_without_the_value_stops_the_evaluation(tmp_path: Path, run_cli) -> None:
    for name in ("a", "b"):
        write(blob() * 2, tmp_path / "gt" / f"{name}.nii.gz")
        write(blob(), tmp_path / "pred" / f"{name}_mask.nii.gz")
    write(blob(), tmp_path / "gt" / "c.nii.gz")  # a label without any voxel of value 2
    write(blob(), tmp_path / "pred" / "c_mask.nii.gz")
    report = tmp_path / "r.json"
    result = run_cli(app, tmp_path / "pred", tmp_path / "gt", "--label-value", 2, "--json", report)
    assert_one_line_error(result, "c.nii.gz", "--label-value 2", "0, 1")
    assert not report.exists()


def test_label_value_help_says_a_label_without_the_value_is_refused(run_cli) -> None:
    result = run_cli(app, "--help")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    option = text[text.rindex("--label-value V"):]  # the option, after the description
    assert "no voxel" in option[:option.index("--version")], option
