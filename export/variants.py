"""Smaller model variants for the edge (fp16, int8), each with its measured held-out accuracy change.

A variant is made from the stages' networks (a pipeline file's taken back out), then wrapped in the pipeline graph
like any export: the networks rounded inside, the graph's own arithmetic in float32."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from heartseg.runtime.atomic import atomic_output
from heartseg.runtime.contract import VARIANT_KEY, VARIANT_METRICS_KEY, ModelContract
from heartseg.runtime.errors import HeartsegError
from heartseg.runtime.metrics import dice_score
from heartseg.runtime.preprocess import crop_padded, round_up
from heartseg.runtime.session import OnnxSession
from heartseg.train.cache import PreparedCase

from .pipeline_file import unwrap, wrap
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


def _networks(source: Path):
    """The networks model of a model file: a networks file's own, a pipeline file's taken back out."""
    import onnx

    return unwrap(onnx.load(str(source)), source)


def _save_tagged(networks, path: Path, variant: str) -> None:
    """The variant's networks wrapped in the pipeline graph, named as the variant, checked in full and written."""
    proto = wrap(networks)
    set_metadata(proto, VARIANT_KEY, variant)
    write_model(proto, path)


def make_fp16(source: Path, target: Path) -> Path:
    """The networks' weights and activations in float16 (their inputs and outputs, and the graph around them, stay
    float32: the contract is unchanged)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    # Thresholds stay float32, as the probabilities they are compared with: networks taken out of a pipeline graph
    # and wrapped again carry their thresholds into the new graph's initialisers, and networks_model compares the
    # float32 probabilities it takes back out with those.
    proto = convert_float_to_float16(_networks(source), keep_io_types=True,
                                     op_block_list=[*DEFAULT_OP_BLOCK_LIST, "Greater"])
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
    """The networks in ONNX Runtime static quantisation (QDQ, per-channel int8 weights) calibrated on the given
    feeds (each stage's input)."""
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
        with tempfile.TemporaryDirectory(prefix="heartseg-int8-") as folder:
            networks, quantised = Path(folder) / "networks.onnx", Path(folder) / "int8.onnx"
            networks.write_bytes(_networks(source).SerializeToString())
            quantize_static(str(networks), str(quantised), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
            proto = onnx.load(str(quantised))
    finally:
        root.setLevel(level)
    with atomic_output(target) as tmp:
        _save_tagged(proto, tmp, "int8")
    return target


def held_out_dice(model: Path, cases: list[PreparedCase], threads: int | None = None) -> float:
    """Mean Dice of a pipeline file over prepared held-out cases (on the canonical grid), through its graph: what
    the runtime runs."""
    session = OnnxSession(model, device="cpu", threads=threads)
    scores = []
    for case in cases:
        mask = session.segment(np.asarray(case.image), case.spacing).mask
        scores.append(dice_score(mask > 0, np.asarray(case.label) > 0))
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
