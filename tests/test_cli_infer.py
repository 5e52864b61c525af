"""End-to-end tests of heartseg-infer on synthetic scans with pointwise test models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from heartseg.runtime import segmenter as segmenter_module
from heartseg.runtime.cli_infer import app
from onnx_models import build_test_model, lps_affine, make_scan, rotation_affine

AFFINES = {
    "ras": None,
    "oblique": rotation_affine(),
    "lps": lps_affine(),
}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def assert_clean_exit(result, code: int) -> None:
    """The exit code is the expected one and no unexpected exception escaped the command."""
    assert result.exit_code == code, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


@pytest.mark.parametrize("orientation", sorted(AFFINES))
def test_mask_is_on_the_scan_grid(tmp_path: Path, any_model: Path, run_cli, orientation: str) -> None:
    scan, label = make_scan(tmp_path / "in" / "case.nii.gz", affine=AFFINES[orientation], seed=3)
    out = tmp_path / "out"
    result = run_cli(app, scan, "-o", out, "--model", any_model, "--threads", 1, "--label", label)
    assert_clean_exit(result, 0)
    source = nib.load(str(scan))
    written = nib.load(str(out / "case_mask.nii.gz"))
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-5)
    assert written.get_data_dtype() == np.uint8
    mask = np.asanyarray(written.dataobj)
    assert set(np.unique(mask)) == {0, 1}
    # The ellipsoid is off-centre: a flipped or swapped axis anywhere in the pipeline would miss it.
    truth = np.asanyarray(nib.load(str(label)).dataobj)
    assert dice(mask, truth) > 0.85
    assert "Dice" in result.stdout and "HD95" in result.stdout
    assert "case" in result.stdout and " ok " in result.stdout


def test_4d_scan_with_one_volume(tmp_path: Path, single_model: Path, run_cli) -> None:
    scan, label = make_scan(tmp_path / "in" / "four_d.nii.gz", four_d=True)
    assert nib.load(str(scan)).shape == (40, 48, 36, 1)
    result = run_cli(app, scan, "-o", tmp_path / "out", "--model", single_model, "--threads", 1)
    assert_clean_exit(result, 0)
    written = nib.load(str(tmp_path / "out" / "four_d_mask.nii.gz"))
    assert written.shape == (40, 48, 36)
    np.testing.assert_allclose(written.affine, nib.load(str(scan)).affine, atol=1e-5)
    assert dice(np.asanyarray(written.dataobj), np.asanyarray(nib.load(str(label)).dataobj)) > 0.85


def test_folder_input_skip_and_overwrite(tmp_path: Path, cascade_model: Path, run_cli) -> None:
    folder = tmp_path / "scans"
    for i, name in enumerate(["b_case", "a_case", "c_case"]):
        make_scan(folder / f"{name}.nii.gz", seed=i)
    (folder / "notes.txt").write_text("not a scan")
    out = tmp_path / "out"
    report = tmp_path / "report.json"
    result = run_cli(app, folder, "-o", out, "--model", cascade_model, "--threads", 1,
                     "--labels", folder / "labels", "--json", report)
    assert_clean_exit(result, 0)
    # The labels sub-folder and the text file are not scans; outputs are named after the scans.
    assert sorted(p.name for p in out.iterdir()) == ["a_case_mask.nii.gz", "b_case_mask.nii.gz", "c_case_mask.nii.gz"]
    data = json.loads(report.read_text())
    assert data["exit_code"] == 0
    assert [s["name"] for s in data["scans"]] == ["a_case", "b_case", "c_case"]  # sorted
    for record in data["scans"]:
        assert record["status"] == "ok" and record["qc"] == "ok"
        assert record["metrics"]["dice"] > 0.85
        assert record["volume_ml"] == pytest.approx(record["metrics"]["volume_pred_ml"])

    # A second run without --overwrite leaves the outputs alone and says so.
    for path in out.iterdir():
        os.utime(path, ns=(0, 0))
    again = run_cli(app, folder, "-o", out, "--model", cascade_model, "--threads", 1)
    assert_clean_exit(again, 0)
    assert again.stdout.count("skipped") >= 3 and "--overwrite" in again.stdout
    assert all(p.stat().st_mtime_ns == 0 for p in out.iterdir())

    replaced = run_cli(app, folder, "-o", out, "--model", cascade_model, "--threads", 1, "--overwrite")
    assert_clean_exit(replaced, 0)
    assert all(p.stat().st_mtime_ns > 0 for p in out.iterdir())
    assert sorted(p.name for p in out.iterdir()) == ["a_case_mask.nii.gz", "b_case_mask.nii.gz", "c_case_mask.nii.gz"]


def test_info_prints_contract_and_metadata(single_model: Path, cascade_model: Path, run_cli) -> None:
    result = run_cli(app, "--info", "--model", cascade_model)
    assert_clean_exit(result, 0)
    for text in ("heartseg.contract", "heartseg.threshold", "heartseg.description", "stage coarse", "stage fine",
                 "crop margin 15 mm", "threshold 0.5", "two-stage cascade"):
        assert text in result.stdout, text
    single = run_cli(app, "--info", "--model", single_model)
    assert_clean_exit(single, 0)
    assert "single stage" in single.stdout and "stage single" in single.stdout


def test_qc_flag_writes_mask_and_exits_3(tmp_path: Path, run_cli) -> None:
    everything = build_test_model(tmp_path / "all.onnx", bias=10.0)  # every voxel foreground
    scan, _ = make_scan(tmp_path / "in" / "s.nii.gz")
    report = tmp_path / "r.json"
    result = run_cli(app, scan, "-o", tmp_path / "out", "--model", everything, "--threads", 1, "--json", report)
    assert_clean_exit(result, 3)
    assert "fail: all foreground" in result.stdout
    assert "flagged" in result.stderr
    mask = np.asanyarray(nib.load(str(tmp_path / "out" / "s_mask.nii.gz")).dataobj)
    assert mask.all()
    record = json.loads(report.read_text())["scans"][0]
    assert record["status"] == "flagged" and record["qc"] == "fail: all foreground"
    assert record["verdict"] == "fail" and record["qc_report"]["reasons"] == ["all foreground"]


def test_cascade_that_finds_nothing_gives_empty_flagged_mask(tmp_path: Path, run_cli) -> None:
    nothing = build_test_model(tmp_path / "none.onnx", cascade=True, bias=-10.0)
    scan, _ = make_scan(tmp_path / "in" / "s.nii.gz")
    result = run_cli(app, scan, "-o", tmp_path / "out", "--model", nothing, "--threads", 1)
    assert_clean_exit(result, 3)
    assert "fail: empty" in result.stdout
    written = nib.load(str(tmp_path / "out" / "s_mask.nii.gz"))
    assert written.shape == (40, 48, 36) and not np.asanyarray(written.dataobj).any()


def test_bad_scan_does_not_stop_the_batch(tmp_path: Path, single_model: Path, run_cli) -> None:
    folder = tmp_path / "scans"
    make_scan(folder / "a.nii.gz")
    nib.save(nib.Nifti1Image(np.full((20, 20, 20), 7.0, np.float32), np.eye(4)), str(folder / "b.nii.gz"))
    make_scan(folder / "c.nii.gz", seed=2)
    out = tmp_path / "out"
    result = run_cli(app, folder, "-o", out, "--model", single_model, "--threads", 1)
    assert_clean_exit(result, 2)  # b is an input error
    assert "error: b.nii.gz: the image is constant" in result.stderr
    assert "1 of 3 scans failed" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a_mask.nii.gz", "c_mask.nii.gz"]


def test_unexpected_failure_exits_1_and_goes_on(tmp_path: Path, single_model: Path, run_cli,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "scans"
    make_scan(folder / "a.nii.gz")
    make_scan(folder / "b.nii.gz", seed=1)
    original = segmenter_module.Segmenter.segment

    def flaky(self, volume, keep_prob=False):
        if volume.path is not None and volume.path.name == "a.nii.gz":
            raise RuntimeError("simulated runtime failure")
        return original(self, volume, keep_prob)

    monkeypatch.setattr(segmenter_module.Segmenter, "segment", flaky)
    out = tmp_path / "out"
    result = run_cli(app, folder, "-o", out, "--model", single_model, "--threads", 1)
    assert_clean_exit(result, 1)
    assert "error: a.nii.gz: RuntimeError: simulated runtime failure" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["b_mask.nii.gz"]


def test_refuses_to_write_over_an_input(tmp_path: Path, single_model: Path, run_cli) -> None:
    folder = tmp_path / "scans"
    scan, _ = make_scan(folder / "x.nii.gz")
    victim, _ = make_scan(folder / "x_mask.nii.gz", seed=5)
    before = victim.read_bytes()
    result = run_cli(app, scan, victim, "-o", folder, "--model", single_model)
    assert_clean_exit(result, 2)
    assert "would overwrite the input" in result.stderr
    assert victim.read_bytes() == before
    assert not (folder / "x_mask_mask.nii.gz").exists()


def test_two_scans_with_one_name_are_refused(tmp_path: Path, single_model: Path, run_cli) -> None:
    a, _ = make_scan(tmp_path / "one" / "s.nii.gz")
    b, _ = make_scan(tmp_path / "two" / "s.nii", seed=1)
    result = run_cli(app, a, b, "-o", tmp_path / "out", "--model", single_model)
    assert_clean_exit(result, 2)
    assert "same output" in result.stderr
    assert not (tmp_path / "out").exists()


def test_label_needs_exactly_one_scan(tmp_path: Path, single_model: Path, run_cli) -> None:
    a, label = make_scan(tmp_path / "in" / "a.nii.gz")
    b, _ = make_scan(tmp_path / "in" / "b.nii.gz", seed=1)
    result = run_cli(app, a, b, "-o", tmp_path / "out", "--model", single_model, "--label", label)
    assert_clean_exit(result, 2)
    assert "--label" in result.stderr


def test_missing_label_in_labels_folder(tmp_path: Path, single_model: Path, run_cli) -> None:
    a, _ = make_scan(tmp_path / "in" / "a.nii.gz")
    empty = tmp_path / "no_labels"
    empty.mkdir()
    result = run_cli(app, a, "-o", tmp_path / "out", "--model", single_model, "--labels", empty)
    assert_clean_exit(result, 2)
    assert "no label named like a.nii.gz" in result.stderr


def test_benchmark_and_save_prob(tmp_path: Path, single_model: Path, run_cli) -> None:
    scan, _ = make_scan(tmp_path / "in" / "s.nii.gz")
    report = tmp_path / "r.json"
    result = run_cli(app, scan, "-o", tmp_path / "out", "--model", single_model, "--threads", 1,
                     "--benchmark", 3, "--save-prob", "--json", report)
    assert_clean_exit(result, 0)
    assert "median" in result.stdout and "p95" in result.stdout
    record = json.loads(report.read_text())["scans"][0]
    bench = record["benchmark"]
    assert bench["runs"] == 3 and len(bench["seconds"]) == 3
    assert min(bench["seconds"]) <= bench["median_s"] <= bench["p95_s"] <= max(bench["seconds"])
    assert record["prob"].endswith("s_prob.nii.gz") and Path(record["prob"]).is_file()


def test_help_documents_exit_codes_and_defaults(run_cli) -> None:
    result = run_cli(app, "--help")
    assert_clean_exit(result, 0)
    text = " ".join(result.stdout.split())
    for fragment in ("Exit codes: 0", "1 a scan failed", "2 usage, model or input error", "3 at least one mask",
                     "[default: auto]", "[default: fp32", "--output-format", "--series", "--statistics", "--mesh", "--memory-limit-mb", "--benchmark",
                     "--labels", "--save-prob", "--overwrite", "--info", "--json"):
        assert fragment in text, fragment


def test_console_script_runs(tmp_path: Path, single_model: Path) -> None:
    """The installed heartseg-infer entry point works outside the test runner, with a clean stderr."""
    script = Path(sys.executable).with_name("heartseg-infer")
    if not script.exists():
        pytest.skip(f"{script} is not installed (pip install -e .)")
    scan, _ = make_scan(tmp_path / "in" / "s.nii.gz")
    proc = subprocess.run([str(script), str(scan), "-o", str(tmp_path / "out"), "--model", str(single_model),
                           "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == ""
    assert (tmp_path / "out" / "s_mask.nii.gz").is_file()
