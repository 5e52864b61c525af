"""Helpers shared by the benchmark suites: the mode (real or tiny), inputs, models, timing, the summary.

Environment:

* HEARTSEG_BENCH_TINY=1: tiny synthetic scans, a tiny pointwise model and tiny network inputs, so the
  whole suite runs in seconds (a smoke run that keeps the benchmarks working, not a measurement).
* HEARTSEG_BENCH_MODEL: the heartseg ONNX model to benchmark (default: the shipped model).
* HEARTSEG_DATA: the Task02_Heart folder (default: ../shared/data/Task02_Heart next to the repository).
* HEARTSEG_BENCH_THREADS: CPU thread counts to compare, e.g. "1,2" (default 1,2).
* HEARTSEG_BENCH_ROUNDS: timed rounds of each benchmark (default: per benchmark, 3 to 5).
* HEARTSEG_BENCH_SCANS: how many Task02 scans the folder benchmarks use (default 8).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

TINY = os.environ.get("HEARTSEG_BENCH_TINY", "").strip() == "1"
REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = REPO_ROOT / "tests"
# Voxel size of the Task02_Heart scans (mm); the synthetic scans use it too.
TASK02_SPACING = (1.25, 1.25, 1.37)
# FLOPs per voxel of the tiny pointwise model: one multiply and one add (the sigmoid is not counted).
TINY_MODEL_FLOPS_PER_VOXEL = 2.0

# Lines for the summary printed at the end of the run (section, text), filled in by the benchmarks.
REPORT: list[tuple[str, str]] = []
# Measured medians other benchmarks compare against, e.g. ("onnxruntime-cpu", "64x64x64", 1) -> seconds.
MEDIANS: dict[tuple[Any, ...], float] = {}


def env_int(name: str, default: int) -> int:
    """An integer from the environment, or default."""
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def thread_counts() -> list[int]:
    """CPU thread counts to compare ($HEARTSEG_BENCH_THREADS, default 1,2)."""
    text = os.environ.get("HEARTSEG_BENCH_THREADS", "").strip() or "1,2"
    return [int(part) for part in text.split(",") if part.strip()]


def rounds(real: int, tiny: int = 2) -> int:
    """Timed rounds of a benchmark: $HEARTSEG_BENCH_ROUNDS, else real (tiny in tiny mode)."""
    return env_int("HEARTSEG_BENCH_ROUNDS", tiny if TINY else real)


def shape_id(shape: tuple[int, ...]) -> str:
    """(64, 64, 64) -> '64x64x64'."""
    return "x".join(str(int(s)) for s in shape)


def data_dir() -> Path | None:
    """Task02_Heart from $HEARTSEG_DATA, else ../shared/data/Task02_Heart; None when absent."""
    env = os.environ.get("HEARTSEG_DATA")
    candidate = Path(env) if env else REPO_ROOT.parent / "shared" / "data" / "Task02_Heart"
    return candidate if (candidate / "imagesTr").is_dir() else None


def data_dir_hint() -> str:
    """Where the dataset was looked for."""
    return os.environ.get("HEARTSEG_DATA") or str(REPO_ROOT.parent / "shared" / "data" / "Task02_Heart")


def write_synthetic_scan(path: Path, shape: tuple[int, int, int], seed: int = 0,
                         spacing: tuple[float, float, float] = TASK02_SPACING) -> Path:
    """A float32 NIfTI of the given shape: a bright off-centre ellipsoid on a noisy background."""
    path = Path(path)
    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    axes = [((np.arange(n, dtype=np.float32) + 0.5) / n - c) / r
            for n, c, r in zip(shape, (0.45, 0.55, 0.5), (0.18, 0.16, 0.2))]
    r2 = axes[0][:, None, None] ** 2 + axes[1][None, :, None] ** 2 + axes[2][None, None, :] ** 2
    image = rng.standard_normal(shape, dtype=np.float32)
    image *= 10.0
    image += 100.0
    image += 300.0 * (r2 <= 1.0)
    affine = np.diag([*spacing, 1.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), str(path))
    return path


def build_tiny_model(path: Path) -> Path:
    """The tests' pointwise heartseg model (tests/onnx_models.py), with FLOPs-per-voxel metadata added."""
    import json

    import onnx

    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    from onnx_models import TEST_MODEL_BIAS, build_test_model

    build_test_model(path, bias=TEST_MODEL_BIAS)
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "heartseg.flops_per_voxel", json.dumps({"single": TINY_MODEL_FLOPS_PER_VOXEL})
    onnx.save(proto, str(path))
    return Path(path)


_NETWORKS: dict[Path, Path] = {}
_OPEN = contextlib.ExitStack()  # the temporary networks files live until the process ends
atexit.register(_OPEN.close)


def networks_file(model: Path) -> Path:
    """The stages' networks of a model file, side by side (what the Python reference and per-stage timings run):
    export.pipeline_file.networks_file, taken out once per process."""
    from heartseg.export.pipeline_file import networks_file as open_networks

    if model not in _NETWORKS:
        _NETWORKS[model] = _OPEN.enter_context(open_networks(model))
    return _NETWORKS[model]


def network_input(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A reproducible (1, 1, X, Y, Z) float32 input with the statistics of a z-scored scan."""
    return np.random.default_rng(seed).standard_normal((1, 1) + tuple(shape), dtype=np.float32)


def ort_session(path: Path, threads: int | None, providers: list[str] | None = None) -> Any:
    """An ONNX Runtime session with full graph optimisation and threads intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def measure(benchmark: Any, fn: Callable[[], Any], rounds: int, warmup: int = 1) -> tuple[list[float], list[Any]]:
    """Run fn under pytest-benchmark (warm-up calls, then rounds timed calls, one call per round).

    Returns the seconds and results of the timed calls, as measured here around each call (so they
    exist with --benchmark-disable too, where fn runs once and untimed by pytest-benchmark).
    """
    seconds: list[float] = []
    results: list[Any] = []

    def call() -> Any:
        start = time.perf_counter()
        result = fn()
        seconds.append(time.perf_counter() - start)
        results.append(result)
        return result

    benchmark.pedantic(call, rounds=max(1, rounds), warmup_rounds=warmup, iterations=1)
    if len(seconds) > warmup:
        return seconds[warmup:], results[warmup:]
    return seconds, results


def median(values: list[float]) -> float:
    """The median of measured values."""
    return float(np.median(np.asarray(values, float)))


def report(section: str, text: str) -> None:
    """Add a line to the summary printed at the end of the run."""
    REPORT.append((section, text))
