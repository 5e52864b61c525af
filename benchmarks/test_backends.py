"""The same network on the same input, side by side: ONNX Runtime CPU against PyTorch eager CPU.

The network is train/unet.py PRESETS['fine'] with random weights (speed does not depend on the
weights), exported with torch.onnx.export (opset 17, TorchScript exporter). Each group of the
pytest-benchmark table holds one input size; the PyTorch rows store their ratio to ONNX Runtime at
the same thread count in extra_info ("slowdown_vs_onnxruntime": PyTorch seconds / ONNX Runtime seconds).

fp16 / int8 variants of the heartseg model are benchmarked when the files <model>.fp16.onnx and
<model>.int8.onnx exist next to it.
"""

from __future__ import annotations

from pathlib import Path

import benchlib
import pytest

pytestmark = pytest.mark.benchmark_suite

SHAPES = [(16, 16, 16)] if benchlib.TINY else [(64, 64, 64), (72, 80, 96)]
THREADS = benchlib.thread_counts()


def _record(benchmark, backend: str, shape: tuple[int, int, int], threads: int, seconds: list[float],
            flops_per_voxel: float) -> float:
    """Store the measurement in extra_info and the shared medians; returns the median seconds."""
    med = benchlib.median(seconds)
    voxels = int(shape[0] * shape[1] * shape[2])
    benchlib.MEDIANS[(backend, benchlib.shape_id(shape), threads)] = med
    benchmark.extra_info.update({
        "backend": backend, "shape": list(shape), "threads": threads, "median_s": med,
        "gflop": flops_per_voxel * voxels / 1e9, "achieved_gflops": flops_per_voxel * voxels / med / 1e9,
    })
    return med


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("shape", SHAPES, ids=benchlib.shape_id)
def test_onnxruntime_cpu(benchmark, reference_unet, shape: tuple[int, int, int], threads: int) -> None:
    """ONNX Runtime, CPU execution provider, full graph optimisation."""
    benchmark.group = f"backends {benchlib.shape_id(shape)}"
    session = benchlib.ort_session(reference_unet.onnx_path, threads)
    x = benchlib.network_input(shape)
    seconds, _ = benchlib.measure(benchmark, lambda: session.run(None, {reference_unet.input_name: x}),
                                  benchlib.rounds(5))
    med = _record(benchmark, "onnxruntime-cpu", shape, threads, seconds, reference_unet.flops_per_voxel)
    benchlib.report("backends (median s, same network and input)",
                    f"{benchlib.shape_id(shape)} threads={threads}: onnxruntime-cpu {med:.4f}")


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last_3d"])
@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("shape", SHAPES, ids=benchlib.shape_id)
def test_pytorch_eager_cpu(benchmark, reference_unet, shape: tuple[int, int, int], threads: int,
                           memory_format: str) -> None:
    """PyTorch eager (inference_mode) on CPU, in the default and in the channels_last_3d memory format."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install 'heartseg[train]')")
    benchmark.group = f"backends {benchlib.shape_id(shape)}"
    fmt = torch.channels_last_3d if memory_format == "channels_last_3d" else torch.contiguous_format
    model = reference_unet.model.to(memory_format=fmt)
    x = torch.from_numpy(benchlib.network_input(shape)).contiguous(memory_format=fmt)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def run():
            with torch.inference_mode():
                return model(x)

        seconds, _ = benchlib.measure(benchmark, run, benchlib.rounds(5))
    finally:
        torch.set_num_threads(previous)
    backend = f"pytorch-eager-cpu-{memory_format}"
    med = _record(benchmark, backend, shape, threads, seconds, reference_unet.flops_per_voxel)
    ort = benchlib.MEDIANS.get(("onnxruntime-cpu", benchlib.shape_id(shape), threads))
    ratio = med / ort if ort else None
    benchmark.extra_info["slowdown_vs_onnxruntime"] = ratio
    shown = f"{ratio:.2f}x onnxruntime" if ratio else "onnxruntime not measured in this run"
    benchlib.report("backends (median s, same network and input)",
                    f"{benchlib.shape_id(shape)} threads={threads}: {backend} {med:.4f} ({shown})")


PRECISIONS = ["fp32", "fp16", "int8"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_model_precision(benchmark, bench_model: Path, precision: str) -> None:
    """The heartseg model's final stage and its fp16 / int8 variants (<model>.fp16.onnx, .int8.onnx) on one input."""
    from heartseg.runtime.errors import HeartsegError
    from heartseg.runtime.session import OnnxSession

    path = bench_model if precision == "fp32" else bench_model.with_suffix(f".{precision}.onnx")
    if not path.is_file():
        pytest.skip(f"no {precision} variant of the model: {path} does not exist")
    benchmark.group = "model precision"
    threads = max(THREADS)
    try:
        session = OnnxSession(benchlib.networks_file(path), device="cpu", threads=threads)
    except HeartsegError as exc:
        pytest.skip(f"{precision} variant not usable by the runtime: {exc}")
    stage = session.contract.final_stage
    shape = (16, 16, 16) if benchlib.TINY else tuple(stage.patch_size)
    x = benchlib.network_input(shape)
    seconds, _ = benchlib.measure(benchmark, lambda: session.predict(stage.name, x), benchlib.rounds(5))
    med = benchlib.median(seconds)
    benchlib.MEDIANS[("precision", precision)] = med
    base = benchlib.MEDIANS.get(("precision", "fp32"))
    benchmark.extra_info.update({"precision": precision, "stage": stage.name, "shape": list(shape),
                                 "threads": threads, "median_s": med,
                                 "speedup_vs_fp32": base / med if base and precision != "fp32" else None})
    benchlib.report("model precision (median s, final stage, one patch)",
                    f"{precision} {benchlib.shape_id(shape)} threads={threads}: {med:.4f}")
