"""Memory is bounded: every scan's needs are estimated from its header and refused (exit 2, one line)
before any voxel is read; --memory-limit-mb bounds the whole process. Peak RSS is measured in a
subprocess with resource.getrusage."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "heartseg-la.onnx"


def header_only(path: Path, shape, zooms, dtype=np.float32) -> Path:
    """A NIfTI file whose header claims shape but holds no voxel data (a few hundred bytes)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_zooms(zooms)
    header.set_qform(np.diag([*zooms, 1.0]), code=1)
    header.set_sform(np.diag([*zooms, 1.0]), code=1)
    path.write_bytes(header.binaryblock + b"\0" * 4)
    return path


def gzip_of_zeros(path: Path, shape, zooms) -> Path:
    """A small .nii.gz whose header and zero voxels inflate to prod(shape) bytes (uint8)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(shape)
    header.set_zooms(zooms)
    header.set_sform(np.diag([*zooms, 1.0]), code=1)
    header["vox_offset"] = 352
    chunk = bytes(1 << 24)
    remaining = int(np.prod(shape))
    with gzip.open(path, "wb", compresslevel=1) as handle:
        handle.write(header.binaryblock + b"\0" * 4)
        while remaining:
            n = min(remaining, len(chunk))
            handle.write(chunk[:n])
            remaining -= n
    return path


def run_measured(tool: str, *args, timeout: float = 120) -> tuple[int, str, float]:
    """Run a heartseg tool in a fresh interpreter: (exit code, stderr, peak RSS in MB of that process)."""
    code = textwrap.dedent(f"""
        import json, resource, subprocess, sys
        done = subprocess.run([sys.executable, "-m", {tool!r}, *json.loads(sys.argv[1])], capture_output=True,
                              text=True)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(json.dumps({{"rc": done.returncode, "stderr": done.stderr, "peak": peak}}))
    """)
    done = subprocess.run([sys.executable, "-c", code, json.dumps([str(a) for a in args])], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "400"})
    result = json.loads(done.stdout)
    return result["rc"], result["stderr"], result["peak"]


def assert_refused(rc: int, stderr: str, *fragments: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert rc == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# The interpreter with numpy, scipy, nibabel and ONNX Runtime loaded uses about 130 MB; a refusal from the
# header must not read the voxels, so it stays far below what any of these scans would need.
REFUSAL_PEAK_MB = 300

HEADER_CASES = {
    "1000^3 at 1 mm": ((1000, 1000, 1000), (1.0, 1.0, 1.0), "field of view"),
    "5000^3 at 0.2 mm": ((5000, 5000, 5000), (0.2, 0.2, 0.2), "field of view"),
    "100 mm spacing": ((64, 64, 64), (100.0, 100.0, 100.0), "voxel spacing"),
    "0.01 mm spacing": ((320, 320, 130), (0.01, 0.01, 0.01), "voxel spacing"),
    "700^3 at 0.5 mm": ((700, 700, 700), (0.5, 0.5, 0.5), "memory budget"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_infer_refuses_from_the_header(tmp_path: Path, case: str) -> None:
    shape, zooms, reason = HEADER_CASES[case]
    scan = header_only(tmp_path / "scan.nii", shape, zooms)
    rc, stderr, peak = run_measured("heartseg.runtime.cli_infer", scan, "-o", tmp_path / "out", "--model", SHIPPED,
                                    "--memory-limit-mb", 4000)
    assert_refused(rc, stderr, str(scan), reason)
    assert peak < REFUSAL_PEAK_MB, f"{case}: peak RSS {peak:.0f} MB"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_eval_refuses_a_5000_cubed_header(tmp_path: Path) -> None:
    pred = header_only(tmp_path / "pred.nii", (5000, 5000, 5000), (0.1, 0.1, 0.1), np.uint8)
    gt = header_only(tmp_path / "gt.nii", (5000, 5000, 5000), (0.1, 0.1, 0.1), np.uint8)
    rc, stderr, peak = run_measured("heartseg.runtime.cli_eval", pred, gt)
    assert_refused(rc, stderr, "memory budget")
    assert peak < REFUSAL_PEAK_MB


def test_gzip_of_zeros_is_refused_before_it_inflates(tmp_path: Path) -> None:
    scan = gzip_of_zeros(tmp_path / "zeros.nii.gz", (800, 800, 500), (0.5, 0.5, 0.8))  # 320 MB of uint8 zeros
    assert scan.stat().st_size < 3_000_000
    rc, stderr, peak = run_measured("heartseg.runtime.cli_infer", scan, "-o", tmp_path / "out", "--model", SHIPPED,
                                    "--memory-limit-mb", 1000)
    assert_refused(rc, stderr, "memory budget of 1000 MB")
    assert peak < REFUSAL_PEAK_MB, f"peak RSS {peak:.0f} MB"


def test_memory_limit_bounds_the_whole_process(tmp_path: Path) -> None:
    """A scan of Task02's size segmented within --memory-limit-mb 640, measured (whole-volume inference of this
    scan would need several GB). The limit leaves room for the interpreter and libraries, whose resident size
    differs between installs by tens of MB."""
    rng = np.random.default_rng(0)
    shape = (256, 256, 110)
    image = (rng.random(shape) * 60).astype(np.uint8)
    image[100:150, 110:160, 40:80] += 120
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(image, np.diag([1.25, 1.25, 1.37, 1.0])), str(scan))
    limit = 640
    rc, stderr, peak = run_measured("heartseg.runtime.cli_infer", scan, "-o", tmp_path / "out", "--model", SHIPPED,
                                    "--memory-limit-mb", limit, "--threads", 2, timeout=300)
    assert rc in (0, 3), stderr
    assert (tmp_path / "out" / "scan_mask.nii.gz").is_file()
    assert peak <= limit, f"peak RSS {peak:.0f} MB over the {limit} MB limit"
    print(f"peak RSS {peak:.0f} MB within --memory-limit-mb {limit}")


def test_tta_counts_its_copies_in_the_plan() -> None:
    """--tta holds a mirrored copy of the scan and a running sum of probabilities beside the network: the plan
    leaves that much less room for it, and refuses a scan that fits only without them."""
    from heartseg.runtime.contract import ModelContract, StageContract
    from heartseg.runtime.errors import InputError
    from heartseg.runtime.image import ScanGeometry
    from heartseg.runtime.memory import TTA_HELD_BYTES, plan_memory

    contract = ModelContract(stages=(StageContract("seg", (1.25, 1.25, 1.37), (64, 64, 64), threshold=0.5),))
    geometry = ScanGeometry((320, 320, 130), np.diag([1.25, 1.25, 1.37, 1.0]))
    extra = geometry.voxels * TTA_HELD_BYTES
    unbounded = plan_memory(geometry, contract, None), plan_memory(geometry, contract, None, tta=True)
    assert unbounded[1].total_bytes - unbounded[0].total_bytes == extra
    budget = 4_000_000_000
    plain, tta = plan_memory(geometry, contract, budget), plan_memory(geometry, contract, budget, tta=True)
    bpv = contract.bytes_per_voxel
    assert abs((plain.max_network_voxels - tta.max_network_voxels) - extra / bpv) <= 1
    # A budget whose room beside the network holds one patch without the copies, not with them.
    tile = 64 ** 3 * bpv
    tight = budget - plain.max_network_voxels * bpv + tile + extra // 2
    assert plan_memory(geometry, contract, tight).max_network_voxels >= 64 ** 3
    with pytest.raises(InputError, match="memory budget"):
        plan_memory(geometry, contract, tight, tta=True)


def test_segmenter_plans_with_its_tta(single_model: Path) -> None:
    from heartseg.runtime.image import ScanGeometry
    from heartseg.runtime.memory import TTA_HELD_BYTES
    from heartseg.runtime.segmenter import Segmenter

    geometry = ScanGeometry((320, 320, 130), np.diag([1.25, 1.25, 1.37, 1.0]))
    plain = Segmenter(single_model, device="cpu", threads=1, memory_limit_mb=4000)
    tta = Segmenter(single_model, device="cpu", threads=1, memory_limit_mb=4000, tta=True)
    gap = plain.plan(geometry).max_network_voxels - tta.plan(geometry).max_network_voxels
    expected = geometry.voxels * TTA_HELD_BYTES / plain.contract.bytes_per_voxel
    assert 0.9 * expected < gap < 1.1 * expected  # the process's resident memory moves a little between plans
