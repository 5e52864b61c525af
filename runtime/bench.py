"""Measuring heartseg (torch-free): network voxels and FLOPs, stage timings, peak memory, machine speed.

heartseg-bench and the pytest-benchmark suites in benchmarks/ share these functions, so that every
number is counted and timed one way only.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from .formats import ScanSource, discover_sources
from .pipeline import OutputOptions, plan_jobs, process
from .segmenter import Segmenter

FLOPS_KEY = "heartseg.flops_per_voxel"
STAGES = ("read", "preprocess", "network", "postprocess", "write")
# numpy's BLAS (the sgemm reference) reads these when it starts; set them to give a process n threads.
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def flops_per_voxel(metadata: Mapping[str, str]) -> dict[str, float] | None:
    """FLOPs per network voxel of each stage, from a model's metadata; None when the model does not say."""
    text = metadata.get(FLOPS_KEY)
    if not text:
        return None
    try:
        data = json.loads(text)
        return {str(stage): float(value) for stage, value in data.items()}
    except (ValueError, TypeError, AttributeError):
        return None


def network_flops(voxels: Mapping[str, int], per_voxel: Mapping[str, float] | None) -> float | None:
    """Sum over stages of FLOPs per voxel x voxels processed; None when a stage's FLOPs are unknown."""
    if per_voxel is None:
        return None
    total = 0.0
    for stage, count in voxels.items():
        if stage not in per_voxel:
            return None
        total += float(per_voxel[stage]) * int(count)
    return total


@dataclass
class ScanTiming:
    """One end-to-end run on one scan: seconds per stage, and the voxels each network processed."""

    scan: str
    shape: tuple[int, int, int]
    read: float
    preprocess: float
    network: float
    postprocess: float
    write: float
    total: float
    voxels: dict[str, int] = field(default_factory=dict)
    device: str = "cpu"

    def stages(self) -> dict[str, float]:
        """Seconds of read, preprocess, network, postprocess and write."""
        return {name: float(getattr(self, name)) for name in STAGES}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record."""
        record = asdict(self)
        record["shape"] = list(self.shape)
        return record


def time_scan(segmenter: Segmenter, scan: str | os.PathLike | ScanSource, outdir: str | os.PathLike) -> ScanTiming:
    """Read, segment and write one scan (its mask into outdir) through heartseg-infer's pipeline, timing every stage."""
    source = scan if isinstance(scan, ScanSource) else discover_sources([Path(scan)])[0]
    options = OutputOptions(overwrite=True)
    job = plan_jobs([source], Path(outdir), options)[0]
    result = process(segmenter, job, options)
    timings, prediction = result.timings, result.prediction
    assert prediction is not None and result.scan is not None
    return ScanTiming(str(source), result.scan.volume.shape, *(float(timings.get(name, 0.0)) for name in STAGES),
                      float(result.seconds or 0.0), dict(prediction.network_voxels), prediction.device)


def summarize(seconds: Sequence[float]) -> dict[str, float | int | None]:
    """Median, 95th percentile, mean, min and max of a list of durations (None when it is empty)."""
    if not len(seconds):
        return {"n": 0, "median": None, "p95": None, "mean": None, "min": None, "max": None}
    values = np.asarray(seconds, float)
    return {"n": int(values.size), "median": float(np.median(values)), "p95": float(np.percentile(values, 95)),
            "mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}


def stage_medians(runs: Sequence[ScanTiming]) -> dict[str, float | None]:
    """Median seconds of each stage over runs."""
    return {name: summarize([getattr(run, name) for run in runs])["median"] for name in STAGES + ("total",)}


def sgemm_gflops(size: int = 2048, repeats: int = 3) -> float:
    """The machine's measured float32 matmul speed: numpy size x size sgemm, best of repeats, in GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty((size, size), np.float32)
    np.matmul(a, b, out=out)  # warm-up: thread pool start, page faults
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / max(best, 1e-12) / 1e9


def thread_env(threads: int) -> dict[str, str]:
    """A copy of os.environ that limits a new process's BLAS / OpenMP pools to threads."""
    env = dict(os.environ)
    env.update({name: str(int(threads)) for name in THREAD_ENV})
    return env


def sgemm_gflops_with_threads(threads: int, size: int = 2048, repeats: int = 3) -> float:
    """sgemm_gflops measured in a fresh process whose BLAS uses exactly threads threads."""
    code = ("import sys; from heartseg.runtime.bench import sgemm_gflops; "
            f"print(sgemm_gflops({int(size)}, {int(repeats)}))")
    proc = subprocess.run([sys.executable, "-c", code], env=thread_env(threads), capture_output=True, text=True,
                          check=True)
    return float(proc.stdout.strip().splitlines()[-1])


def _status_kb(field_name: str) -> float | None:
    """A memory field (kB) of /proc/self/status, or None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process over its whole life, in MB (resource.getrusage ru_maxrss)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def current_rss_mb() -> float | None:
    """Resident memory of this process now, in MB (None where /proc is missing)."""
    kb = _status_kb("VmRSS")
    return None if kb is None else kb / 1024.0


class PeakMemory:
    """Peak resident memory during a with-block, in MB.

    On Linux the process's high-water mark is reset on entry (writing 5 to /proc/self/clear_refs)
    and read back from VmHWM on exit, so the peak belongs to the block. Where that is not possible,
    peak_mb is the process's lifetime peak and windowed is False.
    """

    def __init__(self) -> None:
        self.windowed = False
        self.before_mb: float | None = None
        self.peak_mb: float | None = None

    def __enter__(self) -> "PeakMemory":
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")
            self.windowed = _status_kb("VmHWM") is not None
        except OSError:
            self.windowed = False
        self.before_mb = current_rss_mb()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        hwm = _status_kb("VmHWM") if self.windowed else None
        self.peak_mb = hwm / 1024.0 if hwm is not None else peak_rss_mb()

    @property
    def increase_mb(self) -> float | None:
        """Peak minus the resident memory on entry (None when either is unknown)."""
        if self.peak_mb is None or self.before_mb is None:
            return None
        return self.peak_mb - self.before_mb


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else platform.processor())."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if re.match(r"(model name|Model|Hardware|cpu model)\s*:", line):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _gpus() -> list[str]:
    """NVIDIA GPU names from nvidia-smi, when it is there."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, memory, GPUs, library versions, providers, date."""
    usable = usable_cores()
    mem_kb = None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    mem_kb = float(line.split()[1])
                    break
    except OSError:
        pass
    try:
        import onnxruntime as ort

        ort_version, providers = ort.__version__, list(ort.get_available_providers())
    except ImportError:
        ort_version, providers = None, []
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gb": None if mem_kb is None else round(mem_kb / 1024.0 / 1024.0, 1),
        "gpus": _gpus(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort_version,
        "onnxruntime_providers": providers,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
