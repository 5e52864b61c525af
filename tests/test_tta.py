"""Test-time flips: mirrored copies are mirrored back, so a pointwise model gives the plain mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from heartseg.runtime.formats.nifti import load_volume
from heartseg.runtime.inference import infer_canonical
from heartseg.runtime.preprocess import to_canonical
from heartseg.runtime.segmenter import Segmenter
from heartseg.runtime.tta import infer_canonical_tta
from onnx_models import lps_affine, make_scan


def test_tta_gives_the_plain_mask_with_a_pointwise_model(any_model: Path, tmp_path: Path) -> None:
    scan, label = make_scan(tmp_path / "s.nii.gz", affine=lps_affine())
    volume = load_volume(scan)
    plain = Segmenter(any_model, device="cpu", threads=1).segment(volume, keep_prob=True)
    flipped = Segmenter(any_model, device="cpu", threads=1, tta=True).segment(volume, keep_prob=True)
    assert plain.mask.any()
    assert np.array_equal(plain.mask, flipped.mask)
    np.testing.assert_allclose(flipped.prob, plain.prob, atol=1e-4)
    assert flipped.network_calls == 4 * plain.network_calls
    assert flipped.report is not None and flipped.report.verdict == plain.report.verdict


def test_flips_are_undone(single_model: Path, tmp_path: Path) -> None:
    """A predictor that marks one corner voxel of whatever it sees: averaged over 4 copies, each mirrored
    copy's mark must land in a different corner of the original grid, not all in the same one."""
    scan, _ = make_scan(tmp_path / "s.nii.gz", shape=(24, 32, 16), affine=np.diag([1.25, 1.25, 1.37, 1.0]))
    segmenter = Segmenter(single_model, device="cpu", threads=1)
    canonical = to_canonical(load_volume(scan))

    def corner(stage: str, batch: np.ndarray) -> np.ndarray:
        out = np.zeros_like(batch)
        out[..., 0, 0, 0] = 1.0
        return out

    plain = infer_canonical(canonical, segmenter.contract, corner).prob
    assert plain[0, 0, 0] == pytest.approx(1.0)
    averaged = infer_canonical_tta(canonical, segmenter.contract, corner).prob
    assert averaged[0, 0, 0] == pytest.approx(0.25)
    assert averaged[-1, 0, 0] == pytest.approx(0.25)
    assert averaged[0, -1, 0] == pytest.approx(0.25)
    assert averaged[0, 0, -1] == pytest.approx(0.25)
    assert averaged.sum() == pytest.approx(1.0)


def test_a_plain_result_the_caller_has_is_not_inferred_again(single_model: Path, tmp_path: Path) -> None:
    scan, _ = make_scan(tmp_path / "s.nii.gz", shape=(24, 32, 16), affine=np.diag([1.25, 1.25, 1.37, 1.0]))
    contract = Segmenter(single_model, device="cpu", threads=1).contract
    canonical = to_canonical(load_volume(scan))
    calls = []

    def corner(stage: str, batch: np.ndarray) -> np.ndarray:
        calls.append(stage)
        out = np.zeros_like(batch)
        out[..., 0, 0, 0] = 1.0
        return out

    plain = infer_canonical(canonical, contract, corner)
    per_copy = len(calls)
    again = infer_canonical_tta(canonical, contract, corner).prob
    assert len(calls) == 5 * per_copy
    reused = infer_canonical_tta(canonical, contract, corner, plain=plain).prob
    assert len(calls) == 8 * per_copy  # the three mirrored copies only
    np.testing.assert_array_equal(reused, again)
