"""Export a trained model to one self-contained ONNX file carrying the whole contract."""

from __future__ import annotations

import json
import platform
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from heartseg.runtime.atomic import atomic_output
from heartseg.runtime.contract import CONTRACT_KEY, FORMAT_VERSION
from heartseg.train.unet import count_flops_per_voxel

from .model_file import ExportGraph, TrainedModel
from .stamp import set_metadata, write_model

OPSET = 17


def output_names(model: TrainedModel) -> list[str]:
    """Graph outputs in order: mask then probability of each stage."""
    return [name for s in model.contract.stages for name in (s.mask_name, s.prob_name)]


def metadata(model: TrainedModel) -> dict[str, str]:
    """The ONNX metadata_props: the contract plus human-readable provenance."""
    import onnx

    # The written contract carries every field of this format (roles included), whatever the checkpoint's; it
    # describes the networks side by side (the pipeline graph is wrapped around them afterwards).
    contract = replace(model.contract, format_version=FORMAT_VERSION, pipeline=False)
    final = contract.final_stage
    metrics = model.metrics or {}
    calibration = metrics.get("calibration", {}).get(final.name, {})
    info = dict(contract.info)
    meta = {
        CONTRACT_KEY: contract.to_json(),
        "heartseg.format_version": str(FORMAT_VERSION),
        "heartseg.threshold": f"{final.threshold}",
        "heartseg.threshold_calibration": (
            f"threshold maximising mean Dice over {calibration.get('cases', '?')} held-out cases of fold "
            f"{metrics.get('fold', '?')} (mean Dice {calibration.get('dice', float('nan')):.4f} at that threshold), "
            f"sweep {calibration.get('thresholds', [None])[0]}..{calibration.get('thresholds', [None])[-1]}"),
        "heartseg.stages": ",".join(s.name for s in contract.stages),
        "heartseg.spacing_mm": json.dumps({s.name: list(s.spacing) for s in contract.stages}),
        "heartseg.orientation": contract.orientation,
        "heartseg.normalization": contract.normalization,
        "heartseg.patch_size": json.dumps({s.name: list(s.patch_size) for s in contract.stages}),
        "heartseg.network": json.dumps({n: u.to_dict() for n, u in model.unets.items()}),
        # An ensemble's stage runs each of its member networks.
        "heartseg.flops_per_voxel": json.dumps({n: count_flops_per_voxel(u) * model.members.get(n, 1)
                                                for n, u in model.unets.items()}),
        "heartseg.training_data": f"{info.get('dataset', '?')}: {info.get('dataset_description', '')}",
        "heartseg.licence": f"{info.get('licence', '?')} ({info.get('reference', '')})",
        "heartseg.cv_metrics": json.dumps({"split": metrics.get("split"), "fold": metrics.get("fold"),
                                            "val_cases": metrics.get("val_cases"), "mean": metrics.get("mean"),
                                            "per_dataset": metrics.get("per_dataset"),
                                            "per_case": metrics.get("per_case")}),
        "heartseg.training_command": model.command,
        "heartseg.versions": json.dumps({**model.versions, "export_torch": str(torch.__version__),
                                          "onnx": onnx.__version__, "python": platform.python_version()}),
    }
    return meta


def export_onnx(model: TrainedModel, path: Path, opset: int = OPSET) -> Path:
    """Trace the model (network, sigmoid, threshold) to ONNX with dynamic spatial axes and the metadata."""
    import onnx

    graph = ExportGraph(model).eval()
    stages = model.contract.stages
    examples = tuple(torch.zeros((1, 1) + (s.divisor * 2,) * 3) for s in stages)
    inputs = [s.input_name for s in stages]
    outputs = output_names(model)
    # Each stage gets its own dimension names: the stages run on different grids.
    axes = {}
    for s in stages:
        dims = {0: f"{s.name}_batch", 2: f"{s.name}_x", 3: f"{s.name}_y", 4: f"{s.name}_z"}
        axes.update({s.input_name: dims, s.prob_name: dims, s.mask_name: dims})
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, examples, str(raw), input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=opset, do_constant_folding=True, dynamo=False)
        proto = onnx.load(str(raw))
    for key, value in metadata(model).items():
        set_metadata(proto, key, value)
    proto.producer_name = "heartseg"
    proto.doc_string = "heartseg left-atrium model; the contract is in metadata_props['heartseg.contract']"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        write_model(proto, tmp)
    return path


def random_input(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A reproducible normalised-intensity input of shape (1, 1, *shape)."""
    return np.random.default_rng(seed).standard_normal((1, 1) + tuple(shape)).astype(np.float32)
