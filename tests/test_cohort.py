"""Cohort runs without Ray: stable shards, per-scan records, --resume, --merge-reports, globs and scan lists."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from heartseg.runtime.cli_infer import app
from heartseg.runtime.cohort import expand_inputs, parse_shard, select_shard, shard_of
from heartseg.runtime.errors import InputError
from heartseg.runtime.formats import ScanSource
from heartseg.runtime.pipeline import RECORDS_FOLDER, OutputOptions, ScanJob, output_paths
from onnx_models import make_scan
from test_bad_input import assert_one_line_error
from test_cli_infer import assert_clean_exit

NAMES = [f"case_{i:02d}" for i in range(9)]


def _job(name: str, series: str | None = None) -> ScanJob:
    return output_paths(ScanSource(Path(f"/data/{name}.nii.gz"), "nifti", name, series), Path("/out"), False,
                        OutputOptions())


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    """A folder of nine small synthetic scans."""
    folder = tmp_path / "scans"
    for i, name in enumerate(NAMES):
        make_scan(folder / f"{name}.nii.gz", shape=(24, 28, 20), seed=i)
    return folder


def _records(out: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((out / RECORDS_FOLDER).glob("*.json"))}


def _leftovers(out: Path) -> list[str]:
    """Temporary files of atomic writes that were not renamed."""
    return [str(p) for p in out.rglob("*") if ".tmp" in p.name]


def test_parse_shard() -> None:
    assert (parse_shard("0/1").index, parse_shard("0/1").count) == (0, 1)
    assert str(parse_shard(" 9 / 10 ")) == "9/10"
    for bad in ("3/2", "2/2", "1/0", "-1/2", "1", "a/b", "1/2/3", ""):
        with pytest.raises(InputError):
            parse_shard(bad)


def test_shards_partition_the_scans_stably() -> None:
    """Each scan falls into exactly one shard, by name only: order and the other scans do not matter."""
    jobs = [_job(f"scan_{i}") for i in range(200)]
    shards = [select_shard(jobs, parse_shard(f"{k}/7")) for k in range(7)]
    names = [job.name for shard in shards for job in shard]
    assert sorted(names) == sorted(job.name for job in jobs)  # a partition: each exactly once
    assert all(len(shard) > 10 for shard in shards)  # and a spread, not everything in one shard
    reversed_jobs = list(reversed(jobs))[:50]
    assert all(parse_shard(f"{shard_of(job, 7)}/7").owns(job) for job in reversed_jobs)
    assert [shard_of(j, 7) for j in jobs[:50]] == [shard_of(_job(j.name), 7) for j in jobs[:50]]
    # Two series of one DICOM folder share a name but are two scans.
    assert len({shard_of(_job("study", str(s)), 1000) for s in range(20)}) > 1


def test_bad_shard_and_option_combinations_exit_2(tmp_path: Path, cohort: Path, single_model: Path,
                                                  run_cli) -> None:
    out = tmp_path / "out"
    for args, fragment in [(["--shard", "3/2"], "--shard 3/2"),
                           (["--shard", "x"], "give K/N"),
                           (["--workers", "2"], "--workers"),
                           (["--merge-reports", "--shard", "0/2"], "--merge-reports"),
                           (["--ray", "auto", "--benchmark", "1"], "--benchmark")]:
        result = run_cli(app, cohort, "-o", out, "--model", single_model, *args)
        assert_one_line_error(result, fragment)
    assert not out.exists()


def test_ray_missing_exits_2(tmp_path: Path, cohort: Path, single_model: Path, run_cli,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    result = run_cli(app, cohort, "-o", tmp_path / "out", "--model", single_model, "--ray", "auto")
    assert_one_line_error(result, "pip install ray, or pip install -e '.[ray]'")
    assert not (tmp_path / "out").exists()


def test_unreachable_ray_address_exits_2(tmp_path: Path, cohort: Path, single_model: Path, run_cli) -> None:
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'heartseg[ray]')")
    result = run_cli(app, cohort, "-o", tmp_path / "out", "--model", single_model, "--ray", "127.0.0.1:9")
    assert_one_line_error(result, "--ray 127.0.0.1:9", "cannot reach")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_shards_then_merged_report(tmp_path: Path, cohort: Path, single_model: Path, run_cli) -> None:
    """Three shards write each scan exactly once; the merged report equals a single run's."""
    out, merged = tmp_path / "out", tmp_path / "merged.json"
    merge = ["--merge-reports", "--json", merged, "--csv", tmp_path / "merged.csv"]
    for k in range(3):
        result = run_cli(app, cohort, "-o", out, "--model", single_model, "--threads", 1, "--shard", f"{k}/3",
                         "--json", tmp_path / f"shard{k}.json")
        assert_clean_exit(result, 0)
        if k == 0:
            early = run_cli(app, cohort, "-o", out, "--model", single_model, *merge)
            assert_clean_exit(early, 1)
            assert "have no record" in early.stderr
            assert json.loads(merged.read_text())["complete"] is False
    done = [[s["name"] for s in json.loads((tmp_path / f"shard{k}.json").read_text())["scans"]] for k in range(3)]
    assert sorted(sum(done, [])) == NAMES and all(done)
    records = _records(out)
    assert sorted(records) == [f"{n}_mask.nii.gz.json" for n in NAMES]
    for k, names in enumerate(done):
        assert {records[f"{n}_mask.nii.gz.json"]["shard"] for n in names} == {f"{k}/3"}
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"{n}_mask.nii.gz" for n in NAMES]
    assert not _leftovers(out)

    result = run_cli(app, cohort, "-o", out, "--model", single_model, *merge)
    assert_clean_exit(result, 0)
    report = json.loads(merged.read_text())
    assert report["complete"] is True and report["missing"] == [] and report["exit_code"] == 0
    assert [s["name"] for s in report["scans"]] == NAMES  # the order of a single run
    single = tmp_path / "single.json"
    assert_clean_exit(run_cli(app, cohort, "-o", tmp_path / "one", "--model", single_model, "--threads", 1,
                              "--json", single), 0)
    keys = ("name", "status", "qc", "volume_ml")
    assert [{k: s[k] for k in keys} for s in report["scans"]] == \
           [{k: s[k] for k in keys} for s in json.loads(single.read_text())["scans"]]
    assert len((tmp_path / "merged.csv").read_text().splitlines()) == len(NAMES) + 1

    # A record claiming the wrong shard breaks "exactly once": the merge says so and exits 1.
    victim = out / RECORDS_FOLDER / f"{done[0][0]}_mask.nii.gz.json"
    record = json.loads(victim.read_text())
    victim.write_text(json.dumps(dict(record, shard="1/3")))
    wrong = run_cli(app, cohort, "-o", out, "--model", single_model, "--merge-reports")
    assert_clean_exit(wrong, 1)
    assert f"{done[0][0]}: done by shard 1/3, but shard 0/3 owns it" in wrong.stderr


def test_merge_keeps_failures_and_flags(tmp_path: Path, cohort: Path, single_model: Path, run_cli) -> None:
    """A failed scan of one shard makes the merged exit code that of a single run (2 here)."""
    nib.save(nib.Nifti1Image(np.full((20, 20, 20), 7.0, np.float32), np.eye(4)), str(cohort / "case_05.nii.gz"))
    out = tmp_path / "out"
    codes = [run_cli(app, cohort, "-o", out, "--model", single_model, "--threads", 1, "--shard", f"{k}/2").exit_code
             for k in range(2)]
    assert sorted(codes) == [0, 2]
    merged = run_cli(app, cohort, "-o", out, "--model", single_model, "--merge-reports", "--json", tmp_path / "m.json")
    assert_clean_exit(merged, 2)
    scans = {s["name"]: s for s in json.loads((tmp_path / "m.json").read_text())["scans"]}
    assert scans["case_05"]["status"] == "failed" and "constant" in scans["case_05"]["error"]
    assert sum(s["status"] == "ok" for s in scans.values()) == len(NAMES) - 1


def test_resume_skips_finished_scans_and_redoes_the_rest(tmp_path: Path, cohort: Path, single_model: Path,
                                                         run_cli) -> None:
    out = tmp_path / "out"
    first = run_cli(app, cohort, "-o", out, "--model", single_model, "--threads", 1, "--resume")
    assert_clean_exit(first, 0)
    reference = {p.name: np.asanyarray(nib.load(str(p)).dataobj).copy() for p in out.glob("*.nii.gz")}
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    # An interrupted run: one scan's mask written but not its record, another one not written at all.
    (out / RECORDS_FOLDER / "case_01_mask.nii.gz.json").unlink()
    (out / "case_01_mask.nii.gz").write_bytes(b"a stale partial file")
    (out / RECORDS_FOLDER / "case_02_mask.nii.gz.json").unlink()
    (out / "case_02_mask.nii.gz").unlink()

    without = run_cli(app, cohort, "-o", out, "--model", single_model, "--threads", 1, "--shard", "0/1",
                      "--json", tmp_path / "r.json")
    assert_clean_exit(without, 0)
    assert "case_01: skipped" in without.stdout and "--resume" in without.stdout
    statuses = {s["name"]: s["status"] for s in json.loads((tmp_path / "r.json").read_text())["scans"]}
    assert statuses["case_01"] == "skipped" and statuses["case_02"] == "ok" and statuses["case_00"] == "ok"

    resumed = run_cli(app, cohort, "-o", out, "--model", single_model, "--threads", 1, "--resume",
                      "--json", tmp_path / "r.json")
    assert_clean_exit(resumed, 0)
    assert f"{len(NAMES)} of {len(NAMES)} scans were finished" not in resumed.stdout
    assert "scans were finished by an earlier run" in resumed.stdout
    for name, mask in reference.items():
        np.testing.assert_array_equal(np.asanyarray(nib.load(str(out / name)).dataobj), mask)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    redone = sorted(name for name in after if after[name] != stamps[name])
    assert redone == ["case_01_mask.nii.gz", "case_02_mask.nii.gz"]
    assert sorted(_records(out)) == [f"{n}_mask.nii.gz.json" for n in NAMES]
    assert all(s["status"] == "ok" for s in json.loads((tmp_path / "r.json").read_text())["scans"])
    assert not _leftovers(out)


def test_resume_retries_a_failed_scan(tmp_path: Path, cohort: Path, single_model: Path, run_cli) -> None:
    good = (cohort / "case_03.nii.gz").read_bytes()
    (cohort / "case_03.nii.gz").write_bytes(b"not a scan")
    out = tmp_path / "out"
    assert_clean_exit(run_cli(app, cohort, "-o", out, "--model", single_model, "--threads", 1, "--resume"), 2)
    assert _records(out)["case_03_mask.nii.gz.json"]["status"] == "failed"
    assert not (out / "case_03_mask.nii.gz").exists()
    (cohort / "case_03.nii.gz").write_bytes(good)
    assert_clean_exit(run_cli(app, cohort, "-o", out, "--model", single_model, "--threads", 1, "--resume"), 0)
    assert _records(out)["case_03_mask.nii.gz.json"]["status"] == "ok"


def test_globs_and_scan_lists(tmp_path: Path, cohort: Path, single_model: Path, run_cli) -> None:
    listing = tmp_path / "lists" / "scans.txt"
    listing.parent.mkdir()
    listing.write_text("# three scans\n../scans/case_00.nii.gz\n\n" + f"{cohort / 'case_04.nii.gz'}\n")
    found = expand_inputs([Path(str(cohort / "case_0[12].nii.gz"))], listing)
    assert [p.name for p in found] == ["case_01.nii.gz", "case_02.nii.gz", "case_00.nii.gz", "case_04.nii.gz"]
    with pytest.raises(InputError, match="matches no file"):
        expand_inputs([Path(str(cohort / "nothing_*.nii.gz"))])
    out = tmp_path / "out"
    result = run_cli(app, str(cohort / "case_0[12].nii.gz"), "-o", out, "--model", single_model, "--threads", 1,
                     "--scan-list", listing)
    assert_clean_exit(result, 0)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"case_0{i}_mask.nii.gz" for i in (0, 1, 2, 4)]
    only_list = run_cli(app, "-o", tmp_path / "listed", "--model", single_model, "--threads", 1, "--scan-list", listing)
    assert_clean_exit(only_list, 0)
    assert sorted(p.name for p in (tmp_path / "listed").glob("*.nii.gz")) == ["case_00_mask.nii.gz",
                                                                              "case_04_mask.nii.gz"]
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    assert_one_line_error(run_cli(app, cohort, "-o", out, "--model", single_model, "--scan-list", empty),
                          "lists no scans")
