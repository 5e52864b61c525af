"""The design alternative the cascade replaced: one full-resolution pass of the final network over the scan."""

from __future__ import annotations

from pathlib import Path

import benchlib
import pytest
from heartseg.runtime.bench import PeakMemory
from heartseg.runtime.image import load_volume
from heartseg.runtime.inference import infer_canonical
from heartseg.runtime.preprocess import stage_grid, to_canonical
from heartseg.runtime.session import OnnxSession
from heartseg.runtime.sliding_window import predict_whole

pytestmark = pytest.mark.benchmark_suite


@pytest.mark.parametrize("design", ["cascade", "single full-resolution pass"])
def test_cascade_vs_single_pass(benchmark, bench_model: Path, bench_scans: list[Path], design: str) -> None:
    """Network and preprocessing seconds and peak memory of the model's own path vs its final network on the whole grid."""
    benchmark.group = "design: cascade vs one full-resolution pass"
    threads = max(benchlib.thread_counts())
    session = OnnxSession(bench_model, device="cpu", threads=threads)
    contract = session.contract
    final = contract.final_stage
    canonical = to_canonical(load_volume(bench_scans[0]), contract.orientation)

    def cascade() -> None:
        infer_canonical(canonical, contract, session.predict)

    def single_pass() -> None:
        grid = stage_grid(canonical.data, canonical.spacing, final.spacing, contract.normalization)
        predict_whole(grid, lambda batch: session.predict(final.name, batch), final.divisor)

    with PeakMemory() as memory:
        seconds, _ = benchlib.measure(benchmark, cascade if design == "cascade" else single_pass, benchlib.rounds(2))
    med = benchlib.median(seconds)
    benchmark.extra_info.update({"design": design, "scan": bench_scans[0].name, "threads": threads,
                                 "median_s": med, "peak_rss_mb": memory.peak_mb,
                                 "peak_rss_increase_mb": memory.increase_mb})
    benchlib.report("design alternatives (median s, one scan)",
                    f"{design}, {bench_scans[0].name} threads={threads}: {med:.3f} s, "
                    f"peak RSS {memory.peak_mb:.0f} MB (+{memory.increase_mb:.0f} MB)")
