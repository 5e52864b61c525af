"""Scans as clinics hold them: DICOM series, NRRD and MetaImage give the NIfTI path's mask, in scanner space.

The scans are built from a crop of the real Task02 case la_004 (around the atrium, so the shipped
model has real anatomy to segment), stored with several orientations: axial RAS, sagittal with
flipped axes, and an oblique one (the same voxels under a rotated affine). Each format's
mask is compared with the mask the NIfTI file of the same scan gets, by the world coordinates of
their voxels: the affines must agree within 1e-3 mm and the masks voxel for voxel (Dice >= 0.999;
DICOM stores positions as 16-character decimal strings, so affines agree to about 1e-6 mm).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from heartseg.runtime.cli_infer import app
from onnx_models import make_scan
from scan_formats import (
    reorient,
    rotation,
    write_dicom_series,
    write_mha,
    write_nifti,
    write_nrrd,
    zip_folder,
)

pydicom = pytest.importorskip("pydicom", reason="pydicom is not installed (pip install 'heartseg[dicom]')")

CROP = (slice(40, 200), slice(50, 220), slice(0, 110))  # la_004 around its atrium, room for the localiser
AFFINE_TOLERANCE_MM = 1e-3
MIN_DICE = 0.999


def _oblique(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rotated = affine.copy()
    rotated[:3, :3] = rotation((18.0, -12.0, 27.0)) @ affine[:3, :3]
    return data, rotated


ORIENTATIONS = {
    "axial": lambda d, a: (d, a),
    "sagittal": lambda d, a: reorient(d, a, (1, 2, 0), (True, False, True)),
    "oblique": _oblique,
}


@pytest.fixture(scope="module")
def real_crop(data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The la_004 crop: scan voxels, label voxels and the crop's RAS affine."""
    image = nib.load(str(data_dir / "imagesTr" / "la_004.nii.gz"))
    label = nib.load(str(data_dir / "labelsTr" / "la_004.nii.gz"))
    affine = image.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ [s.start for s in CROP] + affine[:3, 3]
    return (np.asarray(image.dataobj)[CROP].astype(np.float32), np.asarray(label.dataobj)[CROP].astype(np.uint8),
            affine)


@pytest.fixture(scope="module")
def axial_mask(real_crop, tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """The mask of the axial NIfTI crop, on the crop's grid."""
    from heartseg import Segmenter

    base, _, base_affine = real_crop
    return Segmenter(threads=1).predict(nib.Nifti1Image(base, base_affine)).mask_array


def on_grid(mask: np.ndarray, affine: np.ndarray, ref_affine: np.ndarray, ref_shape: tuple[int, ...]) -> np.ndarray:
    """mask moved onto the reference grid through world coordinates (each voxel to the nearest reference voxel)."""
    index = np.argwhere(mask)
    world = index @ affine[:3, :3].T + affine[:3, 3]
    ref = (world - ref_affine[:3, 3]) @ np.linalg.inv(ref_affine[:3, :3]).T
    rounded = np.round(ref).astype(int)
    assert np.abs(ref - rounded).max() < 1e-3, "the grids do not coincide"
    inside = np.all((rounded >= 0) & (rounded < np.asarray(ref_shape)), axis=1)
    assert inside.all(), "mask voxels fall outside the reference grid"
    out = np.zeros(ref_shape, np.uint8)
    out[tuple(rounded.T)] = 1
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * np.count_nonzero(a & b) / max(1, np.count_nonzero(a) + np.count_nonzero(b))


def run_ok(run_cli, *args) -> dict:
    """Run heartseg-infer with a JSON report to stdout; it must exit 0 or 3 (QC flag), never fail."""
    result = run_cli(app, *args, "--threads", 1, "--json", "-")
    assert result.exit_code in (0, 3), f"exit {result.exit_code}\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


@pytest.mark.data
@pytest.mark.slow
@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_every_format_gives_the_nifti_mask(tmp_path: Path, real_crop, axial_mask, run_cli, orientation: str) -> None:
    pytest.importorskip("nrrd", reason="pynrrd is not installed (pip install 'heartseg[nrrd]')")
    pytest.importorskip("SimpleITK", reason="SimpleITK is not installed (pip install 'heartseg[itk]')")
    base, label, base_affine = real_crop
    data, affine = ORIENTATIONS[orientation](base, base_affine)
    scans = tmp_path / "scans"
    write_nifti(data, affine, scans / "v_nifti.nii.gz")
    write_nrrd(data, affine, scans / "v_nrrd.nrrd")
    write_mha(data, affine, scans / "v_mha.mha")
    write_dicom_series(data, affine, tmp_path / "v_dicom")
    inputs = [scans, tmp_path / "v_dicom"]
    if orientation == "oblique":  # a zip of the series, once
        inputs.append(zip_folder(tmp_path / "v_dicom", tmp_path / "v_zip.zip"))
    out = tmp_path / "out"
    report = run_ok(run_cli, *inputs, "-o", out)
    assert sorted(r["format"] for r in report["scans"]) == sorted(["dicom", "mha", "nifti", "nrrd"]
                                                                   + ["dicom"] * (len(inputs) - 2))

    reference = nib.load(str(out / "v_nifti_mask.nii.gz"))
    ref_mask = np.asarray(reference.dataobj)
    # The real anatomy is found: the NIfTI path's mask matches the expert label (so the comparison means something).
    if orientation != "oblique":  # the label's own grid is the un-rotated one
        label_here = on_grid(label, base_affine, reference.affine, ref_mask.shape)
        assert dice(ref_mask, label_here) > 0.8
    for name in ("v_nrrd", "v_mha", "v_dicom") + (("v_zip",) if orientation == "oblique" else ()):
        written = nib.load(str(out / f"{name}_mask.nii.gz"))
        np.testing.assert_allclose(written.affine, affine, atol=AFFINE_TOLERANCE_MM, err_msg=name)
        moved = on_grid(np.asarray(written.dataobj), written.affine, reference.affine, ref_mask.shape)
        assert dice(moved, ref_mask) >= MIN_DICE, name
    if orientation not in ("axial", "oblique"):
        # The same voxels in another storage order are the same atrium in the scanner: compare with the axial scan's.
        moved = on_grid(ref_mask, reference.affine, base_affine, base.shape)
        assert dice(moved, axial_mask) >= MIN_DICE


@pytest.mark.data
def test_dicom_seg_reads_back_onto_the_source_series(tmp_path: Path, real_crop, run_cli) -> None:
    hd = pytest.importorskip("highdicom", reason="highdicom is not installed (pip install 'heartseg[dicom]')")

    base, _, base_affine = real_crop
    data, affine = ORIENTATIONS["oblique"](base, base_affine)
    files = write_dicom_series(data, affine, tmp_path / "series")
    report = run_ok(run_cli, tmp_path / "series", "--output-format", "dicom-seg", "-o", tmp_path / "seg")
    seg_path = Path(report["scans"][0]["mask"])
    assert seg_path.name == "series_seg.dcm"
    nifti = run_ok(run_cli, tmp_path / "series", "-o", tmp_path / "nifti")
    expected = np.asarray(nib.load(nifti["scans"][0]["mask"]).dataobj)
    assert expected.any()

    seg = hd.seg.segread(str(seg_path))
    sources = sorted((pydicom.dcmread(str(f)) for f in files), key=lambda ds: int(ds.InstanceNumber))
    assert seg.SegmentSequence[0].SegmentLabel == "Left atrium"
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "82471001"  # SNOMED left atrium
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    # Slice by slice, through the SOP instances the SEG references: the mask heartseg wrote as NIfTI.
    # The k-th slice along the series' normal is the file written for data[:, :, k].
    ordered = sorted(sources, key=lambda ds: np.cross(np.asarray(ds.ImageOrientationPatient[:3], float),
                                                      np.asarray(ds.ImageOrientationPatient[3:], float))
                     @ np.asarray(ds.ImagePositionPatient, float))
    uids = [ds.SOPInstanceUID for ds in ordered]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])
    np.testing.assert_array_equal(pixels[..., 0].transpose(2, 1, 0), expected)
    # The SEG's geometry is the source's: each frame sits at its source slice's position and orientation.
    frames = seg.PerFrameFunctionalGroupsSequence
    position = {tuple(np.round(np.asarray(ds.ImagePositionPatient, float), 3)) for ds in ordered}
    for frame in frames:
        plane = frame.PlanePositionSequence[0].ImagePositionPatient
        assert tuple(np.round(np.asarray(plane, float), 3)) in position
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, float),
                               np.asarray(ordered[0].ImageOrientationPatient, float), atol=1e-6)


# --- DICOM failure cases: exit 2, one line ---------------------------------------------------


def _series(folder: Path, slices: int = 12, **kwargs) -> list[Path]:
    image, _ = make_scan(folder.parent / "tmp.nii.gz")
    data = np.asarray(nib.load(str(image)).dataobj)[:, :, :slices]
    affine = nib.load(str(image)).affine
    image.unlink()
    Path(str(image).replace(".nii.gz", "_label.nii.gz")).unlink(missing_ok=True)
    return write_dicom_series(data, affine, folder, **kwargs)


def _edit(path: Path, **values) -> None:
    ds = pydicom.dcmread(str(path))
    for key, value in values.items():
        setattr(ds, key, value)
    ds.save_as(str(path))


def _z(path: Path) -> float:
    return float(pydicom.dcmread(str(path), stop_before_pixels=True).ImagePositionPatient[2])


def _by_position(files: list[Path]) -> list[Path]:
    return sorted(files, key=_z)


def nonuniform(folder: Path) -> Path:
    files = _by_position(_series(folder))
    position = list(pydicom.dcmread(str(files[5])).ImagePositionPatient)
    position[2] = _z(files[5]) - 0.3 * (_z(files[5]) - _z(files[4]))  # gaps of 0.7 and 1.3 slices
    _edit(files[5], ImagePositionPatient=position)
    return folder


def missing_slice(folder: Path) -> Path:
    _by_position(_series(folder))[6].unlink()
    return folder


def mixed_orientation(folder: Path) -> Path:
    files = _by_position(_series(folder))
    _edit(files[3], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    return folder


def duplicate_position(folder: Path) -> Path:
    files = _by_position(_series(folder))
    _edit(files[3], ImagePositionPatient=list(pydicom.dcmread(str(files[4])).ImagePositionPatient))
    return folder


def multi_frame(folder: Path) -> Path:
    files = _series(folder)
    _edit(files[0], NumberOfFrames=3)
    return folder


def single_slice(folder: Path) -> Path:
    for path in _series(folder)[1:]:
        path.unlink()
    return folder


def no_position(folder: Path) -> Path:
    files = _series(folder)
    ds = pydicom.dcmread(str(files[2]))
    del ds.ImagePositionPatient
    ds.save_as(str(files[2]))
    return folder


def several_series(folder: Path) -> Path:
    _series(folder / "a", series_number=3, description="T1")
    _series(folder / "b", series_number=4, description="LGE")
    return folder


def unknown_series(folder: Path) -> Path:
    _series(folder)
    return folder


DICOM_FAILURES = {
    "nonuniform": (nonuniform, (), "non-uniform slice spacing"),
    "missing_slice": (missing_slice, (), "1 slice(s) missing"),
    "mixed_orientation": (mixed_orientation, (), "mixed orientations"),
    "duplicate_position": (duplicate_position, (), "same position"),
    "multi_frame": (multi_frame, (), "multi-frame"),
    "single_slice": (single_slice, (), "single slice"),
    "no_position": (no_position, (), "no ImagePositionPatient"),
    "several_series": (several_series, (), "holds 2 series"),
    "unknown_series": (unknown_series, ("--series", "99"), "no series '99'"),
}


def assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 2, f"exit {result.exit_code}\n{result.stdout}\n{result.stderr}"
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.output


@pytest.mark.parametrize("case", sorted(DICOM_FAILURES))
def test_dicom_failure_exits_2_with_one_line(tmp_path: Path, single_model: Path, run_cli, case: str) -> None:
    make, options, fragment = DICOM_FAILURES[case]
    folder = make(tmp_path / "series")
    out = tmp_path / "out"
    result = run_cli(app, folder, "-o", out, "--model", single_model, "--threads", 1, *options)
    assert_one_line_error(result, fragment)
    assert not out.exists() or not any(out.iterdir())


def test_a_single_dicom_file_is_not_a_series(tmp_path: Path, single_model: Path, run_cli) -> None:
    files = _series(tmp_path / "series")
    result = run_cli(app, files[0], "-o", tmp_path / "out", "--model", single_model)
    assert_one_line_error(result, "single DICOM slice")


def test_several_series_one_by_number_or_all(tmp_path: Path, single_model: Path, run_cli) -> None:
    folder = several_series(tmp_path / "study")
    one = run_cli(app, folder, "--series", "4", "-o", tmp_path / "one", "--model", single_model, "--threads", 1)
    assert one.exit_code == 0, one.output
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["study_series4_mask.nii.gz"]
    every = run_cli(app, folder, "--series", "all", "-o", tmp_path / "all", "--model", single_model, "--threads", 1)
    assert every.exit_code == 0, every.output
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["study_series3_mask.nii.gz",
                                                                     "study_series4_mask.nii.gz"]


def test_dicom_output_goes_beside_the_series_folder(tmp_path: Path, single_model: Path, run_cli) -> None:
    _series(tmp_path / "patient" / "series")
    result = run_cli(app, tmp_path / "patient" / "series", "--model", single_model, "--threads", 1)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "patient" / "series_mask.nii.gz").is_file()
    assert not any(p.name.endswith(".nii.gz") for p in (tmp_path / "patient" / "series").iterdir())


def test_dicom_seg_needs_a_dicom_input(tmp_path: Path, single_model: Path, run_cli) -> None:
    pytest.importorskip("highdicom", reason="highdicom is not installed (pip install 'heartseg[dicom]')")
    scan, _ = make_scan(tmp_path / "in" / "s.nii.gz")
    result = run_cli(app, scan, "--output-format", "dicom-seg", "-o", tmp_path / "out", "--model", single_model)
    assert_one_line_error(result, "DICOM SEG output needs a DICOM series")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_rescale_slope_and_intercept_are_applied(tmp_path: Path) -> None:
    from heartseg.runtime.formats import discover_sources, read_scan

    data = np.random.default_rng(1).uniform(-1000, 1000, (8, 9, 5)).round().astype(np.float32)
    affine = np.diag([0.7, 0.8, 2.5, 1.0])
    write_dicom_series(data, affine, tmp_path / "s", slope=2.0, intercept=-1000.0)
    scan = read_scan(discover_sources([tmp_path / "s"])[0])
    np.testing.assert_allclose(scan.volume.data, np.round((data + 1000) / 2) * 2 - 1000)
    np.testing.assert_allclose(scan.volume.affine, affine, atol=1e-6)
