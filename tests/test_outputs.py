"""No command can replace one of its inputs: every planned output (reports included) is checked against
the inputs and the other outputs before any work, and refused with exit 2 and one line."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from heartseg.runtime.cli_bench import app as bench_app
from heartseg.runtime.cli_eval import app as eval_app
from heartseg.runtime.cli_infer import app as infer_app
from heartseg.runtime.errors import InputError
from heartseg.runtime.formats import discover_sources
from heartseg.runtime.outputs import check_outputs, find_collision
from heartseg.runtime.pipeline import OutputOptions, plan_jobs
from onnx_models import make_scan
from test_bad_input import assert_one_line_error


def snapshot(*paths: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths}


def assert_unchanged(before: dict[Path, bytes]) -> None:
    for path, data in before.items():
        assert path.read_bytes() == data, f"{path} was changed"


@pytest.fixture
def scan_and_label(tmp_path: Path) -> tuple[Path, Path]:
    return make_scan(tmp_path / "in" / "s.nii.gz")


@pytest.mark.parametrize("target", ["scan", "label", "model"])
def test_infer_json_onto_an_input(tmp_path: Path, single_model: Path, scan_and_label, run_cli, target: str) -> None:
    scan, label = scan_and_label
    model = tmp_path / "m.onnx"
    model.write_bytes(single_model.read_bytes())
    victim = {"scan": scan, "label": label, "model": model}[target]
    before = snapshot(scan, label, model)
    result = run_cli(infer_app, scan, "-o", tmp_path / "out", "--label", label, "--model", model, "--json", victim)
    assert_one_line_error(result, "--json", "would overwrite the input")
    assert_unchanged(before)
    assert not (tmp_path / "out").exists()


def test_infer_json_onto_its_own_mask(tmp_path: Path, single_model: Path, scan_and_label, run_cli) -> None:
    scan, _ = scan_and_label
    out = tmp_path / "out"
    result = run_cli(infer_app, scan, "-o", out, "--model", single_model, "--json", out / "s_mask.nii.gz",
                     "--overwrite")
    assert_one_line_error(result, "--json", "s_mask.nii.gz")
    assert not out.exists()


def test_infer_json_through_a_link_to_the_scan(tmp_path: Path, single_model: Path, scan_and_label, run_cli) -> None:
    scan, _ = scan_and_label
    link = tmp_path / "report.json"
    os.link(scan, link)
    before = snapshot(scan)
    result = run_cli(infer_app, scan, "-o", tmp_path / "out", "--model", single_model, "--json", link)
    assert_one_line_error(result, "would overwrite the input")
    assert_unchanged(before)


@pytest.mark.parametrize("option", ["--json", "--csv"])
@pytest.mark.parametrize("target", ["pred", "gt"])
def test_eval_report_onto_an_input(tmp_path: Path, scan_and_label, run_cli, option: str, target: str) -> None:
    _, label = scan_and_label
    pred = tmp_path / "pred.nii.gz"
    pred.write_bytes(label.read_bytes())
    before = snapshot(pred, label)
    result = run_cli(eval_app, pred, label, option, {"pred": pred, "gt": label}[target])
    assert_one_line_error(result, option, "would overwrite the input")
    assert_unchanged(before)


def test_eval_report_onto_an_input_inside_folders(tmp_path: Path, scan_and_label, run_cli) -> None:
    _, label = scan_and_label
    (tmp_path / "p").mkdir()
    pred = tmp_path / "p" / "s_mask.nii.gz"
    pred.write_bytes(label.read_bytes())
    before = snapshot(pred, label)
    result = run_cli(eval_app, tmp_path / "p", label.parent, "--csv", label)
    assert_one_line_error(result, "--csv", "would overwrite the input")
    assert_unchanged(before)


def test_eval_json_and_csv_on_one_file(tmp_path: Path, scan_and_label, run_cli) -> None:
    _, label = scan_and_label
    report = tmp_path / "r.txt"
    result = run_cli(eval_app, label, label, "--json", report, "--csv", report)
    assert_one_line_error(result, "--csv", "give each output its own file")
    assert not report.exists()


@pytest.mark.parametrize("option", ["--json", "--csv"])
def test_eval_report_onto_its_qc_report(tmp_path: Path, scan_and_label, run_cli, option: str) -> None:
    _, label = scan_and_label
    qc_report = tmp_path / "infer.json"
    qc_report.write_text('{"scans": []}')
    before = snapshot(qc_report, label)
    result = run_cli(eval_app, label, label, "--qc-report", qc_report, option, qc_report)
    assert_one_line_error(result, option, "would overwrite the input")
    assert_unchanged(before)


def test_bench_json_onto_the_scan(tmp_path: Path, single_model: Path, scan_and_label, run_cli) -> None:
    scan, _ = scan_and_label
    before = snapshot(scan)
    result = run_cli(bench_app, scan, "--model", single_model, "--json", scan, "--repeat", 1)
    assert_one_line_error(result, "--json", "would overwrite the input")
    assert_unchanged(before)


def test_export_onto_its_checkpoint(tmp_path: Path, run_cli) -> None:
    pytest.importorskip("torch")
    from heartseg.export.cli import app as export_app

    checkpoint = tmp_path / "ckpt.pt"
    checkpoint.write_bytes(b"weights that must survive")
    before = snapshot(checkpoint)
    result = run_cli(export_app, checkpoint, "-o", checkpoint, "--overwrite")
    assert result.exit_code == 2, result.output
    assert "would overwrite the input" in result.output and "Traceback" not in result.output
    assert_unchanged(before)


def test_export_onto_its_score_calibration(tmp_path: Path, run_cli) -> None:
    pytest.importorskip("torch")
    from heartseg.export.cli import app as export_app

    checkpoint = tmp_path / "ckpt.pt"
    checkpoint.write_bytes(b"x")
    calibration = tmp_path / "summary.json"
    calibration.write_text('{"score_calibration": {"slope": 1, "intercept": 0, "residual_lo": -0.1, '
                           '"residual_hi": 0.1, "cases": 3}}')
    before = snapshot(calibration)
    result = run_cli(export_app, checkpoint, "-o", calibration, "--score-calibration", calibration, "--overwrite")
    assert result.exit_code == 2, result.output
    assert "would overwrite the input" in result.output and "Traceback" not in result.output
    assert_unchanged(before)


def test_export_onto_an_existing_folder(tmp_path: Path, run_cli) -> None:
    pytest.importorskip("torch")
    from heartseg.export.cli import app as export_app

    checkpoint = tmp_path / "ckpt.pt"
    checkpoint.write_bytes(b"x")
    (tmp_path / "dir").mkdir()
    result = run_cli(export_app, checkpoint, "-o", tmp_path / "dir", "--overwrite")
    assert result.exit_code == 2 and "is a folder" in result.output, result.output
    assert (tmp_path / "dir").is_dir()


def test_rule_itself(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.write_text("a")
    check_outputs([a], [("--json", tmp_path / "b"), ("--csv", tmp_path / "c"), ("x", None)])
    with pytest.raises(InputError, match="would overwrite"):
        check_outputs([a], [("--json", tmp_path / "." / "a")])
    with pytest.raises(InputError, match="own file"):
        check_outputs([a], [("--json", tmp_path / "b"), ("--csv", tmp_path / "sub" / ".." / "b")])


def test_planned_mask_through_a_link_to_the_scan(tmp_path: Path, scan_and_label) -> None:
    scan, _ = scan_and_label
    out = tmp_path / "out"
    out.mkdir()
    os.link(scan, out / "s_mask.nii.gz")
    with pytest.raises(InputError, match="s_mask.nii.gz: the output would overwrite the input .*s.nii.gz"):
        plan_jobs(discover_sources([scan]), out, OutputOptions(overwrite=True))


def test_collision_names_the_owners(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.write_text("a")
    link = tmp_path / "link"
    os.link(a, link)
    assert find_collision([a], [("x", tmp_path / "b"), ("y", tmp_path / "c")]) is None
    onto_input = find_collision([a], [("x", link)])
    assert (onto_input.owner, onto_input.path, onto_input.input, onto_input.earlier) == ("x", link, a, None)
    twice = find_collision([None], [("x", tmp_path / "b"), ("y", tmp_path / "sub" / ".." / "b")])
    assert (twice.owner, twice.input, twice.earlier) == ("y", None, "x")
