"""Fixtures of the benchmark suites: the model, the scans, the reference U-Net, and the end-of-run summary.

Run with `make bench`, or `python -m pytest benchmarks -m benchmark_suite --benchmark-only`;
HEARTSEG_BENCH_TINY=1 makes it a seconds-long smoke run (see benchlib.py for every variable).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchlib
import pytest


@pytest.fixture(scope="session")
def tiny() -> bool:
    """True in tiny mode (HEARTSEG_BENCH_TINY=1)."""
    return benchlib.TINY


@pytest.fixture(scope="session")
def bench_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The heartseg model under test: tiny pointwise model, $HEARTSEG_BENCH_MODEL, or the shipped model."""
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is not installed (pip install 'heartseg[cpu]')")
    if benchlib.TINY:
        pytest.importorskip("onnx", reason="onnx is needed to build the tiny model (pip install onnx)")
        return benchlib.build_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny.onnx")
    env = os.environ.get("HEARTSEG_BENCH_MODEL")
    if env:
        if not Path(env).is_file():
            pytest.skip(f"$HEARTSEG_BENCH_MODEL={env}: no such file")
        return Path(env)
    from heartseg.runtime.errors import ModelError
    from heartseg.runtime.segmenter import default_model_path

    try:
        return default_model_path()
    except ModelError as exc:
        pytest.skip(f"no model to benchmark: {exc}; set $HEARTSEG_BENCH_MODEL=M.onnx")


@pytest.fixture(scope="session")
def bench_scans(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Scans to segment: Task02_Heart training images (tiny mode: three small synthetic scans)."""
    if benchlib.TINY:
        folder = tmp_path_factory.mktemp("tiny-scans")
        shapes = [(24, 28, 20), (20, 24, 16), (28, 24, 20)]
        return [benchlib.write_synthetic_scan(folder / f"tiny_{i}.nii.gz", s, seed=i) for i, s in enumerate(shapes)]
    found = benchlib.data_dir()
    if found is None:
        pytest.skip(f"Task02_Heart dataset not found at {benchlib.data_dir_hint()} (set $HEARTSEG_DATA)")
    scans = sorted(p for p in (found / "imagesTr").iterdir()
                   if not p.name.startswith(".") and p.name.endswith((".nii", ".nii.gz")))
    if not scans:
        pytest.skip(f"no scans in {found / 'imagesTr'}")
    return scans[: benchlib.env_int("HEARTSEG_BENCH_SCANS", 8)]


@dataclass
class ReferenceUNet:
    """The fine U-Net preset with random weights, in eval mode, and its ONNX export."""

    model: Any
    onnx_path: Path
    flops_per_voxel: float
    input_name: str = "image"


@pytest.fixture(scope="session")
def reference_unet(tmp_path_factory: pytest.TempPathFactory) -> ReferenceUNet:
    """train/unet.py PRESETS['fine'] with random weights, exported with torch.onnx.export (opset 17, no dynamo)."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (pip install 'heartseg[train]'): "
                                                "the reference U-Net is built with it")
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'heartseg[train]')")
    from heartseg.train.unet import PRESETS, build_unet, count_flops_per_voxel

    config = PRESETS["fine"]
    torch.manual_seed(0)
    model = build_unet(config).eval()
    path = tmp_path_factory.mktemp("reference-unet") / "unet_fine.onnx"
    dims = {0: "batch", 2: "x", 3: "y", 4: "z"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 16, 16, 16),), str(path), input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": dims, "logits": dims}, opset_version=17,
                          do_constant_folding=True, dynamo=False)
    return ReferenceUNet(model, path, count_flops_per_voxel(config))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print the ratios and efficiencies the benchmarks computed."""
    if not benchlib.REPORT:
        return
    mode = "tiny smoke run: numbers mean nothing" if benchlib.TINY else "measured"
    terminalreporter.section(f"heartseg benchmark summary ({mode})")
    sections: dict[str, list[str]] = {}
    for section, text in benchlib.REPORT:
        sections.setdefault(section, []).append(text)
    for section, lines in sections.items():
        terminalreporter.write_line(f"{section}:")
        for line in lines:
            terminalreporter.write_line(f"  {line}")
