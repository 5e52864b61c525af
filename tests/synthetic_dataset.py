"""A tiny synthetic dataset in Medical Segmentation Decathlon layout, for training tests."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np


def synthetic_case(shape: tuple[int, int, int], seed: int, radius: tuple[float, float] = (0.12, 0.18),
                   atrium: float = 120.0, background: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """A bright ellipsoid 'atrium' beside a dimmer blob, on a noisy background; returns (image uint8, label).

    radius (a share of the shape per axis) sets the foreground fraction, atrium and background the
    intensity profile (a second 'sequence' uses other values).
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(float)
    centre = np.asarray(shape) * rng.uniform(0.4, 0.6, 3)
    radii = np.asarray(shape) * rng.uniform(*radius, 3)
    label = (((grid - centre) / radii) ** 2).sum(-1) <= 1.0
    other = np.asarray(shape) * np.array([0.2, 0.25, 0.5])
    blob = (((grid - other) / (np.asarray(shape) * 0.1)) ** 2).sum(-1) <= 1.0
    image = background + 10 * rng.standard_normal(shape) + atrium * label + 50 * blob
    return np.clip(image, 0, 255).astype(np.uint8), label.astype(np.uint8)


def make_msd_dataset(root: Path, n_cases: int = 6, shape: tuple[int, int, int] = (32, 32, 24),
                     spacing: tuple[float, float, float] = (2.0, 2.0, 2.5), duplicate: bool = True,
                     prefix: str = "syn", seed: int = 0, **case_options) -> Path:
    """Write dataset.json, imagesTr/ and labelsTr/; with duplicate, the last case repeats the first image.

    case_options go to synthetic_case (radius, atrium, background).
    """
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    affine = np.diag(list(spacing) + [1.0])
    entries = []
    for index in range(n_cases):
        case_seed = seed + (0 if (duplicate and index == n_cases - 1) else index)
        image, label = synthetic_case(shape, case_seed, **case_options)
        name = f"{prefix}_{index:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / name)
        entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    manifest = {"name": "Synthetic", "description": "synthetic ellipsoids", "licence": "CC0",
                "reference": "heartseg tests", "labels": {"0": "background", "1": "atrium"},
                "numTraining": n_cases, "training": entries}
    (root / "dataset.json").write_text(json.dumps(manifest, indent=1))
    return root
