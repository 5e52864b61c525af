"""The Node.js client (web/) gives, voxel for voxel, the mask Python's onnxruntime gives with the same model.

The end-to-end model takes the scan in closest-canonical (RAS+) order, as nibabel's as_closest_canonical lays it
out, and the client must reorient every scan to that order and the mask back to the scan's own. The stand-in
model's mask depends on the position along each axis, so any wrong axis order, flip or memory layout changes it.
The shipped model is the second case; on the bundled example the client's mask is also heartseg-infer's.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from heartseg.runtime.image import voxel_sizes
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from scan_formats import reorient, rotation, write_nifti

REPO_ROOT = Path(__file__).resolve().parents[1]
WEB = REPO_ROOT / "web"
CLIENT = WEB / "segment.mjs"
EXAMPLE = REPO_ROOT / "examples" / "la_029_crop.nii.gz"
SHIPPED_MODEL = REPO_ROOT / "models" / "heartseg-la.onnx"
NODE = shutil.which("node")
CLIENT_TIMEOUT_S = 240

pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed (the Node.js client needs Node.js 20+)"),
    pytest.mark.skipif(not (WEB / "node_modules").is_dir(),
                       reason="web/node_modules is absent (run `npm ci --ignore-scripts` in web/)"),
]

# The scan's axis order and flips in each case, and whether the file is gzipped.
ORIENTATIONS = {
    "as-is": ((0, 1, 2), (False, False, False)),
    "LPS": ((0, 1, 2), (True, True, False)),
    "permuted": ((2, 0, 1), (False, False, False)),
    "permuted-flipped": ((1, 2, 0), (False, True, True)),
}


def build_stand_in_model(path: Path) -> Path:
    """An ONNX model with the end-to-end interface whose mask depends on position along each axis.

    mask = (image > mean) and (x > X/2) and (y < Y/3) and (z > Z/5); probability = sigmoid(image - mean);
    score = spacing . (1, 10, 100), so that spacing in the wrong order changes the score.
    """
    onnx = pytest.importorskip("onnx", reason="onnx is needed to build the stand-in model (pip install onnx)")
    helper, TensorProto = onnx.helper, onnx.TensorProto
    inits = [
        helper.make_tensor("zero", TensorProto.INT64, [], [0]),
        helper.make_tensor("one", TensorProto.INT64, [], [1]),
        helper.make_tensor("weights", TensorProto.FLOAT, [3], [1.0, 10.0, 100.0]),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["mean"], keepdims=0),
        helper.make_node("Greater", ["image", "mean"], ["bright"]),
        helper.make_node("Sub", ["image", "mean"], ["centred"]),
        helper.make_node("Sigmoid", ["centred"], ["probability"]),
        helper.make_node("Shape", ["image"], ["shape"]),
        helper.make_node("Mul", ["spacing", "weights"], ["weighted"]),
        helper.make_node("ReduceSum", ["weighted"], ["score"], keepdims=0),
    ]
    # Per axis: the voxel index along it (broadcast on that axis), compared with a fraction of its length.
    for axis, (compare, fraction) in enumerate((("Greater", 0.5), ("Less", 1 / 3), ("Greater", 0.2))):
        view = [1, 1, 1]
        view[axis] = -1
        inits += [helper.make_tensor(f"axis{axis}", TensorProto.INT64, [], [axis]),
                  helper.make_tensor(f"view{axis}", TensorProto.INT64, [3], view),
                  helper.make_tensor(f"fraction{axis}", TensorProto.FLOAT, [], [fraction])]
        nodes += [
            helper.make_node("Gather", ["shape", f"axis{axis}"], [f"n{axis}"], axis=0),
            helper.make_node("Range", ["zero", f"n{axis}", "one"], [f"index{axis}"]),
            helper.make_node("Cast", [f"index{axis}"], [f"findex{axis}"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", [f"findex{axis}", f"view{axis}"], [f"ramp{axis}"]),
            helper.make_node("Cast", [f"n{axis}"], [f"fn{axis}"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"fn{axis}", f"fraction{axis}"], [f"limit{axis}"]),
            helper.make_node(compare, [f"ramp{axis}", f"limit{axis}"], [f"inside{axis}"]),
        ]
    nodes += [
        helper.make_node("And", ["bright", "inside0"], ["keep0"]),
        helper.make_node("And", ["keep0", "inside1"], ["keep1"]),
        helper.make_node("And", ["keep1", "inside2"], ["keep2"]),
        helper.make_node("Cast", ["keep2"], ["mask"], to=TensorProto.UINT8),
    ]
    grid = ["X", "Y", "Z"]
    graph = helper.make_graph(
        nodes, "heartseg_stand_in",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, grid),
         helper.make_tensor_value_info("spacing", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("mask", TensorProto.UINT8, grid),
         helper.make_tensor_value_info("probability", TensorProto.FLOAT, grid),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, [])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every ONNX Runtime >= 1.17, the Node.js one included
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module", params=["stand-in", "shipped"])
def model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in model, then the shipped model."""
    if request.param == "shipped":
        return SHIPPED_MODEL
    return build_stand_in_model(tmp_path_factory.mktemp("web-model") / "stand_in.onnx")


@pytest.fixture(scope="module")
def example() -> nib.Nifti1Image:
    """The bundled example scan."""
    return nib.load(str(EXAMPLE))


def write_oriented(image: nib.Nifti1Image, orientation: str, path: Path) -> Path:
    """The scan stored with its axes permuted and flipped as ORIENTATIONS says, the world kept in place."""
    order, flips = ORIENTATIONS[orientation]
    data, affine = reorient(np.asarray(image.dataobj), image.affine, order, flips)
    return write_nifti(data, affine, path)


def run_client(*args: object) -> subprocess.CompletedProcess:
    """node web/segment.mjs ARGS, its output captured."""
    return subprocess.run([NODE, str(CLIENT), *(str(a) for a in args)], capture_output=True, text=True,
                          timeout=CLIENT_TIMEOUT_S, stdin=subprocess.DEVNULL)


def python_reference(model_path: Path, scan_path: Path) -> tuple[np.ndarray, float]:
    """(mask on the scan's grid, score) from Python's onnxruntime on the scan's closest-canonical voxels."""
    import onnxruntime as ort

    image = nib.load(str(scan_path))
    canonical = nib.as_closest_canonical(image)
    data = np.ascontiguousarray(canonical.get_fdata(dtype=np.float32))
    spacing = np.asarray(voxel_sizes(canonical.affine), dtype=np.float32)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    mask, score = session.run(["mask", "score"], {"image": data, "spacing": spacing})
    back = ornt_transform(axcodes2ornt("RAS"), io_orientation(image.affine))
    # The mapping back must take the canonical voxels to the scan's own.
    assert np.array_equal(apply_orientation(data, back), image.get_fdata(dtype=np.float32))
    return apply_orientation(mask, back), float(score)


def printed(result: subprocess.CompletedProcess, name: str) -> float:
    """The number the client printed after 'name:'."""
    found = re.search(rf"^{name}: (\S+)", result.stdout, re.MULTILINE)
    assert found, f"no '{name}:' line in the client's output:\n{result.stdout}\n{result.stderr}"
    return float(found.group(1))


@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_client_mask_equals_python(model: Path, example: nib.Nifti1Image, orientation: str, tmp_path: Path) -> None:
    """The mask the client writes equals Python's voxel for voxel, on the input's grid and affine."""
    scan = write_oriented(example, orientation, tmp_path / f"scan_{orientation}.nii.gz")
    out = tmp_path / "mask.nii.gz"
    result = run_client(scan, out, "--model", model)
    assert result.returncode == 0, result.stderr
    expected, score = python_reference(model, scan)
    written = nib.load(str(out))
    assert written.get_data_dtype() == np.uint8
    assert np.array_equal(written.affine, nib.load(str(scan)).affine)
    mask = np.asarray(written.dataobj)
    assert mask.shape == expected.shape
    assert np.array_equal(mask, expected)
    assert 0 < mask.sum() < mask.size
    volume_ml = float(mask.astype(bool).sum()) * abs(np.linalg.det(written.affine[:3, :3])) / 1000
    assert printed(result, "volume") == pytest.approx(volume_ml, abs=0.01)
    assert printed(result, "score") == pytest.approx(score, abs=1e-3)
    assert printed(result, "seconds") > 0


def test_client_agrees_with_heartseg_infer_on_the_example(tmp_path: Path) -> None:
    """The shipped model from JavaScript and from heartseg's own runtime: the same mask on the bundled example."""
    from heartseg.runtime.metrics import dice_score
    from heartseg.runtime.segmenter import Segmenter

    out = tmp_path / "mask.nii.gz"
    result = run_client(EXAMPLE, out, "--model", SHIPPED_MODEL)
    assert result.returncode == 0, result.stderr
    infer = Segmenter(SHIPPED_MODEL, device="cpu", threads=2).predict(str(EXAMPLE))
    mask = np.asarray(nib.load(str(out)).dataobj) > 0
    assert dice_score(mask, infer.mask_array > 0) >= 0.999
    assert printed(result, "volume") == pytest.approx(infer.volume_ml, rel=1e-3)


# Files whose parsing and reorientation the Node.js side must get as nibabel does: (label, writer).
def _crop(image: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """A 50 x 60 x 40 block of the example (unequal sides, so a swapped axis shows) and its affine."""
    data = np.asarray(image.dataobj)[40:90, 30:90, 30:70]
    return data, image.affine @ np.array([[1, 0, 0, 40], [0, 1, 0, 30], [0, 0, 1, 30], [0, 0, 0, 1.0]])


def _oblique(affine: np.ndarray) -> np.ndarray:
    turned = affine.copy()
    turned[:3, :3] = rotation((25.0, -15.0, 35.0)) @ affine[:3, :3]
    return turned


def _save(image: nib.Nifti1Image, path: Path) -> Path:
    nib.save(image, str(path))
    return path


def _qform_only(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    image = nib.Nifti1Image(data, None)
    image.set_qform(affine, code=1)
    image.set_sform(None, code=0)
    return _save(image, path)


def _no_transform(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    image = nib.Nifti1Image(data, None)
    image.header.set_zooms(voxel_sizes(affine))
    image.set_qform(None, code=0)
    image.set_sform(None, code=0)
    return _save(image, path)


def _sform_over_qform(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """sform (code 1) and a different qform (code 2): nibabel takes the sform whatever the codes."""
    image = nib.Nifti1Image(data, None)
    image.set_sform(affine, code=1)
    image.set_qform(np.diag([-2.0, -2.0, 2.0, 1.0]) @ affine, code=2)
    return _save(image, path)


def _nifti2(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    image = nib.Nifti2Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return _save(image, path)


def _scaled_big_endian(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    header = nib.Nifti1Header(endianness=">")
    header.set_data_dtype(np.int16)
    image = nib.Nifti1Image(data.astype(np.int16), affine, header)
    image.header.set_slope_inter(0.37, -12.5)
    return _save(image, path)


def _float64(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    return write_nifti(data.astype(np.float64) / 7.0, affine, path)


LAYOUTS = {
    "lps-permuted": lambda d, a, p: write_nifti(*reorient(d, a, (1, 2, 0), (True, True, False)), p),
    "oblique": lambda d, a, p: write_nifti(d, _oblique(a), p),
    # Axes swapped, a left-handed grid: the qform stores qfac = -1 in pixdim[0].
    "oblique-qform-only": lambda d, a, p: _qform_only(*reorient(d, _oblique(a), (2, 1, 0), (False, False, False)), p),
    "no-transform": _no_transform,
    "sform-over-qform": lambda d, a, p: _sform_over_qform(*reorient(d, a, (0, 2, 1), (False, False, True)), p),
    "nifti2": lambda d, a, p: _nifti2(*reorient(d, a, (2, 0, 1), (True, False, True)), p),
    "int16-scaled-big-endian": _scaled_big_endian,
    "float64": _float64,
}

CANONICAL_SCRIPT = """
import fs from 'node:fs';
import { parseNifti } from '%(web)s/lib/nifti.mjs';
import { canonicalMapping, toCanonical } from '%(web)s/lib/orient.mjs';
const [scanPath, rawPath] = process.argv.slice(1);
const scan = parseNifti(fs.readFileSync(scanPath));
const mapping = canonicalMapping(scan.affine, scan.dims);
fs.writeFileSync(rawPath, toCanonical(scan.voxels, mapping));
console.log(JSON.stringify({ dims: scan.dims, affine: scan.affine, shape: mapping.shape, spacing: mapping.spacing,
                             canonicalAffine: mapping.affine }));
"""


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_canonical_voxels_equal_nibabel(example: nib.Nifti1Image, layout: str, tmp_path: Path) -> None:
    """web/lib parses the file and lays out its canonical voxels in C order exactly as nibabel does."""
    data, affine = _crop(example)
    scan = LAYOUTS[layout](data, affine, tmp_path / f"{layout}.nii")
    raw = tmp_path / "canonical.f32"
    script = CANONICAL_SCRIPT % {"web": WEB.as_posix()}
    done = subprocess.run([NODE, "--input-type=module", "-e", script, str(scan), str(raw)], capture_output=True,
                          text=True, timeout=CLIENT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    image = nib.load(str(scan))
    canonical = nib.as_closest_canonical(image)
    expected = canonical.get_fdata(dtype=np.float32)
    assert found["dims"] == list(image.shape[:3])
    np.testing.assert_allclose(found["affine"], image.affine, rtol=1e-6, atol=1e-4)
    assert found["shape"] == list(expected.shape)
    np.testing.assert_allclose(found["canonicalAffine"], canonical.affine, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(found["spacing"], voxel_sizes(canonical.affine), rtol=1e-6)
    voxels = np.fromfile(raw, dtype="<f4").reshape(expected.shape)  # C order, z fastest
    assert np.array_equal(voxels, expected)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_client_keeps_header_transforms(model: Path, example: nib.Nifti1Image, layout: str, tmp_path: Path) -> None:
    """Whatever the header's transforms, the mask equals Python's and keeps the scan's sform and qform.

    A NIfTI-2 scan gets a NIfTI-1 mask: its transforms are stored as float32, so they agree to float32 precision.
    """
    data, affine = _crop(example)
    scan = LAYOUTS[layout](data, affine, tmp_path / f"{layout}.nii")
    out = tmp_path / "mask.nii.gz"
    result = run_client(scan, out, "--model", model)
    assert result.returncode == 0, result.stderr
    source, written = nib.load(str(scan)), nib.load(str(out))
    assert type(written) is nib.Nifti1Image and written.shape == source.shape[:3]
    exact = not isinstance(source, nib.Nifti2Image)  # a Nifti2Image is a Nifti1Image too
    for name in ("sform_code", "qform_code"):
        assert int(written.header[name]) == int(source.header[name])
    for get in ("get_best_affine", "get_sform", "get_qform"):
        found, expected = getattr(written.header, get)(), getattr(source.header, get)()
        if exact:
            assert np.array_equal(found, expected), get
        else:
            np.testing.assert_allclose(found, expected, rtol=1e-6, atol=1e-4, err_msg=get)
    mask, _ = python_reference(model, scan)
    assert np.array_equal(np.asarray(written.dataobj), mask)
    assert 0 < mask.sum() < mask.size


ORIENTATION_SCRIPT = """
import { ioOrientation } from '%(web)s/lib/orient.mjs';
let text = '';
for await (const chunk of process.stdin) text += chunk;
console.log(JSON.stringify(JSON.parse(text).map(ioOrientation)));
"""


def _random_affines(count: int) -> list[np.ndarray]:
    """Affines with random rotations, voxel sizes, shears, axis orders and flips (seeded)."""
    rng = np.random.default_rng(7)
    affines = []
    for _ in range(count):
        linear = rotation(tuple(rng.uniform(-180, 180, 3))) @ np.diag(rng.uniform(0.3, 5.0, 3))
        linear = linear @ (np.eye(3) + np.triu(rng.normal(scale=0.2, size=(3, 3)), 1))
        linear = linear[:, rng.permutation(3)] * rng.choice([-1, 1], 3)
        affine = np.eye(4)
        affine[:3, :3], affine[:3, 3] = linear, rng.normal(scale=100, size=3)
        affines.append(affine)
    return affines


def test_io_orientation_equals_nibabel() -> None:
    """web/lib/orient.mjs matches each array axis to the world axis nibabel's io_orientation does."""
    affines = _random_affines(300)
    script = ORIENTATION_SCRIPT % {"web": WEB.as_posix()}
    done = subprocess.run([NODE, "--input-type=module", "-e", script], input=json.dumps([a.tolist() for a in affines]),
                          capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    expected = [io_orientation(affine).astype(int).tolist() for affine in affines]
    assert found == expected


def _bad_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """Files the client must refuse, each with a word its message must hold."""
    affine = np.diag([1.25, 1.25, 1.37, 1.0])
    text = folder / "notes.nii.gz"
    text.write_text("these are not voxels\n")
    noise = np.random.default_rng(0).normal(size=(12, 10, 8)).astype(np.float32)
    return {
        "not-nifti": (text, "not a NIfTI"),
        "4-D": (_save(nib.Nifti1Image(np.stack([noise, noise], axis=3), affine), folder / "series.nii.gz"), "4-D"),
        "2-D": (_save(nib.Nifti1Image(noise[:, :, 0], affine), folder / "slice.nii.gz"), "2-D"),
        "complex": (_save(nib.Nifti1Image(noise.astype(np.complex64), affine), folder / "complex.nii"),
                    "unsupported data type"),
    }


@pytest.mark.parametrize("case", ["not-nifti", "4-D", "2-D", "complex"])
def test_bad_input_exits_2(case: str, tmp_path: Path) -> None:
    """A file that is not one 3-D NIfTI volume: exit 2, one 'error:' line naming it, no output file."""
    path, words = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out" / "mask.nii.gz"
    out.parent.mkdir()
    result = run_client(path, out)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), result.stderr
    assert words in lines[0]
    assert list(out.parent.iterdir()) == []


def test_model_without_image_input_exits_2(tmp_path: Path) -> None:
    """A model without the end-to-end interface (the per-stage cascade file): exit 2 and a one-line reason."""
    onnx = pytest.importorskip("onnx", reason="onnx is needed to build the test model (pip install onnx)")
    helper, TensorProto = onnx.helper, onnx.TensorProto
    graph = helper.make_graph([helper.make_node("Identity", ["fine_image"], ["fine_prob"])], "per_stage",
                              [helper.make_tensor_value_info("fine_image", TensorProto.FLOAT, ["N", 1, "D", "H", "W"])],
                              [helper.make_tensor_value_info("fine_prob", TensorProto.FLOAT, ["N", 1, "D", "H", "W"])])
    model = tmp_path / "per_stage.onnx"
    per_stage = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    per_stage.ir_version = 8
    onnx.save(per_stage, str(model))
    out = tmp_path / "mask.nii.gz"
    result = run_client(EXAMPLE, out, "--model", model)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith(f"error: model {model}: not the end-to-end heartseg model")
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_existing_output_kept_without_overwrite(model: Path, tmp_path: Path) -> None:
    """An existing output is left as it was unless --overwrite is given."""
    out = tmp_path / "mask.nii.gz"
    out.write_bytes(b"earlier result")
    refused = run_client(EXAMPLE, out, "--model", model)
    assert refused.returncode == 2 and "--overwrite" in refused.stderr
    assert out.read_bytes() == b"earlier result"
    replaced = run_client(EXAMPLE, out, "--model", model, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert nib.load(str(out)).shape == nib.load(str(EXAMPLE)).shape
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz"]
