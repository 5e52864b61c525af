"""The Python API: Segmenter(model).predict(nib_image) -> nib_image."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputError, ModelError
from .image import ScanGeometry, Volume, volume_from_array, voxel_volume_mm3
from .inference import infer_canonical, mask_from_prob
from .memory import MB, MemoryPlan, check_plausible, current_rss, default_budget, plan_memory
from .plausibility import mask_flag
from .preprocess import from_canonical, to_canonical
from .session import OnnxSession

DEFAULT_MODEL_NAME = "heartseg-la.onnx"


def default_model_path() -> Path:
    """The model shipped in heartseg.models."""
    path = Path(str(resources.files("heartseg.models").joinpath(DEFAULT_MODEL_NAME)))
    if not path.is_file():
        raise ModelError(f"no shipped model at {path}: pass --model M.onnx (export one with heartseg-export)")
    return path


@dataclass
class Prediction:
    """A mask on the scan's own grid, with its probability map, QC verdict, timings and the voxels
    each stage's network processed (batch x spatial, what FLOP counts multiply)."""

    mask: np.ndarray
    affine: np.ndarray
    prob: np.ndarray | None
    qc: str | None
    device: str
    timings: dict[str, float] = field(default_factory=dict)
    network_voxels: dict[str, int] = field(default_factory=dict)
    network_calls: int = 0

    @property
    def volume_ml(self) -> float:
        """Segmented volume in millilitres."""
        return float(np.count_nonzero(self.mask)) * voxel_volume_mm3(self.affine) / 1000.0


class Segmenter:
    """Segments the left atrium in scans with a heartseg ONNX model."""

    def __init__(self, model: str | os.PathLike | None = None, device: str = "auto", threads: int | None = None,
                 memory_limit_mb: float | None = None, max_network_voxels: int | None = None) -> None:
        """memory_limit_mb bounds the whole process (default: a share of physical memory); max_network_voxels
        forces sliding windows above that many voxels per network call."""
        if memory_limit_mb is not None and not (math.isfinite(memory_limit_mb) and memory_limit_mb > 0):
            raise InputError(f"--memory-limit-mb {memory_limit_mb}: must be a positive number of megabytes")
        self.session = OnnxSession(model if model is not None else default_model_path(), device, threads)
        self.contract = self.session.contract
        self.budget = int(memory_limit_mb * MB) if memory_limit_mb is not None else default_budget()
        self.max_network_voxels = max_network_voxels
        if self.budget is not None and current_rss() >= self.budget:
            raise InputError(f"--memory-limit-mb {self.budget / MB:g}: the process already uses "
                             f"{current_rss() / MB:.0f} MB with the model loaded")

    def plan(self, geometry: ScanGeometry, source: str | os.PathLike = "scan", *, loaded: bool = False,
             keep_prob: bool = False) -> MemoryPlan:
        """Check a scan's header against the model's plausible spacing and field of view and the memory budget."""
        check_plausible(geometry, self.contract, source)
        return plan_memory(geometry, self.contract, self.budget, baseline=current_rss(), include_read=not loaded,
                           keep_prob=keep_prob, source=source)

    def check_header(self, geometry: ScanGeometry, source: str | os.PathLike = "scan") -> None:
        """A load_volume check: refuse a scan the model cannot plausibly or affordably segment, before reading it."""
        self.plan(geometry, source)

    @property
    def device(self) -> str:
        """'cuda' or 'cpu': the provider ONNX Runtime actually uses."""
        return self.session.device

    def segment(self, volume: Volume, keep_prob: bool = False) -> Prediction:
        """Segment one loaded volume; the mask lies on exactly the volume's grid."""
        network = [0.0]
        voxels: dict[str, int] = {}
        calls = [0]

        def timed_predict(stage_name: str, batch: np.ndarray) -> np.ndarray:
            voxels[stage_name] = voxels.get(stage_name, 0) + int(np.prod(batch.shape[:1] + batch.shape[2:]))
            calls[0] += 1
            begin = time.perf_counter()
            try:
                return self.session.predict(stage_name, batch)
            finally:
                network[0] += time.perf_counter() - begin

        source = volume.path or "scan"
        plan = self.plan(ScanGeometry(volume.shape, volume.affine), source, loaded=True, keep_prob=keep_prob)
        max_voxels = plan.max_network_voxels
        if self.max_network_voxels is not None:
            max_voxels = min(max_voxels or self.max_network_voxels, self.max_network_voxels)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        canonical = to_canonical(volume, self.contract.orientation)
        result = infer_canonical(canonical, self.contract, timed_predict, max_voxels)
        # Resampling, normalisation and cropping happen between the network calls: all of it is preprocessing.
        timings["preprocess"] = time.perf_counter() - start - network[0]
        timings["network"] = network[0]
        start = time.perf_counter()
        mask = from_canonical(mask_from_prob(result.prob, self.contract), canonical)
        prob = from_canonical(result.prob, canonical) if keep_prob else None
        qc = mask_flag(mask, volume.spacing, self.contract.plausibility, self.contract.max_foreground_fraction,
                       voxel_volume_mm3(volume.affine))
        timings["postprocess"] = time.perf_counter() - start
        return Prediction(mask, volume.affine, prob, qc, self.device, timings, voxels, calls[0])

    def predict(self, image: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
        """Segment an in-memory NIfTI image; returns a uint8 mask image with the input's affine."""
        prediction = self.segment(volume_from_array(image.dataobj, image.affine))
        out = nib.Nifti1Image(prediction.mask, image.affine)
        out.set_qform(image.affine, code=1)
        out.set_sform(image.affine, code=1)
        return out
