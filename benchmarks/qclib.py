"""The QC benchmark's cases and figures: held-out scans, corrupted copies with their true Dice, and the
scores that say how well QC separates good masks from bad ones.

Every corruption returns a scan and the label on that scan's own grid, so the true Dice is the Dice of
what heartseg writes for that scan against what a reader would draw on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from heartseg.runtime.qc import SILENT_BELOW, spearman
from heartseg.runtime.formats.nifti import load_mask, load_volume
from heartseg.runtime.image import Volume
from heartseg.runtime.metrics import dice_score
from scipy import ndimage

# True Dice below this makes a mask "bad" for the AUROC; below SILENT_BELOW with verdict ok is a silent failure.
BAD_BELOW = 0.85


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


Corruption = Callable[[Volume, np.ndarray, np.random.Generator], tuple[Volume, np.ndarray]]


def _with(volume: Volume, data: np.ndarray, affine: np.ndarray | None = None) -> Volume:
    return Volume(np.ascontiguousarray(data, dtype=np.float32), volume.affine if affine is None else affine)


def gaussian_noise(volume: Volume, label: np.ndarray, rng: np.random.Generator) -> tuple[Volume, np.ndarray]:
    """Additive noise with half the image's standard deviation."""
    data = volume.data + rng.standard_normal(volume.shape).astype(np.float32) * 0.5 * float(volume.data.std())
    return _with(volume, data), label


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


CORRUPTIONS: dict[str, Corruption] = {
    "noise": gaussian_noise, "blur": blur, "thick_slices": thick_slices, "bias_field": bias_field,
    "ghosting": ghosting, "fov_cut": fov_cut, "wrong_orientation": wrong_orientation, "inversion": inversion,
}


def load_case(name: str, image: Path, label: Path) -> QCCase:
    """A clean case from its image and label files."""
    return QCCase(name, "clean", load_volume(image), load_mask(label).data)


def corrupted(cases: Iterable[QCCase], kinds: Iterable[str] = tuple(CORRUPTIONS), seed: int = 0) -> list[QCCase]:
    """Every clean case, then each of its corrupted copies."""
    out: list[QCCase] = []
    rng = np.random.default_rng(seed)
    for case in cases:
        out.append(case)
        for kind in kinds:
            volume, label = CORRUPTIONS[kind](case.volume, case.label, rng)
            out.append(QCCase(case.name, kind, volume, label))
    return out


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
    """Segment one case and record QC's verdict beside the true Dice."""
    import time

    start = time.perf_counter()
    prediction = segmenter.segment(case.volume)
    seconds = time.perf_counter() - start
    report = prediction.report
    return QCRow(case.name, case.corruption, dice_score(prediction.mask, case.label), report.verdict, report.score,
                 report.estimated_dice, list(report.reasons), seconds, report.seconds)


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


def qc_figures(rows: list[QCRow]) -> dict[str, Any]:
    """AUROC of the score for true Dice < BAD_BELOW, Spearman of estimated (else raw score) against true
    Dice, false alarms on clean scans, silent failures, and the verdict counts."""
    scored = [r for r in rows if r.score is not None and math.isfinite(r.score)]
    clean = [r for r in rows if r.corruption == "clean"]
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
        "silent_failures": sum(r.true_dice < SILENT_BELOW and r.verdict == "ok" for r in rows),
        "verdicts": {v: sum(r.verdict == v for r in rows) for v in ("ok", "review", "fail")},
        "mean_dice": float(np.mean([r.true_dice for r in rows])) if rows else None,
        "mean_dice_clean": float(np.mean([r.true_dice for r in clean])) if clean else None,
    }


def per_corruption(rows: list[QCRow]) -> dict[str, dict[str, Any]]:
    """Mean true Dice, and how many were ok / review / fail, per corruption."""
    out: dict[str, dict[str, Any]] = {}
    for kind in dict.fromkeys(r.corruption for r in rows):
        group = [r for r in rows if r.corruption == kind]
        out[kind] = {"cases": len(group), "mean_dice": float(np.mean([r.true_dice for r in group])),
                     **{v: sum(r.verdict == v for r in group) for v in ("ok", "review", "fail")}}
    return out
