"""Bad input gives exit code 2, one line of explanation, no traceback, and nothing in the output folder."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from heartseg.runtime.cli_eval import app as eval_app
from heartseg.runtime.cli_infer import app as infer_app
from onnx_models import default_affine, ellipsoid_image, make_scan


def assert_one_line_error(result, *fragments: str) -> None:
    """Exit 2, exactly one non-empty output line, starting with 'error:' and naming the problem."""
    assert result.exit_code == 2, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def assert_nothing_written(folder: Path) -> None:
    assert not folder.exists() or not any(folder.iterdir()), sorted(folder.iterdir())


# --- bad scans --------------------------------------------------------------------------------


def write(data: np.ndarray, path: Path, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, default_affine() if affine is None else affine), str(path))
    return path


def good_image() -> np.ndarray:
    return ellipsoid_image((24, 24, 24))[0]


def not_nifti(folder: Path) -> Path:
    path = folder / "scan.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as handle:
        handle.write(b"this is not a NIfTI header at all\n" * 20)
    return path


def plain_text(folder: Path) -> Path:
    path = folder / "scan.nii"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("hello\n")
    return path


def wrong_extension(folder: Path) -> Path:
    path = folder / "scan.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n")
    return path


def truncated_gzip(folder: Path) -> Path:
    path = write(good_image(), folder / "scan.nii.gz")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def two_d(folder: Path) -> Path:
    return write(good_image()[:, :, 0], folder / "scan.nii.gz")


def flat_3d(folder: Path) -> Path:
    return write(good_image()[:, :, :1], folder / "scan.nii.gz")


def four_d_several(folder: Path) -> Path:
    return write(np.stack([good_image()] * 3, axis=-1), folder / "scan.nii.gz")


def with_nan(folder: Path) -> Path:
    data = good_image()
    data[3, 4, 5] = np.nan
    return write(data, folder / "scan.nii.gz")


def with_inf(folder: Path) -> Path:
    data = good_image()
    data[5, 4, 3] = -np.inf
    return write(data, folder / "scan.nii.gz")


def constant(folder: Path) -> Path:
    return write(np.full((24, 24, 24), 42.0, np.float32), folder / "scan.nii.gz")


def patched_pixdim(value: float, gz: bool) -> Callable[[Path], Path]:
    """Write a valid scan with nibabel, then overwrite pixdim[1] (the first voxel size) in the header bytes."""

    def make(folder: Path) -> Path:
        path = write(good_image(), folder / ("scan.nii.gz" if gz else "scan.nii"))
        raw = bytearray(gzip.decompress(path.read_bytes()) if gz else path.read_bytes())
        assert struct.unpack_from("<i", raw, 0)[0] == 348  # little-endian NIfTI-1
        struct.pack_into("<f", raw, 80, value)  # pixdim starts at byte 76; pixdim[1] at 80
        path.write_bytes(gzip.compress(bytes(raw)) if gz else bytes(raw))
        assert struct.unpack_from("<f", gzip.decompress(path.read_bytes()) if gz else path.read_bytes(), 80)[0] == value
        return path

    return make


BAD_SCANS = {
    "not_nifti": (not_nifti, "not a readable NIfTI"),
    "plain_text": (plain_text, "not a readable NIfTI"),
    "wrong_extension": (wrong_extension, "not a scan heartseg reads"),
    "truncated_gzip": (truncated_gzip, "truncated or corrupt"),
    "2d": (two_d, "expected a 3D image"),
    "one_slice": (flat_3d, "expected a 3D image"),
    "4d_several_volumes": (four_d_several, "4D image with 3 volumes"),
    "nan": (with_nan, "NaN or infinite"),
    "inf": (with_inf, "NaN or infinite"),
    "constant": (constant, "constant"),
    "zero_spacing": (patched_pixdim(0.0, gz=True), "spacing"),
    "negative_spacing": (patched_pixdim(-1.25, gz=False), "spacing"),
}


@pytest.mark.parametrize("case", sorted(BAD_SCANS))
def test_bad_scan(tmp_path: Path, single_model: Path, run_cli, case: str) -> None:
    make, fragment = BAD_SCANS[case]
    scan = make(tmp_path / "in")
    out = tmp_path / "out"
    result = run_cli(infer_app, scan, "-o", out, "--model", single_model, "--threads", 1)
    assert_one_line_error(result, fragment, "scan")
    assert_nothing_written(out)


@pytest.mark.parametrize("case", ["nan", "not_nifti", "zero_spacing"])
def test_bad_scan_through_the_console_script(tmp_path: Path, single_model: Path, case: str) -> None:
    """The real entry point: the message is one line on stderr (no library warnings), with no traceback."""
    script = Path(sys.executable).with_name("heartseg-infer")
    if not script.exists():
        pytest.skip(f"{script} is not installed (pip install -e .)")
    make, fragment = BAD_SCANS[case]
    scan = make(tmp_path / "in")
    out = tmp_path / "out"
    proc = subprocess.run([str(script), str(scan), "-o", str(out), "--model", str(single_model)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout.strip() == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr
    assert_nothing_written(out)


def test_label_on_another_grid(tmp_path: Path, single_model: Path, run_cli) -> None:
    scan, _ = make_scan(tmp_path / "in" / "s.nii.gz")
    label = write(np.zeros((40, 48, 35), np.uint8), tmp_path / "labels" / "s.nii.gz")
    out = tmp_path / "out"
    result = run_cli(infer_app, scan, "-o", out, "--model", single_model, "--label", label)
    assert_one_line_error(result, "not on the grid", str(label), str(scan))
    assert_nothing_written(out)


# --- bad models -------------------------------------------------------------------------------


def test_missing_model_file(tmp_path: Path, run_cli) -> None:
    scan, _ = make_scan(tmp_path / "in" / "s.nii.gz")
    out = tmp_path / "out"
    result = run_cli(infer_app, scan, "-o", out, "--model", tmp_path / "nowhere.onnx")
    assert_one_line_error(result, "nowhere.onnx", "not found")
    assert_nothing_written(out)


def test_missing_model_file_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("heartseg-infer")
    if not script.exists():
        pytest.skip(f"{script} is not installed (pip install -e .)")
    proc = subprocess.run([str(script), "--info", "--model", str(tmp_path / "nowhere.onnx")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout.strip() == ""
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: "), proc.stderr


def test_model_without_heartseg_metadata(tmp_path: Path, no_contract_model: Path, run_cli) -> None:
    scan, _ = make_scan(tmp_path / "in" / "s.nii.gz")
    out = tmp_path / "out"
    result = run_cli(infer_app, scan, "-o", out, "--model", no_contract_model)
    assert_one_line_error(result, "without heartseg metadata")
    assert_nothing_written(out)
    info = run_cli(infer_app, "--info", "--model", no_contract_model)
    assert_one_line_error(info, "without heartseg metadata")


def test_model_that_is_not_onnx(tmp_path: Path, run_cli) -> None:
    scan, _ = make_scan(tmp_path / "in" / "s.nii.gz")
    model = tmp_path / "garbage.onnx"
    model.write_bytes(b"\x00\x01 definitely not protobuf" * 10)
    out = tmp_path / "out"
    result = run_cli(infer_app, scan, "-o", out, "--model", model)
    assert_one_line_error(result, "garbage.onnx", "not a loadable ONNX model")
    assert_nothing_written(out)


def test_cuda_requested_without_cuda(tmp_path: Path, single_model: Path, run_cli) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    scan, _ = make_scan(tmp_path / "in" / "s.nii.gz")
    out = tmp_path / "out"
    result = run_cli(infer_app, scan, "-o", out, "--model", single_model, "--device", "cuda")
    assert_one_line_error(result, "--device cuda")
    assert_nothing_written(out)


# --- bad folders --------------------------------------------------------------------------------


def test_output_folder_under_a_file(tmp_path: Path, single_model: Path, run_cli) -> None:
    scan, _ = make_scan(tmp_path / "in" / "s.nii.gz")
    afile = tmp_path / "afile"
    afile.write_text("a regular file")
    result = run_cli(infer_app, scan, "-o", afile / "out", "--model", single_model)
    assert_one_line_error(result, "cannot create the output folder")
    assert afile.read_text() == "a regular file"


def test_output_folder_is_a_file(tmp_path: Path, single_model: Path, run_cli) -> None:
    scan, _ = make_scan(tmp_path / "in" / "s.nii.gz")
    afile = tmp_path / "afile"
    afile.write_text("a regular file")
    result = run_cli(infer_app, scan, "-o", afile, "--model", single_model)
    assert_one_line_error(result, "is a file")
    assert afile.read_text() == "a regular file"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_output_folder_not_writable(tmp_path: Path, single_model: Path, run_cli) -> None:
    scan, _ = make_scan(tmp_path / "in" / "s.nii.gz")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = run_cli(infer_app, scan, "-o", locked, "--model", single_model)
        assert_one_line_error(result, "not writable")
        assert_nothing_written(locked)
    finally:
        locked.chmod(0o700)


def test_no_scans_found(tmp_path: Path, single_model: Path, run_cli) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no scans here")
    out = tmp_path / "out"
    result = run_cli(infer_app, empty, "-o", out, "--model", single_model)
    assert_one_line_error(result, "no scans found")
    assert_nothing_written(out)


def test_scan_path_does_not_exist(tmp_path: Path, single_model: Path, run_cli) -> None:
    out = tmp_path / "out"
    result = run_cli(infer_app, tmp_path / "missing.nii.gz", "-o", out, "--model", single_model)
    assert_one_line_error(result, "missing.nii.gz", "no such file")
    assert_nothing_written(out)


def test_single_output_file_with_several_scans(tmp_path: Path, single_model: Path, run_cli) -> None:
    for name in ("a", "b"):
        make_scan(tmp_path / "in" / f"{name}.nii.gz")
    out = tmp_path / "out"
    result = run_cli(infer_app, tmp_path / "in", "-o", out / "mask.nii.gz", "--model", single_model)
    assert_one_line_error(result, "names one file", "2 scans")
    assert_nothing_written(out)


# --- heartseg-eval ------------------------------------------------------------------------------


@pytest.mark.parametrize("mismatch", ["shape", "affine"])
def test_eval_grids_must_match(tmp_path: Path, run_cli, mismatch: str) -> None:
    mask = np.zeros((20, 22, 24), np.uint8)
    mask[5:10, 6:12, 7:14] = 1
    affine = default_affine()
    pred = write(mask, tmp_path / "pred" / "c1_mask.nii.gz", affine)
    if mismatch == "shape":
        gt = write(mask[:, :, :20], tmp_path / "gt" / "c1.nii.gz", affine)
    else:
        shifted = affine.copy()
        shifted[0, 3] += 3.0
        gt = write(mask, tmp_path / "gt" / "c1.nii.gz", shifted)
    report = tmp_path / "report.json"
    for args in ((pred, gt), (pred.parent, gt.parent)):  # two files, and two folders paired by name
        result = run_cli(eval_app, *args, "--json", report)
        assert_one_line_error(result, str(pred), str(gt), "not on the same grid", f"{mismatch}s differ")
        assert not report.exists()


def test_eval_file_and_folder_mixed(tmp_path: Path, run_cli) -> None:
    pred = write(np.zeros((8, 8, 8), np.uint8), tmp_path / "p.nii.gz")
    result = run_cli(eval_app, pred, tmp_path)
    assert_one_line_error(result, "two files or two folders")


def test_eval_nothing_pairs(tmp_path: Path, run_cli) -> None:
    write(np.zeros((8, 8, 8), np.uint8), tmp_path / "pred" / "a_mask.nii.gz")
    write(np.zeros((8, 8, 8), np.uint8), tmp_path / "gt" / "b.nii.gz")
    result = run_cli(eval_app, tmp_path / "pred", tmp_path / "gt")
    assert_one_line_error(result, "no prediction")


def test_eval_unreadable_prediction(tmp_path: Path, run_cli) -> None:
    pred = truncated_gzip(tmp_path / "pred")
    gt = write(np.zeros((24, 24, 24), np.uint8), tmp_path / "gt" / "scan.nii.gz")
    result = run_cli(eval_app, pred, gt)
    assert_one_line_error(result, "truncated or corrupt")
