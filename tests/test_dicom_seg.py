"""DICOM SEG that other DICOM tools accept: dciodvfy finds no errors, dcmqi reads the mask back onto the series.

The series are synthetic (tests/scan_formats.py), on an oblique grid, once complete and once without
the type 2 attributes clinics and anonymisers often leave out (birth date, sex, accession number,
study ID, date and time, slice thickness): the SEG must be written either way, with those attributes
present and empty. What a SEG cannot do without (the study, the frame of reference, the instances
it references) is refused before any segmenting, with exit 2 and one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from heartseg.runtime import segmenter as segmenter_module
from heartseg.runtime.cli_infer import app
from onnx_models import make_scan, rotation_affine
from scan_formats import write_dicom_series
from test_bad_input import assert_nothing_written, assert_one_line_error

pydicom = pytest.importorskip("pydicom", reason="pydicom is not installed (pip install 'heartseg[dicom]')")
hd = pytest.importorskip("highdicom", reason="highdicom is not installed (pip install 'heartseg[dicom]')")

TYPE_2 = ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate", "StudyTime")
SERIES_KINDS = {"complete": (), "without_type_2": (*TYPE_2, "SliceThickness")}
SPACING = (1.4, 1.2, 1.6)  # rotation_affine's voxel sizes: the slices are 1.6 mm apart


def _tool(name: str) -> str | None:
    """The executable, looked up beside this Python first (a virtual environment's bin) and then on PATH."""
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


def write_series(folder: Path, drop: tuple[str, ...] = ()) -> tuple[list[Path], np.ndarray]:
    """An oblique synthetic MR series with an atrium-like blob, without the attributes in drop; (files, affine)."""
    affine = rotation_affine(spacing=SPACING)
    image, _ = make_scan(folder.parent / "source.nii.gz", affine=affine)
    files = write_dicom_series(np.asarray(nib.load(str(image)).dataobj), affine, folder)
    for path in files:
        ds = pydicom.dcmread(str(path))
        for keyword in drop:
            delattr(ds, keyword)
        ds.save_as(str(path))
    return files, affine


def run_infer(run_cli, series: Path, out: Path, model: Path, *options) -> dict:
    """heartseg-infer on the series with a JSON report; it must succeed (exit 0, or 3 for a QC flag)."""
    result = run_cli(app, series, "-o", out, "--model", model, "--threads", 1, "--json", "-", *options)
    assert result.exit_code in (0, 3), f"exit {result.exit_code}\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)["scans"][0]


@pytest.fixture(params=sorted(SERIES_KINDS))
def seg_and_mask(request: pytest.FixtureRequest, tmp_path: Path, single_model: Path, run_cli):
    """A SEG heartseg wrote for a series, the NIfTI mask it writes for the same series, and the source files."""
    files, _ = write_series(tmp_path / "series", SERIES_KINDS[request.param])
    seg = Path(run_infer(run_cli, tmp_path / "series", tmp_path / "seg", single_model,
                         "--output-format", "dicom-seg")["mask"])
    mask = nib.load(run_infer(run_cli, tmp_path / "series", tmp_path / "nifti", single_model)["mask"])
    assert np.asarray(mask.dataobj).any(), "the test model found nothing to segment"
    return seg, mask, files


def test_type_2_attributes_are_written_empty(seg_and_mask) -> None:
    seg_path, _, files = seg_and_mask
    seg = pydicom.dcmread(str(seg_path))
    source = pydicom.dcmread(str(files[0]))
    for keyword in TYPE_2 + ("ContentCreatorName",):
        assert keyword in seg, f"{keyword} missing (type 2: present, possibly empty)"
        if keyword in source:
            assert seg[keyword].value == source[keyword].value, keyword
        else:
            assert seg[keyword].value in ("", None), (keyword, seg[keyword].value)
    # The SEG's slice thickness is the source's, or the distance between its slices when the source has none.
    thickness = float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness)
    expected = float(source.SliceThickness) if "SliceThickness" in source else SPACING[2]
    assert thickness == pytest.approx(expected, abs=1e-6)


def test_segment_has_a_display_colour(seg_and_mask) -> None:
    seg = pydicom.dcmread(str(seg_and_mask[0]))
    value = seg.SegmentSequence[0].RecommendedDisplayCIELabValue
    assert len(value) == 3
    assert hd.color.CIELabColor.from_dicom_value(tuple(value)).to_rgb() == (255, 0, 0)  # red, as in the overlay


def test_dciodvfy_finds_no_errors(seg_and_mask) -> None:
    dciodvfy = _tool("dciodvfy")
    if dciodvfy is None:
        pytest.skip("dciodvfy is not installed (Debian/Ubuntu: apt-get install dicom3tools)")
    run = subprocess.run([dciodvfy, str(seg_and_mask[0])], capture_output=True, text=True, timeout=60)
    report = run.stdout + run.stderr
    errors = [line for line in report.splitlines() if line.startswith("Error")]
    assert not errors, report
    assert "Segmentation" in report, report  # it recognised the IOD it checked


def test_dcmqi_reads_the_mask_back_onto_the_series(seg_and_mask, tmp_path: Path) -> None:
    segimage2itkimage = _tool("segimage2itkimage")
    if segimage2itkimage is None:
        pytest.skip("dcmqi's segimage2itkimage is not installed (pip install dcmqi)")
    seg_path, mask, _ = seg_and_mask
    out = tmp_path / "dcmqi"
    out.mkdir()
    run = subprocess.run([segimage2itkimage, "--inputDICOM", str(seg_path), "--outputDirectory", str(out),
                          "--outputType", "nifti"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    images = sorted(out.glob("*.nii.gz"))
    assert len(images) == 1, (sorted(out.iterdir()), run.stdout)
    read_back = nib.load(str(images[0]))
    expected = np.asarray(mask.dataobj) != 0
    # Voxel by voxel on the source grid: every voxel dcmqi's image holds, mapped through world coordinates.
    data = np.asarray(read_back.dataobj) != 0
    index = np.argwhere(np.ones(data.shape, bool))
    world = index @ read_back.affine[:3, :3].T + read_back.affine[:3, 3]
    source = (world - mask.affine[:3, 3]) @ np.linalg.inv(mask.affine[:3, :3]).T
    rounded = np.round(source).astype(int)
    assert np.abs(source - rounded).max() < 1e-3, "dcmqi's grid is not the source grid"
    assert data.shape == expected.shape
    assert np.all((rounded >= 0) & (rounded < expected.shape)), "dcmqi's grid reaches outside the source grid"
    on_source = np.zeros(expected.shape, bool)
    on_source[tuple(rounded.T)] = data[tuple(index.T)]
    np.testing.assert_array_equal(on_source, expected)


@pytest.mark.parametrize("keyword", ["FrameOfReferenceUID", "StudyInstanceUID", "SOPInstanceUID"])
def test_seg_needs_are_checked_before_segmenting(tmp_path: Path, single_model: Path, run_cli, monkeypatch,
                                                 keyword: str) -> None:
    write_series(tmp_path / "series", (keyword,))
    calls = []
    segment = segmenter_module.Segmenter.segment

    def counted(self, *args, **kwargs):
        calls.append(1)
        return segment(self, *args, **kwargs)

    monkeypatch.setattr(segmenter_module.Segmenter, "segment", counted)
    out = tmp_path / "out"
    result = run_cli(app, tmp_path / "series", "-o", out, "--model", single_model, "--threads", 1,
                     "--output-format", "dicom-seg")
    assert_one_line_error(result, keyword, "DICOM SEG")
    assert not calls, "segmented a series whose SEG cannot be written"
    assert_nothing_written(out)


def test_writing_a_seg_leaves_the_source_datasets_unchanged(tmp_path: Path) -> None:
    """The SEG's copies of the source headers are its own: filling in an empty slice thickness there must not
    change the series that was read (later outputs and scans of the run use it)."""
    import copy

    from heartseg.runtime.formats.dicom_seg import build_segmentation

    files, _ = write_series(tmp_path / "series")
    datasets = [pydicom.dcmread(str(path)) for path in files]
    datasets.sort(key=lambda ds: int(ds.InstanceNumber))
    for ds in datasets:
        ds.SliceThickness = ""  # present but empty (type 2)
    before = copy.deepcopy(datasets)
    mask = np.zeros((int(datasets[0].Columns), int(datasets[0].Rows), len(datasets)), np.uint8)
    mask[4:9, 5:10, 3:7] = 1
    seg = build_segmentation(datasets, mask, SPACING[2])
    assert float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness) == \
        pytest.approx(SPACING[2])
    assert all(ds.SliceThickness == "" for ds in datasets)
    assert datasets == before
