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
import os
import sys
import threading
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from heartseg.runtime.cli_infer import app
from onnx_models import make_scan
from scan_formats import (
    mha_fields,
    nrrd_fields,
    reorient,
    rotation,
    write_dicom_series,
    write_mha,
    write_mha_text,
    write_nifti,
    write_nrrd,
    write_nrrd_text,
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


# --- NIfTI names in any case --------------------------------------------------------------------


@pytest.mark.parametrize(("name", "stem"), [("a.nii", "a"), ("a.nii.gz", "a"), ("A.NII.GZ", "A"), ("b.Nii", "b"),
                                            ("c.nii.GZ", "c"), ("d.NII.gz", "d"), ("x.nii.gz.tar", None),
                                            ("nii", None), ("y.gz", None)])
def test_nifti_suffix_in_any_case(name: str, stem: str | None) -> None:
    from heartseg.runtime.formats import scan_name
    from heartseg.runtime.formats.nifti import is_nifti_path, strip_nifti_suffix

    assert is_nifti_path(Path(name)) is (stem is not None)
    assert strip_nifti_suffix(name) == (stem if stem is not None else name)
    if stem is not None:
        assert scan_name(Path(name)) == stem


def test_upper_case_nifti_scans_are_segmented(tmp_path: Path, single_model: Path, run_cli) -> None:
    for name in ("UPPER.NII.GZ", "Mixed.Nii", "lower.nii.gz"):
        make_scan(tmp_path / "in" / name)
    result = run_cli(app, tmp_path / "in", "-o", tmp_path / "out", "--model", single_model, "--threads", 1)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix == ".gz") == [
        "Mixed_mask.nii.gz", "UPPER_mask.nii.gz", "lower_mask.nii.gz"]
    one = run_cli(app, tmp_path / "in" / "UPPER.NII.GZ", "-o", tmp_path / "one", "--model", single_model)
    assert one.exit_code == 0, one.output
    assert (tmp_path / "one" / "UPPER_mask.nii.gz").is_file()


def test_output_file_named_in_upper_case(tmp_path: Path, single_model: Path, run_cli) -> None:
    scan, _ = make_scan(tmp_path / "in" / "s.nii.gz")
    target = tmp_path / "out" / "MASK.NII.GZ"
    target.parent.mkdir()
    result = run_cli(app, scan, "-o", target, "--model", single_model, "--threads", 1)
    assert result.exit_code == 0, result.output
    assert target.read_bytes()[:2] == b"\x1f\x8b"  # gzip, as the name says
    assert nib.load(str(target)).shape == nib.load(str(scan)).shape
    assert sorted(p.name for p in target.parent.iterdir() if not p.name.endswith(".json")) == ["MASK.NII.GZ"]


def test_eval_pairs_upper_case_names(tmp_path: Path, run_cli) -> None:
    from heartseg.runtime.cli_eval import app as eval_app

    mask = np.zeros((12, 12, 12), np.uint8)
    mask[3:8, 4:9, 2:7] = 1
    for path in (tmp_path / "pred" / "c1_mask.NII.GZ", tmp_path / "gt" / "c1.nii.gz"):
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(mask, np.eye(4)), str(path))
    report = tmp_path / "report.json"
    result = run_cli(eval_app, tmp_path / "pred", tmp_path / "gt", "--json", report)
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["cases"][0]["dice"] == pytest.approx(1.0)


SECRET = bytes(range(256)) * 2  # 512 bytes: the voxels of an 8 x 8 x 8 uint8 volume


def _detached(fmt: str, header: Path, data_file: str) -> Path:
    """A detached NRRD (.nhdr) or MetaImage (.mhd) header of 8 x 8 x 8 uint8 voxels kept in data_file."""
    pytest.importorskip({"nrrd": "nrrd", "mha": "SimpleITK"}[fmt])
    if fmt == "nrrd":
        return write_nrrd_text(header.with_suffix(".nhdr"), {**nrrd_fields((8, 8, 8)), "data file": data_file})
    return write_mha_text(header.with_suffix(".mhd"), {**mha_fields((8, 8, 8)), "ElementDataFile": data_file})


@pytest.mark.parametrize("where", ["relative", "absolute"])
@pytest.mark.parametrize("fmt", ["nrrd", "mha"])
def test_detached_data_outside_the_folder_is_refused(tmp_path: Path, fmt: str, where: str) -> None:
    from heartseg.runtime.errors import InputError
    from heartseg.runtime.formats import discover_sources, read_scan

    secret = tmp_path / "outside" / "secret.raw"
    secret.parent.mkdir()
    secret.write_bytes(SECRET)
    name = "../outside/secret.raw" if where == "relative" else str(secret)
    header = _detached(fmt, tmp_path / "scans" / "scan", name)
    with pytest.raises(InputError, match="leaves the folder") as info:
        read_scan(discover_sources([header])[0])
    assert str(header) in str(info.value) and name in str(info.value)


@pytest.mark.parametrize("fmt", ["nrrd", "mha"])
def test_detached_data_in_a_subfolder_is_read(tmp_path: Path, fmt: str) -> None:
    from heartseg.runtime.formats import discover_sources, read_scan

    (tmp_path / "scans" / "data").mkdir(parents=True)
    (tmp_path / "scans" / "data" / "scan.raw").write_bytes(SECRET)
    header = _detached(fmt, tmp_path / "scans" / "scan", "data/scan.raw")
    scan = read_scan(discover_sources([header])[0])
    np.testing.assert_array_equal(scan.volume.data, np.frombuffer(SECRET, np.uint8).reshape(8, 8, 8, order="F"))


def _mha_missing_data(folder: Path) -> Path:
    return write_mha_text(folder / "s.mhd", {**mha_fields((8, 8, 8)), "ElementDataFile": "gone.raw"})


def _mha_short_data(folder: Path) -> Path:
    (folder / "short.raw").write_bytes(SECRET[:100])
    return write_mha_text(folder / "s.mhd", {**mha_fields((8, 8, 8)), "ElementDataFile": "short.raw"})


def _mha_short_local(folder: Path) -> Path:
    return write_mha_text(folder / "s.mha", mha_fields((8, 8, 8)), SECRET[:100])


def _mha_cut_compressed(folder: Path) -> Path:
    body = zlib.compress(SECRET * 40)[:300]  # 8 x 8 x 320 voxels declared, the stream cut short
    return write_mha_text(folder / "s.mha", mha_fields((8, 8, 320), CompressedData="True"), body)


def _mha_not_compressed(folder: Path) -> Path:
    return write_mha_text(folder / "s.mha", mha_fields((8, 8, 8), CompressedData="True"), SECRET)


MHA_FAILURES = {
    "missing data file": (_mha_missing_data, "data file 'gone.raw' does not exist"),
    "short data file": (_mha_short_data, "truncated: 100 bytes of voxel data, the header declares 512"),
    "short local data": (_mha_short_local, "truncated: 100 bytes of voxel data, the header declares 512"),
    "cut compressed data": (_mha_cut_compressed, "truncated: the compressed voxel data inflates to"),
    "data not compressed": (_mha_not_compressed, "not valid compressed data"),
}


@pytest.mark.parametrize("case", sorted(MHA_FAILURES))
def test_metaimage_failure_is_one_line_with_its_reason(tmp_path: Path, single_model: Path, run_cli, capfd,
                                                       case: str) -> None:
    """ITK's own messages (written straight to the process's stderr) are kept out; the line says what is wrong."""
    pytest.importorskip("SimpleITK")
    make, fragment = MHA_FAILURES[case]
    scan = make(tmp_path)
    capfd.readouterr()
    result = run_cli(app, scan, "-o", tmp_path / "out", "--model", single_model, "--threads", 1)
    stray = capfd.readouterr()
    assert_one_line_error(result, fragment)
    assert str(scan) in result.output and "No such file" not in result.output
    assert stray.err == "" and stray.out == "", stray


def test_valid_nifti2_is_read_as_written(tmp_path: Path) -> None:
    """A NIfTI-2 header is not read with the NIfTI-1 layout (whose fields would land on other bytes)."""
    from heartseg.runtime.formats.nifti import load_volume

    data = np.random.default_rng(2).uniform(0, 100, (20, 22, 6)).astype(np.float32)
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = (-10.0, 4.0, 7.5)
    for name, sform_code in (("s.nii", 2), ("q.nii", 0), ("q.nii.gz", 0)):
        image = nib.Nifti2Image(data, affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=sform_code)  # sform code 0: a qform-only header
        nib.save(image, str(tmp_path / name))
        assert int(nib.load(str(tmp_path / name)).header["sform_code"]) == sform_code
        volume = load_volume(tmp_path / name)
        np.testing.assert_array_equal(volume.data, data)
        np.testing.assert_allclose(volume.affine, affine, atol=1e-6)



def test_nifti_geometry_comes_from_its_reader_before_the_voxels(tmp_path: Path) -> None:
    """The NIfTI reader reports its header's grid like the other readers, from the header alone."""
    from heartseg.runtime.formats import discover_sources, scan_geometry

    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    nib.save(nib.Nifti1Image(np.zeros((20, 22, 6), np.int16), affine), str(tmp_path / "s.nii"))
    with open(tmp_path / "s.nii", "r+b") as handle:  # voxel data cut short: the header is still whole
        handle.truncate(400)
    geometry = scan_geometry(discover_sources([tmp_path / "s.nii"])[0])
    assert geometry is not None
    assert geometry.shape == (20, 22, 6) and geometry.itemsize == 2 and not geometry.scaled
    np.testing.assert_allclose(geometry.spacing, (0.8, 0.9, 2.5))


# --- Readers reached through the Python API -----------------------------------------------------------------


def test_metaimage_read_leaves_stderr_alone_while_other_threads_run(tmp_path: Path, monkeypatch) -> None:
    """File descriptor 2 belongs to the whole process: it is not swapped while another thread may write to it."""
    pytest.importorskip("SimpleITK")
    from heartseg.runtime.formats import ScanSource, read_scan

    scan = write_mha_text(tmp_path / "s.mha", mha_fields((8, 8, 8)), SECRET)
    swapped: list[int] = []
    real_dup2 = os.dup2
    monkeypatch.setattr(os, "dup2", lambda fd, fd2, *rest: (swapped.append(fd2), real_dup2(fd, fd2, *rest))[1])
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        volume = read_scan(ScanSource(scan, "mha", "s")).volume
    finally:
        stop.set()
        other.join()
    assert 2 not in swapped
    np.testing.assert_array_equal(volume.data, np.frombuffer(SECRET, np.uint8).reshape(8, 8, 8, order="F"))


def test_metaimage_read_keeps_no_descriptor_when_its_message_sink_fails(tmp_path: Path, monkeypatch) -> None:
    """No temporary file for ITK's messages (a full disk): the scan is still read, and no descriptor is left open."""
    pytest.importorskip("SimpleITK")
    import tempfile

    from heartseg.runtime.formats import ScanSource, read_scan

    scan = write_mha_text(tmp_path / "s.mha", mha_fields((8, 8, 8)), SECRET)

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(tempfile, "TemporaryFile", no_space)
    volume = read_scan(ScanSource(scan, "mha", "s")).volume
    monkeypatch.undo()
    assert len(os.listdir("/proc/self/fd")) == before
    np.testing.assert_array_equal(volume.data, np.frombuffer(SECRET, np.uint8).reshape(8, 8, 8, order="F"))


@pytest.mark.parametrize("spelling", ["LOCAL", "Local", "local"])
def test_metaimage_local_data_in_every_spelling_metaio_reads(tmp_path: Path, spelling: str) -> None:
    pytest.importorskip("SimpleITK")
    from heartseg.runtime.formats import discover_sources, read_scan

    scan = write_mha_text(tmp_path / "s.mha", {**mha_fields((8, 8, 8)), "ElementDataFile": spelling}, SECRET)
    volume = read_scan(discover_sources([scan])[0]).volume
    np.testing.assert_array_equal(volume.data, np.frombuffer(SECRET, np.uint8).reshape(8, 8, 8, order="F"))


@pytest.mark.parametrize("case", ["nrrd", "nrrd data file", "mha", "mha data file"])
def test_named_pipe_given_through_the_api_is_refused_as_such(tmp_path: Path, case: str) -> None:
    """A named pipe is refused by what it is (never opened: that would block), not reported missing."""
    fmt = case.split()[0]
    pytest.importorskip({"nrrd": "nrrd", "mha": "SimpleITK"}[fmt])
    from heartseg.runtime.errors import InputError
    from heartseg.runtime.formats import ScanSource, read_scan, scan_geometry

    if case.endswith("data file"):
        (tmp_path / "scans").mkdir()
        os.mkfifo(tmp_path / "scans" / "pipe.raw")
        path = _detached(fmt, tmp_path / "scans" / "scan", "pipe.raw")
    else:
        path = tmp_path / f"scan.{fmt}"
        os.mkfifo(path)
    for call in (scan_geometry, read_scan):
        with pytest.raises(InputError, match="named pipe") as info:
            call(ScanSource(path, fmt, "scan"))
        assert str(path) in str(info.value)


def test_dicom_position_of_a_single_value_is_one_line(tmp_path: Path) -> None:
    from heartseg.runtime.errors import InputError
    from heartseg.runtime.formats import discover_sources, read_scan

    files = _series(tmp_path / "s", slices=4)
    _edit(files[2], ImagePositionPatient="12.5")
    with pytest.raises(InputError, match="ImagePositionPatient must be 3 finite numbers, got '12.5'"):
        read_scan(discover_sources([tmp_path / "s"])[0])


# Every spelling of the NRRD types, as the NRRD format defines them, and the numpy type of their voxels.
NRRD_TYPES = {"signed char": "i1", "int8": "i1", "int8_t": "i1", "uchar": "u1", "unsigned char": "u1", "uint8": "u1",
              "uint8_t": "u1", "short": "i2", "short int": "i2", "signed short": "i2", "signed short int": "i2",
              "int16": "i2", "int16_t": "i2", "ushort": "u2", "unsigned short": "u2", "unsigned short int": "u2",
              "uint16": "u2", "uint16_t": "u2", "int": "i4", "signed int": "i4", "int32": "i4", "int32_t": "i4",
              "uint": "u4", "unsigned int": "u4", "uint32": "u4", "uint32_t": "u4", "longlong": "i8",
              "long long": "i8", "long long int": "i8", "signed long long": "i8", "signed long long int": "i8",
              "int64": "i8", "int64_t": "i8", "ulonglong": "u8", "unsigned long long": "u8",
              "unsigned long long int": "u8", "uint64": "u8", "uint64_t": "u8", "float": "f4", "double": "f8"}


@pytest.mark.parametrize("encoding", ["raw", "gzip", "bzip2", "ascii"])
@pytest.mark.parametrize("endian", ["little", "big"])
@pytest.mark.parametrize("type_name", sorted(NRRD_TYPES))
def test_nrrd_types_byte_orders_and_encodings(tmp_path: Path, type_name: str, endian: str, encoding: str) -> None:
    """Each NRRD type, in either byte order and each encoding, reads as the values pynrrd reads from the file."""
    nrrd = pytest.importorskip("nrrd")
    import bz2

    from heartseg.runtime.formats import discover_sources, read_scan

    dtype = np.dtype(NRRD_TYPES[type_name]).newbyteorder(">" if endian == "big" else "<")
    values = np.random.default_rng(1).integers(0, 100, (5, 4, 3)).astype(dtype)
    raw = values.tobytes(order="F")
    body = {"raw": raw, "gzip": zlib.compress(raw, wbits=31), "bzip2": bz2.compress(raw),
            "ascii": " ".join(str(v) for v in values.ravel(order="F")).encode() + b"\n"}[encoding]
    scan = write_nrrd_text(tmp_path / "s.nrrd", nrrd_fields((5, 4, 3), type=type_name, endian=endian,
                                                            encoding=encoding), body)
    volume = read_scan(discover_sources([scan])[0]).volume
    np.testing.assert_array_equal(volume.data, values.astype(np.float32))
    np.testing.assert_array_equal(volume.data, nrrd.read(str(scan), index_order="F")[0].astype(np.float32))


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("order", [{}, {"BinaryDataByteOrderMSB": "True"}, {"ElementByteOrderMSB": "True"},
                                   {"BinaryDataByteOrderMSB": "False", "ElementByteOrderMSB": "True"},
                                   {"ElementByteOrderMSB": "False", "BinaryDataByteOrderMSB": "True"}])
def test_metaimage_byte_order_as_itk_reads_it(tmp_path: Path, order: dict, compressed: bool) -> None:
    """Multi-byte voxels, stored or compressed, in the byte order ITK takes from the header's two fields."""
    sitk = pytest.importorskip("SimpleITK")
    from heartseg.runtime.formats import discover_sources, read_scan

    big = order.get("BinaryDataByteOrderMSB", order.get("ElementByteOrderMSB")) == "True"
    values = np.random.default_rng(2).integers(-3000, 3000, (6, 5, 4)).astype(">i2" if big else "<i2")
    raw = values.tobytes(order="F")
    fields = {name: value for name, value in mha_fields((6, 5, 4), ElementType="MET_SHORT").items()
              if name != "BinaryDataByteOrderMSB"}
    body = zlib.compress(raw) if compressed else raw
    fields = {**fields, **order, "CompressedData": str(compressed),
              **({"CompressedDataSize": str(len(body))} if compressed else {})}  # ITK misreads LOCAL data without it
    scan = write_mha_text(tmp_path / "s.mha", fields, body)
    volume = read_scan(discover_sources([scan])[0]).volume
    np.testing.assert_array_equal(volume.data, values.astype(np.float32))
    itk = sitk.GetArrayFromImage(sitk.ReadImage(str(scan))).transpose(2, 1, 0)
    np.testing.assert_array_equal(volume.data, itk.astype(np.float32))


# While a test counts them, the paths opened (an audit hook sees every open()).
OPENED: list[list[str]] = []


def _record_opens(event: str, args: tuple) -> None:
    if OPENED and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED[-1].append(os.path.realpath(os.fsdecode(args[0])))


def _opens_of_a_pipeline_read(path: Path) -> list[str]:
    """The files opened while a scan is found, its header checked and its voxels read, as the pipeline does."""
    from heartseg.runtime.formats import discover_sources, read_scan, scan_geometry

    if not getattr(_opens_of_a_pipeline_read, "hooked", False):
        sys.addaudithook(_record_opens)
        _opens_of_a_pipeline_read.hooked = True  # type: ignore[attr-defined]
    OPENED.append([])
    try:
        source = discover_sources([path])[0]
        assert scan_geometry(source) is not None
        read_scan(source)
    finally:
        opened = OPENED.pop()
    return opened


@pytest.mark.parametrize("case", ["nrrd raw", "nrrd gzip", "mha raw", "mha compressed", "dicom"])
def test_a_scan_is_read_once_for_its_header_and_once_for_its_voxels(tmp_path: Path, case: str) -> None:
    """Finding a scan, checking its header and reading it open each of its files at most twice: the header is
    parsed (a DICOM series listed) once, compressed voxels are inflated once."""
    pytest.importorskip({"nrrd": "nrrd", "mha": "SimpleITK", "dicom": "pydicom"}[case.split()[0]])
    if case.startswith("nrrd"):
        encoding = case.split()[1]
        body = SECRET if encoding == "raw" else zlib.compress(SECRET, wbits=31)
        files = [write_nrrd_text(tmp_path / "s.nrrd", nrrd_fields((8, 8, 8), encoding=encoding), body)]
        path = files[0]
    elif case.startswith("mha"):
        compressed = case.endswith("compressed")
        files = [write_mha_text(tmp_path / "s.mha", mha_fields((8, 8, 8), CompressedData=str(compressed)),
                                zlib.compress(SECRET) if compressed else SECRET)]
        path = files[0]
    else:
        files = _series(tmp_path / "s", slices=4)
        path = tmp_path / "s"
    opened = _opens_of_a_pipeline_read(path)
    counts = {str(file): opened.count(os.path.realpath(file)) for file in files}
    assert all(1 <= count <= 2 for count in counts.values()), counts


def test_metaimage_text_voxels_have_no_byte_order(tmp_path: Path) -> None:
    """Voxels written as text are read as written, whatever byte order the header gives for binary data."""
    pytest.importorskip("SimpleITK")
    from heartseg.runtime.formats import discover_sources, read_scan

    values = np.random.default_rng(3).integers(-3000, 3000, (4, 3, 2))
    text = " ".join(str(v) for v in values.ravel(order="F")).encode() + b"\n"
    fields = mha_fields((4, 3, 2), ElementType="MET_SHORT", BinaryData="False", BinaryDataByteOrderMSB="True")
    scan = write_mha_text(tmp_path / "s.mha", fields, text)
    np.testing.assert_array_equal(read_scan(discover_sources([scan])[0]).volume.data, values.astype(np.float32))
