"""The GPU side: ONNX Runtime's CUDA execution provider (and TensorRT's, when offered).

The rows join the CPU groups of test_end_to_end.py and test_backends.py ("end-to-end: one scan",
"backends <shape>"), so one pytest-benchmark table shows CPU and GPU side by side. The timed calls
include the host-to-device and device-to-host copies, as the runtime does them.
"""

from __future__ import annotations

from pathlib import Path

import benchlib
import pytest
from heartseg.runtime.bench import stage_medians, time_scan
from heartseg.runtime.segmenter import Segmenter

pytestmark = pytest.mark.benchmark_suite

ort = pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed")
AVAILABLE = ort.get_available_providers()
if "CUDAExecutionProvider" not in AVAILABLE:
    pytest.skip(f"ONNX Runtime {ort.__version__} offers no CUDAExecutionProvider (available: {', '.join(AVAILABLE)}); "
                "install heartseg[gpu] (onnxruntime-gpu) on a machine with an NVIDIA GPU", allow_module_level=True)

SHAPES = [(16, 16, 16)] if benchlib.TINY else [(64, 64, 64), (72, 80, 96)]
PROVIDERS = ["CUDAExecutionProvider", "TensorrtExecutionProvider"]


def test_one_scan_cuda(benchmark, bench_model: Path, bench_scans: list[Path], tmp_path: Path) -> None:
    """Seconds to read, segment (CUDA) and write the first scan."""
    benchmark.group = "end-to-end: one scan"
    segmenter = Segmenter(bench_model, device="cuda")
    if segmenter.device != "cuda":
        pytest.skip("ONNX Runtime lists CUDAExecutionProvider but fell back to the CPU "
                    "(CUDA or cuDNN libraries missing?)")
    scan = bench_scans[0]
    time_scan(segmenter, scan, tmp_path)  # warm-up: CUDA context, cuDNN algorithm search
    seconds, timings = benchlib.measure(benchmark, lambda: time_scan(segmenter, scan, tmp_path), benchlib.rounds(5))
    stages = stage_medians(timings)
    benchmark.extra_info.update({"scan": scan.name, "device": segmenter.device, "stages_median_s": stages})
    benchlib.report("end-to-end, one scan (median s)",
                    f"{scan.name} cuda: total {benchlib.median(seconds):.3f}  "
                    + "  ".join(f"{k} {v:.3f}" for k, v in stages.items() if k != "total"))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=benchlib.shape_id)
def test_network_gpu(benchmark, reference_unet, shape: tuple[int, int, int], provider: str) -> None:
    """The fine U-Net on one patch with a GPU execution provider (same network and input as test_backends.py)."""
    if provider not in AVAILABLE:
        pytest.skip(f"ONNX Runtime offers no {provider} here (available: {', '.join(AVAILABLE)})")
    benchmark.group = f"backends {benchlib.shape_id(shape)}"
    try:
        session = benchlib.ort_session(reference_unet.onnx_path, None, [provider, "CPUExecutionProvider"])
    except Exception as exc:  # e.g. TensorRT listed but its libraries missing
        pytest.skip(f"{provider} could not start a session: {str(exc).splitlines()[0]}")
    if session.get_providers()[0] != provider:
        pytest.skip(f"{provider} fell back to {session.get_providers()[0]}")
    x = benchlib.network_input(shape)
    for _ in range(3):  # warm-up: kernel selection (and a TensorRT engine build)
        session.run(None, {reference_unet.input_name: x})
    seconds, _ = benchlib.measure(benchmark, lambda: session.run(None, {reference_unet.input_name: x}),
                                  benchlib.rounds(10))
    med = benchlib.median(seconds)
    voxels = shape[0] * shape[1] * shape[2]
    key = ("onnxruntime-cpu", benchlib.shape_id(shape))
    ort_cpu = [v for k, v in benchlib.MEDIANS.items() if k[:2] == key]
    benchmark.extra_info.update({"backend": provider, "shape": list(shape), "median_s": med,
                                 "achieved_gflops": reference_unet.flops_per_voxel * voxels / med / 1e9,
                                 "speedup_vs_best_onnxruntime_cpu": min(ort_cpu) / med if ort_cpu else None})
    benchlib.report("backends (median s, same network and input)",
                    f"{benchlib.shape_id(shape)}: {provider} {med:.4f}")
