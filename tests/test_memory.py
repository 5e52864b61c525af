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
import tracemalloc
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


# Scans in the other formats declare 700^3 voxels at 0.5 mm: a plausible field of view (350 mm), but far more than
# 4000 MB to segment. Each file holds 300 MB of compressed zeros (about 1.5 MB on disk): far less than it declares,
# and enough that inflating them would show in the peak.
HUGE_SIZES, HUGE_SPACING, HELD_ZEROS = (700, 700, 700), 0.5, 300_000_000


def huge_nrrd(folder: Path, layout: str) -> Path:
    """A gzip NRRD declaring HUGE_SIZES uint8 voxels, its data attached or in a detached file beside it."""
    from scan_formats import compressed_zeros, nrrd_fields, write_nrrd_text

    body = compressed_zeros(HELD_ZEROS)
    fields = nrrd_fields(HUGE_SIZES, HUGE_SPACING, encoding="gzip")
    if layout == "detached":
        (folder / "huge.raw.gz").write_bytes(body)
        return write_nrrd_text(folder / "huge.nhdr", {**fields, "data file": "huge.raw.gz"})
    return write_nrrd_text(folder / "huge.nrrd", fields, body)


def huge_mha(folder: Path, layout: str) -> Path:
    """A compressed MetaImage declaring HUGE_SIZES MET_UCHAR voxels, its data LOCAL or in a detached file."""
    from scan_formats import compressed_zeros, mha_fields, write_mha_text

    body = compressed_zeros(HELD_ZEROS, "zlib")
    fields = mha_fields(HUGE_SIZES, HUGE_SPACING, CompressedData="True", CompressedDataSize=str(len(body)))
    if layout == "detached":
        (folder / "huge.zraw").write_bytes(body)
        return write_mha_text(folder / "huge.mhd", {**fields, "ElementDataFile": "huge.zraw"})
    return write_mha_text(folder / "huge.mha", fields, body)


@pytest.mark.parametrize("layout", ["attached", "detached"])
@pytest.mark.parametrize("fmt", ["nrrd", "mha"])
def test_compressed_nrrd_and_metaimage_are_refused_before_they_inflate(tmp_path: Path, fmt: str, layout: str) -> None:
    pytest.importorskip({"nrrd": "nrrd", "mha": "SimpleITK"}[fmt])
    scan = (huge_nrrd if fmt == "nrrd" else huge_mha)(tmp_path, layout)
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) < 3_000_000
    rc, stderr, peak = run_measured("heartseg.runtime.cli_infer", scan, "-o", tmp_path / "out", "--model", SHIPPED,
                                    "--memory-limit-mb", 4000)
    assert_refused(rc, stderr, str(scan), "memory budget of 4000 MB")
    assert peak < REFUSAL_PEAK_MB, f"{fmt} {layout}: peak RSS {peak:.0f} MB"


def test_gzip_nrrd_inflating_past_its_header_is_refused_before_it_inflates(tmp_path: Path) -> None:
    """The compressed data holds far more than the 10^3 voxels the header declares: inflation stops there."""
    pytest.importorskip("nrrd")
    from heartseg.runtime.errors import InputError
    from heartseg.runtime.formats import discover_sources, read_scan
    from scan_formats import compressed_zeros, nrrd_fields, write_nrrd_text

    scan = write_nrrd_text(tmp_path / "bomb.nrrd", nrrd_fields((10, 10, 10), encoding="gzip"),
                           compressed_zeros(100_000_000))
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="more than the 1000 bytes its header declares") as info:
            read_scan(discover_sources([scan])[0])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(scan) in str(info.value)
    assert peak < 20_000_000, f"traced peak {peak / 1e6:.0f} MB"


def test_nrrd_line_skip_over_a_line_without_end_is_refused_before_it_is_held(tmp_path: Path) -> None:
    """The lines a NRRD header skips in its data file are header lines: 20 MB without a line end is not one."""
    pytest.importorskip("nrrd")
    from heartseg.runtime.errors import InputError
    from heartseg.runtime.formats import discover_sources, read_scan
    from scan_formats import nrrd_fields, write_nrrd_text

    sizes = (500, 400, 100)
    (tmp_path / "s.raw").write_bytes(b"\x01" * int(np.prod(sizes)))
    scan = write_nrrd_text(tmp_path / "s.nhdr", {**nrrd_fields(sizes), "data file": "s.raw", "line skip": "1"})
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match="line skip") as info:
            read_scan(discover_sources([scan])[0])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(scan) in str(info.value)
    assert peak < 8_000_000, f"traced peak {peak / 1e6:.0f} MB"


def _large_slices_zip(folder: Path, path: Path, side: int) -> Path:
    """A zip of a two-slice series whose slices are side x side int16 pixels of zeros (its members streamed)."""
    pydicom = pytest.importorskip("pydicom")
    from scan_formats import dicom_bytes, pixel_data_header, write_dicom_series, zip_with_members

    members = {}
    for file in write_dicom_series(np.zeros((4, 4, 2), np.float32), np.diag([1.0, 1.0, 2.0, 1.0]), folder / "src"):
        ds = pydicom.dcmread(str(file))
        ds.Rows = ds.Columns = side
        del ds.PixelData
        members[file.name] = (dicom_bytes(ds) + pixel_data_header(side * side * 2), side * side * 2)
        file.unlink()
    return zip_with_members(folder / "src", path, members)


def test_dicom_zip_is_listed_and_refused_from_its_headers(tmp_path: Path) -> None:
    """Two 10000 x 10000 slices (400 MB of pixels in a 1 MB zip): the series is listed from the members' headers,
    streamed, and refused from them (a 10 m field of view) before any pixel is read."""
    scan = _large_slices_zip(tmp_path, tmp_path / "large.zip", 10_000)
    assert scan.stat().st_size < 3_000_000
    rc, stderr, peak = run_measured("heartseg.runtime.cli_infer", scan, "-o", tmp_path / "out", "--model", SHIPPED,
                                    "--memory-limit-mb", 4000)
    assert_refused(rc, stderr, str(scan), "field of view")
    assert peak < REFUSAL_PEAK_MB, f"peak RSS {peak:.0f} MB"


def test_dicom_zip_bomb_member_is_refused(tmp_path: Path) -> None:
    """One slice of a small series inflates to 300 MB (trailing padding): refused from its size in the zip."""
    pytest.importorskip("pydicom")
    from scan_formats import dicom_trailing_padding, write_dicom_series, zip_with_members

    image = np.random.default_rng(0).uniform(0, 200, (48, 48, 40)).astype(np.float32)
    files = write_dicom_series(image, np.diag([1.25, 1.25, 1.37, 1.0]), tmp_path / "src")
    bomb = files[7]
    head = bomb.read_bytes() + dicom_trailing_padding(300_000_000)
    bomb.unlink()
    scan = zip_with_members(tmp_path / "src", tmp_path / "bomb.zip", {bomb.name: (head, 300_000_000)})
    assert scan.stat().st_size < 3_000_000
    rc, stderr, peak = run_measured("heartseg.runtime.cli_infer", scan, "-o", tmp_path / "out", "--model", SHIPPED,
                                    "--memory-limit-mb", 4000)
    assert_refused(rc, stderr, str(scan), bomb.name, "zip bomb")
    assert peak < REFUSAL_PEAK_MB, f"peak RSS {peak:.0f} MB"


def _segmenter_whose_network_grows(model: Path, monkeypatch: pytest.MonkeyPatch, growth: float):
    """A Segmenter with a budget of 1.5 times what a small scan needs beside 100 MB in use, whose resident memory
    (faked) grows by growth times that need during each scan; returns it, the scan and the fake memory."""
    from heartseg.runtime import segmenter as segmenter_module
    from heartseg.runtime.image import ScanGeometry, Volume

    rss = {"now": 100 * 2**20}
    monkeypatch.setattr(segmenter_module, "current_rss", lambda: rss["now"])
    volume = Volume(np.random.default_rng(0).random((40, 48, 36), np.float32), np.diag([1.25, 1.25, 1.25, 1.0]))
    probe = segmenter_module.Segmenter(model, device="cpu", threads=1, memory_limit_mb=10_000)
    need = probe.plan(ScanGeometry(volume.shape, volume.affine), loaded=True).total_bytes
    seg = segmenter_module.Segmenter(model, device="cpu", threads=1, memory_limit_mb=(rss["now"] + 1.5 * need) / 2**20)
    real_segment = segmenter_module.OnnxSession.segment

    def segment_that_grows(*args, **kwargs):
        rss["now"] += int(growth * need)
        return real_segment(*args, **kwargs)

    monkeypatch.setattr(segmenter_module.OnnxSession, "segment", segment_that_grows)
    return seg, volume, rss, need


def test_memory_a_scan_left_for_reuse_is_not_counted_again(single_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a folder run, the memory one scan leaves to ONNX Runtime's arena and the allocator is reused by the
    next: the next scan's plan must not count it as in use on top of what it needs itself."""
    seg, volume, rss, need = _segmenter_whose_network_grows(single_model, monkeypatch, 1.0)
    seg.segment(volume)
    assert rss["now"] == 100 * 2**20 + need
    seg.segment(volume)  # refused before: 'needs about ... beside the ... MB in use'


def test_memory_growth_beyond_a_scan_counts_as_in_use(single_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a scan's pipeline may keep for reuse is at most what it was allowed to use: more growth (a caller's
    arrays, a leak) is memory in use, and a scan that does not fit beside it is refused."""
    from heartseg.runtime.errors import InputError

    seg, volume, _, _ = _segmenter_whose_network_grows(single_model, monkeypatch, 10.0)
    seg.segment(volume)
    with pytest.raises(InputError, match="memory budget"):
        seg.segment(volume)


def test_the_localisers_whole_grid_must_fit_its_one_call() -> None:
    """The model's graph runs only the final stage in tiles: a budget with room for a tile of it but not for the
    localiser's whole grid is refused before anything runs."""
    from heartseg.runtime import memory
    from heartseg.runtime.contract import ModelContract, StageContract
    from heartseg.runtime.errors import InputError
    from heartseg.runtime.image import ScanGeometry

    contract = ModelContract(stages=(
        StageContract("coarse", (4.0, 4.0, 4.0), (80, 80, 40), threshold=0.5, role="localiser",
                      input_name="coarse_image", prob_name="coarse_prob", mask_name="coarse_mask"),
        StageContract("fine", (1.25, 1.25, 1.25), (64, 64, 64), threshold=0.5, crop_margin_mm=15.0)))
    geometry = ScanGeometry((400, 400, 300), np.diag([1.0, 1.0, 1.0, 1.0]))
    bpv = contract.bytes_per_voxel
    fine_grid, localiser, tile = 320 * 320 * 240, 104 * 104 * 80, 64 ** 3  # the localiser: 100 x 100 x 75, padded
    beside = geometry.voxels * memory.HELD_BYTES + fine_grid * (memory.NETWORK_STAGE_BYTES + memory.TILED_BYTES)
    budget = beside + (tile + localiser) * bpv // 2  # a tile fits beside the rest, the localiser's grid does not
    with pytest.raises(InputError, match="memory budget"):
        memory.plan_memory(geometry, contract, budget)
    assert memory.plan_memory(geometry, contract, beside + localiser * bpv).max_network_voxels >= localiser
