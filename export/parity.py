"""The export's own parity check: ONNX Runtime against PyTorch on real-size inputs and real scans."""

from __future__ import annotations

import copy
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from heartseg.runtime.formats.nifti import load_volume
from heartseg.runtime.inference import infer_canonical
from heartseg.runtime.postprocess import mask_from_prob
from heartseg.runtime.preprocess import to_canonical
from heartseg.runtime.session import OnnxSession
from heartseg.train.trainer import torch_predictor

from .graph_parity import ParityError
from .model_file import TrainedModel
from .onnx_export import random_input
from .pipeline_file import networks_file

MAX_ABS_DIFF = 1e-4
# ONNX Runtime and PyTorch sum float32 convolutions in different orders. On real scans the trained,
# instance-normalised network turns that into probability differences of up to about 3e-4 (logits
# 1e-3) where the map crosses the threshold; the masks are compared on their own below.
MAX_ABS_DIFF_SCAN = 1e-3
MIN_MASK_AGREEMENT = 0.9999


@dataclass
class ParityResult:
    """One comparison of probabilities and masks."""

    what: str
    shape: tuple[int, ...]
    max_abs_diff: float
    mask_agreement: float
    tolerance: float = MAX_ABS_DIFF

    @property
    def ok(self) -> bool:
        """Within the tolerances."""
        return self.max_abs_diff <= self.tolerance and self.mask_agreement >= MIN_MASK_AGREEMENT

    def to_dict(self) -> dict:
        """JSON-able form."""
        return {**asdict(self), "ok": self.ok}


def _compare(what: str, ref: np.ndarray, got: np.ndarray, ref_mask: np.ndarray, got_mask: np.ndarray,
             tolerance: float) -> ParityResult:
    """Largest difference of the probabilities and the share of voxels on which their masks agree."""
    diff = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64)))) if ref.size else 0.0
    agreement = float(np.mean(ref_mask == got_mask)) if ref.size else 1.0
    return ParityResult(what, tuple(int(s) for s in ref.shape), diff, agreement, tolerance)


def check_parity(model: TrainedModel, onnx_path: Path, scans: list[Path] = (), threads: int | None = None,
                 max_abs_diff: float = MAX_ABS_DIFF,
                 max_abs_diff_scan: float = MAX_ABS_DIFF_SCAN, torch_device: str = "cpu") -> list[ParityResult]:
    """Compare ONNX Runtime (CPU) with PyTorch (float32 on torch_device) per stage on a real-size random input,
    and end to end on scans through the Python pipeline: the networks of onnx_path (a pipeline file's taken back
    out of its graph)."""
    with networks_file(onnx_path) as networks:
        session = OnnxSession(networks, device="cpu", threads=threads)
    device = torch.device(torch_device)
    networks = {name: copy.deepcopy(net).to(device) for name, net in model.networks.items()} \
        if device.type != "cpu" else model.networks
    torch_predict = torch_predictor(networks, device, amp=False)
    with _float32_on_cuda() if device.type == "cuda" else nullcontext():
        return _parity(model, session, torch_predict, scans, max_abs_diff, max_abs_diff_scan)


@contextmanager
def _float32_on_cuda():
    """PyTorch computes float32 convolutions and products on CUDA as TF32 unless told not to."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _parity(model: TrainedModel, session: OnnxSession, torch_predict, scans: list[Path], max_abs_diff: float,
            max_abs_diff_scan: float) -> list[ParityResult]:
    results = []
    for stage in model.contract.stages:
        x = random_input(stage.patch_size, seed=len(results))
        prob = session.predict(stage.name, x)
        ref = torch_predict(stage.name, x)
        threshold = float(stage.threshold)
        results.append(_compare(f"{stage.name}: random input", ref, prob, ref > threshold, prob > threshold,
                                max_abs_diff))
        mask = session.mask(stage.name, x)
        expected = (prob > float(stage.threshold)).astype(np.uint8)
        if not np.array_equal(mask, expected):
            raise ParityError(f"{stage.name}: the graph's mask output disagrees with its probability and threshold")
    for scan in scans:
        canonical = to_canonical(load_volume(scan), model.contract.orientation)
        ref = infer_canonical(canonical, model.contract, torch_predict).prob
        got = infer_canonical(canonical, model.contract, session.predict).prob
        # The final masks, largest component kept, are what users get: compare those.
        results.append(_compare(f"{Path(scan).name}: whole pipeline", ref, got, mask_from_prob(ref, model.contract),
                                mask_from_prob(got, model.contract), max_abs_diff_scan))
    failed = [r for r in results if not r.ok]
    if failed:
        lines = "; ".join(f"{r.what}: max |diff| {r.max_abs_diff:.2e} (limit {r.tolerance:.0e}), mask agreement "
                          f"{100 * r.mask_agreement:.4f} %"
                          for r in failed)
        raise ParityError(f"ONNX Runtime does not match PyTorch ({lines})")
    return results
