"""heartseg-eval: pairing, metrics, reports, and the degenerate-prediction flag."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from heartseg.runtime.cli_eval import app
from heartseg.runtime.cli_infer import app as infer_app
from heartseg.runtime.metrics import compute_metrics
from onnx_models import default_affine, make_scan

SHAPE = (20, 22, 24)


def box(lo, hi) -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1
    return mask


def write(mask: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(mask, default_affine()), str(path))
    return path


def test_folders_paired_by_name(tmp_path: Path, run_cli) -> None:
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    masks = {"a": (box((4, 4, 4), (10, 12, 9)), box((5, 4, 4), (11, 12, 10))),
             "b": (box((2, 3, 4), (8, 9, 10)), box((2, 3, 4), (8, 9, 10)))}
    write(masks["a"][0], pred / "a_mask.nii.gz")  # heartseg-infer's name
    write(masks["b"][0], pred / "b.nii.gz")  # plain name
    write(np.zeros(SHAPE, np.float32), pred / "a_prob.nii.gz")  # ignored
    write(masks["a"][0], pred / "orphan_mask.nii.gz")  # no label: warned about
    for name, (_, ref) in masks.items():
        write(ref, gt / f"{name}.nii.gz")
    write(masks["a"][1], gt / "unpredicted.nii.gz")
    report, table = tmp_path / "r.json", tmp_path / "r.csv"
    refused = run_cli(app, pred, gt, "--json", report, "--csv", table)
    assert refused.exit_code == 2 and "unpredicted" in refused.stderr and not report.exists()
    result = run_cli(app, pred, gt, "--json", report, "--csv", table, "--allow-missing")
    assert result.exit_code == 0, result.output
    assert "orphan_mask.nii.gz" in result.stderr and "warning:" in result.stderr
    assert "1 label(s)" in result.stderr
    assert "mean" in result.stdout
    data = json.loads(report.read_text())
    assert data["n_cases"] == 2 and [c["case"] for c in data["cases"]] == ["a", "b"]
    spacing = tuple(float(s) for s in np.sqrt((default_affine()[:3, :3] ** 2).sum(0)))
    for case in data["cases"]:
        expected = compute_metrics(*masks[case["case"]], spacing).to_dict()
        for key, value in expected.items():
            assert case[key] == pytest.approx(value), key
        assert case["flag"] is None
    assert data["cases"][1]["dice"] == 1.0
    assert data["mean"]["dice"] == pytest.approx((data["cases"][0]["dice"] + 1.0) / 2)
    rows = list(csv.DictReader(table.open()))
    assert [r["case"] for r in rows] == ["a", "b"]
    assert float(rows[0]["dice"]) == pytest.approx(data["cases"][0]["dice"])
    assert not list(tmp_path.glob(".tmp-*"))  # atomic writes leave no temporaries


def test_empty_prediction_is_flagged(tmp_path: Path, run_cli) -> None:
    pred = write(np.zeros(SHAPE, np.uint8), tmp_path / "p.nii.gz")
    gt = write(box((4, 4, 4), (10, 12, 9)), tmp_path / "g.nii.gz")
    report, table = tmp_path / "r.json", tmp_path / "r.csv"
    result = run_cli(app, pred, gt, "--json", report, "--csv", table)
    assert result.exit_code == 3, result.output
    assert "FLAG: empty" in result.stdout
    assert "warning:" in result.stderr and "degenerate" in result.stderr
    case = json.loads(report.read_text())["cases"][0]
    assert case["dice"] == 0.0 and case["hd95_mm"] is None and case["assd_mm"] is None
    assert case["flag"] == "empty"
    row = next(csv.DictReader(table.open()))
    assert row["hd95_mm"] == "" and row["flag"] == "empty"
    assert json.loads(report.read_text())["flagged"] == ["g"]


def test_both_empty_is_perfect_but_flagged(tmp_path: Path, run_cli) -> None:
    pred = write(np.zeros(SHAPE, np.uint8), tmp_path / "p.nii.gz")
    gt = write(np.zeros(SHAPE, np.uint8), tmp_path / "g.nii.gz")
    report = tmp_path / "r.json"
    result = run_cli(app, pred, gt, "--json", report)
    assert result.exit_code == 3
    case = json.loads(report.read_text())["cases"][0]
    assert case["dice"] == 1.0 and case["hd95_mm"] == 0.0


def test_max_fraction(tmp_path: Path, run_cli) -> None:
    big = box((0, 0, 0), (10, 22, 24))  # half the volume
    pred = write(big, tmp_path / "p.nii.gz")
    gt = write(big, tmp_path / "g.nii.gz")
    # The atrium's share of a scan differs widely between datasets: no fraction limit unless asked for.
    unlimited = run_cli(app, pred, gt)
    assert unlimited.exit_code == 0 and "FLAG" not in unlimited.stdout, unlimited.output
    flagged = run_cli(app, pred, gt, "--max-fraction", 0.4)
    assert flagged.exit_code == 3 and "implausibly large" in flagged.stdout
    allowed = run_cli(app, pred, gt, "--max-fraction", 0.6)
    assert allowed.exit_code == 0, allowed.output
    assert "FLAG" not in allowed.stdout


def test_ambiguous_prediction_names(tmp_path: Path, run_cli) -> None:
    write(box((1, 1, 1), (4, 4, 4)), tmp_path / "pred" / "a.nii.gz")
    write(box((1, 1, 1), (4, 4, 4)), tmp_path / "pred" / "a_mask.nii.gz")
    write(box((1, 1, 1), (4, 4, 4)), tmp_path / "gt" / "a.nii.gz")
    result = run_cli(app, tmp_path / "pred", tmp_path / "gt")
    assert result.exit_code == 2
    assert result.stderr.startswith("error:") and "two predictions for case 'a'" in result.stderr


def test_infer_then_eval(tmp_path: Path, single_model: Path, run_cli) -> None:
    folder = tmp_path / "scans"
    for i in range(2):
        make_scan(folder / f"case{i}.nii.gz", seed=i)
    infer_report = tmp_path / "infer.json"
    done = run_cli(infer_app, folder, "-o", tmp_path / "out", "--model", single_model, "--threads", 1,
                   "--save-prob", "--labels", folder / "labels", "--json", infer_report)
    assert done.exit_code == 0, done.output
    eval_report = tmp_path / "eval.json"
    result = run_cli(app, tmp_path / "out", folder / "labels", "--json", eval_report)
    assert result.exit_code == 0, result.output
    inferred = {s["name"]: s["metrics"] for s in json.loads(infer_report.read_text())["scans"]}
    evaluated = {c["case"]: c for c in json.loads(eval_report.read_text())["cases"]}
    assert sorted(evaluated) == ["case0", "case1"]  # the _prob files were not taken for predictions
    for name, metrics in inferred.items():
        assert evaluated[name]["dice"] == pytest.approx(metrics["dice"])
        assert evaluated[name]["hd95_mm"] == pytest.approx(metrics["hd95_mm"])
