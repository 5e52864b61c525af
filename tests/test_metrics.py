"""Tests for heartseg.runtime.metrics on small hand-checked masks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from heartseg.runtime.metrics import (
    SegmentationMetrics,
    compute_metrics,
    degenerate_reason,
    foreground_fraction,
    summarize,
)

SPACING = (1.0, 2.0, 3.0)


def cube(shape: tuple[int, int, int], start: tuple[int, int, int], size: int) -> np.ndarray:
    """Return a bool volume with a ``size``-sided cube whose lowest corner is ``start``."""
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


# --- overlap metrics -------------------------------------------------------


def test_overlap_of_two_cubes_half_overlapping():
    a = cube((8, 8, 8), (0, 0, 0), 4)
    b = cube((8, 8, 8), (2, 0, 0), 4)
    # Each cube has 4*4*4 = 64 voxels; they share x in {2, 3}: 2*4*4 = 32.
    inter, size_a, size_b = 2 * 4 * 4, 4**3, 4**3
    m = compute_metrics(a, b, SPACING)
    assert m.dice == pytest.approx(2 * inter / (size_a + size_b))  # 0.5
    assert m.iou == pytest.approx(inter / (size_a + size_b - inter))  # 1/3
    assert m.precision == pytest.approx(inter / size_a)
    assert m.recall == pytest.approx(inter / size_b)


def test_precision_and_recall_are_not_swapped():
    ref = cube((8, 8, 8), (0, 0, 0), 4)  # 64 voxels
    pred = cube((8, 8, 8), (0, 0, 0), 2)  # 8 voxels, all inside ref
    m = compute_metrics(pred, ref, SPACING)
    assert m.precision == pytest.approx(8 / 8)
    assert m.recall == pytest.approx(8 / 64)
    assert m.dice == pytest.approx(2 * 8 / (8 + 64))
    assert m.iou == pytest.approx(8 / 64)


def test_identical_masks_are_perfect():
    a = cube((8, 8, 8), (2, 2, 2), 3)
    m = compute_metrics(a, a.copy(), SPACING)
    assert (m.dice, m.iou, m.precision, m.recall) == (1.0, 1.0, 1.0, 1.0)
    assert m.hd95_mm == 0.0
    assert m.assd_mm == 0.0


def test_integer_masks_give_same_result_as_bool():
    a = cube((8, 8, 8), (0, 0, 0), 4)
    b = cube((8, 8, 8), (1, 1, 0), 4)
    as_bool = compute_metrics(a, b, SPACING)
    as_uint8 = compute_metrics(a.astype(np.uint8), b.astype(np.int64), SPACING)
    assert as_uint8 == as_bool


def test_swapping_pred_and_ref_swaps_precision_and_recall_only():
    a = cube((10, 10, 10), (0, 0, 0), 5)
    b = cube((10, 10, 10), (2, 1, 3), 4)
    ab = compute_metrics(a, b, SPACING)
    ba = compute_metrics(b, a, SPACING)
    assert ab.precision == pytest.approx(ba.recall)
    assert ab.recall == pytest.approx(ba.precision)
    assert ab.dice == pytest.approx(ba.dice)
    assert ab.hd95_mm == pytest.approx(ba.hd95_mm)
    assert ab.assd_mm == pytest.approx(ba.assd_mm)
    assert ab.precision != pytest.approx(ab.recall)  # the swap is visible


def test_all_foreground_prediction_on_one_percent_reference():
    # The failed project's degenerate output: every voxel predicted foreground.
    ref = np.zeros((10, 10, 10), dtype=bool)
    ref[0, 0, :] = True  # 10 of 1000 voxels = 1 % of the scan
    pred = np.ones_like(ref)
    m = compute_metrics(pred, ref, SPACING)
    assert m.precision == pytest.approx(10 / 1000)  # 0.01
    assert m.recall == 1.0
    assert m.dice == pytest.approx(2 * 10 / (1000 + 10))
    assert m.iou == pytest.approx(10 / 1000)
    assert degenerate_reason(pred, max_fraction=0.2) == "all foreground"


# --- volumes ---------------------------------------------------------------


def test_volumes_in_millilitres():
    pred = cube((8, 8, 8), (0, 0, 0), 4)  # 64 voxels
    ref = cube((8, 8, 8), (0, 0, 0), 2)  # 8 voxels
    m = compute_metrics(pred, ref, SPACING)
    voxel_mm3 = 1.0 * 2.0 * 3.0
    assert m.volume_pred_ml == pytest.approx(64 * voxel_mm3 / 1000)  # 0.384 mL
    assert m.volume_ref_ml == pytest.approx(8 * voxel_mm3 / 1000)  # 0.048 mL


# --- surface distances -----------------------------------------------------

# A 4x4x4 cube has 4**3 - 2**3 = 56 surface voxels. Shifting it by one voxel
# along an axis with spacing s: the 16 voxels of the trailing face are s away
# from the other surface, the 4 inner voxels of the leading face are 1 mm
# away (the nearest side face along an in-face axis; the smallest in-face
# spacing is always 1.0 with SPACING), and the other 36 lie on the other
# cube's side faces (0 mm). By symmetry the reverse direction is the same.
N_SURFACE = 4**3 - 2**3


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_single_voxel_shift_gives_hd95_equal_to_spacing_along_axis(axis):
    start = [2, 2, 2]
    a = cube((8, 8, 8), tuple(start), 4)
    start[axis] += 1
    b = cube((8, 8, 8), tuple(start), 4)
    s = SPACING[axis]
    m = compute_metrics(a, b, SPACING)
    # 16 of 56 distances equal s (> 5 %), so the 95th percentile is s.
    assert m.hd95_mm == pytest.approx(s)
    assert m.assd_mm == pytest.approx((16 * s + 4 * 1.0) * 2 / (2 * N_SURFACE))
    # Overlap: 3 of the 4 layers along the shifted axis are shared.
    assert m.dice == pytest.approx(2 * (3 * 4 * 4) / (64 + 64))


def test_distance_between_single_voxels_is_anisotropic_euclidean():
    a = np.zeros((6, 6, 6), dtype=bool)
    b = np.zeros((6, 6, 6), dtype=bool)
    a[0, 0, 0] = True
    b[3, 0, 4] = True
    m = compute_metrics(a, b, SPACING)
    expected = math.sqrt((3 * 1.0) ** 2 + (4 * 3.0) ** 2)  # sqrt(153) mm
    assert m.hd95_mm == pytest.approx(expected)
    assert m.assd_mm == pytest.approx(expected)
    assert m.dice == 0.0


def test_mask_touching_volume_border_has_surface_there():
    # pred fills the whole 6x6x6 volume; ref lacks the last layer along axis 0.
    pred = np.ones((6, 6, 6), dtype=bool)
    ref = pred.copy()
    ref[5] = False
    m = compute_metrics(pred, ref, SPACING)
    pred_surface = 6**3 - 4**3  # 152: every voxel on the volume border
    ref_surface = 5 * 6 * 6 - 3 * 4 * 4  # 132
    # pred -> ref: the 36 voxels of the x=5 layer are 1 mm from ref's x=4 face.
    # ref -> pred: the 16 inner voxels of ref's x=4 face are 1 mm from x=5.
    assert m.hd95_mm == pytest.approx(1.0)
    assert m.assd_mm == pytest.approx((36 * 1.0 + 16 * 1.0) / (pred_surface + ref_surface))


def test_surface_uses_six_neighbours():
    # ref is a 3x3x3 cube missing one corner. Its centre voxel touches that
    # corner only diagonally, so with 6-neighbours it is not a surface voxel.
    pred = cube((5, 5, 5), (1, 1, 1), 3)
    ref = pred.copy()
    ref[1, 1, 1] = False
    pred_surface = 3**3 - 1  # 26: all but the centre
    ref_surface = 3**3 - 1 - 1  # 25: all but the centre and the removed corner
    m = compute_metrics(pred, ref, SPACING)
    # Only pred's corner voxel is off ref's surface; its nearest ref surface
    # voxel is a 1.0 mm step along axis 0.
    assert m.assd_mm == pytest.approx(1.0 / (pred_surface + ref_surface))


def test_hd95_ignores_a_small_outlier_but_assd_does_not():
    # pred = a 6x6x6 cube (6**3 - 4**3 = 152 surface voxels, all shared with
    # ref) plus one stray voxel 9 voxels away along axis 0: 1 of 153 directed
    # distances is non-zero, under 5 %, so HD95 is 0 while ASSD is not.
    ref = cube((20, 8, 8), (0, 1, 1), 6)
    pred = ref.copy()
    pred[14, 3, 3] = True
    m = compute_metrics(pred, ref, SPACING)
    outlier_mm = (14 - 5) * 1.0
    assert m.hd95_mm == 0.0
    assert m.assd_mm == pytest.approx(outlier_mm / (152 + 1 + 152))


# --- empty masks -----------------------------------------------------------


def test_both_empty():
    empty = np.zeros((4, 4, 4), dtype=bool)
    m = compute_metrics(empty, empty, SPACING)
    assert (m.dice, m.iou, m.precision, m.recall) == (1.0, 1.0, 1.0, 1.0)
    assert (m.hd95_mm, m.assd_mm) == (0.0, 0.0)
    assert (m.volume_pred_ml, m.volume_ref_ml) == (0.0, 0.0)


def test_pred_empty_ref_not():
    pred = np.zeros((8, 8, 8), dtype=bool)
    ref = cube((8, 8, 8), (1, 1, 1), 2)
    m = compute_metrics(pred, ref, SPACING)
    assert (m.dice, m.iou, m.recall) == (0.0, 0.0, 0.0)
    assert m.precision == 0.0
    assert math.isnan(m.hd95_mm)
    assert math.isnan(m.assd_mm)
    assert m.volume_pred_ml == 0.0
    assert m.volume_ref_ml == pytest.approx(8 * 6.0 / 1000)


def test_ref_empty_pred_not():
    pred = cube((8, 8, 8), (1, 1, 1), 2)
    ref = np.zeros((8, 8, 8), dtype=bool)
    m = compute_metrics(pred, ref, SPACING)
    assert (m.dice, m.iou, m.precision) == (0.0, 0.0, 0.0)
    assert m.recall == 0.0
    assert math.isnan(m.hd95_mm)
    assert math.isnan(m.assd_mm)


# --- input validation ------------------------------------------------------


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        compute_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), SPACING)


def test_non_binary_mask_raises():
    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    labels[0, 0, 0] = 2
    with pytest.raises(ValueError, match="binary"):
        compute_metrics(labels, np.zeros((4, 4, 4), dtype=np.uint8), SPACING)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.0, 0.0, 1.0), (1.0, -2.0, 1.0)])
def test_bad_spacing_raises(spacing):
    mask = cube((4, 4, 4), (0, 0, 0), 2)
    with pytest.raises(ValueError, match="spacing"):
        compute_metrics(mask, mask, spacing)


# --- to_dict / summarize ---------------------------------------------------


def test_to_dict_is_json_safe_with_nan_as_none():
    m = compute_metrics(np.zeros((4, 4, 4)), cube((4, 4, 4), (0, 0, 0), 2), SPACING)
    d = m.to_dict()
    assert set(d) == {
        "dice", "iou", "precision", "recall",
        "hd95_mm", "assd_mm", "volume_pred_ml", "volume_ref_ml",
    }
    assert d["hd95_mm"] is None
    assert d["assd_mm"] is None
    assert d["recall"] == 0.0
    assert all(v is None or type(v) is float for v in d.values())
    assert json.loads(json.dumps(d, allow_nan=False)) == d


def test_summarize_means_ignoring_nan():
    rows = [
        SegmentationMetrics(0.8, 0.6, 0.9, 0.7, 4.0, 1.0, 10.0, 12.0),
        SegmentationMetrics(0.0, 0.0, 0.0, 0.0, math.nan, math.nan, 0.0, 5.0),
        SegmentationMetrics(0.6, 0.4, 0.5, 0.5, 2.0, 3.0, 20.0, 16.0),
    ]
    s = summarize(rows)
    assert s["dice"] == pytest.approx((0.8 + 0.0 + 0.6) / 3)
    assert s["recall"] == pytest.approx((0.7 + 0.0 + 0.5) / 3)
    assert s["hd95_mm"] == pytest.approx((4.0 + 2.0) / 2)
    assert s["assd_mm"] == pytest.approx((1.0 + 3.0) / 2)
    assert s["volume_ref_ml"] == pytest.approx((12.0 + 5.0 + 16.0) / 3)
    assert set(s) == set(rows[0].to_dict())


def test_summarize_all_nan_metric_is_nan_and_empty_list_raises():
    row = SegmentationMetrics(0.0, 0.0, 0.0, 0.0, math.nan, math.nan, 0.0, 1.0)
    s = summarize([row, row])
    assert math.isnan(s["hd95_mm"])
    assert s["volume_ref_ml"] == 1.0
    with pytest.raises(ValueError):
        summarize([])


# --- foreground_fraction / degenerate_reason -------------------------------


def test_foreground_fraction():
    mask = np.zeros((10, 10, 10), dtype=np.uint8)
    mask[:2, :5] = 1  # 2*5*10 = 100 voxels
    assert foreground_fraction(mask) == pytest.approx(100 / 1000)
    assert foreground_fraction(mask.astype(bool)) == pytest.approx(0.1)
    assert foreground_fraction(np.zeros((3, 3, 3))) == 0.0
    assert foreground_fraction(np.ones((3, 3, 3))) == 1.0


def test_degenerate_reason_empty():
    assert degenerate_reason(np.zeros((5, 5, 5), dtype=bool), max_fraction=0.2) == "empty"


def test_degenerate_reason_all_foreground():
    assert degenerate_reason(np.ones((5, 5, 5), dtype=np.uint8), max_fraction=0.2) == "all foreground"


def test_degenerate_reason_too_large():
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[:5] = True  # 500 / 1000 = 50 %
    assert degenerate_reason(mask, max_fraction=0.2) == (
        "implausibly large: 50.0 % of the scan (limit 20.0 %)"
    )


def test_degenerate_reason_normal_and_at_limit():
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[0, 0, :] = True  # 1 %
    assert degenerate_reason(mask, max_fraction=0.2) is None
    mask[:2] = True  # exactly 20 %: the limit is exclusive
    assert degenerate_reason(mask, max_fraction=0.2) is None
    mask[2, 0, 0] = True  # just over
    assert degenerate_reason(mask, max_fraction=0.2) is not None
