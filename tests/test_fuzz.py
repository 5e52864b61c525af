"""Property-based fuzzing of NIfTI headers and contract metadata: every case ends in a mask on the scan's
grid or in exit 2 with one line, never a traceback, never more memory than the budget."""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from heartseg.runtime.cli_infer import app as infer_app
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx_models import build_test_model, ellipsoid_image
from typer.testing import CliRunner

BUDGET_MB = 400
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

DTYPES = [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.float32, np.float64, np.complex64]
ODD_FLOATS = [0.0, -1.0, math.nan, math.inf, -math.inf, 1e-6, 1e6, 1e30]


def _spacing() -> st.SearchStrategy[float]:
    return st.one_of(st.floats(0.3, 4.0), st.sampled_from(ODD_FLOATS))


@st.composite
def nifti_headers(draw) -> dict:
    """A header with arbitrary dims, datatype, pixdims, qform/sform codes and affines, and scaling."""
    ndim = draw(st.sampled_from([2, 3, 3, 3, 4, 5]))
    shape = [draw(st.integers(1, 28)) for _ in range(ndim)]
    if ndim >= 4:
        shape[3] = draw(st.integers(1, 3))
    rotation = draw(st.sampled_from(["diag", "flip", "shear", "singular", "permute"]))
    return {
        "shape": tuple(shape),
        "dtype": draw(st.sampled_from(DTYPES)),
        "pixdim": tuple(draw(_spacing()) for _ in range(3)),
        "affine_spacing": tuple(draw(st.floats(0.5, 3.0)) for _ in range(3)),
        "rotation": rotation,
        "qform_code": draw(st.integers(0, 4)),
        "sform_code": draw(st.integers(0, 4)),
        "slope": draw(st.sampled_from([math.nan, 0.0, 1.0, 2.5, -1.0, 1e30])),
        "inter": draw(st.sampled_from([0.0, 10.0, math.nan])),
        "values": draw(st.sampled_from(["blob", "constant", "nan", "huge"])),
        "truncate": draw(st.booleans()) and draw(st.booleans()),
    }


def _affine(spec: dict) -> np.ndarray:
    affine = np.diag([*spec["affine_spacing"], 1.0])
    if spec["rotation"] == "flip":
        affine[:2] *= -1
        affine[3, 3] = 1.0
    elif spec["rotation"] == "shear":
        affine[0, 1] = 0.7
    elif spec["rotation"] == "singular":
        affine[:3, 2] = 0.0
    elif spec["rotation"] == "permute":
        affine[:3, :3] = affine[:3, :3][[1, 2, 0]]
    affine[:3, 3] = (-20.0, 10.0, 5.0)
    return affine


def write_header_case(spec: dict, path: Path) -> None:
    """Write the case byte by byte, so that nibabel cannot tidy the header on the way out."""
    shape, dtype = spec["shape"], np.dtype(spec["dtype"])
    spatial = tuple(shape[:3]) + (1,) * max(0, 3 - len(shape))
    image, _ = ellipsoid_image(spatial, seed=1)
    data = np.broadcast_to(image.reshape(spatial + (1,) * (len(shape) - 3)) if len(shape) > 3 else
                           image.reshape(shape), shape).astype(np.float64)
    if spec["values"] == "constant":
        data = np.full(shape, 7.0)
    elif spec["values"] == "nan" and dtype.kind in "fc":
        data = data.copy()
        data.flat[0] = np.nan
    elif spec["values"] == "huge":
        data = data * 1e6
    with np.errstate(all="ignore"):
        raw = data.astype(dtype) if dtype.kind in "fc" else np.clip(data, np.iinfo(dtype).min,
                                                                    np.iinfo(dtype).max).astype(dtype)
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    affine = _affine(spec)
    try:
        header.set_qform(affine, code=spec["qform_code"])
    except Exception:
        header.set_qform(np.eye(4), code=spec["qform_code"])
    header.set_sform(affine, code=spec["sform_code"])
    header["pixdim"][1:4] = spec["pixdim"]
    header["scl_slope"], header["scl_inter"] = spec["slope"], spec["inter"]
    header["vox_offset"] = 352
    body = raw.tobytes(order="F")
    if spec["truncate"]:
        body = body[: len(body) // 2]
    path.write_bytes(header.binaryblock + b"\0" * 4 + body)


def check_outcome(result, scan: Path, out: Path, model: Path | None = None) -> None:
    """Exit 0/3 with a mask on the scan's grid, or exit 2 with one 'error:' line; nothing else."""
    assert result.exception is None or isinstance(result.exception, SystemExit), f"{result.exception!r}\n{result.output}"
    assert "Traceback" not in result.output
    mask_path = out / (scan.name.split(".")[0] + "_mask.nii.gz")
    if result.exit_code in (0, 3):
        mask = nib.load(str(mask_path))
        source = nib.load(str(scan))
        assert mask.shape == source.shape[:3]
        np.testing.assert_allclose(mask.affine, source.affine, atol=1e-4)
        assert set(np.unique(np.asarray(mask.dataobj)).tolist()) <= {0, 1}
        return
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}"
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    if model is not None:
        assert str(model) in lines[0] or str(scan) in lines[0] or scan.name in lines[0], lines[0]
    assert not mask_path.exists()


def run_infer(scan: Path, out: Path, model: Path):
    """heartseg-infer in-process with --memory-limit-mb BUDGET_MB; asserts the traced peak stays under it."""
    tracemalloc.start()
    try:
        result = CliRunner().invoke(infer_app, [str(scan), "-o", str(out), "--model", str(model), "--threads", "1",
                                                "--memory-limit-mb", str(BUDGET_MB), "--overwrite"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= BUDGET_MB * 1e6, f"traced peak {peak / 1e6:.0f} MB over the {BUDGET_MB} MB budget"
    return result


@pytest.fixture(scope="module")
def fuzz_models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("fuzz-models")
    return {"single": build_test_model(folder / "single.onnx", bias=-2.0),
            "cascade": build_test_model(folder / "cascade.onnx", cascade=True, bias=-2.0)}


@FUZZ
@given(spec=nifti_headers(), cascade=st.booleans())
def test_fuzzed_headers(tmp_path_factory, fuzz_models, spec: dict, cascade: bool) -> None:
    folder = tmp_path_factory.mktemp("case")
    scan = folder / "scan.nii"
    write_header_case(spec, scan)
    out = folder / "out"
    check_outcome(run_infer(scan, out, fuzz_models["cascade" if cascade else "single"]), scan, out)


HOSTILE = [None, "abc", "", True, 0, -1, 7, -8, 1.5, -1000.0, math.nan, math.inf, 1e9, [], [1, 2], [0, 0, 0],
           [1.25, 1.25, 1.25], [-5, 5, 5], [64, 64, 64], {"a": 1}, "LPS", "XYZ", "RAS", "localiser", "segmenter",
           "coarse_prob", "fine_image", 0.5, 3, 8, 16.0]
FIELDS = ["format_version", "orientation", "normalization", "largest_component", "bytes_per_voxel",
          "max_foreground_fraction", "plausibility", "info", "stages", "score_calibration",
          *[f"stages.{i}.{key}" for i in (0, 1) for key in
            ("name", "role", "spacing", "patch_size", "divisor", "threshold", "crop_margin_mm", "input_name",
             "prob_name", "mask_name")]]


def _apply(edits):
    def edit(contract: dict) -> None:
        for path, value in edits:
            target, keys = contract, path.split(".")
            for key in keys[:-1]:
                target = target[int(key)] if isinstance(target, list) else target[key]
            if isinstance(target, list):
                target[int(keys[-1])] = value
            else:
                target[keys[-1]] = value

    return edit


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(FIELDS), st.sampled_from(HOSTILE)), min_size=1, max_size=3))
def test_fuzzed_contracts(tmp_path_factory, edits) -> None:
    assume(not any(path == "stages" for path, _ in edits[:-1]))  # later edits must still find the stages
    folder = tmp_path_factory.mktemp("contract")
    try:
        model = build_test_model(folder / "m.onnx", cascade=True, bias=-2.0, edit_contract=_apply(edits))
    except (IndexError, KeyError, TypeError):
        assume(False)  # an edit that cannot be applied to the dict (e.g. into a replaced list)
    scan = folder / "scan.nii.gz"
    image, _ = ellipsoid_image((40, 48, 36), seed=3)
    nib.save(nib.Nifti1Image(image, np.diag([1.4, 1.2, 1.6, 1.0])), str(scan))
    out = folder / "out"
    check_outcome(run_infer(scan, out, model), scan, out, model)
