"""Smaller model variants for the edge (fp16, int8), each with its measured held-out accuracy change."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from heartseg.runtime.atomic import atomic_output
from heartseg.runtime.contract import VARIANT_KEY, VARIANT_METRICS_KEY, ModelContract
from heartseg.runtime.errors import HeartsegError
from heartseg.runtime.inference import infer_canonical, mask_from_prob
from heartseg.runtime.metrics import dice_score
from heartseg.runtime.preprocess import crop_padded, round_up
from heartseg.runtime.session import OnnxSession
from heartseg.train.cache import PreparedCase
from heartseg.train.trainer import canonical_of

from .stamp import save_stamped, set_metadata, write_model

MAX_DICE_DROP = 0.005


@dataclass
class VariantReport:
    """A variant's size and its held-out Dice beside the fp32 model's."""

    variant: str
    path: str
    size_mb: float
    cases: list[str]
    dice_fp32: float
    dice_variant: float
    dice_change: float
    within_tolerance: bool

    def to_dict(self) -> dict:
        """JSON-able form."""
        return asdict(self)

    def metrics(self) -> dict:
        """What the variant's own file records of its measurement (its size and path are the file's own)."""
        return {**{k: v for k, v in self.to_dict().items() if k not in ("path", "size_mb")},
                "max_dice_drop": MAX_DICE_DROP}


def _save_tagged(proto, path: Path, variant: str) -> None:
    set_metadata(proto, VARIANT_KEY, variant)
    write_model(proto, path)


def make_fp16(source: Path, target: Path) -> Path:
    """Weights and activations in float16; inputs and outputs stay float32 (the contract is unchanged)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    proto = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    # The converter appends the inputs' Casts after the nodes that read them: ONNX requires the nodes in
    # topological order (the full checker and onnx's reference evaluator refuse the file otherwise).
    OnnxModel.graph_topological_sort(proto.graph)
    with atomic_output(target) as tmp:
        _save_tagged(proto, tmp, "fp16")
    return target


def calibration_feeds(contract: ModelContract, cases: list[PreparedCase], per_case: int = 2,
                      seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Training patches for static quantisation: every stage's input, from its own grid."""
    rng = np.random.default_rng(seed)
    feeds = []
    for case in cases:
        for _ in range(per_case):
            feed = {}
            for stage in contract.stages:
                image, label = case.stages[stage.name]
                patch = np.asarray([round_up(p, stage.divisor) for p in stage.patch_size])
                fg = np.argwhere(np.asarray(label))
                centre = fg[rng.integers(len(fg))] if len(fg) else np.asarray(image.shape) // 2
                lo = centre - patch // 2
                feed[stage.input_name] = crop_padded(np.asarray(image), lo, lo + patch)[None, None]
            feeds.append(feed)
    return feeds


def make_int8(source: Path, target: Path, feeds: list[dict[str, np.ndarray]]) -> Path:
    """ONNX Runtime static quantisation (QDQ, per-channel int8 weights) calibrated on the given feeds."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items = iter(feeds)

        def get_next(self):
            return next(self._items, None)

    import onnx

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs advice at WARNING on the root logger
    try:
        with atomic_output(target) as tmp:
            quantize_static(str(source), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
            _save_tagged(onnx.load(str(tmp)), tmp, "int8")
    finally:
        root.setLevel(level)
    return target


def held_out_dice(model: Path, cases: list[PreparedCase], threads: int | None = None) -> float:
    """Mean Dice of a model file over prepared held-out cases, through the runtime's inference path."""
    session = OnnxSession(model, device="cpu", threads=threads)
    scores = []
    for case in cases:
        prob = infer_canonical(canonical_of(case), session.contract, session.predict).prob
        scores.append(dice_score(mask_from_prob(prob, session.contract), np.asarray(case.label)))
    return float(np.mean(scores))


def compare(variant: str, reference: Path, candidate: Path, cases: list[PreparedCase], dice_fp32: float,
            threads: int | None = None) -> VariantReport:
    """Measure a variant on the held-out cases against the fp32 model's Dice."""
    if not cases:
        raise HeartsegError("no held-out cases to measure the variant on")
    score = held_out_dice(candidate, cases, threads)
    return VariantReport(variant, str(candidate), candidate.stat().st_size / 1e6, [c.case_id for c in cases],
                         dice_fp32, score, score - dice_fp32, dice_fp32 - score <= MAX_DICE_DROP)


def record_metrics(report: VariantReport) -> VariantReport:
    """Write the variant's measured accuracy into its own file's metadata; the report with the file's new size."""
    import onnx

    path = Path(report.path)
    proto = onnx.load(str(path))
    set_metadata(proto, VARIANT_METRICS_KEY, json.dumps(report.metrics()))
    with atomic_output(path) as tmp:
        save_stamped(proto, tmp)  # checked in full when it was made: only its metadata changed since
    return replace(report, size_mb=path.stat().st_size / 1e6)
