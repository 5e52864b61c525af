"""Preprocessed volumes cached on disk, made with the runtime's own preprocessing functions."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from heartseg.runtime import __version__
from heartseg.runtime.atomic import write_text_atomic
from heartseg.runtime.contract import ModelContract, StageContract
from heartseg.runtime.preprocess import (
    mask_box,
    resample_to_shape,
    stage_grid,
    target_shape,
    to_canonical,
)

from .dataset import Case, load_case
from .plan import DataFingerprint

# Bump when the runtime's preprocessing changes, so that no run trains on stale inputs.
CACHE_VERSION = 1


def default_cache_root() -> Path:
    """$HEARTSEG_CACHE, else ~/.cache/heartseg."""
    return Path(os.environ.get("HEARTSEG_CACHE", Path.home() / ".cache" / "heartseg"))


def cache_root(option: str | None) -> Path | None:
    """The cache folder a --cache value names: None for 'none', the default folder when not given."""
    return None if option == "none" else Path(option) if option else default_cache_root()


@dataclass
class PreparedCase:
    """A case on the canonical grid, and on each stage's grid (images normalised, labels binary, and the
    labels' partial-volume shares on each stage's grid in soft_labels)."""

    case_id: str
    image: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    stages: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    dataset: str = ""
    soft_labels: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def box(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The label's box on the canonical grid."""
        return mask_box(self.label)


# Soft labels are stored as uint8 shares of SOFT_SCALE (a quantisation step of 0.4 %).
SOFT_SCALE = 255


def stage_label_share(label: np.ndarray, spacing: tuple[float, float, float], stage: StageContract) -> np.ndarray:
    """The share of each voxel of a stage's grid that a canonical label covers (linear resampling of 0/1, so
    already in [0, 1])."""
    shape = target_shape(label.shape, spacing, stage.spacing)
    return resample_to_shape(label.astype(np.float32), shape, order=1)


def _key(case: Case, contract: ModelContract) -> str:
    stat_i, stat_l = case.image.stat(), case.label.stat()
    spec = [CACHE_VERSION, __version__, str(case.image.resolve()), stat_i.st_size, stat_i.st_mtime_ns, stat_l.st_size, stat_l.st_mtime_ns,
            contract.orientation, contract.normalization, [list(s.spacing) for s in contract.stages]]
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:16]


def _save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")  # per process: DDP ranks may fill the cache together
    np.save(tmp, array)
    os.replace(tmp, path)


def prepare_case(case: Case, contract: ModelContract, cache_root: Path | None) -> PreparedCase:
    """Load a case from the cache, or preprocess it (and store it) with the runtime's functions."""
    folder = (cache_root / _key(case, contract)) if cache_root else None
    names = ["native_image", "native_label"] + [f"{s.name}_{k}" for s in contract.stages
                                                 for k in ("image", "label", "label_soft")]
    if folder and all((folder / f"{n}.npy").is_file() for n in names) and (folder / "spacing.json").is_file():
        arrays = {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in names}
        spacing = tuple(json.loads((folder / "spacing.json").read_text()))
    else:
        image, label = load_case(case)
        canonical = to_canonical(image, contract.orientation)
        canonical_label = to_canonical(label, contract.orientation).data.astype(np.uint8)
        spacing = canonical.spacing
        arrays = {"native_image": canonical.data.astype(np.float32), "native_label": canonical_label}
        for stage in contract.stages:
            arrays[f"{stage.name}_image"] = stage_grid(canonical.data, spacing, stage.spacing, contract.normalization)
            share = stage_label_share(canonical_label, spacing, stage)
            arrays[f"{stage.name}_label"] = (share >= 0.5).astype(np.uint8)  # the binary label: linear, then >= 0.5
            arrays[f"{stage.name}_label_soft"] = np.round(share * SOFT_SCALE).astype(np.uint8)
        if folder:
            folder.mkdir(parents=True, exist_ok=True)
            for name, array in arrays.items():
                _save(folder / f"{name}.npy", array)
            write_text_atomic(folder / "spacing.json", json.dumps(list(spacing)))
    stages = {s.name: (arrays[f"{s.name}_image"], arrays[f"{s.name}_label"]) for s in contract.stages}
    soft = {s.name: arrays[f"{s.name}_label_soft"] for s in contract.stages}
    return PreparedCase(case.case_id, arrays["native_image"], arrays["native_label"], spacing, stages,  # type: ignore[arg-type]
                        case.dataset, soft)


def fingerprint(cases: list[Case]) -> DataFingerprint:
    """Canonical spacing, shape and label box size of each case (headers and labels only)."""
    from heartseg.runtime.formats.nifti import load_volume

    spacings, shapes, boxes, datasets = [], [], [], []
    for case in cases:
        datasets.append(case.dataset)
        label = to_canonical(load_volume(case.label), "RAS")
        spacings.append(label.spacing)
        shapes.append(label.data.shape)
        box = mask_box(label.data > 0.5)
        boxes.append(tuple(int(h - l) for l, h in zip(*box)) if box else label.data.shape)
    return DataFingerprint(spacings, shapes, boxes, datasets)
