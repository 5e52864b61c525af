"""How seconds and peak memory grow with the scan's size, and with the number of scans in a folder.

Scan sizes use synthetic scans at the Task02 voxel size (1.25 x 1.25 x 1.37 mm): 128^3, 256x256x110
(a small MRI) and 320x320x130 (the largest Task02 scans). Peak memory is the process's resident
high-water mark during the benchmark (reset before it, Linux), and its increase over the resident
memory just before; the model is loaded before the window opens.
"""

from __future__ import annotations

from pathlib import Path

import benchlib
import pytest
from heartseg.runtime.bench import PeakMemory, ScanTiming, stage_medians, time_scan
from heartseg.runtime.segmenter import Segmenter

pytestmark = pytest.mark.benchmark_suite

SIZES = [(16, 16, 16), (24, 24, 16), (32, 32, 24)] if benchlib.TINY else [(128, 128, 128), (256, 256, 110),
                                                                           (320, 320, 130)]
FOLDER_SIZES = [1, 2, 3] if benchlib.TINY else [1, 2, 4, 8]


@pytest.fixture(scope="module")
def synthetic_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the synthetic scans of this module are written."""
    return tmp_path_factory.mktemp("scaling-scans")


def _memory_info(memory: PeakMemory) -> dict[str, object]:
    return {"peak_rss_mb": memory.peak_mb, "rss_before_mb": memory.before_mb, "rss_increase_mb": memory.increase_mb,
            "peak_is_windowed": memory.windowed}


@pytest.mark.parametrize("shape", SIZES, ids=benchlib.shape_id)
def test_seconds_and_memory_vs_scan_size(benchmark, bench_model: Path, synthetic_folder: Path, tmp_path: Path,
                                         shape: tuple[int, int, int]) -> None:
    """End-to-end seconds and peak resident memory for one synthetic scan of each size."""
    benchmark.group = "scaling: scan size"
    scan = benchlib.write_synthetic_scan(synthetic_folder / f"synthetic_{benchlib.shape_id(shape)}.nii.gz", shape)
    threads = max(benchlib.thread_counts())
    segmenter = Segmenter(bench_model, device="cpu", threads=threads)
    with PeakMemory() as memory:
        seconds, timings = benchlib.measure(benchmark, lambda: time_scan(segmenter, scan, tmp_path),
                                            benchlib.rounds(3))
    med = benchlib.median(seconds)
    megavoxels = shape[0] * shape[1] * shape[2] / 1e6
    benchmark.extra_info.update({"shape": list(shape), "megavoxels": megavoxels, "threads": threads,
                                 "seconds_per_megavoxel": med / megavoxels, "stages_median_s": stage_medians(timings),
                                 "network_voxels": timings[0].voxels, **_memory_info(memory)})
    benchlib.report("scaling with scan size", f"{benchlib.shape_id(shape)} ({megavoxels:.1f} Mvox) threads={threads}: "
                                              f"{med:.3f} s, peak RSS {memory.peak_mb:.0f} MB "
                                              f"(+{memory.increase_mb or 0:.0f} MB)")


@pytest.mark.parametrize("count", FOLDER_SIZES)
def test_seconds_and_memory_vs_folder_size(benchmark, bench_model: Path, bench_scans: list[Path], tmp_path: Path,
                                           count: int) -> None:
    """Seconds and peak memory for a folder of count scans, segmented one after the other."""
    benchmark.group = "scaling: scans per folder"
    scans = [bench_scans[i % len(bench_scans)] for i in range(count)]
    threads = max(benchlib.thread_counts())
    segmenter = Segmenter(bench_model, device="cpu", threads=threads)
    time_scan(segmenter, scans[0], tmp_path)  # warm-up outside the timed rounds and the memory window
    timings: list[ScanTiming] = []

    def folder() -> None:
        for scan in scans:
            timings.append(time_scan(segmenter, scan, tmp_path))

    with PeakMemory() as memory:
        seconds, _ = benchlib.measure(benchmark, folder, benchlib.rounds(2, 1), warmup=0)
    med = benchlib.median(seconds)
    benchmark.extra_info.update({"scans": count, "threads": threads, "seconds_per_scan": med / count,
                                 "scans_per_minute": 60.0 * count / med, **_memory_info(memory)})
    benchlib.report("scaling with scans per folder", f"{count} scans threads={threads}: {med:.3f} s "
                                                     f"({med / count:.3f} s/scan), peak RSS {memory.peak_mb:.0f} MB")
