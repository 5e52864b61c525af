"""Tiny ONNX models and synthetic scans for the runtime tests (onnx.helper and nibabel only, no torch).

The models are pointwise: prob = sigmoid(scale * x + bias) on every voxel, with mask = prob > threshold
computed in the graph. A pointwise network gives the same probability for a voxel whatever tile it
is seen in, so whole-volume and sliding-window inference must agree up to rounding.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from heartseg.export.stamp import stamp_digest
from heartseg.runtime.contract import CONTRACT_KEY, ModelContract, StageContract

OPSET = 17
# The fixtures' models compute prob = sigmoid(x - 2) on the z-scored scan: the background noise of
# make_scan stays well below 0.5 and the bright ellipsoid well above.
TEST_MODEL_BIAS = -2.0
PATCH = (64, 64, 64)
DIVISOR = 8


def _onnx():
    """The onnx package (a training-side dependency); the calling test is skipped without it."""
    return pytest.importorskip("onnx", reason="onnx is needed to build the test models (pip install onnx)")


def _stage_nodes(prefix: str, input_name: str, prob_name: str, mask_name: str, scale: float, bias: float,
                 threshold: float, smooth: bool = False) -> tuple[list, list]:
    """Nodes and constant initialisers of one pointwise stage (smooth: a 3x3x3 mean filter first, with zero
    padding, so that the stage sees its neighbours and the edges of what it is given, as a network does)."""
    onnx = _onnx()
    helper, TensorProto = onnx.helper, onnx.TensorProto
    p = f"{prefix}_" if prefix else ""
    inits = [
        helper.make_tensor(f"{p}scale", TensorProto.FLOAT, [], [float(scale)]),
        helper.make_tensor(f"{p}bias", TensorProto.FLOAT, [], [float(bias)]),
        helper.make_tensor(f"{p}threshold", TensorProto.FLOAT, [], [float(threshold)]),
    ]
    nodes = []
    if smooth:
        inits.append(helper.make_tensor(f"{p}kernel", TensorProto.FLOAT, [1, 1, 3, 3, 3], [1.0 / 27] * 27))
        nodes.append(helper.make_node("Conv", [input_name, f"{p}kernel"], [f"{p}smoothed"], pads=[1] * 6))
        input_name = f"{p}smoothed"
    nodes += [
        helper.make_node("Mul", [input_name, f"{p}scale"], [f"{p}scaled"]),
        helper.make_node("Add", [f"{p}scaled", f"{p}bias"], [f"{p}logits"]),
        helper.make_node("Sigmoid", [f"{p}logits"], [prob_name]),
        helper.make_node("Greater", [prob_name, f"{p}threshold"], [f"{p}above"]),
        helper.make_node("Cast", [f"{p}above"], [mask_name], to=TensorProto.UINT8),
    ]
    return nodes, inits


def _value(name: str, elem_type: int, prefix: str):
    helper = _onnx().helper
    p = f"{prefix}_" if prefix else ""
    return helper.make_tensor_value_info(name, elem_type, ["N", 1, f"{p}D", f"{p}H", f"{p}W"])


def build_test_model(path: str | Path, *, cascade: bool = False, threshold: float = 0.5, scale: float = 1.0,
                     bias: float = 0.0, with_contract: bool = True, spacing=(1.25, 1.25, 1.37),
                     coarse_spacing=(5.0, 5.0, 5.0), contract_fields: dict | None = None,
                     edit_contract=None, pipeline: bool = True, smooth: bool = False,
                     context: str = "pad", margin_mm: float = 15.0, localiser_threshold: float | None = None) -> Path:
    """Write a pointwise heartseg test model (single stage or two-stage cascade) and return its path.

    pipeline: the end-to-end graph heartseg-export writes (what the runtime runs); False: the stages' networks
    side by side (what the Python reference path and per-stage checks run). smooth: stages that see their
    neighbours (see _stage_nodes); context and margin_mm: the final stage's crop context and margin;
    localiser_threshold: the localiser's own (default: threshold).

    contract_fields: further ModelContract fields (plausibility, score_calibration, ...). edit_contract, when
    given, receives the contract's dict form and may change it in place before it is written (to make models
    with bad metadata).
    """
    onnx = _onnx()
    helper, TensorProto = onnx.helper, onnx.TensorProto
    path = Path(path)
    if cascade:
        names = [("coarse", "coarse_image", "coarse_prob", "coarse_mask", coarse_spacing, 0.0, "localiser"),
                 ("fine", "fine_image", "fine_prob", "fine_mask", spacing, margin_mm, "segmenter")]
    else:
        names = [("single", "image", "prob", "mask", spacing, 0.0, "segmenter")]
    nodes, inits, inputs, outputs, stages = [], [], [], [], []
    for stage, input_name, prob_name, mask_name, stage_spacing, margin, role in names:
        prefix = stage if cascade else ""
        stage_nodes, stage_inits = _stage_nodes(prefix, input_name, prob_name, mask_name, scale, bias, threshold,
                                                smooth)
        nodes += stage_nodes
        inits += stage_inits
        inputs.append(_value(input_name, TensorProto.FLOAT, prefix))
        outputs += [_value(prob_name, TensorProto.FLOAT, prefix), _value(mask_name, TensorProto.UINT8, prefix)]
        own = localiser_threshold if role == "localiser" and localiser_threshold is not None else threshold
        stages.append(StageContract(name=stage, spacing=tuple(stage_spacing), patch_size=PATCH, divisor=DIVISOR,
                                    threshold=float(own), crop_margin_mm=margin, input_name=input_name,
                                    prob_name=prob_name, mask_name=mask_name, role=role,
                                    context=context if role == "segmenter" else "pad"))
    graph = helper.make_graph(nodes, "heartseg_pointwise_test", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="heartseg-tests")
    model.ir_version = 8  # readable by every ONNX Runtime >= 1.17
    if with_contract:
        contract = ModelContract(stages=stages, info={"source": "tests/onnx_models.py", "kind": "pointwise"},
                                 **(contract_fields or {}))
        if pipeline:
            from heartseg.export.pipeline_graph import build_pipeline

            model = build_pipeline(model, contract)
            contract = replace(contract, pipeline=True)
        contract_dict = contract.to_dict()
        if edit_contract is not None:
            edit_contract(contract_dict)
        meta = {
            CONTRACT_KEY: json.dumps(contract_dict),
            "heartseg.threshold": f"{threshold:g}",
            "heartseg.stages": ",".join(s.name for s in stages),
            "heartseg.spacing_mm": " x ".join(f"{s:g}" for s in spacing),
            "heartseg.description": f"pointwise test model: sigmoid({scale:g} * x + {bias:g})",
        }
    else:
        meta = {"description": "an ONNX file without the heartseg contract"}
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    stamp_digest(model)  # the weights digest heartseg-export records, checked when the model opens
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def default_affine(spacing=(1.4, 1.2, 1.6)) -> np.ndarray:
    """A RAS affine with the given voxel sizes (not the models' spacing, so that resampling happens)."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = (-30.0, 12.5, -7.0)
    return affine


def ellipsoid_image(shape=(40, 48, 36), seed: int = 0, centre=(0.42, 0.56, 0.6), radii=(0.2, 0.17, 0.2),
                    edge: float = 0.08) -> tuple[np.ndarray, np.ndarray]:
    """A bright off-centre ellipsoid with a soft edge on a noisy background, and its binary label.

    centre and radii are fractions of the array's extent along each axis. The ellipsoid is off-centre
    on purpose: a flipped or permuted axis in the pipeline moves the mask away from the label.
    """
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[(np.arange(n) + 0.5) / n for n in shape], indexing="ij")
    r = np.sqrt(sum(((g - c) / rad) ** 2 for g, c, rad in zip(grids, centre, radii)))
    blob = 1.0 / (1.0 + np.exp(-(1.0 - r) / edge))
    image = 100.0 + 10.0 * rng.standard_normal(shape) + 300.0 * blob
    label = (r <= 1.0).astype(np.uint8)
    return image.astype(np.float32), label


def make_scan(path: str | Path, shape=(40, 48, 36), affine: np.ndarray | None = None, *, seed: int = 0,
              label_path: str | Path | None = None, four_d: bool = False, **blob) -> tuple[Path, Path]:
    """Write a synthetic scan and its label; returns (scan_path, label_path).

    The label goes to label_path, by default a "labels" folder next to the scan with the same file
    name (so folder inputs do not pick it up and --labels DIR pairs it by name). With four_d the scan
    is stored as a 4D image with one volume.
    """
    path = Path(path)
    affine = default_affine() if affine is None else np.asarray(affine, float)
    image, label = ellipsoid_image(shape, seed=seed, **blob)
    label_path = Path(label_path) if label_path is not None else path.parent / "labels" / path.name
    path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    data = image[..., None] if four_d else image
    nib.save(nib.Nifti1Image(data, affine), str(path))
    nib.save(nib.Nifti1Image(label, affine), str(label_path))
    return path, label_path


def rotation_affine(spacing=(1.4, 1.2, 1.6), angles_deg=(20.0, -12.0, 8.0), offset=(5.0, -40.0, 22.0)) -> np.ndarray:
    """An oblique affine: voxel sizes spacing, rotated about x, y and z."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
    affine[:3, 3] = offset
    return affine


def lps_affine(spacing=(1.4, 1.2, 1.6)) -> np.ndarray:
    """An LPS-oriented affine (x and y axes flipped), as DICOM-derived scans often have."""
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = (60.0, 80.0, -20.0)
    return affine
