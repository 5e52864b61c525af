"""Medical Segmentation Decathlon datasets: index, validation and loading of cases."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from heartseg.runtime.errors import InputError
from heartseg.runtime.formats.nifti import load_volume, strip_nifti_suffix
from heartseg.runtime.image import Volume, same_grid


@dataclass(frozen=True)
class Case:
    """One labelled training case of an MSD dataset."""

    case_id: str
    image: Path
    label: Path
    dataset: str = ""


@dataclass
class DatasetInfo:
    """What dataset.json says about the data (carried into the model's metadata)."""

    root: Path
    name: str
    description: str
    licence: str
    reference: str
    cases: list[Case]


def _resolve_inside(root: Path, relative: str, what: str) -> Path:
    if Path(relative).is_absolute():
        raise InputError(f"dataset.json: {what} path {relative!r} is absolute; paths must be relative to {root}")
    # Checked on the path as written, not its symlink target: a dataset of symlinks to files kept
    # elsewhere is fine, while '..' that climbs out of the folder is not.
    folder = Path(os.path.abspath(root))
    path = Path(os.path.normpath(folder / relative))
    if folder not in path.parents:
        raise InputError(f"dataset.json: {what} path {relative!r} leaves the dataset folder {root}")
    if not path.is_file():
        raise InputError(f"dataset.json: {what} file {relative!r} does not exist in {root}")
    return path


def read_dataset(root: str | Path) -> DatasetInfo:
    """Read dataset.json of an MSD-layout folder; every path must resolve inside the folder."""
    root = Path(root)
    manifest = root / "dataset.json"
    if not manifest.is_file():
        raise InputError(f"{root}: no dataset.json (expected the Medical Segmentation Decathlon layout)")
    try:
        meta = json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{manifest}: not valid JSON ({exc})") from None
    entries = meta.get("training")
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{manifest}: no 'training' list of cases")
    cases = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) \
                or not isinstance(entry.get("label"), str):
            raise InputError(f"{manifest}: each training entry needs 'image' and 'label' paths, got {entry!r}")
        image = _resolve_inside(root, entry["image"], "image")
        label = _resolve_inside(root, entry["label"], "label")
        cases.append(Case(strip_nifti_suffix(image.name), image, label, root.resolve().name))
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise InputError(f"{manifest}: duplicate case names")
    return DatasetInfo(root, str(meta.get("name", root.name)), str(meta.get("description", "")),
                       str(meta.get("licence", meta.get("license", "unknown"))), str(meta.get("reference", "")), cases)


def read_datasets(roots: list[str | Path]) -> list[DatasetInfo]:
    """Read several MSD folders for one run; case names must be unique across them."""
    infos = [read_dataset(root) for root in roots]
    names = [info.cases[0].dataset for info in infos]
    if len(set(names)) != len(names):
        raise InputError(f"two dataset folders share the name {names!r}: give each dataset its own folder name")
    seen: dict[str, str] = {}
    for info in infos:
        for case in info.cases:
            if case.case_id in seen:
                raise InputError(f"case {case.case_id!r} is in both {seen[case.case_id]} and {info.root}: "
                                 "case names must be unique across the datasets of a run")
            seen[case.case_id] = str(info.root)
    return infos


def load_case(case: Case) -> tuple[Volume, Volume]:
    """Load a case's image and binary label, checking that they share a grid and that the label is binary."""
    image = load_volume(case.image)
    label = load_volume(case.label)
    if not same_grid(image, label):
        raise InputError(f"{case.case_id}: image {image.shape} and label {label.shape} differ in shape or affine")
    values = np.unique(label.data)
    if not set(values.tolist()) <= {0.0, 1.0}:
        raise InputError(f"{case.case_id}: label is not binary (values {values[:10].tolist()})")
    label.data = label.data.astype(np.uint8)
    return image, label


def image_hash(path: Path) -> str:
    """SHA-256 of a scan's voxel data, to find cases with identical images."""
    volume = load_volume(path)
    digest = hashlib.sha256(np.ascontiguousarray(volume.data).tobytes())
    digest.update(str(volume.shape).encode())
    return digest.hexdigest()


def dataset_info(datasets: list[DatasetInfo]) -> dict[str, str]:
    """What the model's metadata says of its training data (each dataset named when there are several)."""
    def joined(attr: str) -> str:
        if len(datasets) == 1:
            return str(getattr(datasets[0], attr))
        return " | ".join(f"{d.name}: {getattr(d, attr)}" for d in datasets)

    return {"dataset": " + ".join(d.name for d in datasets), "datasets": ",".join(d.cases[0].dataset for d in datasets),
            "dataset_description": joined("description"), "licence": joined("licence"), "reference": joined("reference")}
