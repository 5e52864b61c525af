"""Property-based fuzzing of NIfTI headers and contract metadata: every case ends in a mask on the scan's
grid or in exit 2 with one line, never a traceback, never more memory than the budget."""

from __future__ import annotations

import bz2
import gzip
import math
import os
import sys
import tracemalloc
import warnings
import zipfile
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from heartseg.runtime.cli_infer import app as infer_app
from heartseg.runtime.errors import InputError
from heartseg.runtime.formats.nifti import load_volume
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx_models import build_test_model, ellipsoid_image
from scan_formats import (
    dicom_bytes,
    dicom_trailing_padding,
    write_dicom_series,
    write_mha_text,
    write_nrrd_text,
    write_zeros,
)
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
    """heartseg-infer in-process with BUDGET_MB beside what the test process already holds (its resident size
    depends on the tests that ran before); asserts the traced peak of its allocations stays under BUDGET_MB."""
    from heartseg.runtime.memory import MB, current_rss

    limit = current_rss() / MB + BUDGET_MB
    tracemalloc.start()
    try:
        result = CliRunner().invoke(infer_app, [str(scan), "-o", str(out), "--model", str(model), "--threads", "1",
                                                "--memory-limit-mb", f"{limit:.0f}", "--overwrite"])
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


# --- NIfTI-2 headers, read directly ---------------------------------------------------------------

HOSTILE_DIMS = [0, -1, 1, 30000]
HOSTILE_SPACINGS = [0.0, -0.0, -1.0, -2.5, -1e-9, math.nan, math.inf, -math.inf, 1e-6, 1e30]


@st.composite
def _with_one_hostile(draw, values: list, hostile: list) -> list:
    """values, with (half of the time) one of them replaced by a hostile value."""
    values = list(values)
    if draw(st.booleans()):
        values[draw(st.integers(0, len(values) - 1))] = draw(st.sampled_from(hostile))
    return values


@st.composite
def nifti2_headers(draw) -> dict:
    """A NIfTI-2 (or, for comparison, NIfTI-1) header with random dims, voxel sizes (0 and negatives
    included), qform/sform codes and pixdim[0] (qfac), over voxel data that may be truncated."""
    ndim = draw(st.sampled_from([3, 3, 3, 3, 4, 4, 2, 5, 0, 8]))
    dims = [draw(st.integers(2, 12)) for _ in range(3)] + [draw(st.integers(1, 3))] + [1, 1, 1]
    return {
        "header": draw(st.sampled_from([nib.Nifti2Header, nib.Nifti2Header, nib.Nifti1Header])),
        "endian": draw(st.sampled_from(["<", ">"])),
        "ndim": ndim,
        "dims": draw(_with_one_hostile(dims[: max(1, min(ndim, 7))], HOSTILE_DIMS)) + dims[max(1, min(ndim, 7)):],
        "dtype": draw(st.sampled_from([np.uint8, np.int16, np.float32, np.float64])),
        "pixdim": tuple(draw(_with_one_hostile([draw(st.floats(0.3, 4.0)) for _ in range(3)], HOSTILE_SPACINGS))),
        "qfac": draw(st.sampled_from([1.0, -1.0, 0.0, math.nan])),
        "qform_code": draw(st.sampled_from([0, 0, 1, 2, 3, 4, 5, -1])),
        "sform_code": draw(st.sampled_from([0, 0, 1, 2, 3, 4, 5, -1])),
        "affine": draw(st.sampled_from(["none", "diag", "diag", "shear", "singular", "nan"])),
        "gz": draw(st.booleans()),
        "truncate": draw(st.booleans()) and draw(st.booleans()),
    }


def write_nifti2_case(spec: dict, path: Path) -> None:
    """Write the header's bytes as drawn (nibabel's setters would tidy them), then the voxels."""
    header = spec["header"](endianness=spec["endian"])
    header.set_data_dtype(spec["dtype"])
    header["dim"][0] = spec["ndim"]
    header["dim"][1:8] = spec["dims"]
    header["pixdim"][0] = spec["qfac"]
    header["pixdim"][1:4] = spec["pixdim"]
    header["qform_code"], header["sform_code"] = spec["qform_code"], spec["sform_code"]
    if spec["affine"] != "none":
        affine = np.diag([1.5, 1.25, 2.0, 1.0])
        if spec["affine"] == "shear":
            affine[0, 1] = 0.7
        elif spec["affine"] == "singular":
            affine[:3, 2] = 0.0
        elif spec["affine"] == "nan":
            affine[1, 1] = math.nan
        header["srow_x"], header["srow_y"], header["srow_z"] = affine[:3]
        header["quatern_b"], header["quatern_c"], header["quatern_d"] = 0.0, 0.0, 0.0
    header["vox_offset"] = header.single_vox_offset
    count = int(np.prod([max(d, 0) for d in spec["dims"][: max(0, min(spec["ndim"], 7))]], dtype=np.int64))
    body = np.random.default_rng(0).uniform(0, 100, min(count, 1 << 18))
    body = body.astype(np.dtype(spec["dtype"]).newbyteorder(spec["endian"])).tobytes()
    if spec["truncate"]:
        body = body[: len(body) // 2]
    raw = header.binaryblock + b"\0" * 4 + body
    path.write_bytes(gzip.compress(raw, compresslevel=1) if spec["gz"] else raw)


@settings(FUZZ, max_examples=400)  # reading a header is fast; the hostile combinations are rare
@given(spec=nifti2_headers())
def test_fuzzed_nifti2_headers_are_read_or_refused(tmp_path_factory, spec: dict) -> None:
    """The reader reads the scan or raises InputError; it never accepts a stored voxel size <= 0."""
    folder = tmp_path_factory.mktemp("nifti2")
    scan = folder / ("scan.nii.gz" if spec["gz"] else "scan.nii")
    write_nifti2_case(spec, scan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            volume = load_volume(scan)
        except InputError as exc:
            assert str(scan) in str(exc), str(exc)
            return
    stored = spec["pixdim"][: min(spec["ndim"], 3)]
    assert all(math.isfinite(v) and v > 0 for v in stored), f"accepted stored voxel sizes {stored}"
    assert all(math.isfinite(s) and s > 0 for s in volume.spacing), volume.spacing
    assert volume.data.ndim == 3 and np.all(np.isfinite(volume.data))


@FUZZ
@given(spec=nifti2_headers(), cascade=st.booleans())
def test_fuzzed_nifti2_headers_through_the_cli(tmp_path_factory, fuzz_models, spec: dict, cascade: bool) -> None:
    folder = tmp_path_factory.mktemp("nifti2-cli")
    scan = folder / ("scan.nii.gz" if spec["gz"] else "scan.nii")
    write_nifti2_case(spec, scan)
    out = folder / "out"
    result = run_infer(scan, out, fuzz_models["cascade" if cascade else "single"])
    check_outcome(result, scan, out)
    stored = spec["pixdim"][: min(spec["ndim"], 3)]
    assert result.exit_code == 2 or all(math.isfinite(v) and v > 0 for v in stored), f"accepted {stored}"


# --- NRRD and MetaImage headers, DICOM zips: read directly ---------------------------------------------------

# Traced peak of reading one fuzzed scan: its real voxels take a few KB, while its header may declare terabytes and
# its compressed data inflate to tens of MB.
READ_PEAK_MB = 48
HOSTILE_SIZES = [0, -3, 100_000, 10**9, 2**40]
SECRET_BYTE = 77  # every byte of the file kept outside each case's folder
NRRD_TYPES = {"u1": "uint8", "i2": "int16", "f4": "float", "f8": "double"}
MHA_TYPES = {"u1": "MET_UCHAR", "i2": "MET_SHORT", "f4": "MET_FLOAT", "f8": "MET_DOUBLE"}


@st.composite
def voxel_specs(draw) -> dict:
    """How a NRRD or MetaImage case stores its voxels: shape (one axis may be hostile), type, byte order, encoding,
    how much data there is, bytes or lines to skip before it, where its data file lies, and the voxel spacing."""
    shape = [draw(st.integers(2, 9)) for _ in range(3)]
    if draw(st.booleans()) and draw(st.booleans()):
        shape[draw(st.integers(0, 2))] = draw(st.sampled_from(HOSTILE_SIZES))
    return {
        "ndim": draw(st.sampled_from([3, 3, 3, 3, 2, 4])),
        "shape": shape,
        "dtype": draw(st.sampled_from(list(NRRD_TYPES))),
        "big_endian": draw(st.booleans()),
        "encoding": draw(st.sampled_from(["raw", "raw", "gzip", "bzip2", "text", "lzma"])),
        "data": draw(st.sampled_from(["exact", "exact", "exact", "short", "long", "bomb", "garbage"])),
        "skip": draw(st.sampled_from([0, 0, 0, 5, -1, -2])),
        "lines": draw(st.sampled_from([0, 0, 0, 2, 10**12])),
        "place": draw(st.sampled_from(["attached", "attached", "beside", "below", "parent", "absolute", "missing"])),
        "spacing": draw(st.sampled_from([1.25, 1.25, 0.7, 0.0, math.nan, -1.0])),
    }


def _true_voxels(spec: dict) -> np.ndarray | None:
    """The voxels a valid case holds (values 0-99 of its type and byte order), None for a hostile shape."""
    shape = spec["shape"][: spec["ndim"]] + [1] * max(0, spec["ndim"] - 3)
    if min(shape) < 1 or np.prod(shape, dtype=float) > 1e6:
        return None
    dtype = np.dtype(spec["dtype"]).newbyteorder(">" if spec["big_endian"] else "<")
    return np.random.default_rng(2).integers(0, 100, shape).astype(dtype)


def _encode(spec: dict, voxels: np.ndarray | None, zlib_container: str) -> bytes:
    """The stored data: the voxels (or 64 random bytes for a hostile shape) in the case's encoding and amount."""
    raw = voxels.tobytes(order="F") if voxels is not None else np.random.default_rng(3).bytes(64)
    kind, encoding = spec["data"], spec["encoding"]
    if kind == "short":
        raw = raw[: len(raw) // 2]
    elif kind == "long":
        raw += bytes(3_000_000 if encoding == "raw" else 100)
    elif kind == "bomb":
        raw += bytes(30_000_000)
    if spec["skip"] > 0:
        raw = b"s" * spec["skip"] + raw
    if encoding == "text":
        values = voxels.ravel(order="F") if voxels is not None else np.arange(10)
        text = (" ".join(repr(v.item()) for v in values) + "\n").encode()
        return b"s" * max(spec["skip"], 0) + text
    if kind == "garbage":
        return np.random.default_rng(4).bytes(len(raw))
    if encoding == "gzip":
        return zlib.compress(raw, 1, wbits=31 if zlib_container == "gzip" else 15)
    if encoding == "bzip2":
        return bz2.compress(raw, 1)
    return raw  # raw, or lzma, which neither format reads


def _read_back(spec: dict, voxels: np.ndarray | None, stored: bytes, uncompressed: bool,
               prefix: int = 0) -> np.ndarray | None:
    """The voxels a read that succeeds gives back: the case's own, or for uncompressed binary data, the bytes where
    the header says the voxels are (random bytes, the zeros after the voxels with byte skip -1, the first of many)."""
    shape = spec["shape"][: spec["ndim"]] + [1] * max(0, spec["ndim"] - 3)
    if not uncompressed or min(shape) < 1:
        return voxels
    dtype = np.dtype(spec["dtype"]).newbyteorder(">" if spec["big_endian"] else "<")
    count = math.prod(shape) * dtype.itemsize
    start = len(stored) - count if spec["skip"] == -1 else prefix + spec["skip"]
    if start < 0 or start + count > len(stored):  # too short to be read
        return voxels
    return np.frombuffer(stored[start : start + count], dtype).reshape(shape, order="F")


def _place_data(spec: dict, case: Path, folder: Path, stored: bytes, suffix: str) -> str | None:
    """Write the data where the case puts it; the name its header gives (None: attached, or MetaImage's LOCAL)."""
    secret = case / f"secret{suffix}"
    secret.write_bytes(bytes([SECRET_BYTE]) * max(len(stored), 1))
    place = spec["place"]
    if place == "attached":
        return None
    names = {"beside": f"scan{suffix}", "below": f"data/scan{suffix}", "parent": f"../secret{suffix}",
             "absolute": str(secret), "missing": f"gone{suffix}"}
    if place in ("beside", "below"):
        (folder / names[place]).parent.mkdir(parents=True, exist_ok=True)
        (folder / names[place]).write_bytes(stored)
    return names[place]


def write_nrrd_case(spec: dict, case: Path) -> tuple[Path, np.ndarray | None]:
    """A NRRD file (or a detached .nhdr) of the case; the voxels a read must give back if it succeeds."""
    voxels = _true_voxels(spec)
    stored = _encode(spec, voxels, "gzip")
    lines = b"first line\nsecond\n" if spec["lines"] == 2 else b""
    stored = lines + stored
    folder = case / "scans"
    folder.mkdir(parents=True)
    data_file = _place_data(spec, case, folder, stored, ".raw")
    sizes = spec["shape"][: spec["ndim"]] + [1] * max(0, spec["ndim"] - 3)
    direction = [[spec["spacing"] if i == j else 0.0 for j in range(3)] for i in range(3)]
    fields = {"type": NRRD_TYPES[spec["dtype"]], "dimension": str(len(sizes)), "space": "left-posterior-superior",
              "sizes": " ".join(map(str, sizes)), "endian": "big" if spec["big_endian"] else "little",
              "encoding": {"text": "ascii"}.get(spec["encoding"], spec["encoding"]),
              "space directions": " ".join("(" + ",".join(map(repr, row)) + ")" for row in direction)
              + " none" * max(0, len(sizes) - 3)}
    if spec["skip"]:
        fields["byte skip"] = str(spec["skip"])
    if spec["lines"]:
        fields["line skip"] = str(spec["lines"])
    if data_file is not None:
        fields["data file"] = data_file
    return (write_nrrd_text(folder / ("scan.nhdr" if data_file else "scan.nrrd"), fields, stored),
            _read_back(spec, voxels, stored, spec["encoding"] == "raw", len(lines)))


def write_mha_case(spec: dict, case: Path) -> tuple[Path, np.ndarray | None]:
    """A MetaImage file (or a detached .mhd) of the case; the voxels a read must give back if it succeeds."""
    voxels = _true_voxels(spec)
    # MetaImage's HeaderSize (a detached file's bytes before the voxels, or -1: the voxels end the file).
    spec = {**spec, "skip": spec["skip"] if spec["place"] != "attached" and spec["skip"] >= -1 else 0}
    stored = _encode(spec, voxels, "zlib")
    folder = case / "scans"
    folder.mkdir(parents=True)
    data_file = _place_data(spec, case, folder, stored, ".raw")
    sizes = spec["shape"][: spec["ndim"]] + [1] * max(0, spec["ndim"] - 3)
    fields = {"ObjectType": "Image", "NDims": str(len(sizes)), "DimSize": " ".join(map(str, sizes)),
              "ElementType": MHA_TYPES[spec["dtype"]], "BinaryData": str(spec["encoding"] != "text"),
              "BinaryDataByteOrderMSB": str(spec["big_endian"]),
              "CompressedData": str(spec["encoding"] in ("gzip", "bzip2")),
              "ElementSpacing": " ".join([repr(spec["spacing"])] * len(sizes)),
              "TransformMatrix": " ".join("1" if i % (len(sizes) + 1) == 0 else "0" for i in range(len(sizes) ** 2)),
              "ElementDataFile": data_file or "LOCAL"}
    if spec["skip"]:
        fields["HeaderSize"] = str(spec["skip"])
    return (write_mha_text(folder / ("scan.mhd" if data_file else "scan.mha"), fields,
                           stored if data_file is None else b""),
            _read_back(spec, voxels, stored, spec["encoding"] in ("raw", "lzma")))  # MetaImage has no lzma


# While a fuzzed read runs, the paths it opens or links to (an audit hook sees every open() and os.symlink()).
OPENED: list[list[str]] = []


def _record_opens(event: str, args: tuple) -> None:
    if OPENED and event in ("open", "os.symlink") and args and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED[-1].append(os.fsdecode(args[0]))


def read_traced(path: Path):
    """Read the scan at path: (the scan or the InputError it raises, the paths opened meanwhile); asserts the traced
    peak stays under READ_PEAK_MB."""
    from heartseg.runtime.formats import discover_sources, read_scan

    if not getattr(read_traced, "hooked", False):
        sys.addaudithook(_record_opens)
        read_traced.hooked = True  # type: ignore[attr-defined]
    OPENED.append([])
    tracemalloc.start()
    try:
        try:
            outcome = read_scan(discover_sources([path])[0])
        except InputError as exc:
            outcome = exc
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        opened = OPENED.pop()
    assert peak <= READ_PEAK_MB * 1e6, f"traced peak {peak / 1e6:.0f} MB over {READ_PEAK_MB} MB"
    return outcome, opened


def check_read(spec: dict, path: Path, voxels: np.ndarray | None) -> None:
    """A read gives back exactly the case's voxels, or an InputError naming the file; the file outside the case's
    folder is never opened."""
    outcome, opened = read_traced(path)
    secret = next(path.parents[1].glob("secret*")).resolve()
    assert not [p for p in opened if Path(p).resolve() == secret], f"opened {secret}"
    if isinstance(outcome, InputError):
        assert str(path) in str(outcome), str(outcome)
        return
    assert spec["place"] not in ("parent", "absolute", "missing"), "read a data file it should have refused"
    assert voxels is not None, f"read a volume from hostile sizes {spec['shape']}"
    np.testing.assert_array_equal(outcome.volume.data, voxels.reshape(outcome.volume.shape).astype(np.float32))


@FUZZ
@given(spec=voxel_specs())
def test_fuzzed_nrrd_is_read_or_refused(tmp_path_factory, spec: dict) -> None:
    pytest.importorskip("nrrd")
    path, voxels = write_nrrd_case(spec, tmp_path_factory.mktemp("nrrd"))
    check_read(spec, path, voxels)


@FUZZ
@given(spec=voxel_specs())
def test_fuzzed_metaimage_is_read_or_refused(tmp_path_factory, spec: dict) -> None:
    pytest.importorskip("SimpleITK")
    path, voxels = write_mha_case(spec, tmp_path_factory.mktemp("mha"))
    check_read(spec, path, voxels)


@st.composite
def zip_specs(draw) -> dict:
    """A zipped DICOM series and what is done to it: compression, one slice's trailing padding (up to a zip bomb),
    a non-DICOM member, a slice cut short, a slice that claims a larger grid, member names."""
    return {
        "slices": draw(st.integers(1, 4)),
        "compression": draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                                             zipfile.ZIP_LZMA])),
        "padding": draw(st.sampled_from([0, 0, 1000, 3_000_000, 6_000_000, 60_000_000])),
        "junk": draw(st.sampled_from([0, 0, 10, 6_000_000])),
        "cut": draw(st.sampled_from([None, None, 10, 200, 700, 1000])),
        "large_grid": draw(st.booleans()) and draw(st.booleans()),
        "names": draw(st.sampled_from(["IM{}.dcm", "../up/IM{}.dcm", "/abs/IM{}", "sub/IM{}", "IM{}"])),
    }


def write_zip_case(spec: dict, case: Path) -> tuple[Path, list[np.ndarray]]:
    """The zip of the case, and the volumes a read may give back if it succeeds: the series, or (with a slice cut
    short, which may no longer be DICOM at all) the series without that slice."""
    pydicom = pytest.importorskip("pydicom")
    data = np.random.default_rng(5).integers(0, 100, (6, 7, spec["slices"])).astype(np.float32)
    files = sorted(write_dicom_series(data, np.diag([1.25, 1.25, 1.37, 1.0]), case / "src"))
    members = {spec["names"].format(i): file.read_bytes() for i, file in enumerate(files)}
    names = list(members)
    expected = [np.round(data)]
    if spec["cut"] is not None and len(names) > 1:
        members[names[1]] = members[names[1]][: spec["cut"]]
        cut_slice = round(float(pydicom.dcmread(str(files[1])).ImagePositionPatient[2]) / 1.37)
        expected.append(np.delete(expected[0], cut_slice, axis=2))
    if spec["large_grid"]:
        ds = pydicom.dcmread(str(files[-1]))
        ds.Rows = ds.Columns = 4000
        members[names[-1]] = dicom_bytes(ds)
    path = case / "series.zip"
    with zipfile.ZipFile(path, "w", spec["compression"]) as archive:
        for name, content in members.items():
            with archive.open(name, "w", force_zip64=True) as handle:
                handle.write(content)
                if spec["padding"] and name == names[0]:
                    handle.write(dicom_trailing_padding(spec["padding"]))
                    write_zeros(handle, spec["padding"])
        if spec["junk"]:
            with archive.open("junk.bin", "w", force_zip64=True) as handle:
                write_zeros(handle, spec["junk"])
    return path, expected


@FUZZ
@given(spec=zip_specs())
def test_fuzzed_dicom_zip_is_read_or_refused(tmp_path_factory, spec: dict) -> None:
    """Each member is read whole only when its size fits its slice: the traced peak stays small whatever it inflates
    to; a zip that reads gives back the series' voxels."""
    path, expected = write_zip_case(spec, tmp_path_factory.mktemp("zip"))
    outcome, _ = read_traced(path)
    if isinstance(outcome, InputError):
        assert str(path) in str(outcome), str(outcome)
        return
    assert spec["padding"] <= 4_000_000, "read a member far larger than its slice"
    data = outcome.volume.data
    assert any(data.shape == e.shape and np.array_equal(data, e) for e in expected), data.shape
