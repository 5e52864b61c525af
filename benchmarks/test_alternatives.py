"""Design alternatives: one full-resolution pass of the final network over the scan (what the cascade replaced), and
the largest component labelled over the whole scan (what labelling inside the foreground's box replaced)."""

from __future__ import annotations

from pathlib import Path

import benchlib
import numpy as np
import pytest
from scipy import ndimage
from heartseg.runtime.bench import PeakMemory
from heartseg.runtime.formats.nifti import load_volume
from heartseg.runtime.inference import infer_canonical
from heartseg.runtime.postprocess import binarize, largest_component
from heartseg.runtime.preprocess import stage_grid, to_canonical
from heartseg.runtime.session import OnnxSession
from heartseg.runtime.sliding_window import predict_whole

pytestmark = pytest.mark.benchmark_suite


@pytest.mark.parametrize("design", ["cascade", "single full-resolution pass"])
def test_cascade_vs_single_pass(benchmark, bench_model: Path, bench_scans: list[Path], design: str) -> None:
    """Network and preprocessing seconds and peak memory of the model's own path vs its final network on the whole grid."""
    benchmark.group = "design: cascade vs one full-resolution pass"
    threads = max(benchlib.thread_counts())
    session = OnnxSession(benchlib.networks_file(bench_model), device="cpu", threads=threads)
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


def _largest_on_the_whole_grid(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return mask.astype(np.uint8)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return (labels == sizes.argmax()).astype(np.uint8)


@pytest.mark.parametrize("design", ["inside the foreground's box", "whole grid"])
def test_largest_component_box_vs_whole_grid(benchmark, bench_model: Path, bench_scans: list[Path], design: str) -> None:
    """Seconds to keep the largest component of the model's own thresholded mask on a scan's grid."""
    benchmark.group = "postprocess: largest component"
    session = OnnxSession(benchlib.networks_file(bench_model), device="cpu", threads=max(benchlib.thread_counts()))
    contract = session.contract
    canonical = to_canonical(load_volume(bench_scans[0]), contract.orientation)
    mask = binarize(infer_canonical(canonical, contract, session.predict).prob, contract.final_stage.threshold)
    keep = largest_component if design == "inside the foreground's box" else _largest_on_the_whole_grid
    np.testing.assert_array_equal(largest_component(mask), _largest_on_the_whole_grid(mask))
    seconds, _ = benchlib.measure(benchmark, lambda: keep(mask), benchlib.rounds(10))
    med = benchlib.median(seconds)
    benchmark.extra_info.update({"design": design, "scan": bench_scans[0].name, "shape": list(mask.shape),
                                 "median_s": med})
    benchlib.report("design alternatives (median s, one scan)",
                    f"largest component {design}, {bench_scans[0].name} {mask.shape}: {med * 1000:.1f} ms")
