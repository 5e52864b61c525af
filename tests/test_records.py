"""A finished scan's record, and what a run does with outputs it finds: a record is tied to the scan and
the model it was made from; a scan another run is writing is left to it; a rollback removes only this
run's files; SIGTERM rolls back the scan being written; a skipped scan says why in every report."""

from __future__ import annotations

import contextvars
import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from heartseg.runtime.cli_infer import app
from heartseg.runtime.formats import ScanSource, discover_sources, read_scan
from heartseg.runtime.formats.nifti import NiftiWriter
from heartseg.runtime.formats.nifti import save_volume
from heartseg.runtime.pipeline import (
    RECORDS_FOLDER,
    OutputOptions,
    plan_jobs,
    record_path,
    run_job,
    write_outputs,
)
from heartseg.runtime.segmenter import Segmenter
from onnx_models import make_scan
from scan_formats import mha_fields, nrrd_fields, write_dicom_series, write_mha_text, write_nrrd_text
from test_bad_input import assert_one_line_error
from test_cli_infer import assert_clean_exit

SHAPE = (24, 28, 20)
BIG_BLOB = {"radii": (0.3, 0.27, 0.3)}


def infer(run_cli, *args):
    """heartseg-infer on one CPU thread."""
    return run_cli(app, *args, "--threads", 1)


def scans_of(report: Path) -> dict[str, dict]:
    return {s["name"]: s for s in json.loads(report.read_text())["scans"]}


def mask_of(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj).copy()


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def record_path_of(out: Path, name: str) -> Path:
    return out / RECORDS_FOLDER / f"{name}_mask.nii.gz.json"


# --- a record belongs to the scan and the model it was made from ---


def test_resume_redoes_another_scan_of_the_same_name(tmp_path: Path, single_model: Path, run_cli) -> None:
    """r1/case then r2/case into one folder: the second is segmented, not reported from the first's record."""
    first, _ = make_scan(tmp_path / "r1" / "case.nii.gz", shape=SHAPE, seed=1)
    second, _ = make_scan(tmp_path / "r2" / "case.nii.gz", shape=SHAPE, seed=2, **BIG_BLOB)
    out, report = tmp_path / "out", tmp_path / "r.json"
    assert_clean_exit(infer(run_cli, first.parent, "-o", out, "--model", single_model, "--resume"), 0)
    again = infer(run_cli, second.parent, "-o", out, "--model", single_model, "--resume", "--json", report)
    assert_clean_exit(again, 0)
    assert "finished by an earlier run" not in again.stdout
    fresh = infer(run_cli, second, "-o", tmp_path / "fresh", "--model", single_model, "--json", tmp_path / "f.json")
    assert_clean_exit(fresh, 0)
    got, want = scans_of(report)["case"], scans_of(tmp_path / "f.json")["case"]
    assert got["status"] == want["status"] and got["volume_ml"] == pytest.approx(want["volume_ml"])
    assert got["qc"] == want["qc"] and got["estimated_dice"] == want["estimated_dice"]
    np.testing.assert_array_equal(mask_of(out / "case_mask.nii.gz"), mask_of(tmp_path / "fresh" / "case_mask.nii.gz"))
    record = json.loads(record_path_of(out, "case").read_text())
    assert record["volume_ml"] == pytest.approx(want["volume_ml"])


def test_resume_redoes_a_scan_segmented_with_another_model(tmp_path: Path, single_model: Path, cascade_model: Path,
                                                          run_cli) -> None:
    scan, _ = make_scan(tmp_path / "in" / "case.nii.gz", shape=SHAPE, seed=4)
    out = tmp_path / "out"
    assert_clean_exit(infer(run_cli, scan, "-o", out, "--model", single_model, "--resume"), 0)
    before = record_path_of(out, "case").read_text()
    again = infer(run_cli, scan, "-o", out, "--model", cascade_model, "--resume")
    assert_clean_exit(again, 0)
    assert "finished by an earlier run" not in again.stdout
    assert record_path_of(out, "case").read_text() != before
    same = infer(run_cli, scan, "-o", out, "--model", cascade_model, "--resume")
    assert_clean_exit(same, 0)
    assert "1 of 1 scans were finished by an earlier run" in same.stdout


def test_an_older_record_without_a_fingerprint_does_not_count(tmp_path: Path, single_model: Path, run_cli) -> None:
    scan, _ = make_scan(tmp_path / "in" / "case.nii.gz", shape=SHAPE, seed=5)
    out = tmp_path / "out"
    assert_clean_exit(infer(run_cli, scan, "-o", out, "--model", single_model, "--resume"), 0)
    path = record_path_of(out, "case")
    record = json.loads(path.read_text())
    old = {k: v for k, v in record.items() if k not in ("source", "model", "outputs")}
    path.write_text(json.dumps(dict(old, record_version=1)))
    os.utime(out / "case_mask.nii.gz", ns=(0, 0))
    again = infer(run_cli, scan, "-o", out, "--model", single_model, "--resume")
    assert_clean_exit(again, 0)
    assert "finished by an earlier run" not in again.stdout
    assert (out / "case_mask.nii.gz").stat().st_mtime_ns > 0  # segmented again
    assert json.loads(path.read_text())["record_version"] > 1


def test_resume_redoes_a_dicom_series_whose_files_changed(tmp_path: Path, single_model: Path, run_cli) -> None:
    pydicom = pytest.importorskip("pydicom", reason="pydicom is not installed (pip install 'heartseg[dicom]')")
    data = make_scan(tmp_path / "nifti" / "s.nii.gz", shape=SHAPE, seed=6)[0]
    image = nib.load(str(data))
    series = tmp_path / "study"
    files = write_dicom_series(np.asanyarray(image.dataobj), image.affine, series)
    out = tmp_path / "out"
    assert_clean_exit(infer(run_cli, series, "-o", out, "--model", single_model, "--resume"), 0)
    assert "finished by an earlier run" in infer(run_cli, series, "-o", out, "--model", single_model,
                                                 "--resume").stdout
    # The same series (same UIDs, same file sizes) with one slice's pixels changed.
    ds = pydicom.dcmread(str(files[0]))
    pixels = ds.pixel_array.copy()
    pixels[:] = pixels.max()
    ds.PixelData = pixels.tobytes()
    ds.save_as(str(files[0]))
    os.utime(files[0], ns=(10**18, 10**18))
    again = infer(run_cli, series, "-o", out, "--model", single_model, "--resume")
    assert_clean_exit(again, 0)
    assert "finished by an earlier run" not in again.stdout


def test_a_fingerprint_ignores_where_the_scan_is_mounted(tmp_path: Path) -> None:
    """Shards may see the scans under other paths: a copy with the same bytes and times has the same fingerprint."""
    from heartseg.runtime.pipeline import scan_fingerprint

    scan, _ = make_scan(tmp_path / "a" / "case.nii.gz", shape=SHAPE, seed=7)
    (tmp_path / "b").mkdir()
    copy = Path(shutil.copy2(scan, tmp_path / "b" / "case.nii.gz"))
    source, moved = discover_sources([scan])[0], discover_sources([copy])[0]
    assert scan_fingerprint(source) == scan_fingerprint(moved)
    folder = tmp_path / "series"
    for name in ("1.dcm", "sub/2.dcm"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(name.encode())
    twin = Path(shutil.copytree(folder, tmp_path / "elsewhere" / "series"))
    dicom = lambda path: ScanSource(path, "dicom", "series", "1.2.3")  # noqa: E731
    assert scan_fingerprint(dicom(folder)) == scan_fingerprint(dicom(twin))
    (twin / "sub" / "2.dcm").write_bytes(b"another slice")
    assert scan_fingerprint(dicom(folder)) != scan_fingerprint(dicom(twin))
    os.utime(copy, ns=(1, 1))
    assert scan_fingerprint(source) != scan_fingerprint(moved)


def test_merge_reports_a_record_of_a_scan_that_changed(tmp_path: Path, single_model: Path, run_cli) -> None:
    folder = tmp_path / "scans"
    for i in range(3):
        make_scan(folder / f"case_{i}.nii.gz", shape=SHAPE, seed=i)
    out = tmp_path / "out"
    for k in range(2):
        assert_clean_exit(infer(run_cli, folder, "-o", out, "--model", single_model, "--shard", f"{k}/2"), 0)
    assert_clean_exit(run_cli(app, folder, "-o", out, "--model", single_model, "--merge-reports"), 0)
    make_scan(folder / "case_1.nii.gz", shape=SHAPE, seed=9, **BIG_BLOB)
    merged = run_cli(app, folder, "-o", out, "--model", single_model, "--merge-reports", "--json", tmp_path / "m.json")
    assert_clean_exit(merged, 1)
    assert "case_1" in merged.stderr and "changed" in merged.stderr
    assert json.loads((tmp_path / "m.json").read_text())["complete"] is False


# --- two runs writing one folder ---


@pytest.fixture
def one_job(tmp_path: Path, single_model: Path):
    """A scan, its planned job (with a probability map) into tmp_path/out, and a segmenter."""
    def plan(**options):
        scan, _ = make_scan(tmp_path / "in" / "case.nii.gz", shape=SHAPE, seed=3)
        chosen = OutputOptions(save_prob=True, **options)
        (job,) = plan_jobs(discover_sources([scan]), tmp_path / "out", chosen)
        job.mask_path.parent.mkdir(parents=True, exist_ok=True)
        return job, chosen, Segmenter(single_model, device="cpu", threads=1)

    return plan


def test_rollback_spares_an_output_another_run_replaced(one_job, monkeypatch: pytest.MonkeyPatch) -> None:
    job, options, segmenter = one_job()
    scan = read_scan(job.source)
    prediction = segmenter.segment(scan.volume, keep_prob=True)
    theirs = np.full(scan.volume.shape, 0.25, np.float32)

    def replaced_then_failed(self, scan, mask, path, overwrite):
        # Another run replaces the probability map just written; then this run's mask cannot be written.
        # (An empty context: another process's writes are none of this run's own.)
        contextvars.Context().run(save_volume, theirs, scan.volume.affine, job.prob_path)
        raise RuntimeError("the mask could not be written")

    monkeypatch.setattr(NiftiWriter, "write", replaced_then_failed)
    with pytest.raises(RuntimeError):
        write_outputs(job, scan, prediction, options)
    assert job.prob_path.is_file(), "the rollback removed the other run's file"
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(job.prob_path)).dataobj), theirs)


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_leaves_alone_a_scan_another_run_is_writing(one_job, monkeypatch: pytest.MonkeyPatch,
                                                          resume: bool) -> None:
    """Run B starts the scan while run A has written its probability map and not yet its mask."""
    job, options, segmenter = one_job(resume=resume, records=resume)
    original = NiftiWriter.write
    seconds = []

    def second_run_meanwhile(self, scan, mask, path, overwrite):
        if not seconds:  # B's own mask write, if B went on, must not start a third run
            seconds.append("started")
            seconds.append(run_job(segmenter, job, options))
        return original(self, scan, mask, path, overwrite)

    monkeypatch.setattr(NiftiWriter, "write", second_run_meanwhile)
    first = run_job(segmenter, job, options)
    second = seconds[-1]
    assert first.status == "ok", first.error
    assert second.status == "skipped" and "another run" in second.reason, (second.status, second.reason)
    assert job.prob_path.is_file() and job.mask_path.is_file()
    expected = ["case_mask.nii.gz", "case_prob.nii.gz"] + ([RECORDS_FOLDER] if resume else [])
    assert sorted(files_in(job.mask_path.parent)) == sorted(expected)  # no lock file left either
    if resume:
        assert json.loads(record_path(job).read_text())["status"] == "ok"


# --- SIGTERM, and leftovers without their mask ---

TERMINATED_BEFORE_THE_MASK = """
import os, signal, sys, time
from heartseg.runtime.cli_infer import main
from heartseg.runtime.formats.nifti import NiftiWriter

def write(self, scan, mask, path, overwrite):
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(1000):  # the handler runs in the main thread at its next step
        time.sleep(0.01)
    raise AssertionError("SIGTERM did not stop the run")

NiftiWriter.write = write
sys.argv = ["heartseg-infer", *sys.argv[1:]]
main()
"""


def test_sigterm_rolls_back_the_scan_being_written(tmp_path: Path, single_model: Path, run_cli) -> None:
    scan, _ = make_scan(tmp_path / "in" / "case.nii.gz", shape=SHAPE, seed=8)
    out = tmp_path / "out"
    # Warnings (a test model records no weights digest) are not what this test reads.
    command = [sys.executable, "-W", "ignore::UserWarning", "-c", TERMINATED_BEFORE_THE_MASK, str(scan), "-o", str(out),
               "--model", str(single_model), "--save-prob", "--threads", "1"]
    killed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert killed.returncode == 128 + signal.SIGTERM, (killed.returncode, killed.stderr)
    lines = [line for line in (killed.stdout + killed.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "SIGTERM" in lines[0], lines
    assert files_in(out) == []  # no probability map, no mask, no temporary or lock file
    again = infer(run_cli, scan, "-o", out, "--model", single_model, "--save-prob", "--json", tmp_path / "r.json")
    assert_clean_exit(again, 0)
    assert scans_of(tmp_path / "r.json")["case"]["status"] == "ok"
    assert files_in(out) == ["case_mask.nii.gz", "case_prob.nii.gz"]


@pytest.mark.parametrize("records", [False, True])
def test_a_probability_map_without_its_mask_is_redone(tmp_path: Path, single_model: Path, run_cli,
                                                      records: bool) -> None:
    scan, _ = make_scan(tmp_path / "in" / "case.nii.gz", shape=SHAPE, seed=8)
    out, report = tmp_path / "out", tmp_path / "r.json"
    out.mkdir()
    (out / "case_prob.nii.gz").write_bytes(b"left by a run that was stopped")
    extra = ["--shard", "0/1"] if records else []
    result = infer(run_cli, scan, "-o", out, "--model", single_model, "--save-prob", "--json", report, *extra)
    assert_clean_exit(result, 0)
    assert "skipped" not in result.stdout
    assert scans_of(report)["case"]["status"] == "ok"
    assert (out / "case_mask.nii.gz").is_file()
    assert nib.load(str(out / "case_prob.nii.gz")).shape == SHAPE


# --- what a skipped scan reports ---


def test_a_skipped_scan_says_why_in_every_report(tmp_path: Path, single_model: Path, run_cli) -> None:
    scan, _ = make_scan(tmp_path / "in" / "case.nii.gz", shape=SHAPE, seed=2)
    out, report, table = tmp_path / "out", tmp_path / "r.json", tmp_path / "r.csv"
    assert_clean_exit(infer(run_cli, scan, "-o", out, "--model", single_model), 0)
    again = infer(run_cli, scan, "-o", out, "--model", single_model, "--json", report, "--csv", table)
    assert_clean_exit(again, 0)
    entry = scans_of(report)["case"]
    assert entry["status"] == "skipped"
    assert "exists" in entry["reason"] and "--overwrite" in entry["reason"] and "--resume" in entry["reason"]
    (row,) = list(csv.DictReader(table.open()))
    assert row["status"] == "skipped" and row["reason"] == entry["reason"]
    assert "skipped" in again.stdout and "--overwrite" in again.stdout


def test_a_skipped_scan_with_a_matching_record_reports_its_numbers(tmp_path: Path, single_model: Path,
                                                                  run_cli) -> None:
    scan, _ = make_scan(tmp_path / "in" / "case.nii.gz", shape=SHAPE, seed=2)
    out, first, second = tmp_path / "out", tmp_path / "first.json", tmp_path / "second.json"
    assert_clean_exit(infer(run_cli, scan, "-o", out, "--model", single_model, "--resume", "--json", first), 0)
    table = tmp_path / "r.csv"
    again = infer(run_cli, scan, "-o", out, "--model", single_model, "--json", second, "--csv", table)
    assert_clean_exit(again, 0)
    done, reported = scans_of(first)["case"], scans_of(second)["case"]
    assert reported["status"] == done["status"] == "ok"
    assert reported["volume_ml"] == pytest.approx(done["volume_ml"]) and reported["qc"] == done["qc"]
    assert "finished by an earlier run" in again.stdout
    (row,) = list(csv.DictReader(table.open()))
    assert row["status"] == "ok" and row["qc"] == done["qc"]


# --- reports and write errors ---


@pytest.mark.parametrize("option", ["--json", "--csv"])
def test_a_report_inside_the_records_folder_is_refused(tmp_path: Path, single_model: Path, run_cli,
                                                       option: str) -> None:
    scan, _ = make_scan(tmp_path / "in" / "case.nii.gz", shape=SHAPE, seed=2)
    out = tmp_path / "out"
    assert_clean_exit(infer(run_cli, scan, "-o", out, "--model", single_model, "--resume"), 0)
    record = record_path_of(out, "case")
    before = record.read_bytes()
    for target in (record, record.parent / "report.json"):
        result = infer(run_cli, scan, "-o", out, "--model", single_model, "--resume", option, target)
        assert_one_line_error(result, option, RECORDS_FOLDER)
        assert record.read_bytes() == before and not (record.parent / "report.json").exists()


def test_a_full_disk_names_the_file(tmp_path: Path, single_model: Path, run_cli,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    scan, _ = make_scan(tmp_path / "in" / "case.nii.gz", shape=SHAPE, seed=2)
    out = tmp_path / "out"

    save = nib.save

    def full(image, filename):
        # The disk fills up while the mask's temporary file is written (the probability map went through).
        if ".case_mask.nii.gz." in str(filename):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(image, filename)

    monkeypatch.setattr(nib, "save", full)
    result = infer(run_cli, scan, "-o", out, "--model", single_model, "--save-prob", "--json", tmp_path / "r.json")
    # Exit 1, not 2: a full disk is a failure of the run, not a mistake in the command or its input.
    assert_clean_exit(result, 1)
    assert str(out / "case_mask.nii.gz") in result.stderr and os.strerror(errno.ENOSPC) in result.stderr
    assert "OSError" not in result.stderr
    entry = scans_of(tmp_path / "r.json")["case"]
    assert entry["status"] == "failed" and str(out / "case_mask.nii.gz") in entry["error"]
    assert files_in(out) == []


# --- what a fingerprint covers ---


@pytest.mark.parametrize("kind", ["mhd", "nhdr"])
def test_a_changed_detached_data_file_is_noticed(tmp_path: Path, kind: str) -> None:
    """.mhd + .raw and .nhdr + .raw: replacing the voxels and leaving the header alone changes the fingerprint."""
    from heartseg.runtime.pipeline import scan_fingerprint

    if kind == "mhd":
        header = write_mha_text(tmp_path / "case.mhd", mha_fields((4, 4, 4), ElementDataFile="case.raw"))
        source = ScanSource(header, "mha", "case")
    else:
        header = write_nrrd_text(tmp_path / "case.nhdr", nrrd_fields((4, 4, 4), data_file="case.raw"))
        source = ScanSource(header, "nrrd", "case")
    data = tmp_path / "case.raw"
    data.write_bytes(bytes(64))
    os.utime(data, ns=(10**18, 10**18))
    before = scan_fingerprint(source)
    data.write_bytes(bytes(range(64)))  # other voxels, same size
    os.utime(data, ns=(10**18 + 5 * 10**9, 10**18 + 5 * 10**9))
    assert scan_fingerprint(source) != before


def test_a_dicom_zip_whose_member_changed_is_noticed(tmp_path: Path) -> None:
    """A zip's central directory lies at its end: a member rewritten past the first bytes changes the fingerprint."""
    import zipfile

    from heartseg.runtime.pipeline import scan_fingerprint

    def make(path: Path, last: bytes) -> Path:
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
            for name, payload in (("1.dcm", bytes(200_000)), ("2.dcm", last)):
                archive.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), payload)
        os.utime(path, ns=(10**18, 10**18))
        return path

    first, second = make(tmp_path / "a.zip", b"0123456789"), make(tmp_path / "b.zip", b"9876543210")
    assert first.stat().st_size == second.stat().st_size
    dicom = lambda path: ScanSource(path, "dicom", "series", "1.2.3")  # noqa: E731
    assert scan_fingerprint(dicom(first)) != scan_fingerprint(dicom(second))


def test_times_count_in_whole_seconds(tmp_path: Path, single_model: Path, run_cli) -> None:
    """A copy that keeps times to the second only (some file systems, archives) leaves the record matching."""
    scan, _ = make_scan(tmp_path / "in" / "case.nii.gz", shape=SHAPE, seed=3)
    out = tmp_path / "out"
    assert_clean_exit(infer(run_cli, scan, "-o", out, "--model", single_model, "--resume"), 0)
    for path in (scan, out / "case_mask.nii.gz"):
        whole = path.stat().st_mtime_ns // 10**9 * 10**9
        os.utime(path, ns=(whole, whole))
    again = infer(run_cli, scan, "-o", out, "--model", single_model, "--resume")
    assert_clean_exit(again, 0)
    assert "1 of 1 scans were finished by an earlier run" in again.stdout


def test_masks_inside_the_dicom_folder_leave_its_record_matching(tmp_path: Path, single_model: Path,
                                                                 run_cli) -> None:
    """-o study/seg: the masks, records and a Finder's __MACOSX files are not part of the series."""
    pytest.importorskip("pydicom", reason="pydicom is not installed (pip install 'heartseg[dicom]')")
    data = make_scan(tmp_path / "nifti" / "s.nii.gz", shape=SHAPE, seed=6)[0]
    image = nib.load(str(data))
    series = tmp_path / "study"
    write_dicom_series(np.asanyarray(image.dataobj), image.affine, series)
    out = series / "seg"
    assert_clean_exit(infer(run_cli, series, "-o", out, "--model", single_model, "--resume", "--save-prob"), 0)
    (series / "__MACOSX").mkdir()
    (series / "__MACOSX" / "._1.dcm").write_bytes(b"resource fork")
    again = infer(run_cli, series, "-o", out, "--model", single_model, "--resume", "--save-prob")
    assert_clean_exit(again, 0)
    assert "1 of 1 scans were finished by an earlier run" in again.stdout


def test_a_record_names_the_model_the_segmenter_opened(one_job, tmp_path: Path, single_model: Path,
                                                      cascade_model: Path) -> None:
    """A model file deleted, or exported again in place, while a run goes on: records name what the run uses."""
    from heartseg.runtime.session import model_identity

    model = Path(shutil.copy(single_model, tmp_path / "model.onnx"))
    job, options, _ = one_job(records=True)
    opened = model_identity(model)
    segmenter = Segmenter(model, device="cpu", threads=1)
    model.unlink()
    result = run_job(segmenter, job, options)
    assert result.status == "ok", result.error
    assert json.loads(record_path(job).read_text())["model"] == opened
    shutil.copy(cascade_model, model)  # another model at the same path
    assert model_identity(model) != opened
    again = run_job(segmenter, job, replace(options, overwrite=True))
    assert again.status == "ok", again.error
    assert json.loads(record_path(job).read_text())["model"] == opened


# --- merging the shards' reports ---


def test_merge_without_model_checks_that_the_records_agree(tmp_path: Path, single_model: Path,
                                                           cascade_model: Path, run_cli) -> None:
    folder = tmp_path / "scans"
    for i in range(3):
        make_scan(folder / f"case_{i}.nii.gz", shape=SHAPE, seed=i)
    out = tmp_path / "out"
    for k in range(2):
        assert_clean_exit(infer(run_cli, folder, "-o", out, "--model", single_model, "--shard", f"{k}/2"), 0)
    merged = run_cli(app, folder, "-o", out, "--merge-reports", "--json", tmp_path / "m.json")
    assert_clean_exit(merged, 0)
    assert json.loads((tmp_path / "m.json").read_text())["complete"] is True
    # Shard 1 again, with another model: the records no longer agree on one.
    again = infer(run_cli, folder, "-o", out, "--model", cascade_model, "--shard", "1/2", "--overwrite")
    assert_clean_exit(again, 0)
    mixed = run_cli(app, folder, "-o", out, "--merge-reports", "--json", tmp_path / "m2.json")
    assert_clean_exit(mixed, 1)
    assert "2 models" in mixed.stderr and "--model" in mixed.stderr and "--tta" in mixed.stderr
    report = json.loads((tmp_path / "m2.json").read_text())
    assert report["complete"] is False and any("2 models" in p for p in report["problems"])
    named = run_cli(app, folder, "-o", out, "--model", cascade_model, "--merge-reports")
    assert_clean_exit(named, 1)
    assert "another model" in named.stderr


def test_a_record_without_its_source_says_so(tmp_path: Path, single_model: Path, run_cli) -> None:
    scan, _ = make_scan(tmp_path / "in" / "case.nii.gz", shape=SHAPE, seed=2)
    out, report = tmp_path / "out", tmp_path / "r.json"
    assert_clean_exit(infer(run_cli, scan, "-o", out, "--model", single_model, "--resume"), 0)
    path = record_path_of(out, "case")
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "source"}))
    again = infer(run_cli, scan, "-o", out, "--model", single_model, "--json", report)
    assert_clean_exit(again, 0)
    reason = scans_of(report)["case"]["reason"]
    assert "does not name the scan" in reason and "format" not in reason, reason


# --- locks ---


def test_a_file_system_without_locks_leaves_no_lock_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from heartseg.runtime import atomic

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(atomic.fcntl, "flock", no_locks)
    lock = tmp_path / ".case_mask.nii.gz.lock"
    with atomic.exclusive_lock(lock) as mine:
        assert mine  # the block runs unlocked
    assert files_in(tmp_path) == []
    with pytest.raises(ValueError) as raised:
        with atomic.exclusive_lock(lock):
            raise ValueError("in the block")
    assert raised.value.__context__ is None  # the lock's failure is not part of the block's error
    assert files_in(tmp_path) == []


def test_a_lock_file_left_by_a_killed_run_is_reused(tmp_path: Path) -> None:
    from heartseg.runtime.atomic import exclusive_lock

    lock = tmp_path / ".case_mask.nii.gz.lock"
    lock.write_bytes(b"")  # its holder was killed: the file is there, nobody holds it
    with exclusive_lock(lock) as mine:
        assert mine and lock.exists()
        with exclusive_lock(lock) as theirs:
            assert not theirs  # held now, by this block
    assert not lock.exists()


def test_a_scan_left_to_another_run_is_reported_at_the_end(tmp_path: Path, single_model: Path, run_cli) -> None:
    from heartseg.runtime.atomic import exclusive_lock
    from heartseg.runtime.pipeline import lock_path

    scan, _ = make_scan(tmp_path / "in" / "case.nii.gz", shape=SHAPE, seed=2)
    out = tmp_path / "out"
    out.mkdir()
    (job,) = plan_jobs(discover_sources([scan]), out, OutputOptions())
    with exclusive_lock(lock_path(job)) as mine:  # another run is writing it
        assert mine
        result = infer(run_cli, scan, "-o", out, "--model", single_model, "--json", tmp_path / "r.json")
    assert_clean_exit(result, 0)
    assert scans_of(tmp_path / "r.json")["case"]["status"] == "skipped"
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert "1 scan was left to another run" in warnings[0] and "--resume" in warnings[0], warnings[0]
    assert "--merge-reports" in warnings[0]


# --- rollback and write errors ---


def test_rollback_removes_a_file_replaced_just_before_the_stop(one_job, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop (SIGTERM, Ctrl-C) right after a file is renamed into place still removes it."""
    from heartseg.runtime import atomic

    job, options, segmenter = one_job()
    scan = read_scan(job.source)
    prediction = segmenter.segment(scan.volume, keep_prob=True)
    rename = os.replace

    def stopped_after(source, target):
        rename(source, target)
        if Path(target) == job.prob_path:
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", stopped_after)
    with pytest.raises(KeyboardInterrupt):
        write_outputs(job, scan, prediction, options)
    assert files_in(job.mask_path.parent) == []


def test_a_report_that_links_into_the_records_folder_is_refused(tmp_path: Path, single_model: Path,
                                                                run_cli) -> None:
    scan, _ = make_scan(tmp_path / "in" / "case.nii.gz", shape=SHAPE, seed=2)
    out = tmp_path / "out"
    assert_clean_exit(infer(run_cli, scan, "-o", out, "--model", single_model, "--resume"), 0)
    record = record_path_of(out, "case")
    before = record.read_bytes()
    link = tmp_path / "report.json"
    link.symlink_to(record)
    result = infer(run_cli, scan, "-o", out, "--model", single_model, "--resume", "--json", link)
    assert_one_line_error(result, "--json", RECORDS_FOLDER)
    assert record.read_bytes() == before and link.is_symlink()
