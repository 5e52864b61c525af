"""The Python API: Segmenter(model).predict(nib_image) -> nib_image."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputError, ModelError
from .image import Volume, volume_from_array, voxel_sizes
from .inference import infer_canonical, mask_from_prob, stage_shape
from .preprocess import from_canonical, to_canonical
from .qc import QCReport, assess, stage_box_on_native
from .session import OnnxSession
from .tta import infer_canonical_tta

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
    report: QCReport | None = None

    @property
    def volume_ml(self) -> float:
        """Segmented volume in millilitres."""
        return float(self.mask.sum()) * float(np.prod(voxel_sizes(self.affine))) / 1000.0


class Segmenter:
    """Segments the left atrium in scans with a heartseg ONNX model."""

    def __init__(self, model: str | os.PathLike | None = None, device: str = "auto", threads: int | None = None,
                 memory_limit_mb: float | None = None, tta: bool = False) -> None:
        self.session = OnnxSession(model if model is not None else default_model_path(), device, threads)
        self.contract = self.session.contract
        self.tta = tta
        self.max_voxels = None
        if memory_limit_mb is not None:
            if memory_limit_mb <= 0:
                raise InputError("the memory limit must be positive")
            self.max_voxels = int(memory_limit_mb * 1e6 / self.contract.bytes_per_voxel)

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

        timings: dict[str, float] = {}
        start = time.perf_counter()
        canonical = to_canonical(volume, self.contract.orientation)
        infer = infer_canonical_tta if self.tta else infer_canonical
        result = infer(canonical, self.contract, timed_predict, self.max_voxels)
        # Resampling, normalisation and cropping happen between the network calls: all of it is preprocessing.
        timings["preprocess"] = time.perf_counter() - start - network[0]
        timings["network"] = network[0]
        start = time.perf_counter()
        canonical_mask = mask_from_prob(result.prob, self.contract)
        mask = from_canonical(canonical_mask, canonical)
        prob = from_canonical(result.prob, canonical) if keep_prob else None
        box = None
        if result.box is not None:
            box = stage_box_on_native(result.box, canonical.data.shape,
                                      stage_shape(canonical, self.contract.final_stage))
        report = assess(canonical_mask, result.prob, canonical.spacing, self.contract, box)
        # "postprocess" includes QC, so that the stages add up to the total; "qc" is its share.
        timings["postprocess"] = time.perf_counter() - start
        timings["qc"] = report.seconds
        return Prediction(mask, volume.affine, prob, report.flag, self.device, timings, voxels, calls[0], report)

    def predict(self, image: nib.spatialimages.SpatialImage) -> nib.Nifti1Image:
        """Segment an in-memory NIfTI image; returns a uint8 mask image with the input's affine."""
        prediction = self.segment(volume_from_array(image.dataobj, image.affine))
        out = nib.Nifti1Image(prediction.mask, image.affine)
        out.set_qform(image.affine, code=1)
        out.set_sform(image.affine, code=1)
        return out
