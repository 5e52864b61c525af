"""The end-to-end graph (export/pipeline_graph.py) against the Python reference pipeline (runtime/inference.py).

Both run the same networks (test models whose stages see their neighbours) on the same synthetic scans; the
graph's mask must match the reference's (Dice >= 0.995, the rule the export enforces on real scans) and its
probabilities and score must be the reference's up to float rounding. The scans exercise each branch of the
pipeline: a localised box, a box grown where the mask reaches its face, a scan small enough to be seen whole, a
single-stage model, nothing found, two components, tiles under a voxel limit, and a stage that sees the scan
around its box.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from heartseg.runtime.image import Volume
from heartseg.runtime.inference import infer_canonical, locate, native_box_to_stage, stage_shape
from heartseg.runtime.metrics import dice_score
from heartseg.runtime.postprocess import mask_from_prob
from heartseg.runtime.preprocess import to_canonical
from heartseg.runtime.qc import Plausibility, soft_dice_score
from heartseg.runtime.session import OnnxSession
from onnx_models import TEST_MODEL_BIAS, build_test_model, default_affine, ellipsoid_image, lps_affine

MIN_AGREEMENT = 0.995
# Learned extents (sorted axes) under which scans of 60 voxels are localised, a scan of 24 voxels at 1.5 mm
# (36 mm) fits the final stage whole, and no box reaches the cap (60 mm + two 15 mm margins, 66-72 voxels).
PLAUSIBLE = Plausibility(volume_ml=(1.0, 100.0), extent_mm=((5.0, 8.0), (5.0, 10.0), (10.0, 60.0)), cases=4)


def _pair(tmp_path: Path, name: str, **options) -> tuple[OnnxSession, OnnxSession]:
    """The reference (the networks side by side) and the pipeline graph of one test model."""
    options = {"bias": TEST_MODEL_BIAS, "smooth": True, **options}
    networks = build_test_model(tmp_path / f"{name}-networks.onnx", pipeline=False, **options)
    graph = build_test_model(tmp_path / f"{name}.onnx", **options)
    return OnnxSession(networks, device="cpu", threads=1), OnnxSession(graph, device="cpu", threads=1)


def _compare(reference: OnnxSession, graph: OnnxSession, volume: Volume, max_voxels: int | None = None,
             atol: float = 2e-4):
    canonical = to_canonical(volume)
    expected = infer_canonical(canonical, reference.contract, reference.predict, max_voxels)
    want = mask_from_prob(expected.prob, reference.contract)
    if max_voxels is not None:
        graph = OnnxSession(graph.path, device="cpu", threads=1, max_voxels=max_voxels)
    got = graph.segment(canonical.data, canonical.spacing)
    assert got.mask.shape == want.shape and got.mask.dtype == np.uint8
    np.testing.assert_allclose(got.prob, expected.prob, atol=atol)
    if want.any():
        assert dice_score(got.mask > 0, want > 0) >= MIN_AGREEMENT
    else:
        assert not got.mask.any()
    assert got.score == pytest.approx(soft_dice_score(expected.prob, want), abs=2e-3)
    return canonical, expected, got


def _volume(shape, affine=None, seed=0, **blob) -> Volume:
    image, _ = ellipsoid_image(shape, seed=seed, **blob)
    return Volume(image, default_affine() if affine is None else affine)


@pytest.mark.parametrize("seed,centre,radii", [
    (0, (0.42, 0.56, 0.6), (0.2, 0.17, 0.2)),
    (1, (0.3, 0.7, 0.45), (0.12, 0.25, 0.15)),
    (2, (0.75, 0.25, 0.5), (0.18, 0.1, 0.3)),
])
def test_a_localised_scan_matches_the_reference(tmp_path: Path, seed, centre, radii) -> None:
    reference, graph = _pair(tmp_path, "cascade", cascade=True, contract_fields={"plausibility": PLAUSIBLE})
    canonical, expected, got = _compare(reference, graph, _volume((60, 64, 50), seed=seed, centre=centre,
                                                                   radii=radii))
    assert expected.box is not None and got.box is not None
    shape = stage_shape(canonical, reference.contract.final_stage)
    scale = np.asarray(canonical.data.shape, float) / np.asarray(shape, float)
    np.testing.assert_allclose(got.box[0], np.asarray(expected.box[0]) * scale, rtol=1e-5)
    np.testing.assert_allclose(got.box[1], np.asarray(expected.box[1]) * scale, rtol=1e-5)


def test_a_box_the_mask_reaches_grows_as_in_the_reference(tmp_path: Path) -> None:
    """A localiser that keeps only the core of the structure, and a 2 mm margin: its box is too tight for the final
    stage's mask."""
    reference, graph = _pair(tmp_path, "tight", cascade=True, margin_mm=2.0, localiser_threshold=0.85)
    volume = _volume((96, 60, 60), seed=3, centre=(0.5, 0.5, 0.5), radii=(0.3, 0.25, 0.25), edge=0.15)
    canonical = to_canonical(volume)
    first = locate(canonical, reference.contract, reference.predict)
    final = reference.contract.final_stage
    located = native_box_to_stage(first, canonical.data.shape, stage_shape(canonical, final), final)
    _, expected, _ = _compare(reference, graph, volume)
    assert not np.array_equal(np.asarray(expected.box[0]), located[0]) or \
        not np.array_equal(np.asarray(expected.box[1]), located[1]), "the box did not grow: the case tests nothing"


def test_a_scan_that_fits_the_final_stage_is_seen_whole(tmp_path: Path) -> None:
    reference, graph = _pair(tmp_path, "cascade", cascade=True, contract_fields={"plausibility": PLAUSIBLE})
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    _, expected, got = _compare(reference, graph, _volume((24, 24, 24), affine, radii=(0.3, 0.3, 0.3)))
    assert expected.box is None and got.box is None


def test_the_final_stage_box_is_capped_by_the_largest_plausible_atrium(tmp_path: Path) -> None:
    """The graph's one rule beyond the reference: no box beyond the largest learned extent plus both margins."""
    small = Plausibility(volume_ml=(1.0, 100.0), extent_mm=((5.0, 8.0), (5.0, 10.0), (10.0, 20.0)), cases=4)
    _, graph = _pair(tmp_path, "capped", cascade=True, contract_fields={"plausibility": small})
    volume = _volume((60, 64, 50), radii=(0.3, 0.3, 0.3))
    canonical = to_canonical(volume)
    out = graph.segment(canonical.data, canonical.spacing)
    final = graph.contract.final_stage
    scale = np.asarray(stage_shape(canonical, final), float) / np.asarray(canonical.data.shape, float)
    size = np.round((out.box[1] - out.box[0]) * scale)
    cap = np.ceil((20.0 + 2 * final.crop_margin_mm) / np.asarray(final.spacing)) // final.divisor * final.divisor
    assert np.all(size <= cap + final.divisor) and np.any(size >= cap)


@pytest.mark.parametrize("affine", [default_affine(), lps_affine()], ids=["ras", "lps"])
def test_a_single_stage_model_matches_the_reference(tmp_path: Path, affine) -> None:
    reference, graph = _pair(tmp_path, "single")
    _compare(reference, graph, _volume((37, 45, 29), affine))


@pytest.mark.parametrize("shape,spacing", [
    ((96, 88, 13), (0.6, 0.7, 4.5)),     # thick slices, fine in-plane: anisotropic both ways of the stage grid
    ((121, 127, 119), (0.4, 0.4, 0.45)),  # very small voxels: every grid far coarser than the scan
    ((17, 19, 15), (4.0, 4.2, 5.0)),      # very large voxels: every grid finer than the scan
    ((11, 9, 7), (1.3, 1.2, 1.4)),        # far smaller than the patch
], ids=["thick-slices", "small-voxels", "large-voxels", "tiny-scan"])
def test_odd_geometries_match_the_reference(tmp_path: Path, shape, spacing) -> None:
    reference, graph = _pair(tmp_path, "cascade", cascade=True, contract_fields={"plausibility": PLAUSIBLE})
    _compare(reference, graph, _volume(shape, np.diag([*spacing, 1.0]), radii=(0.3, 0.3, 0.3)))


def test_a_box_at_the_edge_of_the_scan_matches_the_reference(tmp_path: Path) -> None:
    """The structure touches two faces of the scan: the box leaves the grid and is padded there."""
    reference, graph = _pair(tmp_path, "cascade", cascade=True, contract_fields={"plausibility": PLAUSIBLE})
    canonical, expected, _ = _compare(reference, graph, _volume((64, 60, 52), centre=(0.05, 0.5, 0.93),
                                                                 radii=(0.2, 0.2, 0.2)))
    stage = stage_shape(canonical, reference.contract.final_stage)
    assert expected.box[0][0] == 0 and expected.box[1][2] >= stage[2]


@pytest.mark.data
def test_real_held_out_scans_match_the_reference(data_dir: Path, tmp_path: Path) -> None:
    """The shipped graph against the Python pipeline run with the networks taken out of it, on one held-out scan
    of each dataset (benchmarks/pipeline_parity.py runs all 20)."""
    onnx = pytest.importorskip("onnx")
    from heartseg.export.pipeline_file import unwrap
    from heartseg.export.stamp import write_model
    from heartseg.runtime.formats.nifti import load_volume
    from heartseg.runtime.segmenter import default_model_path

    networks = write_model(unwrap(onnx.load(str(default_model_path()))), tmp_path / "networks.onnx")
    reference = OnnxSession(networks, device="cpu", threads=2)
    graph = OnnxSession(default_model_path(), device="cpu", threads=2)
    lge = data_dir.parent / "LA2018" / "imagesTr" / "1GU15S0GJ6PFNARO469W.nii.gz"
    for scan in [data_dir / "imagesTr" / "la_029.nii.gz", *([lge] if lge.is_file() else [])]:
        # Millions of voxels: the graph's float32 statistics differ from numpy's float64 ones in the last digits.
        _compare(reference, graph, load_volume(scan), atol=2e-3)


def test_nothing_found_is_an_empty_mask(tmp_path: Path) -> None:
    reference, graph = _pair(tmp_path, "cascade", cascade=True)
    noise = np.random.default_rng(5).standard_normal((40, 40, 40)).astype(np.float32)
    _, expected, got = _compare(reference, graph, Volume(noise, default_affine()))
    assert not got.mask.any() and got.score == 0.0


def test_the_larger_of_two_components_is_kept(tmp_path: Path) -> None:
    reference, graph = _pair(tmp_path, "single")
    big, _ = ellipsoid_image((48, 48, 40), seed=6, centre=(0.3, 0.3, 0.5), radii=(0.18, 0.18, 0.2))
    small, _ = ellipsoid_image((48, 48, 40), seed=7, centre=(0.75, 0.75, 0.5), radii=(0.1, 0.1, 0.1))
    image = np.maximum(big, small)
    canonical, _, got = _compare(reference, graph, Volume(image, default_affine()))
    assert got.mask[:24, :24].sum() > 0 and got.mask[30:, 30:].sum() == 0


def test_tiles_under_a_voxel_limit_match_the_reference(tmp_path: Path) -> None:
    reference, graph = _pair(tmp_path, "cascade", cascade=True)
    volume = _volume((70, 64, 58), seed=8, radii=(0.3, 0.3, 0.3))
    whole = graph.segment(to_canonical(volume).data, to_canonical(volume).spacing)
    _, _, tiled = _compare(reference, graph, volume, max_voxels=64 ** 3 - 1)
    assert not np.array_equal(tiled.prob, whole.prob), "no tiles were run: the case tests nothing"


def test_a_stage_that_sees_the_scan_around_its_box_matches_the_reference(tmp_path: Path) -> None:
    reference, graph = _pair(tmp_path, "context", cascade=True, context="scan",
                             contract_fields={"plausibility": PLAUSIBLE})
    _compare(reference, graph, _volume((60, 64, 50), seed=9))


def test_the_whole_graph_runs_on_cuda(tmp_path: Path) -> None:
    """The shipped graph on ONNX Runtime's CUDA provider gives the CPU's mask (Dice >= 0.995)."""
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("ONNX Runtime offers no CUDA provider here (onnxruntime-gpu on a machine with an NVIDIA GPU)")
    from heartseg.runtime.formats.nifti import load_volume
    from heartseg.runtime.segmenter import default_model_path

    volume = load_volume(Path(__file__).parents[1] / "examples" / "la_029_crop.nii.gz")
    canonical = to_canonical(volume)
    cpu = OnnxSession(default_model_path(), device="cpu").segment(canonical.data, canonical.spacing)
    session = OnnxSession(default_model_path(), device="cuda")
    assert session.device == "cuda"
    gpu = session.segment(canonical.data, canonical.spacing)
    assert dice_score(gpu.mask > 0, cpu.mask > 0) >= MIN_AGREEMENT


@pytest.mark.parametrize("wide", [False, True], ids=["float32-labels", "float64-labels"])
def test_the_graphs_largest_component_is_scipys(wide: bool) -> None:
    """The graph's labelling (MaxPool and pointer jumping) keeps what scipy's does, in both label precisions (the
    float64 one runs for regions beyond float32's exact integers)."""
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort
    from heartseg.export.pipeline_graph import Graph, label_largest
    from heartseg.runtime.postprocess import largest_component
    from scipy import ndimage

    g = Graph()
    out = label_largest(g, "fg", None, wide)
    graph = onnx.helper.make_graph(
        g.nodes, "labels", [onnx.helper.make_tensor_value_info("fg", onnx.TensorProto.FLOAT, None)],
        [onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)], initializer=g.constants)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(11)
    for _ in range(3):
        # Many components of every size, spirals and touching diagonals included.
        mask = ndimage.binary_opening(rng.random((30, 26, 22)) > 0.55).astype(np.uint8)
        got = session.run(None, {"fg": mask[None, None].astype(np.float32)})[0][0, 0]
        np.testing.assert_array_equal(got.astype(np.uint8), largest_component(mask))
