"""benchmarks/qclib.py: the QC benchmark's families of scans, each on a small synthetic volume with a known answer,
the per-family figures, and leave-one-family-out on hand-made rows."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from heartseg.runtime.image import Volume
from onnx_models import TEST_MODEL_BIAS, build_test_model, default_affine, ellipsoid_image, make_scan

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import qclib  # noqa: E402

SPACING = (1.4, 1.2, 1.6)


def _scan(shape=(48, 40, 36), centre=(0.42, 0.56, 0.6), radii=(0.2, 0.17, 0.2)) -> tuple[Volume, np.ndarray]:
    image, label = ellipsoid_image(shape, seed=3, centre=centre, radii=radii)
    return Volume(image, default_affine(SPACING)), label


def _rng() -> np.random.Generator:
    return np.random.default_rng(7)


def _world_centroid(volume: Volume, label: np.ndarray) -> np.ndarray:
    coords = np.argwhere(label > 0).mean(axis=0)
    return volume.affine[:3, :3] @ coords + volume.affine[:3, 3]


def _fov(volume: Volume) -> np.ndarray:
    return np.asarray(volume.shape) * np.asarray(volume.spacing)


@pytest.mark.parametrize("name", [*qclib.CORRUPTIONS, *qclib.CLEAN_VARIANTS])
def test_every_family_gives_a_scan_and_its_label_on_one_grid(name: str) -> None:
    """Each family returns float32 voxels and a binary label of the same shape, and says what it does."""
    family = {**qclib.CORRUPTIONS, **qclib.CLEAN_VARIANTS}[name]
    volume, label = _scan()
    out, out_label = family(volume, label, _rng())
    assert out.data.dtype == np.float32 and out.data.ndim == 3 and np.all(np.isfinite(out.data))
    assert out_label.shape == out.shape and set(np.unique(out_label)) <= {0, 1}
    assert out_label.sum() > 0
    assert family.__doc__ and family.__doc__.strip()


def test_clean_variants_and_corruptions_are_apart() -> None:
    """The bias field is a clean variant now; the two sets share no name; clean families count as clean."""
    assert "bias_field" in qclib.CLEAN_VARIANTS and "bias_field" not in qclib.CORRUPTIONS
    assert not set(qclib.CLEAN_VARIANTS) & set(qclib.CORRUPTIONS)
    assert {"iso_1mm", "slices_2_5mm", "fov_320mm", "lps_int16"} <= set(qclib.CLEAN_VARIANTS)
    assert {"heavy_noise", "permuted_axes", "mirrored_voxels", "slices_10mm", "motion_ghosting", "wrong_voxel_size",
            "undersampled", "second_structure", "clipped"} <= set(qclib.CORRUPTIONS)
    assert qclib.is_clean("clean") and qclib.is_clean("iso_1mm") and not qclib.is_clean("blur")
    assert not qclib.is_clean("other_dataset")


def test_heavy_noise_adds_one_and_a_half_image_sds() -> None:
    volume, label = _scan()
    out, out_label = qclib.heavy_noise(volume, label, _rng())
    added = out.data - volume.data
    assert float(added.std()) == pytest.approx(1.5 * float(volume.data.std()), rel=0.03)
    assert np.array_equal(out_label, label) and np.array_equal(out.affine, volume.affine)


def test_permuted_axes_transposes_voxels_and_label_under_the_same_header() -> None:
    volume, label = _scan()
    out, out_label = qclib.permuted_axes(volume, label, _rng())
    assert np.array_equal(out.data, volume.data.T) and np.array_equal(out_label, label.T)
    assert np.array_equal(out.affine, volume.affine)


def test_mirrored_voxels_flips_voxels_and_label_under_the_same_header() -> None:
    volume, label = _scan()
    out, out_label = qclib.mirrored_voxels(volume, label, _rng())
    axis = qclib.MIRRORED_AXIS
    assert np.array_equal(out.data, np.flip(volume.data, axis)) and np.array_equal(out_label, np.flip(label, axis))
    assert np.array_equal(out.affine, volume.affine)
    assert not np.array_equal(out.data, volume.data)


def test_ten_mm_slices_average_slabs_to_about_ten_mm() -> None:
    volume, label = _scan()
    out, out_label = qclib.slices_10mm(volume, label, _rng())
    factor = round(10.0 / SPACING[2])
    assert out.spacing[2] == pytest.approx(SPACING[2] * factor) and abs(out.spacing[2] - 10.0) <= SPACING[2] / 2
    assert out.shape == (48, 40, 36 // factor)
    assert np.allclose(out.data[:, :, 0], volume.data[:, :, :factor].mean(axis=2), atol=1e-4)
    assert out.spacing[:2] == pytest.approx(SPACING[:2])


def test_wrong_voxel_size_doubles_the_spacing_and_keeps_the_voxels() -> None:
    volume, label = _scan()
    out, out_label = qclib.wrong_voxel_size(volume, label, _rng())
    assert out.spacing == pytest.approx(tuple(2 * s for s in SPACING))
    assert np.array_equal(out.data, volume.data) and np.array_equal(out_label, label)
    assert np.array_equal(out.affine[:3, 3], volume.affine[:3, 3])


@pytest.mark.parametrize("name", ["motion_ghosting", "undersampled"])
def test_k_space_families_keep_the_shape_and_change_the_image(name: str) -> None:
    volume, label = _scan()
    out, out_label = qclib.CORRUPTIONS[name](volume, label, _rng())
    assert out.shape == volume.shape and np.array_equal(out.affine, volume.affine)
    assert np.array_equal(out_label, label)
    assert float(np.abs(out.data - volume.data).mean()) > 0.05 * float(volume.data.std())


def test_undersampling_keeps_the_central_quarter_of_k_space() -> None:
    """Along the undersampled axis the image holds no frequency outside the central quarter (before the magnitude)."""
    volume, label = _scan()
    out, _ = qclib.undersampled(volume, label, _rng())
    axis, n = qclib.PHASE_AXIS, volume.shape[qclib.PHASE_AXIS]
    high = np.abs(np.fft.fftfreq(n) * n) > n // 8
    energy = lambda data: float((np.abs(np.compress(high, np.fft.fft(data, axis=axis), axis)) ** 2).sum())  # noqa: E731
    assert energy(out.data) < 0.1 * energy(volume.data)


def test_motion_ghosting_is_reproducible_and_depends_on_the_draw() -> None:
    volume, label = _scan()
    first = qclib.motion_ghosting(volume, label, np.random.default_rng(1))[0].data
    assert np.array_equal(first, qclib.motion_ghosting(volume, label, np.random.default_rng(1))[0].data)
    assert not np.array_equal(first, qclib.motion_ghosting(volume, label, np.random.default_rng(2))[0].data)


def test_second_structure_adds_an_atrium_sized_blob_of_blood_brightness_away_from_the_label() -> None:
    volume, label = _scan(shape=(80, 64, 56), centre=(0.25, 0.5, 0.5), radii=(0.12, 0.15, 0.15))
    out, out_label = qclib.second_structure(volume, label, _rng())
    assert np.array_equal(out_label, label)
    blood = float(np.median(volume.data[label > 0]))
    brightened = (out.data - volume.data) > 0.5 * (blood - float(np.median(volume.data[label == 0])))
    assert not np.any(brightened & (label > 0))
    assert 0.5 * label.sum() <= brightened.sum() <= 1.5 * label.sum()
    assert float(np.median(out.data[brightened])) == pytest.approx(blood, rel=0.1)
    centre = np.argwhere(brightened).mean(axis=0)
    assert centre[0] > 0.5 * label.shape[0]  # the far side from the atrium at a quarter of the first axis


def test_second_structure_never_covers_the_atrium_in_a_scan_too_small_to_hold_it_apart() -> None:
    # An atrium filling much of a small crop (as LGE crops are): an atrium-sized structure cannot lie clear of it.
    volume, label = _scan(shape=(40, 34, 30), centre=(0.45, 0.5, 0.5), radii=(0.3, 0.3, 0.3))
    out, out_label = qclib.second_structure(volume, label, _rng())
    assert np.array_equal(out_label, label)
    changed = np.abs(out.data - volume.data) > 1e-6
    assert np.any(changed)
    near = ndimage.distance_transform_edt(label == 0, sampling=SPACING) <= qclib.SECOND_STRUCTURE_GAP_MM
    assert not np.any(changed & near)


def test_clipped_caps_at_the_sixtieth_percentile() -> None:
    volume, label = _scan()
    out, _ = qclib.clipped(volume, label, _rng())
    cap = float(np.percentile(volume.data, 60))
    assert float(out.data.max()) == pytest.approx(cap)
    below = volume.data < cap
    assert np.array_equal(out.data[below], volume.data[below])


def test_iso_1mm_resamples_to_one_millimetre_in_the_same_place() -> None:
    volume, label = _scan()
    out, out_label = qclib.iso_1mm(volume, label, _rng())
    assert out.spacing == pytest.approx((1.0, 1.0, 1.0))
    assert np.allclose(_fov(out), _fov(volume), atol=1.0)
    volume_ml = lambda v, m: float(m.sum()) * float(np.prod(v.spacing)) / 1000  # noqa: E731
    assert volume_ml(out, out_label) == pytest.approx(volume_ml(volume, label), rel=0.05)
    assert np.allclose(_world_centroid(out, out_label), _world_centroid(volume, label), atol=0.5)


def test_slices_2_5mm_resamples_only_the_last_axis() -> None:
    volume, label = _scan()
    out, out_label = qclib.slices_2_5mm(volume, label, _rng())
    assert out.spacing == pytest.approx((SPACING[0], SPACING[1], 2.5))
    assert out.shape[:2] == volume.shape[:2]
    assert np.allclose(_world_centroid(out, out_label), _world_centroid(volume, label), atol=0.7)


def test_fov_320mm_pads_in_plane_with_the_background_and_keeps_the_label() -> None:
    volume, label = _scan()
    out, out_label = qclib.fov_320mm(volume, label, _rng())
    assert np.allclose(_fov(out)[:2], 320.0, atol=max(SPACING[:2]))
    assert out.shape[2] == volume.shape[2] and out.spacing == pytest.approx(SPACING)
    assert int(out_label.sum()) == int(label.sum())
    assert np.allclose(_world_centroid(out, out_label), _world_centroid(volume, label))
    assert float(out.data[0, 0, 0]) == pytest.approx(float(volume.data.min()))


def test_lps_int16_flips_x_and_y_with_the_header_and_stores_integers() -> None:
    volume, label = _scan()
    out, out_label = qclib.lps_int16(volume, label, _rng())
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S") and nib.aff2axcodes(out.affine) == ("L", "P", "S")
    assert np.array_equal(out.data, np.round(out.data)) and 0.0 <= out.data.min() and out.data.max() <= 2000.0
    assert float(out.data.max()) == pytest.approx(2000.0, abs=1.0)
    assert np.array_equal(out_label, label[::-1, ::-1])
    assert np.allclose(_world_centroid(out, out_label), _world_centroid(volume, label))
    # The same voxels, scaled: the brightest stays the brightest, in the same place.
    assert np.corrcoef(out.data[::-1, ::-1].ravel(), volume.data.ravel())[0, 1] > 0.9999


def test_corrupted_yields_the_clean_scan_then_every_family_the_same_each_time() -> None:
    volume, label = _scan()
    clean = [qclib.QCCase("a", "clean", volume, label)]
    kinds = ("heavy_noise", "iso_1mm", "motion_ghosting")
    first = list(qclib.corrupted(clean, kinds))
    assert [c.corruption for c in first] == ["clean", *kinds]
    again = list(qclib.corrupted(clean, ("motion_ghosting",)))
    assert np.array_equal(again[1].volume.data, first[3].volume.data)


def row(name: str, family: str, score: float | None, dice: float, rule: str = "ok") -> qclib.QCRow:
    """A row whose verdict rule ("ok", "review" or "fail") comes from a rule that does not use the calibration."""
    reasons = [] if rule == "ok" else [f"a {rule} rule"]
    rules = {"ok": [], "review": ["fragmented"], "fail": ["degenerate_mask"]}[rule]
    return qclib.QCRow(name, family, dice, rule, score, score, reasons, rules=rules)


def test_per_family_figures() -> None:
    rows = [row("c1", "clean", 0.9, 0.92), row("c2", "clean", 0.9, 0.90, "review"), row("i1", "iso_1mm", 0.9, 0.80),
            row("b1", "blur", 0.9, 0.75), row("b2", "blur", 0.9, 0.60, "fail")]
    families = qclib.per_family(rows)
    assert list(families) == ["clean", "iso_1mm", "blur"]
    assert families["clean"]["false_alarm_rate"] == pytest.approx(0.5) and families["clean"]["clean_good"] == 2
    assert families["iso_1mm"]["clean_good"] == 0 and families["iso_1mm"]["false_alarm_rate"] is None
    assert families["iso_1mm"]["silent_failures"] == 0 and families["iso_1mm"]["bad"] == 1
    blur = families["blur"]
    assert blur["cases"] == 2 and blur["bad"] == 2 and blur["silent_failures"] == 1
    assert blur["mean_dice"] == pytest.approx(0.675) and (blur["ok"], blur["review"], blur["fail"]) == (1, 0, 1)
    assert "false_alarm_rate" not in blur
    figures = qclib.qc_figures(rows)
    assert figures["clean"] == 3 and figures["clean_good"] == 2  # the clean variants are clean scans too


def _measured_rows(signal: dict[str, str], score_informs: bool) -> list[qclib.QCRow]:
    """Per family, 12 rows, every other one bad (true Dice 0.6 against 0.92); a bad row's measure signal[family] is
    e^3 times a good row's, every other measure is noise; the score tells the bad rows apart when score_informs."""
    rng = np.random.default_rng(5)
    rows = []
    for family, measure in signal.items():
        for i in range(12):
            bad = i % 2 == 1
            measures = {"volume_ml": 60.0, "noise_level": 0.1, "contrast": 10.0, "edge_sharpness": 2.0}
            measures.update({k: v * float(np.exp(rng.normal(0, 0.1))) for k, v in measures.items()})
            if bad:
                measures[measure] *= float(np.exp(3.0))
            score = (0.6 if bad else 0.92) + rng.normal(0, 0.01) if score_informs else 0.9 + rng.normal(0, 0.01)
            rows.append(qclib.QCRow(f"{family}{i}", family, 0.6 if bad else 0.92, "ok", score, score,
                                    measures=measures))
    return rows


def test_combination_study_holds_each_family_out_of_the_fit() -> None:
    # Each family's bad masks show in a measure of their own: fitted on every family the combination ranks them all,
    # but a family left out of the fit shows its failures in a measure the fit never learned to read.
    signal = {"a": "noise_level", "b": "contrast", "c": "volume_ml", "d": "edge_sharpness"}
    study = qclib.combination_study(_measured_rows(signal, score_informs=False))
    assert study["cases"] == 48 and study["measures"][0] == "score"
    assert study["auroc_in_sample"] > 0.9
    assert study["auroc_held_out"] < study["auroc_in_sample"] - 0.2
    # Failures that show in the same measure in every family are ranked held out as well.
    study = qclib.combination_study(_measured_rows(dict.fromkeys(signal, "noise_level"), score_informs=False))
    assert study["auroc_score"] < 0.8 and study["auroc_held_out"] > 0.95


def test_combination_fit_needs_a_ridge_and_both_kinds_of_mask() -> None:
    features = np.array([[0.9, 1.0], [0.5, np.nan], [0.8, 2.0], [0.4, 3.0]])
    with pytest.raises(ValueError, match="above 0"):
        qclib._logistic(features, np.array([False, True, False, True]), l2=0.0)
    # All good: nothing to learn, every mask ranks the same.
    assert np.array_equal(qclib._logistic(features, np.zeros(4, bool), l2=1.0)(features), np.zeros(4))
    # A missing value takes the fitted rows' mean: the log-odds stay finite and the score still ranks.
    odds = qclib._logistic(features, np.array([False, True, False, True]), l2=1.0)(features)
    assert np.all(np.isfinite(odds)) and odds[1] > odds[0] and odds[3] > odds[2]


def test_combination_study_needs_two_families_and_rows_with_a_mask() -> None:
    rows = _measured_rows({"a": "noise_level"}, score_informs=True)
    assert qclib.combination_study(rows)["auroc_held_out"] is None
    rows = _measured_rows({"a": "noise_level", "b": "contrast"}, score_informs=True)
    refused = [dataclasses.replace(r, refused=True) for r in rows]
    assert qclib.combination_study(refused)["cases"] == 0


def _hand_made_rows() -> list[qclib.QCRow]:
    """Scores equal true Dice except a1 (0.834 for 0.79) and b1 (0.86 for 0.70, flagged by a rule)."""
    return [row("c1", "clean", 0.92, 0.92), row("c2", "clean", 0.90, 0.90), row("c3", "clean", 0.88, 0.88),
            row("a1", "a", 0.834, 0.79), row("a2", "a", 0.95, 0.95),
            row("b1", "b", 0.86, 0.70, "review"), row("b2", "b", 0.45, 0.45)]


def test_leave_one_family_out_refits_chooses_the_threshold_and_judges_the_held_out_family() -> None:
    """Fewer than 8 fitted rows: slope 1, intercept the median residual, so every answer follows by hand.

    Held out a: the fit (clean, b) has median residual 0; at 0.80 no fitted mask below 0.80 passes and no clean scan
    is flagged, so 0.80; a1 (estimate 0.834, true 0.79) then passes: a silent failure.
    Held out b: a1 is fitted (median residual 0): it passes below 0.84, so 0.84; b1 keeps its rule's review, b2's
    estimate 0.45 is below 0.5: fail.
    Held out clean: the fit (a, b) has median residual -0.022, a1's estimate 0.812 passes below 0.82, so 0.82; the
    clean scans' estimates 0.898, 0.878, 0.858 pass: no false alarm."""
    result = qclib.leave_one_family_out(_hand_made_rows())
    families = result["families"]
    assert families["a"]["threshold"] == pytest.approx(0.80)
    assert families["a"]["silent_failures"] == 1 and families["a"]["flagged_share"] == 0.0
    assert families["b"]["threshold"] == pytest.approx(0.84)
    assert families["b"]["verdicts"] == {"ok": 0, "review": 1, "fail": 1} and families["b"]["silent_failures"] == 0
    assert families["clean"]["threshold"] == pytest.approx(0.82)
    assert families["clean"]["intercept"] == pytest.approx(-0.022)
    assert families["clean"]["false_alarm_rate"] == 0.0 and families["clean"]["flagged_share"] == 0.0
    assert "false_alarm_rate" not in families["a"]
    verdicts = {r["name"]: r["verdict"] for r in result["rows"]}
    assert verdicts == {"c1": "ok", "c2": "ok", "c3": "ok", "a1": "ok", "a2": "ok", "b1": "review", "b2": "fail"}
    held_out = result["held_out"]
    assert held_out["silent_failures"] == 1 and held_out["cases"] == 7
    rows = _hand_made_rows()
    assert held_out["auroc_score"] == pytest.approx(qclib.auroc([r.score for r in rows],
                                                                [r.true_dice < qclib.BAD_BELOW for r in rows]))
    # b2 (fail), b1 (review), then the ok masks lowest held-out estimate first: a1 (0.834) before every good one.
    assert held_out["auroc_order"] == 1.0


def test_qcs_order_puts_a_flagged_mask_first_whatever_its_score() -> None:
    # A bad mask flagged by a rule but confidently scored, and a good one passed with a lower score.
    rows = [row("g1", "clean", 0.90, 0.90), row("g2", "clean", 0.88, 0.93), row("x1", "x", 0.97, 0.40, "review"),
            row("x2", "x", 0.60, 0.60, "fail")]
    figures = qclib.qc_figures(rows)
    assert figures["auroc_score_bad"] == pytest.approx(0.5)  # x1 outscores both good masks, x2 neither
    assert figures["auroc_order_bad"] == 1.0
    assert qclib.order_auroc([(2, 0.9), (2, 0.9), (1, 0.5)], [True, False, True]) == pytest.approx(0.75)


IDENTITY = dict(slope=1.0, intercept=0.0, residual_lo=-0.03, residual_hi=0.03, cases=3)


def test_threshold_without_a_clean_choice_keeps_the_false_alarm_cap() -> None:
    """A bad mask scoring above a good clean one: no threshold catches it without flagging the clean scan, so the
    bad mask stays a silent failure at the lowest threshold within the cap rather than every clean scan flagged."""
    from heartseg.runtime.qc import ScoreCalibration

    identity = ScoreCalibration(**IDENTITY)
    rows = [row("c1", "clean", 0.86, 0.86), row("x1", "x", 0.87, 0.70), row("x2", "x", 0.9, 0.9)]
    assert qclib.choose_threshold(rows, identity) == pytest.approx(0.80)
    # Within the cap, the fewest silent failures: x3 is caught from 0.84 on, which flags no clean scan.
    assert qclib.choose_threshold([*rows, row("x3", "x", 0.83, 0.70)], identity) == pytest.approx(0.84)
    # Nothing fitted can be caught (scores above the grid): every threshold ties, the lowest is kept.
    assert qclib.choose_threshold([row("y1", "y", 0.99, 0.5)], identity) == pytest.approx(0.80)


def test_threshold_with_every_choice_over_the_cap_takes_the_fewest_false_alarms() -> None:
    """c1's estimate is below fail_below whatever the threshold: half the clean scans are flagged at best (up to
    0.85), all of them from 0.86 on, where x1 would be caught: the fewest false alarms win, then the lowest."""
    from heartseg.runtime.qc import ScoreCalibration

    identity = ScoreCalibration(**IDENTITY)
    rows = [row("c1", "clean", 0.40, 0.90), row("c2", "clean", 0.85, 0.85), row("x1", "x", 0.87, 0.70)]
    assert qclib.choose_threshold(rows, identity) == pytest.approx(0.80)


@pytest.mark.parametrize("verdict, rules, held_out", [
    ("fail", ["low_estimated_dice"], "ok"),
    ("review", ["low_estimated_dice"], "ok"),
    ("fail", ["low_estimated_dice", "fragmented"], "review"),
    ("review", ["cut_by_box", "low_estimated_dice"], "review"),
    ("fail", ["degenerate_mask", "low_estimated_dice"], "fail"),
    ("fail", ["implausible_volume", "fragmented"], "fail"),
])
def test_the_held_out_verdict_drops_only_the_estimated_dice_findings(verdict: str, rules: list[str],
                                                                     held_out: str) -> None:
    from heartseg.runtime.qc import RULES, ScoreCalibration

    # The estimated Dice's rule is the last rule: a fail of its own is listed after any other fail.
    assert RULES[-1].__name__ == qclib.CALIBRATED_RULE
    reasons = [f"reason of {name}" for name in rules]
    judged = qclib.QCRow("s", "x", 0.95, verdict, 0.95, 0.3, reasons, rules=rules)
    assert judged.rule_verdict == held_out
    assert qclib.refitted_verdict(judged, ScoreCalibration(**IDENTITY), 0.85) == held_out
    with pytest.raises(ValueError, match="rule"):
        qclib.refitted_verdict(qclib.QCRow("s", "x", 0.95, verdict, 0.95, 0.3, reasons), None, 0.85)


def test_leave_one_family_out_keeps_rows_without_a_score_as_the_run_judged_them() -> None:
    rows = [*_hand_made_rows(), qclib.QCRow("r1", "refused_family", 0.0, "fail", None, None, ["refused: too coarse"],
                                            rules=[qclib.REFUSED], refused=True)]
    result = qclib.leave_one_family_out(rows)
    assert result["families"]["refused_family"]["verdicts"]["fail"] == 1
    assert result["families"]["a"]["threshold"] == pytest.approx(0.80)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, qclib.QCCase]:
    """A pointwise model whose calibration estimates every mask far below its score, and a synthetic scan."""
    pytest.importorskip("onnx")
    from heartseg.runtime.qc import ScoreCalibration, scans_plausibility

    folder = tmp_path_factory.mktemp("qclib")
    scan, label = make_scan(folder / "scan.nii.gz", label_path=folder / "labels" / "scan.nii.gz")
    case = qclib.load_case("scan", scan, label)
    plausibility = scans_plausibility([(case.volume.data, case.label, case.volume.spacing)])
    pessimist = ScoreCalibration(slope=1.0, intercept=-0.6, residual_lo=-0.03, residual_hi=0.03, cases=10)
    model = build_test_model(folder / "m.onnx", bias=TEST_MODEL_BIAS,
                             contract_fields={"plausibility": plausibility, "score_calibration": pessimist})
    return model, case


def test_run_case_keeps_apart_the_reasons_that_do_not_use_the_calibration(tiny) -> None:
    from heartseg.runtime.segmenter import Segmenter

    model, case = tiny
    result = qclib.run_case(Segmenter(model, device="cpu", threads=1), case)
    assert result.verdict in ("review", "fail") and any("estimated Dice" in r for r in result.reasons)
    assert result.rules == ["low_estimated_dice"] and len(result.rules) == len(result.reasons)
    assert result.rule_verdict == "ok" and not result.refused
    assert result.true_dice > 0.5


def test_run_case_records_a_refused_scan_as_a_failed_row(tiny) -> None:
    from heartseg.runtime.segmenter import Segmenter

    model, case = tiny
    coarse = Volume(case.volume.data, case.volume.affine @ np.diag([40.0, 40.0, 40.0, 1.0]))
    coarse_case = qclib.QCCase("scan", "coarse", coarse, case.label)
    result = qclib.run_case(Segmenter(model, device="cpu", threads=1), coarse_case)
    assert result.refused and result.verdict == "fail" and result.rule_verdict == "fail"
    assert result.rules == [qclib.REFUSED]
    assert result.score is None and result.true_dice == 0.0
    assert len(result.reasons) == 1 and "voxel spacing" in result.reasons[0]
