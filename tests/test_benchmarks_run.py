"""The benchmarks keep working: the suites run in tiny mode, and heartseg-bench reports sane figures.

No timing is asserted here: speed lives in benchmarks/, these tests only check that it can be measured.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from heartseg.runtime.bench import (
    FLOPS_KEY,
    STAGES,
    PeakMemory,
    flops_per_voxel,
    network_flops,
    summarize,
)
from heartseg.runtime.cli_bench import app, parse_threads
from heartseg.runtime.errors import InputError
from heartseg.runtime.image import Volume
from heartseg.runtime.segmenter import Segmenter
from onnx_models import TEST_MODEL_BIAS, build_test_model, make_scan
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
# The single-stage test model's grid (tests/onnx_models.py): a scan on it is not resampled.
MODEL_SPACING = (1.25, 1.25, 1.37)


def _model_with_flops(path: Path, per_voxel: dict[str, float] | None, **kwargs) -> Path:
    """A pointwise test model, with FLOPs-per-voxel metadata when per_voxel is given."""
    onnx = pytest.importorskip("onnx")
    build_test_model(path, bias=TEST_MODEL_BIAS, **kwargs)
    if per_voxel is not None:
        proto = onnx.load(str(path))
        entry = proto.metadata_props.add()
        entry.key, entry.value = FLOPS_KEY, json.dumps(per_voxel)
        onnx.save(proto, str(path))
    return path


def _invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_benchmark_suites_run_in_tiny_mode(tmp_path: Path) -> None:
    """Every suite in benchmarks/ runs (tiny inputs, timing disabled) without errors."""
    pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed (pip install 'heartseg[dev]')")
    env = dict(os.environ, HEARTSEG_BENCH_TINY="1")
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "-m", "benchmark_suite", "-q", "-p", "no:cacheprovider",
           "--benchmark-disable", f"--basetemp={tmp_path / 'basetemp'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    summary = output.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) > 0, summary
    assert not re.search(r"\d+ (failed|error)", summary), summary


def test_heartseg_bench_json(tmp_path: Path) -> None:
    """heartseg-bench on a tiny model and synthetic scans writes a complete JSON report with sane values."""
    model = _model_with_flops(tmp_path / "tiny.onnx", {"single": 2.0})
    scans = tmp_path / "scans"
    make_scan(scans / "a.nii.gz", shape=(24, 28, 20), label_path=tmp_path / "labels" / "a.nii.gz")
    make_scan(scans / "b.nii.gz", shape=(20, 24, 16), seed=1, label_path=tmp_path / "labels" / "b.nii.gz")
    report = tmp_path / "bench.json"
    result = _invoke(scans, "--model", model, "--threads", "1", "--repeat", "2", "--sgemm-size", "64",
                     "--json", report)
    assert result.exit_code == 0, result.output
    assert "heartseg-bench" in result.output and "Traceback" not in result.output
    data = json.loads(report.read_text())
    assert data["tool"] == "heartseg-bench" and data["repeat"] == 2
    assert data["model"]["flops_per_voxel"] == {"single": 2.0} and len(data["model"]["sha256"]) == 64
    assert [Path(s["path"]).name for s in data["scans"]] == ["a.nii.gz", "b.nii.gz"]
    machine = data["machine"]
    for key in ("cpu_model", "logical_cores", "usable_cores", "onnxruntime", "onnxruntime_providers", "date"):
        assert machine[key], key
    assert "CPUExecutionProvider" in machine["onnxruntime_providers"]
    (config,) = data["configs"]
    assert config["threads"] == 1 and config["device"] == "cpu" and config["runs"] == 4
    assert 0 < config["median_s"] <= config["p95_s"] <= config["max_s"]
    assert config["scans_per_minute"] > 0
    assert config["peak_rss_mb"] > 0 and config["peak_rss_mb"] >= config["baseline_rss_mb"]
    assert set(config["stages_median_s"]) == set(STAGES)
    assert all(v >= 0 for v in config["stages_median_s"].values())
    assert config["network_gflop_per_scan"] > 0 and config["achieved_gflops"] > 0
    assert config["sgemm_gflops"] > 0 and config["fraction_of_sgemm"] > 0
    runs = config["raw"]["runs"]
    assert len(runs) == 4 and all(r["total"] > 0 and r["voxels"]["single"] > 0 for r in runs)
    # The FLOPs per scan are the metadata's FLOPs per voxel times the voxels counted.
    voxels = np.mean([r["voxels"]["single"] for r in runs])
    assert config["network_gflop_per_scan"] == pytest.approx(2.0 * voxels / 1e9)


def test_heartseg_bench_without_flops_metadata(tmp_path: Path) -> None:
    """A model without FLOPs metadata is still benchmarked; FLOP figures are null, not invented."""
    model = _model_with_flops(tmp_path / "plain.onnx", None)
    scan, _ = make_scan(tmp_path / "scans" / "a.nii.gz", shape=(16, 16, 16))
    report = tmp_path / "bench.json"
    result = _invoke(scan, "--model", model, "--threads", "1", "--repeat", "1", "--sgemm-size", "0", "--json", report)
    assert result.exit_code == 0, result.output
    (config,) = json.loads(report.read_text())["configs"]
    assert config["median_s"] > 0 and config["peak_rss_mb"] > 0
    assert config["network_gflop_per_scan"] is None and config["achieved_gflops"] is None
    assert config["sgemm_gflops"] is None and config["fraction_of_sgemm"] is None


def test_heartseg_bench_missing_model_exits_2(tmp_path: Path) -> None:
    scan, _ = make_scan(tmp_path / "a.nii.gz", shape=(16, 16, 16))
    result = _invoke(scan, "--model", tmp_path / "missing.onnx")
    assert result.exit_code == 2
    assert "error:" in result.output and "missing.onnx" in result.output and "Traceback" not in result.output


def test_heartseg_bench_no_scans_exits_2(tmp_path: Path) -> None:
    model = _model_with_flops(tmp_path / "tiny.onnx", None)
    (tmp_path / "empty").mkdir()
    result = _invoke(tmp_path / "empty", "--model", model)
    assert result.exit_code == 2
    assert "no scans found" in result.output and "Traceback" not in result.output


def test_heartseg_bench_bad_scan_exits_2(tmp_path: Path) -> None:
    """A scan the worker cannot read is reported as a one-line error with exit code 2."""
    model = _model_with_flops(tmp_path / "tiny.onnx", None)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti file")
    result = _invoke(bad, "--model", model, "--threads", "1", "--repeat", "1", "--sgemm-size", "0")
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and "bad.nii.gz" in result.output and "Traceback" not in result.output


def test_parse_threads() -> None:
    assert parse_threads("1,2") == [1, 2]
    assert parse_threads(" 4, 1,4 ") == [4, 1]
    assert parse_threads(None)[0] == 1
    with pytest.raises(InputError):
        parse_threads("0")
    with pytest.raises(InputError):
        parse_threads("one")


def test_prediction_counts_the_voxels_the_network_saw(tmp_path: Path) -> None:
    """On the model's own grid, the network sees the volume padded to the stage's divisor (8), and at least
    to the stage's training patch."""
    model = _model_with_flops(tmp_path / "tiny.onnx", {"single": 3.0})
    segmenter = Segmenter(model, device="cpu", threads=1)
    patch = segmenter.contract.final_stage.patch_size
    volume = Volume(np.random.default_rng(0).standard_normal((24, 28, 20)).astype(np.float32),
                    np.diag([*MODEL_SPACING, 1.0]))
    prediction = segmenter.segment(volume)
    seen = int(np.prod([max(n, p) for n, p in zip((24, 32, 24), patch)]))
    assert prediction.network_voxels == {"single": seen} and prediction.network_calls == 1
    assert network_flops(prediction.network_voxels, flops_per_voxel(segmenter.session.metadata)) == 3.0 * seen
    # Counts belong to one call: a second segmentation does not add to the first one's.
    assert segmenter.segment(volume).network_voxels == prediction.network_voxels


def test_prediction_counts_every_stage_of_a_cascade(tmp_path: Path) -> None:
    model = _model_with_flops(tmp_path / "cascade.onnx", {"coarse": 1.0, "fine": 10.0}, cascade=True)
    segmenter = Segmenter(model, device="cpu", threads=1)
    scan, _ = make_scan(tmp_path / "a.nii.gz", shape=(40, 48, 36))
    from heartseg.runtime.formats.nifti import load_volume

    voxels = segmenter.segment(load_volume(scan)).network_voxels
    assert set(voxels) == {"coarse", "fine"}
    assert network_flops(voxels, {"coarse": 1.0, "fine": 10.0}) == voxels["coarse"] + 10.0 * voxels["fine"]
    assert network_flops(voxels, {"coarse": 1.0}) is None


def test_flops_helpers() -> None:
    assert flops_per_voxel({FLOPS_KEY: '{"fine": 1.5}'}) == {"fine": 1.5}
    assert flops_per_voxel({}) is None and flops_per_voxel({FLOPS_KEY: "not json"}) is None
    assert network_flops({"fine": 10}, {"fine": 2.0}) == 20.0
    assert network_flops({"fine": 10}, None) is None
    stats = summarize([1.0, 2.0, 3.0])
    assert stats["median"] == 2.0 and stats["n"] == 3 and summarize([])["median"] is None


def test_peak_memory_window() -> None:
    # 64 MB: above glibc's largest mmap threshold (32 MB), so the block is fresh pages whatever earlier tests left
    # free on the heap (a smaller one may reuse resident memory and not raise the peak by its size).
    with PeakMemory() as memory:
        block = np.ones(64 * 1024 * 1024 // 8)  # touched
        del block
    assert memory.peak_mb is not None and memory.peak_mb > 0
    if memory.windowed:
        assert memory.increase_mb is not None and memory.increase_mb >= 40


def test_bench_modules_import_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None; "
            "import heartseg.runtime.bench, heartseg.runtime.cli_bench; "
            "bad = sorted(m for m, v in sys.modules.items() if v is not None and m.split('.')[0] == 'torch'); "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
