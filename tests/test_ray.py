"""Ray runs on real Task02 scans with the shipped model, on a local two-CPU cluster started by the tests.

The masks must equal the sequential run's voxel for voxel (both use one ONNX Runtime thread per
session); a worker killed mid-scan must leave every scan done exactly once; a driver stopped
mid-run must resume without redoing what was finished.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from heartseg.runtime.cli_infer import app
from heartseg.runtime.formats import discover_sources
from heartseg.runtime.pipeline import RECORDS_FOLDER, OutputOptions, plan_jobs, run_jobs
from heartseg.runtime.segmenter import Segmenter
from test_cli_infer import assert_clean_exit

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'heartseg[ray]')")

pytestmark = [pytest.mark.data, pytest.mark.slow]

# The smallest Task02 scans, to keep the runs short on two cores.
SCANS = ["la_016", "la_009", "la_019", "la_020"]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster: 2 CPUs, a small object store, no dashboard; shut down after the module."""
    ray.init(num_cpus=2, object_store_memory=200 * 1024 * 1024, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def scans(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of links to four real scans."""
    folder = tmp_path_factory.mktemp("ray-scans")
    for name in SCANS:
        (folder / f"{name}.nii.gz").symlink_to(data_dir / "imagesTr" / f"{name}.nii.gz")
    return folder


@pytest.fixture(scope="module")
def sequential(scans: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """The masks of a plain sequential run (one thread), by file name."""
    out = tmp_path_factory.mktemp("sequential")
    jobs = plan_jobs(discover_sources([scans]), out, OutputOptions())
    results = run_jobs(Segmenter(device="cpu", threads=1), jobs, OutputOptions())
    assert all(r.status in ("ok", "flagged") for r in results), [r.error for r in results]
    SEQUENTIAL_STATUS.update({r.job.name: r.status for r in results})
    return _masks(out)


# Each scan's status in the sequential run (ok, or flagged by QC): a distributed run must match it.
SEQUENTIAL_STATUS: dict[str, str] = {}


def _expected_exit() -> int:
    return 3 if "flagged" in SEQUENTIAL_STATUS.values() else 0


def _masks(out: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asanyarray(nib.load(str(p)).dataobj).copy() for p in sorted(out.glob("*_mask.nii.gz"))}


def _records(out: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((out / RECORDS_FOLDER).glob("*.json"))}


def _assert_each_scan_once(out: Path, sequential: dict[str, np.ndarray]) -> dict[str, dict]:
    """One mask and one record per scan, equal to the sequential run's, and no temporary file left."""
    masks = _masks(out)
    assert sorted(masks) == sorted(sequential)
    for name, mask in sequential.items():
        np.testing.assert_array_equal(masks[name], mask, err_msg=name)
    records = _records(out)
    assert sorted(records) == [f"{name}.json" for name in sorted(sequential)]
    assert {r["name"]: r["status"] for r in records.values()} == SEQUENTIAL_STATUS, records
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    return records


def test_ray_run_equals_the_sequential_run(cluster, scans: Path, sequential: dict[str, np.ndarray], tmp_path: Path,
                                           run_cli) -> None:
    """heartseg-infer --ray auto (the running cluster): same masks, same report, same exit code."""
    out, report = tmp_path / "out", tmp_path / "report.json"
    result = run_cli(app, scans, "-o", out, "--ray", "auto", "--json", report)
    assert_clean_exit(result, _expected_exit())
    records = _assert_each_scan_once(out, sequential)
    assert len({r["worker"] for r in records.values()}) == 2  # both workers took scans
    data = json.loads(report.read_text())
    assert data["exit_code"] == _expected_exit() and data["device"] == "ray (auto)"
    assert [s["name"] for s in data["scans"]] == sorted(SCANS)
    assert {s["name"]: s["status"] for s in data["scans"]} == SEQUENTIAL_STATUS
    assert all(s["volume_ml"] > 10 for s in data["scans"])
    assert ray.is_initialized()  # a cluster the caller started is left running


def test_killed_worker_is_retried_without_duplicate_or_partial_output(cluster, scans: Path,
                                                                      sequential: dict[str, np.ndarray],
                                                                      tmp_path: Path) -> None:
    """SIGKILL a worker while it segments a scan: Ray restarts it, the scan is retried, each scan ends once."""
    from heartseg.runtime.distributed import RayConfig, run

    out = tmp_path / "out"
    killed: list[int] = []

    def kill_first_worker(result) -> None:
        if not killed:
            # The pool has already handed this worker its next scan: the kill lands mid-scan.
            pid = int(json.loads((out / RECORDS_FOLDER / f"{result.job.mask_path.name}.json").read_text())
                      ["worker"].rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    results = run([scans], out, config=RayConfig(workers=2, threads=1), on_done=kill_first_worker)
    assert killed
    assert {r.job.name: r.status for r in results} == SEQUENTIAL_STATUS, [r.error for r in results]
    records = _assert_each_scan_once(out, sequential)
    pids = {int(r["worker"].rsplit(":", 1)[1]) for r in records.values()}
    # The killed worker, the other one, and the restarted one all finished scans.
    assert killed[0] in pids and len(pids) >= 3, pids


def test_resume_after_the_driver_is_killed(cluster, scans: Path, sequential: dict[str, np.ndarray],
                                           tmp_path: Path) -> None:
    """Kill the driver mid-run; --resume finishes the rest and leaves the finished scans untouched."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "heartseg.runtime.cli_infer", str(scans), "-o", str(out), "--ray", "auto",
               "--workers", "1", "--resume"]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while len(list((out / RECORDS_FOLDER).glob("*.json"))) < 2 and driver.poll() is None:
        assert time.monotonic() < deadline, "the first scans never finished"
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    before = _records(out)
    assert 2 <= len(before) < len(SCANS), f"the driver finished before it was stopped: {driver.stdout.read()}"
    stamps = {name: (out / name[:-len('.json')]).stat().st_mtime_ns for name in before}

    resumed = subprocess.run(command + ["--json", str(tmp_path / "report.json")], capture_output=True, text=True,
                             timeout=900)
    assert resumed.returncode == _expected_exit(), resumed.stdout + resumed.stderr
    assert f"{len(before)} of {len(SCANS)} scans were finished by an earlier run" in resumed.stdout
    after = _assert_each_scan_once(out, sequential)
    for name, record in before.items():
        assert after[name] == record, name  # not segmented again
        assert (out / name[:-len('.json')]).stat().st_mtime_ns == stamps[name]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["exit_code"] == _expected_exit()
    assert {s["name"]: s["status"] for s in report["scans"]} == SEQUENTIAL_STATUS
