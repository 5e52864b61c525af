"""heartseg end to end on CPU: read, preprocess, network, postprocess, write; one scan and a folder."""

from __future__ import annotations

from pathlib import Path

import benchlib
import pytest
from heartseg.runtime.bench import ScanTiming, stage_medians, time_scan
from heartseg.runtime.segmenter import Segmenter

pytestmark = pytest.mark.benchmark_suite


@pytest.mark.parametrize("threads", benchlib.thread_counts())
def test_one_scan(benchmark, bench_model: Path, bench_scans: list[Path], tmp_path: Path, threads: int) -> None:
    """Seconds to read, segment and write the first scan (Segmenter.segment + load_volume + save_volume)."""
    benchmark.group = "end-to-end: one scan"
    segmenter = Segmenter(bench_model, device="cpu", threads=threads)
    scan = bench_scans[0]
    seconds, timings = benchlib.measure(benchmark, lambda: time_scan(segmenter, scan, tmp_path), benchlib.rounds(5))
    stages = stage_medians(timings)
    benchmark.extra_info.update({
        "scan": scan.name, "shape": list(timings[0].shape), "threads": threads, "device": segmenter.device,
        "stages_median_s": stages, "network_voxels": timings[0].voxels,
    })
    benchlib.report("end-to-end, one scan (median s)",
                    f"{scan.name} threads={threads}: total {benchlib.median(seconds):.3f}  "
                    + "  ".join(f"{k} {v:.3f}" for k, v in stages.items() if k != "total"))


def test_folder_throughput(benchmark, bench_model: Path, bench_scans: list[Path], tmp_path: Path) -> None:
    """Scans per minute over a folder of scans, one after the other, with the most threads compared."""
    benchmark.group = "end-to-end: folder"
    threads = max(benchlib.thread_counts())
    segmenter = Segmenter(bench_model, device="cpu", threads=threads)
    timings: list[ScanTiming] = []

    def folder() -> None:
        for scan in bench_scans:
            timings.append(time_scan(segmenter, scan, tmp_path))

    time_scan(segmenter, bench_scans[0], tmp_path)  # warm-up outside the timed rounds
    seconds, _ = benchlib.measure(benchmark, folder, benchlib.rounds(3, 1), warmup=0)
    per_minute = 60.0 * len(bench_scans) / benchlib.median(seconds)
    benchmark.extra_info.update({
        "scans": len(bench_scans), "threads": threads, "scans_per_minute": per_minute,
        "stages_median_s": stage_medians(timings),
    })
    benchlib.report("end-to-end, folder", f"{len(bench_scans)} scans, threads={threads}: "
                                          f"{benchlib.median(seconds):.2f} s, {per_minute:.1f} scans/min")
