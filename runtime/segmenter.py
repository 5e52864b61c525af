"""The Python API: Segmenter(model).predict(scan) -> SegmentationResult.

predict takes a path (any format heartseg-infer reads, DICOM folders included), a nibabel image,
a SimpleITK image, or a numpy array with its voxel spacing (and optionally its affine), and
answers in the caller's type: a nibabel image for a path or a nibabel image, a SimpleITK image
for a SimpleITK image, an array of the input's shape for an array.

The axis-order trap: nibabel arrays are indexed (x, y, z), but SimpleITK's GetArrayFromImage
returns (z, y, x) while image.GetSpacing() is (x, y, z). A numpy array's spacing (and affine)
must follow the array's own axes: pass GetArrayFromImage(image) with GetSpacing()[::-1], or
better the SimpleITK image itself, which carries its orientation too.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from .errors import InputError, ModelError
from .image import ScanGeometry, Volume, volume_from_array, voxel_sizes, voxel_volume_mm3
from .memory import MB, MemoryPlan, canonical_geometry, current_rss, default_budget, largest_final_call, plan_memory
from .postprocess import mask_from_prob
from .preprocess import CanonicalVolume, check_contrast, from_canonical, target_shape, to_canonical
from .qc import QCReport, assess, refusal_reason
from .qc.measures import Box
from .contract import ModelContract
from .session import OnnxSession, identity
from .sliding_window import padded_shape
from .tta import DEFAULT_FLIPS, flipped_average

DEFAULT_MODEL_NAME = "heartseg-la.onnx"
# The shipped model's variants, by the name --model and Segmenter(model=...) accept; "ensemble" is the fold
# ensemble shipped beside it (heartseg-infer --ensemble).
VARIANTS = {"fp32": DEFAULT_MODEL_NAME, "fp16": "heartseg-la.fp16.onnx", "int8": "heartseg-la.int8.onnx",
            "ensemble": "heartseg-la.ensemble.onnx"}


def default_model_path(name: str = DEFAULT_MODEL_NAME) -> Path:
    """A model file shipped in heartseg.models (by default the fp32 model)."""
    path = Path(str(resources.files("heartseg.models").joinpath(name)))
    if not path.is_file():
        raise ModelError(f"no shipped model at {path}: pass --model M.onnx (export one with heartseg-export)")
    return path


def resolve_model(model: str | os.PathLike | None) -> Path:
    """A model path from a path, a shipped variant's name (fp32, fp16, int8, ensemble), or None (the shipped fp32
    model)."""
    if model is None:
        return default_model_path()
    text = str(model)
    if text in VARIANTS and not Path(text).exists():
        return default_model_path(VARIANTS[text])
    if not Path(model).exists():
        raise ModelError(f"{text}: model file not found, and not the name of a shipped model "
                         f"({', '.join(VARIANTS)})")
    return Path(model)


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
        return float(np.count_nonzero(self.mask)) * voxel_volume_mm3(self.affine) / 1000.0


class Segmenter:
    """Segments the left atrium in scans with a heartseg ONNX model."""

    def __init__(self, model: str | os.PathLike | None = None, device: str = "auto", threads: int | None = None,
                 memory_limit_mb: float | None = None, max_network_voxels: int | None = None,
                 tta: bool = False) -> None:
        """memory_limit_mb bounds the whole process (default: a share of physical memory); max_network_voxels
        runs the final stage in tiles above that many voxels per network call; tta averages mirrored copies."""
        if memory_limit_mb is not None and not (math.isfinite(memory_limit_mb) and memory_limit_mb > 0):
            raise InputError(f"--memory-limit-mb {memory_limit_mb}: must be a positive number of megabytes")
        self.session = OnnxSession(resolve_model(model), "cuda" if device == "gpu" else device, threads)
        self.contract = self.session.contract
        if not self.contract.pipeline:
            path = self.session.path
            raise ModelError(f"{path}: the stages' networks without the pipeline around them (exported by an older "
                             f"heartseg-export): upgrade it with heartseg-export --upgrade {path} NEW.onnx")
        self.tta = tta
        # What records name as the model: its file as this session opened it, whatever lies at that path later.
        self.identity = identity(self.session.file_sha256, tta)
        # --tta's masks are judged by the calibration fitted on test-time-flipped held-out cases.
        self.qc_contract = self.contract.for_qc(tta)
        self.max_network_voxels = max_network_voxels
        self.threads = threads
        self._tiled: OnnxSession | None = None
        self.budget = int(memory_limit_mb * MB) if memory_limit_mb is not None else default_budget()
        self._loaded_rss = current_rss()
        if self.budget is not None and self._loaded_rss >= self.budget:
            raise InputError(f"--memory-limit-mb {self.budget / MB:g}: the process already uses "
                             f"{self._loaded_rss / MB:.0f} MB with the model loaded")
        # Resident memory that earlier segment() calls left behind for reuse (ONNX Runtime's arena, the
        # allocator's free lists): the next scan reuses it, so it is not counted as in use a second time.
        self._kept = 0
        self._largest_plan = 0

    def plan(self, geometry: ScanGeometry, source: str | os.PathLike = "scan", *, loaded: bool = False,
             keep_prob: bool = False) -> MemoryPlan:
        """Check a scan's header against the model's plausible spacing and field of view and the memory budget."""
        if (reason := refusal_reason(geometry.shape, geometry.spacing, self.contract)) is not None:
            raise InputError(f"{source}: {reason}")
        baseline = max(self._loaded_rss, current_rss() - self._kept)
        return plan_memory(geometry, self.contract, self.budget, baseline=baseline, include_read=not loaded,
                           keep_prob=keep_prob, tta=self.tta, source=source)

    def check_header(self, geometry: ScanGeometry, source: str | os.PathLike = "scan") -> None:
        """A load_volume check: refuse a scan the model cannot plausibly or affordably segment, before reading it."""
        self.plan(geometry, source)

    @property
    def device(self) -> str:
        """'cuda' or 'cpu': the provider ONNX Runtime actually uses."""
        return self.session.device

    def segment(self, volume: Volume, keep_prob: bool = False) -> Prediction:
        """Segment one loaded volume; the mask lies on exactly the volume's grid."""
        rss_before = current_rss()
        source = volume.path or "scan"
        plan = self.plan(ScanGeometry(volume.shape, volume.affine), source, loaded=True, keep_prob=keep_prob)
        limits = [n for n in (plan.max_network_voxels, self.max_network_voxels) if n is not None]
        session = self._session_for(min(limits) if limits else None, volume)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        canonical = to_canonical(volume, self.contract.orientation)
        # The graph refuses nothing: a constant scan has no contrast to normalise, so it is refused here.
        check_contrast(canonical.data)
        timings["preprocess"] = time.perf_counter() - start
        start = time.perf_counter()
        if self.tta:
            prob, box = flipped_average(canonical.data,
                                        lambda data, _: self._run(session, data, canonical.spacing))
            canonical_mask, score = mask_from_prob(prob, self.contract), None
        else:
            out = session.segment(canonical.data, canonical.spacing)
            canonical_mask, prob, box, score = out.mask, out.prob, out.box, out.score
        timings["network"] = time.perf_counter() - start
        start = time.perf_counter()
        mask = from_canonical(canonical_mask, canonical)
        native_prob = from_canonical(prob, canonical) if keep_prob else None
        # Reorienting only permutes and mirrors axes: the scan's voxel volume (|det| of its affine) holds for QC.
        report = assess(canonical_mask, prob, canonical.spacing, self.qc_contract, box,
                        voxel_volume_mm3=voxel_volume_mm3(volume.affine), image=canonical.data, score=score)
        # "postprocess" includes QC, so that the stages add up to the total; "qc" is its share.
        timings["postprocess"] = time.perf_counter() - start
        timings["qc"] = report.seconds
        returned = mask.nbytes + (native_prob.nbytes if native_prob is not None else 0)
        # Never more than the largest pipeline a plan allowed: growth beyond it (a caller's own arrays, a leak)
        # is memory in use, not memory kept for the next scan.
        self._largest_plan = max(self._largest_plan, plan.total_bytes)
        self._kept = min(self._largest_plan, self._kept + max(0, current_rss() - rss_before - returned))
        copies = len(DEFAULT_FLIPS) if self.tta else 1
        voxels = {name: n * copies for name, n in network_voxels(canonical, self.contract, box).items()}
        return Prediction(mask, volume.affine, native_prob, report.flag, self.device, timings, voxels,
                          copies * len(voxels), report)

    @staticmethod
    def _run(session: OnnxSession, data: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, Box | None]:
        out = session.segment(data, spacing)
        return out.prob, out.box

    def _session_for(self, max_voxels: int | None, volume: Volume) -> OnnxSession:
        """The model's session, or, when the final stage's largest box for this scan may not fit in max_voxels, a
        session of the same file that runs boxes above max_voxels in tiles (kept for the scans that follow)."""
        shape, spacing = canonical_geometry(ScanGeometry(volume.shape, volume.affine), self.contract.orientation)
        if max_voxels is None or max_voxels >= largest_final_call(shape, spacing, self.contract):
            return self.session
        if self._tiled is None or self._tiled.max_voxels != max_voxels:
            tiled = OnnxSession(self.session.path, self.session.device, self.threads, max_voxels=max_voxels)
            if tiled.file_sha256 != self.session.file_sha256:
                # Records name the file as this Segmenter first opened it: another file may not run in its place.
                raise ModelError(f"{self.session.path}: the model file changed since it was opened")
            self._tiled = tiled
        return self._tiled

    def predict(self, image: Any, spacing: tuple[float, float, float] | None = None,
                affine: np.ndarray | None = None, series: str | None = None) -> "SegmentationResult":
        """Segment a path, nibabel image, SimpleITK image, or numpy array (with spacing or affine)."""
        start = time.perf_counter()
        read_seconds = 0.0
        wrap: Any
        if isinstance(image, (str, os.PathLike)):
            from .formats import discover_sources, read_scan

            sources = discover_sources([Path(image)], series)
            if len(sources) != 1:
                raise InputError(f"{image}: holds {len(sources)} scans; predict one at a time")
            volume = read_scan(sources[0]).volume
            read_seconds = time.perf_counter() - start
            wrap = lambda data: _nifti(data, volume.affine)  # noqa: E731
        elif isinstance(image, nib.spatialimages.SpatialImage):
            volume = volume_from_array(image.dataobj, image.affine)
            wrap = lambda data: _nifti(data, image.affine)  # noqa: E731
        elif type(image).__module__.startswith("SimpleITK"):
            from .formats.metaimage import sitk_from_array, volume_from_sitk

            volume = volume_from_sitk(image)

            def wrap(data: np.ndarray) -> Any:
                out = sitk_from_array(data, volume.affine)
                out.CopyInformation(image)
                return out
        elif isinstance(image, np.ndarray):
            volume = volume_from_array(image, array_affine(image.shape, spacing, affine))
            shape = image.shape
            wrap = lambda data: np.asarray(data).reshape(shape)  # noqa: E731
        else:
            raise InputError(f"cannot segment a {type(image).__name__}: give a path, a nibabel image, a SimpleITK "
                             "image or a numpy array with spacing")
        prediction = self.segment(volume, keep_prob=True)
        timings = {"read": read_seconds, **prediction.timings}
        return SegmentationResult(wrap(prediction.mask.astype(np.uint8)), wrap(prediction.prob.astype(np.float32)),
                                  prediction.mask, volume.affine, prediction.volume_ml, prediction.qc, timings,
                                  prediction.device, prediction.report)


def network_voxels(canonical: CanonicalVolume, contract: ModelContract, box: Box | None) -> dict[str, int]:
    """The voxels each stage's network processed for one scan (what FLOP counts multiply): the localiser's padded
    grid unless the scan was seen whole, and the final stage's padded box (its grid when it saw the whole scan;
    a grown box and overlapping tiles counted once)."""
    voxels = {}
    for stage in contract.stages:
        if stage is not contract.final_stage and box is None:
            continue  # a cascade's localiser does not run on a scan the final stage sees whole
        shape = target_shape(canonical.data.shape, canonical.spacing, stage.spacing)
        if stage is contract.final_stage and box is not None:
            scale = np.asarray(shape, float) / np.asarray(canonical.data.shape, float)
            shape = tuple(max(1, int(round(n))) for n in (np.asarray(box[1]) - np.asarray(box[0])) * scale)
        voxels[stage.name] = int(np.prod(padded_shape(shape, stage.patch_size, stage.divisor), dtype=np.int64))
    return voxels


def array_affine(shape: tuple[int, ...], spacing: tuple[float, ...] | None,
                 affine: np.ndarray | None) -> np.ndarray:
    """The affine of a bare array: the one given, or the spacing (in the array's own axis order) on RAS axes."""
    if affine is not None:
        affine = np.asarray(affine, float)
        if affine.shape != (4, 4):
            raise InputError(f"the affine must be a 4 x 4 matrix, got shape {affine.shape}")
        if spacing is not None and not np.allclose(voxel_sizes(affine), spacing, rtol=1e-4):
            raise InputError(f"spacing {tuple(spacing)} disagrees with the affine's voxel sizes "
                             f"{tuple(round(v, 4) for v in voxel_sizes(affine))}")
        return affine
    if spacing is None:
        raise InputError("a numpy array needs its voxel spacing in mm (spacing=(sx, sy, sz), in the array's axis "
                         "order) or an affine")
    values = tuple(float(v) for v in spacing)
    if len(values) != 3 or any(not np.isfinite(v) or v <= 0 for v in values):
        raise InputError(f"spacing must be three positive numbers in mm, got {tuple(spacing)}")
    return np.diag([*values, 1.0])


def _nifti(data: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    out = nib.Nifti1Image(data, affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out


@dataclass
class SegmentationResult:
    """What Segmenter.predict returns: the mask and probabilities in the caller's type, and what was measured.

    mask_array is the uint8 mask as an (x, y, z) array on the grid of affine (RAS mm); qc is None
    when the mask passed QC, else its verdict and reasons ("review: ..." or "fail: ..."), with the whole
    QCReport (estimated Dice, measures) in report; statistics are computed on first use
    (they need scikit-image, heartseg[mesh]).
    """

    mask: Any
    probabilities: Any
    mask_array: np.ndarray
    affine: np.ndarray
    volume_ml: float
    qc: str | None
    timings: dict[str, float]
    device: str
    report: QCReport | None = None
    _statistics: Any = field(default=None, repr=False)

    @property
    def statistics(self) -> Any:
        """The atrium's AtriumStatistics (volume, surface area, sphericity, RAS-axis diameters)."""
        if self._statistics is None:
            from .statistics import atrium_statistics

            self._statistics = atrium_statistics(self.mask_array, self.affine)
        return self._statistics
