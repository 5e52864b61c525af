"""The QC benchmark's cases and figures: held-out scans, copies of them in families (clean variants and
corruptions) with their true Dice, the scores that say how well QC separates good masks from bad ones, and
leave-one-family-out: the score calibration and its review threshold fitted without the family they judge.

Every family returns a scan and the label on that scan's own grid, so the true Dice is the Dice of what
heartseg writes for that scan against what a reader would draw on it. Clean variants are scans as they
come from other scanners and protocols (the false alarms are counted on them and on the clean scans);
corruptions are scans QC should flag when the mask suffers.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from heartseg.runtime.errors import InputError
from heartseg.runtime.formats.nifti import load_mask, load_volume
from heartseg.runtime.image import Volume
from heartseg.runtime.metrics import dice_score
from heartseg.runtime.preprocess import target_shape
from heartseg.runtime.qc import SILENT_BELOW, ScoreCalibration, fit_score_calibration, spearman
from heartseg.runtime.qc.calibration import FAIL_BELOW
from heartseg.runtime.qc.report import review_order
from scipy import ndimage
from scipy.spatial import cKDTree

# True Dice below this makes a mask "bad" for the AUROC; below SILENT_BELOW with verdict ok is a silent failure.
BAD_BELOW = 0.85
# The family of the scans as they are.
CLEAN = "clean"
# The rule a refitted score calibration replaces (the estimated Dice's), and the rule name a refused scan's row gives
# its reason.
CALIBRATED_RULE = "low_estimated_dice"
REFUSED = "refused"
# The in-plane array axis whose k-space lines the k-space families corrupt (the phase-encode direction), and the
# axis mirrored_voxels flips (not the first, which wrong_orientation's header mirrors).
PHASE_AXIS = 1
MIRRORED_AXIS = 1
# How far (mm) second_structure's structure keeps from the atrium at least: about an atrial wall's thickness.
SECOND_STRUCTURE_GAP_MM = 3.0


@dataclass
class QCCase:
    """One scan to segment, its label on the same grid, and what was done to it."""

    name: str
    corruption: str
    volume: Volume
    label: np.ndarray


@dataclass
class QCRow:
    """What QC said about one case, and the truth."""

    name: str
    corruption: str
    true_dice: float
    verdict: str
    score: float | None
    estimated_dice: float | None
    reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0
    qc_seconds: float = 0.0
    # The name of the rule behind each reason, in the same order; refused: the scan was refused (no mask).
    rules: list[str] = field(default_factory=list)
    refused: bool = False
    # What QC measured on the mask and scan (QCReport.measures), for studying new rules on the benchmark's rows.
    measures: dict[str, Any] = field(default_factory=dict)

    @property
    def rule_verdict(self) -> str:
        """The verdict of the findings but the estimated Dice's, which a refitted calibration leaves as they are."""
        if len(self.rules) != len(self.reasons):
            raise ValueError(f"{self.name} ({self.corruption}): the row does not name the rule of each reason")
        if not any(rule != CALIBRATED_RULE for rule in self.rules):
            return "ok"
        # A report lists its fails first, so a failed row's first reason is a fail; the estimated Dice's rule is the
        # last rule, so when its fail comes first it is the only fail.
        return "fail" if self.verdict == "fail" and self.rules[0] != CALIBRATED_RULE else "review"


Corruption = Callable[[Volume, np.ndarray, np.random.Generator], tuple[Volume, np.ndarray]]


def _with(volume: Volume, data: np.ndarray, affine: np.ndarray | None = None) -> Volume:
    return Volume(np.ascontiguousarray(data, dtype=np.float32), volume.affine if affine is None else affine)


def _noisy(volume: Volume, rng: np.random.Generator, scale: float) -> np.ndarray:
    """volume's voxels plus Gaussian noise of scale times their standard deviation."""
    return volume.data + rng.standard_normal(volume.shape).astype(np.float32) * scale * float(volume.data.std())


def gaussian_noise(volume: Volume, label: np.ndarray, rng: np.random.Generator) -> tuple[Volume, np.ndarray]:
    """Additive noise with half the image's standard deviation."""
    return _with(volume, _noisy(volume, rng, 0.5)), label


def heavy_noise(volume: Volume, label: np.ndarray, rng: np.random.Generator) -> tuple[Volume, np.ndarray]:
    """Additive Gaussian noise with 1.5 times the image's standard deviation."""
    return _with(volume, _noisy(volume, rng, 1.5)), label


def blur(volume: Volume, label: np.ndarray, rng: np.random.Generator) -> tuple[Volume, np.ndarray]:
    """Gaussian blur of 3 mm (sd) in every direction."""
    sigma = [3.0 / s for s in volume.spacing]
    return _with(volume, ndimage.gaussian_filter(volume.data, sigma)), label


def thick_slices(volume: Volume, label: np.ndarray, rng: np.random.Generator, factor: int = 4) -> tuple[Volume, np.ndarray]:
    """Slabs of factor slices along the last array axis averaged into one slice (the voxel size grows with it)."""
    n = volume.shape[2] // factor * factor
    slabs = volume.data[:, :, :n].reshape(volume.shape[0], volume.shape[1], n // factor, factor)
    label_slabs = label[:, :, :n].reshape(label.shape[0], label.shape[1], n // factor, factor)
    affine = volume.affine.copy()
    # The slab's centre is where the new voxel centre lies.
    affine[:3, 3] = affine[:3, 3] + affine[:3, 2] * (factor - 1) / 2.0
    affine[:3, 2] = affine[:3, 2] * factor
    return _with(volume, slabs.mean(axis=3), affine), (label_slabs.mean(axis=3) >= 0.5).astype(np.uint8)


def bias_field(volume: Volume, label: np.ndarray, rng: np.random.Generator) -> tuple[Volume, np.ndarray]:
    """A smooth multiplicative field from about 0.4 to 2.5 across the scan."""
    grids = np.meshgrid(*[np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in volume.shape], indexing="ij")
    field_ = np.exp(0.6 * grids[0] + 0.3 * grids[1] ** 2 - 0.3 * grids[2])
    floor = float(volume.data.min())
    return _with(volume, (volume.data - floor) * field_ + floor), label


def ghosting(volume: Volume, label: np.ndarray, rng: np.random.Generator) -> tuple[Volume, np.ndarray]:
    """Two ghosts of the image shifted by a quarter of the field of view along the second axis, at 40 %."""
    shift = volume.shape[1] // 4
    data = volume.data + 0.4 * np.roll(volume.data, shift, axis=1) + 0.4 * np.roll(volume.data, -shift, axis=1)
    return _with(volume, data), label


def fov_cut(volume: Volume, label: np.ndarray, rng: np.random.Generator) -> tuple[Volume, np.ndarray]:
    """The field of view ends halfway through the atrium along the first axis."""
    coords = np.argwhere(label)
    middle = int(coords[:, 0].mean()) if coords.size else volume.shape[0] // 2
    middle = max(middle, 2)
    return _with(volume, volume.data[:middle]), np.ascontiguousarray(label[:middle])


def wrong_orientation(volume: Volume, label: np.ndarray, rng: np.random.Generator) -> tuple[Volume, np.ndarray]:
    """The header mirrors the first axis (the voxels do not move): left and right swapped."""
    affine = volume.affine.copy()
    affine[:3, 0] = -affine[:3, 0]
    return _with(volume, volume.data, affine), label


def inversion(volume: Volume, label: np.ndarray, rng: np.random.Generator) -> tuple[Volume, np.ndarray]:
    """Intensities inverted (bright blood becomes dark)."""
    return _with(volume, float(volume.data.max()) + float(volume.data.min()) - volume.data), label


def permuted_axes(volume: Volume, label: np.ndarray, rng: np.random.Generator) -> tuple[Volume, np.ndarray]:
    """The voxel array transposed (first and last axes swapped) under the same header, which does not say so;
    the label likewise."""
    return _with(volume, volume.data.T), np.ascontiguousarray(label.T)


def mirrored_voxels(volume: Volume, label: np.ndarray, rng: np.random.Generator) -> tuple[Volume, np.ndarray]:
    """The voxels mirrored along the second array axis under the same header, which does not say so; the label
    likewise."""
    return (_with(volume, np.flip(volume.data, MIRRORED_AXIS)),
            np.ascontiguousarray(np.flip(label, MIRRORED_AXIS)))


def slices_10mm(volume: Volume, label: np.ndarray, rng: np.random.Generator) -> tuple[Volume, np.ndarray]:
    """Slabs of slices along the last array axis averaged into slices about 10 mm thick, as thick_slices does."""
    factor = max(2, min(round(10.0 / volume.spacing[2]), volume.shape[2]))
    return thick_slices(volume, label, rng, factor=factor)


def _k_space(data: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The magnitude image of data with its k-space lines along PHASE_AXIS multiplied by weights (one per line,
    in numpy's FFT order)."""
    shape = [1] * data.ndim
    shape[PHASE_AXIS] = -1
    spectrum = np.fft.fft(data, axis=PHASE_AXIS) * weights.reshape(shape)
    return np.abs(np.fft.ifft(spectrum, axis=PHASE_AXIS))


def motion_ghosting(volume: Volume, label: np.ndarray, rng: np.random.Generator, share: float = 0.3,
                    max_phase: float = np.pi / 2) -> tuple[Volume, np.ndarray]:
    """Motion between phase-encode lines: a random share of the k-space lines along the second (in-plane) array
    axis get a random phase error of up to max_phase, giving ghosts along that axis (numpy FFT, magnitude image)."""
    n = volume.shape[PHASE_AXIS]
    errors = np.where(rng.random(n) < share, rng.uniform(-max_phase, max_phase, n), 0.0)
    return _with(volume, _k_space(volume.data, np.exp(1j * errors))), label


def undersampled(volume: Volume, label: np.ndarray, rng: np.random.Generator) -> tuple[Volume, np.ndarray]:
    """Only the central quarter of k-space along the second (in-plane) array axis kept, the rest zero: blur and
    ringing along that axis (numpy FFT, magnitude image)."""
    n = volume.shape[PHASE_AXIS]
    kept = np.abs(np.fft.fftfreq(n) * n) <= n / 8
    return _with(volume, _k_space(volume.data, kept.astype(np.float64))), label


def wrong_voxel_size(volume: Volume, label: np.ndarray, rng: np.random.Generator) -> tuple[Volume, np.ndarray]:
    """The header says the voxels are twice their size (the affine's axes scaled by 2 about the first voxel);
    the voxels and the label are unchanged."""
    affine = volume.affine.copy()
    affine[:3, :3] = affine[:3, :3] * 2.0
    return _with(volume, volume.data, affine), label


def _farthest_centre(shape: tuple[int, ...], radii: np.ndarray, label: np.ndarray,
                     spacing: np.ndarray) -> np.ndarray:
    """Of a grid of centres where an ellipsoid of radii (voxels) fits in shape, the one farthest (mm) from the
    nearest label voxel."""
    axes = [np.linspace(r, n - 1 - r, 7) if 2 * r < n - 1 else np.array([(n - 1) / 2.0]) for n, r in zip(shape, radii)]
    centres = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(shape))
    coords = np.argwhere(label > 0)
    if coords.size == 0:
        return centres[len(centres) // 2]
    distances, _ = cKDTree(coords * spacing).query(centres * spacing)
    return centres[int(np.argmax(distances))]


def second_structure(volume: Volume, label: np.ndarray, rng: np.random.Generator) -> tuple[Volume, np.ndarray]:
    """A second bright structure that is not the atrium: an ellipsoid of the blood pool's intensity (its median,
    with its spread as noise) and the atrium's size (half its extent along each axis), where it lies farthest from
    the atrium, with a soft edge; the label is unchanged. The structure never covers the atrium or the wall's
    width around it (SECOND_STRUCTURE_GAP_MM; its edge is sharp there): in a scan too small to hold it apart it
    abuts the atrium, as the aorta or a ventricle do, and the label stays the truth."""
    spacing = np.asarray(volume.spacing, float)
    inside = label > 0
    coords = np.argwhere(inside)
    blood = volume.data[inside] if coords.size else volume.data[volume.data >= np.percentile(volume.data, 99)]
    radii = (np.ptp(coords, axis=0) + 1) / 2.0 if coords.size else 20.0 / spacing
    centre = _farthest_centre(volume.shape, radii, label, spacing)
    grids = np.ogrid[tuple(slice(0, n) for n in volume.shape)]
    r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii))
    weight = ndimage.gaussian_filter((r2 <= 1.0).astype(np.float32), 1.0)
    if coords.size:
        weight *= ndimage.distance_transform_edt(~inside, sampling=spacing) > SECOND_STRUCTURE_GAP_MM
    texture = float(np.median(blood)) + rng.standard_normal(volume.shape).astype(np.float32) * float(blood.std())
    return _with(volume, volume.data * (1.0 - weight) + texture * weight), label


def clipped(volume: Volume, label: np.ndarray, rng: np.random.Generator) -> tuple[Volume, np.ndarray]:
    """Intensities clipped at their 60th percentile: the blood pool no brighter than much of the scan."""
    return _with(volume, np.minimum(volume.data, np.float32(np.percentile(volume.data, 60)))), label


def _resampled(volume: Volume, label: np.ndarray, spacing: Iterable[float]) -> tuple[Volume, np.ndarray]:
    """volume and label resampled linearly (scipy.ndimage) to spacing (mm per array axis) over the same extent,
    the image smoothed first along the axes made coarser; the label's resampled share >= 0.5 is the new label."""
    spacing = tuple(float(s) for s in spacing)
    ratio = np.asarray(spacing) / np.asarray(volume.spacing, float)
    shape = target_shape(volume.shape, volume.spacing, spacing)
    # New voxel i's centre lies at old index (i + 0.5) * ratio - 0.5: both grids share their outer faces.
    offset = 0.5 * ratio - 0.5
    sigma = np.maximum(ratio - 1.0, 0.0) / 2.0
    data = ndimage.gaussian_filter(volume.data, sigma) if np.any(sigma > 0) else volume.data

    def resample(array: np.ndarray) -> np.ndarray:
        return ndimage.affine_transform(array.astype(np.float32, copy=False), ratio, offset=offset,
                                        output_shape=shape, order=1, mode="nearest")

    affine = volume.affine.copy()
    affine[:3, 3] = volume.affine[:3, :3] @ offset + volume.affine[:3, 3]
    affine[:3, :3] = volume.affine[:3, :3] * ratio
    return _with(volume, resample(data), affine), (resample(label) >= 0.5).astype(np.uint8)


def iso_1mm(volume: Volume, label: np.ndarray, rng: np.random.Generator) -> tuple[Volume, np.ndarray]:
    """The scan resampled to 1 mm isotropic voxels (linear), as a 1 mm acquisition of the same field of view."""
    return _resampled(volume, label, (1.0, 1.0, 1.0))


def slices_2_5mm(volume: Volume, label: np.ndarray, rng: np.random.Generator) -> tuple[Volume, np.ndarray]:
    """Slices 2.5 mm apart along the last array axis: the native grid resampled linearly along it."""
    return _resampled(volume, label, (*volume.spacing[:2], 2.5))


def fov_320mm(volume: Volume, label: np.ndarray, rng: np.random.Generator) -> tuple[Volume, np.ndarray]:
    """A 320 mm field of view in-plane (first two array axes): the scan padded on both sides with its background
    (its lowest value), the label with zeros; an axis already as wide stays."""
    pads = [(0, 0)] * 3
    for axis in (0, 1):
        extra = max(0, int(round(320.0 / volume.spacing[axis])) - volume.shape[axis])
        pads[axis] = (extra // 2, extra - extra // 2)
    affine = volume.affine.copy()
    affine[:3, 3] = affine[:3, 3] - affine[:3, :3] @ np.array([before for before, _ in pads], float)
    data = np.pad(volume.data, pads, constant_values=float(volume.data.min()))
    return _with(volume, data, affine), np.pad(label, pads)


def lps_int16(volume: Volume, label: np.ndarray, rng: np.random.Generator) -> tuple[Volume, np.ndarray]:
    """Stored as DICOM-derived scans often are: the voxel axes along x and y run towards left and posterior (the
    voxels flipped, the affine saying so) and the intensities scaled to 0-2000 and rounded to int16."""
    current = nib.orientations.io_orientation(volume.affine)
    target = current.copy()
    target[np.isin(current[:, 0], (0, 1)), 1] = -1.0
    transform = nib.orientations.ornt_transform(current, target)
    data = nib.orientations.apply_orientation(volume.data, transform)
    affine = volume.affine @ nib.orientations.inv_ornt_aff(transform, volume.shape)
    low, high = float(data.min()), float(data.max())
    stored = np.round((data - low) * (2000.0 / max(high - low, 1e-6))).astype(np.int16)
    return _with(volume, stored, affine), np.ascontiguousarray(nib.orientations.apply_orientation(label, transform))


# Scans as other scanners and protocols give them: QC should pass their masks (false alarms are counted on them).
CLEAN_VARIANTS: dict[str, Corruption] = {
    "iso_1mm": iso_1mm, "slices_2_5mm": slices_2_5mm, "bias_field": bias_field, "fov_320mm": fov_320mm,
    "lps_int16": lps_int16,
}
# Scans QC should flag where the mask suffers.
CORRUPTIONS: dict[str, Corruption] = {
    "noise": gaussian_noise, "heavy_noise": heavy_noise, "blur": blur, "thick_slices": thick_slices,
    "slices_10mm": slices_10mm, "ghosting": ghosting, "motion_ghosting": motion_ghosting,
    "undersampled": undersampled, "fov_cut": fov_cut, "wrong_orientation": wrong_orientation,
    "mirrored_voxels": mirrored_voxels, "permuted_axes": permuted_axes, "wrong_voxel_size": wrong_voxel_size,
    "inversion": inversion, "clipped": clipped, "second_structure": second_structure,
}
FAMILIES: dict[str, Corruption] = {**CLEAN_VARIANTS, **CORRUPTIONS}


def is_clean(family: str) -> bool:
    """Whether a family's scans are clean ones (the scans as they are, or a clean variant)."""
    return family == CLEAN or family in CLEAN_VARIANTS


def load_case(name: str, image: Path, label: Path) -> QCCase:
    """A clean case from its image and label files."""
    return QCCase(name, CLEAN, load_volume(image), load_mask(label).data)


def corrupted(cases: Iterable[QCCase], kinds: Iterable[str] = tuple(FAMILIES), seed: int = 0) -> Iterator[QCCase]:
    """Every clean case, then each of its copies in the families kinds, made one at a time (a copy of a large scan
    is large); each copy draws from a seed of its own, so it is the same whichever other kinds are asked for."""
    kinds = tuple(kinds)
    for index, case in enumerate(cases):
        yield case
        for kind in kinds:
            rng = np.random.default_rng([seed, index, zlib.crc32(kind.encode())])
            volume, label = FAMILIES[kind](case.volume, case.label, rng)
            yield QCCase(case.name, kind, volume, label)


def find_cases(ids: Iterable[str], roots: Iterable[Path]) -> dict[str, tuple[Path, Path]]:
    """{case id: (image, label)} for the ids found in the MSD-layout folders roots."""
    found: dict[str, tuple[Path, Path]] = {}
    for root in roots:
        for case_id in ids:
            for suffix in (".nii.gz", ".nii"):
                image, label = root / "imagesTr" / f"{case_id}{suffix}", root / "labelsTr" / f"{case_id}{suffix}"
                if case_id not in found and image.is_file() and label.is_file():
                    found[case_id] = (image, label)
    return found


def run_case(segmenter: Any, case: QCCase) -> QCRow:
    """Segment one case and record QC's verdict beside the true Dice; a refused scan is a failed row without a
    mask (true Dice 0)."""
    start = time.perf_counter()
    try:
        prediction = segmenter.segment(case.volume)
    except InputError as exc:
        reason = f"refused: {exc}"
        return QCRow(case.name, case.corruption, 0.0, "fail", None, None, [reason], time.perf_counter() - start,
                     rules=[REFUSED], refused=True)
    seconds = time.perf_counter() - start
    report = prediction.report
    return QCRow(case.name, case.corruption, dice_score(prediction.mask, case.label), report.verdict, report.score,
                 report.estimated_dice, list(report.reasons), seconds, report.seconds, rules=list(report.rules),
                 measures=dict(report.measures))


def auroc(scores: Iterable[float], positive: Iterable[bool]) -> float | None:
    """Probability that a positive (bad) case scores lower than a negative one (ties count half); None
    when either class is missing."""
    s = np.asarray(list(scores), float)
    p = np.asarray(list(positive), bool)
    pos, neg = s[p], s[~p]
    if pos.size == 0 or neg.size == 0:
        return None
    lower = (pos[:, None] < neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(lower / (pos.size * neg.size))


def order_auroc(keys: Iterable[tuple[int, float]], positive: Iterable[bool]) -> float | None:
    """AUROC of an order (review_order keys: the first to check first) for the positives (bad masks): the probability
    that a bad mask comes before a good one, ties counting half."""
    keys = list(keys)
    position = {key: i for i, key in enumerate(sorted(set(keys)))}
    return auroc([position[key] for key in keys], positive)


def qc_figures(rows: list[QCRow]) -> dict[str, Any]:
    """AUROC of the score and of QC's order to check masks (review_order) for true Dice < BAD_BELOW, Spearman of
    estimated (else raw score) against true Dice, false alarms on clean scans (clean variants included), silent
    failures, and the verdict counts."""
    scored = _scored(rows)
    clean = [r for r in rows if is_clean(r.corruption)]
    clean_good = [r for r in clean if r.true_dice >= BAD_BELOW]
    estimated = [r for r in rows if r.estimated_dice is not None]
    basis = estimated if estimated else scored
    values = [r.estimated_dice if estimated else r.score for r in basis]
    return {
        "cases": len(rows),
        "bad": sum(r.true_dice < BAD_BELOW for r in rows),
        "auroc_score_bad": auroc([r.score for r in scored], [r.true_dice < BAD_BELOW for r in scored]),
        "auroc_verdict_bad": auroc([0.0 if r.verdict != "ok" else 1.0 for r in rows],
                                   [r.true_dice < BAD_BELOW for r in rows]),
        "auroc_order_bad": order_auroc([review_order(r.verdict, r.estimated_dice, r.score) for r in rows],
                                       [r.true_dice < BAD_BELOW for r in rows]),
        "spearman": spearman(values, [r.true_dice for r in basis]),
        "spearman_of": "estimated_dice" if estimated else "score (the model has no calibration)",
        "mean_abs_error": float(np.mean([abs(r.estimated_dice - r.true_dice) for r in estimated])) if estimated else None,
        "clean": len(clean),
        "false_alarm_rate_clean": (sum(r.verdict != "ok" for r in clean) / len(clean)) if clean else None,
        # Flags on clean scans whose mask is in fact good (true Dice >= BAD_BELOW): QC's own false alarms,
        # apart from flags on clean scans the model got wrong.
        "clean_good": len(clean_good),
        "false_alarm_rate_clean_good": (sum(r.verdict != "ok" for r in clean_good) / len(clean_good))
        if clean_good else None,
        "silent_failures": sum(_silent(r, r.verdict) for r in rows),
        "refused": sum(r.refused for r in rows),
        "verdicts": _verdict_counts(r.verdict for r in rows),
        "mean_dice": float(np.mean([r.true_dice for r in rows])) if rows else None,
        "mean_dice_clean": float(np.mean([r.true_dice for r in clean])) if clean else None,
    }


def _scored(rows: Iterable[QCRow]) -> list[QCRow]:
    """The rows with a finite score."""
    return [r for r in rows if r.score is not None and math.isfinite(r.score)]


def _silent(row: QCRow, verdict: str) -> bool:
    """Whether a verdict on this row is a silent failure: a mask below SILENT_BELOW passed as ok."""
    return row.true_dice < SILENT_BELOW and verdict == "ok"


def _verdict_counts(verdicts: Iterable[str]) -> dict[str, int]:
    """{ok, review, fail: how many}."""
    verdicts = list(verdicts)
    return {v: verdicts.count(v) for v in ("ok", "review", "fail")}


def _false_alarms(rows: list[QCRow], verdicts: list[str]) -> tuple[int, float | None]:
    """(clean masks with true Dice >= BAD_BELOW, the share of them flagged; None without any)."""
    flags = [v != "ok" for r, v in zip(rows, verdicts) if is_clean(r.corruption) and r.true_dice >= BAD_BELOW]
    return len(flags), (sum(flags) / len(flags) if flags else None)


def _score_auroc(rows: list[QCRow]) -> float | None:
    """AUROC of the score for true Dice < BAD_BELOW over the scored rows."""
    scored = _scored(rows)
    return auroc([r.score for r in scored], [r.true_dice < BAD_BELOW for r in scored])


def _group_figures(rows: list[QCRow], verdicts: list[str], clean: bool) -> dict[str, Any]:
    """Cases, mean true Dice, bad masks, silent failures and verdict counts of a group of rows judged by verdicts;
    for a clean group also its false alarms among masks with true Dice >= BAD_BELOW."""
    figures: dict[str, Any] = {
        "cases": len(rows), "mean_dice": float(np.mean([r.true_dice for r in rows])) if rows else None,
        "bad": sum(r.true_dice < BAD_BELOW for r in rows),
        "silent_failures": sum(_silent(r, v) for r, v in zip(rows, verdicts)),
        "refused": sum(r.refused for r in rows), "auroc_score": _score_auroc(rows), **_verdict_counts(verdicts),
    }
    if clean:
        figures["clean_good"], figures["false_alarm_rate"] = _false_alarms(rows, verdicts)
    return figures


def per_family(rows: list[QCRow]) -> dict[str, dict[str, Any]]:
    """Per family, in the order met: cases, mean true Dice, bad masks (true Dice < BAD_BELOW), silent failures,
    ok / review / fail and the score's AUROC within it; a clean family also its false-alarm rate among masks with
    true Dice >= BAD_BELOW."""
    out: dict[str, dict[str, Any]] = {}
    for kind in dict.fromkeys(r.corruption for r in rows):
        group = [r for r in rows if r.corruption == kind]
        out[kind] = _group_figures(group, [r.verdict for r in group], is_clean(kind))
    return out


@dataclass(frozen=True)
class HoldOutConfig:
    """How leave-one-family-out chooses the review threshold on the refitted estimated Dice."""

    thresholds: tuple[float, ...] = tuple(round(0.80 + 0.01 * i, 2) for i in range(16))
    # The largest share of the fitted clean masks with true Dice >= BAD_BELOW a threshold may flag.
    max_false_alarms: float = 0.05
    fail_below: float = FAIL_BELOW


HOLD_OUT = HoldOutConfig()


def _estimate(row: QCRow, calibration: ScoreCalibration | None) -> float | None:
    """calibration's estimated Dice for row's score, None without either."""
    if calibration is None or row.score is None or not math.isfinite(row.score):
        return None
    return calibration.estimate(row.score)[0]


def refitted_verdict(row: QCRow, calibration: ScoreCalibration | None, threshold: float,
                     fail_below: float = FAIL_BELOW) -> str:
    """The verdict of row's findings but the estimated Dice's (rule_verdict), with calibration's estimated Dice below
    fail_below a fail and below threshold a review; a row without a score keeps its rules' verdict."""
    rules = row.rule_verdict
    estimate = _estimate(row, calibration)
    if estimate is None:
        return rules
    if rules == "fail" or estimate < fail_below:
        return "fail"
    return "review" if rules == "review" or estimate < threshold else "ok"


def refit_calibration(rows: list[QCRow]) -> ScoreCalibration | None:
    """The score calibration fitted on the rows' (score, true Dice), None without a scored row."""
    scored = _scored(rows)
    return fit_score_calibration([r.score for r in scored], [r.true_dice for r in scored]) if scored else None


def choose_threshold(rows: list[QCRow], calibration: ScoreCalibration | None,
                     config: HoldOutConfig = HOLD_OUT) -> float:
    """Of config.thresholds that flag at most max_false_alarms of the rows' clean masks with true Dice >= BAD_BELOW,
    the one with the fewest silent failures (then the lowest); when none keeps within that cap, the one with the
    fewest false alarms (then silent failures, then the lowest)."""
    outcomes = {}
    for threshold in config.thresholds:
        verdicts = [refitted_verdict(r, calibration, threshold, config.fail_below) for r in rows]
        rate = _false_alarms(rows, verdicts)[1]
        outcomes[threshold] = (sum(_silent(r, v) for r, v in zip(rows, verdicts)), rate or 0.0)
    capped = [t for t, (_, rate) in outcomes.items() if rate <= config.max_false_alarms]
    if capped:
        return min(capped, key=lambda t: (outcomes[t][0], t))
    return min(outcomes, key=lambda t: (outcomes[t][1], outcomes[t][0], t))


def leave_one_family_out(rows: list[QCRow], config: HoldOutConfig = HOLD_OUT) -> dict[str, Any]:
    """Each family in turn held out: the score calibration refitted and its review threshold chosen
    (choose_threshold) on every other row, then the held-out rows judged by their rules that do not use the
    calibration and the refitted estimate. Per family: the threshold, the calibration's line, silent failures,
    the share flagged (a clean family's false alarms too); over all held-out rows: the AUROCs of the score, of the
    held-out estimates, of the held-out verdicts and of the order they set (review_order), silent failures and the
    clean false-alarm rate; every row's held-out estimate and verdict."""
    families: dict[str, dict[str, Any]] = {}
    judged: list[tuple[QCRow, float | None, str]] = []
    for family in dict.fromkeys(r.corruption for r in rows):
        held = [r for r in rows if r.corruption == family]
        fitted = [r for r in rows if r.corruption != family]
        calibration = refit_calibration(fitted)
        threshold = choose_threshold(fitted, calibration, config)
        verdicts = [refitted_verdict(r, calibration, threshold, config.fail_below) for r in held]
        judged += [(r, _estimate(r, calibration), v) for r, v in zip(held, verdicts)]
        figures = _group_figures(held, verdicts, is_clean(family))
        flagged = sum(v != "ok" for v in verdicts)
        families[family] = {
            "threshold": threshold, "fitted_cases": len(fitted),
            "slope": calibration.slope if calibration is not None else None,
            "intercept": calibration.intercept if calibration is not None else None,
            **figures, "flagged": flagged, "flagged_share": flagged / len(held),
            "verdicts": _verdict_counts(verdicts),
        }
    return {"families": families, "held_out": _held_out_summary(judged, families),
            "rows": [{"name": r.name, "corruption": r.corruption, "true_dice": r.true_dice, "score": r.score,
                      "estimated_dice": e, "verdict": v} for r, e, v in judged]}


def _held_out_summary(judged: list[tuple[QCRow, float | None, str]],
                      families: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The figures over every held-out row."""
    rows = [r for r, _, _ in judged]
    verdicts = [v for _, _, v in judged]
    estimated = [(e, r.true_dice < BAD_BELOW) for r, e, _ in judged if e is not None]
    clean_good, rate = _false_alarms(rows, verdicts)
    thresholds = [f["threshold"] for f in families.values()]
    return {
        "cases": len(rows), "auroc_score": _score_auroc(rows),
        "auroc_estimated": auroc([e for e, _ in estimated], [b for _, b in estimated]),
        "auroc_verdict": auroc([0.0 if v != "ok" else 1.0 for v in verdicts], [r.true_dice < BAD_BELOW for r in rows]),
        "auroc_order": order_auroc([review_order(v, e, r.score) for r, e, v in judged],
                                   [r.true_dice < BAD_BELOW for r in rows]),
        "silent_failures": sum(_silent(r, v) for r, v in zip(rows, verdicts)),
        "flagged_share": sum(v != "ok" for v in verdicts) / len(rows) if rows else None,
        "clean_good": clean_good, "false_alarm_rate_clean_good": rate,
        "thresholds": [min(thresholds), max(thresholds)] if thresholds else None,
    }


# The measures a learned combination (combination_study) reads from a row, each as a function of QCReport.measures
# (None where the row lacks it); logarithms where a measure spans decades, asinh where it may also be 0 or negative
# (a contrast <= 0 is a mask no brighter than its surroundings, the most telling value of all).
COMBINED_MEASURES: dict[str, Callable[[dict[str, Any]], float | None]] = {
    "log_volume_ml": lambda m: math.log(m["volume_ml"]) if m.get("volume_ml") else None,
    "largest_share": lambda m: m.get("largest_share"),
    "box_border_share": lambda m: m.get("box_border_share"),
    "scan_edge_share": lambda m: m.get("scan_edge_share"),
    "largest_voxel_mm": lambda m: max(m["spacing_mm"]) if m.get("spacing_mm") else None,
    "skewness": lambda m: m.get("skewness"),
    "edge_sharpness": lambda m: m.get("edge_sharpness"),
    "interior_rank": lambda m: m.get("interior_rank"),
    "log_noise_level": lambda m: math.log(m["noise_level"] + 1e-3) if m.get("noise_level") is not None else None,
    "asinh_contrast": lambda m: math.asinh(m["contrast"]) if m.get("contrast") is not None else None,
    "log_saturation": lambda m: math.log(m["saturation"] + 1e-6) if m.get("saturation") is not None else None,
    "shape_as_given": lambda m: (m.get("orientation") or {}).get("as_given"),
    "shape_gain": lambda m: (m["orientation"]["best"] - m["orientation"]["as_given"]) if m.get("orientation") else None,
}


def _features(rows: list[QCRow]) -> np.ndarray:
    """rows x (score, COMBINED_MEASURES...), NaN where a row lacks a measure."""
    return np.array([[r.score] + [f(r.measures) for f in COMBINED_MEASURES.values()] for r in rows], dtype=float)


def _logistic(features: np.ndarray, bad: np.ndarray, l2: float, steps: int = 200) -> Callable[[np.ndarray], np.ndarray]:
    """A ridge-penalised (l2 > 0) logistic regression of bad on the standardised features (Newton's method), a
    missing value taking its column's mean over the fitted rows; returns the fitted log-odds of a mask being bad as
    a function of a feature table (a constant when the fitted rows are all bad or all good)."""
    if not l2 > 0:
        raise ValueError(f"the ridge penalty must be above 0, got {l2}")
    finite = np.isfinite(features)
    mean = np.array([features[finite[:, j], j].mean() if finite[:, j].any() else 0.0 for j in range(features.shape[1])])
    filled = np.where(finite, features, mean)
    sd = filled.std(0)
    sd = np.where(sd > 0, sd, 1.0)

    def design(table: np.ndarray) -> np.ndarray:
        return np.c_[(np.where(np.isfinite(table), table, mean) - mean) / sd, np.ones(len(table))]

    if bad.all() or not bad.any():
        return lambda table: np.zeros(len(table))
    x, y = design(features), bad.astype(float)
    penalty = np.diag([l2] * features.shape[1] + [0.0])
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        step = np.linalg.solve(x.T @ (x * (p * (1 - p))[:, None]) + penalty, x.T @ (p - y) + penalty @ w)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return lambda table: design(table) @ w


def combination_study(rows: list[QCRow], l2: float = 1.0) -> dict[str, Any]:
    """Whether the measures QC takes, combined by a logistic regression fitted on the benchmark's rows, would rank
    bad masks (true Dice < BAD_BELOW) better than the score: its AUROC fitted and judged on every row (in sample),
    and with each family held out of the fit in turn (the measure of what it does on families it was not fitted
    on; the held-out log-odds of all families, each from its own fit, pooled into one AUROC), beside the score's
    AUROC on the same rows; rows without a score or a mask are left out."""
    used = [r for r in _scored(rows) if not r.refused and r.measures.get("volume_ml") is not None]
    if len(used) < 2 or len({r.corruption for r in used}) < 2:
        return {"cases": len(used), "auroc_score": None, "auroc_in_sample": None, "auroc_held_out": None}
    features, bad = _features(used), np.array([r.true_dice < BAD_BELOW for r in used])
    families = np.array([r.corruption for r in used])
    held_out = np.zeros(len(used))
    for family in dict.fromkeys(families):
        inside = families == family
        held_out[inside] = _logistic(features[~inside], bad[~inside], l2)(features[inside])
    # AUROC here scores high-for-good: the log-odds of bad, negated.
    return {"cases": len(used), "measures": ["score", *COMBINED_MEASURES], "l2": l2,
            "auroc_score": auroc(features[:, 0], bad),
            "auroc_in_sample": auroc(-_logistic(features, bad, l2)(features), bad),
            "auroc_held_out": auroc(-held_out, bad)}
