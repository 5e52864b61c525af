"""Bad input gives exit code 2, one line of explanation, no traceback, and nothing in the output folder."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
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


def nifti2_pixdim(value: float, gz: bool) -> Callable[[Path], Path]:
    """Write a NIfTI-2 scan byte by byte, without qform or sform (codes 0), whose first voxel size is value."""

    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        data = good_image()
        header = nib.Nifti2Header()
        header.set_data_dtype(np.float32)
        header.set_data_shape(data.shape)
        header["pixdim"][1:4] = (value, 1.25, 1.25)
        header["vox_offset"] = header.single_vox_offset
        raw = header.binaryblock + b"\0" * 4 + data.astype("<f4").tobytes(order="F")
        assert struct.unpack_from("<i", raw, 0)[0] == 540  # little-endian NIfTI-2
        assert struct.unpack_from("<h", raw, 252)[0] == 0 and struct.unpack_from("<h", raw, 254)[0] == 0  # codes
        path = folder / ("scan.nii.gz" if gz else "scan.nii")
        path.write_bytes(gzip.compress(raw) if gz else raw)
        return path

    return make


def float64_beyond_float32(folder: Path) -> Path:
    data = good_image().astype(np.float64)
    data[3, 4, 5] = 1e300
    data[4, 5, 6] = -4e38
    return write(data, folder / "scan.nii.gz")


def float64_with_nan(folder: Path) -> Path:
    data = good_image().astype(np.float64)
    data[3, 4, 5] = np.nan
    return write(data, folder / "scan.nii.gz")


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
    "nifti2_zero_spacing": (nifti2_pixdim(0.0, gz=True), "voxel spacing in the header must be positive"),
    "nifti2_negative_spacing": (nifti2_pixdim(-1.25, gz=False), "voxel spacing in the header must be positive"),
    "nifti2_nan_spacing": (nifti2_pixdim(float("nan"), gz=False), "voxel spacing in the header must be positive"),
    "nifti2_inf_spacing": (nifti2_pixdim(float("inf"), gz=True), "voxel spacing in the header must be positive"),
    "float64_beyond_float32": (float64_beyond_float32, "beyond the float32 range"),
    "float64_nan": (float64_with_nan, "NaN"),
}


@pytest.mark.parametrize("case", sorted(BAD_SCANS))
def test_bad_scan(tmp_path: Path, single_model: Path, run_cli, case: str) -> None:
    make, fragment = BAD_SCANS[case]
    scan = make(tmp_path / "in")
    out = tmp_path / "out"
    result = run_cli(infer_app, scan, "-o", out, "--model", single_model, "--threads", 1)
    assert_one_line_error(result, fragment, scan.name)
    assert_nothing_written(out)


@pytest.mark.parametrize("case", ["nan", "not_nifti", "zero_spacing", "nifti2_zero_spacing"])
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


def test_beyond_float32_is_not_called_nan() -> None:
    from heartseg.runtime.errors import InputError
    from heartseg.runtime.image import volume_from_array

    data = good_image().astype(np.float64)
    data[1, 2, 3] = 1e39
    with pytest.raises(InputError) as caught:
        volume_from_array(data, default_affine(), "big.nii.gz")
    message = str(caught.value)
    assert "big.nii.gz" in message and "float32 range" in message and "1e+39" in message, message
    assert "NaN" not in message and "infinite" not in message, message


# --- inputs that are not regular files ----------------------------------------------------------

HANG_TIMEOUT_S = 60
MEMORY_LIMIT_BYTES = 4 << 30


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))


def run_console(*args) -> subprocess.CompletedProcess:
    """heartseg-infer as a process with a time and memory limit, so that an input it blocks on fails the test."""
    script = Path(sys.executable).with_name("heartseg-infer")
    if not script.exists():
        pytest.skip(f"{script} is not installed (pip install -e .)")
    command = [str(script), *(str(a) for a in args)]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=HANG_TIMEOUT_S,
                              preexec_fn=_limit_memory, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(command)} still ran after {HANG_TIMEOUT_S} s: it blocked on its input")


def assert_console_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stdout + proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def make_fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def make_socket(path: Path) -> Path:
    import socket

    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
    return path


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")
@pytest.mark.parametrize("name", ["scan.nii.gz", "scan.nii", "scan.NII.GZ", "scan.nrrd", "scan.mha", "scan.zip"])
def test_fifo_as_scan_is_refused_at_once(tmp_path: Path, single_model: Path, name: str) -> None:
    scan = make_fifo(tmp_path / name)
    out = tmp_path / "out"
    proc = run_console(scan, "-o", out, "--model", single_model, "--threads", 1)
    assert_console_error(proc, str(scan), "not a regular file")
    assert_nothing_written(out)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")
def test_fifo_as_label_is_named_as_such(tmp_path: Path, single_model: Path) -> None:
    scan, _ = make_scan(tmp_path / "scan.nii.gz")
    label = make_fifo(tmp_path / "label.nii.gz")
    out = tmp_path / "out"
    proc = run_console(scan, "--label", label, "-o", out, "--model", single_model, "--threads", 1)
    assert_console_error(proc, str(label), "not a regular file")
    assert_nothing_written(out)


def test_socket_as_scan_is_refused(tmp_path: Path, single_model: Path) -> None:
    folder = Path(tempfile.mkdtemp(prefix="hs", dir="/tmp"))  # a socket path must be short
    try:
        scan = make_socket(folder / "s.nii.gz")
        out = tmp_path / "out"
        proc = run_console(scan, "-o", out, "--model", single_model, "--threads", 1)
        assert_console_error(proc, str(scan), "not a regular file")
        assert_nothing_written(out)
    finally:
        shutil.rmtree(folder)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_device_as_scan_is_refused(tmp_path: Path, single_model: Path) -> None:
    out = tmp_path / "out"
    proc = run_console("/dev/zero", "-o", out, "--model", single_model, "--threads", 1)
    assert_console_error(proc, "/dev/zero", "not a regular file")
    assert_nothing_written(out)


def test_fifo_inside_a_folder_is_not_listed(tmp_path: Path, single_model: Path) -> None:
    make_scan(tmp_path / "in" / "a.nii.gz")
    make_fifo(tmp_path / "in" / "b.nii.gz")
    out = tmp_path / "out"
    proc = run_console(tmp_path / "in", "-o", out, "--model", single_model, "--threads", 1)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["a_mask.nii.gz"]


def test_load_volume_refuses_a_fifo_without_opening_it(tmp_path: Path) -> None:
    from heartseg.runtime.errors import InputError
    from heartseg.runtime.formats.nifti import load_volume

    def hung(signum, frame):
        raise TimeoutError(f"load_volume still ran after {HANG_TIMEOUT_S} s: it blocked on the pipe")

    scan = make_fifo(tmp_path / "scan.nii.gz")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(HANG_TIMEOUT_S)
    try:
        with pytest.raises(InputError, match="not a regular file"):
            load_volume(scan)  # opening it would block until a writer came
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- scan lists ---------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_scan_list_from_an_endless_device(tmp_path: Path, single_model: Path) -> None:
    out = tmp_path / "out"
    proc = run_console("--scan-list", "/dev/zero", "-o", out, "--model", single_model)
    assert_console_error(proc, "--scan-list /dev/zero", "not a regular file")
    assert_nothing_written(out)


def test_scan_list_from_a_fifo(tmp_path: Path, single_model: Path) -> None:
    listing = make_fifo(tmp_path / "scans.txt")
    out = tmp_path / "out"
    proc = run_console("--scan-list", listing, "-o", out, "--model", single_model)
    assert_console_error(proc, str(listing), "not a regular file")
    assert_nothing_written(out)


def test_scan_list_larger_than_the_cap(tmp_path: Path, single_model: Path) -> None:
    from heartseg.runtime.cohort import MAX_SCAN_LIST_BYTES

    listing = tmp_path / "scans.txt"
    with open(listing, "wb") as handle:
        handle.truncate(MAX_SCAN_LIST_BYTES + 1)  # sparse: costs no disk
    out = tmp_path / "out"
    proc = run_console("--scan-list", listing, "-o", out, "--model", single_model)
    assert_console_error(proc, str(listing), f"larger than {MAX_SCAN_LIST_BYTES >> 20} MiB")
    assert_nothing_written(out)


def test_scan_list_with_too_many_lines(tmp_path: Path, single_model: Path, run_cli) -> None:
    from heartseg.runtime.cohort import MAX_SCAN_LIST_BYTES, MAX_SCAN_LIST_LINES

    listing = tmp_path / "scans.txt"
    listing.write_text("#\n" * (MAX_SCAN_LIST_LINES + 1))
    assert listing.stat().st_size <= MAX_SCAN_LIST_BYTES
    out = tmp_path / "out"
    result = run_cli(infer_app, "--scan-list", listing, "-o", out, "--model", single_model)
    assert_one_line_error(result, str(listing), f"more than {MAX_SCAN_LIST_LINES} lines")
    assert_nothing_written(out)


def test_scan_list_that_is_a_folder(tmp_path: Path, single_model: Path, run_cli) -> None:
    result = run_cli(infer_app, "--scan-list", tmp_path, "-o", tmp_path / "out", "--model", single_model)
    assert_one_line_error(result, str(tmp_path), "a folder")
