"""What a narrower box around the atrium would save, and cost: the fine stage's crop margin replaced.

The fine network is most of a scan's time, and it runs on the localiser's box grown by the fine stage's crop margin
(15 mm for the shipped model). This runs the Python reference pipeline (runtime/inference.py, with the networks taken
out of the model file) on the held-out scans the model's metadata names, once per margin, and prints per margin and
dataset the mean and lowest Dice against the labels and the voxels the fine network took (a grown box counted each
time it ran).

    python benchmarks/crop_margin.py [--model models/heartseg-la.onnx] [--data ../shared/data] [--margins 15,10,7.5,5]
                                     [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from heartseg.export.pipeline_file import unwrap
from heartseg.export.stamp import write_model
from heartseg.runtime.contract import ModelContract
from heartseg.runtime.formats.nifti import load_label, load_volume
from heartseg.runtime.inference import infer_canonical
from heartseg.runtime.metrics import dice_score
from heartseg.runtime.postprocess import mask_from_prob
from heartseg.runtime.preprocess import from_canonical, to_canonical
from heartseg.runtime.session import OnnxSession
from pipeline_parity import held_out_scans


def with_margin(contract: ModelContract, margin_mm: float) -> ModelContract:
    """The contract with its segmenting stages' crop margin replaced."""
    stages = [replace(s, crop_margin_mm=margin_mm) if s.role == "segmenter" else s for s in contract.stages]
    return replace(contract, stages=stages)


def measure(model: Path, data: Path, margins: list[float], threads: int = 2) -> list[dict]:
    """One row per held-out case and margin: its Dice against the label and the fine network's voxels."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        networks = OnnxSession(write_model(unwrap(onnx.load(str(model)), model), Path(tmp) / "networks.onnx"),
                               device="cpu", threads=threads)
        localiser = networks.contract.stages[0].name
        for dataset, scan, label_path in held_out_scans(model, data):
            canonical = to_canonical(load_volume(scan))
            label = load_label(label_path).data > 0
            for margin in margins:
                contract, voxels = with_margin(networks.contract, margin), []

                def predict(name: str, x: np.ndarray) -> np.ndarray:
                    if name != localiser:
                        voxels.append(int(np.prod(x.shape[2:])))
                    return networks.predict(name, x)

                prob = infer_canonical(canonical, contract, predict).prob
                mask = from_canonical(mask_from_prob(prob, contract), canonical) > 0
                rows.append({"dataset": dataset, "case": scan.name, "margin_mm": margin,
                             "dice": dice_score(mask, label), "fine_voxels": sum(voxels)})
            print(json.dumps(rows[-len(margins):]), flush=True)
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per margin and dataset: cases, mean and lowest Dice, mean fine-network voxels."""
    out = []
    for margin in dict.fromkeys(r["margin_mm"] for r in rows):
        for dataset in sorted({r["dataset"] for r in rows}):
            group = [r for r in rows if r["margin_mm"] == margin and r["dataset"] == dataset]
            out.append({"margin_mm": margin, "dataset": dataset, "cases": len(group),
                        "mean_dice": float(np.mean([r["dice"] for r in group])),
                        "lowest_dice": float(min(r["dice"] for r in group)),
                        "mean_fine_voxels": float(np.mean([r["fine_voxels"] for r in group]))})
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line entry point: measure, print the summary, write --json; exit code 0."""
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=root / "models" / "heartseg-la.onnx")
    parser.add_argument("--data", type=Path, default=root.parent / "shared" / "data")
    parser.add_argument("--margins", default="15,10,7.5,5", help="crop margins to compare, mm, comma-separated")
    parser.add_argument("--json", type=Path, help="write every row and the summary here")
    args = parser.parse_args(argv)
    rows = measure(args.model, args.data, [float(m) for m in args.margins.split(",")])
    table = summary(rows)
    print("margin mm  dataset        cases  mean Dice  lowest  fine voxels")
    for t in table:
        print(f"{t['margin_mm']:>9.1f}  {t['dataset']:<13} {t['cases']:>6}  {t['mean_dice']:.4f}     "
              f"{t['lowest_dice']:.4f}  {t['mean_fine_voxels'] / 1000:.0f}k")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "rows": rows, "summary": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
