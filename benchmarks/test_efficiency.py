"""Compute efficiency: counted network FLOPs / measured network seconds, against measured sgemm FLOP/s.

FLOPs are counted, not estimated from time: the model's FLOPs per voxel of each stage (metadata
'heartseg.flops_per_voxel', from train/unet.py count_flops_per_voxel) times the voxels each network
actually processed (counted by Segmenter: Prediction.network_voxels). The machine's reference is
numpy's float32 matmul (sgemm) speed, measured in a fresh process with the same thread count.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import benchlib
import pytest
from heartseg.runtime.bench import (
    flops_per_voxel,
    network_flops,
    sgemm_gflops_with_threads,
)
from heartseg.runtime.formats.nifti import load_volume
from heartseg.runtime.segmenter import Segmenter

pytestmark = pytest.mark.benchmark_suite

THREADS = benchlib.thread_counts()
SGEMM_SIZE = 256 if benchlib.TINY else 2048


@lru_cache(maxsize=None)
def _sgemm(threads: int) -> float:
    return sgemm_gflops_with_threads(threads, SGEMM_SIZE)


def _efficiency(benchmark, section: str, label: str, flops: float, network_seconds: float, threads: int) -> None:
    achieved = flops / network_seconds / 1e9
    sgemm = _sgemm(threads)
    benchmark.extra_info.update({"threads": threads, "network_gflop": flops / 1e9, "network_median_s": network_seconds,
                                 "achieved_gflops": achieved, "sgemm_size": SGEMM_SIZE, "sgemm_gflops": sgemm,
                                 "fraction_of_sgemm": achieved / sgemm})
    benchlib.report(section, f"{label} threads={threads}: {flops / 1e9:.2f} GFLOP in {network_seconds:.4f} s = "
                             f"{achieved:.1f} GFLOP/s; sgemm {sgemm:.1f} GFLOP/s; {100 * achieved / sgemm:.1f}%")


@pytest.mark.parametrize("threads", THREADS)
def test_heartseg_model_efficiency(benchmark, bench_model: Path, bench_scans: list[Path], threads: int) -> None:
    """The heartseg model on one scan: its counted FLOPs over its measured network seconds."""
    benchmark.group = "efficiency: heartseg model, one scan"
    segmenter = Segmenter(bench_model, device="cpu", threads=threads)
    per_voxel = flops_per_voxel(segmenter.session.metadata)
    if per_voxel is None:
        pytest.skip(f"{bench_model.name} has no 'heartseg.flops_per_voxel' metadata (export it with heartseg-export)")
    volume = load_volume(bench_scans[0])

    def segment() -> tuple[float, float | None]:
        prediction = segmenter.segment(volume)
        return prediction.timings["network"], network_flops(prediction.network_voxels, per_voxel)

    _, results = benchlib.measure(benchmark, segment, benchlib.rounds(3))
    flops = results[0][1]
    if flops is None:
        pytest.skip(f"the model's FLOPs metadata {per_voxel} does not cover every stage it ran")
    network = benchlib.median([r[0] for r in results])
    benchmark.extra_info["scan"] = bench_scans[0].name
    _efficiency(benchmark, "efficiency (counted FLOPs / measured seconds vs sgemm)",
                f"heartseg model on {bench_scans[0].name}", flops, network, threads)


@pytest.mark.parametrize("threads", THREADS)
def test_reference_unet_efficiency(benchmark, reference_unet, threads: int) -> None:
    """The fine U-Net alone under ONNX Runtime on one patch: analytic FLOPs over measured seconds."""
    benchmark.group = "efficiency: fine U-Net, one patch"
    shape = (16, 16, 16) if benchlib.TINY else (64, 64, 64)
    session = benchlib.ort_session(reference_unet.onnx_path, threads)
    x = benchlib.network_input(shape)
    seconds, _ = benchlib.measure(benchmark, lambda: session.run(None, {reference_unet.input_name: x}),
                                  benchlib.rounds(5))
    flops = reference_unet.flops_per_voxel * shape[0] * shape[1] * shape[2]
    benchmark.extra_info["shape"] = list(shape)
    _efficiency(benchmark, "efficiency (counted FLOPs / measured seconds vs sgemm)",
                f"fine U-Net {benchlib.shape_id(shape)}", flops, benchlib.median(seconds), threads)
