"""Accuracy of a heartseg model on held-out scans stored as other scanners and datasets store them.

For each held-out case of the model's fold (metadata `info.val_cases`: cases the model never
trained on) it segments the scan as stored and in variants that a user's data may differ by, and
scores each mask against the label moved the same way:

* `LPS header`: the voxels stored in LPS order with a matching affine (the same anatomy; the
  runtime's reorientation must undo it exactly);
* `axes permuted` and `flipped x`: the voxel axes permuted or mirrored with the affine left
  axis-aligned (what a dataset whose stored orientation is not anatomical looks like to the model);
* `int16 x8 + 100`: int16 storage on another intensity scale;
* `float, bias field, gamma`: float storage with a smooth 0.7-1.3x intensity field and gamma 1.3;
* `field of view cut, axis 0` and `axis 2`: the scan ends halfway through the atrium along its first
  or last stored axis (a scan whose coverage misses part of the atrium), the label cut the same;
* `slices 2.5 mm, axis 2`: the slices along the last stored axis averaged in slabs of a whole number of them,
  about 2.5 mm thick (Task02's 1.37 mm slices in pairs: 2.74 mm; LA2018's 0.625 mm in fours), the label's slab
  share rounded at a half (clinical atrium scans often have 2-3 mm slices).

    python benchmarks/robustness.py --model models/heartseg-la.onnx \\
        --data ../shared/data/Task02_Heart --data ../shared/data/LA2018 --json robustness.json

Prints a table of mean Dice per variant and dataset (and writes every case with --json).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import qclib
from heartseg.runtime.formats.nifti import load_mask, load_volume, strip_nifti_suffix
from heartseg.runtime.image import Volume
from heartseg.runtime.metrics import dice_score
from heartseg.runtime.segmenter import Segmenter
from scipy import ndimage

Variant = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


def _as_stored(image, label, affine):
    return image, label, affine


def _lps(image, label, affine):
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = (np.asarray(image.shape[:2]) - 1)
    return image[::-1, ::-1].copy(), label[::-1, ::-1].copy(), affine @ flip


def _permuted(image, label, affine):
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))[[2, 0, 1]]
    return (np.ascontiguousarray(image.transpose(2, 0, 1)), np.ascontiguousarray(label.transpose(2, 0, 1)),
            np.diag([*spacing, 1.0]))


def _flipped(image, label, affine):
    return image[::-1].copy(), label[::-1].copy(), affine


def _int16(image, label, affine):
    return (image.astype(np.float32) * 8 + 100).astype(np.int16), label, affine


def _bias_gamma(image, label, affine):
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in image.shape], indexing="ij")
    field = 1.0 + 0.3 * (0.6 * grids[0] + 0.4 * grids[1] * grids[2])
    unit = (image - image.min()) / max(float(np.ptp(image)), 1e-6)
    return (unit ** 1.3 * field * 1000.0).astype(np.float32), label, affine


def _cut(axis: int) -> Variant:
    def cut(image, label, affine):
        # The plane through the atrium's centroid (voxel k spans k - 0.5 to k + 0.5); index 0 stays where
        # it was, so the affine holds.
        centroid = ndimage.center_of_mass(label)[axis] if label.any() else label.shape[axis] / 2 - 0.5
        keep = (slice(None),) * axis + (slice(0, max(int(round(centroid + 0.5)), 1)),)
        return np.ascontiguousarray(image[keep]), np.ascontiguousarray(label[keep]), affine
    return cut


def _slabs(thickness_mm: float) -> Variant:
    def slabs(image, label, affine):
        # qclib's thick slices (slabs along the last stored axis), as many slices to a slab as come nearest.
        volume = Volume(np.asarray(image, np.float32), affine)
        factor = max(int(round(thickness_mm / volume.spacing[2])), 1)
        thick, ref = qclib.thick_slices(volume, (np.asarray(label) > 0).astype(np.uint8), None, factor=factor)
        return thick.data, ref, thick.affine
    return slabs


VARIANTS: dict[str, Variant] = {
    "as stored": _as_stored, "LPS header": _lps, "axes permuted": _permuted, "flipped x": _flipped,
    "int16 x8 + 100": _int16, "float, bias field, gamma": _bias_gamma,
    "field of view cut, axis 0": _cut(0), "field of view cut, axis 2": _cut(2),
    "slices 2.5 mm, axis 2": _slabs(2.5),
}


def held_out_cases(segmenter: Segmenter, roots: list[Path]) -> list[tuple[str, str, Path, Path]]:
    """(dataset, case, image, label) of the model's held-out cases found in the given MSD folders."""
    wanted = set(filter(None, segmenter.contract.info.get("val_cases", "").split(",")))
    cases = []
    for root in roots:
        for image in sorted((root / "imagesTr").glob("*.nii*")):
            case = strip_nifti_suffix(image.name)
            if case in wanted and not image.name.startswith("."):
                cases.append((root.resolve().name, case, image, root / "labelsTr" / image.name))
    return cases


def evaluate(segmenter: Segmenter, cases: list[tuple[str, str, Path, Path]], variants: dict[str, Variant],
             progress: Callable[[str], None] | None = None) -> list[dict]:
    """Dice of every (case, variant), with the QC flag the runtime raised."""
    rows = []
    for dataset, case, image_path, label_path in cases:
        scan, label = load_volume(image_path), load_mask(label_path)
        for name, variant in variants.items():
            data, ref, affine = variant(scan.data, label.data, scan.affine)
            prediction = segmenter.segment(Volume(np.asarray(data, np.float32), affine))
            rows.append({"dataset": dataset, "case": case, "variant": name,
                         "dice": dice_score(prediction.mask, ref > 0), "qc": prediction.qc})
            if progress:
                progress(f"{dataset} {case} {name}: Dice {rows[-1]['dice']:.4f}")
    return rows


def table(rows: list[dict]) -> str:
    """Markdown table: mean Dice per variant (rows) and dataset (columns), case counts in the header."""
    datasets = sorted({r["dataset"] for r in rows})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    counts = {d: len({r["case"] for r in rows if r["dataset"] == d}) for d in datasets}
    lines = ["| variant | " + " | ".join(f"{d} ({counts[d]} held-out)" for d in datasets) + " | flagged |",
             "| --- |" + " --- |" * (len(datasets) + 1)]
    for v in variants:
        cells = [f"{np.mean([r['dice'] for r in rows if r['variant'] == v and r['dataset'] == d]):.4f}"
                 for d in datasets]
        flagged = sum(1 for r in rows if r["variant"] == v and r["qc"])
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {flagged} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="heartseg ONNX model (default: the shipped one)")
    parser.add_argument("--data", type=Path, action="append", required=True, help="an MSD folder (repeatable)")
    parser.add_argument("--json", type=Path, default=None, help="write every case and variant here")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    segmenter = Segmenter(args.model, device="cpu", threads=args.threads)
    cases = held_out_cases(segmenter, args.data)
    if not cases:
        print("no held-out case of this model in the given folders (metadata info.val_cases)", file=sys.stderr)
        return 2
    rows = evaluate(segmenter, cases, VARIANTS, progress=lambda text: print(text, file=sys.stderr))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
